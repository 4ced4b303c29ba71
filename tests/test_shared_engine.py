"""Shared state in a running node (issue 13): the engine writes one
transaction per batch, rebuilds the store at restart and during a state
sync without readers ever seeing a half-built state, and reader processes
answer remote reads."""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

import msgpack
import psutil
import pytest

from workers.kv import KV, LocalReader
from zrepl import (Config, FileStorage, FollowerState, MemoryStorage, NodeRole, Replica,
                   SharedReader, Timeout, WALEntry)
from zrepl.core.session import unwrap
from zrepl.storage.shared import shared_root
from zrepl.storage.wal import iter_wal

from .helpers import wait_for
from .helpers.cluster import Cluster, kv_set
from .helpers.inproc import FAST


def generations(data: Path) -> list[str]:
    return sorted(p.name for p in shared_root(data).iterdir() if p.name.startswith("g"))


def replay_wal(data: Path) -> tuple[dict, int]:
    """The KV state the WAL in ``data`` makes, and its last WAL id."""
    kv = KV()
    top = 0
    for kind, first, count, _, datas in iter_wal(data / "wal"):
        assert kind == "record", datas
        app_datas, _ = unwrap(datas)
        kv.apply([kv.decode_cmd(WALEntry(first + i, d)) for i, d in enumerate(app_datas)])
        top = first + count - 1
    return kv.data, top


def writes_by_key(data: Path) -> dict:
    """key -> [(wal_id, value)] of every set in the WAL, in order."""
    out: dict = {}
    for kind, first, _, _, datas in iter_wal(data / "wal"):
        app_datas, _ = unwrap(datas)
        for i, d in enumerate(app_datas):
            op, key, value = msgpack.unpackb(d, raw=False, use_list=False)
            out.setdefault(key, []).append((first + i, value))
    return out


def test_each_batch_is_one_transaction_and_a_restart_rebuilds_into_a_new_generation(data_dir):
    cfg = Config(**FAST)
    storage = FileStorage(data_dir / "n", config=cfg)
    r = Replica(KV(), storage, f"ipc://{data_dir}/n.sock", cfg).start()
    reader = SharedReader.for_data_dir(data_dir / "n")
    try:
        r.set_role(NodeRole.LEADER, 1)
        r.manager.apply_many([("set", f"k{i}", i) for i in range(100)])
        assert reader.get(b"sk7") == (msgpack.packb(7), 100)
        first = generations(data_dir / "n")
        r.stop()
        storage.close()
        assert reader.get(b"sk7")[1] == 100  # a stopped node's state stays readable
        storage = FileStorage(data_dir / "n", config=cfg)
        r = Replica(KV(), storage, f"ipc://{data_dir}/n.sock", cfg).start()
        assert generations(data_dir / "n") != first and len(generations(data_dir / "n")) == 1
        assert reader.get(b"sk7") == (msgpack.packb(7), 100)  # moved to the rebuilt one
        r.manager.apply(("incr", "k7", 1))
        assert reader.get(b"sk7") == (msgpack.packb(8), 101)
    finally:
        reader.close()
        r.stop()
        storage.close()


