"""The feed policy's configuration: the `policy:` section (each step's settings, governance, the exposure
controller and per-scenario overrides). The steps themselves are in :mod:`serving.policy`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from features.config import ConfigError, from_dict, to_dict


@dataclass
class FusionStep:
    mode: Literal["sum", "product"] = "sum"  # product: prod(p_h ** w_h), hate's negative weight divides
    # Per-head weight overrides of the bundle's scenario weights (head -> weight); empty = the bundle's.
    weights: dict[str, float] = field(default_factory=dict)
    # The candidate's retrieval score (served user vector . item vector), standardised over the request's
    # candidates, added to the fused score in units of the fused score's spread, times this weight. The
    # two-tower learns from the log's impressions, so its score says what this user is likely to be shown
    # (and engage with); the ranker says how likely engagement is once shown. null: the bundle's weight,
    # chosen on the validation page by `python -m evaluation choose-channels` (0 if never chosen).
    retrieval_weight: float | None = None


@dataclass
class FansFirstStep:
    enabled: bool = True
    slots: int = 2  # priority slots at the top of the page
    fresh_days: float | None = 30.0  # item uploaded within this many days of the reference time; null = any age


@dataclass
class QualityStep:
    enabled: bool = True
    min_share: float = 0.25  # of the page, from creators flagged high-quality in the bundle


@dataclass
class ExposureStep:
    enabled: bool = True
    strength: float = 1.0  # scales the controller's boost for this scenario (0 = no boost)
    # Extra candidates per request, beyond the retrieval top-N: the items of currently under-exposed
    # creators (a pool refreshed every ``exposure_control.update_every`` pages) that score best against the
    # user vector. They are ranked and paged like any candidate; 0 disables.
    candidate_slots: int = 0
    # Where boosted items go: "score" = page order by boosted score; "relevance" = the boost only decides
    # which items make the page, which are then laid out by fused score (diversity rules still apply).
    placement: Literal["score", "relevance"] = "score"
    # Weight of the penalty on over-exposed creators (1 - mean / exposure above the mean), in the same
    # boost units as the bonus of under-exposed ones; 0 = boost only.
    demote: float = 0.0


@dataclass
class DiversityStep:
    enabled: bool = True
    max_per_creator: int = 2
    category_window: int = 2  # the same category is not placed twice within this many consecutive slots


@dataclass
class ExplorationStep:
    enabled: bool = True
    slots: int = 1  # items from categories new to the user, spread over the page


@dataclass
class PolicySteps:
    """Everything that may differ per scenario."""

    fusion: FusionStep = field(default_factory=FusionStep)
    fans_first: FansFirstStep = field(default_factory=FansFirstStep)
    quality: QualityStep = field(default_factory=QualityStep)
    exposure: ExposureStep = field(default_factory=ExposureStep)
    diversity: DiversityStep = field(default_factory=DiversityStep)
    exploration: ExplorationStep = field(default_factory=ExplorationStep)

    def validate(self, where: str) -> None:
        if self.fans_first.slots < 0 or self.exploration.slots < 0:
            raise ConfigError(f"{where}: fans_first.slots and exploration.slots must be >= 0")
        if self.fans_first.fresh_days is not None and self.fans_first.fresh_days < 0:
            raise ConfigError(f"{where}.fans_first.fresh_days must be >= 0, got {self.fans_first.fresh_days}")
        if not 0 <= self.quality.min_share <= 1:
            raise ConfigError(f"{where}.quality.min_share must be in [0, 1], got {self.quality.min_share}")
        if self.diversity.max_per_creator < 1:
            raise ConfigError(f"{where}.diversity.max_per_creator must be >= 1, got {self.diversity.max_per_creator}")
        if self.diversity.category_window < 0:
            raise ConfigError(f"{where}.diversity.category_window must be >= 0")
        if self.exposure.strength < 0:
            raise ConfigError(f"{where}.exposure.strength must be >= 0, got {self.exposure.strength}")
        if self.exposure.demote < 0:
            raise ConfigError(f"{where}.exposure.demote must be >= 0, got {self.exposure.demote}")
        if self.exposure.candidate_slots < 0:
            raise ConfigError(f"{where}.exposure.candidate_slots must be >= 0, got {self.exposure.candidate_slots}")
        w = self.fusion.retrieval_weight
        if w is not None and not (w >= 0 and w < float("inf")):
            raise ConfigError(f"{where}.fusion.retrieval_weight must be a finite number >= 0 or null, got {w}")


@dataclass
class GovernanceConfig:
    blocked_items: list[str] = field(default_factory=list)
    blocked_creators: list[str] = field(default_factory=list)


@dataclass
class ExposureControl:
    """The service-wide exposure tracker and its Gini controller (shared by all scenarios)."""

    half_life_pages: float = 2000.0  # a page's exposure counts half after this many later pages
    gini_target: float = 0.6
    update_every: int = 50  # pages between Gini recomputations / controller steps
    gain: float = 0.25  # multiplicative step of the boost strength per update
    initial_boost: float = 0.5
    max_boost: float = 8.0  # in units of the candidates' score spread (std)
    # The exposure candidate pool: servable items of creators below the mean exposure, least exposed first.
    pool_size: int = 2000
    pool_per_creator: int = 3


@dataclass
class PolicyConfig(PolicySteps):
    governance: GovernanceConfig = field(default_factory=GovernanceConfig)
    exposure_control: ExposureControl = field(default_factory=ExposureControl)
    # scenario -> partial overrides of the steps above, e.g. {commerce: {fans_first: {slots: 0}}}
    scenarios: dict[str, Any] = field(default_factory=dict)
    _resolved: dict[str, PolicySteps] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate("policy")
        c = self.exposure_control
        if (c.half_life_pages <= 0 or c.update_every < 1 or not 0 < c.gini_target <= 1 or c.gain <= 0
                or c.pool_size < 1 or c.pool_per_creator < 1):
            raise ConfigError("policy.exposure_control: half_life_pages > 0, update_every >= 1, "
                              "0 < gini_target <= 1, gain > 0, pool_size >= 1 and pool_per_creator >= 1 are required")
        base = {k: v for k, v in to_dict(self).items() if k in _STEP_KEYS}
        for name, override in self.scenarios.items():
            where = f"policy.scenarios.{name}"
            if not isinstance(override, dict):
                raise ConfigError(f"{where}: expected a mapping of step overrides, got {override!r}")
            merged = {k: dict(v) for k, v in base.items()}
            for step, values in override.items():
                if step not in _STEP_KEYS:
                    raise ConfigError(f"unknown config key '{where}.{step}'; known keys here: {sorted(_STEP_KEYS)}")
                if not isinstance(values, dict):
                    raise ConfigError(f"{where}.{step}: expected a mapping, got {values!r}")
                merged[step].update(values)
            steps = from_dict(PolicySteps, merged, where)
            steps.validate(where)
            self._resolved[name] = steps

    def for_scenario(self, scenario: str) -> PolicySteps:
        """The steps of ``scenario``: the defaults with that scenario's overrides applied."""
        return self._resolved.get(scenario, self)

    @classmethod
    def engagement_only(cls, base: "PolicyConfig | None" = None) -> "PolicyConfig":
        """Governance and fusion only: the baseline the other steps are compared against.

        With ``base``, its governance, fusion (scenario fusion overrides included) and exposure control are
        kept, so that the baseline differs from ``base`` only by the page steps it switches off.
        """
        if base is None:
            return cls(fans_first=FansFirstStep(enabled=False), quality=QualityStep(enabled=False),
                       exposure=ExposureStep(enabled=False), diversity=DiversityStep(enabled=False),
                       exploration=ExplorationStep(enabled=False))
        raw = {f.name: to_dict(getattr(base, f.name)) for f in dataclasses.fields(base) if f.init}
        for step in _STEP_KEYS - {"fusion"}:
            raw[step]["enabled"] = False
        raw["scenarios"] = {name: {k: v for k, v in o.items() if k == "fusion"} for name, o in base.scenarios.items()}
        return load_policy(raw)


_STEP_KEYS = frozenset({"fusion", "fans_first", "quality", "exposure", "diversity", "exploration"})


def load_policy(raw: dict[str, Any] | None) -> PolicyConfig:
    return from_dict(PolicyConfig, raw or {}, "policy")
