"""The simulator's storage: a MemoryStorage that knows what its fsync
policy made durable, can fail like a disk, and keeps an archive of its log.

*Power loss* (:meth:`SimStorage.power_loss`) keeps what the policy had
forced to disk and a random part of the rest, cut at an arbitrary entry
(a torn record is dropped at recovery, so the log ends at the cut):

- ``fsync="always"``: every batch is durable when ``write_wal`` returns;
- ``"batch"``: entries older than ``fsync_interval`` are durable (the
  flusher forces them within that time);
- ``"off"``: entries older than 30 s are durable (the kernel's default
  dirty-page expiry).

Metadata (role, epoch, epoch history), checkpoints and ``clear_wal`` are
durable at once, as the real storage makes them.  A *process* crash loses
nothing: the kernel still holds what was written.

*Disk faults*: ``fail = "write"`` makes the next writes fail before
anything is written (ENOSPC); ``fail = "fsync"`` writes the batch and then
fails (EIO from fsync: the data is in the log but not durable).

The *archive* is the log as the node's state reflects it, from WAL id 1:
every entry appended, the tail cut by a power loss removed, and - when a
state sync replaces the log - the upstream's archive up to the snapshot
(:meth:`adopt`).  The checker compares archives and replays them.
"""

from __future__ import annotations

import random
from typing import Callable

from ..core.errors import StorageError
from ..storage.base import MemoryStorage

DIRTY_EXPIRE = 30.0  # seconds: how long "off" leaves data unsynced at most


class SimStorage(MemoryStorage):
    def __init__(self, now: Callable[[], float], policy: str, interval: float):
        super().__init__(clock=lambda: int(now() * 1e9), checkpoints=True)
        self._now = now
        self.policy = policy
        self.interval = interval
        self.archive: dict[int, bytes] = {}
        self._adopted: dict[int, bytes] | None = None
        self.fail = ""  # "", "write" or "fsync"
        self.slow_write = 0.0  # seconds each write (and its fsync) takes
        self.charge: Callable[[float], None] = lambda seconds: None
        self._not_durable: set[int] = set()  # written, but the fsync failed
        self.failures = 0

    def _append(self, first_id: int, datas: list[bytes], payload: bytes | None = None) -> None:
        if self.fail == "write":
            self.failures += 1
            raise StorageError("[Errno 28] No space left on device (simulated)")
        super()._append(first_id, datas, payload)
        archive = self.archive
        for stale in [k for k in archive if k >= first_id]:
            del archive[stale]  # a log rebuilt from here (after a clear)
        for i, d in enumerate(datas):
            archive[first_id + i] = bytes(d)
        if self.slow_write:
            self.charge(self.slow_write)
        if self.fail == "fsync":
            self.failures += 1
            self._not_durable.update(range(first_id, first_id + len(datas)))
            raise StorageError("[Errno 5] Input/output error: fsync of the WAL failed "
                               "(simulated)")

    def clear_wal(self) -> None:
        """(A state sync clears the log when it begins, and again when it
        completes: the state then stands for the log up to its WAL id.)"""
        super().clear_wal()
        self.archive, self._adopted = self._adopted or {}, None
        self._not_durable.clear()

    def adopt(self, upstream_archive: dict[int, bytes], upto: int) -> None:
        """A state sync at ``upto`` completed: the state is the upstream's
        log up to there (from the ``clear_wal`` that follows)."""
        self._adopted = {k: v for k, v in upstream_archive.items() if k <= upto}

    def durable_until(self) -> int:
        """The last WAL id a power loss now would keep for certain."""
        if not self._datas:
            return 0
        if self.policy == "always":
            horizon = float("inf")
        else:
            age = self.interval if self.policy == "batch" else DIRTY_EXPIRE
            horizon = (self._now() - age) * 1e9
        last = self._first - 1
        for i, t in enumerate(self._times):
            wal_id = self._first + i
            if t > horizon or wal_id in self._not_durable:
                break
            last = wal_id
        return last

    def power_loss(self, rng: random.Random) -> int:
        """Keep the durable prefix and a random part of the rest (cut at an
        entry); returns how many entries were lost."""
        with self._lock:
            top = self.max_wal()
            keep = self.durable_until()
            if top > keep:
                keep = rng.randint(keep, top)
            lost = top - keep
            if lost:
                n = keep - self._first + 1
                del self._datas[max(n, 0):]
                del self._times[max(n, 0):]
                if not self._datas:
                    self._first = 0
                for k in [k for k in self.archive if k > keep]:
                    del self.archive[k]
            self._not_durable.clear()
            return lost
