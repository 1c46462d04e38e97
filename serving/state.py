"""Admin state (the runtime blocklist) shared by every worker process and kept across restarts.

One JSON file in the state directory; every change is read-modify-write under an exclusive ``fcntl``
lock and lands by an atomic rename, so N concurrent blocks on any workers keep N, and a reader never sees
half a file. Workers notice a change by the file's mtime (one ``stat`` per request). One machine only: for
several machines the same interface would sit on Redis (DESIGN.md), which this deployment does not run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator


@dataclass(frozen=True)
class Blocks:
    items: frozenset[str] = frozenset()
    creators: frozenset[str] = frozenset()


class BlockStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "blocklist.json"
        self._lock_path = self.dir / "blocklist.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def version(self) -> tuple[int, ...] | None:
        """An id of the file's content: () while nothing is blocked; None while it cannot be trusted (changed
        within the last second: file times tick coarsely, so two writes can share one mtime)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return ()
        if time.time_ns() - st.st_mtime_ns < 1_000_000_000:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def read(self) -> Blocks:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Blocks()
        except ValueError as e:
            raise ValueError(f"state file {self.path.name} is not valid JSON: {e}") from None
        return Blocks(frozenset(map(str, data.get("blocked_items", []))),
                      frozenset(map(str, data.get("blocked_creators", []))))

    def update(self, items: Iterable[str] = (), creators: Iterable[str] = (), unblock: bool = False) -> Blocks:
        """Add (or remove) ids under the lock and publish the result; returns the new blocklist."""
        with self._locked():
            cur = self.read()
            if unblock:
                new = Blocks(cur.items - set(items), cur.creators - set(creators))
            else:
                new = Blocks(cur.items | set(items), cur.creators | set(creators))
            self._write(new)
        return new

    def _write(self, blocks: Blocks) -> None:
        tmp = self.dir / f".blocklist.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"blocked_items": sorted(blocks.items), "blocked_creators": sorted(blocks.creators)}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)  # atomic: readers see the old or the new list
