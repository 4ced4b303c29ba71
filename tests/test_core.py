"""NodeCore's rules, one by one, without sockets, threads or clocks: events
in, effects out (DESIGN.md, "Engine core")."""

from __future__ import annotations

import random

import pytest

from zrepl import (Config, FollowerMismatch, FollowerState, NodeRole, NotLeader, ProtocolError,
                   StaleLeader, StaleUpstream, Timeout, WALGap, WrongUpstream)
from zrepl.core import effects as fx
from zrepl.core import protocol
from zrepl.core.node import HOLD_FOR_READS, OPEN, WAIT_SYNC, WINDOW_FULL, NodeCore
from zrepl.core.protocol import WAL, codes_to_bytes
from zrepl.core.session import SessionTable

A, B, C = "tcp://a:1000", "tcp://b:1000", "tcp://c:1000"


def core(address=A, role=NodeRole.UNKNOWN, leader_id=0, history=(), follower="", position=0,
         restarted=False, **settings) -> NodeCore:
    """A running core in the given state: as promoted in this incarnation,
    or (``restarted``) as loaded from storage at a start."""
    cfg = Config(**settings)
    c = NodeCore(address, cfg, role=role, leader_id=leader_id, history=list(history),
                 follower=follower, position=position,
                 sessions=SessionTable(cfg.session_window, cfg.max_sessions),
                 rng=random.Random(1), now=0.0)
    if not restarted:
        c.epoch_spent = False
    c.running = True
    return c


def kinds(effects):
    return [type(e).__name__ for e in effects]


def linked(c: NodeCore, follower_position: int = 0, now: float = 1.0) -> int:
    """Drive ``c``'s link to its follower through a handshake to the
    point where it forwards; returns the stream token."""
    effects, _ = c.tick(now)
    call = next(e for e in effects if isinstance(e, fx.CallFollower))
    assert call.op == "connect"
    c.on_follower_reply(call.token, {"leader_id": c.leader_id, "max_wal": follower_position,
                                     "min_wal": 1 if follower_position else 0,
                                     "max_applied_wal": follower_position,
                                     "epoch_history": [list(x) for x in c.history]},
                        None, now, min_wal=1 if c.position else 0)
    want, _ = c.catchup_next(now)
    assert want is None and c.link.forwarding
    return c.link.stream


# --- epochs and fencing --------------------------------------------------------------


def test_a_new_leadership_is_persisted_before_anything_else():
    c = core(follower=B)
    effects = c.set_role(NodeRole.LEADER, 3, now=0.0)
    assert isinstance(effects[0], fx.Persist)
    assert (effects[0].leader_id, effects[0].role, effects[0].history) == \
        (3, NodeRole.LEADER, [(3, 1)])
    assert c.set_role(NodeRole.LEADER, 3, now=0.0) == []  # already leader of epoch 3
    with pytest.raises(StaleLeader):
        c.set_role(NodeRole.FOLLOWER, 2, now=0.0)
    c.set_role(NodeRole.FOLLOWER, 3, now=0.0)
    with pytest.raises(StaleLeader, match="above 3"):  # an epoch is never reused
        c.set_role(NodeRole.LEADER, 3, now=0.0)
    assert (c.role, c.leader_id) == (NodeRole.FOLLOWER, 3)


def test_no_call_may_make_the_epoch_jump_beyond_the_bound():
    # (issue 12: set_role(FOLLOWER, 2**63-1) spread and left no epoch to issue)
    c = core(role=NodeRole.FOLLOWER, leader_id=5, history=[(5, 1)], max_epoch_jump=100)
    for call in (lambda: c.set_role(NodeRole.FOLLOWER, 2**63 - 1, now=0.0),
                 lambda: c.set_role(NodeRole.LEADER, 106, now=0.0),
                 lambda: c.on_connect(106, B, 7, [], 1, now=0.0)):
        with pytest.raises(ProtocolError, match="max_epoch_jump"):
            call()
    assert (c.leader_id, c.role, c.up_stream) == (5, NodeRole.FOLLOWER, 0)
    c.set_role(NodeRole.FOLLOWER, 105, now=0.0)  # within the bound
    assert c.leader_id == 105


