"""The offline policy evaluation's inputs (protocol in :mod:`serving.offline`): the period's impressions,
the bundle as of the period's start, and one :class:`UserCase` per user (retrieved and ranked once,
shared by every arm), through the same public :class:`Recommender` steps the service uses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from features.config import QualityConfig, from_dict
from features.contract import HELDOUT_BUNDLE_DIR
from features.quality import HIGH_QUALITY_INPUTS, high_quality_creators, is_creator_column
from serving.bundle import Bundle
from serving.recommender import Recommender

WEIGHTED = "weighted"  # the gain of the scenario's fusion weights over the binary signals


def gain_names(rec: Recommender) -> tuple[str, ...]:
    """The gains of one evaluation: ``serving.evaluation_gains`` (binary signals; empty = the bundle's
    retrieval positive signal), then the weighted sum. The first is the primary gain (calibration checks)."""
    b = rec.state.bundle
    signals = list(rec.settings.serving.evaluation_gains)
    if not signals:
        positive = b.retrieval.other.get("positive_signal")
        signals = [positive] if positive in b.heads else [b.heads[0]]
    for s in signals:
        if s not in b.heads:
            raise ValueError(f"serving.evaluation_gains names '{s}', not a head of this bundle; heads: {b.heads}")
    return (*signals, WEIGHTED)


def period_log(bundle: Bundle, period: str = "test") -> pd.DataFrame:
    """The bundle's own rows of ``period`` (time-correct features included)."""
    path = bundle.path / "features" / "interactions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the offline policy evaluation needs the bundle's period log")
    log = pd.read_parquet(path, filters=[("period", "==", period)])
    if not len(log):
        why = (" (this bundle is a production refit, trained on every day: evaluate a later log with --log, or "
               f"the held-out fit's bundle, <output_dir>/{HELDOUT_BUNDLE_DIR})") if bundle.manifest.refit else ""
        raise ValueError(f"{path} has no rows with period == '{period}'{why}")
    return log


