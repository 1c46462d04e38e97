"""Lightning wrapper: loss, negatives, validation recall; the architecture lives in :mod:`.model`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from training.optimizers import adam, manual_step, sparse_tables
from training.retrieval.config import RetrievalConfig
from training.retrieval.metrics import EvalSet, ranked_hits, recall_ndcg
from training.retrieval.model import TwoTower, sampled_softmax_loss


@dataclass
class ValInputs:
    """A validation evaluation: users' tower inputs (in EvalSet user order) and the candidates' inputs."""

    es: EvalSet
    user_cat: torch.Tensor  # (U, k)
    history: torch.Tensor  # (U, L)
    item_cat: torch.Tensor  # (N, m) candidates
    item_num: torch.Tensor  # (N, n)
    # days -> (N,) log popularity of the candidates over that window (0 = every day), for u.v + beta * prior
    priors: dict[float, np.ndarray] | None = None


@dataclass(frozen=True)
class PriorChoice:
    days: float  # the prior's window (0 = every day)
    beta: float

    def key(self, one_window: bool) -> str:
        """Its name in the metrics' ``prior_sweep``: the beta alone when only one window was tried."""
        return str(self.beta) if one_window else f"{self.days:g}d:{self.beta}"


def prior_sweep(es: EvalSet, uv: np.ndarray, iv: np.ndarray, priors: dict[float, np.ndarray] | None,
                betas: list[float], recall_ks: list[int],
                ndcg_ks: list[int]) -> tuple[PriorChoice, dict[PriorChoice, dict[str, float]]]:
    """Metrics of u.v + beta * prior for each window and beta; returns the pair with the best first-K recall
    (on a tie the smaller beta, then the earlier window) and all of them."""
    kmax = max(recall_ks + ndcg_ks)
    n_pos = np.asarray(es.targets.sum(axis=1)).ravel()
    out: dict[PriorChoice, dict[str, float]] = {}
    for w, (days, prior) in enumerate((priors or {0.0: None}).items()):
        for beta in (betas if prior is not None else [0.0]):
            if beta == 0 and w > 0:  # no prior: every window ranks alike, the first one stands for them
                continue
            add = 0.0 if prior is None or beta == 0 else (beta * prior).astype(np.float32)[None, :]
            hits = ranked_hits(lambda u: uv[u] @ iv.T + add, es, kmax)
            out[PriorChoice(float(days), float(beta))] = recall_ndcg(hits, n_pos, recall_ks, ndcg_ks)
    key = f"recall@{recall_ks[0]}"
    order = {c: i for i, c in enumerate(out)}
    best = max(out, key=lambda c: (out[c][key], -abs(c.beta), -order[c]))
    return best, out