def test_a_lease_is_never_longer_than_the_nodes_own_setting():
    # (issue 12: status(renew_lease_for=E, lease=3600) defeated lease fencing)
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], lease=0.5)
    c.renew_lease(1, 3600, now=10.0)
    assert c.lease_until == 10.5
    c.check_writable(10.4)
    with pytest.raises(NotLeader, match="lease"):
        c.check_writable(10.6)


def test_connect_with_an_older_epoch_changes_nothing():
    c = core(role=NodeRole.FOLLOWER, leader_id=5, history=[(5, 1)], position=10)
    with pytest.raises(StaleLeader):
        c.on_connect(4, B, 7, [], 1, now=0.0)
    assert (c.leader_id, c.up_stream, c.leader_address) == (5, 0, "")


def test_a_leader_connected_by_a_newer_epoch_steps_down():
    c = core(role=NodeRole.LEADER, leader_id=2, history=[(2, 1)], position=10)
    info, effects = c.on_connect(3, B, 99, [], 1, now=0.0)
    assert kinds(effects)[:2] == ["Persist", "FailPending"]
    assert effects[0].role == NodeRole.FOLLOWER and effects[0].leader_id == 3
    assert c.role == NodeRole.FOLLOWER and info["max_applied_wal"] == 10
    with pytest.raises(NotLeader):
        c.check_writable(0.0)


def test_within_its_epoch_a_node_follows_only_its_own_upstream():
    c = core(role=NodeRole.FOLLOWER, leader_id=1, history=[(1, 1)], position=10)
    c.set_leader(A)
    with pytest.raises(WrongUpstream):
        c.on_connect(1, B, 7, [], 2, now=0.0)
    assert c.up_stream == 0
    c.on_connect(1, A, 8, [], 1, now=0.0)  # its upstream: accepted
    assert c.up_stream == 8
    c.on_connect(2, B, 9, [], 1, now=0.0)  # a newer epoch may take over
    assert (c.up_stream, c.leader_address, c.leader_id) == (9, B, 2)


def test_an_upstream_that_is_behind_in_its_own_epoch_is_refused():
    c = core(role=NodeRole.FOLLOWER, leader_id=1, history=[(1, 1)], position=761)
    with pytest.raises(StaleUpstream, match="behind"):
        c.on_connect(1, B, 7, [], 2, now=0.0, upstream_position=591)  # a forwarder
    with pytest.raises(StaleUpstream):  # one that restarted and thinks it is first
        c.on_connect(1, B, 7, [], 1, now=0.0, upstream_position=591,
                     upstream_role=NodeRole.FORWARDER)
    c.on_connect(1, A, 8, [], 1, now=0.0, upstream_position=591,
                 upstream_role=NodeRole.LEADER)  # the leader is the truth
    assert c.up_stream == 8


def test_data_of_another_stream_or_epoch_is_dropped_and_counted():
    c = core(role=NodeRole.FOLLOWER, leader_id=1, history=[(1, 1)])
    c.on_connect(1, A, 5, [], 1, now=0.0)
    assert c.accepts(1, 5)
    assert not c.accepts(1, 6) and not c.accepts(2, 5) and not c.accepts(1, 0)
    assert c.counters["dropped_messages"] == 3


def test_a_batch_must_continue_the_log_and_an_epoch_history_must_have_arrived():
    c = core(role=NodeRole.FOLLOWER, leader_id=1)
    c.on_connect(1, A, 5, [], 1, now=0.0)
    with pytest.raises(WALGap):
        c.on_wal(5, 3, 2, [[1, 1]], now=0.0)
    with pytest.raises(ProtocolError, match="no epoch history"):
        c.on_wal(5, 1, 2, None, now=0.0)
    batch, header, effects = c.on_wal(5, 1, 2, [[1, 1]], now=0.0)
    assert header is None and kinds(effects) == ["Persist"]  # the history, durable first


# --- the position, and what SYNCHRONOUS means -------------------------------------------


