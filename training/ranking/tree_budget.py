"""The hybrid's tree budget (``ranking.hybrid_max_trees``): how many of each head's GBDT trees the served graph
blends in, at most that many in all, chosen on validation.

Every tree costs serving time (about 6 us per tree for 500 candidates on one thread), and a head's first
trees carry most of its blend's gain. For each head and each tree count on a roughly geometric grid, the
blend of the deep logit with the margin of the head's first ``n`` trees is fitted and scored cross-fitted
on validation (:func:`training.ranking.hybrid.fit_blend`); the counts are then chosen to maximise the sum of
the heads' gains over the deep model within the budget (an exact knapsack over the grid). Heads with at
least ``hybrid_min_positives`` validation positives are served first: on a few dozen positives a gain is
mostly noise (the reason early stopping reads only those heads too), so the rare heads share what the main
heads leave, and still take the blend only where its gain is distinguishable (the hybrid's rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from training.ranking.hybrid import fit_blend


@dataclass
class TreeBudget:
    max_trees: int
    chosen: dict[str, int]  # head -> trees served (heads that get none are left out)
    # head -> [(trees, cross-fitted validation AUC gain of the blend over the deep model)], where the blend won
    gains: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"max_trees": self.max_trees, "chosen": self.chosen,
                "valid_gain": {h: [[n, round(g, 6)] for n, g in c] for h, c in self.gains.items()}}


def tree_grid(rounds: int) -> list[int]:
    """1, 2, 3, 4, 5, 8, 11, 15, ... (x1.4 each step, rounded) below ``rounds``, and ``rounds`` itself."""
    grid, x = set(), 1.0
    while x < rounds:
        grid.add(int(round(x)))
        x *= 1.4
    return sorted(grid | {int(rounds)})


def allocate(options: dict[str, list[tuple[int, float]]], budget: int) -> dict[str, int]:
    """head -> tree count (0: none) maximising the summed gain with at most ``budget`` trees in all; each
    head's options are (trees, gain) pairs. Ties go to fewer trees."""
    best: dict[int, tuple[float, dict[str, int]]] = {0: (0.0, {})}  # trees spent -> (gain, counts)
    for head, opts in options.items():
        step: dict[int, tuple[float, dict[str, int]]] = {}
        for spent in sorted(best):
            value, counts = best[spent]
            for n, gain in [(0, 0.0), *opts]:
                total = spent + n
                if total > budget:
                    continue
                if total not in step or value + gain > step[total][0] + 1e-12:
                    step[total] = (value + gain, {**counts, head: n})
        best = step
    top = max(v for v, _ in best.values())
    spent = min(s for s, (v, _) in best.items() if v >= top - 1e-12)
    return {h: n for h, n in best[spent][1].items() if n > 0}


def choose_tree_counts(logits: np.ndarray, margins_at: Callable[[str, int], np.ndarray], y: np.ndarray,
                       users: np.ndarray, heads: list[tuple[int, str, int]], budget: int, min_positives: int,
                       seed: int, min_gain: float = 0.0) -> TreeBudget:
    """``heads``: (column in ``logits``/``y``, name, the GBDT's tree count) of each head with a GBDT;
    ``margins_at(name, n)``: that head's validation margins from its first ``n`` trees."""
    gains: dict[str, list[tuple[int, float]]] = {}
    main, rare = {}, {}
    for t, name, rounds in heads:
        curve = []
        for n in tree_grid(rounds):
            blend = fit_blend(logits[:, t], margins_at(name, n), y[:, t], users, seed, min_gain)
            if blend is not None and blend.used:
                curve.append((n, blend.valid_auc_blend - blend.valid_auc_deep))
        gains[name] = curve
        (main if np.nansum(y[:, t]) >= min_positives else rare)[name] = curve
    chosen = allocate(main, budget)
    chosen |= allocate(rare, budget - sum(chosen.values()))
    return TreeBudget(budget, chosen, gains)