def test_a_state_sync_on_a_follower_never_shows_a_half_built_state(data_dir):
    """Readers of the follower's store read while a full state sync replaces
    its (divergent) state: every answer is the whole state at the WAL id it
    carries - the old one, or the new one - never a mix."""
    cfg = Config(**{**FAST, "snapshot_batch_entries": 50})
    f_storage = FileStorage(data_dir / "F", config=cfg)
    follower = Replica(KV(), f_storage, f"ipc://{data_dir}/F.sock", cfg).start()
    leader = Replica(KV(), MemoryStorage(), f"ipc://{data_dir}/L.sock", cfg).start()
    stop = threading.Event()
    seen: list[tuple[str, int]] = []
    bad: list[str] = []

    def read() -> None:
        with SharedReader.for_data_dir(data_dir / "F") as reader:
            while not stop.is_set():
                pairs, wal_id = reader.scan(b"s")
                state = {k.decode()[1:]: msgpack.unpackb(v) for k, v in pairs}
                old = {f"old{i}": i for i in range(1, wal_id + 1)}
                new = {f"k{i}": i for i in range(1, wal_id + 1)}
                kind = "old" if state == old else "new" if state == new else ""
                if not kind:
                    bad.append(f"at WAL id {wal_id}: {len(state)} keys, e.g. {sorted(state)[:3]}")
                elif not seen or seen[-1] != (kind, wal_id):
                    seen.append((kind, wal_id))
    try:
        follower.set_role(NodeRole.LEADER, 1)  # its own history: epoch 1, 40 entries
        for i in range(1, 41):
            follower.manager.apply(("set", f"old{i}", i))
        leader.set_role(NodeRole.LEADER, 2)
        leader.manager.apply_many([("set", f"k{i}", i) for i in range(1, 3001)])
        leader.storage.truncate_wal_before_id(3000)  # a state sync is the only way
        thread = threading.Thread(target=read)
        thread.start()
        wait_for(lambda: seen, 10, "a first read")
        follower.set_role(NodeRole.FOLLOWER, 2)
        leader.set_follower(follower.address)
        for i in range(3001, 3201):  # writes go on during the sync
            leader.manager.apply_async(("set", f"k{i}", i))
        wait_for(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS and
                 follower.status().max_applied_wal == 3200, 30, "the follower to catch up")
        wait_for(lambda: seen[-1] == ("new", 3200), 10, "readers to see the end")
        stop.set()
        thread.join(10)
        assert follower.status().extra["state_syncs_received"] == 1
        assert not bad, bad[:5]
        kinds = [k for k, _ in seen]
        assert kinds[0] == "old" and "new" in kinds and \
            kinds.index("new") == len(kinds) - kinds[::-1].index("old")  # old, then only new
        assert [w for k, w in seen if k == "new"] == sorted(w for k, w in seen if k == "new")
        assert len(generations(data_dir / "F")) == 1
    finally:
        stop.set()
        leader.stop()
        follower.stop()
        f_storage.close()
        leader.storage.close()


def test_sigkill_at_random_moments_readers_never_go_back_nothing_stale_after():
    """A node under writes is SIGKILLed at random moments and restarted; a
    LocalReader in this process reads throughout.  Its WAL id never goes
    back; after each restart the store holds exactly what the WAL replays
    to, in one generation."""
    rng = random.Random(13)
    with Cluster() as c:
        node = c.node("A").start()
        node.client.set_role(NodeRole.LEADER, 1)
        stop = threading.Event()
        wal_ids: list[int] = []
        problems: list[str] = []

        def read() -> None:
            reader = LocalReader(str(node.data))
            while not stop.is_set():
                try:
                    value = reader.get("n")
                except Exception as exc:  # noqa: BLE001 - recorded, the test fails on it
                    problems.append(repr(exc))
                    return
                if wal_ids and reader.wal_id < wal_ids[-1]:
                    problems.append(f"WAL id went back from {wal_ids[-1]} to {reader.wal_id}")
                if value is not None and value > reader.wal_id:
                    problems.append(f"n = {value} at WAL id {reader.wal_id}")
                wal_ids.append(reader.wal_id)
            reader.close()

        thread = None
        for round_ in range(4):
            client = c.client(node, retry_for=0.5)
            done = [0]

            def write() -> None:
                try:
                    while True:
                        client.apply(msgpack.packb(("incr", "n", 1)))
                        done[0] += 1
                except Exception:  # noqa: BLE001 - the node was killed
                    pass
            writer = threading.Thread(target=write)
            writer.start()
            target = rng.randrange(20, 300)  # writes before this round's kill
            wait_for(lambda: done[0] >= target, 20, "writes")
            if thread is None:
                thread = threading.Thread(target=read)
                thread.start()
            node.kill(signal.SIGKILL)
            writer.join(10)
            client.close()
            node.start()
            state, top = replay_wal(node.data)
            with LocalReader(str(node.data)) as r:
                assert r.scan("") == sorted(state.items()) and r.wal_id == top, round_
            assert len(generations(node.data)) == 1
        stop.set()
        thread.join(10)
        assert not problems, problems[:5]
        assert len(set(wal_ids)) > 4