def tower_vectors(model: TwoTower, v: ValInputs, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    dev = next(model.parameters()).device
    with torch.inference_mode():
        u = torch.cat([model.user_tower(v.user_cat[i : i + batch].to(dev), v.history[i : i + batch].to(dev))
                       for i in range(0, max(len(v.user_cat), 1), batch)])
        it = torch.cat([model.item_tower(v.item_cat[i : i + batch].to(dev), v.item_num[i : i + batch].to(dev))
                        for i in range(0, max(len(v.item_cat), 1), batch)])
    return u.float().cpu().numpy(), it.float().cpu().numpy()


class RetrievalTask(L.LightningModule):
    def __init__(
        self,
        model: TwoTower,
        cfg: RetrievalConfig,
        item_cat: torch.Tensor,  # (N, m) catalogue
        item_num: torch.Tensor,  # (n_blocks, N, n)
        positive_freq: torch.Tensor,  # (N,) share of training positives per catalogue row
        vocab_rows: torch.Tensor,  # catalogue rows that uniform negatives are drawn from
        val: ValInputs | None = None,
    ):
        super().__init__()
        self.model = model
        self.cfg = cfg
        if cfg.sparse_embeddings:
            sparse_tables(model)
        self.automatic_optimization = not cfg.sparse_embeddings
        # Lookup tables, not state: rebuilt from the feature tables, kept out of checkpoints.
        self.register_buffer("item_cat", item_cat, persistent=False)
        self.register_buffer("item_num", item_num, persistent=False)
        self.register_buffer("positive_freq", positive_freq.to(torch.float32), persistent=False)
        self.register_buffer("vocab_rows", vocab_rows, persistent=False)
        self.val = val
        self.val_metric = f"retrieval/val_recall_at_{cfg.monitor_k}"

    def configure_optimizers(self):
        # fused: one kernel over all parameters, much cheaper per step on CPU than the per-tensor loop
        return adam(self, self.cfg.learning_rate, self.cfg.weight_decay, fused=True)

    def _drop_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.id_dropout <= 0:
            return ids
        keep = torch.rand(ids.shape, device=ids.device) >= self.cfg.id_dropout
        return ids * keep

    def training_step(self, batch, batch_idx):
        user_cat, history, item_row, block, weight = (batch[k] for k in ("user_cat", "history", "item_row", "block", "weight"))
        b, m = item_row.shape[0], self.cfg.uniform_negatives
        neg = self.vocab_rows[torch.randint(len(self.vocab_rows), (m,), device=item_row.device)]
        rows = torch.cat([item_row, neg])
        blocks = torch.cat([block, block[torch.arange(m, device=block.device) % b]])
        item_cat = self.item_cat[rows].clone()
        item_cat[:, 0] = self._drop_ids(item_cat[:, 0])
        user_cat = user_cat.clone()
        user_cat[:, 0] = self._drop_ids(user_cat[:, 0])
        u = self.model.user_tower(user_cat, history)
        v = self.model.item_tower(item_cat, self.item_num[blocks, rows])
        if self.cfg.logq_correction:
            # Expected count of each item in the pool: b in-batch draws from the positive distribution
            # plus m uniform draws over the vocabulary.
            log_q = torch.log(b * self.positive_freq[rows] + m / len(self.vocab_rows))
        else:
            log_q = torch.zeros(len(rows), device=rows.device)
        loss = sampled_softmax_loss(u, v, rows, log_q, self.cfg.temperature, weight)
        self.log("retrieval/train_loss", loss, on_step=False, on_epoch=True, batch_size=b, sync_dist=True)
        if not self.automatic_optimization:
            manual_step(self, loss)
        return loss

    def validation_step(self, batch, batch_idx):
        return None  # the whole validation ranking runs once per epoch below

    def on_validation_epoch_end(self):
        if self.val is None or self.trainer.sanity_checking:
            return
        uv, iv = tower_vectors(self.model, self.val)
        ks = [self.cfg.monitor_k] + [k for k in self.cfg.eval_ks if k != self.cfg.monitor_k]
        best, sweep = prior_sweep(self.val.es, uv, iv, self.val.priors, self.cfg.prior_betas, ks, self.cfg.ndcg_ks)
        # Each rank of a distributed fit ranks the whole validation set, so the values agree (sync_dist: a
        # mean of equal values), and so do early stopping and the checkpoint choice.
        for name, value in sweep[best].items():  # the epoch is judged with its best prior
            self.log(f"retrieval/val_{name.replace('@', '_at_')}", value, sync_dist=True)
        self.log("retrieval/val_prior_beta", best.beta, sync_dist=True)
        self.log("retrieval/val_prior_days", best.days, sync_dist=True)


class Throughput(L.Callback):
    """Training samples per second over the training loop only (validation excluded)."""

    def __init__(self):
        self.samples = 0
        self.seconds = 0.0
        self.epochs: list[int] = []
        self._t = 0.0
        self._n = 0
        self._last = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t, self._n = time.perf_counter(), 0
        self._last = self._t
        self.epochs.append(trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._n += int(batch["item_row"].shape[0])
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        # Up to the last training batch: validation runs before this hook and is not counted.
        dt = self._last - self._t
        self.samples += self._n
        self.seconds += dt
        if dt > 0:
            pl_module.log("retrieval/samples_per_s", self._n / dt, sync_dist=True)  # DDP: the mean over ranks

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0
