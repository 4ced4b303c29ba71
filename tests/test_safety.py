"""The two safety bugs the engine core was built to end, reproduced
deterministically in the simulation - each with a twin that puts the old
behaviour back and shows the check fails then.

1. A forwarder whose position jumps (a state sync from its upstream) while
   its own link is SYNCHRONOUS kept calling its follower synchronous
   although that follower held nothing; the supervisor would have promoted
   the empty tail and lost every acknowledged write.
2. A ``leader_only`` read answered "between two applies" could show a
   write still waiting for its acknowledgement, which a failover then
   loses: not linearizable.
"""

from __future__ import annotations

import msgpack
import pytest

from zrepl import Config, NodeRole
from zrepl.core.link import Link
from zrepl.core.node import NodeCore
from zrepl.core import plan as plan_module
from zrepl.core.plan import Memory, plan
from zrepl.engine.simulation import Simulation

pytestmark = pytest.mark.timeout(120)

CFG = Config(missed_heartbeats=3)


def jump_without_restart(self, position, why, now):
    """The old behaviour: the position moves, the link stays as it was."""
    self.position = position
    return []


def promotes_an_empty_tail() -> tuple[list[str], bool]:
    """A leader A with 20,000 acknowledged writes and a WAL that no longer
    reaches back to 1; B and C empty.  B was A's follower while A was
    empty (so A checked B's log), then unlinked.  B -> C is linked first
    (both empty: synchronous at once), then A -> B, which needs a state
    sync.  After
    each round, the supervisor's plan is asked what it would do with the
    statuses the nodes report if A and B died now.  Returns what went
    wrong, and whether C caught up within 5 virtual seconds."""
    sim = Simulation(seed=11)
    problems: list[str] = []
    try:
        a = sim.node("A", max_retained_wal=100)
        b, c = sim.node("B"), sim.node("C")
        a.replica.set_role(NodeRole.LEADER, 1)
        b.replica.set_role(NodeRole.FORWARDER, 1)
        b.replica.set_leader(a.address)
        a.replica.set_follower(b.address)
        sim.run_until(lambda: a.status().follower_sync, 5, "A -> B synchronous (both empty)")
        a.replica.set_follower("")
        futs = [a.replica.manager.apply_async(("set", f"k{i}", i)) for i in range(20_000)]
        sim.run_until(lambda: all(f.done() for f in futs), 10)
        acked = a.position
        a.storage.truncate_wal_before_id(acked - 50)
        c.replica.set_role(NodeRole.FOLLOWER, 1)
        c.replica.set_leader(b.address)
        b.replica.set_follower(c.address)
        sim.run_until(lambda: b.status().follower_sync, 5, "B -> C synchronous (both empty)")
        b.replica.set_leader(a.address)
        a.replica.set_follower(b.address)
        order = [a.address, b.address, c.address]
        memory = Memory(max_leader_id=1, leader=a.address, leader_id=1,
                        chain=[b.address, c.address])
        give_up = sim.clock.now() + 5
        while not (settled := c.position == acked and b.status().follower_sync):
            if sim.clock.now() > give_up:
                break
            sim.run_once()
            observed = {n.address: n.status() for n in (a, b, c)}
            memory = plan(order, observed, memory, CFG, sim.clock.now()).memory
            # ... and if A and B died now?
            after = memory
            for _ in range(CFG.missed_heartbeats):
                p = plan(order, {a.address: None, b.address: None,
                                 c.address: observed[c.address]}, after, CFG, 10**9)
                after = p.memory
            if p.new_epoch and p.memory.leader == c.address and c.position < acked:
                problems.append(f"at {sim.clock.now():.4f}: C promoted holding "
                                f"{c.position} of {acked} acknowledged entries")
            st = observed[b.address]
            if st.follower_sync and c.position < b.position and not st.extra["in_flight"]:
                problems.append(f"B claims C synchronous at {c.position} < {b.position}")
        assert b.status().extra["state_syncs_received"] == 1
    finally:
        sim.close()
    return problems, settled


def test_a_position_that_jumps_restarts_the_link():
    assert promotes_an_empty_tail() == ([], True)


def any_recorded_member(mem, alive, dead):
    """The planner's old rule: every member of the recorded synchronous
    chain that still holds what it held is promotable."""
    return [(alive[a].max_wal, -i, a) for i, (a, pos) in enumerate(mem.sync_chain)
            if a in alive and a not in dead and alive[a].leader_id == mem.leader_id
            and alive[a].position >= pos]


