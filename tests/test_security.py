"""CURVE keys and roles (issue "Secure on a real network"): every endpoint of
a secured node admits only the trust directory's keys, and each key only
what its role may do."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import msgpack
import pytest
import zmq

from workers.kv import KV
from zrepl import (Client, Config, MemoryStorage, NodeClient, NodeRole, PermissionDenied,
                   Replica, Timeout)
from zrepl.core import protocol
from zrepl.engine.security import KeyFileError, Security, keygen

from .helpers import wait_for
from .helpers.inproc import FAST, Nodes


@pytest.fixture
def root():
    d = Path(tempfile.mkdtemp(prefix="zr-sec-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def kv_set(key, value) -> bytes:
    return msgpack.packb(("set", key, value), use_bin_type=True)


class Secured:
    """Keys for nodes L and F, an operator, a client, and a stranger whose
    key is in no trust directory; in-process nodes that use them."""

    def __init__(self, root: Path):
        self.root = root
        self.trust = root / "trust"
        self.addr = {n: f"ipc://{root}/{n}.sock" for n in ("L", "F")}
        for n, a in self.addr.items():
            keygen(self.trust, n, "node", a)
        keygen(self.trust, "sup", "supervisor", f"ipc://{root}/sup.sock")
        keygen(self.trust, "op", "operator")
        keygen(self.trust, "app", "client")
        keygen(self.trust, "other", "node", f"ipc://{root}/other.sock")  # never started
        keygen(root / "elsewhere", "stranger", "operator")
        self.nodes = Nodes(root)

    def keys(self, name: str) -> dict:
        return {"key": str(self.trust / f"{name}.key_secret"), "trust": str(self.trust)}

    def config(self, name: str, **settings) -> Config:
        return Config(**self.keys(name), **settings)

    def security(self, name: str) -> Security:
        return Security.load(self.trust / f"{name}.key_secret", self.trust)

    def socket(self, ctx: zmq.Context, kind: int, name: str, endpoint: str) -> zmq.Socket:
        """A socket of ``kind`` connected to ``endpoint`` with ``name``'s key."""
        s = ctx.socket(kind)
        s.linger = 0
        self.security(name).connect_to(s, endpoint)
        s.connect(endpoint)
        return s

    def node(self, name: str) -> Replica:
        return self.nodes.make(name, **self.keys(name))

    def close(self) -> None:
        self.nodes.close()


@pytest.fixture
def sec(root):
    s = Secured(root)
    yield s
    s.close()


# --- keys -----------------------------------------------------------------------------


def test_keygen_writes_a_secret_only_its_owner_reads_whatever_the_umask(root):
    old = os.umask(0)
    try:
        public, secret = keygen(root / "k", "n1", "node", "tcp://10.0.0.1:7400")
    finally:
        os.umask(old)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "k").stat().st_mode) == 0o700
    assert "secret-key" not in public.read_text() and "secret-key" in secret.read_text()
    with pytest.raises(KeyFileError, match="exists"):
        keygen(root / "k", "n1", "node", "tcp://10.0.0.1:7400")
    with pytest.raises(KeyFileError, match="--endpoint"):
        keygen(root / "k", "n2", "node")
    with pytest.raises(KeyFileError, match="role"):
        keygen(root / "k", "x", "admin")
    with pytest.raises(KeyFileError, match="name"):
        keygen(root / "k", "../x", "client")


