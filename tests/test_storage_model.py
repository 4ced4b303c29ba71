"""FileStorage and MemoryStorage side by side under random operation
sequences (write, bad write, truncate by id and time, clear, reopen,
metadata), checked against a plain dict of everything written."""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from zrepl import (Config, FileStorage, MemoryStorage, NodeRole, StorageError, WALEntry,
                   WALTruncated)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        return self.now


def raised(fn):
    try:
        fn()
    except StorageError as exc:
        return type(exc)
    return None


class StorageMachine(RuleBasedStateMachine):
    @initialize(segment_bytes=st.sampled_from([64, 200, 1000, 1 << 20]))
    def open(self, segment_bytes):
        self.dir = Path(tempfile.mkdtemp(prefix="zrepl-model-"))
        self.clock = Clock()
        self.cfg = Config(fsync="off", segment_bytes=segment_bytes)
        self.file = FileStorage(self.dir, config=self.cfg, clock=self.clock)
        self.mem = MemoryStorage(clock=self.clock)
        self.written: dict[int, bytes] = {}  # everything since the last clear

    def teardown(self):
        if hasattr(self, "file"):
            self.file.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def both(self, name, *args):
        results = []
        for s in (self.file, self.mem):
            try:
                results.append(("ok", getattr(s, name)(*args)))
            except StorageError as exc:
                results.append(("err", type(exc)))
        assert results[0] == results[1], f"{name}{args}: file {results[0]} mem {results[1]}"
        return results[0]

    # --- rules ----------------------------------------------------------------
    @rule(n=st.integers(1, 12), size=st.integers(0, 40), start=st.integers(1, 500))
    def write(self, n, size, start):
        first = self.mem.max_wal() + 1 if self.mem.max_wal() else start
        entries = [WALEntry(i, bytes([i % 251]) * size + str(i).encode())
                   for i in range(first, first + n)]
        self.both("write_wal", entries)
        for e in entries:
            self.written[e.wal_id] = e.data

    @rule(n=st.integers(0, 6), start=st.integers(1, 500))
    def write_data(self, n, start):
        """write_wal_data: the same log through the engine's fast path."""
        first = self.mem.max_wal() + 1 if self.mem.max_wal() else start
        datas = [b"d" + str(i).encode() for i in range(first, first + n)]
        self.both("write_wal_data", first, datas)
        for i, d in enumerate(datas):
            self.written[first + i] = d

    @precondition(lambda self: self.mem.max_wal() > 0)
    @rule(offset=st.sampled_from([-2, 0, 2]), bad_type=st.booleans())
    def bad_write_data(self, offset, bad_type):
        first = self.mem.max_wal() + 1 + offset
        datas = [b"x", "str"] if bad_type else [b"x"]
        if offset == 0 and not bad_type:
            return
        assert self.both("write_wal_data", max(first, 1), datas) == ("err", StorageError)

    @precondition(lambda self: self.mem.max_wal() > 0)
    @rule(kind=st.sampled_from(["gap", "dup", "back", "inner", "type"]))
    def bad_write(self, kind):
        top = self.mem.max_wal()
        entries = {
            "gap": [WALEntry(top + 2, b"x")],
            "dup": [WALEntry(top, b"x")],
            "back": [WALEntry(max(1, top - 3), b"x")],
            "inner": [WALEntry(top + 1, b"x"), WALEntry(top + 3, b"y")],
            "type": [WALEntry(top + 1, 42)],
        }[kind]
        assert self.both("write_wal", entries) == ("err", StorageError)

    @rule(delta_ms=st.integers(0, 5000))
    def tick(self, delta_ms):
        self.clock.now += delta_ms * 10**6

    @rule(frac=st.floats(0, 1.2))
    def truncate_before_id(self, frac):
        lo, hi = self.mem.min_wal(), self.mem.max_wal()
        wal_id = int(lo + (hi - lo) * frac)
        self.file.truncate_wal_before_id(wal_id)
        self.mem.truncate_wal_before_id(wal_id)

    @rule(back_ms=st.integers(0, 20000))
    def truncate_before_time(self, back_ms):
        t = datetime.fromtimestamp((self.clock.now - back_ms * 10**6) / 1e9, tz=timezone.utc)
        self.file.truncate_wal_before_time(t)
        self.mem.truncate_wal_before_time(t)

    @rule()
    def clear(self):
        self.both("clear_wal")
        self.written.clear()

    @rule()
    def reopen(self):
        self.file.close()
        self.file = FileStorage(self.dir, config=self.cfg, clock=self.clock)

    @rule(role=st.sampled_from(list(NodeRole)), bump=st.integers(-1, 2),
          addr=st.sampled_from(["", "tcp://127.0.0.1:7400", "ipc:///tmp/x"]))
    def set_meta(self, role, bump, addr):
        self.both("set_role", role)
        self.both("set_leader_id", max(0, self.mem.leader_id() + bump))
        self.both("set_address", addr)
        self.both("set_follower_address", addr[::-1])
        history = self.mem.epoch_history()
        if self.mem.leader_id() > (history[-1][0] if history else 0):
            history.append((self.mem.leader_id(), max(1, self.mem.max_wal())))
            self.both("set_epoch_history", history)

    @rule(frac=st.floats(0, 1))
    def set_applied(self, frac):
        self.both("set_max_applied_wal", int(self.mem.max_wal() * frac))

    @rule(offset=st.integers(-3, 30), count=st.integers(0, 40))
    def read(self, offset, count):
        for s in (self.file, self.mem):
            lo, hi = s.min_wal(), s.max_wal()
            start = max(1, (lo or 1) + offset)
            if lo and start < lo:
                assert raised(lambda: s.read_wal(start, count)) is WALTruncated
                continue
            got = s.read_wal(start, count)
            want = [WALEntry(i, self.written[i]) for i in range(start, min(hi, start + count - 1) + 1)] \
                if lo else []
            assert got == want, f"{type(s).__name__}.read_wal({start}, {count})"

    # --- invariants ------------------------------------------------------------
    @invariant()
    def same_log_bounds(self):
        if not hasattr(self, "file"):
            return
        assert self.file.max_wal() == self.mem.max_wal()
        if self.mem.max_wal() == 0:
            assert self.file.min_wal() == self.mem.min_wal() == 0
        else:
            # FileStorage drops whole segments: it may hold more, never less.
            assert 1 <= self.file.min_wal() <= self.mem.min_wal() <= self.mem.max_wal()

    @invariant()
    def same_metadata(self):
        if not hasattr(self, "file"):
            return
        for name in ("address", "role", "leader_id", "follower_address", "max_applied_wal",
                     "epoch_history"):
            assert getattr(self.file, name)() == getattr(self.mem, name)(), name


StorageMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_storage_model = pytest.mark.timeout(300)(StorageMachine.TestCase)