def test_a_position_that_jumps_restarts_the_link():
    c = core(role=NodeRole.FORWARDER, leader_id=1, history=[(1, 1)], follower=C)
    c.on_connect(1, A, 5, [], 1, now=0.0)
    linked(c)
    assert c.link.state == FollowerState.SYNCHRONOUS and c.follower_synchronous()
    effects = c.on_state_begin(5, 20_000, {"epoch_history": [[1, 1]]}, now=2.0)
    assert "ClearState" in kinds(effects)
    assert c.link.state == FollowerState.NOT_CONNECTED and not c.follower_synchronous()
    # no handshake while the App is partial...
    effects, _ = c.tick(3.0)
    assert not any(isinstance(e, fx.CallFollower) for e in effects)
    c.on_state_end(5, 20_000, 0, now=4.0)
    assert c.position == 20_000 and c.link.state == FollowerState.NOT_CONNECTED
    effects, _ = c.tick(5.0)  # ... and one as soon as it is complete
    assert [e.op for e in effects if isinstance(e, fx.CallFollower)] == ["connect"]


def test_only_a_log_its_upstream_checked_goes_down_the_chain():
    # (sim seed 40098) A forwarder holding a tail no leader wrote (334..336
    # of epoch 7) was given a follower before its new upstream connected:
    # it streamed that tail down, and its follower then refused it forever.
    c = core(role=NodeRole.FORWARDER, leader_id=8, history=[(1, 1), (7, 300)], position=336,
             follower=C)
    c.set_leader(A)
    effects, _ = c.tick(1.0)
    assert not any(isinstance(e, fx.CallFollower) for e in effects)  # A has not checked it
    c.on_connect(8, A, 5, [[1, 1], [7, 300], [8, 334]], 1, now=2.0, upstream_position=333,
                 upstream_role=NodeRole.LEADER)
    effects, _ = c.tick(3.0)
    assert not any(isinstance(e, fx.CallFollower) for e in effects)  # A holds less: it rebuilds
    c.on_state_begin(5, 333, {"epoch_history": [[1, 1], [7, 300], [8, 334]]}, now=4.0)
    c.on_state_end(5, 333, 0, now=5.0)
    effects, _ = c.tick(6.0)
    assert [e.op for e in effects if isinstance(e, fx.CallFollower)] == ["connect"]
    # the next epoch: nothing goes down until its upstream connects again
    c.set_role(NodeRole.FORWARDER, 9, now=7.0)
    effects, _ = c.tick(8.0)
    assert not any(isinstance(e, fx.CallFollower) for e in effects)
    effects = c.on_connect(9, A, 6, [[1, 1], [7, 300], [8, 334], [9, 334]], 1, now=9.0,
                           upstream_position=333, upstream_role=NodeRole.LEADER)[1]
    effects, _ = c.tick(10.0)  # a prefix of A's log: it serves at once
    assert [e.op for e in effects if isinstance(e, fx.CallFollower)] == ["connect"]


def test_the_claim_is_checked_against_the_window():
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], follower=B)
    linked(c)
    assert c.follower_synchronous()
    c.position = 10  # entries the follower neither acknowledged nor has in flight
    assert c.link.state == FollowerState.SYNCHRONOUS and not c.follower_synchronous()


def test_synchronous_only_once_what_was_sent_is_acknowledged():
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], follower=B, position=100)
    effects, _ = c.tick(1.0)
    call = next(e for e in effects if isinstance(e, fx.CallFollower))
    c.on_follower_reply(call.token, {"leader_id": 1, "max_wal": 40, "min_wal": 1,
                                     "max_applied_wal": 40, "epoch_history": [[1, 1]]},
                        None, 1.0, min_wal=1)
    (start, n), _ = c.catchup_next(1.0)
    assert (start, n) == (41, 60)
    batch, _ = c.catchup_batch(41, 60, 1.0)
    c.catchup_sent(batch)
    want, _ = c.catchup_next(1.0)
    assert want is None and c.link.forwarding  # everything sent: new batches go through it
    assert c.link.state == FollowerState.SYNCING_LOG and not c.follower_synchronous()
    c.on_ack(c.link.stream, WAL, 100, b"", None, 1.1)
    assert c.link.state == FollowerState.SYNCHRONOUS and c.follower_synchronous()


