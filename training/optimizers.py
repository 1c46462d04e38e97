"""The optimizers of both stages: Adam, or Adam for the dense weights plus lazy Adam for the id tables.

Dense Adam updates every row of every embedding table at every step, whether the batch read it or not: its
cost grows with the catalogue, not the batch (on 2 CPU cores, one step over a 550k x 64 table took 400 ms
against 10 ms for the rows a 1024-row batch touches). With ``sparse_embeddings`` each ``nn.Embedding``
emits a sparse gradient and :class:`torch.optim.SparseAdam` updates only the rows the batch read (moments
included: "lazy" Adam), while the rest of the model keeps :class:`torch.optim.Adam`. Two optimizers mean
Lightning's manual optimization (:func:`manual_step`); one optimizer keeps its automatic loop unchanged.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


def sparse_tables(module: nn.Module) -> None:
    """Every embedding table of ``module`` emits sparse gradients (one-process fits only: a distributed fit
    all-reduces dense gradients, see training/config.py)."""
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            m.sparse = True


def adam(module: nn.Module, lr: float, weight_decay: float, fused: bool = False
         ) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    """Adam over ``module``, or, where :func:`sparse_tables` made its tables sparse, Adam over the dense
    weights and SparseAdam over the tables (no weight decay there: regularise them on the rows a batch
    reads instead)."""
    # a table read by two modules (item id and history) once
    lazy = {id(m.weight): m.weight for m in module.modules() if isinstance(m, nn.Embedding) and m.sparse}
    if not lazy:
        return torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)
    dense = [p for p in module.parameters() if id(p) not in lazy]
    return [torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay, fused=fused or None),
            torch.optim.SparseAdam(list(lazy.values()), lr=lr)]


def manual_step(task: L.LightningModule, loss: torch.Tensor) -> None:
    """One step of every optimizer of ``task`` (which set ``automatic_optimization = False``)."""
    opts = task.optimizers()
    opts = opts if isinstance(opts, list) else [opts]
    for o in opts:
        o.zero_grad()
    task.manual_backward(loss)
    for o in opts:
        o.step()
