"""Lazy Adam on the id tables: only the rows a batch reads move, the dense weights keep Adam."""

from __future__ import annotations

import torch
from torch import nn

from training.optimizers import adam, sparse_tables


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.items = nn.Embedding(50, 4)
        self.history = self.items  # one table read by two modules, as the item id and history share it
        self.out = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.items(ids) + self.history(ids)).sum()


def _steps(sparse: bool, batches: list[list[int]]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Tiny()
    if sparse:
        sparse_tables(model)
    opts = adam(model, lr=0.1, weight_decay=0.0)
    opts = opts if isinstance(opts, list) else [opts]
    snapshots = [model.items.weight.detach().clone()]
    for ids in batches:
        for o in opts:
            o.zero_grad()
        model(torch.tensor(ids)).backward()
        for o in opts:
            o.step()
        snapshots.append(model.items.weight.detach().clone())
    return snapshots


def test_sparse_moves_only_the_rows_a_batch_reads():
    first, second = [1, 2, 3], [10, 11]
    w0, w1, w2 = _steps(True, [first, second])
    changed = lambda a, b: set(torch.nonzero((a != b).any(1)).flatten().tolist())  # noqa: E731
    assert changed(w0, w1) == set(first)
    assert changed(w1, w2) == set(second)  # rows 1-3 keep their value: their moments are not applied again
    # Dense Adam keeps applying row 1-3's momentum at the second step, though the batch did not read them.
    d0, d1, d2 = _steps(False, [first, second])
    assert changed(d0, d1) == set(first)
    assert changed(d1, d2) == set(first) | set(second)


def test_sparse_split_covers_every_parameter_once():
    model = Tiny()
    assert isinstance(adam(model, lr=0.1, weight_decay=0.0), torch.optim.Adam)  # dense tables: one Adam
    sparse_tables(model)
    dense, lazy = adam(model, lr=0.1, weight_decay=0.0)
    assert isinstance(lazy, torch.optim.SparseAdam) and isinstance(dense, torch.optim.Adam)
    ids = [id(p) for o in (dense, lazy) for g in o.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert [id(p) for g in lazy.param_groups for p in g["params"]] == [id(model.items.weight)]
    assert model.items.sparse