# --- acknowledgements ---------------------------------------------------------------------


def test_a_forwarded_batch_is_acknowledged_upstream_only_after_the_follower():
    c = core(role=NodeRole.FORWARDER, leader_id=1, history=[(1, 1)], follower=C)
    c.on_connect(1, A, 5, [], 1, now=0.0)
    down = linked(c)
    batch, header, _ = c.on_wal(5, 1, 2, None, now=2.0)
    assert header is not None and header[1] == down  # forwarded, before it is written
    cb = codes_to_bytes([0, 0])
    assert c.on_wal_applied(5, 1, 2, batch, [0, 0], cb, [], now=2.0) == []  # nothing upstream yet
    effects = c.on_ack(down, WAL, 2, cb, None, now=2.1)
    acks = [e for e in effects if isinstance(e, fx.SendAck)]
    assert len(acks) == 1
    assert protocol.parse_data(acks[0].payload)[2:6] == [5, WAL, 2, cb]


def test_without_a_forwarding_link_the_ack_goes_up_at_once():
    c = core(role=NodeRole.FOLLOWER, leader_id=1, history=[(1, 1)])
    c.on_connect(1, A, 5, [], 1, now=0.0)
    batch, header, _ = c.on_wal(5, 1, 1, None, now=1.0)
    assert batch is None and header is None
    effects = c.on_wal_applied(5, 1, 1, batch, [3], codes_to_bytes([3]), [], now=1.0)
    assert kinds(effects) == ["SendAck"]


D = "tcp://d:1000"
CB0 = codes_to_bytes([0])


def head_with_a_batch(**settings):
    """A leader linked to B, with batch 1 applied and acknowledged by B,
    which says it forwarded it to C; returns (core, stream, effects)."""
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], follower=B, **settings)
    down = linked(c)
    assert c.link.head_sent == A  # the handshake named this head
    batch, _ = c.open_batch(1, 1, [("sink", 0, 1)], 2.0)
    c.batch_applied(batch, [0], CB0, [], 2.0)
    return c, down, c.on_ack(down, WAL, 1, CB0, None, 2.1, downstream=C)


def resolved(effects):
    return [e for e in effects if isinstance(e, fx.Resolve)]


def test_a_head_confirms_a_batch_once_every_member_named_for_it_acknowledged():
    c, _, effects = head_with_a_batch()
    assert resolved(effects) == [] and c.commit_index == 0  # B has it, C not known to
    assert c.awaiting_acks()
    effects = c.on_member_ack(1, 1, 1, CB0, C, D, 2.2)  # C has it, and forwarded it to D
    assert resolved(effects) == [] and c.commit_index == 0
    effects = c.on_member_ack(1, 1, 1, CB0, D, "", 2.3)
    assert resolved(effects)[0].codes == [0] and c.commit_index == 1
    assert not c.awaiting_acks()


def test_a_members_ack_that_comes_before_it_is_named_counts_when_it_is():
    c, _, _ = head_with_a_batch()
    assert c.on_member_ack(1, 1, 1, CB0, D, "", 2.2) == []  # D: not named (yet)
    effects = c.on_member_ack(1, 1, 1, CB0, C, D, 2.3)  # C names D, which acknowledged
    assert resolved(effects) and c.commit_index == 1


def test_a_members_ack_of_another_epoch_or_batch_counts_for_nothing():
    c, _, _ = head_with_a_batch()
    assert c.on_member_ack(2, 1, 1, CB0, C, "", 2.2) == []  # another epoch
    assert c.on_member_ack(1, 1, 2, CB0, C, "", 2.2) == []  # another batch
    assert c.commit_index == 0
    assert resolved(c.on_member_ack(1, 1, 1, CB0, C, "", 2.2))


