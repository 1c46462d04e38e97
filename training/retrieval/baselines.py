"""Retrieval baselines scored per user over an :class:`EvalSet`'s candidates: implicit-ALS matrix
factorisation and item-to-item co-visitation from the user's recent positives (popularity and recent
popularity are in :mod:`.metrics`). Each has a few hyper-parameters, chosen on the validation period by
:func:`tune_baselines` with the same protocol as the two-tower, then refit on everything seen before the
test period.

Scores come back as ``score_chunk(user_positions) -> (c, N)`` callables, the shape ``ranked_hits`` takes.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.candidates import covisit_matrix, row_normalise
from features.config import ConfigError
from features.split import DAY_MS
from training.retrieval.metrics import EvalSet, popularity_scores, ranked_hits, recall_ndcg

if TYPE_CHECKING:  # the config module imports this one for BaselinesConfig
    from training.retrieval.config import RetrievalConfig

ScoreChunk = Callable[[np.ndarray], np.ndarray]
log = logging.getLogger(__name__)


@dataclass
class BaselinesConfig:
    """Grids searched on validation (every combination); the best by validation Recall@monitor_k is refit."""

    als: bool = True
    als_factors: list[int] = field(default_factory=lambda: [8, 16])  # few factors win on ~7 rows per user
    als_regularization: list[float] = field(default_factory=lambda: [0.05])
    als_alpha: list[float] = field(default_factory=lambda: [10.0])
    # Preference of a shown item without the positive signal (0 = positives only): the log's own
    # exposure is a strong hint of what the user will be shown, and so can long-view, next.
    als_impression_weight: list[float] = field(default_factory=lambda: [0.3, 1.0])
    als_iterations: int = 15
    covisit: bool = True
    covisit_window: list[int] = field(default_factory=lambda: [10])  # pair positives at most this many apart
    covisit_history: list[int] = field(default_factory=lambda: [20])  # the user's last N positives vote
    covisit_pop_weight: list[float] = field(default_factory=lambda: [0.5, 2.0, 8.0])  # blend with popularity (ranks 0..1)

    def validate(self) -> None:
        for name in ("als_factors", "als_regularization", "als_alpha", "als_impression_weight",
                     "covisit_window", "covisit_history", "covisit_pop_weight"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"retrieval.baselines.{name} must list at least one value")
            if any(v < 0 for v in values):
                raise ConfigError(f"retrieval.baselines.{name} values must be >= 0, got {values}")
        if self.als_iterations <= 0:
            raise ConfigError(f"retrieval.baselines.als_iterations must be > 0, got {self.als_iterations}")


def _codes(es: EvalSet, catalogue: np.ndarray, seen: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user position or -1, candidate position or -1, ok mask) of each seen row."""
    cand = pd.Index(np.asarray(catalogue).astype(str)[es.candidates])
    u = pd.Index(es.user_ids).get_indexer(seen["user_id"].astype(str))
    i = cand.get_indexer(seen["item_id"].astype(str))
    return u, i, (i >= 0)


def als_scores(seen: pd.DataFrame, catalogue: np.ndarray, es: EvalSet, signal: str, factors: int,
               regularization: float, alpha: float, impression_weight: float, iterations: int,
               seed: int = 0) -> ScoreChunk:
    """Implicit ALS (Hu et al. 2008) on every seen user: preference 1 + per shown (user, item) the
    positive count, plus ``impression_weight`` per impression; confidence 1 + alpha * that value."""
    users, uf, itf = als_factors(seen, np.asarray(catalogue)[es.candidates], signal, factors, regularization, alpha,
                                 impression_weight, iterations, seed)
    pos = users.get_indexer(es.user_ids)
    uf = np.where((pos >= 0)[:, None], uf[pos], 0.0).astype(np.float32)
    return lambda u: uf[u] @ itf.T


def als_factors(seen: pd.DataFrame, items: np.ndarray, signal: str, factors: int, regularization: float,
                alpha: float, impression_weight: float, iterations: int,
                seed: int = 0) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    """(user ids, (U, f) user factors, (len(items), f) item factors) of implicit ALS on ``seen``; items never
    seen get zero factors."""
    from threadpoolctl import threadpool_limits
    from implicit.cpu.als import AlternatingLeastSquares

    users = pd.Index(seen["user_id"].astype(str).unique())
    cand = pd.Index(np.asarray(items).astype(str))
    ui = users.get_indexer(seen["user_id"].astype(str))
    ii = cand.get_indexer(seen["item_id"].astype(str))
    value = (seen[signal].to_numpy() > 0).astype(np.float32) + np.float32(impression_weight)
    ok = (ii >= 0) & (value > 0)
    m = sp.csr_matrix((value[ok], (ui[ok], ii[ok])), shape=(len(users), len(cand)), dtype=np.float32)
    m.sum_duplicates()
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                        iterations=iterations, random_state=seed, num_threads=1)
        model.fit(m, show_progress=False)
    return users, np.asarray(model.user_factors, np.float32), np.asarray(model.item_factors, np.float32)


def recent_positions(user: np.ndarray, item: np.ndarray, ts: np.ndarray, n_users: int, n_items: int,
                     history: int) -> sp.csr_matrix:
    """(U, N) the user's last ``history`` positives, weight 1 for the newest down to 1/history."""
    order = np.lexsort((-ts, user))
    u, it = user[order], item[order]
    start = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    rank = np.arange(len(u)) - np.repeat(start, np.diff(np.r_[start, len(u)]))
    keep = rank < history
    m = sp.csr_matrix(((1.0 / (1 + rank[keep])).astype(np.float32), (u[keep], it[keep])), shape=(n_users, n_items))
    m.sum_duplicates()
    return m


