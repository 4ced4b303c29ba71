"""Storage contract, checked on both implementations, and FileStorage's own
duties (persistence, locking, fsync policy, metadata safety)."""

from __future__ import annotations

import os
import time
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from zrepl import (Config, CorruptStorage, FileStorage, MemoryStorage, NodeRole, StorageError,
                   StorageLocked, WALEntry, WALTruncated)
from zrepl.storage.wal import list_segments

from .helpers import wait_for


class FakeClock:
    def __init__(self, start: int = 1_700_000_000 * 10**9):
        self.now = start

    def __call__(self) -> int:
        return self.now


def batch(first: int, n: int, tag: bytes = b"e") -> list[WALEntry]:
    return [WALEntry(i, tag + str(i).encode()) for i in range(first, first + n)]


@pytest.fixture(params=["memory", "file"])
def store(request, data_dir):
    if request.param == "memory":
        s = MemoryStorage()
    else:
        s = FileStorage(data_dir, config=Config(fsync="off", segment_bytes=512))
    yield s
    s.close()


# --- WAL contract ---------------------------------------------------------------


def test_empty_log_reports_zero(store):
    assert (store.min_wal(), store.max_wal(), store.max_applied_wal()) == (0, 0, 0)
    assert store.read_wal(1, 10) == []


def test_write_then_read_back(store):
    store.write_wal(batch(1, 5))
    store.write_wal(batch(6, 3))
    assert (store.min_wal(), store.max_wal()) == (1, 8)
    assert store.read_wal(1, 100) == batch(1, 5) + batch(6, 3)
    assert store.read_wal(4, 3) == batch(4, 3)
    assert store.read_wal(8, 5) == batch(8, 1)
    assert store.read_wal(9, 5) == []
    assert store.read_wal(3, 0) == []


def test_empty_log_accepts_any_first_id(store):
    store.write_wal(batch(1000, 2))
    assert (store.min_wal(), store.max_wal()) == (1000, 1001)


@pytest.mark.parametrize("entries, message", [
    (batch(7, 2), "gap"),
    (batch(5, 2), "duplicate or decreasing"),
    (batch(3, 2), "duplicate or decreasing"),
    ([WALEntry(6, b"a"), WALEntry(8, b"b")], "entry 1 has id 8, expected 7"),
    ([WALEntry(6, b"a"), WALEntry(6, b"b")], "entry 1 has id 6, expected 7"),
    ([WALEntry(6, "text")], "data must be bytes"),
    ([WALEntry(6, b"a"), "nope"], "WALEntry items"),
    ("not a list", "list of WALEntry"),
])
def test_bad_batches_are_refused_and_write_nothing(store, entries, message):
    store.write_wal(batch(1, 5))
    with pytest.raises(StorageError, match=message):
        store.write_wal(entries)
    assert store.max_wal() == 5
    assert store.read_wal(1, 10) == batch(1, 5)
    store.write_wal(batch(6, 1))  # the log is still usable
    assert store.max_wal() == 6


def test_first_id_must_be_positive(store):
    with pytest.raises(StorageError, match="start at 1"):
        store.write_wal([WALEntry(0, b"x")])


def test_bytes_like_data_is_accepted(store):
    buf = bytearray(b"ab")
    store.write_wal([WALEntry(1, buf), WALEntry(2, memoryview(b"cd"))])
    buf[0] = ord("X")  # the caller reusing its buffer changes nothing stored
    got = [e.data for e in store.read_wal(1, 2)]
    assert got == [b"ab", b"cd"] and all(type(d) is bytes for d in got)


@pytest.mark.parametrize("args, message", [
    ((0, 5), "start_id must be >= 1"),
    ((1, -1), "max_count must be >= 0"),
    (("1", 5), "start_id must be an int"),
    ((True, 5), "start_id must be an int"),
])
def test_read_wal_bad_arguments(store, args, message):
    with pytest.raises(StorageError, match=message):
        store.read_wal(*args)


def test_read_before_min_raises_truncated(store):
    store.write_wal(batch(10, 5))
    with pytest.raises(WALTruncated, match="no longer held") as info:
        store.read_wal(9, 1)
    assert info.value.min_wal == 10


