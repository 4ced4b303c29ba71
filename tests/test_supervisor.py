"""The supervisor with real node processes: automatic chain building,
failover with SIGKILL, a paused (SIGSTOP) leader, supervisor restarts."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from zrepl import FollowerState, NodeRole, ReplicationError

from .helpers import wait_for
from .helpers.cluster import Cluster, kv_set, wait_applied

pytestmark = pytest.mark.timeout(240)

SUPERVISED = dict(require_sync=True, lease_required=True, ack_timeout=0.3,
                  sync_wait_timeout=2.0, rpc_timeout=0.3)


class Writer(threading.Thread):
    """Writes unique keys to whichever node leads, records the acknowledged
    ones and the time of each acknowledgement."""

    def __init__(self, cluster: Cluster, nodes, prefix: str = "w"):
        super().__init__(daemon=True)
        self.client = cluster.client(*nodes, timeout=0.5, retry_for=0.5)
        self.prefix = prefix
        self.acked: list[str] = []
        self.ack_times: list[tuple[float, str]] = []  # (when, which node answered)
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            key = f"{self.prefix}{i}"
            i += 1
            try:
                if self.client.apply(kv_set(key, i)) == 0:
                    self.acked.append(key)
                    self.ack_times.append((time.monotonic(), self.client._leader or ""))
            except ReplicationError:
                pass  # outcome unknown: not acknowledged

    def first_ack_after(self, t: float, not_from: str = "") -> float | None:
        """When the first write acknowledged after ``t`` by a node other
        than ``not_from`` came back."""
        return next((x for x, node in self.ack_times if x > t and node != not_from), None)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)


def leader_of(nodes):
    """The node that leads the highest epoch among those answering."""
    best = None
    for n in nodes:
        try:
            st = n.status()
        except ReplicationError:
            continue
        if st.role == NodeRole.LEADER and (best is None or st.leader_id > best[0]):
            best = (st.leader_id, n)
    return best[1] if best else None


def chain_ok(nodes) -> list | None:
    """[leader, forwarder..., follower] if the nodes form one synchronous chain."""
    leader = leader_of(nodes)
    if leader is None:
        return None
    by_addr = {n.address: n for n in nodes}
    chain, node = [leader], leader
    while True:
        st = node.status()
        if not st.follower:
            break
        if st.follower_state != FollowerState.SYNCHRONOUS or st.follower not in by_addr:
            return None
        node = by_addr[st.follower]
        chain.append(node)
    if len(chain) != len(nodes):
        return None
    roles = [n.status().role for n in chain]
    want = [NodeRole.LEADER] + [NodeRole.FORWARDER] * (len(nodes) - 2) + [NodeRole.FOLLOWER]
    return chain if roles == want else None


def missing(node, keys):
    state = node.state()
    return [k for k in keys if k not in state]


def test_supervisor_builds_the_chain_from_empty_nodes():
    with Cluster(**SUPERVISED) as c:
        nodes = [c.node(n).start() for n in "ABC"]
        c.supervisor(nodes)
        chain = wait_for(lambda: chain_ok(nodes), 30, "leader -> forwarder -> follower")
        assert [n.name for n in chain] == ["A", "B", "C"]
        assert c.client(*nodes).apply(kv_set("k", 1)) == 0
        assert all(n.status().leader_id == 1 for n in nodes)


def test_repeated_leader_kills_lose_no_acknowledged_write():
    with Cluster(**SUPERVISED) as c:
        nodes = [c.node(n).start() for n in "ABC"]
        sup = c.supervisor(nodes)
        wait_for(lambda: chain_ok(nodes), 30, "initial chain")
        writer = Writer(c, nodes)
        writer.start()
        leaders, failovers = [], []
        try:
            for _ in range(6):
                wait_for(lambda: chain_ok(nodes), 30, "a healthy chain")
                sup.wait_synchronous(2)
                n_before = len(writer.acked)
                wait_for(lambda: len(writer.acked) > n_before + 50, 30, "writes")
                leader = leader_of(nodes)
                leaders.append(leader.name)
                t_kill = time.monotonic()
                leader.kill()
                wait_for(lambda: writer.first_ack_after(t_kill, leader.address), 30,
                         "a write acknowledged by the new leader")
                failovers.append(writer.first_ack_after(t_kill, leader.address) - t_kill)
                new_leader = leader_of([n for n in nodes if n is not leader])
                assert new_leader is not None and new_leader is not leader
                acked_now = list(writer.acked)
                assert not missing(new_leader, acked_now)
                leader.start()  # it comes back and rejoins at the tail
        finally:
            writer.stop()
        chain = wait_for(lambda: chain_ok(nodes), 30, "final chain")
        top = chain[0].status().max_wal
        for n in chain[1:]:
            wait_applied(n, top)
        for n in nodes:
            assert not missing(n, writer.acked), n.name
        assert len({n.digest()["sha256"] for n in nodes}) == 1
        assert set(leaders) == {"A", "B", "C"}, leaders
        epochs = [n.status().leader_id for n in nodes]
        assert len(set(epochs)) == 1 and epochs[0] == 7
        print(f"failover times (kill -> first acknowledged write): "
              f"{', '.join(f'{t * 1000:.0f} ms' for t in failovers)}")


def test_killed_middle_node_is_healed_around_and_rejoins_at_the_tail():
    with Cluster(**SUPERVISED) as c:
        a, b, cc = nodes = [c.node(n).start() for n in "ABC"]
        sup = c.supervisor(nodes)
        wait_for(lambda: chain_ok(nodes), 30, "initial chain")
        sup.wait_synchronous(2)
        writer = Writer(c, nodes)
        writer.start()
        try:
            wait_for(lambda: len(writer.acked) > 100, 30, "writes")
            b.kill()
            wait_for(lambda: chain_ok([a, cc]), 30, "A -> C")
            n = len(writer.acked)
            wait_for(lambda: len(writer.acked) > n + 100, 30, "writes through A -> C")
            b.start()
            chain = wait_for(lambda: chain_ok(nodes), 30, "B back at the tail")
            assert [x.name for x in chain] == ["A", "C", "B"]
        finally:
            writer.stop()
        wait_applied(b, a.status().max_wal)
        assert not missing(b, writer.acked) and not missing(cc, writer.acked)


def test_paused_leader_acknowledges_nothing_the_new_leader_lacks():
    with Cluster(**SUPERVISED) as c:
        nodes = [c.node(n).start() for n in "ABC"]
        sup = c.supervisor(nodes)
        wait_for(lambda: chain_ok(nodes), 30, "initial chain")
        sup.wait_synchronous(2)
        writer = Writer(c, nodes)
        writer.start()
        try:
            wait_for(lambda: len(writer.acked) > 100, 30, "writes")
            old = leader_of(nodes)
            old.kill(signal.SIGSTOP)  # a pause, not a death: longer than the lease
            others = [n for n in nodes if n is not old]
            new = wait_for(lambda: leader_of(others), 30, "a new leader")
            n = len(writer.acked)
            wait_for(lambda: len(writer.acked) > n + 100, 30, "writes on the new leader")
            old.kill(signal.SIGCONT)
            wait_for(lambda: chain_ok(nodes), 30, "the old leader back as a follower")
            assert old.status().role != NodeRole.LEADER
            n = len(writer.acked)
            wait_for(lambda: len(writer.acked) > n + 100, 30, "writes after the pause")
        finally:
            writer.stop()
        assert not missing(new, writer.acked)
        wait_applied(old, new.status().max_wal)
        assert not missing(old, writer.acked)
        assert old.digest() == new.digest()


def test_restarted_supervisor_adopts_the_cluster_without_failover():
    with Cluster(**SUPERVISED) as c:
        nodes = [c.node(n).start() for n in "ABC"]
        sup = c.supervisor(nodes)
        chain = wait_for(lambda: chain_ok(nodes), 30, "initial chain")
        sup.wait_synchronous(2)
        epoch = chain[0].status().leader_id
        sup.kill()
        # the leader's lease runs out while no supervisor renews it
        wait_for(lambda: not _accepts_writes(c, nodes), 10, "lease expiry")
        sup.start()
        wait_for(lambda: _accepts_writes(c, nodes), 10, "writes again under the new supervisor")
        assert chain_ok(nodes) == chain  # same leader, same chain: no failover
        assert all(n.status().leader_id == epoch for n in nodes)
        sup.wait_synchronous(2)
        # a later failover uses a fresh epoch, never a reused one
        chain[0].kill()
        new = wait_for(lambda: leader_of(chain[1:]), 30, "a new leader")
        assert new.status().leader_id == epoch + 1


def _accepts_writes(c, nodes) -> bool:
    try:
        return c.client(*nodes, timeout=0.5, retry_for=0.3).apply(kv_set("probe", 1)) == 0
    except ReplicationError:
        return False


def test_supervisor_survives_hostile_status_replies():
    """A 'node' that answers garbage is marked unhealthy; the rest go on."""
    import zmq
    with Cluster(**SUPERVISED) as c:
        nodes = [c.node(n).start() for n in "AB"]
        liar = c.root / "liar.sock"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(f"ipc://{liar}")
        stop = threading.Event()

        def lie():
            replies = [b"\xc1garbage", b'\x81\xa1v\x01', b"\x82\xa1v\x01\xa2ok\x81\xa1x\x01"]
            i = 0
            while not stop.is_set():
                if sock.poll(50):
                    frames = sock.recv_multipart()
                    sock.send_multipart(frames[:-1] + [replies[i % len(replies)]])
                    i += 1

        t = threading.Thread(target=lie, daemon=True)
        t.start()
        try:
            from .helpers.cluster import NodeProc
            fake = NodeProc(c, "liar", {})
            fake.address = f"ipc://{liar}"
            sup = c.supervisor(nodes + [fake])
            wait_for(lambda: chain_ok(nodes), 30, "a chain of the honest nodes")
            assert c.client(*nodes).apply(kv_set("k", 1)) == 0
            assert sup.proc.poll() is None  # still running
            assert "malformed status" in sup.log_tail(200)
        finally:
            stop.set()
            t.join(timeout=5)
            sock.close(linger=0)
            ctx.term()
