"""Leader and follower as real processes on loopback (ipc and tcp), with
SIGKILL: the transport, fork and files for real.  (The engine's scenarios
run deterministically in test_engine_sim.py.)"""

from __future__ import annotations


import pytest

from zrepl import FollowerState, NodeRole, Timeout

from .helpers import wait_for
from .helpers.cluster import Cluster, kv_set, wait_applied, wait_synchronous
from .helpers.load import Writer, missing

pytestmark = pytest.mark.timeout(180)


def test_empty_follower_joins_a_big_leader_while_writes_continue():
    with Cluster(max_retained_wal=1000) as c:
        L = c.node("L").start()
        F = c.node("F").start()
        L.client.set_role(NodeRole.LEADER, 1)
        c.client(L).apply_many([kv_set(f"k{i}", i) for i in range(100_000)])
        L.client.checkpoint()  # lets the WAL start after 1: the follower needs a snapshot
        wait_for(lambda: L.status().min_wal > 1, 30, "leader WAL truncation")
        writer = Writer(c, [L])
        writer.start()
        wait_for(lambda: len(writer.acked) > 50, 30, "writes before the join")
        F.client.set_role(NodeRole.FOLLOWER, 1)
        L.client.set_follower(F.address)
        wait_synchronous(L)
        wait_for(lambda: len(writer.acked) > 300, 30, "writes after the join")
        writer.stop()
        top = L.status().max_wal
        wait_applied(F, top)
        assert F.status().extra.get("state_syncs_received") == 1
        assert sorted(L.client.dump_state()) == sorted(F.client.dump_state())
        assert not missing(F, writer.acked)
        size = len(F.state())  # writes with an unknown outcome may or may not be there
        assert 100_000 + len(writer.acked) <= size <= 100_000 + len(writer.acked) + writer.failed






def test_killed_leader_loses_no_acknowledged_write_and_rejoins_as_follower():
    with Cluster(require_sync=True, ack_timeout=0.3) as c:
        L = c.node("L").start()
        F = c.node("F").start()
        c.leader_with_follower(L, F)
        writer = Writer(c, [L])
        writer.start()
        wait_for(lambda: len(writer.acked) > 500, 30, "acknowledged writes")
        L.kill()
        writer.stop()
        assert writer.acked
        F.client.set_role(NodeRole.LEADER, 2)
        assert not missing(F, writer.acked)
        rejoin(c, L, F, 2, "after", 100)  # the old leader follows the new one
        assert L.digest() == F.digest()
        hl, hf = L.status().epoch_history, F.status().epoch_history
        assert hl == hf == [(1, 1), (2, L_first(F))], \
            f"{hl} {hf}\n{L.log_tail()}\n{F.log_tail()}"


def rejoin(c, old, new, epoch: int, prefix: str, writes: int) -> None:
    """Restart ``old`` as the follower of ``new`` (epoch ``epoch``), write
    through ``new`` and wait until ``old`` applied it all."""
    old.start()
    old.client.set_role(NodeRole.FOLLOWER, epoch)
    new.client.set_follower(old.address)
    wait_synchronous(new)
    c.client(new).apply_many([kv_set(f"{prefix}{i}", i) for i in range(writes)])
    wait_applied(old, new.status().max_wal)


def L_first(node) -> int:
    return node.status().epoch_history[-1][1]




def test_stale_leader_is_refused_and_cannot_commit_with_require_sync():
    with Cluster(require_sync=True, ack_timeout=0.3, sync_wait_timeout=0.5) as c:
        A = c.node("A").start()
        B = c.node("B").start()
        c.leader_with_follower(A, B)
        client = c.client(A, timeout=3, retry_for=1)
        assert client.apply(kv_set("before", 1)) == 0
        B.client.set_role(NodeRole.FOLLOWER, 2)  # a newer epoch exists somewhere
        with pytest.raises(Timeout):
            client.apply(kv_set("stale", 1))
        wait_for(lambda: A.status().follower_state == FollowerState.ERROR, 20,
                 "stale leader's link in ERROR")
        assert "StaleLeader" in A.status().extra["follower_error"]
        with pytest.raises(Timeout):
            client.apply(kv_set("stale2", 1))
        assert "stale" not in B.state() and "stale2" not in B.state()
        assert B.state()["before"] == 1


def test_all_nodes_killed_then_restarted_from_disk():
    with Cluster(checkpoint_entries=3000, require_sync=True) as c:
        L = c.node("L").start()
        F = c.node("F").start()
        c.leader_with_follower(L, F)
        client = c.client(L)
        acked = []
        for chunk in range(10):
            datas = [kv_set(f"k{chunk}-{i}", i) for i in range(1000)]
            client.apply_many(datas)
            acked += [f"k{chunk}-{i}" for i in range(1000)]
        writer = Writer(c, [L])
        writer.start()
        wait_for(lambda: len(writer.acked) > 100, 30, "writes in flight")
        L.kill()
        F.kill()
        writer.stop()
        assert list((L.data / "checkpoints").glob("ckpt-*.zck"))
        L.start()
        F.start()
        # A restarted leader cannot know what it sent before it died: it
        # writes (and links) nothing more in its epoch until given a new
        # one - the supervisor's job, done by hand here.
        assert L.status().role == NodeRole.LEADER and L.status().extra["epoch_spent"]
        L.client.set_role(NodeRole.LEADER, 2)
        wait_synchronous(L)
        everything = acked + writer.acked
        assert not missing(L, everything)
        wait_applied(F, L.status().max_wal)
        assert L.digest() == F.digest()
        assert c.client(L).apply(kv_set("afterwards", 1)) == 0


def test_tcp_endpoints_work_too():
    """The same leader/follower over real TCP on loopback."""
    import socket

    def free_base() -> int:
        for _ in range(50):
            socks = []
            try:
                base = None
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                base = s.getsockname()[1]
                s.close()
                if base > 65000:
                    continue
                for port in range(base, base + 4):
                    t = socket.socket()
                    t.bind(("127.0.0.1", port))
                    socks.append(t)
                return base
            except OSError:
                continue
            finally:
                for t in socks:
                    t.close()
        raise RuntimeError("no 4 free consecutive ports")

    with Cluster() as c:
        L = c.node("L")
        L.address = f"tcp://127.0.0.1:{free_base()}"
        L.start()
        F = c.node("F")
        F.address = f"tcp://127.0.0.1:{free_base()}"
        F.start()
        c.leader_with_follower(L, F)
        assert c.client(L).apply_many([kv_set(f"t{i}", i) for i in range(500)]) == [0] * 500
        wait_applied(F, 500)
        assert L.digest() == F.digest()
