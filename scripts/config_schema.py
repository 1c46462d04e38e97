"""JSON Schema of the YAML config file, from the typed config dataclasses of every layer.

    python scripts/config_schema.py [--out docs/config.schema.json]

Editors validate and complete configs with it (YAML language server: put
``# yaml-language-server: $schema=../docs/config.schema.json`` at the top of a config). Like the loader,
the schema refuses unknown keys. The loader stays the authority (it also checks values across sections);
tests/test_config_schema.py keeps the shipped schema equal to this output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """Every object with declared properties refuses others (the loader's unknown-key rule)."""
    for node in [schema, *schema.get("$defs", {}).values()]:
        if node.get("type") == "object" and "properties" in node:
            node["additionalProperties"] = False
    return schema


def config_schema() -> dict[str, Any]:
    from pydantic import TypeAdapter

    from serving.config import ServeSettings
    from training.config import TrainConfig

    train = TypeAdapter(TrainConfig).json_schema(ref_template="#/$defs/{model}")
    serve = TypeAdapter(ServeSettings).json_schema(ref_template="#/$defs/{model}")
    train["properties"].pop("other", None)  # the sections of other layers: serving and policy, below
    train["properties"].update(serve["properties"])
    train["$defs"] = {**serve.get("$defs", {}), **train.get("$defs", {})}
    train["title"] = "feedstack config"
    train["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    for node in train["$defs"].values():
        node.get("properties", {}).pop("other", None)
    return _closed(train)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write here (default: standard output)")
    args = ap.parse_args()
    text = json.dumps(config_schema(), indent=1, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out} ({len(text)} bytes)")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
