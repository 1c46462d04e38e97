"""Two-tower architecture as plain modules; each tower is exported to ONNX on its own.

- ``UserTower(user_cat (B, k) int64, history (B, L) int64) -> (B, D)``: user id and attribute embeddings,
  plus the user's recent positive items pooled (item id, creator and category embeddings shared with the
  item tower, learned per-position weights, padding 0 masked out), and optionally a self-attention
  encoding of that sequence (:class:`HistoryEncoder`).
- ``ItemTower(item_cat (B, m) int64, item_num (B, n) float32) -> (B, D)``: item id, creator, category and
  attribute embeddings plus quality aggregates, normalised inside the module (buffers), so callers feed raw
  feature values.

Both outputs are L2-normalised; the score is their dot product. The temperature and the loss live in
:func:`sampled_softmax_loss` and the Lightning task, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.embedding import OffsetEmbedding


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class ItemEmbeddings(nn.Module):
    """Item-side id tables, shared by the item tower and the user tower's history pooling."""

    def __init__(self, n_items: int, n_creators: int, n_categories: int, id_dim: int, feature_dim: int):
        super().__init__()
        self.item = nn.Embedding(n_items, id_dim)
        self.creator = nn.Embedding(n_creators, feature_dim)
        self.category = nn.Embedding(n_categories, feature_dim)
        for t in (self.item, self.creator, self.category):
            nn.init.normal_(t.weight, std=0.05)


