"""zrepl.SharedStore: the LMDB store itself, its generations, and readers
in this process and in others (issue 13)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from workers.kv import KV, LocalReader
from zrepl import SharedReader, SharedStore, StorageError, StorageLocked, Timeout
from zrepl.storage.shared import MAX_KEY_BYTES

from .helpers.cluster import ROOT


def batch(store: SharedStore, wal_id: int | None, *ops: tuple) -> None:
    def run() -> None:
        for op in ops:
            if op[0] == "put":
                store.put(op[1], op[2])
            elif op[0] == "delete":
                store.delete(op[1])
            else:
                store.clear()
    store.run_batch(run, wal_id)


@pytest.fixture(params=["lmdb", "memory"])
def store(request, data_dir):
    s = SharedStore()
    if request.param == "lmdb":
        s.open(data_dir / "shared")
    else:
        s.open_memory()
    yield s
    s.close()


def test_get_put_delete_scan_in_one_batch_and_after(store):
    def run() -> list:
        store.put(b"a1", b"x")
        store.put(b"a2", b"y")
        store.put(b"b1", b"z")
        seen = store.get(b"a1")  # a batch sees its own writes
        gone = store.delete(b"a2")
        return [seen, gone, store.delete(b"nope")]
    assert store.run_batch(run, 3) == [b"x", True, False]
    assert store.wal_id == 3
    assert store.get(b"a1") == b"x" and store.get(b"a2") is None
    assert store.scan(b"a") == [(b"a1", b"x")]
    assert store.scan(b"", 1) == [(b"a1", b"x")]
    assert [k for k, _ in store.items()] == [b"a1", b"b1"]


def test_keys_and_values_outside_the_limits_are_refused_before_anything_is_written(store):
    for key, value, match in ((b"", b"v", "1..511"), (b"k" * (MAX_KEY_BYTES + 1), b"v", "1..511"),
                              ("str", b"v", "bytes"), (b"k", b"v" * (store.max_value_bytes + 1),
                                                       "over the limit")):
        with pytest.raises(ValueError, match=match):
            batch(store, 1, ("put", key, value))
    assert store.items() is not None and list(store.items()) == []


def test_a_failed_batch_leaves_the_lmdb_store_as_it_was(data_dir):
    store = SharedStore().open(data_dir / "s")
    try:
        batch(store, 1, ("put", b"k", b"1"))
        with pytest.raises(ZeroDivisionError):
            store.run_batch(lambda: (store.put(b"k", b"2"), store.put(b"j", b"2"), 1 / 0), 2)
        assert store.get(b"k") == b"1" and store.get(b"j") is None and store.wal_id == 1
    finally:
        store.close()


def test_a_full_map_grows_and_the_batch_is_run_again(data_dir):
    store = SharedStore().open(data_dir / "s", map_size=256 * 1024)
    try:
        big = b"v" * 1000
        for i in range(10):
            batch(store, i + 1, *[("put", b"%d-%d" % (i, j), big) for j in range(100)])
        assert store.map_size > 256 * 1024
        assert len(list(store.items())) == 1000 and store.wal_id == 10
    finally:
        store.close()


def test_a_group_of_batches_is_seen_by_readers_only_when_it_ends_and_then_whole(data_dir):
    store = SharedStore().open(data_dir / "s")
    reader = SharedReader(data_dir / "s")
    try:
        batch(store, 1, ("put", b"k", b"0"))
        store.begin_group()
        batch(store, 2, ("put", b"k", b"1"))
        batch(store, 3, ("put", b"j", b"1"))
        assert store.get(b"k") == b"1"  # the writer sees its own group
        assert reader.get(b"k") == (b"0", 1) and reader.get(b"j") == (None, 1)
        store.end_group()
        assert reader.get(b"k") == (b"1", 3) and reader.get(b"j") == (b"1", 3)
        assert store.wal_id == 3
        store.end_group()  # nothing open: nothing happens
        assert store.wal_id == 3
    finally:
        reader.close()
        store.close()


def test_a_batch_that_fails_in_a_group_keeps_the_group_before_it(data_dir):
    store = SharedStore().open(data_dir / "s")
    try:
        store.begin_group()
        batch(store, 1, ("put", b"a", b"1"))
        with pytest.raises(ZeroDivisionError):
            store.run_batch(lambda: (store.put(b"b", b"2"), 1 / 0), 2)
        batch(store, 3, ("put", b"c", b"3"))
        store.end_group()
        assert [k for k, _ in store.items()] == [b"a", b"c"] and store.wal_id == 3
    finally:
        store.close()


def test_a_group_that_fills_the_map_is_grown_and_redone_with_the_same_answers(data_dir):
    store = SharedStore().open(data_dir / "s", map_size=256 * 1024)
    try:
        big = b"v" * 1000
        store.begin_group()
        answers = [store.run_batch(lambda i=i: [store.put(b"%d-%d" % (i, j), big)
                                                for j in range(100)] and [i], i + 1)
                   for i in range(10)]
        store.end_group()
        assert answers == [[i] for i in range(10)]
        assert store.map_size > 256 * 1024
        assert len(list(store.items())) == 1000 and store.wal_id == 10
    finally:
        store.close()


def test_a_group_redone_that_answers_differently_breaks_the_store(data_dir):
    store = SharedStore().open(data_dir / "s", map_size=128 * 1024)
    calls = []

    def flaky() -> list:
        calls.append(1)
        for j in range(60):
            store.put(b"%d-%d" % (len(calls), j), b"v" * 1000)
        return [len(calls)]  # a different answer each time it runs
    try:
        store.begin_group()
        store.run_batch(flaky, 1)
        with pytest.raises(StorageError, match="not deterministic"):
            for i in range(2, 10):
                store.run_batch(flaky, i)
            store.end_group()
        assert store.broken
        with pytest.raises(StorageError):
            batch(store, 20, ("put", b"x", b"y"))
    finally:
        store.close()


def test_the_map_does_not_grow_under_an_open_snapshot_it_says_so(data_dir):
    store = SharedStore().open(data_dir / "s", map_size=128 * 1024)
    try:
        snap = store.items()
        with pytest.raises(StorageError, match="cannot grow while a snapshot"):
            batch(store, 1, *[("put", b"%d" % j, b"v" * 1000) for j in range(400)])
        snap.close()
        batch(store, 1, *[("put", b"%d" % j, b"v" * 1000) for j in range(400)])
    finally:
        store.close()


def test_put_outside_a_batch_is_refused(data_dir):
    store = SharedStore().open(data_dir / "s")
    try:
        with pytest.raises(StorageError, match="inside the engine's write transaction"):
            store.put(b"k", b"v")
    finally:
        store.close()


def test_one_writer_per_directory(data_dir):
    a = SharedStore().open(data_dir / "s")
    try:
        with pytest.raises(StorageLocked):
            SharedStore().open(data_dir / "s")
    finally:
        a.close()


def test_a_rebuild_is_seen_by_readers_only_once_published(data_dir):
    store = SharedStore().open(data_dir / "s")
    reader = SharedReader(data_dir / "s")
    try:
        batch(store, 5, ("put", b"k", b"old"), ("put", b"gone", b"x"))
        assert reader.get(b"k") == (b"old", 5)
        store.hold()
        store.clear()  # a new generation
        batch(store, None, ("put", b"k", b"new"))  # state entries: no WAL id
        assert store.get(b"k") == b"new"  # the writer reads what it builds
        assert reader.get(b"k") == (b"old", 5) and reader.get(b"gone") == (b"x", 5)
        store.publish(3)  # (a state sync to an older WAL id: a discarded tail)
        assert reader.get(b"k") == (b"new", 3) and reader.get(b"gone") == (None, 3)
        assert len([p for p in (data_dir / "s").iterdir() if p.name.startswith("g")]) == 1
    finally:
        reader.close()
        store.close()


def test_a_restarted_writer_keeps_the_published_state_until_it_publishes_another(data_dir):
    first = SharedStore().open(data_dir / "s")
    batch(first, 7, ("put", b"k", b"v7"))
    first.close()  # (as a SIGKILL would: the generation stays)
    reader = SharedReader(data_dir / "s")
    second = SharedStore().open(data_dir / "s")
    try:
        assert second.wal_id == 7 and reader.get(b"k") == (b"v7", 7)
        second.hold()
        second.clear()
        batch(second, None, ("put", b"k", b"rebuilt"))
        assert reader.get(b"k") == (b"v7", 7)  # nothing half-built is ever current
        second.publish(9)
        assert reader.get(b"k") == (b"rebuilt", 9)  # the old generation told it to move on
    finally:
        reader.close()
        second.close()


def test_min_wal_id_waits_for_the_writer_and_times_out_when_it_does_not_come(data_dir):
    store = SharedStore().open(data_dir / "s")
    reader = SharedReader(data_dir / "s", wait_timeout=0.2)
    try:
        batch(store, 1, ("put", b"k", b"1"))
        with pytest.raises(Timeout, match="at WAL id 1, not yet 2"):
            reader.get(b"k", min_wal_id=2)
        batch(store, 2, ("put", b"k", b"2"))
        assert reader.get(b"k", min_wal_id=2) == (b"2", 2)
    finally:
        reader.close()
        store.close()


def test_a_reader_in_another_process_sees_the_writers_batches(data_dir):
    kv = KV(SharedStore().open(data_dir / "shared"))
    try:
        kv.store.run_batch(lambda: kv.apply([("set", "k", 1), ("set", b"k", "b")]), 2)
        kv.store.publish(2)
        script = textwrap.dedent(f"""
            import sys
            from workers.kv import LocalReader
            r = LocalReader({str(data_dir)!r})
            print(r.get("k"), r.get(b"k"), r.wal_id, flush=True)
            sys.stdin.readline()
            print(r.get("k", min_wal_id=3), r.wal_id, r.scan(""), flush=True)
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().split() == ["1", "b", "2"]
            kv.store.run_batch(lambda: kv.apply([("incr", "k", 41)]), 3)
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "42 3 [('k', 42)]"
        finally:
            proc.stdin.close()
            proc.wait(10)
        assert proc.returncode == 0
    finally:
        kv.store.close()


