"""The engine's scenarios on the in-memory transport, in virtual time:
the real Replica, supervisor runner and client logic, deterministic (a
seed), no sleeps, no wall-clock timeouts.  (test_replication.py and
test_chain.py keep a smaller set on real processes and sockets.)"""

from __future__ import annotations

import pytest

from zrepl import FollowerState, NodeRole
from zrepl.engine.simulation import Simulation, kv_set

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sim():
    s = Simulation(seed=7)
    yield s
    s.close()


def write(node, n, prefix="k"):
    """``n`` commands through ``node``'s Manager (futures)."""
    return [node.replica.manager.apply_async(("set", f"{prefix}{i}", i)) for i in range(n)]


def done(futs):
    return all(f.done() for f in futs)


def missing(node, ops):
    state = node.state()
    return [op for op in ops if _key(op) not in state]


def _key(op):
    import msgpack
    return msgpack.unpackb(op.data, raw=False)[1]


def test_handshake_and_synchronous_commit(sim):
    a, b = sim.node("A"), sim.node("B")
    sim.chain([a, b])
    futs = write(a, 1)
    sim.run_until(lambda: done(futs), 1, "the write")
    assert futs[0].result() == 0
    # acknowledged means the follower applied it already
    assert b.position == a.position == 1
    futs = write(a, 500)
    sim.run_until(lambda: done(futs), 5)
    assert [f.result() for f in futs] == [0] * 500
    assert b.state() == a.state() and b.digest() == a.digest()
    st = a.status()
    assert st.follower_state == FollowerState.SYNCHRONOUS and st.follower_sync
    assert st.epoch_history == b.status().epoch_history == [(1, 1)]


def test_every_acknowledged_write_is_on_the_tail_when_it_is_answered(sim):
    nodes = [sim.node(n) for n in "ABCD"]
    sim.chain(nodes)
    client = sim.client(nodes)
    seen = []
    client.keep_writing(lambda i: kv_set(f"x{i}", i))
    while len(client.acked) < 300:
        sim.run_once()
        for op in client.acked[len(seen):]:
            seen.append(op)
            assert _key(op) in nodes[-1].state(), f"{_key(op)} answered before the tail had it"


def big_leader_under_writes(sim, keep_from: int, **settings):
    """A leader with 20,000 entries whose WAL starts at ``keep_from`` (a
    follower that needs less needs a state sync), and a client writing
    through it."""
    a = sim.node("A", **settings)
    a.replica.set_role(NodeRole.LEADER, 1)
    futs = write(a, 20_000)
    sim.run_until(lambda: done(futs), 10)
    a.storage.truncate_wal_before_id(keep_from)
    client = sim.client([a])
    client.keep_writing(lambda i: kv_set(f"w{i}", i))
    sim.run_until(lambda: len(client.acked) > 50, 5)
    return a, client


def test_empty_follower_joins_a_leader_while_writes_continue_by_state_sync(sim):
    a, client = big_leader_under_writes(sim, 19_000, max_retained_wal=1000)
    b = sim.node("B")
    b.replica.set_role(NodeRole.FOLLOWER, 1)
    a.replica.set_follower(b.address)
    sim.run_until(lambda: a.status().follower_sync, 30, "synchronous after the state sync")
    n = len(client.acked)
    sim.run_until(lambda: len(client.acked) > n + 300, 10)
    client.stop_writing()
    sim.run_until(lambda: not client.queue and client._current is None, 10)
    sim.run_until(lambda: b.position == a.position, 10)
    assert b.status().extra["state_syncs_received"] == 1
    assert a.digest() == b.digest()
    assert not missing(b, client.acked)


def test_restarted_follower_catches_up_from_the_log_within_retention(sim):
    a, b = sim.node("A", max_retained_wal=2000), sim.node("B")
    sim.chain([a, b])
    futs = write(a, 1000, "a")
    sim.run_until(lambda: done(futs), 5)
    b.crash()
    futs = write(a, 1500, "b")
    sim.run_until(lambda: done(futs), 5)
    b.start()
    sim.run_until(lambda: a.status().follower_sync and b.position == a.position, 10)
    assert b.status().extra.get("state_syncs_received", 0) == 0  # the log only
    assert a.status().extra["log_catchups"] >= 2
    assert a.digest() == b.digest()


def test_four_node_chain_built_from_empty_nodes_while_writes_continue(sim):
    a, client = big_leader_under_writes(sim, 19_900, max_retained_wal=500)  # a sync per hop
    b, c, d = (sim.node(n) for n in "BCD")
    sim.chain([a, b, c, d], wait=False)
    nodes = [a, b, c, d]
    while not all(n.status().follower_sync for n in nodes[:-1]):
        sim.run_once()
        assert_claims_hold(nodes)
        assert sim.clock.now() < 1100, "the chain never became synchronous"
    n = len(client.acked)
    sim.run_until(lambda: len(client.acked) > n + 500, 10)
    client.stop_writing()
    sim.run_until(lambda: client._current is None, 10)
    sim.run_until(lambda: all(x.position == a.position for x in nodes), 10)
    assert len({x.digest()["sha256"] for x in nodes}) == 1
    assert not missing(d, client.acked)
    for up in (a, b, c):
        assert up.status().extra["state_syncs_sent"] >= 1
    assert all(x.status().epoch_history == [(1, 1)] for x in nodes)


