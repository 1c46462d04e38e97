"""User-experience quality aggregates per item and per creator, as of each snapshot block.

For entity e and snapshot block b, only rows with block < b count (so a feature never sees its own period
or the future). Rates are smoothed toward the global rate of the same past:
``rate = (positives + k * global_rate) / (impressions + k)``; the quality score is a weighted sum of rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.config import ConfigError, QualityConfig

WATCH_RATIO_CAP = 3.0  # replays make ratios > 1; cap so a few loops do not dominate the mean
# The aggregates' column prefixes (item_n, creator_rate_like, ...). A creator's aggregates ride on each of its
# items' rows, so whatever refreshes them (serving.offline_cases.period_view) keys them by creator.
ITEM_PREFIX, CREATOR_PREFIX = "item", "creator"


# The creator aggregates the high-quality rule reads: impressions (log1p) and quality score.
HIGH_QUALITY_INPUTS = (f"{CREATOR_PREFIX}_n", f"{CREATOR_PREFIX}_quality")


def is_creator_column(name: str) -> bool:
    """Whether an aggregate column is the creator's (keyed by the item's creator) rather than the item's."""
    return name.startswith(f"{CREATOR_PREFIX}_")


@dataclass
class Snapshots:
    """Per-entity features for every block: ``values[name]`` has shape (n_entities, n_blocks)."""

    keys: pd.Index  # entity ids, row order of the arrays
    values: dict[str, np.ndarray]
    prior: dict[str, np.ndarray]  # (n_blocks,) value for an entity never seen before the block

    def gather(self, ids: pd.Series | np.ndarray, blocks: np.ndarray) -> pd.DataFrame:
        """Feature rows for (id, block) pairs; unseen ids get the global-prior values of their block."""
        code = self.keys.get_indexer(pd.Index(np.asarray(ids, dtype=object)))
        out = {}
        for name, arr in self.values.items():
            col = arr[np.maximum(code, 0), blocks]
            if (code < 0).any():
                col = col.copy()
                col[code < 0] = self.prior[name][blocks[code < 0]]
            out[name] = col
        return pd.DataFrame(out)

    def at_block(self, block: int) -> pd.DataFrame:
        df = pd.DataFrame({name: arr[:, block] for name, arr in self.values.items()})
        df.insert(0, "id", self.keys.to_numpy())
        return df


def quality_signals(cfg: QualityConfig, binary_signals: list[str]) -> list[str]:
    return list(cfg.signals) or list(binary_signals)


class BlockCounter:
    """Sums of per-row weights per (key, block), over strictly earlier blocks: (n_keys, n_blocks)."""

    def __init__(self, key: pd.Series, blocks: np.ndarray, n_blocks: int):
        codes, self.keys = pd.factorize(key, sort=True)
        self.n_keys, self.n_blocks = len(self.keys), n_blocks
        self.flat = codes * n_blocks + np.asarray(blocks, np.int64)

    def before(self, weights: np.ndarray | None = None) -> np.ndarray:
        total = np.bincount(self.flat, weights=weights, minlength=self.n_keys * self.n_blocks)
        total = total.reshape(self.n_keys, self.n_blocks)
        out = np.zeros_like(total, dtype=np.float64)
        out[:, 1:] = np.cumsum(total, axis=1)[:, :-1]  # strictly earlier blocks
        return out


def snapshot_quality(
    log: pd.DataFrame, key: str, prefix: str, n_blocks: int, cfg: QualityConfig, binary_signals: list[str],
    with_score: bool = True,
) -> Snapshots:
    signals = quality_signals(cfg, binary_signals)
    has_ratio = "watch_ratio" in log.columns
    allowed = set(signals) | ({"watch_ratio"} if has_ratio else set())
    for name in cfg.score_weights:
        if name not in allowed:
            raise ConfigError(f"quality.score_weights names '{name}', not an aggregated rate; known: {sorted(allowed)}")

    counter = BlockCounter(log[key], log["block"].to_numpy(np.int64), n_blocks)
    keys, per_block = counter.keys, counter.before

    k = cfg.prior_strength
    n = per_block(None)
    rates: dict[str, np.ndarray] = {}
    rate_priors: dict[str, np.ndarray] = {}

    def smooth(name: str, pos: np.ndarray, cnt: np.ndarray) -> None:
        cnt_all = cnt.sum(axis=0)
        g = np.divide(pos.sum(axis=0), cnt_all, out=np.zeros(n_blocks), where=cnt_all > 0)
        rates[name] = smoothed_rate(pos, cnt, g, k)
        rate_priors[name] = g

    for s in signals:
        smooth(s, per_block(log[s].to_numpy(np.float64)), n)
    if has_ratio:
        r = log["watch_ratio"].to_numpy(np.float64)
        ok = ~np.isnan(r)
        smooth("watch_ratio", per_block(capped_ratio(r)), per_block(ok.astype(np.float64)))
    values, prior = quality_columns(prefix, n, rates, rate_priors, cfg.score_weights if with_score else None)
    as32 = lambda d: {name: v.astype(np.float32) for name, v in d.items()}  # noqa: E731
    return Snapshots(pd.Index(keys), as32(values), as32(prior))


def smoothed_rate(pos: np.ndarray, cnt: np.ndarray, g: np.ndarray | float, k: float) -> np.ndarray:
    """A rate smoothed toward the global rate ``g`` of the same past with ``k`` pseudo-impressions."""
    return (pos + k * g) / (cnt + k)


def capped_ratio(r: np.ndarray) -> np.ndarray:
    """Watch ratios as they enter the sums: capped at :data:`WATCH_RATIO_CAP`, 0 where missing."""
    return np.where(~np.isnan(r), np.minimum(r, WATCH_RATIO_CAP), 0.0)


def quality_columns(
    prefix: str, n: np.ndarray, rates: dict[str, np.ndarray], rate_priors: dict[str, np.ndarray],
    score_weights: dict[str, float] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Named feature columns (float64) and their priors from impressions ``n`` and smoothed ``rates``:
    ``<prefix>_n`` (log1p), ``<prefix>_rate_<signal>``, ``<prefix>_watch_ratio`` and, with
    ``score_weights``, ``<prefix>_quality``. Arrays of any shape (entities x blocks, or rows)."""
    g_shape = np.shape(next(iter(rate_priors.values()))) if rate_priors else ()
    values: dict[str, np.ndarray] = {f"{prefix}_n": np.log1p(n)}
    prior: dict[str, np.ndarray] = {f"{prefix}_n": np.zeros(g_shape)}
    for name in rates:
        col = f"{prefix}_watch_ratio" if name == "watch_ratio" else f"{prefix}_rate_{name}"
        values[col], prior[col] = rates[name], rate_priors[name]
    if score_weights is not None:
        score = np.zeros(np.shape(n))
        score_prior = np.zeros(g_shape)
        for name, w in score_weights.items():
            score += w * rates[name]
            score_prior += w * rate_priors[name]
        values[f"{prefix}_quality"], prior[f"{prefix}_quality"] = score, score_prior
    return values, prior


def high_quality_creators(creators: pd.DataFrame, cfg: QualityConfig) -> np.ndarray:
    """Flag creators whose quality score is in the top share among those with enough impressions."""
    n_col, quality_col = HIGH_QUALITY_INPUTS
    enough = np.expm1(creators[n_col].to_numpy()) >= cfg.min_creator_impressions
    score = creators[quality_col].to_numpy()
    if not enough.any():
        return np.zeros(len(creators), dtype=bool)
    threshold = np.quantile(score[enough], cfg.high_quality_quantile)
    return enough & (score >= threshold)