def test_a_drop_from_the_member_that_named_it_releases_the_batch():
    c, _, _ = head_with_a_batch()
    assert c.on_member_drop(1, 1, 1, D, C, None, 2.2) == []  # D never named C
    assert c.commit_index == 0
    effects = c.on_member_drop(1, 1, 1, B, C, None, 2.2)  # B did: its link to C failed
    assert resolved(effects)[0].error is None and c.commit_index == 1


def test_a_drop_with_an_error_fails_the_link_like_an_error_ack():
    c, _, _ = head_with_a_batch(require_sync=True)
    effects = c.on_member_drop(1, 1, 1, B, C, ["Timeout", "C gone"], 2.2)
    res = resolved(effects)
    assert isinstance(res[0].error, Timeout) and "outcome unknown" in str(res[0].error)
    assert c.link.state == FollowerState.NOT_CONNECTED and c.commit_index == 0


def test_a_member_with_other_codes_is_a_mismatch():
    c, _, _ = head_with_a_batch()
    effects = c.on_member_ack(1, 1, 1, codes_to_bytes([9]), C, "", 2.2)
    assert isinstance(resolved(effects)[0].error, FollowerMismatch)
    assert "chain member tcp://c:1000" in str(resolved(effects)[0].error)


def test_a_silent_member_fails_the_link_within_the_ack_limit():
    c, _, _ = head_with_a_batch(ack_timeout=0.5)
    assert c.ack_deadline() == pytest.approx(2.6)
    assert c.check_acks(2.5) == []
    effects = c.check_acks(2.6)
    assert "chain member(s) tcp://c:1000 did not acknowledge" in str(effects)
    assert resolved(effects)[0].error is None  # availability first, as for a failed link


def test_a_member_acknowledges_at_once_naming_its_follower_and_tells_the_head():
    # B, second below the head in A -> C -> B -> D
    c = core(address=B, role=NodeRole.FORWARDER, leader_id=1, history=[(1, 1)], follower=D)
    c.on_connect(1, C, 5, [], 2, now=0.0, head=A)
    down = linked(c)
    assert c.link.head_sent == A
    batch, header, _ = c.on_wal(5, 1, 1, None, now=2.0)
    assert header is not None
    effects = c.on_wal_applied(5, 1, 1, batch, [0], CB0, [], now=2.0)
    assert kinds(effects) == ["SendAck", "SendHeadAck"]
    assert protocol.parse_ack(effects[0].payload) == (protocol.ACK, 5, WAL, 1, CB0, None, "")
    assert protocol.parse_ack(effects[1].payload) == (protocol.MEMBER_ACK, 1, 1, 1, CB0, B, D)
    # its follower's ack then answers nobody; a failed link tells the head
    assert c.on_ack(down, WAL, 1, CB0, None, 2.1) == []
    batch, _, _ = c.on_wal(5, 2, 1, None, now=3.0)
    c.on_wal_applied(5, 2, 2, batch, [0], CB0, [], now=3.0)
    effects = c.link_failed(Timeout("D gone"), 3.5)
    drops = [protocol.parse_ack(e.payload) for e in effects if isinstance(e, fx.SendHeadAck)]
    assert drops == [(protocol.MEMBER_DROP, 1, 2, 2, B, D, None)]


def test_the_first_member_names_its_follower_in_its_own_ack():
    c = core(address=B, role=NodeRole.FORWARDER, leader_id=1, history=[(1, 1)], follower=C)
    c.on_connect(1, A, 5, [], 1, now=0.0, head=A)
    linked(c)
    batch, _, _ = c.on_wal(5, 1, 1, None, now=2.0)
    effects = c.on_wal_applied(5, 1, 1, batch, [0], CB0, [], now=2.0)
    assert kinds(effects) == ["SendAck"]  # the upstream is the head: no second message
    assert protocol.parse_ack(effects[0].payload)[6] == C


