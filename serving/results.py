"""What the request path returns, and the error a client's bad request raises (the service maps it to a 4xx)."""

from __future__ import annotations

from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request a client got wrong; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str, status: int = 422):
        super().__init__(message)
        self.field = field_name
        self.status = status


@dataclass
class ScoredItem:
    item_id: str
    creator_id: str
    score: float
    predictions: dict[str, float]
    reasons: list[str]
    watch_time_ms: float | None = None  # the watch-time head decoded to milliseconds, when the ranker has one


@dataclass
class Result:
    items: list[ScoredItem]
    bundle_version: str
    scenario: str
    cold_start: bool
    candidates: int
    unknown_item_ids: list[str] = field(default_factory=list)
    filtered_item_ids: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