def test_truncate_before_id_keeps_what_is_asked_and_the_newest(store):
    for first in range(1, 200, 10):
        store.write_wal(batch(first, 10, b"x" * 20))
    store.truncate_wal_before_id(100)
    assert 1 <= store.min_wal() <= 100
    assert store.read_wal(100, 1000) == batch(100, 101, b"x" * 20)
    store.truncate_wal_before_id(10**6)  # past the end: the newest entry stays
    assert store.max_wal() == 200
    assert store.read_wal(200, 5) == batch(200, 1, b"x" * 20)
    store.write_wal(batch(201, 1))  # and ids continue
    assert store.max_wal() == 201


def test_truncate_bad_arguments(store):
    with pytest.raises(StorageError, match="wal_id must be an int"):
        store.truncate_wal_before_id("5")
    with pytest.raises(StorageError, match="takes a datetime"):
        store.truncate_wal_before_time(12345)


def test_clear_then_restart_anywhere(store):
    store.write_wal(batch(1, 50))
    store.clear_wal()
    assert (store.min_wal(), store.max_wal()) == (0, 0)
    assert store.read_wal(1, 10) == []
    store.write_wal(batch(7, 3))
    assert store.read_wal(7, 10) == batch(7, 3)


def test_truncate_before_time(data_dir):
    for make in (lambda c: MemoryStorage(clock=c),
                 lambda c: FileStorage(data_dir, config=Config(fsync="off", segment_bytes=64),
                                       clock=c)):
        clock = FakeClock()
        s = make(clock)
        for first in range(1, 41, 4):
            s.write_wal(batch(first, 4))
            clock.now += 10**9  # one second between batches
        cut = datetime.fromtimestamp((clock.now - 5 * 10**9) / 1e9, tz=timezone.utc)
        s.truncate_wal_before_time(cut)
        # Batches written at t0..t0+9s; cut at t0+5s: the last 5 batches stay.
        assert 1 < s.min_wal() <= 21
        assert s.read_wal(21, 100) == batch(21, 20)
        s.truncate_wal_before_time(cut + timedelta(days=1))
        assert s.max_wal() == 40 and s.min_wal() <= 40
        s.close()


# --- metadata --------------------------------------------------------------------


def test_metadata_setters(store):
    store.set_address("tcp://127.0.0.1:7400")
    store.set_role(NodeRole.FORWARDER)
    store.set_leader_id(4)
    store.set_follower_address("tcp://127.0.0.1:7401")
    store.set_max_applied_wal(12)
    store.set_epoch_history([(1, 1), (4, 90)])
    assert store.address() == "tcp://127.0.0.1:7400"
    assert store.role() is NodeRole.FORWARDER
    assert store.leader_id() == 4
    assert store.follower_address() == "tcp://127.0.0.1:7401"
    assert store.max_applied_wal() == 12
    assert store.epoch_history() == [(1, 1), (4, 90)]


@pytest.mark.parametrize("call, message", [
    (lambda s: s.set_role(7), "role must be one of"),
    (lambda s: s.set_role("LEADER"), "role must be one of"),
    (lambda s: s.set_leader_id(-1), "leader_id must be >= 0"),
    (lambda s: s.set_leader_id(1.5), "leader_id must be an int"),
    (lambda s: s.set_address(None), "address must be a str"),
    (lambda s: s.set_follower_address(b"x"), "follower address must be a str"),
    (lambda s: s.set_max_applied_wal(-3), "max_applied_wal must be >= 0"),
    (lambda s: s.set_epoch_history([(2, 1), (2, 5)]), "leader_ids must increase"),
    (lambda s: s.set_epoch_history([(1, 9), (2, 5)]), "must not decrease"),
    (lambda s: s.set_epoch_history([(1,)]), "items are"),
    (lambda s: s.set_epoch_history("x"), "must be a list"),
])
def test_metadata_bad_arguments(store, call, message):
    with pytest.raises(StorageError, match=message):
        call(store)


def test_leader_id_never_decreases(store):
    store.set_leader_id(5)
    with pytest.raises(StorageError, match="must not decrease: stored 5, got 4"):
        store.set_leader_id(4)
    assert store.leader_id() == 5
    store.set_leader_id(5)
    store.set_leader_id(6)
    assert store.leader_id() == 6


# --- FileStorage only ---------------------------------------------------------------


