"""The served feed by candidate source, offline: is the page built from the merged candidates worth more
than a page built from any one channel's, once the ranker and the feed policy have chosen it?

Recall@500 of the candidate set (training's channel table) says what the ranker *could* pick; this says
what the user *gets*. Each arm is a :class:`Recommender` whose only difference is
``serving.channel_quotas``: ``served`` (the configured mix, else the bundle's, chosen on validation) and one
arm per channel the bundle can serve, that channel alone filling all ``serving.candidates`` (what it leaves
topped up from the ANN when ``serving.fill_from_ann``, as the service would serve that quota). Every arm
serves every evaluated user (those with a positive of some gain signal in the period) once, in the order
of their first period impression, through
:meth:`Recommender.recommend` (seen-item exclusion, exposure candidates, ranking, policy: the request path
of the service), with the context of that first impression.

The page is judged against everything the user did in the period (not only candidates): NDCG@k and
Recall@k of each gain signal, the ideal being the user's best k period outcomes. Items the user was not
shown in the period gain 0, which favours what the logging system showed (the usual bias of offline
retrieval metrics), alike in every arm. ``served_vs_best_single`` is the served arm minus the best single
channel (by mean NDCG of the primary gain) with a paired user-bootstrap 95% interval.

The bundle must be served *as of the period's start* (``evaluation.channels`` builds that view: period
history, channel tables, seen sets, MF factors and the popularity prior from the rows before the period),
or the seen sets would hide the period's own items and the MF factors would know them.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from features.candidates import CHANNELS
from features.metrics import ndcg, paired_difference
from serving.bundle import Bundle
from serving.candidates import available_channels, channel_quotas
from serving.config import ServeSettings
from serving.exposure import gini
from serving.offline_cases import gain_names
from serving.recommender import Recommender

SERVED = "served"


def channel_arms(b: Bundle, settings: ServeSettings,
                 mixes: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, int]]:
    """Arm name -> the quotas it serves with: the served mix, each available channel alone, then ``mixes``
    (named quota mixes to compare, e.g. when choosing quotas on the validation period)."""
    total = settings.serving.candidates
    available = available_channels(b, settings.serving)
    arms = {SERVED: channel_quotas(settings.serving.channel_quotas, b.channel_quotas, total, available)}
    arms.update({c: {c: total} for c in CHANNELS if c in available})
    for name, quotas in (mixes or {}).items():
        if name in arms:
            raise ValueError(f"mix name '{name}' is taken (arms: {sorted(arms)})")
        unknown = sorted(set(quotas) - set(CHANNELS))
        if unknown:
            raise ValueError(f"mix '{name}' names unknown channels {unknown}; known: {', '.join(CHANNELS)}")
        arms[name] = channel_quotas(quotas, None, total, available)
    return arms


def _truth(b: Bundle, log: pd.DataFrame, signals: list[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Known users' and items' rows of ``log`` (in time order), with each binary outcome per signal, plus the
    counts of what was left out."""
    urow = log["user_id"].astype(str).map(b.user_row).fillna(-1).astype(np.int64).to_numpy()
    irow = log["item_id"].astype(str).map(b.item_row).fillna(-1).astype(np.int64).to_numpy()
    keep = (urow >= 0) & (irow >= 0)
    report = {"impressions": int(len(log)), "unknown_user_impressions": int((urow < 0).sum()),
              "unknown_item_impressions": int(((irow < 0) & (urow >= 0)).sum())}
    df = pd.DataFrame({"user_id": log["user_id"].astype(str).to_numpy()[keep], "row": irow[keep]})
    for s in signals:
        df[s] = (log[s].to_numpy()[keep] > 0).astype(np.float32)
    return df, report


