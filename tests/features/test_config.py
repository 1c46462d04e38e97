from pathlib import Path

import pytest

from features.config import ConfigError, from_dict, load_config, parse_override, to_dict, Config

REPO = Path(__file__).resolve().parents[2]
KUAIRAND = REPO / "configs" / "kuairand.yaml"


def test_shipped_config_loads_and_round_trips():
    cfg = load_config(KUAIRAND)
    again = from_dict(Config, to_dict(cfg))
    assert again == cfg
    assert "watch_time" in cfg.data.continuous_signals and "hate" in cfg.data.binary_signals


def test_overrides_reach_nested_keys_and_are_typed():
    cfg = load_config(KUAIRAND, ["data.dir=/elsewhere", "split.train_block_hours=6", "fans.iron_fan_min_interactions=5"])
    assert cfg.data.dir == "/elsewhere"
    assert cfg.split.train_block_hours == 6.0
    assert cfg.fans.iron_fan_min_interactions == 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.dri=x", r"unknown config key 'data\.dri'"),
        ("quality.prior_strength=abc", r"quality\.prior_strength: expected a number"),
        ("split.mode=weekly", r"split\.mode: 'weekly' is not one of"),
        ("history.signal=watched", r"history\.signal = 'watched' is not a declared binary signal"),
        ("fans.iron_fan_min_interactions=2.5", r"expected an integer"),
        ("features.memory_limit=lots", r"features\.memory_limit must be a size such as '2GB'"),
        ("features.threads=0", r"features\.threads must be >= 1"),
        ("features.chunk_rows=0", r"features\.chunk_rows must be >= 1"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(KUAIRAND, [override])


def test_exponent_notation_without_a_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-5` as a string; a float field takes it, in the file and in --set.
    cfg = load_config(KUAIRAND, ["quality.prior_strength=2e1", "split.train_block_hours=-1.5E+1"])
    assert cfg.quality.prior_strength == 20.0 and cfg.split.train_block_hours == -15.0
    path = tmp_path / "c.yaml"
    path.write_text(KUAIRAND.read_text().replace("prior_strength:", "prior_strength: 5e0 #", 1))
    assert load_config(path).quality.prior_strength == 5.0
    for text in ("1e", "e5", "1e-5x", "0x1p3"):
        with pytest.raises(ConfigError, match="expected a number"):
            load_config(KUAIRAND, [f"quality.prior_strength={text}"])
    assert load_config(KUAIRAND, ["data.dir=1e5"]).data.dir == "1e5"  # a string field keeps the text


def test_override_values_that_are_not_yaml_are_text():
    assert parse_override("data.items.sep=|") == (["data", "items", "sep"], "|")
    assert parse_override("split.train_block_hours=6") == (["split", "train_block_hours"], 6)


def test_missing_file_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("data.dir")


def test_other_layer_sections_are_carried_not_rejected(tmp_path):
    text = KUAIRAND.read_text() + "\nretrieval: {embedding_dim: 32}\n"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.other["retrieval"] == {"embedding_dim": 32}
    assert to_dict(cfg)["retrieval"] == {"embedding_dim": 32}


def test_union_fields_keep_the_given_type():
    from features.config import SplitConfig

    s = from_dict(SplitConfig, {"mode": "dates", "valid_start": 1651334400000, "test_start": "2022-05-04"})
    assert s.valid_start == 1651334400000 and isinstance(s.valid_start, int)
    assert s.test_start == "2022-05-04"