def test_file_storage_survives_reopen(data_dir):
    cfg = Config(fsync="always", segment_bytes=200)
    with FileStorage(data_dir, config=cfg) as s:
        for first in range(1, 101, 10):
            s.write_wal(batch(first, 10))
        s.set_role(NodeRole.LEADER)
        s.set_leader_id(3)
        s.set_epoch_history([(3, 1)])
        s.set_max_applied_wal(100)
    assert len(list_segments(data_dir / "wal")) > 1
    with FileStorage(data_dir, config=cfg) as s:
        assert (s.min_wal(), s.max_wal()) == (1, 100)
        assert s.read_wal(1, 1000) == batch(1, 100)
        assert (s.role(), s.leader_id(), s.epoch_history(), s.max_applied_wal()) == \
            (NodeRole.LEADER, 3, [(3, 1)], 100)
        s.write_wal(batch(101, 1))


def test_segments_rotate_and_truncation_removes_files(data_dir):
    with FileStorage(data_dir, config=Config(fsync="off", segment_bytes=256)) as s:
        for first in range(1, 301, 10):
            s.write_wal(batch(first, 10))
        before = len(list_segments(data_dir / "wal"))
        assert before > 5
        s.truncate_wal_before_id(250)
        after = list_segments(data_dir / "wal")
        assert len(after) < before
        assert after[0][0] == s.min_wal() <= 250