def assert_claims_hold(nodes):
    """What SYNCHRONOUS promises: the follower holds everything the node
    holds, but for what is in flight to it."""
    for up, down in zip(nodes, nodes[1:]):
        st = up.status()
        if st.follower_sync and st.follower == down.address:
            in_flight = st.extra["in_flight"]
            assert down.position >= st.follower_acked_wal, (up.name, st)
            assert in_flight or down.position >= up.position, \
                f"{up.name} claims {down.name} synchronous at {down.position} < {up.position}"


def test_killed_middle_forwarder_tail_reattaches_and_catches_up_from_the_log(sim):
    a, b, c = (sim.node(n, require_sync=True) for n in "ABC")
    sim.chain([a, b, c])
    client = sim.client([a])
    client.keep_writing(lambda i: kv_set(f"w{i}", i))
    sim.run_until(lambda: len(client.acked) > 300, 5)
    b.crash()
    syncs = c.status().extra.get("state_syncs_received", 0)
    c.replica.set_leader(a.address)
    a.replica.set_follower(c.address)
    sim.run_until(lambda: a.status().follower_sync, 10)
    n = len(client.acked)
    sim.run_until(lambda: len(client.acked) > n + 300, 10)
    client.stop_writing()
    sim.run_until(lambda: client._current is None and c.position == a.position, 10)
    assert c.status().extra.get("state_syncs_received", 0) == syncs
    assert not missing(c, client.acked) and not missing(a, client.acked)
    assert a.digest() == c.digest()


def test_stale_leader_is_refused_down_the_chain(sim):
    a, b, c = (sim.node(n, ack_timeout=0.3) for n in "ABC")
    sim.chain([a, b, c])
    futs = write(a, 1, "before")
    sim.run_until(lambda: done(futs), 1)
    b.replica.set_role(NodeRole.FORWARDER, 2)  # a newer epoch exists
    futs = write(a, 5, "stale")  # A, deposed, commits locally only
    sim.run_until(lambda: a.status().follower_state == FollowerState.ERROR, 5)
    assert "StaleLeader" in a.status().extra["follower_error"]
    for n in (b, c):
        assert not [k for k in n.state() if k.startswith("stale")]
        assert n.state()["before0"] == 0
    # (B passes nothing on until a leader of epoch 2 has checked its log:
    # the tail hears of the epoch from that leader's stream)
    assert c.status().leader_id == 1 and b.status().follower_state == FollowerState.NOT_CONNECTED


def test_a_follower_that_keeps_acknowledging_is_busy_not_dead(sim):
    """A follower working through a long catch-up acknowledges slowly but
    steadily: the link is never declared failed for it (the leader once
    reset the link during perf/sync.py's 1M-entry catch-up)."""
    from workers.kv import KV

    class SlowKV(KV):
        def apply(self, cmds):  # 0.2 virtual seconds per batch of the catch-up
            if len(cmds) > 100:
                sim.network.charge(b.address, 0.2)
            return super().apply(cmds)

    a = sim.node("A", ack_timeout=0.5, stream_batch_entries=1000)
    a.replica.set_role(NodeRole.LEADER, 1)
    futs = write(a, 20_000)
    sim.run_until(lambda: done(futs), 10)
    b = sim.node("B", app=SlowKV)
    b.replica.set_role(NodeRole.FOLLOWER, 1)
    a.replica.set_follower(b.address)
    sim.run_until(lambda: a.status().follower_sync, 60, "synchronous after a slow catch-up")
    # 20 batches of 0.2 s, 8 in flight: the oldest waited far longer than
    # ack_timeout, but an acknowledgement came every 0.2 s
    assert sim.clock.now() - 1000 > 3.0
    assert a.status().extra["failures"] == 0
    assert a.status().extra["log_catchups"] == 1
    assert b.digest() == a.digest()


def test_a_follower_that_acknowledges_nothing_is_failed():
    sim = Simulation(seed=3)
    try:
        a, b = sim.node("A", ack_timeout=0.5), sim.node("B")
        sim.chain([a, b])
        sim.network.cut(a.address, b.address)
        futs = write(a, 3)
        sim.run_until(lambda: done(futs), 5)
        assert [f.result() for f in futs] == [0, 0, 0]  # availability first (no require_sync)
        assert a.status().extra["failures"] >= 1
        assert "acknowledged nothing within 0.5s" in a.status().extra["last_failure"]
    finally:
        sim.close()