def test_a_node_whose_upstream_named_no_head_keeps_the_chained_acks():
    c = core(address=B, role=NodeRole.FORWARDER, leader_id=1, history=[(1, 1)], follower=C)
    c.on_connect(1, A, 5, [], 1, now=0.0)  # (an upstream that names no head)
    linked(c)
    assert c.link.head_sent == ""
    batch, _, _ = c.on_wal(5, 1, 1, None, now=2.0)
    assert c.on_wal_applied(5, 1, 1, batch, [0], CB0, [], now=2.0) == []  # waits for C


def test_a_new_head_restarts_the_link_so_the_follower_hears_of_it():
    c = core(address=B, role=NodeRole.FORWARDER, leader_id=1, history=[(1, 1)], follower=C)
    c.on_connect(1, A, 5, [], 1, now=0.0)
    linked(c)
    _, effects = c.on_connect(1, A, 6, [], 1, now=1.0, head=A)
    assert "ConnectHead" in kinds(effects) and c.link.state == FollowerState.NOT_CONNECTED


def test_different_codes_are_a_mismatch_and_an_error():
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], follower=B)
    down = linked(c)
    batch, header = c.open_batch(1, 1, [("sink", 0, 1)], 2.0)
    assert header is not None
    c.batch_applied(batch, [0], codes_to_bytes([0]), [], 2.0)
    effects = c.on_ack(down, WAL, 1, codes_to_bytes([7]), None, 2.1)
    resolve = next(e for e in effects if isinstance(e, fx.Resolve))
    assert isinstance(resolve.error, FollowerMismatch)
    assert c.link.state == FollowerState.ERROR


@pytest.mark.parametrize("require_sync", [False, True])
def test_a_batch_whose_follower_failed_is_answered_by_policy(require_sync):
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], follower=B,
             require_sync=require_sync)
    linked(c)
    batch, _ = c.open_batch(1, 1, [("sink", 0, 1)], 2.0)
    c.batch_applied(batch, [0], codes_to_bytes([0]), [], 2.0)
    effects = c.link_failed(Timeout("gone"), 2.5)
    resolve = next(e for e in effects if isinstance(e, fx.Resolve))
    if require_sync:
        assert isinstance(resolve.error, Timeout) and "outcome unknown" in str(resolve.error)
        assert c.commit_index == 0
    else:
        assert resolve.error is None and resolve.codes == [0]  # committed on the leader
        assert c.commit_index == 1


def test_a_follower_that_keeps_acknowledging_is_busy_not_dead():
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], follower=B, ack_timeout=0.5)
    down = linked(c)
    batches = [c.open_batch(i, i, [], 1.0)[0] for i in range(1, 9)]
    for i, b in enumerate(batches, 1):
        c.batch_applied(b, [0], codes_to_bytes([0]), [], 1.0)
    for i in range(1, 8):  # one ack every 0.4 s: the oldest waits 2.8 s, no silence > 0.5 s
        now = 1.0 + 0.4 * i
        assert c.check_acks(now) == []
        c.on_ack(down, WAL, i, codes_to_bytes([0]), None, now)
    assert c.link.state == FollowerState.SYNCHRONOUS
    assert "acknowledged nothing" in str(c.check_acks(1.0 + 0.4 * 7 + 0.5))


def test_deeper_in_a_chain_the_link_gives_up_sooner():
    c = core(ack_timeout=1.0)
    limits = []
    for depth in (0, 1, 3, 20):
        c.depth = depth
        limits.append(c.ack_limit())
    assert limits == [1.0, 0.9, 0.7, 0.2]


# --- commits, reads and sessions -------------------------------------------------------


def test_the_commit_gate():
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], follower=B, require_sync=True,
             window=2)
    assert c.commit_gate() == WAIT_SYNC
    linked(c)
    assert c.commit_gate() == OPEN
    c.open_batch(1, 1, [], 1.0)
    c.open_batch(2, 2, [], 1.0)
    assert c.commit_gate() == WINDOW_FULL
    c.link.inflight.clear()
    c.reads_waiting = 1
    assert c.commit_gate() == HOLD_FOR_READS


