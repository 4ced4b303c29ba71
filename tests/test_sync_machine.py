"""The follower-sync machine and the epoch rules, without sockets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zrepl import FollowerMismatch, FollowerState, ProtocolError, StaleLeader, Timeout
from zrepl.core.epochs import (FollowerInfo, SyncPlan, UpstreamView, divergence_point, epoch_at,
                               plan_sync)
from zrepl.core.link import ALLOWED, FollowerSync, OutOfOrder

S = FollowerState


def test_epoch_at():
    h = [(1, 1), (3, 10), (4, 10), (7, 50)]
    assert epoch_at(h, 1) == 1
    assert epoch_at(h, 9) == 1
    assert epoch_at(h, 10) == 4  # epoch 3 wrote nothing: 4 took over at the same id
    assert epoch_at(h, 49) == 4
    assert epoch_at(h, 10**9) == 7
    assert epoch_at([], 5) == 0
    assert epoch_at([(2, 5)], 4) == 0


def test_divergence_point():
    leader = [(1, 1), (2, 101)]
    old_leader = [(1, 1)]
    assert divergence_point(leader, old_leader, 105) == 101  # unacked tail 101..105
    assert divergence_point(leader, old_leader, 100) is None  # a clean prefix
    assert divergence_point(leader, leader, 500) is None
    assert divergence_point(leader, [], 3) == 1  # entries of no known epoch
    assert divergence_point(leader, [], 0) is None  # nothing held, nothing diverges
    # the follower lived through an epoch the leader never saw
    assert divergence_point([(1, 1), (3, 60)], [(1, 1), (2, 40)], 70) == 40


def plan(up_hist, up_min, up_pos, f_hist, f_max, f_applied=None, f_min=1):
    return plan_sync(UpstreamView(up_hist, up_min, up_pos),
                     FollowerInfo(1, f_max, f_min if f_max else 0,
                                  f_max if f_applied is None else f_applied, f_hist))


def test_plan_log_catch_up_from_the_follower_position():
    p = plan([(1, 1)], 1, 100, [(1, 1)], 40)
    assert (p.state, p.start) == (S.SYNCING_LOG, 41)


def test_plan_up_to_date_follower():
    p = plan([(1, 1)], 1, 100, [(1, 1)], 100)
    assert (p.state, p.start) == (S.SYNCING_LOG, 101)


def test_plan_empty_follower_with_whole_wal_held():
    assert plan([(1, 1)], 1, 100, [], 0).state == S.SYNCING_LOG


def test_plan_state_sync_when_the_needed_wal_is_gone():
    p = plan([(1, 1)], 60, 100, [(1, 1)], 40)
    assert p.state == S.SYNCING_STATE and "needs WAL from 41" in p.reason
    assert plan([(1, 1)], 0, 100, [], 0).state == S.SYNCING_STATE  # leader holds no WAL


def test_plan_state_sync_for_a_divergent_old_leader():
    p = plan([(1, 1), (2, 101)], 1, 150, [(1, 1)], 105)
    assert p.state == S.SYNCING_STATE and "diverge at WAL id 101" in p.reason


def test_plan_state_sync_for_a_follower_ahead_of_the_leader():
    assert plan([(1, 1)], 1, 100, [(1, 1)], 120).state == S.SYNCING_STATE


def test_plan_after_a_snapshot_uses_the_applied_position():
    # WAL empty after a state sync at 500: position is 500
    p = plan([(1, 1)], 400, 800, [(1, 1)], 0, f_applied=500, f_min=0)
    assert (p.state, p.start) == (S.SYNCING_LOG, 501)


def test_machine_happy_path_and_backoff():
    m = FollowerSync(backoff_min=0.1, backoff_max=0.4)
    assert m.state == S.NONE
    m.configure("tcp://f:1", now=0)
    assert m.state == S.NOT_CONNECTED and m.connect_due(0)
    m.failed(Timeout("down"), now=0)
    assert m.state == S.NOT_CONNECTED and not m.connect_due(0.05) and m.connect_due(0.1)
    m.failed(Timeout("down"), now=0.1)
    m.failed(Timeout("down"), now=0.3)
    m.failed(Timeout("down"), now=0.7)
    assert m.next_attempt == 0.7 + 0.4  # capped
    m.connected(SyncPlan(S.SYNCING_STATE, 0, "x"), follower_position=0)
    m.snapshot_done(500)
    assert (m.state, m.acked) == (S.SYNCING_LOG, 500)
    m.caught_up()
    assert m.state == S.SYNCHRONOUS
    m.failed(Timeout("silent"), now=2, retry_now=True)
    assert m.state == S.NOT_CONNECTED and m.connect_due(2)


def test_fatal_refusals_are_sticky_until_reconfigured():
    for exc in (StaleLeader("old"), FollowerMismatch("differs"), ProtocolError("v2")):
        m = FollowerSync()
        m.configure("tcp://f:1", 0)
        m.connected(SyncPlan(S.SYNCING_LOG, 1, ""), 0)
        m.failed(exc, 1)
        assert m.state == S.ERROR and type(exc).__name__ in m.error
        m.failed(Timeout("later"), 2)
        assert m.state == S.ERROR
        assert not m.connect_due(100)
        m.configure("tcp://f:1", 3)
        assert m.state == S.NOT_CONNECTED and m.error == ""


EVENTS = st.lists(st.tuples(
    st.sampled_from(["configure", "unconfigure", "connect_log", "connect_state", "snapshot",
                     "caught_up", "timeout", "stale", "acked"]),
    st.integers(0, 1000)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_random_event_sequences_only_make_allowed_transitions(events):
    m = FollowerSync()
    now = 0.0
    synchronous_via_log = True
    for name, arg in events:
        now += 0.01
        before = m.state
        try:
            if name == "configure":
                m.configure("tcp://f:1", now)
            elif name == "unconfigure":
                m.configure("", now)
            elif name == "connect_log":
                m.connected(SyncPlan(S.SYNCING_LOG, arg + 1, ""), arg)
            elif name == "connect_state":
                m.connected(SyncPlan(S.SYNCING_STATE, 0, ""), arg)
            elif name == "snapshot":
                m.snapshot_done(arg)
            elif name == "caught_up":
                m.caught_up()
            elif name == "timeout":
                m.failed(Timeout("t"), now)
            elif name == "stale":
                m.failed(StaleLeader("s"), now)
            else:
                m.acked_to(arg)
        except OutOfOrder:
            # an event the engine never sends in this state: refused, no change
            assert m.state == before
            continue
        assert m.state in ALLOWED[before] or m.state == before
        if m.state == S.SYNCHRONOUS and before != S.SYNCHRONOUS:
            synchronous_via_log &= before == S.SYNCING_LOG
    assert synchronous_via_log
    assert len(m.trail) <= 32
