"""One place that builds the Lightning Trainer of every fit (both stages, the refit, the baselines), and the
few distributed helpers the stages need around it.

Under ``trainer.strategy: ddp`` every process runs the same CLI (Lightning re-launches ``sys.argv`` for
local ranks 1..N-1 when the first fit starts; torchrun or a cluster scheduler start them all at once), so
every process reaches the same ``Trainer.fit`` calls in the same order. Only global rank 0 evaluates,
exports, fits the baselines and writes the bundle and MLflow records; the other ranks return right after
each distributed fit. Training data is sharded explicitly by :class:`ShardedBatchSampler` (Lightning's own
distributed sampler is switched off: the loaders yield whole batches from a batch sampler), and validation
runs whole on every rank, so the monitored metric, early stopping and checkpoint choice agree everywhere.
"""

from __future__ import annotations

import math
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch

from training.config import TrainerConfig


def global_rank(devices_per_node: int = 1) -> int:
    """This process's rank: from the process group once it exists, else from the launcher's environment
    (torchrun sets RANK; Lightning's re-launched children get LOCAL_RANK and NODE_RANK)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", "0")) * devices_per_node + int(os.environ.get("LOCAL_RANK", "0"))


def is_global_zero(tc: TrainerConfig | None = None) -> bool:
    return global_rank(tc.devices if tc else 1) == 0


def _from_slurm() -> None:
    """Under ``srun`` every task starts at once with SLURM's variables only: spell them as torchrun's (from
    Lightning's own SLURM environment, which the Trainer then also uses), so the ranks are known before the
    first fit. Not exercised on a real SLURM cluster in this project."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if "RANK" in os.environ or not SLURMEnvironment.detect():
        return
    env = SLURMEnvironment()
    os.environ.update(MASTER_ADDR=env.main_address, MASTER_PORT=str(env.main_port), RANK=str(env.global_rank()),
                      WORLD_SIZE=str(env.world_size()), LOCAL_RANK=str(env.local_rank()), NODE_RANK=str(env.node_rank()))


def join_external_launch(tc: TrainerConfig) -> None:
    """When torchrun (or a scheduler) started every rank at once, open the process group now, so that rank 0
    can build the features while the others wait at :func:`barrier`. Under Lightning's own launch, rank 0
    starts alone and the group opens inside the first fit (the features exist by then)."""
    if not tc.distributed:
        return
    _from_slurm()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    if torch.distributed.is_initialized():
        return
    gpu = tc.accelerator in ("gpu", "cuda") or (tc.accelerator == "auto" and torch.cuda.is_available())
    backend = tc.process_group_backend or ("nccl" if gpu else "gloo")
    torch.distributed.init_process_group(backend, timeout=timedelta(minutes=tc.timeout_minutes))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def make_trainer(tc: TrainerConfig, *, max_epochs: int, min_epochs: int | None, callbacks: list[L.Callback],
                 logger: Any, progress: bool, validate: bool = True, checkpointing: bool = True,
                 single_process: bool = False, **extra: Any) -> L.Trainer:
    """The Trainer of one fit. ``validate=False``: no validation loop (the production refit).
    ``single_process``: a fit that only rank 0 runs (the single-task baselines), one device, no DDP."""
    strategy: Any = "auto"
    devices, num_nodes = tc.devices, tc.num_nodes
    if single_process:
        devices, num_nodes = 1, 1
    elif tc.strategy != "auto":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=tc.strategy == "ddp_find_unused_parameters_true",
                               process_group_backend=tc.process_group_backend,
                               timeout=timedelta(minutes=tc.timeout_minutes))
    return L.Trainer(
        accelerator=tc.accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, precision=tc.precision,
        max_epochs=max_epochs, min_epochs=min_epochs, logger=logger, callbacks=callbacks,
        limit_val_batches=None if validate else 0, enable_checkpointing=checkpointing,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10,
        use_distributed_sampler=False,  # ShardedBatchSampler shards training rows; validation runs whole on each rank
        **extra,
    )


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of row positions for one rank of a distributed fit: each epoch one permutation of all rows,
    seeded by (seed, epoch) so every rank draws the same one and a new epoch a new one; rank r takes rows
    r, r + W, r + 2W, ... (padded by wrapping around so every rank has the same count, as torch's
    DistributedSampler does) in batches of ``batch_size // W``, so a step still sees ``batch_size`` rows
    over all ranks. Lightning calls :meth:`set_epoch` at each epoch start."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, rank: int, world: int):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.batch_size = max(1, batch_size // world)
        self.per_rank = math.ceil(n / world) if n else 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        pad = self.per_rank * self.world - self.n
        if pad:
            order = torch.cat([order, order[:pad]])
        mine = order[self.rank :: self.world].tolist()
        for a in range(0, len(mine), self.batch_size):
            yield mine[a : a + self.batch_size]


def shard(tc: TrainerConfig) -> tuple[int, int]:
    """(this process's rank, world size) of the fits ``tc`` describes; rank 0 knows the world size from the
    config before Lightning launches the other ranks."""
    world = tc.devices * tc.num_nodes if tc.distributed else 1
    return (global_rank(tc.devices) if world > 1 else 0), world


def batch_sampler(n: int, batch_size: int, shuffle: bool, seed: int,
                  tc: TrainerConfig) -> torch.utils.data.Sampler:
    """The training batch sampler: one process keeps torch's RandomSampler stream (as before DDP existed, so
    single-process metrics do not move); a distributed fit gets this rank's :class:`ShardedBatchSampler`."""
    rank, world = shard(tc)
    if world == 1:
        gen = torch.Generator().manual_seed(seed)
        base = (torch.utils.data.RandomSampler(range(n), generator=gen) if shuffle
                else torch.utils.data.SequentialSampler(range(n)))
        return torch.utils.data.BatchSampler(base, batch_size, drop_last=False)
    return ShardedBatchSampler(n, batch_size, shuffle, seed, rank, world)


def checkpoint_dir(out_dir: Path, resume: bool, tc: TrainerConfig) -> tuple[Path, Path]:
    """``<out_dir>/checkpoints`` and its ``last.ckpt``. A fresh fit (not ``resume``) empties the folder first
    (rank 0 only) so it never picks up another run's "best" or versions against old checkpoints."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    if not resume and ckpt_dir.exists() and is_global_zero(tc):
        shutil.rmtree(ckpt_dir)
    return ckpt_dir, ckpt_dir / "last.ckpt"