def test_four_reader_processes_under_100k_writes():
    """Reader processes answer while the node applies 100,000 writes: no
    torn value, each client's WAL ids never decrease, and a value read at
    WAL id X is the value the WAL gives that key at X."""
    with Cluster() as c:
        node = c.node("A", readers=4).start()
        node.client.set_role(NodeRole.LEADER, 1)
        wait_for(lambda: node.status().extra["readers"] == 4, 20, "4 readers")
        keys = [f"k{i}" for i in range(50)]
        total = 100_000
        stop = threading.Event()
        problems: list[str] = []
        seen: list[tuple[str, object, int]] = []

        def read(seed: int) -> None:
            rng = random.Random(seed)
            client = c.client(node)
            last = 0
            while not stop.is_set():
                key = rng.choice(keys)
                found, value = msgpack.unpackb(
                    client.query(msgpack.packb(("get", key))), raw=False, use_list=False)
                if client.last_wal_id < last:
                    problems.append(f"WAL id went back from {last} to {client.last_wal_id}")
                last = client.last_wal_id
                if found and (type(value) is not tuple or value[1] != "x" * (value[0] % 37)):
                    problems.append(f"torn value {value!r:.80}")
                seen.append((key, value if found else None, last))

        readers = [threading.Thread(target=read, args=(s,)) for s in range(2)]
        for t in readers:
            t.start()
        writer = c.client(node)
        step = 10_000
        for start in range(0, total, step):
            writer.apply_many([kv_set(keys[i % len(keys)], (i, "x" * (i % 37)))
                               for i in range(start, start + step)])
        stop.set()
        for t in readers:
            t.join(30)
        assert not problems, problems[:5]
        engine_served = node.status().extra["queries"]
        node.stop()
        history = writes_by_key(node.data)
        wrong = []
        for key, value, wal_id in seen:
            before = [v for w, v in history.get(key, []) if w <= wal_id]
            expected = before[-1] if before else None
            if value != expected:
                wrong.append((key, value, wal_id, expected))
        assert not wrong, wrong[:5]
        assert len(seen) > 200 and seen[-1][2] > seen[0][2]
        assert engine_served <= 4, f"{engine_served} reads went through the engine"


def test_a_killed_reader_is_replaced_and_none_outlives_a_sigkilled_node():
    with Cluster() as c:
        node = c.node("A", readers=2).start()
        node.client.set_role(NodeRole.LEADER, 1)
        client = c.client(node, retry_for=5.0)
        client.apply(kv_set("k", 1))
        get = msgpack.packb(("get", "k"))
        assert client.query(get) == msgpack.packb([True, 1])

        def readers() -> list[psutil.Process]:
            out = []
            for p in psutil.Process(node.proc.pid).children():
                try:
                    if p.status() != psutil.STATUS_ZOMBIE and "reader" in p.cmdline():
                        out.append(p)
                except psutil.Error:
                    pass  # gone meanwhile
            return out
        wait_for(lambda: len(readers()) == 2, 20, "2 readers")
        victim = readers()[0]
        answers = []
        stop = threading.Event()

        def read() -> None:
            other = c.client(node, retry_for=5.0)
            while not stop.is_set():
                answers.append(other.query(get))

        thread = threading.Thread(target=read)
        thread.start()
        wait_for(lambda: len(answers) > 20, 10, "reads")
        victim.kill()
        wait_for(lambda: len(readers()) == 2 and victim.pid not in {p.pid for p in readers()},
                 20, "the reader to be replaced")
        n = len(answers)
        wait_for(lambda: len(answers) > n + 20, 10, "reads after the restart")
        stop.set()
        thread.join(10)
        assert set(answers) == {msgpack.packb([True, 1])}
        assert "reader process" in node.log_tail() and "restarting" in node.log_tail()

        survivors = readers()
        node.kill(signal.SIGKILL)
        gone, alive = psutil.wait_procs(survivors, timeout=10)
        assert not alive, f"readers outlived the node: {[p.pid for p in alive]}"
        node.start()
        wait_for(lambda: node.status().extra["readers"] == 2, 20, "new readers")
        assert client.query(get) == msgpack.packb([True, 1])
        assert len(generations(node.data)) == 1


def test_read_your_writes_from_a_follower_with_min_wal_id():
    with Cluster() as c:
        a, b = c.node("A").start(), c.node("B", readers=1).start()
        c.leader_with_follower(a, b)
        writer = c.client(a)
        writer.apply(kv_set("k", "mine"))
        wal_id = writer.last_wal_id
        assert wal_id >= 1
        reader = c.client(b, retry_for=1.0)
        get = msgpack.packb(("get", "k"))
        assert reader.query(get, min_wal_id=wal_id) == msgpack.packb([True, "mine"])
        assert reader.last_wal_id >= wal_id
        assert reader.query(get, min_wal_id=wal_id) == msgpack.packb([True, "mine"])  # (readers)
        with pytest.raises(Timeout, match=f"not yet {wal_id + 1000}"):
            reader.query(get, min_wal_id=wal_id + 1000)
        with LocalReader(str(b.data)) as local:
            assert local.get("k", min_wal_id=wal_id) == "mine"


