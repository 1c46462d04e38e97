"""Multi-task ranker hyper-parameters (the `ranking:` config section)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RankingConfig:
    architecture: str = "mmoe"
    embedding_dim: int = 16
    batch_size: int = 2048
    max_epochs: int = 10
    learning_rate: float = 0.002