def test_a_leader_read_waits_for_what_is_applied_but_not_acknowledged():
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], follower=B,
             lease_required=True)
    with pytest.raises(NotLeader, match="lease"):
        c.leader_read(0.5)
    c.renew_lease(1, 0.5, now=1.0)
    down = linked(c)
    assert c.leader_read(1.0)
    batch, _ = c.open_batch(1, 1, [], 1.0)
    c.batch_applied(batch, [0], codes_to_bytes([0]), [], 1.0)
    assert c.position == 1 and not c.leader_read(1.1)  # applied, not acknowledged
    c.reads_waiting = 1
    effects = c.on_ack(down, WAL, 1, codes_to_bytes([0]), None, 1.2)
    assert "ReadsReady" in kinds(effects) and c.leader_read(1.2)
    with pytest.raises(NotLeader):
        c.leader_read(1.6)  # the lease ran out


def test_a_retried_command_is_answered_only_once_confirmed():
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], require_sync=True)
    session = (b"c" * 16, 1)
    assert c.check_submission(session, 1.0) is None  # new
    with pytest.raises(Timeout, match="queued"):
        c.check_submission(session, 1.0)
    c.sessions_pending.discard(session)
    c.sessions.record(session[0], 1, 4, 1)
    with pytest.raises(Timeout, match="not yet confirmed"):
        c.check_submission(session, 1.0)  # applied, but commit_index is 0
    c.commit_index = 1
    assert c.check_submission(session, 1.0) == 4


# --- planned switchover --------------------------------------------------------------------


def test_a_leader_that_steps_down_takes_nothing_new_but_commits_what_it_sent():
    c = core(role=NodeRole.LEADER, leader_id=1, history=[(1, 1)], follower=B, position=0)
    c.renew_lease(1, 0.5, now=0.9)
    linked(c)
    batch, header = c.open_batch(1, 2, [("sink", 0, 2)], now=1.0)
    assert header is not None
    cb = codes_to_bytes([0, 0])
    c.batch_applied(batch, [0, 0], cb, [], now=1.0)
    with pytest.raises(StaleLeader):
        c.step_down(2, B, now=1.0)  # not the epoch it leads
    effects = c.step_down(1, B, now=1.01)
    assert "FailPending" in kinds(effects) and "ReadsReady" in kinds(effects)
    for check in (c.check_writable, c.leader_read):  # the lease runs on; nothing is served
        with pytest.raises(NotLeader) as err:
            check(1.02)
        assert err.value.leader_address == B and "handing over" in str(err.value)
    assert c.step_down(1, B, now=1.03) == []  # said again: nothing new
    effects = c.on_ack(c.link.stream, WAL, 2, cb, None, now=1.04)
    assert any(isinstance(e, fx.Resolve) and e.error is None for e in effects)
    assert c.commit_index == 2
    extra = c.status_fields(1.05)["extra"]
    assert extra["epoch_spent"] and extra["stepped_down"]
    # its successor's handshake makes it a follower, quietly (a planned change)
    _, effects = c.on_connect(2, B, 7, [[1, 1], [2, 3]], 1, now=1.1, upstream_position=2,
                              upstream_role=int(NodeRole.LEADER))
    assert c.role == NodeRole.FOLLOWER and not c.epoch_spent
    assert [e.level for e in effects if isinstance(e, fx.Log) and "successor" in e.text] == \
        [fx.INFO]


def test_a_clear_state_from_a_stream_this_node_left_changes_nothing():
    # (sim seed 1043: re-chained in the same epoch, the old upstream's late
    # clear_state emptied a node its new upstream called synchronous)
    c = core(address=C, role=NodeRole.FOLLOWER, leader_id=9, history=[(9, 1)], position=514)
    c.on_connect(9, B, 5, [[9, 1]], 2, now=0.0, upstream_position=514)
    c.set_leader(A)
    c.on_connect(9, A, 6, [[9, 1]], 1, now=1.0, upstream_role=int(NodeRole.LEADER))
    with pytest.raises(WrongUpstream):
        c.on_clear_state(9, 2.0, stream=5)
    assert c.position == 514 and not c.state_incomplete
    assert kinds(c.on_clear_state(9, 2.0, stream=6))[0] == "ClearState"
    assert c.position == 0
