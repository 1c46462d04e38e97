"""Two-tower retrieval hyper-parameters (the `retrieval:` config section)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RetrievalConfig:
    positive_signal: str = "long_view"
    embedding_dim: int = 64
    batch_size: int = 1024
    max_epochs: int = 10
    learning_rate: float = 0.003
    temperature: float = 0.05
    index_factory: str = "Flat"
