"""Request context against the bundle: the keys its ranker reads and the values it was trained on.

An unknown key or a value outside the vocabulary would silently score as out-of-vocabulary; here it is a
422 naming ``context.<key>``, so a client typo shows up at once instead of as a quiet quality drop.
"""

from __future__ import annotations

from typing import Any

from serving.bundle import Bundle
from serving.results import RequestError

HOURS = range(24)  # the hour's domain is known even where the training log lacked some hours
_SHOW_VALUES = 32  # list the allowed values in the message up to this many


def context_keys(bundle: Bundle) -> list[str]:
    return [name for _, name in bundle.request_cat if name != "user_id"]


def allowed_values(bundle: Bundle, name: str) -> list[str]:
    if name == "hour":
        return [str(h) for h in HOURS]
    return sorted(bundle.vocab_maps.get(name, {}), key=lambda v: (len(v), v))


def check_context(bundle: Bundle, context: dict[str, Any] | None) -> None:
    """Raise RequestError (422, field ``context.<key>``) for a key or value the bundle does not know."""
    if not context:
        return
    keys = context_keys(bundle)
    for name, value in context.items():
        field = f"context.{name}"
        if name not in keys:
            raise RequestError(field, f"{field}: unknown context key '{name[:64]}'; this bundle reads {keys}")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RequestError(field, f"{field}: expected an integer or a string, got {type(value).__name__}", 400)
        text = str(value)
        ok = text in {str(h) for h in HOURS} if name == "hour" else text in bundle.vocab_maps.get(name, {})
        if not ok:
            known = allowed_values(bundle, name)
            shown = known if len(known) <= _SHOW_VALUES else known[:_SHOW_VALUES] + ["..."]
            raise RequestError(field, f"{field}: value {text[:64]!r} is not one the model knows; known: {shown}")
