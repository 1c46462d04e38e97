"""Root config as the training layer sees it: the data-side sections plus the model sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

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
    # Both stages stream the train period from interactions.parquet (training/stream.py) instead of loading
    # it: memory is the shuffle buffer. Ranking: the numeric statistics, head biases, watch-time quantiles
    # and the GBDT (baseline / hybrid trees) come from a uniform sample of stream_sample_rows train rows.
    # Retrieval: the examples (rows with retrieval.row_weights > 0) are streamed; its compact log frame of
    # ids and signals stays in memory (docs/scaling.md).
    stream: bool = False
    stream_buffer_rows: int = 262_144
    stream_sample_rows: int = 200_000
    stream_workers: int = 0  # data-loader processes per rank, each reading its own stripe
    # With stream: the ranking stage's validation and test periods stay in memory (early stopping, the blend
    # and the test report need them whole); above this many rows a period is read for a sample of its users
    # instead (all of a sampled user's rows, so per-user GAUC stays defined), chosen by a stable hash of
    # user_id. metrics.json says what was sampled. 0: always the whole period.
    stream_eval_rows: int = 5_000_000


@dataclass
class TrainerConfig:
    """How Lightning runs every fit of both stages (training/trainer.py). The defaults are one CPU process.

    ``strategy: ddp`` with ``devices: N`` runs N processes per node (Lightning re-launches the CLI for ranks
    1..N-1, or torchrun / a cluster scheduler starts them); gloo on CPU, NCCL on GPU unless
    ``process_group_backend`` says otherwise. ``batch_size`` in the stage sections stays the global batch:
    each process takes ``batch_size // world_size`` rows per step. ``ddp_spawn`` is not offered: it trains
    in spawned copies and hands back only the weights, losing the callbacks' state the stages read after fit.
    """

    accelerator: Literal["cpu", "gpu", "cuda", "auto"] = "cpu"
    devices: int = 1  # processes (CPU) or GPUs per node
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    process_group_backend: Literal["gloo", "nccl"] | None = None  # None: gloo on CPU, nccl on GPU
    # Ranks other than 0 wait at the next collective while rank 0 evaluates, exports and fits baselines.
    timeout_minutes: float = 180.0

    @property
    def distributed(self) -> bool:
        return self.strategy != "auto" or self.devices > 1 or self.num_nodes > 1

    def validate(self) -> None:
        for name in ("devices", "num_nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.strategy == "auto" and (self.devices > 1 or self.num_nodes > 1):
            raise ConfigError("trainer.devices or trainer.num_nodes > 1 needs trainer.strategy: ddp")
        if self.timeout_minutes <= 0:
            raise ConfigError(f"trainer.timeout_minutes must be > 0, got {self.timeout_minutes}")


@dataclass
class TrainConfig(Config):
    OTHER_LAYER_SECTIONS: ClassVar[frozenset[str]] = frozenset({"serving", "policy"})

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        """Everything a fit will need, checked before any work starts: the data-side sections, the trainer,
        then the signals and heads the model sections and the policy's fusion weights name."""
        super().validate()
        self.trainer.validate()
        for stage in (self.retrieval, self.ranking):
            if stage.sparse_embeddings is None:
                stage.sparse_embeddings = not self.trainer.distributed
        sparse = [f"{n}.sparse_embeddings" for n in ("retrieval", "ranking") if getattr(self, n).sparse_embeddings]
        if self.trainer.distributed and sparse:
            # NCCL has no sparse all-reduce, and gloo's aborted a 2-process CPU fit of the synthetic world once in
            # two runs (the peer saw "connection reset"): dense Adam is the distributed path.
            raise ConfigError(f"{' and '.join(sparse)}: lazy Adam is for one process; a distributed fit all-reduces "
                              "dense gradients (NCCL has no sparse all-reduce, gloo's is not reliable): set it false")
        t = self.training
        if t.stream_buffer_rows < 1 or t.stream_sample_rows < 1 or t.stream_workers < 0 or t.stream_eval_rows < 0:
            raise ConfigError("training.stream_buffer_rows and stream_sample_rows must be >= 1, stream_workers and "
                              "stream_eval_rows >= 0")
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
