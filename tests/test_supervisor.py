"""The supervisor with real node processes: automatic chain building,
failover with SIGKILL, supervisor restarts, hostile replies.  (The same
scenarios and more run deterministically in test_engine_sim.py.)"""

from __future__ import annotations

import threading

import pytest

from zrepl import ReplicationError

from .helpers import wait_for
from .helpers.cluster import Cluster, kv_set
from .helpers.load import (SUPERVISED, Writer, chain_ok, kill_leaders, leader_of, missing,
                           settled_chain, supervised_chain)

pytestmark = pytest.mark.timeout(240)


def test_supervisor_builds_the_chain_from_empty_nodes():
    with Cluster(**SUPERVISED) as c:
        nodes, _, chain = supervised_chain(c)
        assert [n.name for n in chain] == ["A", "B", "C"]
        assert c.client(*nodes).apply(kv_set("k", 1)) == 0
        assert all(n.status().leader_id == 1 for n in nodes)


def test_repeated_leader_kills_lose_no_acknowledged_write():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, _ = supervised_chain(c)
        writer = Writer(c, nodes, timeout=0.5)
        writer.start()
        leaders, failovers = [], []

        def after_kill(leader, t_kill: float) -> None:
            leaders.append(leader.name)
            wait_for(lambda: writer.first_ack_after(t_kill, leader.address), 30,
                     "a write acknowledged by the new leader")
            failovers.append(writer.first_ack_after(t_kill, leader.address) - t_kill)
            new_leader = leader_of([n for n in nodes if n is not leader])
            assert new_leader is not None and new_leader is not leader
            acked_now = list(writer.acked)
            assert not missing(new_leader, acked_now)

        try:
            kill_leaders(nodes, sup, 6, lambda: len(writer.acked), 50, after_kill)
        finally:
            writer.stop()
        settled_chain(nodes)
        for n in nodes:
            assert not missing(n, writer.acked), n.name
        assert len({n.digest()["sha256"] for n in nodes}) == 1
        assert set(leaders) == {"A", "B", "C"}, leaders
        epochs = [n.status().leader_id for n in nodes]
        assert len(set(epochs)) == 1 and epochs[0] == 7
        print(f"failover times (kill -> first acknowledged write): "
              f"{', '.join(f'{t * 1000:.0f} ms' for t in failovers)}")






def test_restarted_supervisor_adopts_the_cluster_without_failover():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, chain = supervised_chain(c)
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
            ctx.destroy(linger=0)  # (closes what a failed assertion left open)