def test_a_secret_key_readable_by_others_or_missing_from_trust_is_refused(root):
    keygen(root / "t", "op", "operator")
    keygen(root / "other", "c", "client")
    os.chmod(root / "t" / "op.key_secret", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Security.load(root / "t" / "op.key_secret", root / "t")
    with pytest.raises(KeyFileError, match="own public key"):
        Security.load(root / "other" / "c.key_secret", root / "t")
    with pytest.raises(ValueError, match="go together"):
        Config(key=str(root / "t" / "op.key_secret"))


# --- a secured pair ---------------------------------------------------------------------


def secured_pair(sec: Secured) -> tuple[Replica, Replica]:
    leader, follower = sec.node("L"), sec.node("F")
    follower.set_role(NodeRole.FOLLOWER, 1)
    leader.set_role(NodeRole.LEADER, 1)
    leader.set_follower(follower.address)
    wait_for(lambda: leader.status().follower_sync, 10, "the secured follower synchronous")
    return leader, follower


def test_a_secured_pair_replicates_for_a_client_key(sec):
    leader, follower = secured_pair(sec)
    with Client([leader.address], timeout=2, retry_for=5, config=sec.config("app")) as c:
        for i in range(20):
            assert c.apply(kv_set(f"k{i}", i)) == 0
    wait_for(lambda: follower.status().max_applied_wal == 20, 5, "the follower has all 20")
    assert follower.applier.app.data["k19"] == 19


def test_each_role_may_make_only_its_own_control_calls(sec):
    leader, follower = secured_pair(sec)
    before = leader.status()
    with NodeClient(leader.address, 2, sec.config("op")) as op:
        assert op.status().leader_id == 1 and op.ping()  # an operator may
    for name, calls in (("app", ["status", "set_role", "dump_state", "stop"]),
                        ("F", ["set_role", "set_follower", "dump_state", "checkpoint", "stop"])):
        with NodeClient(leader.address, 2, sec.config(name)) as nc:
            for op in calls:
                args = {"role": 2, "leader_id": 9} if op == "set_role" else \
                    {"address": "ipc://x"} if op == "set_follower" else {}
                with pytest.raises(PermissionDenied, match=f"may not call {op}"):
                    nc.call(op, **args)
    after = leader.status()
    assert (after.role, after.leader_id, after.follower, after.max_wal) == \
        (before.role, before.leader_id, before.follower, before.max_wal)
    assert after.extra["denied_calls"] == 9


def test_no_key_or_a_stranger_key_gets_nothing_through(sec, root):
    leader, _ = secured_pair(sec)
    with Client([leader.address], timeout=2, retry_for=5, config=sec.config("app")) as c:
        assert c.apply(kv_set("x", 1)) == 0
    stranger = Config(key=str(root / "elsewhere" / "stranger.key_secret"),
                      trust=str(root / "elsewhere"))
    with pytest.raises(KeyFileError):  # it does not even know the node's key
        Security.load(stranger.key, stranger.trust).server_key(leader.address)
    ctx = zmq.Context()
    try:
        eps = protocol.endpoints(leader.address)
        # a plain socket, and one with a key the node does not trust
        pub, secret = zmq.curve_keypair()
        socks = []
        for curve in (False, True):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            if curve:
                s.curve_publickey, s.curve_secretkey = pub, secret
                s.curve_serverkey = sec.security("op").server_key(eps.control)
            s.connect(eps.control)
            s.send_multipart([b"", protocol.control_request("set_role",
                                                            {"role": 2, "leader_id": 99})])
            socks.append(s)
        for s in socks:
            assert not s.poll(500), "an unauthenticated caller got a reply"
            s.close()
    finally:
        ctx.destroy(linger=0)  # (closes what a failed assertion left open)
    st = leader.status()
    assert (st.role, st.leader_id, st.max_wal) == (NodeRole.LEADER, 1, 1)


def test_data_from_a_key_that_is_not_a_nodes_is_dropped(sec):
    leader, follower = secured_pair(sec)
    ctx = zmq.Context()
    try:
        s = sec.socket(ctx, zmq.PUSH, "op", protocol.endpoints(follower.address).data)
        for _ in range(5):
            s.send(protocol.wal_message(1, 7, 1, [kv_set("evil", 1)]))
        wait_for(lambda: follower.status().extra["denied_calls"] >= 5, 5,
                 "the operator's data frames counted as denied")
        s.close()
    finally:
        ctx.destroy(linger=0)  # (closes what a failed assertion left open)
    assert follower.status().max_wal == 0


def test_apply_state_is_refused_on_a_leader(sec):
    leader, _ = secured_pair(sec)
    with NodeClient(leader.address, 2, sec.config("F")) as nc:
        with pytest.raises(PermissionDenied, match="leads"):
            nc.call("apply_state", leader_id=1, datas=[kv_set("evil", 1)])
    assert "evil" not in leader.applier.app.data


def test_without_keys_a_client_cannot_reach_a_secured_node(sec):
    leader, _ = secured_pair(sec)
    with Client([leader.address], timeout=0.3, retry_for=0.6) as c:
        with pytest.raises(Timeout):
            c.apply(kv_set("x", 1))
    assert leader.status().max_wal == 0


# --- secure by default ------------------------------------------------------------------


def test_data_files_and_sockets_are_the_owners_alone_whatever_the_umask(root):
    from zrepl import FileStorage
    from zrepl.storage.snapshot import list_checkpoints
    old = os.umask(0)
    try:
        cfg = Config(**FAST)
        storage = FileStorage(root / "data", config=cfg)
        r = Replica(KV(), storage, f"ipc://{root}/n.sock", cfg).start()
        try:
            r.set_role(NodeRole.LEADER, 1)
            assert r.manager.apply(("set", "k", 1)) == 0
            r.checkpointer.request()
            wait_for(lambda: list_checkpoints(root / "data" / "checkpoints"), 10, "a checkpoint")
            sockets = [p for p in root.iterdir() if p.is_socket()]
            assert len(sockets) == 4
            assert {stat.S_IMODE(p.stat().st_mode) for p in sockets} == {0o600}
        finally:
            r.stop()
            storage.close()
    finally:
        os.umask(old)
    made = [root / "data", *(root / "data").rglob("*")]
    assert len(made) >= 5  # the directory, its WAL and checkpoints, their files
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in made
             if stat.S_IMODE(p.stat().st_mode) != (0o700 if p.is_dir() else 0o600)}
    assert not wrong