def rank_scale(x: np.ndarray) -> np.ndarray:
    """Scores -> 0..1 by rank (ties share a rank), so blends do not depend on the scores' scale."""
    r = pd.Series(x).rank(method="average").to_numpy()
    return (r - 1) / max(len(x) - 1, 1)


def covisit_scores(seen: pd.DataFrame, catalogue: np.ndarray, es: EvalSet, signal: str, window: int, history: int,
                   pop_weight: float) -> ScoreChunk:
    """Sum of co-visitation rows of the user's recent positives (row-normalised), blended with popularity
    so a user with no co-visited item still gets a full ranking."""
    pos = seen[seen[signal].to_numpy() > 0]
    u, i, ok = _codes(es, catalogue, pos)
    n = len(es.candidates)
    all_users = pd.Index(pos["user_id"].astype(str).unique()).get_indexer(pos["user_id"].astype(str))
    ts = pos["ts"].to_numpy()
    c = covisit_matrix(all_users[ok], i[ok], ts[ok], n, window)
    c = row_normalise(c)
    mine = ok & (u >= 0)
    h = recent_positions(u[mine], i[mine], ts[mine], es.n_users, n, history)
    pop = rank_scale(np.bincount(i[ok], minlength=n).astype(np.float64)).astype(np.float32)

    def score(users: np.ndarray) -> np.ndarray:
        s = (h[users] @ c).toarray()
        top = s.max(axis=1, keepdims=True)
        return s / np.where(top > 0, top, 1.0) + pop_weight * pop

    return score


def _recall(score: ScoreChunk, es: EvalSet, k: int) -> float:
    hits = ranked_hits(score, es, k)
    return recall_ndcg(hits, np.asarray(es.targets.sum(axis=1)).ravel(), [k], [])[f"recall@{k}"]


@dataclass
class Tuned:
    name: str
    params: dict
    valid_recall: float
    sweep: list[dict]


def _grid(cfg: BaselinesConfig, name: str) -> list[dict]:
    if name == "mf":
        keys = ("factors", "regularization", "alpha", "impression_weight")
        grids = (cfg.als_factors, cfg.als_regularization, cfg.als_alpha, cfg.als_impression_weight)
    else:
        keys = ("window", "history", "pop_weight")
        grids = (cfg.covisit_window, cfg.covisit_history, cfg.covisit_pop_weight)
    return [dict(zip(keys, combo)) for combo in itertools.product(*grids)]


def make_scorer(name: str, params: dict, cfg: BaselinesConfig, seen: pd.DataFrame, catalogue: np.ndarray,
                es: EvalSet, signal: str, seed: int = 0) -> ScoreChunk:
    if name == "mf":
        return als_scores(seen, catalogue, es, signal, int(params["factors"]), params["regularization"],
                          params["alpha"], params["impression_weight"], cfg.als_iterations, seed)
    return covisit_scores(seen, catalogue, es, signal, int(params["window"]), int(params["history"]),
                          params["pop_weight"])


def tune_baselines(cfg: BaselinesConfig, seen: pd.DataFrame, catalogue: np.ndarray, es: EvalSet, signal: str,
                   k: int, seed: int = 0) -> dict[str, Tuned]:
    """Every grid point of each enabled baseline scored on ``es`` (the validation period)."""
    out = {}
    for name in [n for n, on in (("mf", cfg.als), ("covisit", cfg.covisit)) if on]:
        sweep = []
        for params in _grid(cfg, name):
            r = _recall(make_scorer(name, params, cfg, seen, catalogue, es, signal, seed), es, k)
            sweep.append({**params, f"valid_recall@{k}": round(r, 5)})
            log.info("baseline %s %s: valid recall@%d %.4f", name, params, k, r)
        best = max(sweep, key=lambda row: row[f"valid_recall@{k}"])
        params = {p: v for p, v in best.items() if not p.startswith("valid_")}
        out[name] = Tuned(name, params, best[f"valid_recall@{k}"], sweep)
    return out


def tuned_json(tuned: dict[str, Tuned]) -> dict:
    return {n: {k: v for k, v in asdict(t).items() if k != "name"} for n, t in tuned.items()}


def baseline_scorers(rc: RetrievalConfig, train: pd.DataFrame, valid: pd.DataFrame, seen: pd.DataFrame,
               item_ids: np.ndarray, val_es: EvalSet, test_es: EvalSet, split: dict, seed: int):
    """Popularity scores and the MF / co-visitation scorers tuned on validation, refit on ``seen`` for test;
    returns (validation scorers, test scorers, tuning record)."""
    signal = rc.positive_signal
    val = popularity_scores(train, item_ids, val_es, signal, int(split["valid_start"] - rc.recent_days * DAY_MS))
    test = popularity_scores(seen, item_ids, test_es, signal, int(split["test_start"] - rc.recent_days * DAY_MS))
    tuned = tune_baselines(rc.baselines, train, item_ids, val_es, signal, rc.monitor_k, seed)
    for name, t in tuned.items():
        val[name] = make_scorer(name, t.params, rc.baselines, train, item_ids, val_es, signal, seed)
        test[name] = make_scorer(name, t.params, rc.baselines, seen, item_ids, test_es, signal, seed)
    return val, test, tuned_json(tuned)
