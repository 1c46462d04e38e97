"""In-memory training data for both stages: named tensors gathered a whole batch at a time."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch


class TensorBatches(torch.utils.data.Dataset):
    """Named arrays of equal length, indexed by a whole list of row positions (use with a BatchSampler and
    ``batch_size=None``), so a batch is one gather per tensor instead of a per-row collate."""

    def __init__(self, tensors: Mapping[str, np.ndarray | torch.Tensor]):
        self.tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in tensors.items()}
        lengths = {k: len(v) for k, v in self.tensors.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"tensors of different lengths: {lengths}")
        self.n = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.int64)
        return {k: v[i] for k, v in self.tensors.items()}


def sequential_loader(ds: TensorBatches, batch_size: int) -> torch.utils.data.DataLoader:
    """Every row once, in order (evaluation)."""
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), batch_size, drop_last=False)
    return torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0)
