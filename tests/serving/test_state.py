"""The admin blocklist store: concurrent writers in several processes lose nothing, and a reader never
trusts an mtime that may not have ticked yet."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from serving.state import Blocks, BlockStore


def _writer(state: str, tag: str, n: int) -> None:
    store = BlockStore(state)
    for i in range(n):
        store.update(items=[f"{tag}-{i}"])


def test_concurrent_writers_in_several_processes_keep_every_block(tmp_path: Path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), f"p{p}", 25)) for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(BlockStore(tmp_path).read().items) == 100


def test_unblock_and_a_fresh_change_is_never_cached(tmp_path: Path):
    store = BlockStore(tmp_path / "state")
    assert store.read() == Blocks() and store.version() == ()
    store.update(items=["a", "b"], creators=["c"])
    assert store.version() is None  # written within the last second: the caller must re-read
    old = os.stat(store.path).st_mtime_ns - 5_000_000_000
    os.utime(store.path, ns=(old, old))
    assert store.version() == (old, os.stat(store.path).st_ino, os.stat(store.path).st_size)
    assert store.update(items=["a"], unblock=True) == Blocks(frozenset({"b"}), frozenset({"c"}))
    assert BlockStore(tmp_path / "state").read().items == {"b"}  # what a restarted service reads