class HistoryEncoder(nn.Module):
    """Self-attention over the history (a small SASRec / BERT4Rec-style encoder): a learned summary token
    is prepended, each position adds a learned position embedding, ``layers`` pre-norm transformer blocks
    run with padding masked out of the keys, and the summary token's output (B, d) is the encoding. The
    summary token is never masked, so an empty history still gives a finite vector. Written with plain
    matmuls and softmax (no fused attention kernel) so that the ONNX export is the same arithmetic."""

    def __init__(self, d: int, length: int, layers: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"history encoder: width {d} is not divisible by {heads} heads")
        self.heads = heads
        self.summary = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.position = nn.Parameter(torch.randn(1, length + 1, d) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "out": nn.Linear(d, d),
                "norm2": nn.LayerNorm(d), "ff": nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)),
            }))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, L, d) history embeddings, mask (B, L) 1 = a real item -> (B, d)."""
        b, length, d = h.shape
        x = torch.cat([self.summary.expand(b, 1, d), h], dim=1) + self.position[:, : length + 1]
        keep = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (B, L + 1)
        bias = ((keep - 1.0) * 1e4).unsqueeze(1).unsqueeze(1)  # (B, 1, 1, L + 1): padding keys out
        hd = d // self.heads
        for blk in self.blocks:
            qkv = blk["qkv"](blk["norm1"](x)).reshape(-1, length + 1, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (B, H, L + 1, hd)
            att = torch.softmax(q @ k.transpose(2, 3) / hd ** 0.5 + bias, dim=-1)  # (B, H, L + 1, L + 1)
            y = (att @ v).transpose(1, 2).reshape(-1, length + 1, d)
            x = x + self.dropout(blk["out"](y))
            x = x + self.dropout(blk["ff"](blk["norm2"](x)))
        return self.norm(x[:, 0])


class UserTower(nn.Module):
    def __init__(
        self,
        user_sizes: list[int],
        item_emb: ItemEmbeddings,
        item_creator: torch.Tensor,
        item_category: torch.Tensor,
        history_length: int,
        id_dim: int,
        feature_dim: int,
        hidden: list[int],
        out_dim: int,
        dropout: float,
        encoder_layers: int = 0,
        encoder_heads: int = 2,
    ):
        super().__init__()
        self.user_id = nn.Embedding(user_sizes[0], id_dim)
        nn.init.normal_(self.user_id.weight, std=0.05)
        self.attributes = OffsetEmbedding(user_sizes[1:], feature_dim) if len(user_sizes) > 1 else None
        self.item_emb = item_emb
        # item_id_idx -> creator_id_idx / category_idx, so history items bring their creator and topic.
        self.register_buffer("item_creator", item_creator.to(torch.int64))
        self.register_buffer("item_category", item_category.to(torch.int64))
        self.position = nn.Parameter(torch.zeros(history_length))
        hist_dim = id_dim + 2 * feature_dim
        # 0 layers: the history is the recency-weighted pool alone; more: a self-attention encoding joins it.
        self.encoder = (HistoryEncoder(hist_dim, history_length, encoder_layers, encoder_heads, dropout)
                        if encoder_layers > 0 else None)
        in_dim = id_dim + feature_dim * (len(user_sizes) - 1) + hist_dim * (2 if self.encoder else 1) + 1
        self.mlp = mlp([in_dim, *hidden, out_dim], dropout)

    def forward(self, user_cat: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        parts = [self.user_id(user_cat[:, 0])]
        if self.attributes is not None:
            parts.append(self.attributes(user_cat[:, 1:]).flatten(1))
        mask = (history > 0).to(torch.float32)  # (B, L)
        # Learned recency weights over positions, renormalised over the non-padding entries.
        w = torch.exp(self.position).unsqueeze(0) * mask  # (B, L)
        n = mask.sum(1, keepdim=True)
        w = w / w.sum(1, keepdim=True).clamp_min(1e-6)
        h = torch.cat(
            [
                self.item_emb.item(history),
                self.item_emb.creator(self.item_creator[history]),
                self.item_emb.category(self.item_category[history]),
            ],
            dim=2,
        )  # (B, L, hist_dim)
        parts.append((h * w.unsqueeze(2)).sum(1))
        if self.encoder is not None:
            parts.append(self.encoder(h, mask))
        parts.append(torch.log1p(n))
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


class ItemTower(nn.Module):
    """item_cat columns: [item_id, creator_id, category, *attributes]."""

    def __init__(
        self,
        item_emb: ItemEmbeddings,
        attribute_sizes: list[int],
        num_mean: torch.Tensor,
        num_std: torch.Tensor,
        id_dim: int,
        feature_dim: int,
        hidden: list[int],
        out_dim: int,
        dropout: float,
    ):
        super().__init__()
        self.item_emb = item_emb
        self.attributes = OffsetEmbedding(attribute_sizes, feature_dim) if attribute_sizes else None
        self.register_buffer("num_mean", num_mean.to(torch.float32))
        self.register_buffer("num_std", num_std.to(torch.float32))
        n_num = int(num_mean.numel())
        in_dim = id_dim + 2 * feature_dim + feature_dim * len(attribute_sizes) + n_num
        self.mlp = mlp([in_dim, *hidden, out_dim], dropout)

    def forward(self, item_cat: torch.Tensor, item_num: torch.Tensor) -> torch.Tensor:
        parts = [
            self.item_emb.item(item_cat[:, 0]),
            self.item_emb.creator(item_cat[:, 1]),
            self.item_emb.category(item_cat[:, 2]),
        ]
        if self.attributes is not None:
            parts.append(self.attributes(item_cat[:, 3:]).flatten(1))
        x = (item_num - self.num_mean) / self.num_std
        parts.append(torch.where(torch.isnan(x), torch.zeros_like(x), x))  # unknown aggregate -> the mean
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


class TwoTower(nn.Module):
    def __init__(self, user_tower: UserTower, item_tower: ItemTower):
        super().__init__()
        self.user_tower = user_tower
        self.item_tower = item_tower


def sampled_softmax_loss(
    user_vec: torch.Tensor,
    item_vec: torch.Tensor,
    item_keys: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax with logQ correction.

    user_vec (B, D); item_vec (B + M, D) whose first B rows are the positives of the B users, the rest
    extra (e.g. uniform) negatives; item_keys (B + M,) item identity, so another row's copy of a user's own
    positive is not counted as a negative; log_q (B + M,) log of each item's expected count in the
    candidate pool, subtracted from the logits (logQ correction); weight (B,) per-example loss weights
    (the weighted mean is returned).
    """
    b = user_vec.shape[0]
    logits = user_vec @ item_vec.T / temperature - log_q.unsqueeze(0)  # (B, B + M)
    accidental = item_keys.unsqueeze(0) == item_keys[:b].unsqueeze(1)
    accidental[torch.arange(b), torch.arange(b)] = False
    logits = logits.masked_fill(accidental, torch.finfo(logits.dtype).min)
    target = torch.arange(b, device=logits.device)
    if weight is None:
        return F.cross_entropy(logits, target)
    return (F.cross_entropy(logits, target, reduction="none") * weight).sum() / weight.sum().clamp_min(1e-12)


class PriorUserTower(nn.Module):
    """The user tower with the popularity prior's weight appended: (B, D) -> (B, D + 1) = [u, beta], so that
    [u, beta] . [v, log pop] = u.v + beta * log pop is one inner product (one FAISS search). With ``mf``
    ((user vocabulary, f): the matrix-factorisation user factors by ``user_cat[:, 0]``, already weighted;
    row 0, the unknown user, is zero) the output is [u, mf[user], beta] against items' [v, mf item, log pop]."""

    def __init__(self, tower: UserTower, beta: float, mf: torch.Tensor | None = None):
        super().__init__()
        self.tower = tower
        self.register_buffer("beta", torch.tensor([float(beta)]))
        self.register_buffer("mf", mf.float() if mf is not None else torch.zeros(1, 0))
        self.has_mf = mf is not None  # a Python flag: tracing for ONNX sees no tensor-valued branch

    def forward(self, user_cat: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        u = self.tower(user_cat, history)
        parts = [u]
        if self.has_mf:
            parts.append(self.mf.index_select(0, user_cat[:, 0]))
        parts.append(self.beta.expand(u.shape[0], 1))
        return torch.cat(parts, dim=1)
