"""Multi-task ranker hyper-parameters (the `ranking:` config section).

Heads default to every binary signal of the dataset plus the watch-time signal (when the dataset names
one); ``loss_weights`` and ``scenarios`` name heads, and :meth:`RankingConfig.check_heads` rejects a name
that is not a head once the dataset's signals are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from features.config import ConfigError


def _default_scenarios() -> dict[str, dict[str, float]]:
    # One scenario weighing every binary head equally (filled in by resolve_heads): the dataset's config says
    # what its heads are worth (configs/kuairand.yaml).
    return {"feed": {}}


@dataclass
class RankingConfig:
    architecture: Literal["mmoe", "ple"] = "mmoe"
    heads: list[str] = field(default_factory=list)  # empty = all binary signals + the watch-time signal
    loss_weights: dict[str, float] = field(default_factory=dict)  # head -> weight; missing heads weigh 1.0
    loss_weighting: Literal["fixed", "uncertainty"] = "fixed"  # uncertainty: learned per-head log-variance
    # Embeddings: id-like columns (vocab > small_vocab) get embedding_dim, small attribute vocabs get
    # small_embedding_dim; the user's history is pooled over the item-id table (mean and target attention).
    embedding_dim: int = 16
    small_embedding_dim: int = 4
    small_vocab: int = 64
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64])
    num_experts: int = 4  # mmoe
    shared_experts: int = 2  # ple, per level
    task_experts: int = 1  # ple, per task per level
    ple_levels: int = 1
    tower_hidden: int = 32
    dropout: float = 0.1
    # Watch time in the manner of D2Q: equal-frequency duration buckets, target = the watch time's quantile
    # inside its bucket (train distribution), decoded back to ms through the bucket's quantile grid.
    watch_time_buckets: int = 20
    watch_time_grid: int = 101  # quantile levels stored per bucket
    batch_size: int = 2048
    max_epochs: int = 10
    patience: int = 2  # epochs without a better validation mean AUC before stopping
    # Early stopping and checkpoint choice read the mean validation AUC of the heads with at least this many
    # validation positives (all binary heads when none has): rare heads' AUCs are too noisy to choose epochs.
    monitor_min_positives: int = 300
    learning_rate: float = 0.002
    weight_decay: float = 0.0
    embedding_l2: float = 1e-6  # on the embedding rows a batch touches
    # Lazy Adam on the id tables (training/optimizers.py): a step's cost follows the batch, not the catalogue;
    # weight_decay then reaches the dense weights only. null: on in one process, off in a distributed fit.
    sparse_embeddings: bool | None = None
    single_task_baselines: bool = True
    single_task_max_epochs: int | None = None  # None = max_epochs
    # GBDT baseline (training/ranking/gbdt.py): LightGBM per binary head on the ranker's input columns.
    gbdt_baseline: bool = True
    gbdt_learning_rate: float = 0.1
    gbdt_num_leaves: int = 31
    gbdt_min_data_in_leaf: int = 100
    gbdt_max_rounds: int = 2000
    gbdt_early_stopping: int = 50  # rounds without a better validation AUC
    # cat columns with larger vocabularies enter as plain codes. 0 (every column a code) won on validation on
    # every main head of the KuaiRand slice (README) and serves ~5x faster in ONNX (no set-membership nodes).
    gbdt_max_categorical: int = 0
    # The served ranker blends each binary head's GBDT margin into the deep logit inside the ONNX graph
    # where that wins out of sample on validation (training/ranking/hybrid.py); false = deep model only.
    hybrid: bool = True
    hybrid_min_gain: float = 0.0  # cross-fitted validation AUC a head's blend must add over the deep model
    # Heads with fewer validation positives take the blend only if its cross-fitted gain is distinguishable
    # (paired user-bootstrap 95% interval above zero): on a few dozen positives the mean gain is mostly noise,
    # and every blended head's trees cost serving time.
    hybrid_min_positives: int = 300
    # At most this many trees in the served graph, all blended heads together (null: every tree each GBDT
    # uses): each head's first trees, counts chosen on validation (training/ranking/tree_budget.py). A dial
    # between the request graph's latency and the blend's AUC; the GBDT baseline keeps every tree.
    hybrid_max_trees: int | None = None
    # Heads with fewer test positives get a user-bootstrap 95% interval of their AUC.
    rare_head_positives: int = 300
    bootstrap_samples: int = 200
    ece_bins: int = 15
    fusion_k: int = 20
    # Fusion weights per scenario, head -> weight on the head's score in [0, 1] (watch_time: the
    # duration-debiased watch quantile); an empty scenario weighs every binary head 1.0.
    scenarios: dict[str, dict[str, float]] = field(default_factory=_default_scenarios)
    parity_tolerance: float = 1e-4  # on |eager - onnx| / max(1, |eager|): absolute for probabilities, relative for seconds

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "small_embedding_dim", "num_experts", "shared_experts", "ple_levels",
                     "tower_hidden", "batch_size", "max_epochs", "watch_time_buckets", "ece_bins", "fusion_k",
                     "gbdt_num_leaves", "gbdt_max_rounds", "gbdt_early_stopping", "bootstrap_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ranking.{name} must be >= 1, got {getattr(self, name)}")
        if self.watch_time_grid < 3:
            raise ConfigError(f"ranking.watch_time_grid must be >= 3, got {self.watch_time_grid}")
        if not self.expert_hidden or min(self.expert_hidden) < 1:
            raise ConfigError(f"ranking.expert_hidden must be a non-empty list of positive sizes, got {self.expert_hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"ranking.dropout must be in [0, 1), got {self.dropout}")
        for name in ("hybrid_min_positives", "gbdt_max_categorical"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ranking.{name} must be >= 0, got {getattr(self, name)}")
        if self.hybrid_max_trees is not None and self.hybrid_max_trees < 1:
            raise ConfigError(f"ranking.hybrid_max_trees must be >= 1 or null, got {self.hybrid_max_trees}")
        if self.task_experts < 0:
            raise ConfigError(f"ranking.task_experts must be >= 0, got {self.task_experts}")

    def resolve_heads(self, binary_signals: list[str], watch_time_signal: str | None) -> list[tuple[str, str]]:
        """(head, kind) pairs, kind in {"binary", "watch_time"}; names checked against the dataset."""
        available = {s: "binary" for s in binary_signals}
        if watch_time_signal:
            available[watch_time_signal] = "watch_time"
        names = list(self.heads) or list(available)
        for n in names:
            if n not in available:
                raise ConfigError(f"ranking.heads names '{n}', not a binary signal or the watch-time signal; "
                                  f"known: {sorted(available)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"ranking.heads repeats a head: {names}")
        if not any(available[n] == "binary" for n in names):
            raise ConfigError("ranking.heads needs at least one binary head")
        heads = [(n, available[n]) for n in names]
        self.check_heads([n for n, _ in heads])
        for sc, weights in self.scenarios.items():
            if not weights:
                self.scenarios[sc] = {n: 1.0 for n, kind in heads if kind == "binary"}
        return heads

    def check_heads(self, heads: list[str]) -> None:
        known = set(heads)
        for n, w in self.loss_weights.items():
            if n not in known:
                raise ConfigError(f"ranking.loss_weights names '{n}', not a head; heads: {heads}")
            if w < 0:
                raise ConfigError(f"ranking.loss_weights.{n} must be >= 0, got {w}")
        for sc, weights in self.scenarios.items():
            for n in weights:
                if n not in known:
                    raise ConfigError(f"ranking.scenarios.{sc} names '{n}', not a head; heads: {heads}")