def test_second_opener_in_another_process_gets_a_clear_error(data_dir):
    with FileStorage(data_dir):
        code = ("import sys, zrepl\n"
                "try:\n    zrepl.FileStorage(sys.argv[1])\n"
                "except zrepl.StorageLocked as e:\n    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(data_dir)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert f"locked by pid {os.getpid()}" in proc.stdout
    # Released on close: opening again works.
    FileStorage(data_dir).close()


def test_second_opener_in_same_process_is_refused(data_dir):
    with FileStorage(data_dir):
        with pytest.raises(StorageLocked):
            FileStorage(data_dir)


def test_corrupt_metadata_is_refused_not_reset(data_dir):
    with FileStorage(data_dir) as s:
        s.set_leader_id(9)
    (data_dir / "meta.json").write_text('{"format": 1, "leader_id": ')
    with pytest.raises(CorruptStorage, match="meta.json is unreadable"):
        FileStorage(data_dir)
    (data_dir / "meta.json").write_text('{"format": 1, "leader_id": -4}')
    with pytest.raises(CorruptStorage, match="leader_id"):
        FileStorage(data_dir)
    # The lock was released by the failed opens.
    (data_dir / "meta.json").unlink()
    FileStorage(data_dir).close()


def test_leftover_temp_metadata_is_ignored(data_dir):
    with FileStorage(data_dir) as s:
        s.set_leader_id(2)
    (data_dir / ".meta.json.tmp.12345").write_text("half written")
    with FileStorage(data_dir) as s:
        assert s.leader_id() == 2


def test_bad_fsync_policy_and_path(data_dir):
    with pytest.raises(StorageError, match="fsync must be one of"):
        FileStorage(data_dir, fsync="sometimes")
    f = data_dir / "plainfile"
    f.write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        FileStorage(f)


def test_closed_storage_refuses_calls(data_dir):
    s = FileStorage(data_dir)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        s.write_wal(batch(1, 1))
    with pytest.raises(StorageError, match="closed"):
        s.read_wal(1, 1)
    with pytest.raises(StorageError, match="closed"):
        s.set_leader_id(3)


def test_max_applied_wal_is_persisted_lazily_on_close(data_dir):
    with FileStorage(data_dir) as s:
        s.write_wal(batch(1, 3))
        s.set_leader_id(1)
        s.set_max_applied_wal(3)
        assert b'"max_applied_wal": 0' in (data_dir / "meta.json").read_bytes()
    assert b'"max_applied_wal": 3' in (data_dir / "meta.json").read_bytes()


class FsyncCounter:
    def __init__(self, real):
        self.real = real
        self.calls = 0

    def __call__(self, fd):
        self.calls += 1
        return self.real(fd)


@pytest.fixture
def fsyncs(monkeypatch):
    counter = FsyncCounter(os.fsync)
    monkeypatch.setattr(os, "fsync", counter)
    return counter


def test_fsync_always_syncs_every_batch(data_dir, fsyncs):
    with FileStorage(data_dir, fsync="always") as s:
        s.write_wal(batch(1, 1))
        n = fsyncs.calls
        for first in range(2, 12):
            s.write_wal(batch(first, 1))
        assert fsyncs.calls - n == 10


def test_fsync_off_never_syncs_the_wal(data_dir, fsyncs):
    with FileStorage(data_dir, fsync="off") as s:
        s.write_wal(batch(1, 1))
        n = fsyncs.calls
        for first in range(2, 200):
            s.write_wal(batch(first, 1))
        assert fsyncs.calls == n
    assert fsyncs.calls == n  # not even on close


def test_fsync_batch_syncs_past_the_byte_bound_and_on_close(data_dir, fsyncs):
    cfg = Config(fsync="batch", fsync_interval=3600, fsync_bytes=1000)
    with FileStorage(data_dir, config=cfg) as s:
        s.write_wal(batch(1, 1))
        n = fsyncs.calls  # creating the first segment fsyncs the directory
        s.write_wal(batch(2, 1, b"x" * 100))
        assert fsyncs.calls == n  # under both bounds: nothing yet
        s.write_wal(batch(3, 1, b"x" * 1000))
        assert fsyncs.calls == n + 1  # past fsync_bytes: in the writer
        s.write_wal(batch(4, 1))
        m = fsyncs.calls
    assert fsyncs.calls == m + 1  # close flushes


def test_fsync_batch_flusher_syncs_within_the_interval(data_dir, fsyncs):
    cfg = Config(fsync="batch", fsync_interval=0.05, fsync_bytes=10**9)
    with FileStorage(data_dir, config=cfg) as s:
        n = fsyncs.calls
        s.write_wal(batch(1, 1))
        wait_for(lambda: fsyncs.calls > n + 1, timeout=10, what="first background fsync")
        n = fsyncs.calls
        s.write_wal(batch(2, 1))
        assert fsyncs.calls == n  # not in the writer
        wait_for(lambda: fsyncs.calls > n, timeout=10, what="background fsync")


def test_a_failed_fsync_keeps_the_batch_and_takes_no_more_writes(tmp_path, monkeypatch):
    """EIO from fsync after the write: the batch is in the log (the engine
    then applies it so the App equals the log), the error is a
    StorageError, and the WAL refuses further writes until reopened - a
    later fsync could "succeed" without the pages the kernel dropped."""
    st = FileStorage(tmp_path / "d", fsync="always")
    try:
        st.write_wal_data(1, [b"a"])

        def eio(fd):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(os, "fsync", eio)
        with pytest.raises(StorageError, match="fsync failed"):
            st.write_wal_data(2, [b"b"])
        monkeypatch.undo()
        assert st.max_wal() == 2 and st.read_wal_data(2, 1) == [b"b"]
        assert "fsync failed" in st.wal_broken
        with pytest.raises(StorageError, match="unusable"):
            st.write_wal_data(3, [b"c"])
    finally:
        st.close()
    st = FileStorage(tmp_path / "d", fsync="always")  # a restart reads back what is there
    try:
        assert st.max_wal() == 2 and not st.wal_broken
        st.write_wal_data(3, [b"c"])
    finally:
        st.close()


def test_a_background_fsync_that_keeps_failing_is_retried_with_backoff(data_dir, monkeypatch,
                                                                       caplog):
    """Issue 12: out of file descriptors, the flusher logged 29,404 errors
    in 2.7 s (the dup before its fsync failed, the data stayed dirty, and it
    retried at once).  It now logs the first failure once and waits longer
    before each retry."""
    attempts = []

    def emfile(fd):
        attempts.append(time.monotonic())
        raise OSError(24, "Too many open files")
    cfg = Config(fsync="batch", fsync_interval=0.01, fsync_bytes=10**9)
    s = FileStorage(data_dir, config=cfg)
    try:
        s.write_wal(batch(1, 1))
        s.write_wal(batch(2, 1))
        monkeypatch.setattr(os, "dup", emfile)
        wait_for(lambda: len(attempts) >= 5, timeout=10, what="five background attempts")
        monkeypatch.undo()
    finally:
        with caplog.at_level("ERROR"):
            try:
                s.close()
            except StorageError:
                pass
    # backing off: at least 0.01 + 0.02 + 0.04 + 0.08 s between the first five
    # (a lower bound: load can only stretch it; without backoff it was 0.5 ms)
    assert attempts[4] - attempts[0] >= 0.15, [b - a for a, b in zip(attempts, attempts[1:])]
    errors = [r for r in caplog.records if "background fsync failed" in r.getMessage()
              and r.levelname == "ERROR"]
    assert len(errors) == 1