def test_readers_need_a_store_backed_app():
    with Cluster() as c:
        node = c.node("A", app="workers.ledger:Ledger", readers=2)
        node.start(wait=False)
        assert node.proc.wait(30) != 0
        assert "needs an App keeping its state in zrepl.SharedStore" in node.log_tail()


@pytest.fixture
def small_tmpfs(data_dir):
    """A 1 MiB tmpfs (root and mount(8) needed: skipped otherwise)."""
    import os
    import subprocess
    path = data_dir / "small"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_under_the_store_stops_the_node_cleanly_and_a_restart_rebuilds(
        data_dir, small_tmpfs):
    cfg = Config(**{**FAST, "shared_dir": str(small_tmpfs / "kv")})
    storage = FileStorage(data_dir / "n", config=cfg)
    r = Replica(KV(), storage, f"ipc://{data_dir}/n.sock", cfg).start()
    try:
        r.set_role(NodeRole.LEADER, 1)
        value = "v" * 20_000
        with pytest.raises(Exception) as failed:
            for i in range(200):  # 4 MB into 1 MiB
                r.manager.apply(("set", f"k{i}", value))
        assert "No space left on device" in str(failed.value)
        wait_for(r.stopped.is_set, 10, "the node to stop")
        assert "No space left on device" in str(r.crashed)
        with LocalReader(str(data_dir / "n")) as reader:  # the last whole state stays readable
            top = reader.get("k0") and reader.wal_id
            assert top and reader.scan("") == [(f"k{i}", value) for i in
                                               sorted(range(top), key=lambda i: f"k{i}")]
    finally:
        r.stop()
        storage.close()
    cfg = Config(**FAST)  # room again: the store elsewhere
    storage = FileStorage(data_dir / "n", config=cfg)
    r = Replica(KV(), storage, f"ipc://{data_dir}/n.sock", cfg).start()
    try:
        state, wal_top = replay_wal(data_dir / "n")
        assert r.app.data == state and r.status().max_applied_wal == wal_top > top
    finally:
        r.stop()
        storage.close()


def test_the_store_backed_app_of_docs_shared_md_replicates_and_is_read_in_place(data_dir):
    text = (Path(__file__).resolve().parent.parent / "docs" / "shared.md").read_text()
    code = text[text.index("import msgpack, zrepl\n\nclass Counter"):]
    code = code[:code.index("```")]
    ns: dict = {}
    exec(compile(code, "docs/shared.md", "exec"), ns)
    cfg = Config(**{**FAST, "snapshot_batch_entries": 7, "segment_bytes": 1024})
    storages = [FileStorage(data_dir / n, config=cfg) for n in ("L", "F")]
    leader, follower = [Replica(ns["Counter"](), st, f"ipc://{data_dir}/{n}.sock", cfg).start()
                        for n, st in zip(("L", "F"), storages)]
    try:
        leader.set_role(NodeRole.LEADER, 1)
        for i in range(0, 300, 30):  # ten WAL records, in several segments
            leader.manager.apply_many([("add", f"c{j}", 1) for j in range(30)])
        leader.storage.truncate_wal_before_id(300)  # the follower gets a state sync
        assert leader.storage.min_wal() > 1
        follower.set_role(NodeRole.FOLLOWER, 1)
        leader.set_follower(follower.address)
        wait_for(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 20,
                 "a synchronous follower")
        assert follower.status().extra["state_syncs_received"] == 1
        leader.manager.apply(("add", "c1", 5))
        for node in ("L", "F"):  # the follower's store commits just after it acknowledged
            with SharedReader.for_data_dir(data_dir / node) as reader:
                assert reader.read(lambda txn, db: txn.get(b"c1", db=db), min_wal_id=301) == \
                    (msgpack.packb(15), 301)
        assert follower.app.query(b"c2") == msgpack.packb(10)
        assert leader.control.op_state_digest() == follower.control.op_state_digest()
    finally:
        for r in (leader, follower):
            r.stop()
        for st in storages:
            st.close()


