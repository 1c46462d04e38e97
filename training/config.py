"""Root config as the training layer sees it: the data-side sections plus the model sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from features.config import Config
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
