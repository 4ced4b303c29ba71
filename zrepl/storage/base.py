"""Storage: argument rules shared by every implementation, and MemoryStorage.

``BaseStorage`` holds the metadata and checks every argument, so that
``MemoryStorage`` (the in-memory twin, the model the property tests compare
against) and ``FileStorage`` refuse the same inputs with the same messages.
Implementations supply the WAL and say how metadata is made durable.
"""

from __future__ import annotations

import bisect
import threading
import time
from datetime import datetime
from typing import Any, Sequence

from ..core.errors import ReplicationError, StorageError, WALTruncated
from ..core.interfaces import Storage
from ..core.types import NodeRole, WALEntry
from .snapshot import MemoryCheckpoints

EMPTY_META: dict[str, Any] = {
    "address": "",
    "role": int(NodeRole.UNKNOWN),
    "leader_id": 0,
    "follower_address": "",
    "max_applied_wal": 0,
    "epoch_history": [],
}


def check_id(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StorageError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise StorageError(f"{name} must be >= {minimum}, got {value}")
    if value >= 2**63:
        raise StorageError(f"{name} must be below 2**63, got {value}")
    return value


def check_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise StorageError(f"{name} must be a str, got {type(value).__name__}")
    return value


def check_role(value: Any, error: type[ReplicationError] = StorageError) -> NodeRole:
    """``value`` as a NodeRole, or ``error`` naming the valid roles."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return NodeRole(value)
    except (ValueError, TypeError):
        valid = ", ".join(f"{r.name}={r.value}" for r in NodeRole)
        raise error(f"role must be one of {valid}; got {value!r}") from None


def check_epoch_history(history: Any) -> list[tuple[int, int]]:
    if not isinstance(history, (list, tuple)):
        raise StorageError(f"epoch history must be a list, got {type(history).__name__}")
    out: list[tuple[int, int]] = []
    for item in history:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise StorageError(f"epoch history items are (leader_id, first_wal_id); got {item!r}")
        leader_id = check_id(item[0], "epoch history leader_id", 1)
        first = check_id(item[1], "epoch history first WAL id", 1)
        if out and leader_id <= out[-1][0]:
            raise StorageError(
                f"epoch history leader_ids must increase: {leader_id} after {out[-1][0]}"
            )
        if out and first < out[-1][1]:
            raise StorageError(
                f"epoch history first WAL ids must not decrease: {first} after {out[-1][1]}"
            )
        out.append((leader_id, first))
    return out


def check_batch(entries: Any, max_wal: int) -> list[bytes]:
    """Validate a ``write_wal`` batch against the log's current ``max_wal``.

    Returns the entries' data as ``bytes``.  Costs a few C-level passes over
    the batch (no per-entry Python frame): this sits on the commit path.
    """
    if not isinstance(entries, (list, tuple)):
        raise StorageError(f"write_wal takes a list of WALEntry, got {type(entries).__name__}")
    if not entries:
        return []
    try:
        ids = [e.wal_id for e in entries]
        datas = [e.data for e in entries]
    except AttributeError:
        bad = next(e for e in entries if not isinstance(e, WALEntry))
        raise StorageError(f"write_wal takes WALEntry items, got {type(bad).__name__}") from None
    first = ids[0]
    check_data_batch(first, datas, max_wal)  # the first id, the log's end, the data
    if ids != list(range(first, first + len(ids))):
        at = next(i for i, v in enumerate(ids) if v != first + i)
        raise StorageError(f"WAL ids must be contiguous within a batch: entry {at} has id "
                           f"{ids[at]!r}, expected {first + at}")
    return datas


def check_data_batch(first_id: Any, datas: Any, max_wal: int) -> list[bytes]:
    """``write_wal_data``'s argument check: the same rules as
    :func:`check_batch` for ids ``first_id..`` without WALEntry objects."""
    if isinstance(first_id, bool) or not isinstance(first_id, int) or first_id < 1:
        raise StorageError(f"WAL ids start at 1; got {first_id!r}")
    if not isinstance(datas, list):
        raise StorageError(f"write_wal_data takes a list of bytes, got {type(datas).__name__}")
    if max_wal and datas and first_id != max_wal + 1:
        kind = "gap" if first_id > max_wal + 1 else "duplicate or decreasing id"
        raise StorageError(f"WAL ids must be contiguous: batch starts at {first_id}, "
                           f"log ends at {max_wal} ({kind})")
    if first_id + len(datas) - 1 >= 2**63:
        raise StorageError("WAL ids must be below 2**63")
    try:
        b"".join(datas)  # every item bytes-like, in one C-level pass
    except TypeError:
        bad = next(i for i, d in enumerate(datas)
                   if not isinstance(d, (bytes, bytearray, memoryview)))
        raise StorageError(f"WALEntry {first_id + bad} data must be bytes, "
                           f"got {type(datas[bad]).__name__}") from None
    return datas


def check_read(start_id: Any, max_count: Any) -> None:
    check_id(start_id, "start_id", 1)
    check_id(max_count, "max_count", 0)


def datetime_to_ns(t: Any) -> int:
    if not isinstance(t, datetime):
        raise StorageError(f"truncate_wal_before_time takes a datetime, got {type(t).__name__}")
    return int(t.timestamp() * 1e9)


def entries_from(first_id: int, datas: Sequence[bytes]) -> list[WALEntry]:
    """Build WALEntry objects for consecutive ids (one C-level pass)."""
    return list(map(WALEntry, range(first_id, first_id + len(datas)), datas))


class BaseStorage(Storage):
    """Metadata handling and argument checks common to every Storage.

    Subclasses implement ``_append`` (a checked batch), the other WAL
    methods and ``_save_meta`` (make ``self._meta`` durable), and may
    override ``_check_open``.
    """

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self._lock = threading.RLock()
        self._meta: dict[str, Any] = dict(EMPTY_META)
        if meta:
            self._meta.update(meta)

    # subclasses -------------------------------------------------------------
    def _save_meta(self) -> None:
        raise NotImplementedError

    def _append(self, first_id: int, datas: list[bytes], payload: bytes | None = None) -> None:
        """Append a batch already checked against ``max_wal()`` (``payload``:
        ``datas`` msgpack-packed, if the caller has it).  Lock held."""
        raise NotImplementedError

    def _max_wal(self) -> int:
        """``max_wal()`` with the lock held."""
        return self.max_wal()

    def _check_open(self) -> None:
        """Raise StorageError if the storage was closed."""

    # the WAL: checks shared by every implementation ------------------------------
    def write_wal(self, entries: list[WALEntry]) -> None:
        with self._lock:
            self._check_open()
            datas = check_batch(entries, self.max_wal())
            if datas:
                self._append(entries[0].wal_id, datas)

    def write_wal_data(self, first_id: int, datas: list[bytes], payload: bytes | None = None
                       ) -> None:
        with self._lock:
            self._check_open()
            check_data_batch(first_id, datas, self._max_wal())
            if datas:
                self._append(first_id, datas, payload)

    def read_wal(self, start_id: int, max_count: int) -> list[WALEntry]:
        return entries_from(start_id, self.read_wal_data(start_id, max_count))

    def _set(self, key: str, value: Any) -> None:
        with self._lock:
            if self._meta[key] == value:
                return
            old = self._meta[key]
            self._meta[key] = value
            try:
                self._save_meta()
            except BaseException:
                self._meta[key] = old
                raise

    # metadata -------------------------------------------------------------
    def address(self) -> str:
        return self._meta["address"]

    def set_address(self, addr: str) -> None:
        self._set("address", check_str(addr, "address"))

    def role(self) -> NodeRole:
        return NodeRole(self._meta["role"])

    def set_role(self, role: NodeRole) -> None:
        self._set("role", int(check_role(role)))

    def leader_id(self) -> int:
        return self._meta["leader_id"]

    def set_leader_id(self, leader_id: int) -> None:
        check_id(leader_id, "leader_id")
        with self._lock:
            if leader_id < self._meta["leader_id"]:
                raise StorageError(
                    f"leader_id must not decrease: stored {self._meta['leader_id']}, "
                    f"got {leader_id}"
                )
            self._set("leader_id", leader_id)

    def follower_address(self) -> str:
        return self._meta["follower_address"]

    def set_follower_address(self, addr: str) -> None:
        self._set("follower_address", check_str(addr, "follower address"))

    def max_applied_wal(self) -> int:
        return self._meta["max_applied_wal"]

    def set_max_applied_wal(self, wal_id: int) -> None:
        check_id(wal_id, "max_applied_wal")
        # A hint, persisted lazily (see Storage): no durable write per batch.
        self._meta["max_applied_wal"] = wal_id

    def epoch_history(self) -> list[tuple[int, int]]:
        return [tuple(x) for x in self._meta["epoch_history"]]  # type: ignore[misc]

    def set_epoch_history(self, history: list[tuple[int, int]]) -> None:
        self._set("epoch_history", [list(x) for x in check_epoch_history(history)])


class MemoryStorage(BaseStorage):
    """Storage in memory: same contract as FileStorage, nothing survives the
    process.  Truncation is exact (no segment granularity)."""

    def __init__(self, clock: Any = time.time_ns, checkpoints: bool = False) -> None:
        super().__init__()
        self._clock = clock
        # checkpoints in memory too: for a storage that outlives its node
        # (the simulation restarts nodes over the same storage)
        self.checkpoints = MemoryCheckpoints() if checkpoints else None
        self._first = 0  # wal id of _datas[0]
        self._datas: list[bytes] = []
        self._times: list[int] = []  # per-entry write time, ns

    def _save_meta(self) -> None:
        pass

    def _append(self, first_id: int, datas: list[bytes], payload: bytes | None = None) -> None:
        if not self._datas:
            self._first = first_id
        self._datas.extend(map(bytes, datas))  # own copies of bytearray/memoryview
        # Keep times non-decreasing even if the wall clock steps back, so
        # "written before t" is always a prefix of the log.
        now = max(self._clock(), self._times[-1] if self._times else 0)
        self._times.extend([now] * len(datas))

    def max_wal(self) -> int:
        with self._lock:
            return self._first + len(self._datas) - 1 if self._datas else 0

    def min_wal(self) -> int:
        with self._lock:
            return self._first if self._datas else 0

    def clear_wal(self) -> None:
        with self._lock:
            self._datas.clear()
            self._times.clear()
            self._first = 0

    def _drop_before_index(self, n: int) -> None:
        n = min(n, len(self._datas) - 1)  # never the newest entry
        if n > 0:
            del self._datas[:n]
            del self._times[:n]
            self._first += n

    def truncate_wal_before_id(self, wal_id: int) -> None:
        check_id(wal_id, "wal_id")
        with self._lock:
            if self._datas:
                self._drop_before_index(wal_id - self._first)

    def truncate_wal_before_time(self, t: datetime) -> None:
        ns = datetime_to_ns(t)
        with self._lock:
            self._drop_before_index(bisect.bisect_left(self._times, ns))

    def read_wal_data(self, start_id: int, max_count: int) -> list[bytes]:
        check_read(start_id, max_count)
        with self._lock:
            if not self._datas or start_id > self.max_wal():
                return []
            if start_id < self._first:
                raise WALTruncated(
                    f"WAL entry {start_id} is no longer held (oldest is {self._first})",
                    start_id, self._first)
            i = start_id - self._first
            return self._datas[i:i + max_count]
