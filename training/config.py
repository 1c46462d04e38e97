"""Root config as the training layer sees it: the data-side sections plus the model sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from features.config import Config, ConfigError
from training.ranking.config import RankingConfig
from training.retrieval.config import RetrievalConfig


@dataclass
class TrackingConfig:
    experiment: str = "feedstack"
    registered_model: str = "feedstack"
    register: bool = True
    # The alias moves to a new version only if every gate passes: metric path -> minimum value,
    # e.g. {"retrieval.model.recall@100": 0.05, "ranking.model.click.auc": 0.6}.
    gates: dict[str, float] = field(default_factory=dict)
    alias: str = "production"


@dataclass
class TrainingConfig:
    # After the held-out fit, retrain both stages on every day with the chosen epochs and calibration;
    # that refit is the bundle registered and served (training/refit.py).
    refit: bool = False


@dataclass
class TrainConfig(Config):
    OTHER_LAYER_SECTIONS: ClassVar[frozenset[str]] = frozenset({"serving", "policy"})

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def validate(self) -> None:
        """Everything a fit will need, checked before any work starts: the data-side sections, then the
        signals and heads the model sections and the policy's fusion weights name."""
        super().validate()
        d = self.data
        if self.retrieval.positive_signal is None:
            self.retrieval.positive_signal = self.history.signal
        self.retrieval.validate(d.binary_signals)
        heads = [n for n, _ in self.ranking.resolve_heads(d.binary_signals, d.interactions.watch_time_signal)]
        policy = self.other.get("policy") or {}
        overrides = [("policy.fusion.weights", (policy.get("fusion") or {}).get("weights") or {})]
        for name, sc in (policy.get("scenarios") or {}).items():
            overrides.append((f"policy.scenarios.{name}.fusion.weights", ((sc or {}).get("fusion") or {}).get("weights") or {}))
        for where, weights in overrides:
            for head in weights if isinstance(weights, dict) else ():
                if head not in heads:
                    raise ConfigError(f"{where} names '{head}', not a ranking head; heads: {heads}")