def period_view(bundle: Bundle, log: pd.DataFrame, later: pd.DataFrame | None = None
                ) -> tuple[Bundle, dict[str, int]]:
    """``bundle`` with every input the ranker reads per user, item, creator or pair as of the start of
    ``log``'s period: user history, user and item aggregates, fan relations and the behaviour tables (user x
    creator, item and creator x context).

    The bundle's tables are the end-of-data snapshot, which counts the period's own outcomes (and those of
    any later period). Each row of the bundle's log carries its block's time-correct values, so a key's first
    row from the period's start on (``log``, then ``later``: the rows after the period) holds its values as of
    that start; a key with no such row had no impression since the start, and its snapshot values are already
    those of the start. ONNX sessions and the index are shared, not copied.
    """
    log = log.sort_values("ts", kind="stable")
    rows = log if later is None or not len(later) else pd.concat([log, later.sort_values("ts", kind="stable")],
                                                                ignore_index=True)
    note = {"users": 0, "items": 0, "creators": 0, "fan_pairs": 0, "fan_pairs_not_in_snapshot": 0, "user_aggregates": 0,
            "behaviour_tables": 0}
    history, user_cols = bundle.history, bundle.user_cols
    present_users = [c for c in bundle.user_num_cols if c in rows]
    if "history" in rows or present_users:
        first = rows.drop_duplicates("user_id")
        urow = np.array([bundle.user_row.get(str(u), -1) for u in first["user_id"]])
        ok = urow >= 0
    if "history" in rows:
        history = bundle.history.copy()
        history[urow[ok]] = np.stack(first["history"].to_numpy()[ok]).astype(np.int64)
        note["users"] = int(ok.sum())
    if present_users:
        user_cols = dict(bundle.user_cols)
        for c in present_users:
            user_cols[c] = np.array(bundle.user_cols[c], copy=True)
            user_cols[c][urow[ok]] = first[c].to_numpy()[ok]
        note["user_aggregates"] = int(ok.sum())
    item_num = bundle.item_num
    item_cols = [s.split(":", 1)[1] for s in bundle.ranking.num.sources if s.startswith("items:")]
    present = [j for j, c in enumerate(item_cols) if c in rows]
    if present:
        item_num = bundle.item_num.copy()
        # The creator's aggregates ride on every item of the creator: an item without a row since the start
        # still changes with its creator's other items, so those are keyed by creator.
        by_creator = [j for j in present if is_creator_column(item_cols[j])]
        by_item = [j for j in present if j not in by_creator]
        first = rows.drop_duplicates("item_id")
        irow = np.array([bundle.item_row.get(str(i), -1) for i in first["item_id"]])
        ok = irow >= 0
        item_num[np.ix_(irow[ok], by_item)] = first[[item_cols[j] for j in by_item]].to_numpy(np.float32)[ok]
        note["items"] = int(ok.sum())
        if by_creator and "creator_id" in rows:
            first = rows.drop_duplicates("creator_id")
            code = pd.Index(bundle.creator_ids).get_indexer(first["creator_id"].astype(str))
            ok = code >= 0
            vals = np.full((len(bundle.creator_ids), len(by_creator)), np.nan, np.float32)
            vals[code[ok]] = first[[item_cols[j] for j in by_creator]].to_numpy(np.float32)[ok]
            seen = np.zeros(len(bundle.creator_ids), bool)
            seen[code[ok]] = True
            items = np.flatnonzero(seen[bundle.item_creator])
            item_num[np.ix_(items, by_creator)] = vals[bundle.item_creator[items]]
            note["creators"] = int(ok.sum())
    high_quality = _high_quality(bundle, item_num, item_cols) if present else bundle.high_quality
    fan_values = bundle.fan_values
    fan_cols = [c for c in bundle.fan_columns if c in rows]
    if fan_cols and "creator_id" in rows:
        fan_values = bundle.fan_values.copy()
        pairs = rows.drop_duplicates(["user_id", "creator_id"])
        cidx = pd.Index(bundle.creator_ids)
        creators = cidx.get_indexer(pairs["creator_id"].astype(str))
        vals = pairs[fan_cols].to_numpy(np.float32)
        which = [bundle.fan_columns.index(c) for c in fan_cols]
        for u, c, v in zip(pairs["user_id"].astype(str), creators, vals):
            row = bundle.user_row.get(u, -1)
            if row < 0 or c < 0:
                continue
            lo, hi = bundle.fan_ptr[row], bundle.fan_ptr[row + 1]
            pos = lo + int(np.searchsorted(bundle.fan_creator[lo:hi], c))
            if pos < hi and bundle.fan_creator[pos] == c:
                fan_values[pos, which] = v
                note["fan_pairs"] += 1
            elif v.any():  # a relation the snapshot lost (an iron fan who lapsed later): left out, counted
                note["fan_pairs_not_in_snapshot"] += 1
    behaviour = bundle.behaviour
    if behaviour is not None:
        user_ids = np.array(sorted(bundle.user_row, key=bundle.user_row.__getitem__), dtype=object)
        behaviour = behaviour.as_of(rows, user_ids, bundle.creator_ids, bundle.item_ids)
        note["behaviour_tables"] = 1 + len(behaviour.contexts) if behaviour.pairs is not None else len(behaviour.contexts)
    start = float(log["ts"].min())
    view = dataclasses.replace(bundle, history=history, user_cols=user_cols, item_num=item_num,
                               high_quality=high_quality, fan_values=fan_values, behaviour=behaviour,
                               data_end_ms=min(bundle.data_end_ms, start) if bundle.data_end_ms else start)
    return view, note