@pytest.mark.parametrize("command", ["node", "supervisor"])
def test_listening_beyond_loopback_without_keys_is_refused(root, command):
    import subprocess
    import sys
    args = ["node", "--app", "workers.kv:KV", "--data", str(root / "d"),
            "--listen", "tcp://0.0.0.0:7600"] if command == "node" else \
        ["supervisor", "--node", "tcp://127.0.0.1:7600", "--listen", "tcp://0.0.0.0:7699"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    p = subprocess.run([sys.executable, "-m", "zrepl", *args], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 1
    assert "refusing to listen on tcp://0.0.0.0" in p.stderr and "insecure" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (root / "d").exists()  # nothing was created


def test_exposure_rule():
    from zrepl import ReplicationError
    from zrepl.engine.security import check_exposure
    for ok in ("ipc:///tmp/x", "tcp://127.0.0.1:7400", "tcp://[::1]:7400", "tcp://localhost:7400",
               ""):
        check_exposure(ok, Config())
    check_exposure("tcp://10.0.0.1:7400", Config(insecure=True))  # on purpose
    for bad in ("tcp://10.0.0.1:7400", "tcp://*:7400", "tcp://db.example:7400"):
        with pytest.raises(ReplicationError, match="without keys"):
            check_exposure(bad, Config())


def test_an_oversized_frame_never_reaches_the_engine(root):
    """Issue 12: 24 x 63 MiB frames to the ack port took the leader from 33
    to 1,545 MiB.  Each endpoint now takes messages only as large as what
    it carries: the sender of a larger one is dropped by ZeroMQ."""
    r = Replica(KV(), MemoryStorage(), f"ipc://{root}/n.sock", Config(**FAST)).start()
    ctx = zmq.Context()
    try:
        eps = protocol.endpoints(r.address)
        big, small = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
        for s in (big, small):
            s.linger = 0
            s.connect(eps.ack)
        big.send(b"x" * (Config().max_ack_bytes + 1))
        small.send(b"not an ack")  # a malformed ack that does arrive, after it
        wait_for(lambda: r.status().extra["dropped_messages"] >= 1, 10,
                 "the small frame dropped as malformed")
        small.send(b"a probe")  # by its turn, anything sent before it has been read
        wait_for(lambda: r.status().extra["dropped_messages"] >= 2, 10, "the probe")
        assert r.status().extra["dropped_messages"] == 2  # the big one never arrived
        for s in (big, small):
            s.close()
    finally:
        ctx.destroy(linger=0)  # (closes what a failed assertion left open)
        r.stop()


def test_only_the_handshakes_key_may_send_state_and_data(sec):
    """Another node's key (a trusted member, but not this node's upstream)
    may neither clear the follower nor stream it WAL."""
    leader, follower = secured_pair(sec)
    with Client([leader.address], timeout=2, retry_for=5, config=sec.config("app")) as c:
        assert c.apply(kv_set("x", 1)) == 0
    wait_for(lambda: follower.status().max_applied_wal == 1, 5, "the follower has it")
    with NodeClient(follower.address, 2, sec.config("other")) as nc:
        with pytest.raises(PermissionDenied, match="upstream"):
            nc.call("clear_state", leader_id=1)
    ctx = zmq.Context()
    try:
        s = sec.socket(ctx, zmq.PUSH, "other", protocol.endpoints(follower.address).data)
        before = follower.status().extra["denied_calls"]
        stream = 0  # (the stream token is not even needed to be refused)
        s.send(protocol.wal_message(1, stream, 2, [kv_set("evil", 1)]))
        wait_for(lambda: follower.status().extra["denied_calls"] > before, 5,
                 "the other node's data refused")
        s.close()
    finally:
        ctx.destroy(linger=0)  # (closes what a failed assertion left open)
    assert follower.status().max_applied_wal == 1 and "evil" not in follower.applier.app.data
    assert follower.applier.app.data["x"] == 1


def test_an_app_that_fails_to_write_its_state_is_reported_not_silent(root):
    """Issue 12: an App error while iterating its state for a checkpoint
    must be loud - the WAL is not truncated until a checkpoint succeeds."""
    from workers.ledger import Ledger

    class Brittle(Ledger):  # (state in Python objects: checkpoints iterate the App)
        broken = True

        def iter_state(self):
            if self.broken:
                raise OverflowError("int too big to encode")
            yield from super().iter_state()

    app = Brittle()
    r = Replica(app, MemoryStorage(checkpoints=True), f"ipc://{root}/n.sock",
                Config(**FAST)).start()
    try:
        r.set_role(NodeRole.LEADER, 1)
        assert r.manager.apply(("open", "k", 1)) == 0
        r.checkpointer.request()
        st = wait_for(lambda: (s := r.status()).extra["checkpoint_failures"] and s, 10,
                      "the failure counted")
        assert "OverflowError" in st.extra["checkpoint_error"]
        assert "checkpoint" in st.extra["last_failure"] and st.extra["failures"] == 1
        app.broken = False  # fixed: the next checkpoint succeeds and clears the error
        r.checkpointer.request()
        wait_for(lambda: r.status().extra["checkpoint_error"] == "", 10, "a checkpoint")
        assert r.manager.apply(("open", "j", 2)) == 0  # the node kept serving throughout
    finally:
        r.stop()


@pytest.mark.timeout(240)
def test_a_supervised_cluster_with_keys_fails_over_with_nothing_lost():
    """Node processes, a supervisor and a client, all with keys: leaders
    killed under load, every acknowledged increment on every node."""
    from .helpers.cluster import Cluster
    from .helpers.load import SUPERVISED, kill_leaders_under_load, supervised_chain
    with Cluster(secure=list("ABC"), **SUPERVISED) as c:
        nodes, sup, _ = supervised_chain(c)
        client = c.client(*nodes, timeout=0.5, retry_for=30)
        acked = [0]

        def incr() -> None:
            if client.apply(msgpack.packb(("incr", "n", 1))) == 0:
                acked[0] += 1
        chain = kill_leaders_under_load(incr, nodes, sup, 2, lambda: acked[0], 30)
        assert acked[0] > 0
        assert {x.name: x.state().get("n", 0) for x in chain} == \
            {x.name: acked[0] for x in chain}
        # and nobody without a key got in meanwhile: no node counted a denial
        assert all(x.status().extra["denied_calls"] == 0 for x in nodes)


def test_ten_thousand_hostile_frames_change_nothing(sec, root):
    """With CURVE on: garbage from no key, from a stranger's key, and from
    trusted keys of the wrong role, on all four endpoints of the leader and
    the follower.  Both stay up and unchanged."""
    import random
    leader, follower = secured_pair(sec)
    with Client([leader.address], timeout=2, retry_for=5, config=sec.config("app")) as c:
        for i in range(10):
            assert c.apply(kv_set(f"k{i}", i)) == 0
    wait_for(lambda: follower.status().max_applied_wal == 10, 5, "the follower has all 10")
    before = {n.address: (n.status().max_wal, n.applier.app.data.copy())
              for n in (leader, follower)}
    rng = random.Random(12)
    ctx = zmq.Context()
    sent = 0
    senders: list = []
    try:
        stranger_pub, stranger_secret = zmq.curve_keypair()
        for node in (leader, follower):
            eps = protocol.endpoints(node.address)
            for endpoint, kind in ((eps.control, zmq.DEALER), (eps.client, zmq.DEALER),
                                   (eps.data, zmq.PUSH), (eps.ack, zmq.PUSH)):
                for who in ("app", "F", "op"):
                    senders.append((sec.socket(ctx, kind, who, endpoint), kind))
                for who in ("plain", "stranger"):
                    s = ctx.socket(kind)
                    s.linger = 0
                    if who == "stranger":
                        s.curve_publickey, s.curve_secretkey = stranger_pub, stranger_secret
                        s.curve_serverkey = sec.security("op").server_key(endpoint)
                    s.connect(endpoint)
                    senders.append((s, kind))
        while sent < 10_000:
            s, kind = senders[sent % len(senders)]
            frame = rng.randbytes(rng.randrange(0, 200))
            try:
                if kind == zmq.DEALER:
                    s.send_multipart([b"", frame], zmq.NOBLOCK)
                else:
                    s.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                pass  # (no connection: a key the node refused - dropped right here)
            sent += 1
        # a trusted operator still gets through, after all of it
        with NodeClient(follower.address, 5, sec.config("op")) as op:
            assert op.ping()
        with NodeClient(leader.address, 5, sec.config("op")) as op:
            assert op.ping()
    finally:
        for s, _ in senders:
            s.close()
        ctx.destroy(linger=0)  # (closes what a failed assertion left open)
    assert sent == 10_000
    after = {n.address: (n.status().max_wal, n.applier.app.data) for n in (leader, follower)}
    assert after == before
    assert leader.status().follower_sync
    # (the trusted keys' garbage did reach the nodes, and was refused there)
    seen = sum(n.status().extra["denied_calls"] + n.status().extra["dropped_messages"]
               for n in (leader, follower))
    assert seen > 1000, seen


def test_a_checkpoint_of_another_history_is_not_trusted():
    from types import SimpleNamespace
    judge = Replica._checkpoint_of_this_history
    mine = [(1, 1), (3, 50)]
    cp = lambda wal_id, history: SimpleNamespace(  # noqa: E731
        wal_id=wal_id, zrepl={"epoch_history": [list(x) for x in history]})
    assert judge(cp(80, [(1, 1), (3, 50)]), mine)
    assert judge(cp(40, [(1, 1)]), mine)  # taken before epoch 3 began: the same log
    assert not judge(cp(80, [(1, 1), (2, 50)]), mine)  # entries 50.. of another epoch
    assert not judge(cp(80, [(1, 1), (3, 60)]), mine)  # 50..59 written under epoch 1 there
    assert not judge(SimpleNamespace(wal_id=5, zrepl={"epoch_history": "junk"}), mine)
    assert judge(cp(80, []), mine) and judge(cp(80, [(1, 1)]), [])  # nothing to judge by


def test_a_connection_that_never_handshakes_is_closed_soon(root):
    """Issue 12: idle connections held descriptors for libzmq's 30 s; out of
    descriptors, a new client's first write waited 30 s (measured with
    1,096 idle strangers and 1,024 descriptors).  Now handshake_timeout."""
    import socket
    import time
    from zrepl.local import free_tcp_base
    base = free_tcp_base()
    r = Replica(KV(), MemoryStorage(), f"tcp://127.0.0.1:{base}",
                Config(**FAST, handshake_timeout=0.3)).start()
    try:
        s = socket.create_connection(("127.0.0.1", base), timeout=10)
        t = time.monotonic()
        while s.recv(4096):  # libzmq's greeting, then nothing: until it hangs up
            pass
        assert time.monotonic() - t < 10  # (closed by the node, not by our timeout)
        s.close()
    finally:
        r.stop()


def test_an_endpoint_holds_at_most_max_connections(root):
    """With keys, each endpoint admits at most max_connections live
    connections; beyond that a handshake is refused and counted, and a
    slot freed by a disconnect is taken again."""
    s = Secured(root)
    r = s.nodes.make("L", **s.keys("L"), max_connections=3)
    endpoint = protocol.endpoints(r.address).client
    ctx = zmq.Context()
    socks = []
    try:
        r.set_role(NodeRole.LEADER, 1)

        def connected() -> zmq.Socket:
            socks.append(s.socket(ctx, zmq.DEALER, "app", endpoint))
            return socks[-1]

        def answers(sock: zmq.Socket, rid: int, wait_ms: int = 5000) -> bool:
            try:
                sock.send_multipart([b"", protocol.submit_request(rid, kv_set("k", rid))],
                                    zmq.NOBLOCK)
            except zmq.Again:
                return False  # (not connected)
            return bool(sock.poll(wait_ms))

        held = [connected() for _ in range(3)]
        for i, sock in enumerate(held):
            assert answers(sock, i + 1)
        extra = connected()
        assert not answers(extra, 10, 1000)  # the fourth is refused at the handshake
        wait_for(lambda: r.status().extra["connections_refused"] >= 1, 10, "a refusal counted")
        held[0].close()  # a slot frees up: a new connection gets in
        socks.remove(held[0])
        extra.close()
        socks.remove(extra)
        rid = iter(range(100, 10**6))
        wait_for(lambda: answers(connected(), next(rid), 500), 20, "a new connection admitted")
    finally:
        for sock in socks:
            sock.close()
        ctx.destroy(linger=0)  # (closes what a failed assertion left open)
        s.close()