def test_the_read_endpoint_refuses_bad_frames_writes_and_leader_reads_and_keeps_serving():
    import zmq

    from zrepl.core import protocol
    from zrepl import NotLeader, ProtocolError
    with Cluster() as c:
        node = c.node("A", readers=1).start()
        node.client.set_role(NodeRole.LEADER, 1)
        c.client(node).apply(kv_set("k", 1))
        wait_for(lambda: node.status().extra["readers"] == 1, 20, "a reader")
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.connect(protocol.read_endpoints(node.address, 1)[0])
            frames = [b"\xc1garbage", protocol.submit_request(1, kv_set("k", 2)),
                      protocol.query_request(2, msgpack.packb(("get", "k")), leader_only=True),
                      protocol.query_request(3, msgpack.packb(("nope",))),
                      protocol.query_request(4, msgpack.packb(("get", "k")))]
            for f in frames:
                sock.send_multipart([b"", f])
            replies = []
            for _ in frames:
                assert sock.poll(5000), "the reader stopped answering"
                replies.append(protocol.parse_reply(sock.recv_multipart()[-1]))
            errors = [r[2] for r in replies]
            assert isinstance(errors[0], ProtocolError)
            assert isinstance(errors[1], NotLeader) and "reads only" in str(errors[1])
            assert isinstance(errors[2], ProtocolError) and "leader_only" in str(errors[2])
            assert isinstance(errors[3], ProtocolError) and "unknown KV query" in str(errors[3])
            assert replies[4][1:4] == (msgpack.packb([True, 1]), None, 1)
            sock.close()
        finally:
            ctx.destroy(linger=0)
        assert node.status().max_wal == 1  # nothing was written through the read endpoint


def test_with_keys_readers_serve_client_keys_and_nobody_else():
    import zmq

    from zrepl import Client
    from zrepl.core import protocol
    with Cluster(secure=["A"]) as c:
        node = c.node("A", readers=2).start()
        node.client.set_role(NodeRole.LEADER, 1)
        client = c.client(node)
        client.apply(kv_set("k", 1))
        wait_for(lambda: node.status().extra["readers"] == 2, 20, "2 readers")
        get = msgpack.packb(("get", "k"))
        for _ in range(10):
            assert client.query(get) == msgpack.packb([True, 1])
        assert node.status().extra["queries"] == 1  # the first only: then the readers
        # a key of another role gets no answer from them (nor from the node: reads are for
        # client and operator keys)
        sup = Client([node.address], timeout=0.5, retry_for=0.1,
                     config=Config(**c.keys["supervisor"]))
        try:
            sup._readers[node.address] = node.status().extra["read_endpoint"]
            with pytest.raises(Timeout):
                sup.query(get)
        finally:
            sup.close()
        # and a plain socket gets nothing from them
        ctx = zmq.Context()
        try:
            s = ctx.socket(zmq.DEALER)
            s.connect(protocol.read_endpoints(node.address, 1)[0])
            s.send_multipart([b"", protocol.query_request(1, get)])
            assert not s.poll(500), "an unauthenticated caller got a reply"
        finally:
            ctx.destroy(linger=0)


def test_a_node_process_whose_disk_fills_stops_with_one_clear_line_and_restarts_whole(data_dir):
    """(found by perf/chaos.py) A node whose disk is full stops writing;
    stopped, it then died with a traceback closing its data directory (its
    metadata could not be written).  Now one line, and status 1."""
    import os
    import shutil
    import signal
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    from .helpers.cluster import Cluster, kv_set
    with Cluster() as c:
        n = c.node("n")
        n.data.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(n.data)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        try:
            n.start()
            n.client.set_role(NodeRole.LEADER, 1)
            client = c.client(n, timeout=2, retry_for=2)
            acked = 0
            with pytest.raises(Exception) as failed:
                for i in range(400):  # 8 MB into 2 MiB
                    assert client.apply(kv_set(f"k{i}", "v" * 20_000)) == 0
                    acked += 1
            assert "No space left on device" in str(failed.value) or \
                "short write" in str(failed.value)
            with open(n.data / "filler", "wb") as f:  # not a byte left
                st = os.statvfs(n.data)
                try:
                    os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize)
                except OSError:
                    pass
            n.kill(signal.SIGTERM)
            assert n.proc.returncode == 1
            log = n.log_path.read_text()
            assert "Traceback" not in log, log[-3000:]
            assert log.strip().splitlines()[-1].startswith("zrepl: could not close")
            assert "No space left on device" in log.strip().splitlines()[-1]
            # its WAL is whole: a node on it (with room) holds every acknowledged write
            shutil.copytree(n.data, c.root / "again", ignore=lambda d, names: [
                x for x in names if x in ("shared", "LOCK", "filler")])
        finally:
            n.close()
            subprocess.run(["umount", "-l", str(n.data)], check=False)
        again = c.node("again")
        again.start()
        state = again.state()
        assert all(state.get(f"k{i}") == "v" * 20_000 for i in range(acked))