def _high_quality(bundle: Bundle, item_num: np.ndarray, item_cols: list[str]) -> np.ndarray:
    """The items' high-quality creator flags recomputed from the creator aggregates in ``item_num`` (the
    feature build's rule, features/quality.py), or the bundle's where the ranker reads no creator score."""
    if any(c not in item_cols for c in HIGH_QUALITY_INPUTS) or not len(item_num):
        return bundle.high_quality
    codes, first = np.unique(bundle.item_creator, return_index=True)
    creators = pd.DataFrame({c: item_num[first, item_cols.index(c)] for c in HIGH_QUALITY_INPUTS})
    flags = np.zeros(len(bundle.creator_ids), dtype=bool)
    flags[codes] = high_quality_creators(creators, from_dict(QualityConfig, bundle.manifest.config.get("quality") or {}))
    return flags[bundle.item_creator]


def rows_after(bundle: Bundle, log: pd.DataFrame) -> pd.DataFrame:
    """The bundle's own rows after ``log``'s last (a later period's), for :func:`period_view`."""
    path = bundle.path / "features" / "interactions.parquet"
    return pd.read_parquet(path, filters=[("ts", ">", int(log["ts"].max()))]) if path.exists() else log.iloc[:0]


def own_period(bundle: Bundle, period: str, retrieval_as_of: Callable[[Bundle, Bundle, int], tuple[Bundle, dict[str, Any]]]
               | None = None) -> tuple[pd.DataFrame, Bundle, dict[str, Any]]:
    """The bundle's ``period`` rows, the bundle as of the period's start (:func:`period_view`, then
    ``retrieval_as_of(bundle, view, start)`` when given: ``evaluation.as_of``, which needs the training code,
    so it is passed in) and the data report of both."""
    log = period_log(bundle, period)
    view, note = period_view(bundle, log, rows_after(bundle, log))
    data: dict[str, Any] = {"source": f"{bundle.path}/features/interactions.parquet", "period": period,
                            "period_view": note}
    if retrieval_as_of is not None:
        view, data["as_of"] = retrieval_as_of(bundle, view, int(log["ts"].min()))
    return log, view, data


@dataclass
class UserCase:
    """One user's request: ranked candidates and the logged truth. Arrays aligned over n candidates."""

    user_id: str
    row: int  # bundle user row
    hist: np.ndarray  # (L,) the user's history (item_id_idx)
    rows: np.ndarray  # (n,) catalogue rows: retrieval top-N, then logged items not retrieved
    preds: np.ndarray  # (n, T) ranker head predictions
    gains: np.ndarray  # (n, G) logged gains (0 = no impression)
    est: np.ndarray  # (n, G) the same gains estimated from the calibrated head predictions
    logged: np.ndarray  # (n,) bool the user was shown the item in the period
    fan_fresh: np.ndarray  # (n,) bool fresh item of an iron-fan creator (fans-first's own test)
    retrieved: int  # rows[:retrieved] came from FAISS, the rest are logged items retrieval missed
    vec: np.ndarray | None = None  # (1, d) user vector (exposure candidate step), None on popular cold start
    context: dict[str, Any] | None = None  # request context of the ranking (tab, hour)
    est_spec: tuple[list[int], list[int], np.ndarray] | None = None  # estimated_gains' arguments after preds