class _UserMemo:
    """What every arm shares for one user: the ranker's predictions, the query vector and the retrieved
    candidates. The ranker scores each (user, item, context) row on its own, whichever channel brought the
    item, so an item several arms retrieve is scored once; arms whose serving settings are equal (the
    retrieval-weight arms differ only in the policy) retrieve once."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.pos: np.ndarray | None = None  # (N,) catalogue row -> its row in preds / watch, -1: not scored
        self.scored: list[np.ndarray] = []  # the rows set in ``pos`` (reset per user without touching all N)
        self.preds: np.ndarray | None = None
        self.watch: np.ndarray | None = None
        self.merged_key: tuple | None = None
        self.merged: list[tuple[Any, tuple]] = []  # (serving settings, what Recommender._merged returned)
        self.vector: tuple[tuple, np.ndarray | None] | None = None  # (key, the user's query vector)

    def get(self, rec: Recommender, b: Bundle, user_id: str, row: int, hist: np.ndarray, rows: np.ndarray,
            context: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray | None]:
        key = (user_id, tuple(sorted((context or {}).items())))
        if self.pos is None or len(self.pos) != b.n_items:
            self.pos, self.scored = np.full(b.n_items, -1, np.int64), []
        if key != self.key:
            for done in self.scored:
                self.pos[done] = -1
            self.key, self.scored, self.preds, self.watch = key, [], None, None
        fresh = rows[self.pos[rows] < 0]
        _, first = np.unique(fresh, return_index=True)
        new = fresh[np.sort(first)]  # in order of first appearance
        if len(new):
            preds, watch = Recommender.score(rec, b, user_id, row, hist, new, context)
            n_before = 0 if self.preds is None else len(self.preds)
            self.pos[new] = np.arange(n_before, n_before + len(new))
            self.scored.append(new)
            self.preds = preds if self.preds is None else np.concatenate([self.preds, preds])
            if watch is not None:
                self.watch = watch if self.watch is None else np.concatenate([self.watch, watch])
        if self.preds is None:
            return np.zeros((0, len(b.heads)), np.float32), None
        at = self.pos[rows]
        return self.preds[at], None if self.watch is None else self.watch[at]

    def query_vector(self, key: tuple, compute) -> np.ndarray | None:
        """The user's query vector (``key``: bundle, user row and cold-start rule), computed once for every arm."""
        if self.vector is None or self.vector[0] != key:
            self.vector = (key, compute())
        return self.vector[1]

    def retrieved(self, key: tuple, serving: Any, merge) -> tuple:
        """``merge()``'s result for this user (``key``) and serving settings, computed once per distinct settings."""
        if key != self.merged_key:
            self.merged_key, self.merged = key, []
        for settings, result in self.merged:
            if settings == serving:
                return result
        result = merge()
        self.merged.append((serving, result))
        return result


class _ArmRecommender(Recommender):
    """One arm's :class:`Recommender`: its own quotas and exposure tracker; the user's query vector, the ranker
    predictions and (for equal serving settings) the retrieved candidates shared."""

    def __init__(self, bundle: Bundle, settings: ServeSettings, memo: _UserMemo):
        super().__init__(bundle, settings)
        self.memo = memo

    def score(self, b: Bundle, user_id: str, row: int, hist: np.ndarray, rows: np.ndarray,
              context: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray | None]:
        return self.memo.get(self, b, user_id, row, hist, rows, context)

    def query_vector(self, b: Bundle, row: int, hist: np.ndarray) -> np.ndarray | None:
        return self.memo.query_vector((id(b), row, self.settings.serving.cold_start),
                                      lambda: super(_ArmRecommender, self).query_vector(b, row, hist))

    def _merged(self, st: Any, row: int, hist: np.ndarray, blocked: np.ndarray,
                n_mine: int) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray | None]:
        # What is blocked depends on the user and the bundle alone here (no client exclusions offline).
        key = (id(st.bundle), row, n_mine, int(blocked.sum()))
        return self.memo.retrieved(key, self.settings.serving,
                                   lambda: super(_ArmRecommender, self)._merged(st, row, hist, blocked, n_mine))