def test_without_the_rule_the_empty_tail_is_called_synchronous(monkeypatch):
    """The twin: the old behaviour (a jump keeps the link, the claim is not
    checked against the window) and the same scenario finds the bug.  (The
    planner's rule that a deeper node must hold as much as the leader's
    follower - found by ``zrepl sim`` - would refuse this promotion on its
    own: the twin puts the old rule back too.)"""
    monkeypatch.setattr(NodeCore, "_jump", jump_without_restart)
    monkeypatch.setattr(Link, "covers", lambda self, position: True)
    monkeypatch.setattr(plan_module, "promotable", any_recorded_member)
    problems, settled = promotes_an_empty_tail()
    assert not settled  # C holds nothing and nobody sends it anything
    assert any("C promoted holding 0 of 20000" in p for p in problems), problems
    assert any("B claims C synchronous at 0" in p for p in problems), problems


# --- leader reads -------------------------------------------------------------------


def get(key: str) -> bytes:
    return msgpack.packb(("get", key), use_bin_type=True)


def value(op):
    found, v = msgpack.unpackb(op.answer, raw=False)
    return v if found else None


def leader_reads_with_a_follower_cut_off(sim: Simulation) -> list[tuple]:
    """Leader A, follower B, require_sync.  ``x`` = 1 is acknowledged;
    then B is cut off and ``x`` = 2 is applied on A but never
    acknowledged.  Leader reads of ``x`` meanwhile: (answer, error)."""
    a = sim.node("A", require_sync=True, ack_timeout=0.5, leader_read_timeout=1.0)
    b = sim.node("B", require_sync=True)
    sim.chain([a, b])
    first = a.replica.manager.apply_async(("set", "x", 1))
    sim.run_until(first.done, 1)
    assert first.result() == 0
    sim.network.cut(a.address, b.address)
    second = a.replica.manager.apply_async(("set", "x", 2))
    sim.run_until(lambda: a.state().get("x") == 2, 1, "x = 2 applied on the leader")
    client = sim.client([a], timeout=3, retry_for=0)
    reads = [client.query(get("x"), leader_only=True) for _ in range(3)]
    sim.run_until(lambda: all(r.done for r in reads) and second.done(), 10)
    assert second.exception() is not None  # x = 2 was never acknowledged
    return [(value(r) if r.error is None else None, r.error) for r in reads]


def test_a_leader_read_never_shows_an_unacknowledged_write():
    sim = Simulation(seed=5)
    try:
        results = leader_reads_with_a_follower_cut_off(sim)
    finally:
        sim.close()
    assert all(v != 2 for v, _ in results), results
    # the reads waited for the barrier and timed out: nothing acknowledged
    # x = 2, and the leader's App held it
    assert all(err is not None and "not acknowledged" in str(err) for _, err in results)


def test_the_old_read_path_shows_the_unacknowledged_write(monkeypatch):
    """The twin: answering leader reads whenever the lease is valid (the
    old rule) shows x = 2, a write that was never acknowledged."""
    def old_rule(self, now):
        self.check_writable(now)
        return True

    monkeypatch.setattr(NodeCore, "leader_read", old_rule)
    sim = Simulation(seed=5)
    try:
        results = leader_reads_with_a_follower_cut_off(sim)
    finally:
        sim.close()
    assert any(v == 2 for v, _ in results), results


def test_a_leader_read_waits_for_the_writes_before_it_then_sees_them():
    """Under load the barrier holds new commits back for a moment and the
    read is answered once what it may see is acknowledged."""
    sim = Simulation(seed=9)
    try:
        a, b = sim.node("A"), sim.node("B")
        sim.chain([a, b])
        writer = sim.client([a], name="writer")
        writer.keep_writing(lambda i: msgpack.packb(("incr", "n", 1), use_bin_type=True))
        sim.run_until(lambda: len(writer.acked) > 50, 5)
        reader = sim.client([a], name="reader")
        seen = []
        for _ in range(20):
            op = reader.query(msgpack.packb(("get", "n"), use_bin_type=True), leader_only=True)
            acked_before = len(writer.acked)
            sim.run_until(lambda: op.done, 5)
            assert op.error is None, op.error
            n = value(op)
            # every increment acknowledged before the read was sent is in it,
            # and nothing that was not acknowledged by the time it answered
            assert acked_before <= n <= len(writer.acked) + 1, (acked_before, n)
            seen.append(n)
        assert seen == sorted(seen)
        assert a.status().extra["commit_index"] >= seen[-1]
    finally:
        sim.close()
