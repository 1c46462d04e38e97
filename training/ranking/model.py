"""The multi-task ranker as plain modules: FeatureEmbedding -> NumericNormalizer -> Experts + Gates
(MMoE, or PLE's CGC levels) -> TaskHeads. ``Ranker.forward`` returns logits (B, T); ``RankerScorer`` is
what gets exported: probabilities per head plus the decoded watch time in ms.

Experts and gates of one level are batched into a few matmuls (expert k's weights are slice k of one
(K, D, H) tensor), which keeps the exported graph small and fast for one user's 500 candidates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from training.embedding import OffsetEmbedding
from training.ranking.watch_time import WatchTimeDecoder, WatchTimeQuantiles


@dataclass
class RankerSpec:
    """Everything needed to rebuild the module before loading its state (shapes only, no statistics)."""

    cat_sizes: list[int]
    cat_dims: list[int]
    item_position: int
    n_num: int
    heads: list[str]
    architecture: str = "mmoe"
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64])
    num_experts: int = 4
    shared_experts: int = 2
    task_experts: int = 1
    ple_levels: int = 1
    tower_hidden: int = 32
    dropout: float = 0.1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class FeatureEmbedding(nn.Module):
    """cat (B, k) int64 -> (B, sum of dims); hist (B, L) int64 -> mean and target-attention pools over
    the item-id table (B, 2 * d_item). Columns of equal width share one table with offsets, so the whole
    lookup is one gather per width. Indices outside a column's vocabulary read its OOV row 0."""

    def __init__(self, sizes: list[int], dims: list[int], item_position: int):
        super().__init__()
        self.widths = sorted(set(dims))
        self.tables = nn.ModuleList()
        self.item_position = item_position
        for g, w in enumerate(self.widths):
            cols = [i for i, d in enumerate(dims) if d == w]
            self.register_buffer(f"cols_{g}", torch.tensor(cols, dtype=torch.long))
            group = OffsetEmbedding([sizes[i] for i in cols], w, oov_to_zero=True)
            self.tables.append(group)
            if item_position in cols:
                self.item_group = g
                self.item_column = cols.index(item_position)  # its position among the group's columns
                self.item_offset = int(group.offsets[self.item_column])
                self.item_size = sizes[item_position]
        self.item_dim = dims[item_position]
        self.out_dim = int(sum(dims)) + 2 * self.item_dim

    def lookup(self, cat: torch.Tensor, hist: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-width (B, k_g, w) embeddings and the history's item embeddings (B, L, d_item)."""
        embs = [table(cat.index_select(1, getattr(self, f"cols_{g}"))) for g, table in enumerate(self.tables)]
        return embs, self.history(hist)

    def history(self, hist: torch.Tensor) -> torch.Tensor:
        """The history's item embeddings (B, L, d_item); ids outside the item vocabulary read row 0."""
        h = torch.where((hist < 0) | (hist >= self.item_size), torch.zeros_like(hist), hist)
        return self.tables[self.item_group].table(h + self.item_offset)

    def forward(self, cat: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        embs, hist_e = self.lookup(cat, hist)
        mean, target = self.pools(hist, hist_e, embs[self.item_group][:, self.item_column])
        flat = [e.flatten(1) for e in embs]
        return torch.cat(flat + [mean, target], dim=1)

    def pools(self, hist: torch.Tensor, hist_e: torch.Tensor, item_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean pool (B_h, d) and target-attention pool (B, d) of the history (B_h, L) for candidates
        item_e (B, d); B_h is B, or 1 for one request's shared history (broadcast over the candidates)."""
        mask = (hist > 0).to(hist_e.dtype)  # (B_h, L)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        mean = (hist_e * mask.unsqueeze(2)).sum(dim=1) / count
        att = self._attention((hist_e * item_e.unsqueeze(1)).sum(dim=2), mask)  # (B, L)
        target = (hist_e * att.unsqueeze(2)).sum(dim=1)
        return mean, target

    def shared_pools(self, hist: torch.Tensor, hist_e: torch.Tensor, item_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`pools` for one request's history (1, L) shared by all candidates item_e (B, d), as two plain
        matrix products, not broadcast elementwise ops (the deep request graph ran in 0.90x the time for 500
        candidates in ONNX Runtime)."""
        mask = (hist > 0).to(hist_e.dtype)  # (1, L)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        h = hist_e[0]  # (L, d)
        mean = (mask @ h) / count
        return mean, self._attention(item_e @ h.transpose(0, 1), mask) @ h

    def _attention(self, dots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Target-attention weights (B, L) from candidate . history dot products, padding masked out."""
        att = torch.softmax(dots / math.sqrt(self.item_dim) + (mask - 1.0) * 1e4, dim=1) * mask
        return att / att.sum(dim=1, keepdim=True).clamp(min=1e-6)

    def penalty(self, cat: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """Mean squared norm of the rows this batch reads (L2 only where there is gradient)."""
        embs, _ = self.lookup(cat, hist)
        return sum(e.pow(2).sum(dim=(1, 2)).mean() for e in embs)


class NumericNormalizer(nn.Module):
    """Raw numeric features (B, n), NaN allowed -> standardised (B, n); log1p on heavy-tailed columns.
    Statistics are buffers from the train rows, so exported graphs take raw values."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("log_mask", torch.zeros(n))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))

    @staticmethod
    def statistics(num: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(num, np.float64)
        lo = np.nanmin(np.where(np.isfinite(x), x, np.nan), axis=0)
        hi = np.nanmax(np.where(np.isfinite(x), x, np.nan), axis=0)
        log_mask = ((lo >= 0) & (hi > 5)).astype(np.float64)  # counts and durations, not rates or flags
        t = np.where(log_mask > 0, np.log1p(np.clip(x, 0, None)), x)
        mean = np.nan_to_num(np.nanmean(t, axis=0))
        std = np.nan_to_num(np.nanstd(t, axis=0), nan=1.0)
        return {"log_mask": log_mask, "mean": mean, "std": np.where(std > 1e-6, std, 1.0)}

    def set_statistics(self, stats: dict[str, np.ndarray]) -> None:
        for k in ("log_mask", "mean", "std"):
            getattr(self, k).copy_(torch.as_tensor(stats[k], dtype=torch.float32))

    def forward(self, num: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """``cols``: ``num`` holds only these columns (in this order), normalised with their statistics."""
        log_mask, mean, std = self.log_mask, self.mean, self.std
        if cols is not None:
            log_mask, mean, std = log_mask.index_select(0, cols), mean.index_select(0, cols), std.index_select(0, cols)
        logged = torch.log1p(num.clamp(min=0.0))
        x = torch.where(log_mask > 0, logged, num)
        z = (x - mean) / std
        z = torch.where(torch.isnan(z), torch.zeros_like(z), z)
        return z.clamp(-10.0, 10.0)


class Experts(nn.Module):
    """K expert MLPs as batched matmuls. x: (B, D) shared by all experts, or (K, B, D) -> (K, B, H)."""

    def __init__(self, n: int, d_in: int, hidden: list[int], dropout: float):
        super().__init__()
        self.n = n
        dims = [d_in, *hidden]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(n, a, b)
            for k in range(n):
                nn.init.kaiming_uniform_(w[k].T, a=math.sqrt(5))
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(n, 1, b)))
        self.dropout = nn.Dropout(dropout)
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if x.dim() == 2:  # shared input: one GEMM for all experts
                k, d, h = w.shape
                y = (x @ w.permute(1, 0, 2).reshape(d, k * h)).reshape(-1, k, h).transpose(0, 1)
            else:
                y = torch.matmul(x, w)
            x = self.dropout(torch.relu(y + b))
        return x


class Gates(nn.Module):
    """G softmax gates over K experts; ``mask`` (G, K) says which experts a gate may use.
    x: (B, D) shared or (G, B, D) one input per gate -> weights (G, B, K), rows sum to 1."""

    def __init__(self, n_gates: int, d_in: int, mask: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_gates, d_in, mask.shape[1]) * 0.01)
        self.bias = nn.Parameter(torch.zeros(n_gates, 1, mask.shape[1]))
        self.register_buffer("mask_add", ((1.0 - mask.float()) * -1e4).unsqueeze(1))  # (G, 1, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        return torch.softmax(torch.matmul(x, self.weight) + self.bias + self.mask_add, dim=-1)


class GatedLevel(nn.Module):
    """One MMoE layer or one PLE extraction level.

    Experts belong to groups (group g reads input g when inputs differ per group); gate g mixes the
    experts its mask allows. MMoE: one group, T gates over all experts. PLE (CGC): groups 0..T-1 are task
    experts, group T the shared experts; task gate t sees its own and the shared experts; a non-final
    level adds a shared gate over all experts that feeds the next level's shared experts."""

    def __init__(self, d_in: int, hidden: list[int], dropout: float, expert_group: list[int], gate_mask: torch.Tensor):
        super().__init__()
        self.experts = Experts(len(expert_group), d_in, hidden, dropout)
        self.gates = Gates(gate_mask.shape[0], d_in, gate_mask)
        self.register_buffer("expert_group", torch.tensor(expert_group, dtype=torch.long))
        self.n_gates = int(gate_mask.shape[0])
        self.out_dim = self.experts.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D) or (G_in, B, D) -> (G, B, H)."""
        e = self.experts(x if x.dim() == 2 else x.index_select(0, self.expert_group))  # (K, B, H)
        # Gate g reads input g (task inputs first, then the shared one); a final PLE level has no shared gate.
        g = self.gates(x if x.dim() == 2 else x[: self.n_gates])  # (G, B, K)
        return torch.matmul(g.transpose(0, 1), e.transpose(0, 1)).transpose(0, 1)


class TaskHeads(nn.Module):
    """One tower per task, batched: (T, B, H) -> logits (B, T)."""

    def __init__(self, n_tasks: int, d_in: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_tasks, d_in, hidden))
        self.b1 = nn.Parameter(torch.zeros(n_tasks, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(n_tasks, hidden, 1))
        self.b2 = nn.Parameter(torch.zeros(n_tasks, 1, 1))
        for t in range(n_tasks):
            nn.init.kaiming_uniform_(self.w1.data[t].T, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.w2.data[t].T, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.matmul(x, self.w1) + self.b1)
        return (torch.matmul(h, self.w2) + self.b2).squeeze(2).transpose(0, 1)


def build_levels(spec: RankerSpec, d_in: int) -> nn.ModuleList:
    T = len(spec.heads)
    levels = nn.ModuleList()
    if spec.architecture == "mmoe":
        mask = torch.ones(T, spec.num_experts)
        levels.append(GatedLevel(d_in, spec.expert_hidden, spec.dropout, [0] * spec.num_experts, mask))
        return levels
    if spec.architecture != "ple":
        raise ValueError(f"ranking.architecture must be 'mmoe' or 'ple', got '{spec.architecture}'")
    groups = [t for t in range(T) for _ in range(spec.task_experts)] + [T] * spec.shared_experts
    K = len(groups)
    for level in range(spec.ple_levels):
        last = level == spec.ple_levels - 1
        rows = []
        for t in range(T):
            rows.append([1.0 if g in (t, T) else 0.0 for g in groups])
        if not last:
            rows.append([1.0] * K)
        levels.append(GatedLevel(d_in, spec.expert_hidden, spec.dropout, groups, torch.tensor(rows)))
        d_in = spec.expert_hidden[-1]
    return levels


class Ranker(nn.Module):
    """(cat (B, k) int64, hist (B, L) int64, num (B, n) float32) -> logits (B, T), one per head."""

    def __init__(self, spec: RankerSpec):
        super().__init__()
        self.spec = spec
        self.embedding = FeatureEmbedding(spec.cat_sizes, spec.cat_dims, spec.item_position)
        self.numeric = NumericNormalizer(spec.n_num)
        d_in = self.embedding.out_dim + spec.n_num
        self.levels = build_levels(spec, d_in)
        self.heads = TaskHeads(len(spec.heads), spec.expert_hidden[-1], spec.tower_hidden)

    def forward(self, cat: torch.Tensor, hist: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.embedding(cat, hist), self.numeric(num)], dim=1)  # (B, D)
        for level in self.levels:
            x = level(x)  # (G, B, H)
        return self.heads(x)

    def set_head_bias(self, prior: np.ndarray) -> None:
        """Start each head at its base rate: logit(prior) (rare heads begin calibrated, not at 0.5)."""
        p = np.clip(np.asarray(prior, np.float64), 1e-6, 1 - 1e-6)
        with torch.no_grad():
            self.heads.b2.copy_(torch.tensor(np.log(p / (1 - p)), dtype=torch.float32).view(-1, 1, 1))


class RankerScorer(nn.Module):
    """The exported graph: (cat, hist, num) -> (scores (B, T) = sigmoid of every head's logit, the
    watch-time head being the duration-debiased watch quantile; watch_time_s (B,) decoded from it, only
    when there is a watch-time head)."""

    def __init__(self, ranker: Ranker, watch_index: int | None, wtq: WatchTimeQuantiles | None, duration_position: int | None):
        super().__init__()
        self.ranker = ranker
        self.watch_index = watch_index
        self.duration_position = duration_position
        self.decoder = WatchTimeDecoder(wtq) if watch_index is not None and wtq is not None else None
        # Per-head Platt scaling fitted on validation rows (identity until set): sigmoid(a * logit + b).
        n = len(ranker.spec.heads)
        self.register_buffer("calib_scale", torch.ones(n))
        self.register_buffer("calib_bias", torch.zeros(n))
        # The hybrid ranker's weight on each head's GBDT margin (training/ranking/hybrid.py); 0 = deep only.
        self.register_buffer("gbdt_weight", torch.zeros(n))

    @property
    def output_names(self) -> list[str]:
        return ["scores", "watch_time_s"] if self.decoder is not None else ["scores"]

    def forward(self, cat: torch.Tensor, hist: torch.Tensor, num: torch.Tensor,
                gbdt_margin: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.finish(self.ranker(cat, hist, num), num, gbdt_margin)

    def finish(self, logits: torch.Tensor, num: torch.Tensor,
               gbdt_margin: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Calibrated head scores (and decoded watch seconds) from the ranker's logits and, in the hybrid
        ranker, the GBDT's (B, T) margins (the exported graph computes them with its tree ensemble)."""
        z = logits * self.calib_scale + self.calib_bias
        if gbdt_margin is not None:
            z = z + gbdt_margin * self.gbdt_weight
        scores = torch.sigmoid(z)
        if self.decoder is None or self.watch_index is None:
            return (scores,)
        # Seconds, not ms: float32 keeps ~7 digits, so ms values near 1e6 would differ between eager and ONNX
        # Runtime by more than the 1e-4 parity bound from rounding alone.
        watch_s = self.decoder(num[:, self.duration_position], scores[:, self.watch_index]) / 1000.0
        return scores, watch_s


class RequestScorer(nn.Module):
    """:class:`RankerScorer` for one request, the serving graph: every row shares the request-constant inputs
    (the user's and the context's categorical columns ``const_cat``, numeric columns ``const_num`` and the
    history), so they are looked up, normalised and pushed through the first gated level once, from row 0,
    and only the candidate's own columns are handled per row. Same inputs and outputs as the scorer; rows
    that do not share them get row 0's.

    The first level's expert and gate weights are split by side (candidate, request): the request's side is
    one row, the bias of the candidates' two GEMMs (experts, gates). On the full slice's ranker 29 of 35
    categorical and 11 of 66 numeric columns are the request's."""

    def __init__(self, scorer: RankerScorer, const_cat: list[int], const_num: list[int]):
        super().__init__()
        self.scorer = scorer
        ranker = scorer.ranker
        emb = ranker.embedding
        const_cat_set = set(const_cat)
        if emb.item_position in const_cat_set:
            raise ValueError("the item id column cannot be request-constant: the target attention reads it per row")
        # The first level's input x, as FeatureEmbedding.forward and Ranker.forward lay it out: per width
        # group its columns' embeddings, then the history's mean and target-attention pools, then numerics.
        # x_var and x_const below hold the same dimensions, split by side, each in x's order.
        var_dims: list[int] = []
        const_dims: list[int] = []
        self.var_groups: list[int] = []  # width groups with a candidate column / with a request column
        self.const_groups: list[int] = []
        start = 0
        for g, w in enumerate(emb.widths):
            cols = getattr(emb, f"cols_{g}").tolist()
            for side, keep, dims, groups in (("var", False, var_dims, self.var_groups),
                                             ("const", True, const_dims, self.const_groups)):
                js = [j for j, c in enumerate(cols) if (c in const_cat_set) == keep]
                if not js:
                    continue
                groups.append(g)
                self.register_buffer(f"{side}_cols_{g}", torch.tensor([cols[j] for j in js], dtype=torch.long))
                self.register_buffer(f"{side}_at_{g}", torch.tensor(js, dtype=torch.long))  # within the group
                dims += [start + j * w + d for j in js for d in range(w)]
                if g == emb.item_group and not keep:
                    self.item_at = js.index(emb.item_column)  # its position among the group's candidate columns
            start += len(cols) * w
        d = emb.item_dim
        const_dims += list(range(start, start + d))  # mean pool of the history
        var_dims += list(range(start + d, start + 2 * d))  # target attention: depends on the candidate
        start += 2 * d
        n_num = ranker.spec.n_num
        const_num_set = set(const_num)
        self.register_buffer("const_num", torch.tensor(sorted(const_num_set), dtype=torch.long))
        self.has_const_num = bool(const_num_set)  # a Python flag: the graph's shape, fixed at export
        # Every row's numerics are normalised whole: a request column's weight rows are 0 on the candidate side
        # (it enters once, on the request side), which is cheaper than gathering the candidate columns.
        unused = [len(var_dims) + i for i in sorted(const_num_set)]
        var_dims += [start + i for i in range(n_num)]
        const_dims += [start + i for i in sorted(const_num_set)]
        level = ranker.levels[0]
        w0, b0 = level.experts.weights[0].detach(), level.experts.biases[0].detach()  # (K, D, H), (K, 1, H)
        gw = level.gates.weight.detach()  # (G, D, K)
        k, _, h = w0.shape
        n_gates = gw.shape[0]

        def side(dims: list[int]) -> torch.Tensor:
            """(len(dims), K * H + G * K): the experts' first layer, then every gate, for these input dims."""
            i = torch.tensor(dims, dtype=torch.long)
            experts = w0[:, i, :].permute(1, 0, 2).reshape(len(dims), k * h)
            gates = gw[:, i, :].permute(1, 0, 2).reshape(len(dims), n_gates * k)
            return torch.cat([experts, gates], dim=1).contiguous()

        w_var = side(var_dims)
        w_var[unused] = 0.0
        self.register_buffer("w_var_experts", w_var[:, : k * h].contiguous())
        self.register_buffer("w_var_gates", w_var[:, k * h :].contiguous())
        self.register_buffer("w_const", side(const_dims))
        gate_bias = (level.gates.bias.detach() + level.gates.mask_add).reshape(1, n_gates * k)  # (G, 1, K) -> (1, G*K)
        self.register_buffer("b0", torch.cat([b0.permute(1, 0, 2).reshape(1, k * h), gate_bias], dim=1).contiguous())
        self.n_experts, self.hidden, self.n_gates = k, h, n_gates

    def _embed(self, cat: torch.Tensor, side: str, g: int) -> torch.Tensor:
        """(B, k, w): one side's columns of width group ``g`` (out-of-vocabulary ids read their row 0)."""
        x = cat.index_select(1, getattr(self, f"{side}_cols_{g}"))
        return self.scorer.ranker.embedding.tables[g](x, getattr(self, f"{side}_at_{g}"))

    def forward(self, cat: torch.Tensor, hist: torch.Tensor, num: torch.Tensor,
                gbdt_margin: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        ranker = self.scorer.ranker
        emb = ranker.embedding
        var = {g: self._embed(cat, "var", g) for g in self.var_groups}  # (n, k_v, w)
        const = [self._embed(cat[:1], "const", g).flatten(1) for g in self.const_groups]  # (1, k_c * w)
        hist_e = emb.history(hist[:1])  # the history once: (1, L, d)
        mean, target = emb.shared_pools(hist[:1], hist_e, var[emb.item_group][:, self.item_at])  # (1, d), (n, d)
        x_var = torch.cat([e.flatten(1) for e in var.values()] + [target, ranker.numeric(num)], dim=1)
        request_num = ([ranker.numeric(num[:1].index_select(1, self.const_num), self.const_num)]
                       if self.has_const_num else [])  # an empty index would export a mistyped constant
        x_const = torch.cat(const + [mean] + request_num, dim=1)
        # The request's row is each GEMM's bias (addmm exports as Gemm, which ONNX Runtime fuses with the ReLU):
        # no broadcast Add and no split over the candidates' rows.
        kh = self.n_experts * self.hidden
        request = x_const @ self.w_const + self.b0  # (1, K * H + G * K)
        experts = torch.addmm(request[:, :kh], x_var, self.w_var_experts)  # (n, K * H)
        gates = torch.addmm(request[:, kh:], x_var, self.w_var_gates)  # (n, G * K)
        e = torch.relu(experts).reshape(-1, self.n_experts, self.hidden).transpose(0, 1)  # (K, n, H)
        level = ranker.levels[0]
        for w, b in zip(list(level.experts.weights)[1:], list(level.experts.biases)[1:]):
            e = torch.relu(torch.matmul(e, w) + b)
        g = torch.softmax(gates.reshape(-1, self.n_gates, self.n_experts), dim=-1)  # (n, G, K)
        x = torch.matmul(g, e.transpose(0, 1)).transpose(0, 1)  # (G, n, H)
        for lvl in list(ranker.levels)[1:]:
            x = lvl(x)
        return self.scorer.finish(ranker.heads(x), num, gbdt_margin)


def embedding_dims(sizes: list[int], dim: int, small_dim: int, small_vocab: int) -> list[int]:
    return [dim if s > small_vocab else small_dim for s in sizes]