def test_local_reader_without_a_store_says_what_is_missing(data_dir):
    with pytest.raises(StorageError, match="no shared state"):
        LocalReader(str(data_dir)).get("k")


def test_kv_refuses_a_key_over_the_store_limit_when_encoded_and_answers_too_large_alike():
    from workers.kv import TOO_LARGE, encode
    from zrepl import WALEntry
    from zrepl.storage.shared import MAX_VALUE_BYTES
    kv = KV()
    with pytest.raises(ValueError, match="at most 510 bytes"):
        kv.encode_cmd(("set", "k" * 511, 1), WALEntry(1))
    with pytest.raises(ValueError, match="at most 510 bytes"):
        encode(("set", "é" * 256, 1))  # 512 bytes of UTF-8
    kv.encode_cmd(("set", "k" * 510, 1), WALEntry(1))  # the longest that fits
    huge = b"x" * MAX_VALUE_BYTES
    assert kv.apply([("set", "big", huge), ("cas", "k", None, huge), ("set", "ok", 1)]) == \
        [TOO_LARGE, TOO_LARGE, 0]
    assert kv.data == {"ok": 1}


@pytest.mark.timeout(20)
def test_a_reader_asked_for_a_key_lmdb_cannot_hold_answers_absent_and_errors_of_its_own_surface(
        data_dir):
    """(A reader once took any LMDB error as 'the generation was closed
    under me' and reopened forever: a 600-byte key never returned.)"""
    store = SharedStore().open(data_dir / "s")
    reader = SharedReader(data_dir / "s")
    try:
        batch(store, 1, ("put", b"k", b"v"))
        assert reader.get(b"k" * 600) == (None, 1)
        assert reader.get(b"") == (None, 1)
        with pytest.raises(ZeroDivisionError):
            reader.read(lambda txn, db: 1 / 0)
        assert reader.get(b"k") == (b"v", 1)
    finally:
        reader.close()
        store.close()
