"""The supervisor's decisions: statuses in, calls out - with made-up statuses,
and with the statuses of real engines failing at random in the simulation."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrepl import Config, FollowerState, NodeRole, NodeStatus, ReplicationError
from zrepl.core.plan import Call, Memory, plan, synchronous_chain

A, B, C = "tcp://a:1000", "tcp://b:1000", "tcp://c:1000"
ORDER = [A, B, C]
CFG = Config(missed_heartbeats=3)
L, F, FW = NodeRole.LEADER, NodeRole.FOLLOWER, NodeRole.FORWARDER
SYNC, NONE = FollowerState.SYNCHRONOUS, FollowerState.NONE


def s(addr, role=NodeRole.UNKNOWN, lid=0, wal=0, follower="", fstate=NONE, leader="",
      require_sync=True, history=None):
    return NodeStatus(addr, role, lid, wal, 1 if wal else 0, wal, follower, fstate, leader=leader,
                      epoch_history=history if history is not None else ([(lid, 1)] if lid else []),
                      follower_sync=fstate == SYNC, extra={"require_sync": require_sync})


def steady(wal=100, lid=1):
    """A -> B -> C, all synchronous, epoch ``lid``."""
    return {A: s(A, L, lid, wal, B, SYNC), B: s(B, FW, lid, wal, C, SYNC, leader=A),
            C: s(C, F, lid, wal, leader=B)}


def steady_memory(lid=1, wal=100):
    return Memory(max_leader_id=lid, leader=A, leader_id=lid, sync_chain=[(B, wal), (C, wal)],
                  chain=[B, C], sync_boot={A: "", B: "", C: ""})


def ops(p):
    return [str(c) for c in p.calls]


def test_fresh_cluster_builds_leader_forwarder_follower():
    p = plan(ORDER, {a: s(a) for a in ORDER}, Memory(), CFG, now=0)
    assert p.new_epoch == 1 and p.memory.leader == A
    assert ops(p) == [str(Call("set_role", A, L, 1)), str(Call("renew", A, leader_id=1)),
                      str(Call("set_follower", A, target=B)),
                      str(Call("set_role", B, FW, 1)), str(Call("set_leader", B, target=A)),
                      str(Call("set_follower", B, target=C)),
                      str(Call("set_role", C, F, 1)), str(Call("set_leader", C, target=B))]


def test_fresh_cluster_waits_for_every_node_or_its_death():
    obs = {A: s(A), B: s(B), C: None}
    mem = Memory()
    for _ in range(2):
        p = plan(ORDER, obs, mem, CFG, now=0)
        assert p.calls == [] and "waiting for every node" in p.memory.note
        mem = p.memory
    p = plan(ORDER, obs, mem, CFG, now=0)  # C missed 3 polls: dead
    assert p.memory.leader == A and [c.address for c in p.calls if c.op == "set_role"] == [A, B]


def test_fresh_cluster_picks_the_most_advanced_node():
    obs = {A: s(A, F, 2, 50, history=[(1, 1), (2, 20)]), B: s(B, F, 2, 80, history=[(1, 1), (2, 20)]),
           C: s(C, F, 1, 90, history=[(1, 1)])}
    p = plan(ORDER, obs, Memory(), CFG, now=0)
    assert p.memory.leader == B and p.new_epoch == 3  # above every epoch seen


def test_steady_state_makes_no_call():
    p = plan(ORDER, steady(), steady_memory(), CFG, now=10)
    assert p.calls == [] and not p.persist
    assert p.memory.sync_chain == [(B, 100), (C, 100)]


def test_restarted_supervisor_adopts_the_running_cluster_without_failover():
    p = plan(ORDER, steady(lid=4), Memory(), CFG, now=0)
    assert p.calls == [] and p.new_epoch == 0
    assert (p.memory.leader, p.memory.leader_id, p.memory.max_leader_id) == (A, 4, 4)


def dead_leader(mem, obs, now):
    for _ in range(CFG.missed_heartbeats):
        p = plan(ORDER, obs, mem, CFG, now)
        mem = p.memory
    return p


def test_dead_leader_waits_for_its_lease_then_promotes_the_synchronous_follower():
    mem = steady_memory()
    mem.lease_safe_at = 50.0
    obs = dict(steady())
    obs[A] = None
    p = dead_leader(mem, obs, now=49.0)
    assert p.calls == [] and "waiting" in p.memory.note and "lease" in p.memory.note
    p = plan(ORDER, obs, p.memory, CFG, now=50.0)
    assert p.new_epoch == 2 and p.memory.leader == B
    assert str(p.calls[0]) == str(Call("set_role", B, L, 2))
    assert str(Call("set_role", C, F, 2)) in ops(p)
    assert p.events == [(logging.WARNING, f"leader {A} is dead: promoting {B} with epoch 2")]


def test_plan_logs_nothing_itself(caplog):
    """plan() is pure: what is worth logging comes back in Plan.events for
    the Supervisor to log."""
    caplog.set_level(logging.DEBUG)
    p = plan(ORDER, {a: s(a) for a in ORDER}, Memory(), CFG, now=0)
    assert p.events == [(logging.WARNING, f"no leader: making {A} the leader of epoch 1")]
    obs = dict(steady())
    obs[A] = obs[B] = obs[C] = None
    p = dead_leader(steady_memory(), obs, now=100.0)
    assert [lvl for lvl, _ in p.events] == [logging.ERROR] and "promoting nobody" in p.events[0][1]
    assert caplog.records == []


def test_promotion_prefers_the_longest_wal_then_the_closest():
    mem = steady_memory()
    obs = dict(steady())
    obs[A] = None
    obs[C] = s(C, F, 1, 101, leader=B)  # C got one more entry than B (B acked after it)
    p = dead_leader(mem, obs, now=100)
    assert p.memory.leader == C


def test_no_promotion_without_a_node_known_to_hold_every_acknowledged_write():
    mem = steady_memory()
    mem.sync_chain = []
    obs = dict(steady())
    obs[A] = None
    p = dead_leader(mem, obs, now=100)
    assert p.calls == [] and p.new_epoch == 0 and "promoting nobody" in p.memory.note


def test_a_sync_chain_member_that_lost_data_or_changed_epoch_is_not_a_candidate():
    mem = steady_memory()
    obs = dict(steady())
    obs[A] = None
    obs[B] = s(B, FW, 1, 60, C, SYNC, leader=A)  # restarted with less WAL than it held
    obs[C] = s(C, F, 5, 100, leader=B)  # obeys another epoch now
    p = dead_leader(mem, obs, now=100)
    assert p.calls == [] and "promoting nobody" in p.memory.note


def test_with_require_sync_the_last_synchronous_chain_is_kept():
    obs = dict(steady())
    obs[A] = s(A, L, 1, 120, B, FollowerState.SYNCING_LOG)  # B dropped out for a moment
    p = plan(ORDER, obs, steady_memory(), CFG, now=10)
    assert p.memory.sync_chain == [(B, 100), (C, 100)]
    obs[A] = s(A, L, 1, 120, B, FollowerState.SYNCING_LOG, require_sync=False)
    p = plan(ORDER, obs, steady_memory(), CFG, now=10)
    assert p.memory.sync_chain == []  # without require_sync the leader commits alone


def test_dead_middle_node_is_healed_around_and_rejoins_at_the_tail():
    mem = steady_memory()
    obs = dict(steady())
    obs[B] = None
    for _ in range(CFG.missed_heartbeats - 1):
        p = plan(ORDER, obs, mem, CFG, now=10)
        assert p.calls == []  # suspect: nothing changes yet
        mem = p.memory
    p = plan(ORDER, obs, mem, CFG, now=10)
    assert set(ops(p)) == {str(Call("set_follower", A, target=C)),
                           str(Call("set_leader", C, target=A))}
    # B comes back (empty, restarted): it joins at the tail
    obs = {A: s(A, L, 1, 120, C, SYNC), B: s(B, FW, 1, 0), C: s(C, F, 1, 120, leader=A)}
    p = plan(ORDER, obs, p.memory, CFG, now=11)
    assert p.memory.chain == [C, B]
    assert set(ops(p)) == {str(Call("set_role", C, FW, 1)), str(Call("set_follower", C, target=B)),
                           str(Call("set_role", B, F, 1)), str(Call("set_leader", B, target=C))}


def test_returning_old_leader_becomes_a_follower_at_the_tail():
    mem = Memory(max_leader_id=2, leader=B, leader_id=2, sync_chain=[(C, 130)], chain=[C])
    obs = {A: s(A, L, 1, 140, B, FollowerState.ERROR),  # the old leader, epoch 1
           B: s(B, L, 2, 130, C, SYNC), C: s(C, F, 2, 130, leader=B)}
    p = plan(ORDER, obs, mem, CFG, now=0)
    assert p.memory.leader == B and p.memory.chain == [C, A]
    assert str(Call("set_role", A, F, 2)) in ops(p)
    assert str(Call("set_follower", A, target="")) in ops(p)
    assert str(Call("set_follower", C, target=A)) in ops(p)


def test_new_epochs_exceed_every_epoch_issued_or_seen():
    obs = dict(steady())
    obs[A] = None
    assert dead_leader(steady_memory(), obs, now=100).new_epoch == 2
    mem = steady_memory()
    mem.max_leader_id = 7  # issued earlier (state file)
    assert dead_leader(mem, obs, now=100).new_epoch == 8
    stranger = dict(obs)
    stranger[C] = s(C, F, 1, 100, leader=B)
    stranger[C].leader_id = 1
    stranger[B] = s(B, FW, 1, 100, C, SYNC, leader=A)
    stranger[B].epoch_history = [(1, 1), (9, 100)]  # histories do not count: statuses' ids do
    stranger[C].leader_id = 12  # a node obeying epoch 12, which this supervisor never issued
    p = dead_leader(steady_memory(), stranger, now=100)
    # (it is fenced rather than outbid: see the test below)
    assert p.new_epoch == 2 and p.memory.leader == B and p.memory.fenced == {C: 12}
    p = dead_leader(Memory(leader=A, leader_id=1, chain=[B, C], sync_chain=[(B, 100)]), stranger,
                    now=100)
    assert p.new_epoch == 13  # without a state file nothing is known: above all seen


def test_a_link_in_error_is_retried_with_backoff():
    obs = dict(steady())
    obs[B] = s(B, FW, 1, 100, C, FollowerState.ERROR, leader=A)
    p = plan(ORDER, obs, steady_memory(), CFG, now=100)
    assert ops(p) == [str(Call("set_follower", B, target=C))]
    p = plan(ORDER, obs, p.memory, CFG, now=101)
    assert p.calls == []  # not every tick
    p = plan(ORDER, obs, p.memory, CFG, now=106)
    assert ops(p) == [str(Call("set_follower", B, target=C))]


def test_synchronous_chain_stops_at_the_first_asynchronous_link():
    obs = dict(steady())
    obs[B] = s(B, FW, 1, 100, C, FollowerState.SYNCING_LOG, leader=A)
    assert synchronous_chain(A, obs) == [(B, 100)]
    assert synchronous_chain(A, {A: obs[A], B: None, C: obs[C]}) == []


@pytest.mark.timeout(600)  # a failure is shrunk: many more runs than the 40 examples
@settings(max_examples=int(__import__("os").environ.get("ZREPL_EXAMPLES", "40")), deadline=None,
          print_blob=True)
@given(st.integers(0, 2**32), st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()),
                                       min_size=1, max_size=10))
def test_random_failures_on_real_nodes_never_break_the_safety_rules(seed, rounds):
    crashes_on_real_nodes(seed, rounds)


_ABSENT = object()


def crashes_on_real_nodes(seed: int, rounds: list[tuple[bool, bool, bool]]) -> None:
    """Nodes crash and come back at random while a client writes; the
    statuses the supervisor plans from are the real engines' (in the
    simulation), not a model of them.  Checked at every plan: epochs only
    grow, at most one leader is named, nobody is promoted while the leader
    answers or before its lease ran out, and the promoted node was in the
    last synchronous chain.  Checked at every step: a leader that may
    accept writes holds every write acknowledged so far."""
    from zrepl.engine.simulation import Simulation, kv_set
    from zrepl.engine.supervisor import Supervisor

    sim = Simulation(seed=seed)
    settings = dict(require_sync=True, lease_required=True)
    nodes = [sim.node(n, **settings) for n in "ABC"]
    sim.supervisor(nodes, **settings)
    client = sim.client(nodes, timeout=0.3, retry_for=5)
    client.keep_writing(lambda i: kv_set(f"w{i}", i))
    epochs = [0]
    real_tick = Supervisor.tick_with

    def checked_tick(self, observed, now):
        before = self.memory
        p = real_tick(self, observed, now)
        leaders = [c for c in p.calls if c.op == "set_role" and c.role == NodeRole.LEADER]
        assert len(leaders) <= 1
        if leaders:
            assert leaders[0].leader_id > epochs[-1]
            epochs.append(leaders[0].leader_id)
            old = observed.get(before.leader) if before.leader else None
            if old is not None:  # it answers: only if it writes no more in its epoch
                assert old.extra.get("epoch_spent"), "promoted while the leader answers"
                assert leaders[0].address in [before.leader] + [a for a, _ in before.sync_chain]
            elif before.leader:
                assert now >= before.lease_safe_at, "promoted before the lease ran out"
                assert leaders[0].address in [a for a, _ in before.sync_chain]
        return p

    checked: dict = {}  # (node, epoch) -> acknowledged writes already found on it

    def leader_holds_every_acknowledged_write() -> None:
        acked = client.acked
        for n in nodes:
            if not n.running:
                continue
            core = n.replica.core
            try:
                core.check_writable(sim.clock.now())
            except ReplicationError:
                continue
            done = checked.get((n.name, n.starts, core.leader_id), 0)
            holds = n.app.get  # (a lookup in its store per write, not a copy of the state)
            for op in acked[done:]:
                assert holds(_key(op), _ABSENT) is not _ABSENT, \
                    f"seed {seed}: {n.name} leads without {_key(op)}"
            checked[(n.name, n.starts, core.leader_id)] = len(acked)

    Supervisor.tick_with = checked_tick
    try:
        for ups in rounds:
            for n, up in zip(nodes, ups):
                if up and not n.running:
                    n.start()
                elif not up and n.running:
                    n.crash()
            end = sim.clock.now() + 0.4
            while sim.clock.now() < end:
                sim.run_once()
                leader_holds_every_acknowledged_write()
        for n in nodes:  # everyone back: the cluster heals and converges
            if not n.running:
                n.start()
        sim.run_until(lambda: sim.healthy_chain(nodes), 30, "a healthy chain at the end")
        client.stop_writing()
        sim.run_until(lambda: client._current is None, 15)
        top = sim.healthy_chain(nodes)[0].position
        sim.run_until(lambda: all(n.position == top for n in nodes), 15)
        acked = {_key(op) for op in client.acked}
        for n in nodes:
            assert not acked - set(n.state()), n.name
        assert len({n.digest()["sha256"] for n in nodes}) == 1
    finally:
        Supervisor.tick_with = real_tick
        sim.close()


def _key(op) -> str:
    import msgpack
    return msgpack.unpackb(op.data, raw=False)[1]


# --- rules the simulator found (zrepl sim) --------------------------------------------


def with_extra(st, **extra):
    st.extra.update(extra)
    return st


def test_a_deeper_chain_member_behind_the_leaders_follower_is_not_promoted():
    obs = dict(steady())
    obs[A] = None
    obs[B] = None  # the leader's own follower is gone too
    p = dead_leader(steady_memory(), obs, now=100)
    assert p.calls == [] and "promoting nobody" in p.memory.note  # C may have fallen behind
    obs[B] = s(B, FW, 1, 120, C, FollowerState.SYNCING_LOG, leader=A)
    obs[C] = s(C, F, 1, 110, leader=B)  # C fell behind B since it was recorded
    p = dead_leader(steady_memory(), obs, now=100)
    assert p.memory.leader == B


def test_a_follower_rebooted_since_it_was_seen_synchronous_is_not_promoted():
    mem = steady_memory()
    mem.sync_boot = {A: "a1", B: "b1", C: "c1"}
    obs = dict(steady())
    obs[A] = None
    obs[B] = with_extra(s(B, FW, 1, 100, C, SYNC, leader=A), boot="b2")  # power loss
    obs[C] = with_extra(s(C, F, 1, 100, leader=B), boot="c1")
    p = dead_leader(mem, obs, now=100)
    assert p.new_epoch == 0 and "promoting nobody" in p.memory.note  # B may have lost writes
    obs[B].extra["acks_durable"] = True  # fsync="always": nothing acknowledged was lost
    assert dead_leader(mem, obs, now=100).memory.leader == B


def test_a_reboot_noticed_while_the_leader_lives_still_counts_once_the_leader_dies():
    """The leader answers and still claims B synchronous (an idle link),
    but B's machine rebooted: the planner re-links B and records its new
    boot, so that B's next claim counts.  Until that claim comes, B may
    have lost writes it acknowledged (only what it fsynced survived), even
    if its log is as long as when it was recorded: if the leader dies now,
    B is not promoted.  (Found by `zrepl sim` seed 3072, which then let a
    second machine lose power because B looked whole again.)"""
    mem = steady_memory()
    mem.sync_boot = {A: "a1", B: "b1", C: "c1"}
    obs = dict(steady(wal=110))
    obs[A] = with_extra(obs[A], boot="a1")
    obs[B] = with_extra(obs[B], boot="b2")  # power loss: synced up to 110 >= the 100 recorded
    obs[C] = with_extra(obs[C], boot="c1")
    p = plan(ORDER, obs, mem, CFG, now=10)
    assert str(Call("set_follower", A, target=B)) in ops(p)  # re-linked before it counts
    assert B not in dict(p.memory.sync_chain)
    after = p.memory
    obs[A] = None
    p = dead_leader(after, obs, now=100)
    assert p.new_epoch == 0 and "promoting nobody" in p.memory.note
    # B's fresh claim (the leader saw it synchronous since the reboot) counts again
    obs[A] = with_extra(s(A, L, 1, 120, B, SYNC), boot="a1")
    obs[B] = with_extra(s(B, FW, 1, 120, C, SYNC, leader=A), boot="b2")
    obs[C] = with_extra(s(C, F, 1, 120, leader=B), boot="c1")
    p = plan(ORDER, obs, after, CFG, now=200)
    assert B in dict(p.memory.sync_chain)


def spent_leader() -> tuple[Memory, dict]:
    """A -> B -> C seen synchronous on machines a1, b1, c1; A then restarted
    (same machine) and reports its epoch spent."""
    mem = steady_memory()
    mem.sync_boot = {A: "a1", B: "b1", C: "c1"}
    obs = dict(steady())
    obs[B] = with_extra(obs[B], boot="b1")
    obs[C] = with_extra(obs[C], boot="c1")
    obs[A] = with_extra(s(A, L, 1, 100, B, FollowerState.NOT_CONNECTED), epoch_spent=True,
                        boot="a1", require_sync=True)
    return mem, obs


def test_a_leader_whose_epoch_is_spent_is_replaced_at_once():
    mem, obs = spent_leader()
    p = plan(ORDER, obs, mem, CFG, now=10)  # the same boot: it lost nothing, it leads again
    assert p.new_epoch == 2 and p.memory.leader == A
    obs[A] = with_extra(s(A, L, 1, 90, B, FollowerState.NOT_CONNECTED), epoch_spent=True,
                        boot="a2", require_sync=True)  # rebooted, shorter log
    p = plan(ORDER, obs, mem, CFG, now=10)
    assert p.new_epoch == 2 and p.memory.leader == B  # the follower holds what A lost


def test_a_lost_promotion_is_not_said_again_to_a_leader_that_rebooted_since():
    # (sim seed 30001) A restarted, reported its epoch spent and was chosen
    # for epoch 2 itself; the promotion was lost in a power loss that took
    # A's unsynced tail, entries B and C acknowledged.
    mem, obs = spent_leader()
    p = plan(ORDER, obs, mem, CFG, now=10)
    assert p.new_epoch == 2 and p.memory.leader == A
    obs[A] = with_extra(s(A, L, 1, 90), boot="a2", require_sync=True)  # never heard of epoch 2
    obs[B] = with_extra(s(B, FW, 2, 100, C, SYNC, leader=A, history=[(1, 1)]), boot="b1")
    obs[C] = with_extra(s(C, F, 1, 100, leader=B), boot="c1")
    q = plan(ORDER, obs, p.memory, CFG, now=20)
    assert str(Call("set_role", A, L, 2)) not in ops(q)
    assert q.new_epoch == 3 and q.memory.leader in (B, C)  # they hold what A lost
    obs[A] = with_extra(s(A, L, 1, 100), boot="a1", require_sync=True)  # the same machine
    q = plan(ORDER, obs, p.memory, CFG, now=20)
    assert q.new_epoch == 0 and str(Call("set_role", A, L, 2)) in ops(q)  # said again


def test_a_node_holding_more_than_the_forwarder_it_refuses_moves_up_the_chain():
    # (sim seed 40098) C holds 334..336 of epoch 7, which no leader of epoch
    # 8 wrote; it refuses B, which holds less.  Only the leader can judge.
    mem = steady_memory(lid=8, wal=333)
    mem.sync_chain = [(B, 333)]
    obs = {A: s(A, L, 8, 333, B, SYNC), B: s(B, FW, 8, 333, C, FollowerState.NOT_CONNECTED,
                                                leader=A),
           C: s(C, F, 8, 336, leader=B, history=[(7, 1)])}
    p = plan(ORDER, obs, mem, CFG, now=10)
    assert p.memory.chain == [C, B]
    assert str(Call("set_follower", A, target=C)) in ops(p)
    assert str(Call("set_leader", C, target=A)) in ops(p)
    assert str(Call("set_leader", B, target=C)) in ops(p)
    # not while B itself is not synchronous (it may be catching up, or be
    # in a state sync that left it empty): C may hold what B will get
    obs[A] = s(A, L, 8, 340, B, FollowerState.SYNCING_LOG)
    assert plan(ORDER, obs, mem, CFG, now=10).memory.chain == [B, C]


def test_candidates_are_ranked_by_what_they_applied_not_what_they_logged():
    # (sim seed 50394) B was given to the leader A, got a state sync at 120
    # (its WAL then empty) and acknowledged write 120; C, recorded
    # synchronous long ago, restarted with 119 in its WAL.
    mem = steady_memory(wal=117)
    mem.sync_chain = [(C, 117)]
    mem.unconfirmed = [B]
    mem.chain = [B, C]
    after_sync = NodeStatus(B, F, 1, 0, 0, 120, "", NONE, leader=A, epoch_history=[(1, 1)],
                            extra={"require_sync": True})
    obs = {A: None, B: after_sync, C: s(C, FW, 1, 119, B, FollowerState.NOT_CONNECTED, leader=A)}
    p = dead_leader(mem, obs, now=100)
    assert p.new_epoch == 2 and p.memory.leader == B


def test_an_epoch_the_supervisor_never_issued_is_fenced_not_adopted():
    # (issue 12: set_role(LEADER, E+100) on a cleared node, set_role(FOLLOWER,
    # E+100) on the others - the supervisor adopted the stranger's leader)
    mem = steady_memory()
    obs = dict(steady())
    obs[C] = s(C, L, 101, 0)  # cleared and made leader of epoch 101 by someone else
    p = plan(ORDER, obs, mem, CFG, now=10)
    assert p.memory.fenced == {C: 101} and p.memory.max_leader_id == 1
    assert p.memory.leader == A and not [c for c in p.calls if c.address == C]
    assert any(level == logging.ERROR and "never issued" in text for level, text in p.events)
    q = plan(ORDER, obs, p.memory, CFG, now=11)  # said once, not every tick
    assert not any("never issued" in text for _, text in q.events)
    obs[B] = s(B, F, 101, 100, leader=C)  # the leader's follower too
    obs[A] = None  # and the leader dies: only fenced nodes answer
    r = dead_leader(q.memory, obs, now=100)
    assert r.new_epoch == 0 and r.memory.leader_id == 1  # nobody follows the stranger


def test_a_supervisor_never_goes_back_to_an_epoch_below_one_it_issued():
    mem = Memory(max_leader_id=4, leader="", leader_id=0, lease_safe_at=5.0)
    obs = {A: s(A, L, 3, 100), B: s(B, F, 3, 100, leader=A),
           C: s(C, F, 4, 90, history=[(3, 1)])}  # told of epoch 4, holds nothing of it
    p = plan(ORDER, obs, mem, CFG, now=1.0)
    assert p.calls == [] and "waiting" in p.memory.note  # not A (epoch 3 < 4): and not yet
    p = plan(ORDER, obs, p.memory, CFG, now=6.0)
    assert p.new_epoch == 5 and p.memory.leader == A  # a new epoch for the most advanced


NC = FollowerState.NOT_CONNECTED


def run_ticks(obs, mem, start, ticks, dt=0.1):
    """Plan ``ticks`` times on the same observations; the last plan."""
    p = None
    for i in range(ticks):
        p = plan(ORDER, obs, mem, CFG, now=start + i * dt)
        mem = p.memory
    return p


def test_a_leader_cut_from_its_follower_is_rechained_to_a_node_it_reaches():
    # A cannot reach B (both answer the supervisor): after missed_heartbeats
    # polls the chain becomes A -> C -> B, and that link is then avoided
    obs = steady()
    obs[A] = s(A, L, 1, 100, B, NC)
    p = run_ticks(obs, steady_memory(), 10, 2)
    assert p.memory.chain == [B, C] and p.calls == []  # not yet: a blip heals by itself
    p = run_ticks(obs, p.memory, 10.2, 1)
    assert p.memory.chain == [C, B]
    assert str(Call("set_follower", A, target=C)) in ops(p)
    assert str(Call("set_follower", C, target=B)) in ops(p)
    assert str(Call("set_follower", B, target="")) in ops(p)
    assert (A, B) in p.memory.cut and any("cannot reach" in e for _, e in p.events)
    # B holds more than C and C's link to B fails: B would move up, but not
    # onto the link that broke, while it is avoided
    obs = {A: s(A, L, 1, 120, C, SYNC), C: s(C, FW, 1, 110, B, NC, leader=A),
           B: s(B, F, 1, 115, leader=C)}
    p2 = run_ticks(obs, p.memory, 10.4, 5)
    assert p2.memory.chain == [C, B]
    # once it is no longer avoided, the usual rule applies again
    p3 = run_ticks(obs, p2.memory, 10.3 + CFG.follower_error_retry + 0.5, 1)
    assert p3.memory.chain == [B, C]


def test_a_chain_cut_in_the_middle_routes_its_tail_around_the_cut():
    # A -> B -> C with B unable to reach C: C moves behind A
    obs = steady()
    obs[B] = s(B, FW, 1, 100, C, NC, leader=A)
    p = run_ticks(obs, steady_memory(), 10, 3)
    assert p.memory.chain == [C, B]


def test_no_reroute_when_every_way_uses_a_broken_link_or_the_follower_does_not_answer():
    obs = {A: s(A, L, 1, 100, B, NC), B: s(B, F, 1, 100, leader=A), C: None}
    mem = steady_memory()
    mem.chain = [B]
    p = run_ticks(obs, mem, 10, 3)
    assert p.memory.chain == [B]  # nowhere else to go
    obs = steady()
    obs[A] = s(A, L, 1, 100, B, NC)
    obs[B] = None  # B does not answer: the failover rules deal with it, not this one
    p = run_ticks(obs, steady_memory(), 10, 2)
    assert p.memory.chain == [B, C] and not p.memory.link_down


def test_a_leader_that_reaches_no_follower_is_deposed_once_its_lease_ran_out():
    # A reaches neither B nor C, which reach each other and the supervisor:
    # rerouting cannot help, so A is treated as dead - no renewals, and B
    # (synchronous, holding every acknowledged write) leads once A's lease
    # has surely run out
    obs = steady()
    obs[A] = s(A, L, 1, 100, B, NC)
    mem = steady_memory()
    mem.lease_safe_at = 10.0 + CFG.lease * CFG.lease_margin
    p = run_ticks(obs, mem, 10, 3)
    assert p.memory.chain == [C, B]  # first, round the broken link
    obs[A] = s(A, L, 1, 100, C, NC)
    obs[C] = s(C, FW, 1, 100, B, SYNC, leader=A)
    obs[B] = s(B, F, 1, 100, leader=C)
    mem, t, promoted = p.memory, 10.3, None
    renewals, events = [], []
    while t < 13 and promoted is None:
        p = plan(ORDER, obs, mem, CFG, now=t)
        events += [e for _, e in p.events]
        renewals += [t for c in p.calls if c.op == "renew" and c.address == A]
        if p.new_epoch:
            promoted = (t, p.memory.leader)
        mem, t = p.memory, t + 0.1
    assert promoted is not None and promoted[1] in (B, C), p.memory.note
    deposed_at = next(i for i, e in enumerate(events) if "deposed" in e)
    assert sum("deposed" in e for e in events) == 1  # said once
    assert "promoting" in events[-1] and deposed_at < len(events) - 1
    # no renewal once deposed; the promotion waits out the last one's lease
    last = max(renewals, default=10.0)
    assert promoted[0] >= last + CFG.lease * CFG.lease_margin - 1e-9
    # then A, which still answers, is told to follow in the new epoch
    obs = {A: s(A, L, 1, 100, C, NC), B: s(B, L, 2, 100), C: s(C, FW, 1, 100, B, SYNC, leader=A)}
    p = plan(ORDER, obs, mem, CFG, now=t + 0.1)
    assert any(c.op == "set_role" and c.address == A and c.role == F and c.leader_id == 2
               for c in p.calls), ops(p)


def test_a_leader_with_a_single_follower_it_cannot_reach_is_not_deposed():
    # nobody else could follow the follower: deposing would not bring writes back
    obs = {A: s(A, L, 1, 100, B, NC), B: s(B, F, 1, 100, leader=A), C: None}
    mem = steady_memory()
    mem.chain = [B]
    p = run_ticks(obs, mem, 10, 20)
    assert p.new_epoch == 0 and p.memory.leader == A


def test_a_leader_is_deposed_only_for_a_node_known_to_hold_every_acknowledged_write():
    # (sim seeds 130015, 130058) deposing a leader that nobody can replace
    # would only stop its renewals for good; a leader whose epoch is spent
    # is replaced at once by the rule for it, which deposing would mask
    obs = steady()
    obs[A] = s(A, L, 1, 100, B, NC)
    mem = steady_memory()
    mem.sync_chain = []
    mem.link_down = {(A, B): 9.0}
    mem.cut = {(A, C): 20.0}
    p = run_ticks(obs, mem, 10, 10)
    assert p.new_epoch == 0 and p.memory.leader == A and "deposed" not in p.memory.note
    spent = s(A, L, 1, 100, B, NC)
    spent.extra["epoch_spent"] = True
    obs[A] = spent
    mem = steady_memory()
    mem.link_down, mem.cut = {(A, B): 9.0}, {(A, C): 20.0}
    p = plan(ORDER, obs, mem, CFG, now=10)
    assert p.new_epoch == 2 and "writes nothing more" in p.events[-1][1]


# --- planned switchover ------------------------------------------------------------------


def _switching(target=B, until=5.0):
    mem = steady_memory()
    mem.handover, mem.handover_until = target, until
    return mem


def test_switchover_steps_the_leader_down_then_promotes_the_target_without_a_lease_wait():
    mem = _switching()
    p = plan(ORDER, steady(), mem, CFG, now=1.0)
    assert ops(p) == [f"{A}: step_down(epoch 1, for {B})"] and p.new_epoch == 0
    assert p.handover is None
    # stepped down; B holds less than A logged yet: wait, nothing else
    obs = steady()
    obs[A].extra.update(epoch_spent=True, stepped_down=True)
    obs[A].max_wal = obs[A].max_applied_wal = 103
    p = plan(ORDER, obs, p.memory, CFG, now=1.01)
    assert p.calls == [] and "holds WAL 100 of 103" in p.memory.note
    # B caught up: promoted at once although A's lease (renewed at 1.0) runs on
    obs[B].max_wal = obs[B].max_applied_wal = 103
    p = plan(ORDER, obs, p.memory, CFG, now=1.02)
    assert p.new_epoch == 2 and p.memory.leader == B and p.handover == (True, f"{B} leads epoch 2")
    assert p.memory.chain == [C, A] and not p.memory.handover  # the old leader at the tail
    assert f"{A}: set_role(FOLLOWER, 2)" in ops(p) and f"{B}: set_role(LEADER, 2)" in ops(p)


def test_switchover_to_a_node_that_is_not_synchronous_is_given_up_changing_nothing():
    mem = _switching(target=C, until=5.0)
    obs = steady()
    obs[B].follower_state, obs[B].follower_sync = FollowerState.SYNCING_LOG, False
    p = plan(ORDER, obs, mem, CFG, now=1.0)
    assert p.calls == [] and p.handover is None  # waits for C until the deadline
    p = plan(ORDER, obs, p.memory, CFG, now=5.0)
    assert p.calls == [] and p.handover[0] is False and "not synchronous" in p.handover[1]
    assert p.memory.leader == A and not p.memory.handover and p.new_epoch == 0


def test_switchover_whose_target_never_catches_up_gives_the_leader_a_new_epoch():
    obs = steady()
    obs[A].extra.update(epoch_spent=True, stepped_down=True)
    obs[A].max_wal = obs[A].max_applied_wal = 103
    p = plan(ORDER, obs, _switching(until=2.0), CFG, now=2.0)
    assert p.handover[0] is False and "holds WAL 100 of the 103" in p.handover[1]
    # the usual rule for a spent epoch: the node holding the most, the leader itself
    assert p.new_epoch == 2 and p.memory.leader == A


def test_switchover_waits_out_a_missed_poll_and_gives_up_on_a_dead_node():
    # the target misses a poll right after the step-down (a busy machine):
    # wait - neither give up nor let the spent-epoch rule re-promote the leader
    obs = steady()
    obs[A].extra.update(epoch_spent=True, stepped_down=True)
    obs[B] = None
    p = plan(ORDER, obs, _switching(), CFG, now=1.0)
    assert p.handover is None and p.calls == [] and p.new_epoch == 0
    assert "waiting for" in p.memory.note and p.memory.handover == B
    obs[B] = steady()[B]
    p = plan(ORDER, obs, p.memory, CFG, now=1.1)
    assert p.handover == (True, f"{B} leads epoch 2")
    # the leader dies (missed_heartbeats polls): given up, failover takes over
    mem = _switching()
    obs = steady()
    obs[A] = None
    for i, now in enumerate([1.0, 1.1, 1.2]):
        p = plan(ORDER, obs, mem, CFG, now=now)
        mem = p.memory
        if i < 2:
            assert p.handover is None and mem.handover == B
    assert p.handover[0] is False and "stopped answering" in p.handover[1]


def test_switchover_target_refusals():
    from zrepl.core.plan import switchover_target
    mem = steady_memory()
    assert switchover_target(ORDER, mem, "") == B
    assert switchover_target(ORDER, mem, C) == C
    for to, why in [(A, "leads already"), ("tcp://x:1", "not a member")]:
        with pytest.raises(ValueError, match=why):
            switchover_target(ORDER, mem, to)
    with pytest.raises(ValueError, match="no leader"):
        switchover_target(ORDER, Memory(), "")
    with pytest.raises(ValueError, match="no synchronous follower"):
        switchover_target(ORDER, Memory(leader=A, leader_id=1, max_leader_id=1), "")
    mem.handover = B
    with pytest.raises(ValueError, match="under way"):
        switchover_target(ORDER, mem, C)


# --- membership ----------------------------------------------------------------------------


def test_a_leaving_first_synchronous_copy_goes_to_the_tail_and_leaves_once_others_are_ahead():
    mem = steady_memory()
    mem.leaving = {B: 30.0}
    p = plan(ORDER, steady(), mem, CFG, now=1.0)
    assert p.removals == [] and p.memory.chain == [C, B]  # moved to the tail first
    assert f"{A}: set_follower({C!r})" in ops(p)
    # A -> C -> B seen synchronous: B holds nothing C lacks
    obs = {A: s(A, L, 1, 100, C, SYNC), C: s(C, FW, 1, 100, B, SYNC, leader=A),
           B: s(B, F, 1, 100, leader=C)}
    p = plan(ORDER, obs, p.memory, CFG, now=1.2)
    assert p.removals == [(B, True, "removed")] and p.memory.members == [A, C]
    assert B not in p.memory.chain and B not in dict(p.memory.sync_chain) and p.persist
    p = plan([A, C], {A: obs[A], C: obs[C]}, p.memory, CFG, now=1.3)
    assert ops(p) == [f"{C}: set_role(FOLLOWER, 1)", f"{C}: set_follower('')"]


def test_a_removal_that_cannot_become_safe_is_given_up():
    mem = steady_memory()
    mem.leaving = {B: 2.0}
    obs = steady()
    obs[C] = None  # nobody can get ahead of B
    p = plan(ORDER, obs, mem, CFG, now=2.0)
    assert p.removals and p.removals[0][:2] == (B, False) and "first synchronous" in \
        p.removals[0][2]
    assert not p.memory.leaving and B in (p.memory.members or ORDER)


def test_removal_refusals():
    from zrepl.core.plan import removal_refused
    mem = steady_memory()
    assert removal_refused(ORDER, mem, C) == ""
    assert "switch over first" in removal_refused(ORDER, mem, A)
    assert "not a member" in removal_refused(ORDER, mem, "tcp://x:1")
    assert "last synchronous copy" in removal_refused([A, B], mem, B)


def test_a_poll_missed_now_and_then_is_not_news(caplog):
    """(issue "day-two operations") under CPU load a leader's poll is late
    now and then: one DEBUG line, and the steady state is not said again."""
    from zrepl.engine.clock import FakeClock
    from zrepl.engine.inmem import InmemNetwork, InmemTransport
    from zrepl.engine.supervisor import Supervisor
    sup = Supervisor(ORDER, config=CFG, transport=InmemTransport(InmemNetwork(FakeClock()), "sup"))
    sup.memory = steady_memory()
    caplog.set_level(logging.DEBUG, logger="zrepl.supervisor")
    blip = dict(steady())
    blip[A] = None
    for now, obs in [(1.0, steady()), (1.1, blip), (1.2, steady()), (1.3, blip), (1.4, steady())]:
        sup.tick_with(obs, now)
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(info) == 1 and info[0].startswith(f"leader {A} (epoch 1)"), info
    assert debug == [f"leader {A} missed 1 poll(s)"] * 2
    sup.close()
