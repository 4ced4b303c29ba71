"""Chained replication: leader -> forwarder -> ... -> follower, as real
processes."""

from __future__ import annotations

import pytest

from zrepl import FollowerState, NodeRole

from .helpers import wait_for
from .helpers.cluster import Cluster, kv_set, wait_applied, wait_synchronous
from .helpers.load import Writer, missing

pytestmark = pytest.mark.timeout(180)


def test_four_node_chain_built_from_empty_nodes_while_writes_continue():
    with Cluster(max_retained_wal=500) as c:
        a, b, cc, d = (c.node(n).start() for n in "ABCD")
        a.client.set_role(NodeRole.LEADER, 1)
        c.client(a).apply_many([kv_set(f"k{i}", i) for i in range(20_000)])
        a.client.checkpoint()  # the leader's WAL no longer starts at 1
        wait_for(lambda: a.status().min_wal > 1, 30, "leader truncation")
        writer = Writer(c, [a])
        writer.start()
        wait_for(lambda: len(writer.acked) > 50, 30, "writes before the chain")
        c.chain([a, b, cc, d])
        wait_for(lambda: len(writer.acked) > 500, 60, "writes through the chain")
        writer.stop()
        top = a.status().max_wal
        for n in (b, cc, d):
            wait_applied(n, top)
        digests = {n.name: n.digest() for n in (a, b, cc, d)}
        assert len({(x["sha256"], x["wal_id"]) for x in digests.values()}) == 1, digests
        assert not missing(d, writer.acked)
        # every link synchronous, and each forwarder synced its follower from
        # its own state (its WAL did not reach back to 1)
        for up in (a, b, cc):
            st = up.status()
            assert st.follower_state == FollowerState.SYNCHRONOUS and st.follower_sync
            assert st.extra.get("state_syncs_sent") == 1
        histories = {n.name: n.status().epoch_history for n in (a, b, cc, d)}
        assert all(h == [(1, 1)] for h in histories.values()), histories








def test_an_asynchronous_link_acknowledges_before_its_follower():
    with Cluster(ack_timeout=3, state_sync_stall_timeout=12) as c:
        a = c.node("A").start()
        b = c.node("B", sync_downstream=False).start()
        cc = c.node("C").start()
        c.chain([a, b, cc])
        assert a.status().follower_sync and not b.status().follower_sync
        assert b.status().follower_state == FollowerState.SYNCHRONOUS
        import signal
        cc.kill(signal.SIGSTOP)
        try:
            # B answers A after its own apply: the write returns although C
            # is frozen and B would otherwise wait up to ack_timeout (3 s).
            assert c.client(a, timeout=1, retry_for=0).apply(kv_set("wan", 1)) == 0
        finally:
            cc.kill(signal.SIGCONT)
        wait_for(lambda: cc.state().get("wan") == 1, 10, "the write to reach C")


def test_a_hanging_tail_fails_only_the_link_next_to_it():
    """Deeper links time out sooner, so the forwarder answers its leader
    before the leader's own timer fires: the healthy link stays up."""
    import signal
    with Cluster(ack_timeout=1.0) as c:
        a, b, cc = (c.node(n).start() for n in "ABC")
        c.chain([a, b, cc])
        cc.kill(signal.SIGSTOP)
        try:
            client = c.client(a, timeout=5)
            assert client.apply(kv_set("while-frozen", 1)) == 0
            wait_for(lambda: b.status().follower_state != FollowerState.SYNCHRONOUS, 10,
                     "the forwarder to give up on its frozen follower")
            assert a.status().follower_state == FollowerState.SYNCHRONOUS
            assert a.status().extra["failures"] == 0
        finally:
            cc.kill(signal.SIGCONT)
        wait_synchronous(b)
        wait_for(lambda: cc.state().get("while-frozen") == 1, 10, "C to catch up")
