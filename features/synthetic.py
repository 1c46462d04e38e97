"""A synthetic short-video world with known ground truth, for tests of every layer.

Users have latent interests over topics; creators publish items in one main topic and have a latent
quality; items inherit it with noise. Each day every user sees a few items, drawn partly by topic
interest and partly by popularity, more often from creators the user follows. Feedback follows the
latent affinity (interest + quality): clicks, watch time against the item length, long views, likes,
follows, comments, forwards, profile visits, and hate that rises for low-quality items. Some items are
not visible any more, and the lowest-quality items and creator are listed as blocked (governance
ground truth). The files come out in KuaiRand's raw layout (``layout="kuairand"``), in a
different one (``layout="alt"``: other column names, seconds instead of ms, Parquet items), or as a
MovieLens-style ratings log of a really different shape (``layout="ratings"``), each with the matching
config, so a test can show that a dataset is described by config, not by code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

DAY_MS = 86_400_000
START_MS = 1_650_844_800_000 - 8 * 3_600_000  # 2022-04-25 00:00 at UTC+8

SIGNAL_COLUMNS = {  # canonical -> KuaiRand raw column
    "click": "is_click",
    "long_view": "long_view",
    "like": "is_like",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "profile_enter": "is_profile_enter",
    "hate": "is_hate",
}
ALT_NAMES = {  # KuaiRand raw -> alt raw
    "user_id": "uid", "video_id": "iid", "time_ms": "event_time_s", "tab": "surface",
    "is_click": "clicked", "long_view": "lv", "is_like": "liked", "is_follow": "followed",
    "is_comment": "commented", "is_forward": "shared", "is_profile_enter": "visited_profile",
    "is_hate": "disliked", "play_time_ms": "watch_ms", "duration_ms": "length_ms",
}


@dataclass
class WorldSpec:
    n_users: int = 300
    n_creators: int = 40
    n_items: int = 400
    n_topics: int = 8
    days: int = 10
    impressions_per_user_day: float = 8.0
    invisible_share: float = 0.05
    seed: int = 0


@dataclass
class World:
    spec: WorldSpec
    user_interest: np.ndarray  # (U, T) rows sum to 1
    creator_topic: np.ndarray  # (C,)
    creator_quality: np.ndarray  # (C,)
    item_creator: np.ndarray  # (I,)
    item_topic: np.ndarray  # (I,)
    item_quality: np.ndarray  # (I,)
    item_visible: np.ndarray  # (I,) bool
    log: pd.DataFrame  # KuaiRand raw layout
    items: pd.DataFrame
    users: pd.DataFrame
    follows: set[tuple[int, int]] = field(default_factory=set)  # (user, creator) ground truth
    # Governance ground truth: what a moderator would block (the lowest-quality items and creator).
    blocked_items: list[str] = field(default_factory=list)
    blocked_creators: list[str] = field(default_factory=list)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_world(spec: WorldSpec | None = None) -> World:
    s = spec or WorldSpec()
    rng = np.random.default_rng(s.seed)
    U, C, I, T = s.n_users, s.n_creators, s.n_items, s.n_topics
    interest = rng.dirichlet(np.full(T, 0.3), size=U)
    creator_topic = rng.integers(0, T, size=C)
    creator_quality = rng.normal(0, 1, size=C)
    item_creator = rng.integers(0, C, size=I)
    same = rng.random(I) < 0.85
    item_topic = np.where(same, creator_topic[item_creator], rng.integers(0, T, size=I))
    item_quality = creator_quality[item_creator] + rng.normal(0, 0.5, size=I)
    visible = rng.random(I) >= s.invisible_share
    duration = np.clip(rng.lognormal(np.log(25_000), 0.8, size=I), 3_000, 600_000).round()
    popularity = np.exp(0.5 * item_quality + rng.normal(0, 0.7, size=I))
    popularity /= popularity.sum()
    topic_items = [np.flatnonzero(item_topic == t) for t in range(T)]
    activity = rng.lognormal(0, 0.5, size=U)

    follows: set[tuple[int, int]] = set()
    rows: list[np.ndarray] = []
    for day in range(s.days):
        n_imp = rng.poisson(s.impressions_per_user_day * activity)
        users = np.repeat(np.arange(U), n_imp)
        n = len(users)
        by_interest = rng.random(n) < 0.6
        topics = np.array([rng.choice(T, p=interest[u]) for u in users])
        items = rng.choice(I, size=n, p=popularity)
        for t in range(T):
            sel = by_interest & (topics == t) & (len(topic_items[t]) > 0)
            if sel.any():
                items[sel] = rng.choice(topic_items[t], size=int(sel.sum()))
        # Fans see their creators more: swap some impressions for a followed creator's item.
        if follows:
            fan_of: dict[int, list[int]] = {}
            for u, c in follows:
                fan_of.setdefault(u, []).append(c)
            for j in np.flatnonzero(rng.random(n) < 0.25):
                cs = fan_of.get(int(users[j]))
                if cs:
                    cand = np.flatnonzero(item_creator == cs[rng.integers(len(cs))])
                    items[j] = cand[rng.integers(len(cand))]
        affinity = 4.0 * interest[users, item_topic[items]] + 0.8 * item_quality[items] - 0.6
        fan = np.array([(int(u), int(item_creator[i])) in follows for u, i in zip(users, items)], dtype=bool)
        affinity = affinity + 1.0 * fan
        click = rng.random(n) < _sigmoid(affinity)
        ratio = np.clip(_sigmoid(affinity + rng.normal(0, 1, n)) * 1.3, 0, 3) * click
        dur = duration[items]
        watch = (ratio * dur).round()
        long_view = click & (watch >= np.minimum(dur, 18_000))
        like = click & (rng.random(n) < _sigmoid(affinity - 3.5))
        follow = click & ~fan & (rng.random(n) < _sigmoid(affinity - 4.0))
        comment = click & (rng.random(n) < _sigmoid(affinity - 4.5))
        forward = click & (rng.random(n) < _sigmoid(affinity - 4.8))
        profile = click & (rng.random(n) < _sigmoid(affinity - 3.2 + 1.5 * fan))
        hate = rng.random(n) < _sigmoid(-1.5 * item_quality[items] - 4.5)
        for u, i in zip(users[follow], items[follow]):
            follows.add((int(u), int(item_creator[i])))
        ts = START_MS + day * DAY_MS + np.sort(rng.integers(0, DAY_MS, size=n))
        rows.append(
            np.column_stack([users, items, ts, click, like, follow, comment, forward, hate, long_view,
                             watch, dur, profile, rng.integers(0, 3, n)]).astype(np.int64)
        )
    arr = np.concatenate(rows)
    log = pd.DataFrame(
        arr,
        columns=["user_id", "video_id", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
                 "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "is_profile_enter", "tab"],
    ).sort_values(["time_ms", "user_id", "video_id"], kind="stable").reset_index(drop=True)
    items_df = pd.DataFrame(
        {
            "video_id": np.arange(I),
            "author_id": 1000 + item_creator,
            "tag": item_topic,
            "visible_status": np.where(visible, 0, 1),
            "video_duration": duration,
            "video_type": np.where(rng.random(I) < 0.05, "AD", "NORMAL"),
        }
    )
    users_df = pd.DataFrame(
        {
            "user_id": np.arange(U),
            "user_active_degree": np.where(activity > 1.2, "high", np.where(activity > 0.8, "mid", "low")),
            "onehot_feat0": rng.integers(0, 3, U),
        }
    )
    blocked_items = [str(i) for i in np.argsort(item_quality)[: max(1, I // 50)]]
    blocked_creators = [str(1000 + int(np.argmin(creator_quality)))]
    return World(s, interest, creator_topic, creator_quality, item_creator, item_topic, item_quality, visible,
                 log, items_df, users_df, follows, blocked_items, blocked_creators)


def _kuairand_config(data_dir: Path, output_dir: Path) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "data": {
            "dir": str(data_dir),
            "name": "synthetic",
            "utc_offset_hours": 8,
            "interactions": {
                "file": "log.csv",
                "columns": {"user_id": "user_id", "item_id": "video_id", "ts": "time_ms", "tab": "tab"},
                "time_unit": "ms",
                "duration_column": "duration_ms",
                "watch_time_signal": "watch_time",
                "hour_context": True,
            },
            "items": {
                "file": "items.csv",
                "columns": {"item_id": "video_id", "creator_id": "author_id", "category": "tag",
                            "visible": "visible_status", "duration_ms": "video_duration", "video_type": "video_type"},
                "visible_values": [0],
                "categorical": ["video_type"],
            },
            "users": {"file": "users.csv", "columns": {"user_id": "user_id"},
                      "categorical": ["user_active_degree", "onehot_feat0"]},
            "signals": {**{k: {"column": v, "kind": "binary"} for k, v in SIGNAL_COLUMNS.items()},
                        "watch_time": {"column": "play_time_ms", "kind": "continuous"}},
        },
        "validation": {"max_bad_fraction": 0.05},
        "split": {"mode": "fractions", "valid_fraction": 0.2, "test_fraction": 0.2, "align_days": True},
        "quality": {"prior_strength": 20,
                    "score_weights": {"long_view": 1.0, "like": 4.0, "follow": 10.0, "hate": -40.0, "watch_ratio": 0.5},
                    "min_creator_impressions": 20},
        "fans": {"follow_signal": "follow", "interaction_signals": ["like", "comment", "forward", "profile_enter", "long_view"],
                 "iron_fan_min_interactions": 3, "iron_fan_window_days": 7},
        "history": {"signal": "long_view", "length": 10},
        "retrieval": {"positive_signal": "long_view"},
        "ranking": {"scenarios": {
            "feed": {"click": 1.0, "long_view": 2.0, "watch_time": 2.0, "like": 4.0, "follow": 8.0, "comment": 4.0,
                     "forward": 6.0, "profile_enter": 1.0, "hate": -30.0},
            "commerce": {"click": 2.0, "long_view": 1.0, "watch_time": 0.5, "like": 1.0, "follow": 6.0,
                         "comment": 1.0, "forward": 3.0, "profile_enter": 4.0, "hate": -30.0}}},
    }


GENRES = ["unknown", "Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Western", "Documentary"]


def _ratings_world(world: World, data_dir: Path, output_dir: Path) -> dict[str, Any]:
    """A ratings log in MovieLens-100k's layout: only watched (clicked) or hated impressions are rated,
    1-5 from the world's feedback; ``ratings.data`` tab-separated without a header, ``movies.item``
    pipe-separated latin-1 without a header and with one 0/1 flag column per genre (each movie has its
    topic's genre and maybe a second), ``people.user`` pipe-separated; plus a ``keywords`` text column
    (values joined by ';'). No creators, durations, follows or context."""
    rng = np.random.default_rng(world.spec.seed + 1)
    log = world.log
    rated = log[(log["is_click"] == 1) | (log["is_hate"] == 1)]
    rating = (2 + 2 * rated["long_view"] + rated["is_like"]).clip(1, 5)
    rating = np.where(rated["is_hate"] == 1, 1, rating)
    pd.DataFrame({"u": rated["user_id"], "i": rated["video_id"], "r": rating, "t": rated["time_ms"] // 1000}).to_csv(
        data_dir / "ratings.data", sep="\t", header=False, index=False)
    n_items = len(world.items)
    flags = np.zeros((n_items, len(GENRES)), np.int64)
    flags[np.arange(n_items), 1 + world.item_topic % (len(GENRES) - 1)] = 1
    second = rng.random(n_items) < 0.4
    flags[np.flatnonzero(second), rng.integers(0, len(GENRES), int(second.sum()))] = 1
    items = pd.DataFrame({"movie": world.items["video_id"], "title": [f"Film {i} (Amélie's cut)" for i in range(n_items)],
                          "released": "01-Jan-1995", **{g: flags[:, j] for j, g in enumerate(GENRES)}})
    items["keywords"] = [";".join(f"kw{(t * 3 + k) % 7}" for k in range(1 + i % 3)) for i, t in enumerate(world.item_topic)]
    items.to_csv(data_dir / "movies.item", sep="|", header=False, index=False, encoding="latin-1")
    users = pd.DataFrame({"uid": world.users["user_id"], "age": 18 + world.users["user_id"] % 50,
                          "gender": np.where(world.users["user_id"] % 2 == 0, "M", "F"), "job": world.users["user_active_degree"]})
    users.to_csv(data_dir / "people.user", sep="|", header=False, index=False)
    return {
        "output_dir": str(output_dir),
        "data": {
            "dir": str(data_dir), "name": "synthetic-ratings",
            "interactions": {"file": "ratings.data", "format": "tsv", "header": False,
                             "names": ["user", "movie", "rating", "unix_s"],
                             "columns": {"user_id": "user", "item_id": "movie", "ts": "unix_s"}, "time_unit": "s"},
            "items": {"file": "movies.item", "sep": "|", "header": False, "encoding": "latin-1",
                      "names": list(items.columns), "columns": {"item_id": "movie", "upload_date": "released"},
                      "multi_valued": {"genre": {"flags": GENRES}, "keywords": {"column": "keywords", "sep": ";"}}},
            "users": {"file": "people.user", "sep": "|", "header": False, "names": list(users.columns),
                      "columns": {"user_id": "uid"}, "categorical": ["gender", "job"], "numeric": ["age"]},
            "signals": {"like": {"column": "rating", "op": ">=", "value": 4}},
        },
        "split": {"mode": "fractions", "valid_fraction": 0.2, "test_fraction": 0.2, "align_days": True},
        "history": {"length": 10},
        "quality": {"score_weights": {"like": 1.0}},
    }


def write_world(world: World, data_dir: str | Path, output_dir: str | Path,
                layout: Literal["kuairand", "alt", "ratings"] = "kuairand") -> dict[str, Any]:
    """Write the world's raw files and return the matching config (a plain dict, YAML-ready)."""
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if layout == "ratings":
        return _ratings_world(world, data_dir, output_dir)
    cfg = _kuairand_config(data_dir, output_dir)
    if layout == "kuairand":
        world.log.to_csv(data_dir / "log.csv", index=False)
        world.items.to_csv(data_dir / "items.csv", index=False)
        world.users.to_csv(data_dir / "users.csv", index=False)
        return cfg
    log = world.log.rename(columns=ALT_NAMES)
    log["event_time_s"] = log["event_time_s"] / 1000.0
    log = log[list(reversed(log.columns))]  # column order must not matter either
    log.to_csv(data_dir / "events.tsv.csv", index=False)
    world.items.rename(columns={"video_id": "item", "author_id": "owner", "tag": "topic"}).to_parquet(
        data_dir / "catalogue.parquet", index=False
    )
    world.users.rename(columns={"user_id": "uid"}).to_csv(data_dir / "people.csv", index=False)
    d = cfg["data"]
    d["interactions"].update(
        file="events.tsv.csv", time_unit="s", duration_column="length_ms",
        columns={"user_id": "uid", "item_id": "iid", "ts": "event_time_s", "tab": "surface"},
    )
    d["items"].update(file="catalogue.parquet",
                      columns={**d["items"]["columns"], "item_id": "item", "creator_id": "owner", "category": "topic"})
    d["users"].update(file="people.csv", columns={"user_id": "uid"})
    for name, sig in d["signals"].items():
        sig["column"] = ALT_NAMES[sig["column"]]
    return cfg