def test_failover_loses_no_acknowledged_write_and_the_old_leader_rejoins(sim):
    settings = dict(require_sync=True, lease_required=True)
    nodes = [sim.node(n, **settings) for n in "ABC"]
    sup = sim.supervisor(nodes, **settings)
    sim.run_until(lambda: sim.healthy_chain(nodes), 10, "the supervisor's chain")
    client = sim.client(nodes, timeout=0.3, retry_for=30)
    client.keep_writing(lambda i: kv_set(f"w{i}", i))
    leaders = []
    for _ in range(4):
        sim.run_until(lambda: sim.healthy_chain(nodes) and
                      len(sup.status()["synchronous_chain"]) == 2, 30)
        n = len(client.acked)
        sim.run_until(lambda: len(client.acked) > n + 100, 10)
        old = sim.leader_of(nodes)
        leaders.append(old.name)
        t_kill = sim.clock.now()
        acked_before = list(client.acked)
        old.crash()
        new = sim.run_until(lambda: (x := sim.leader_of(nodes)) is not old and x, 10,
                            "a new leader")
        assert not missing(new, acked_before)
        sim.run_until(lambda: any(op.done and op.node != old.address and op.invoked > t_kill
                                  for op in client.acked), 10, "a write through the new leader")
        old.start()  # rejoins at the tail
    client.stop_writing()
    sim.run_until(lambda: client._current is None, 30)
    chain = sim.run_until(lambda: sim.healthy_chain(nodes), 30)
    sim.run_until(lambda: all(x.position == chain[0].position for x in nodes), 10)
    assert len({x.digest()["sha256"] for x in nodes}) == 1
    for x in nodes:
        assert not missing(x, client.acked), x.name
    assert all(op.error is None for op in client.ops if op.done)
    assert len(set(leaders)) == 3


def test_old_leader_with_an_unacknowledged_tail_is_cut_back_when_it_rejoins(sim):
    a, b = sim.node("A", ack_timeout=0.3), sim.node("B")
    sim.chain([a, b])
    futs = write(a, 100, "ok")
    sim.run_until(lambda: done(futs), 5)
    sim.network.cut(a.address, b.address)  # B hears nothing more from A
    futs = write(a, 5, "lost")  # committed on A alone (no require_sync)
    sim.run_until(lambda: done(futs), 5)
    assert a.position == 105 and b.position == 100
    a.crash()
    sim.network.heal()
    b.replica.set_role(NodeRole.LEADER, 2)
    futs = write(b, 10, "new")
    sim.run_until(lambda: done(futs), 5)
    a.start()
    a.replica.set_role(NodeRole.FOLLOWER, 2)
    b.replica.set_follower(a.address)
    sim.run_until(lambda: b.status().follower_sync and a.position == b.position, 10)
    state = a.state()
    assert state == b.state() and a.digest() == b.digest()
    assert not [k for k in state if k.startswith("lost")]
    assert all(f"ok{i}" in state for i in range(100)) and all(f"new{i}" in state
                                                             for i in range(10))
    assert a.status().extra["state_syncs_received"] == 1  # rebuilt: it had applied them
    assert a.status().epoch_history == b.status().epoch_history == [(1, 1), (2, 101)]


def test_a_paused_leader_acknowledges_nothing_the_new_leader_lacks(sim):
    settings = dict(require_sync=True, lease_required=True)
    nodes = [sim.node(n, **settings) for n in "ABC"]
    sup = sim.supervisor(nodes, **settings)
    sim.run_until(lambda: sim.healthy_chain(nodes) and
                  len(sup.status()["synchronous_chain"]) == 2, 10)
    client = sim.client(nodes, timeout=0.3, retry_for=30)
    client.keep_writing(lambda i: kv_set(f"w{i}", i))
    sim.run_until(lambda: len(client.acked) > 100, 5)
    old = sim.leader_of(nodes)
    sim.network.charge(old.address, 3.0)  # stops the world for longer than its lease
    others = [n for n in nodes if n is not old]
    new = sim.run_until(lambda: sim.leader_of(others), 10, "a new leader")
    n = len(client.acked)
    sim.run_until(lambda: len(client.acked) > n + 100, 10)
    sim.run_until(lambda: sim.healthy_chain(nodes), 30, "the old leader back as a follower")
    assert old.status().role != NodeRole.LEADER
    client.stop_writing()
    sim.run_until(lambda: client._current is None, 30)
    sim.run_until(lambda: old.position == new.position, 10)
    assert not missing(new, client.acked) and not missing(old, client.acked)
    assert old.digest() == new.digest()


def test_a_lease_counts_from_when_the_renewal_arrived_not_when_it_was_handled(sim):
    """A leader busy when the supervisor's renewal arrives must not stretch
    its lease by the time it was busy: the supervisor counts from sending."""
    from zrepl.core import protocol

    a = sim.node("A", lease_required=True)
    a.replica.set_role(NodeRole.LEADER, 1)
    sim.run_for(0.01)
    op = sim.transport("operator").requester(protocol.endpoints(a.address).control, a.config)
    sent = sim.clock.now()
    sim.network.charge(a.address, 0.3)  # busy for 0.3 s from now
    op.send(protocol.control_request("status", {"renew_lease_for": 1, "lease": 0.5}))
    reply = sim.run_until(op.recv, 1, "the status reply")
    assert sim.clock.now() - sent >= 0.3
    until = a.replica.core.lease_until
    assert until <= sent + 0.5 + 0.001, (until - sent)
    assert protocol.parse_control_reply(reply)["extra"]["lease_left"] <= 0.21
