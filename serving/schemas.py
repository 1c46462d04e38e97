"""The HTTP API's request and response schemas (pydantic; BentoML derives the OpenAPI document from them).
Requests are strict: unknown fields and wrong JSON types are 4xx errors that name the field."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from serving.config import MAX_EXCLUDE, MAX_ID_LENGTH, MAX_ITEM_IDS, MAX_K


def _whole(v: Any) -> Any:
    """JSON Schema's integer includes 83.0; strict pydantic would refuse it, so whole floats become ints."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**63 else v


Int = Annotated[int, BeforeValidator(_whole)]
# KuaiRand ids are integers and clients send them as numbers or strings; both mean the same id.
Id = (Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
      | Annotated[int, Field(ge=0, le=2**63 - 1), BeforeValidator(_whole)])
ContextValue = Annotated[str, Field(max_length=64)] | Annotated[int, Field(ge=-(2**31), le=2**31 - 1), BeforeValidator(_whole)]
ContextKey = Annotated[str, Field(min_length=1, max_length=64)]


def id_strings(values: list[str | int]) -> list[str]:
    return [str(v) for v in values]


class _Strict(BaseModel):
    # Unknown fields and wrong JSON types are errors (a string "20" is not a k).
    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(_Strict):
    user_id: Id = Field(description="user id as in the dataset (string or integer)")
    k: Int = Field(20, ge=1, le=MAX_K, description="page size")
    scenario: str | None = Field(None, max_length=64, description="fusion scenario; default: serving.default_scenario")
    exclude_item_ids: list[Id] = Field(default_factory=list, max_length=MAX_EXCLUDE,
                                       description="items the client already showed")
    context: dict[ContextKey, ContextValue] | None = Field(None, max_length=16,
                                                           description="e.g. {\"tab\": 1, \"hour\": 20}")
    seen_item_ids: list[Id] = Field(default_factory=list, max_length=MAX_EXCLUDE,
                                    description="items the user has seen: excluded now and remembered for "
                                                "serving.seen_window_s")


class RankRequest(_Strict):
    user_id: Id
    item_ids: list[Id] = Field(min_length=1, max_length=MAX_ITEM_IDS)
    scenario: str | None = Field(None, max_length=64)
    context: dict[ContextKey, ContextValue] | None = Field(None, max_length=16)


class Item(BaseModel):
    item_id: str
    creator_id: str
    score: float = Field(description="final score: fused head predictions plus any exposure boost")
    predictions: dict[str, float] = Field(description="per-head prediction")
    reasons: list[str] = Field(description="policy reasons (relevance, fan, quality_support, exposure_boost, "
                                           "exploration), then the candidate channel (channel:ann, ...)")
    watch_time_ms: float | None = Field(None, description="expected watch time (ms), decoded from the watch-time head")


class RecommendResponse(BaseModel):
    items: list[Item]
    bundle_version: str
    scenario: str
    cold_start: bool
    candidates: int


class RankResponse(RecommendResponse):
    unknown_item_ids: list[str]
    filtered_item_ids: list[str] = Field(description="known items governance keeps out (blocked or not visible)")


class BlockRequest(_Strict):
    item_ids: list[Id] = Field(default_factory=list, max_length=10_000)
    creator_ids: list[Id] = Field(default_factory=list, max_length=10_000)
    unblock: bool = False


class BlockResponse(BaseModel):
    blocked_items: list[str]
    blocked_creators: list[str]
    servable_items: int


class ReloadRequest(_Strict):
    bundle: str | None = Field(None, min_length=1, max_length=4096,
                               description="models:/ URI or a directory under the bundle root; default: the startup source")


class EmptyRequest(_Strict):
    pass
