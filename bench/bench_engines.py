"""Which out-of-core engine should the feature build move to? DuckDB and Polars (streaming) against today's
pandas, on the same log and the same task: the heart of the feature build.

    pip install duckdb==2.0.1 polars==2.1.0        # the `scale` extra
    python bench/bench_engines.py --repeat 10 [--memory-limit-mb 1024]

The log is the 11-day KuaiRand slice repeated ``--repeat`` times along time (11 days later each time, as
in issue 15). The task, in each engine: read the CSV with every column as text; count rows whose ids,
time or signals are not numbers (quarantine rule ``wrong_type``); drop repeats of (user, item, time),
keeping the first; per (item, local day) impressions and positives of every binary signal; per item the
cumulative counts *before* each day (the as-of-day-start snapshot that makes features time-correct);
join them back to every row as ``item_n`` and smoothed rates; write Parquet partitioned by day. Every
engine runs in its own process (peak RSS from ``getrusage`` of that process alone); the outputs are
compared (rows, and sums of the joined columns). Prints one JSON line per engine, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLICE = REPO.parent / "shared" / "data" / "kuairand-pure-subset" / "log_standard_20220425_to_20220505_pure.csv.gz"
SIGNALS = ["is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward", "is_profile_enter", "is_hate"]
KEYS = ["user_id", "video_id", "time_ms"]
DAY_MS, OFFSET_MS, PRIOR = 86_400_000, 8 * 3_600_000, 20.0


def make_log(src: Path, repeat: int, out: Path) -> int:
    import pandas as pd

    base = pd.read_csv(src, dtype=str, keep_default_na=False)
    t = pd.to_numeric(base["time_ms"], errors="coerce")
    span = 11 * DAY_MS
    rows = 0
    for r in range(repeat):
        part = base.copy()
        part["time_ms"] = (t + r * span).astype("Int64").astype(str)
        part.to_csv(out, mode="w" if r == 0 else "a", header=r == 0, index=False, compression=None)
        rows += len(part)
    return rows


def _result(out: Path, seconds: float, extra: dict) -> dict:
    import pyarrow.dataset as ds

    table = ds.dataset(out, format="parquet", partitioning="hive").to_table(columns=["item_n", "item_rate_is_click"])
    return {"seconds": round(seconds, 2), "rows_out": table.num_rows,
            "sum_item_n": float(table.column("item_n").to_numpy().sum()),
            "sum_rate_click": round(float(table.column("item_rate_is_click").to_numpy().sum()), 3), **extra}


def run_duckdb(log: Path, out: Path, memory_mb: int) -> dict:
    import duckdb

    t0 = time.perf_counter()
    con = duckdb.connect()
    con.execute(f"SET memory_limit='{memory_mb}MB'; SET threads=2; SET preserve_insertion_order=false;")
    con.execute(f"SET temp_directory='{out.parent / 'duckdb_tmp'}'")
    casts = ", ".join(f"TRY_CAST({c} AS BIGINT) AS {c}" for c in KEYS + SIGNALS)
    ok = " AND ".join(f"{c} IS NOT NULL" for c in KEYS + SIGNALS)
    con.execute(f"""CREATE VIEW raw AS SELECT row_number() OVER () AS rn, {casts}
                    FROM read_csv('{log}', all_varchar=true, header=true)""")
    bad = con.execute(f"SELECT count(*) FROM raw WHERE NOT ({ok})").fetchone()[0]
    sums = ", ".join(f"sum({c}) AS p_{c}" for c in SIGNALS)
    cum = ", ".join(f"coalesce(sum(p_{c}) OVER w, 0) AS c_{c}" for c in SIGNALS)
    glob = ", ".join(f"coalesce(sum(p_{c}) OVER g, 0) AS g_{c}" for c in SIGNALS)
    rates = ", ".join(
        f"(a.c_{c} + {PRIOR} * coalesce(a.g_{c} / nullif(a.g_n, 0), 0)) / (a.c_n + {PRIOR}) AS item_rate_{c}" for c in SIGNALS)
    con.execute(f"""
        COPY (
          WITH good AS (
            SELECT * FROM raw WHERE {ok}
            QUALIFY row_number() OVER (PARTITION BY user_id, video_id, time_ms ORDER BY rn) = 1),
          rows AS (SELECT *, (time_ms + {OFFSET_MS}) // {DAY_MS} AS day FROM good),
          per_day AS (SELECT video_id, day, count(*) AS n, {sums} FROM rows GROUP BY ALL),
          days AS (SELECT day, sum(n) AS dn, {", ".join(f"sum(p_{c}) AS p_{c}" for c in SIGNALS)} FROM per_day GROUP BY day),
          gl AS (SELECT day, coalesce(sum(dn) OVER g, 0) AS g_n, {glob} FROM days
                 WINDOW g AS (ORDER BY day ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)),
          snap AS (SELECT video_id, day, coalesce(sum(n) OVER w, 0) AS c_n, {cum} FROM per_day
                   WINDOW w AS (PARTITION BY video_id ORDER BY day ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)),
          a AS (SELECT snap.*, gl.* EXCLUDE (day) FROM snap JOIN gl USING (day))
          SELECT r.user_id, r.video_id, r.time_ms, r.day, {", ".join("r." + c for c in SIGNALS)},
                 a.c_n AS item_n, {rates}
          FROM rows r JOIN a USING (video_id, day)
        ) TO '{out}' (FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE true)""")
    return _result(out, time.perf_counter() - t0, {"bad_rows": int(bad)})


def run_polars(log: Path, out: Path, memory_mb: int) -> dict:
    import polars as pl

    t0 = time.perf_counter()
    raw = pl.scan_csv(log, infer_schema=False).with_row_index("rn")
    cast = raw.with_columns([pl.col(c).cast(pl.Int64, strict=False) for c in KEYS + SIGNALS])
    ok = pl.all_horizontal([pl.col(c).is_not_null() for c in KEYS + SIGNALS])
    bad = cast.filter(~ok).select(pl.len()).collect(engine="streaming").item()
    rows = (cast.filter(ok).unique(subset=KEYS, keep="first", maintain_order=False)
            .with_columns(((pl.col("time_ms") + OFFSET_MS) // DAY_MS).alias("day")))
    per_day = rows.group_by("video_id", "day").agg(pl.len().alias("n"), *[pl.col(c).sum().alias(f"p_{c}") for c in SIGNALS])
    per_day = per_day.sort("video_id", "day")
    cols = ["n"] + [f"p_{c}" for c in SIGNALS]
    asof = per_day.with_columns(
        [(pl.col(c).cum_sum().over("video_id") - pl.col(c)).alias(f"c_{c[2:] if c != 'n' else 'n'}") for c in cols])
    days = per_day.group_by("day").agg([pl.col(c).sum() for c in cols]).sort("day")
    gl = days.with_columns([(pl.col(c).cum_sum() - pl.col(c)).alias(f"g_{c[2:] if c != 'n' else 'n'}") for c in cols])
    a = asof.join(gl.select("day", *[f"g_{c[2:] if c != 'n' else 'n'}" for c in cols]), on="day")
    rate = [((pl.col(f"c_{c}") + PRIOR * pl.when(pl.col("g_n") > 0).then(pl.col(f"g_{c}") / pl.col("g_n")).otherwise(0.0))
             / (pl.col("c_n") + PRIOR)).alias(f"item_rate_{c}") for c in SIGNALS]
    res = (rows.join(a.select("video_id", "day", pl.col("c_n").alias("item_n"), *rate), on=["video_id", "day"])
           .select("user_id", "video_id", "time_ms", "day", *SIGNALS, "item_n", *[f"item_rate_{c}" for c in SIGNALS]))
    res.sink_parquet(pl.PartitionBy(out, key="day", include_key=False), mkdir=True, engine="streaming")
    return _result(out, time.perf_counter() - t0, {"bad_rows": int(bad)})


def run_pandas(log: Path, out: Path, memory_mb: int) -> dict:
    import numpy as np
    import pandas as pd

    t0 = time.perf_counter()
    raw = pd.read_csv(log, dtype=str, keep_default_na=False)
    num = raw[KEYS + SIGNALS].apply(pd.to_numeric, errors="coerce")
    ok = num.notna().all(axis=1)
    bad = int((~ok).sum())
    rows = num[ok].astype(np.int64).drop_duplicates(KEYS, keep="first")
    rows["day"] = (rows["time_ms"] + OFFSET_MS) // DAY_MS
    per_day = rows.groupby(["video_id", "day"], as_index=False).agg(n=("time_ms", "size"), **{f"p_{c}": (c, "sum") for c in SIGNALS})
    cols = ["n"] + [f"p_{c}" for c in SIGNALS]
    g = per_day.groupby("video_id")[cols].cumsum() - per_day[cols]
    per_day[[f"c_{'n' if c == 'n' else c[2:]}" for c in cols]] = g.to_numpy()
    days = per_day.groupby("day")[cols].sum().sort_index()
    gl = (days.cumsum() - days).add_prefix("g_").rename(columns=lambda c: c.replace("g_p_", "g_"))
    a = per_day.join(gl, on="day")
    gn = a["g_n"].to_numpy(np.float64)
    for c in SIGNALS:
        glob = np.divide(a[f"g_{c}"].to_numpy(np.float64), gn, out=np.zeros(len(a)), where=gn > 0)
        a[f"item_rate_{c}"] = (a[f"c_{c}"] + PRIOR * glob) / (a["c_n"] + PRIOR)
    res = rows.merge(a[["video_id", "day", "c_n", *[f"item_rate_{c}" for c in SIGNALS]]].rename(columns={"c_n": "item_n"}),
                     on=["video_id", "day"])
    res.to_parquet(out, partition_cols=["day"], index=False)
    return _result(out, time.perf_counter() - t0, {"bad_rows": bad})


ENGINES = {"pandas": run_pandas, "duckdb": run_duckdb, "polars": run_polars}


def child(engine: str, log: str, out: str, memory_mb: int) -> None:
    res = ENGINES[engine](Path(log), Path(out), memory_mb)
    res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps({"engine": engine, **res}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--engines", default="pandas,duckdb,polars")
    ap.add_argument("--memory-limit-mb", type=int, default=1024, help="DuckDB's memory_limit")
    ap.add_argument("--child", nargs=4, metavar=("ENGINE", "LOG", "OUT", "MB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.csv"
        rows = make_log(SLICE, args.repeat, log)
        results = []
        for engine in args.engines.split(","):
            out = Path(tmp) / f"out_{engine}"
            r = subprocess.run([sys.executable, __file__, "--child", engine, str(log), str(out), str(args.memory_limit_mb)],
                               capture_output=True, text=True, env={**os.environ, "POLARS_MAX_THREADS": "2"})
            if r.returncode != 0:
                print(json.dumps({"engine": engine, "error": r.stderr[-1500:]}))
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(json.dumps(res))
            results.append(res)
        same = len({(r["rows_out"], r["bad_rows"], round(r["sum_item_n"]), round(r["sum_rate_click"], 1)) for r in results}) == 1
        print(json.dumps({"rows_in": rows, "repeat": args.repeat, "outputs_agree": same,
                          "load_avg": os.getloadavg()[0],
                          **{r["engine"]: {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"]} for r in results}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