def feed_scores(view: Bundle, settings: ServeSettings, log: pd.DataFrame, k: int = 20,
                scenario: str | None = None, max_users: int | None = None, seed: int = 0,
                progress: bool = False, mixes: dict[str, dict[str, int]] | None = None
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every arm's page for each known user of ``log`` (see the module docstring; ``view`` is the bundle as of
    ``log``'s start), and per arm each evaluated user's NDCG@k of the primary gain (NaN where the user has no
    positive of it), in the same user order for every arm (for paired comparisons)."""
    arms = channel_arms(view, settings, mixes)
    out, per_user = page_scores(view, {a: ServeSettings(dataclasses.replace(settings.serving, channel_quotas=q),
                                                        settings.policy) for a, q in arms.items()},
                                log, k, scenario, max_users, progress)
    primary = out["gains"][0]
    singles = [a for a in arms if a in CHANNELS]
    if singles:
        best = max(singles, key=lambda a: out["arms"][a][f"ndcg@{k}_{primary}"] or 0.0)
        diff = served_minus(per_user, best, seed)
        if diff is not None:
            out["served_vs_best_single"] = {"channel": best, "metric": f"ndcg@{k}_{primary}", **diff,
                                            "at_least_as_good": bool(diff["difference"] >= 0)}
    return out, per_user


def served_minus(per_user: dict[str, np.ndarray], arm: str, seed: int = 0) -> dict[str, Any] | None:
    """The served arm's per-user NDCG minus ``arm``'s, over the users where it is defined, with a paired
    user-bootstrap interval (None: no such user, or no such arm)."""
    defined = np.isfinite(per_user[SERVED])
    if arm not in per_user or not defined.any():
        return None
    return paired_difference(per_user[SERVED][defined], per_user[arm][defined], seed)


def with_retrieval_weight(settings: ServeSettings, weight: float) -> ServeSettings:
    """``settings`` with the page fusion's retrieval-score weight fixed (every scenario without its own)."""
    policy = settings.policy
    return ServeSettings(settings.serving,
                         dataclasses.replace(policy, fusion=dataclasses.replace(policy.fusion, retrieval_weight=weight)))


def page_scores(view: Bundle, arm_settings: dict[str, ServeSettings], log: pd.DataFrame, k: int = 20,
                scenario: str | None = None, max_users: int | None = None, progress: bool = False
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every arm's page (one :class:`Recommender` per settings, the ranker's predictions shared) for the evaluated
    users of ``log``: the metrics of :func:`feed_scores` per arm, and per arm each user's NDCG@k of the
    primary gain. The first arm names the gain signals."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    memo = _UserMemo()
    recs = {a: _ArmRecommender(view, s, memo) for a, s in arm_settings.items()}
    arms = {a: s.serving.channel_quotas for a, s in arm_settings.items()}
    signals = list(gain_names(next(iter(recs.values())))[:-1])
    missing = [s for s in signals if s not in log]
    if missing:
        raise ValueError(f"the log has no {missing} column(s); its columns: {sorted(log.columns)}")
    log = log.sort_values("ts", kind="stable")
    truth, report = _truth(view, log, signals)
    ctx_names = [n for _, n in view.request_cat if n != "user_id" and n in log]
    first = log.drop_duplicates("user_id")
    first = first.set_index(first["user_id"].astype(str))
    # Only users with a positive of some gain signal: a page without anything to find scores nothing.
    any_positive = truth.groupby("user_id", sort=False)[signals].max().max(axis=1) > 0
    users = pd.unique(truth["user_id"])
    report["users"] = int(len(users))
    users = users[any_positive.reindex(users).to_numpy()]
    report["users_without_positive"] = report["users"] - int(len(users))
    if max_users is not None:
        users = users[:max_users]
    by_user = {u: g for u, g in truth[truth["user_id"].isin(set(users))].groupby("user_id", sort=False)}
    G = len(signals)
    scores = {a: {"ndcg": np.full((len(users), G), np.nan), "recall": np.full((len(users), G), np.nan)} for a in arms}
    reasons: dict[str, dict[str, int]] = {a: {} for a in arms}
    creator_slots = {a: np.zeros(len(view.creator_ids), np.int64) for a in arms}
    # Redirected to a log file, a bar redrawn 10 times a second is megabytes of noise: redraw every 15 s there.
    bar = tqdm(users, desc=f"channels: {len(arms)} arms", unit="user", disable=not progress,
               mininterval=0.1 if sys.stderr.isatty() else 15.0)
    for j, user in enumerate(bar):
        g = by_user[user].groupby("row", sort=False)[signals].max()
        gains = {int(r): v for r, v in zip(g.index, g.to_numpy(np.float32))}
        ideal = g.to_numpy(np.float32)  # (m, G)
        positives = (ideal > 0).sum(axis=0)
        ctx = {n: str(first.at[user, n]) for n in ctx_names}
        for a, rec in recs.items():
            res = rec.recommend(user, k, scenario, context=ctx)
            rows = np.array([view.item_row[i.item_id] for i in res.items], np.int64)
            page = np.array([gains.get(int(r), np.zeros(G, np.float32)) for r in rows], np.float32).reshape(-1, G)
            for gi in range(G):
                if positives[gi] == 0:
                    continue
                scores[a]["ndcg"][j, gi] = ndcg(page[None, :, gi], ideal[None, :, gi], k)[0]
                scores[a]["recall"][j, gi] = (page[:, gi] > 0).sum() / positives[gi]
            np.add.at(creator_slots[a], view.item_creator[rows], 1)
            for item in res.items:
                tag = item.reasons[-1]
                reasons[a][tag] = reasons[a].get(tag, 0) + 1
    out: dict[str, Any] = {"protocol": "serving.offline_channels (see its docstring)", "k": k, "gains": signals,
                           "candidates": next(iter(arm_settings.values())).serving.candidates, "users": int(len(users)), "data": report,
                           "arms": {}}
    for a in arms:
        m: dict[str, Any] = {"quotas": arms[a]}
        for gi, s in enumerate(signals):
            defined = np.isfinite(scores[a]["ndcg"][:, gi])
            m[f"ndcg@{k}_{s}"] = round(float(scores[a]["ndcg"][defined, gi].mean()), 5) if defined.any() else None
            m[f"recall@{k}_{s}"] = round(float(scores[a]["recall"][defined, gi].mean()), 5) if defined.any() else None
            m[f"users_{s}"] = int(defined.sum())
        slots = max(1, sum(reasons[a].values()))
        m["channel_share"] = {t: round(n / slots, 4) for t, n in sorted(reasons[a].items())}
        # What the page's settings do to creator exposure (the feed policy's fairness measure, over every
        # catalogue creator): a fusion that wins NDCG by serving everyone the same creators shows here.
        m["creator_gini_catalogue"] = round(gini(creator_slots[a]), 4)
        m["retrieval_weight"] = recs[a].state.policy.fusion_retrieval_weight(
            arm_settings[a].policy.for_scenario(recs[a].scenario_name(recs[a].state, scenario)))
        out["arms"][a] = m
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out, {a: scores[a]["ndcg"][:, 0] for a in arms}