def prepare_cases(rec: Recommender, log: pd.DataFrame, scenario: str | None = None,
                  max_users: int | None = None, fan_probe: Recommender | None = None) -> tuple[list[UserCase], dict[str, Any]]:
    """Retrieve and rank once per known user of ``log``, users in the order of their first impression."""
    st = rec.state
    b = st.bundle
    name = rec.scenario_name(st, scenario)
    weights = dict(zip(b.heads, st.policy.weights[name].tolist()))
    binary = [h.name for h in b.ranking.heads if h.kind == "binary" and h.name in log]
    signals = list(gain_names(rec)[:-1])
    for s in signals:
        if s not in log:
            raise ValueError(f"the log has no '{s}' column; its columns: {sorted(log.columns)}")
    log = log.sort_values("ts", kind="stable")
    uid, iid = log["user_id"].astype(str), log["item_id"].astype(str)
    urow = uid.map(b.user_row).fillna(-1).astype(np.int64).to_numpy()
    irow = iid.map(b.item_row).fillna(-1).astype(np.int64).to_numpy()
    report = {"impressions": int(len(log)), "users": int(uid.nunique()),
              "unknown_users": int(uid[urow < 0].nunique()), "unknown_user_impressions": int((urow < 0).sum()),
              "unknown_item_impressions": int(((irow < 0) & (urow >= 0)).sum())}
    keep = (urow >= 0) & (irow >= 0)
    sig = log.loc[keep, binary].to_numpy(np.float32)
    w = np.array([weights.get(h, 0.0) for h in binary], np.float32)
    est_cols = [b.heads.index(h) for h in signals]
    est_binary = [b.heads.index(h) for h in binary]
    gains_all = np.column_stack([*(log.loc[keep, h].to_numpy(np.float32) for h in signals), np.maximum(sig @ w, 0.0)])
    kept = log.loc[keep]
    ctx_names = [n for _, n in b.request_cat if n != "user_id" and n in kept]
    ctx_vals = {n: kept[n].astype(str).to_numpy() for n in ctx_names}
    irow_k, uid_k = irow[keep], uid.to_numpy()[keep]
    codes, order_users = pd.factorize(uid_k, sort=False)  # first-appearance order = time order
    by_user = np.argsort(codes, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(codes, minlength=len(order_users)))]
    n_users = len(order_users) if max_users is None else min(max_users, len(order_users))
    probe = fan_probe or rec
    cases: list[UserCase] = []
    for u in range(n_users):
        idx = by_user[bounds[u]:bounds[u + 1]]
        user = str(order_users[u])
        row, hist = rec.user_lookup(b, user)
        retrieved, _, vec = rec.search(st, row, hist, rec.settings.serving.candidates)
        logged_rows, first = np.unique(irow_k[idx], return_index=True)
        extra = logged_rows[~np.isin(logged_rows, retrieved)]
        rows = np.concatenate([retrieved, extra])
        gains = np.zeros((len(rows), len(signals) + 1), np.float32)
        pos = pd.Index(rows).get_indexer(irow_k[idx])
        np.maximum.at(gains, pos, gains_all[idx])  # an item shown twice gains its best outcome
        logged = np.zeros(len(rows), bool)
        logged[pos] = True
        ctx = {n: ctx_vals[n][idx[0]] for n in ctx_names}
        preds, _ = rec.score(b, user, row, hist, rows, ctx)
        est = estimated_gains(preds, est_cols, est_binary, w)
        spec = (est_cols, est_binary, w)
        probe_st = probe.state
        fan = probe.candidates(probe_st, row, hist, rows, preds, name, None).fan_fresh
        cases.append(UserCase(user, row, hist, rows, preds, gains, est, logged, fan, len(retrieved), vec, ctx, spec))
    report["evaluated_users"] = len(cases)
    report["evaluated_impressions"] = int(sum(c.logged.sum() for c in cases))
    report["gain_signals"] = {"weighted": {h: float(weights.get(h, 0.0)) for h in binary}}
    report["estimated_gain_heads"] = {**{h: h for h in signals}, WEIGHTED: binary}
    return cases, report


def estimated_gains(preds: np.ndarray, cols: list[int], binary: list[int], w: np.ndarray) -> np.ndarray:
    """(n, G) model estimates of the logged gains: the gain signals' heads, and the weighted sum."""
    p = preds.astype(np.float32)
    return np.column_stack([p[:, cols], np.maximum(p[:, binary] @ w, 0.0)]).astype(np.float32)


def condensed(page_index: np.ndarray, judged: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """Positions of the judged candidates in the arm's ranking: judged page items in page order, then the
    other judged candidates by ``fused`` (descending, stable)."""
    on_page = page_index[judged[page_index]]
    rest = np.flatnonzero(judged)
    rest = rest[~np.isin(rest, on_page)]
    return np.concatenate([on_page, rest[np.argsort(-fused[rest], kind="stable")]]).astype(np.int64)
