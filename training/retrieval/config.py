"""Two-tower retrieval hyper-parameters (the `retrieval:` config section)."""

from __future__ import annotations

from dataclasses import dataclass, field

from features.config import ConfigError
from training.retrieval.baselines import BaselinesConfig


@dataclass
class RetrievalConfig:
    # What the evaluation counts as a hit (and a training positive); None = the history signal.
    positive_signal: str | None = None
    # Training examples: every row whose weight is > 0, weight = impression_weight + sum of the weights of
    # its binary signals that are > 0 (positive_signal weighs 1 unless signal_weights names it).
    impression_weight: float = 0.0
    signal_weights: dict[str, float] = field(default_factory=dict)
    # Popularity prior added back at scoring: u.v + beta * log(1 + positives of the item), folded into
    # one extra dimension on each side; beta is chosen on validation from this grid ([0] = no prior).
    prior_betas: list[float] = field(default_factory=lambda: [0.0])
    # Count the prior over the last N days before the scored period (0 = every day); a list is a grid chosen
    # on validation together with beta (a recent window lets the prior follow what is popular now).
    prior_days: float | list[float] = 0.0
    # Matrix-factorisation dimensions folded into the served vectors: [u, w * mf_user, beta] . [v, mf_item,
    # log pop], the ALS of the tuned MF baseline (fit on every row the bundle knows). w is chosen on
    # validation with beta from this grid ([0] = the two-tower alone); needs baselines.als.
    mf_weights: list[float] = field(default_factory=lambda: [0.0])
    embedding_dim: int = 64  # output size of both towers (the FAISS dimension)
    feature_dim: int = 16  # embedding size of each attribute column (user attributes, creator, category, ...)
    id_dim: int = 64  # embedding size of the user id and item id (the item id table is shared with history)
    hidden: list[int] = field(default_factory=lambda: [256])  # MLP widths of each tower before the output layer
    # The user's history in the user tower: always a recency-weighted pool; with N > 0 layers also a small
    # self-attention encoder over the sequence (SASRec-style, a summary token's output), heads must divide
    # id_dim + 2 * feature_dim.
    history_encoder_layers: int = 0
    history_encoder_heads: int = 2
    dropout: float = 0.1
    id_dropout: float = 0.1  # training-time chance to replace an id with OOV, so unseen ids get a useful vector
    batch_size: int = 1024
    max_epochs: int = 10
    min_epochs: int = 1
    learning_rate: float = 0.003
    weight_decay: float = 0.0
    # Lazy Adam on the id tables (training/optimizers.py): a step's cost follows the batch, not the catalogue;
    # weight_decay then reaches the dense weights only. null: on in one process, off in a distributed fit.
    sparse_embeddings: bool | None = None
    temperature: float = 0.05
    uniform_negatives: int = 1024  # mixed negatives per batch, drawn uniformly from the item vocabulary
    logq_correction: bool = True
    # Early stopping and checkpoint selection on validation Recall@K (same protocol as the test metric).
    monitor_k: int = 100
    patience: int = 3
    eval_ks: list[int] = field(default_factory=lambda: [50, 100, 200])
    ndcg_ks: list[int] = field(default_factory=lambda: [50, 100])
    recent_days: float = 2.0  # window of the recent-popularity baseline, before the evaluated period
    index_factory: str = "Flat"
    hnsw_ef_search: int = 128  # used when the factory string builds an HNSW index
    hnsw_ef_construction: int = 200  # HNSW build-time breadth (FAISS default 40): better graph, faster queries
    ivf_nprobe: int = 16  # used when the factory string builds an IVF index
    index_recall_k: int = 100
    num_threads: int = 0  # torch intra-op threads for training; 0 = leave torch's default
    # Moved to trainer.accelerator (training/trainer.py); kept so that the configs stored in earlier bundles
    # ("auto") still load for `evaluate`.
    accelerator: str | None = None
    seed: int | None = None  # None = the root `seed`
    # Multi-channel candidates: quota mixes of `channel_total` tried on validation (ann gets the rest),
    # judged by Recall@channel_total of the merged set; the best mix goes into the bundle, and
    # `python -m evaluation choose-channels` (make main) replaces it by the mix whose served page is best.
    channel_total: int = 500
    channel_covisit: list[int] = field(default_factory=lambda: [0, 50, 150])
    channel_trending: list[int] = field(default_factory=lambda: [0, 50])
    channel_fresh: list[int] = field(default_factory=lambda: [0, 20])
    # The MF channel (top items by the ALS factors alone; only where mf_weights folds them into the served
    # vectors): it finds what the fused score ranks just past the ANN's cut.
    channel_mf: list[int] = field(default_factory=lambda: [0, 50, 100])
    covisit_top: int = 50  # neighbours kept per item in the served co-visitation table
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)

    @property
    def prior_day_grid(self) -> list[float]:
        """The prior's windows to try on validation, in days (0 = every day), in the config's order."""
        days = self.prior_days if isinstance(self.prior_days, list) else [self.prior_days]
        return list(dict.fromkeys(float(d) for d in days))

    def row_weights(self, rows) -> "np.ndarray":
        """(R,) training weight of each row (a DataFrame with the signal columns); 0 = not an example."""
        import numpy as np

        weights = {self.positive_signal: 1.0, **self.signal_weights}
        w = np.full(len(rows), self.impression_weight, dtype=np.float64)
        for name, weight in weights.items():
            w += weight * (rows[name].to_numpy() > 0)
        return w

    def validate(self, binary_signals: list[str]) -> None:
        if self.accelerator not in (None, "auto"):
            raise ConfigError("retrieval.accelerator moved to trainer.accelerator (it applies to both stages)")
        if self.positive_signal not in binary_signals:
            raise ConfigError(
                f"retrieval.positive_signal = '{self.positive_signal}' is not a binary signal; known: {binary_signals}"
            )
        for name in ("embedding_dim", "feature_dim", "id_dim", "batch_size", "max_epochs", "monitor_k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"retrieval.{name} must be > 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"retrieval.temperature must be > 0, got {self.temperature}")
        width = self.id_dim + 2 * self.feature_dim
        if self.history_encoder_layers < 0 or self.history_encoder_heads < 1 or width % self.history_encoder_heads:
            raise ConfigError(f"retrieval.history_encoder_layers must be >= 0 and history_encoder_heads >= 1 and "
                              f"divide id_dim + 2 * feature_dim = {width}; got {self.history_encoder_layers} layers, "
                              f"{self.history_encoder_heads} heads")
        if self.uniform_negatives < 0:
            raise ConfigError(f"retrieval.uniform_negatives must be >= 0, got {self.uniform_negatives}")
        if not 0 <= self.dropout < 1 or not 0 <= self.id_dropout < 1:
            raise ConfigError("retrieval.dropout and retrieval.id_dropout must be in [0, 1)")
        if self.monitor_k not in self.eval_ks:
            raise ConfigError(f"retrieval.monitor_k = {self.monitor_k} must be one of retrieval.eval_ks {self.eval_ks}")
        unknown = sorted(set(self.signal_weights) - set(binary_signals))
        if unknown:
            raise ConfigError(f"retrieval.signal_weights names {unknown}, not binary signals; known: {binary_signals}")
        if self.impression_weight < 0 or any(w < 0 for w in self.signal_weights.values()):
            raise ConfigError("retrieval.impression_weight and retrieval.signal_weights must be >= 0")
        if not self.prior_betas or not self.prior_day_grid or min(self.prior_day_grid) < 0:
            raise ConfigError(f"retrieval.prior_betas must list a value and prior_days be (a list of) values >= 0, "
                              f"got {self.prior_betas}, {self.prior_days}")
        self.baselines.validate()
        if not self.mf_weights or min(self.mf_weights) < 0:
            raise ConfigError(f"retrieval.mf_weights must list values >= 0, got {self.mf_weights}")
        if max(self.mf_weights) > 0 and not self.baselines.als:
            raise ConfigError("retrieval.mf_weights folds the MF baseline into the vectors: it needs "
                              "retrieval.baselines.als: true")
        for name in ("channel_covisit", "channel_trending", "channel_fresh", "channel_mf"):
            if not getattr(self, name) or min(getattr(self, name)) < 0:
                raise ConfigError(f"retrieval.{name} must list quotas >= 0, got {getattr(self, name)}")
        if self.recent_days <= 0:
            raise ConfigError(f"retrieval.recent_days must be > 0, got {self.recent_days}")
