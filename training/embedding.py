"""Categorical columns of one width looked up in one table, shared by both training stages."""

from __future__ import annotations

import torch
from torch import nn


class OffsetEmbedding(nn.Module):
    """Column j's index i reads row ``offsets[j] + i`` of one table: (B, k) int64 -> (B, k, dim).

    One gather for all k columns instead of k small lookups. With ``oov_to_zero`` an index outside its
    column's vocabulary reads the column's OOV row 0 (serving may send ids the fit never saw)."""

    def __init__(self, sizes: list[int], dim: int, oov_to_zero: bool = False):
        super().__init__()
        self.register_buffer("offsets", torch.tensor([0] + list(sizes[:-1]), dtype=torch.int64).cumsum(0))
        self.register_buffer("sizes", torch.tensor(list(sizes), dtype=torch.int64))
        self.oov_to_zero = oov_to_zero
        self.table = nn.Embedding(int(sum(sizes)), dim)
        nn.init.normal_(self.table.weight, std=0.05)

    def rows(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Table rows of ``x``; with ``columns`` (positions among this table's columns), ``x`` holds only
        those columns, in that order."""
        offsets, sizes = self.offsets, self.sizes
        if columns is not None:
            offsets, sizes = offsets.index_select(0, columns), sizes.index_select(0, columns)
        if self.oov_to_zero:
            x = torch.where((x < 0) | (x >= sizes), torch.zeros_like(x), x)
        return x + offsets

    def forward(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        return self.table(self.rows(x, columns))
