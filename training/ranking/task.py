"""Lightning wrapper of the ranker: per-head losses with config weights, validation AUC, throughput."""

from __future__ import annotations

import copy
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.optimizers import adam, manual_step, sparse_tables
from training.ranking.metrics import auc
from training.ranking.model import Ranker

MONITOR = "ranking/val_score"


class RankingTask(L.LightningModule):
    """Loss = sum over heads of weight * mean BCE-with-logits (binary labels; the watch-time head's soft
    label is the watch quantile in [0, 1]); NaN labels are left out. With ``uncertainty`` weighting each
    head's term becomes ``exp(-s_t) * weight * loss_t + s_t / 2`` with a learned log-variance s_t (Kendall
    et al., 2018; it lives here, not in the exported model). ``val_score`` is the mean validation AUC over
    binary heads (those in ``monitor`` when given), or minus the validation loss when there is no binary
    head; ``val_history`` keeps every
    epoch's per-head validation AUC."""

    def __init__(self, model: Ranker, kinds: list[str], loss_weights: list[float], lr: float,
                 weight_decay: float = 0.0, embedding_l2: float = 0.0, names: list[str] | None = None,
                 uncertainty: bool = False, monitor: list[int] | None = None, sparse_embeddings: bool = False):
        super().__init__()
        if sparse_embeddings:
            sparse_tables(model)
        self.automatic_optimization = not sparse_embeddings
        self.model = model
        self.kinds = kinds
        self.names = names or [str(t) for t in range(len(kinds))]
        self.register_buffer("loss_weights", torch.tensor(loss_weights, dtype=torch.float32))
        self.log_var = nn.Parameter(torch.zeros(len(kinds))) if uncertainty else None
        self.val_history: list[dict[str, float]] = []
        self.monitor = monitor  # heads whose validation AUC makes val_score (None = every binary head)
        self.lr, self.weight_decay, self.embedding_l2 = lr, weight_decay, embedding_l2
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.train_seconds = 0.0
        self.train_samples = 0
        self._t0 = 0.0

    def forward(self, cat: torch.Tensor, hist: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return self.model(cat, hist, num)

    def head_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, T) logits and labels -> (T,) mean loss per head."""
        mask = ~torch.isnan(y)
        bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none") * mask
        return bce.sum(0) / mask.sum(0).clamp(min=1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["cat"], batch["hist"], batch["num"])
        per_head = self.head_losses(logits, batch["y"]) * self.loss_weights
        if self.log_var is not None:
            per_head = torch.exp(-self.log_var) * per_head + 0.5 * self.log_var
        loss = per_head.sum()
        if self.embedding_l2 > 0:
            loss = loss + self.embedding_l2 * self.model.embedding.penalty(batch["cat"], batch["hist"])
        self.train_samples += len(batch["y"])
        self.log("ranking/train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["y"]), sync_dist=True)
        if not self.automatic_optimization:
            manual_step(self, loss)
        return loss

    def on_train_epoch_start(self) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self.train_seconds += time.perf_counter() - self._t0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(batch["cat"], batch["hist"], batch["num"])
        self._val.append((logits.detach(), batch["y"]))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        logits = torch.cat([v[0] for v in self._val])
        y = torch.cat([v[1] for v in self._val])
        self._val.clear()
        per_head = self.head_losses(logits, y)
        loss = float((per_head * self.loss_weights).sum())
        p = torch.sigmoid(logits).numpy()
        aucs = []
        epoch: dict[str, float] = {}
        for t, kind in enumerate(self.kinds):
            if kind == "binary":
                a = auc(y[:, t].numpy(), p[:, t])
                if np.isfinite(a):
                    if self.monitor is None or t in self.monitor:
                        aucs.append(a)
                    epoch[self.names[t]] = round(float(a), 5)
        self.val_history.append(epoch)
        score = float(np.mean(aucs)) if aucs else -loss
        # Every rank of a distributed fit validates on the whole period, so these agree; sync_dist makes
        # early stopping and the checkpoint choice agree even if floating point ever differed.
        self.log("ranking/val_loss", loss, sync_dist=True)
        if aucs:
            self.log("ranking/val_mean_auc", float(np.mean(aucs)), sync_dist=True)
        self.log(MONITOR, score, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        return adam(self, self.lr, self.weight_decay)


class KeepBest(L.Callback):
    """Keep the weights of the best validation epoch in memory (for models without checkpoint files)."""

    def __init__(self) -> None:
        self.best = -float("inf")
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        score = trainer.callback_metrics.get(MONITOR)
        if score is not None and float(score) > self.best:
            self.best = float(score)
            self.state = copy.deepcopy(pl_module.state_dict())
