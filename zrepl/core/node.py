"""NodeCore: every replication decision of one node, without I/O.

Theory of operation
-------------------

A zrepl node logs commands to a WAL, applies them to the App and streams
them to its follower.  :class:`NodeCore` owns everything that decides what
happens next - the epoch and role, the epoch history, the position, the
lease, the stream this node accepts from its upstream, the link to its
follower (the sync machine, the send window, what the follower
acknowledged) and the client sessions - and nothing that does I/O.  Its
methods are events: a control call or a data message arrived, a reply came
back, a batch was written and applied, the clock reads ``now``.  They
return :mod:`effects <zrepl.core.effects>` for the engine to carry out, in
order, or raise a :class:`~zrepl.core.errors.ReplicationError` that the
engine sends back to whoever asked.  Time is passed in; randomness (stream
tokens) comes from the ``rng`` given at construction.  The engine calls the
core under one lock; the core never blocks.

The rules, each in one place:

**Epochs and fencing.**  ``leader_id`` is an epoch that only grows.  Any
call or stream carrying a smaller one is refused (``StaleLeader``): a
deposed leader can never write into a replica again.  A larger one is
persisted (``Persist``, the first effect) before anything acts on it.
``set_role(LEADER, id)`` needs an id above the stored one and starts a new
entry of the epoch history, ``(id, next WAL id)``; a leader that is
``connect``-ed by a newer epoch steps down.  (:meth:`_adopt_epoch`,
:meth:`set_role`, :meth:`on_connect`, :meth:`_check_epoch`.)

**The upstream stream.**  A node accepts data only from the stream token of
its last handshake and only under its epoch (:meth:`accepts`); batches
must continue its log (``WALGap``) and arrive only once an epoch history
has reached it.  The history travels down with the stream, ahead of the
entries it describes.

**The position.**  It moves in two ways only.  A batch applied in order
advances it (:meth:`_advance`).  Anything else - ``clear_state``, the
start or end of an incoming state sync - is a *jump* (:meth:`_jump`), and a
jump restarts the downstream link: what the follower acknowledged no
longer says anything about what it holds relative to this node.  While an
incoming state sync is incomplete the App is partial and the downstream
link does not handshake at all.

**Only a checked log goes down the chain.**  A node that is not the leader
handshakes with its follower only once its own upstream - the one it is
told to follow, in its current epoch - has found its log to be a prefix of
the upstream's (a handshake that shows no divergence, a WAL batch of the
stream, or a completed state sync: :meth:`serves_follower`).  Until then
the node may hold a tail that no leader wrote, and its follower would copy
it.

**SYNCHRONOUS.**  What a node reports is a promise the supervisor acts on
(it promotes only members of the synchronous chain).  A node may claim its
follower SYNCHRONOUS only when *the follower has acknowledged everything
this node confirmed to its callers, and every entry this node holds
beyond what the follower acknowledged is in flight to it, in order,
within the window* (:meth:`follower_synchronous`).  The link gets there in two steps:
when catch-up has *sent* everything (checked while no write can start) the
link starts *forwarding* - every new batch goes through the follower and
waits for its acknowledgement; when the follower has *acknowledged*
everything sent before that moment, the state becomes SYNCHRONOUS.  The
claim is checked against the window every time it is reported, so a link
whose bookkeeping ever disagrees with the position reports itself not
synchronous rather than lie.

**Acknowledgement topology.**  A node acknowledges a WAL batch to its
upstream once it has logged and applied it.  When it forwarded the batch
over a synchronous link whose handshake named the chain's head, its
acknowledgement names that follower, and every member below acknowledges
the batch straight to the head as well (``MEMBER_ACK``); the head
confirms a batch only when its follower and every member named for it
acknowledged it with its codes (:meth:`on_member_ack`, :meth:`_confirm`),
and a member that loses its follower with named batches in flight says
so (``MEMBER_DROP``, :meth:`_unannounce`).  Over a link whose handshake
named no head the node waits for its follower's ack before its own
(:meth:`_acks_wait_for_follower`, the one rule).  Either way an
acknowledgement at the head means every synchronous node of the chain
holds the write; straight to the head, a hop costs one message on the way
down, not a round trip.

**Failed versus busy.**  A link fails when the follower refuses (an error
ack: fatal refusals put the link in ERROR), answers out of order, cannot be
reached, or has acknowledged *nothing* for the ack limit while batches
wait (:meth:`ack_deadline`).  A follower that keeps acknowledging - however
far behind, during a long catch-up - is busy, not dead.  Deeper in a chain
the limit is shorter, so the link next to a hung tail fails first.

**One sequence per epoch.**  Two logs agree up to an id exactly when the
same epoch wrote it in both (``epochs.divergence_point``), so a leader must
never give one WAL id two entries.  It would, if it went on after failing
to log a batch it had already sent, or after a restart (it cannot know
what it sent before); so in both cases its epoch is *spent*
(``epoch_spent``): it commits nothing and handshakes with no follower (its
follower may hold acknowledged writes a rebooted leader lost) until it is
given a new epoch - by the supervisor, at once.

**Commit.**  A leader commits only while it is the leader of its epoch, the
epoch is not spent, and its lease (once one was granted, or with
``lease_required``) has not run out (:meth:`check_writable`).  With ``require_sync`` it commits only
through a forwarding link.  A batch is answered when both halves are known
(its local apply and the follower's ack, :meth:`_finalize`): the same
codes answer the callers; different codes are ``FollowerMismatch``; a
link that failed first answers ``Timeout`` (outcome unknown) under
``require_sync``, and the leader's codes otherwise (availability first).
``commit_index`` is the last WAL id whose commit is confirmed.

**Reads.**  ``leader_only`` reads see exactly the acknowledged writes: the
leader answers one only while ``commit_index`` has caught up with its
position, under a valid lease (:meth:`leader_read`).  Otherwise the read
waits - and new commits wait behind it - until the writes in flight are
acknowledged (a read barrier, like raft's ReadIndex, but on a leader that
applies before it commits).  Reads from any node answer from that node's
state as it is.
"""

from __future__ import annotations

import collections
from typing import Any

from . import protocol
from .commit import Batch
from .config import Config
from .effects import (ERROR, INFO, WARNING, BeginStateIn, CallFollower, ClearState, ClearWAL,
                      CloseLink, ConnectHead, ConnectUpstream, Effect, EndStateIn, Failure,
                      FailPending, Log, OpenLink, Persist, ReadsReady, Resolve, SendAck,
                      SendHeadAck, StartSnapshot, Wake)
from .epochs import FollowerInfo, UpstreamView, epoch_at, not_held, plan_sync
from .errors import (FollowerMismatch, NotLeader, ProtocolError, ReplicationError, StaleLeader,
                     StaleUpstream, Timeout, WALGap, WALTruncated, WrongUpstream)
from .link import FATAL, Link, PendingCall, SnapshotOut
from .protocol import STATE, WAL
from .session import SessionTable
from .types import FollowerState, NodeRole

# commit_gate() answers
OPEN = 0  # commit now
WAIT_SYNC = 1  # require_sync and no forwarding link: wait (or time out)
WINDOW_FULL = 2  # the window is full: the next ack commits what is queued
HOLD_FOR_READS = 3  # leader reads wait for the writes before them

Effects = list[Effect]


class SnapshotIn:
    """A full state sync being received."""

    __slots__ = ("wal_id", "stream", "history", "section", "received", "app_started")

    def __init__(self, wal_id: int, stream: int, history: list, section: dict):
        self.wal_id = wal_id
        self.stream = stream
        self.history = history
        self.section = section  # zrepl's section, completed by STATE_ZREPL
        self.received = 0  # App entries received
        self.app_started = False  # the App's section has begun


def check_leader_id(leader_id: Any) -> int:
    if isinstance(leader_id, bool) or not isinstance(leader_id, int) or leader_id < 0:
        raise ProtocolError(f"leader_id must be a non-negative int, got {leader_id!r}")
    return leader_id


class NodeCore:
    def __init__(self, address: str, config: Config, *, role: NodeRole, leader_id: int,
                 history: list[tuple[int, int]], follower: str, position: int,
                 sessions: SessionTable, rng: Any, now: float = 0.0, boot: str = ""):
        self.address = address
        self.cfg = config
        self.role = role
        self.leader_id = leader_id
        self.history = [(int(a), int(b)) for a, b in history]
        self.history_version = 0
        self.follower = follower  # the persisted follower address
        self.position = position  # last applied WAL id
        # Entries restored from disk are as confirmed as they will get
        # without a follower; under require_sync only a follower confirms.
        self.commit_index = 0 if config.require_sync else position
        self.lease_enforced = config.lease_required
        self.lease_until = 0.0
        # A leader writes one sequence per epoch.  A restarted leader that
        # had a follower cannot know what it sent before it stopped (nor,
        # under require_sync, whether it lost writes others hold), and a
        # leader that could not log a batch it sent would give the same WAL
        # ids to other entries: either way it writes nothing more in this
        # epoch (the supervisor gives it, or another node, a new one).
        self.epoch_spent = role == NodeRole.LEADER and (bool(follower) or config.require_sync)
        # a planned switchover spent the epoch (step_down): the successor
        # the redirects name
        self.successor = ""
        self.leader_address = ""  # the upstream, or the leader last heard of
        self.running = False
        # upstream side
        self.up_stream = 0
        self.depth = 0  # hops from the leader (0: leader, or not following)
        # the head of this node's chain, as its upstream's handshake named it
        # ("": none named - then this node's acks go up the chain, see
        # _acks_wait_for_follower)
        self.head = ""
        self.snap_in: SnapshotIn | None = None
        self.state_incomplete = False  # an incoming state sync began and has not ended
        # (upstream address, epoch) whose handshake or data found this
        # node's log a prefix of its own (see serves_follower)
        self.checked_by: tuple[str, int] | None = None
        # downstream side
        self.link = Link(config.connect_backoff_min, config.connect_backoff_max)
        self._calls = 0
        self._rng = rng
        # the machine's boot (``boot_id``): a node restarted on a machine that
        # rebooted (a power loss) keeps only what was fsynced, and it may
        # have acknowledged more; the supervisor compares it (see plan)
        self.boot = boot
        # client sessions (replicated state) and reads
        self.sessions = sessions
        self.sessions_pending: set[tuple[bytes, int]] = set()
        # leader-local: when this node last saw each client (session_expiry)
        self._last_seen: dict[bytes, float] = {}
        self._leading_since = now
        self.reads_waiting = 0
        # the node's counters, shown in its status (the engine counts its own
        # events here too: client requests, replies, malformed messages)
        self.counters: collections.Counter[str] = collections.Counter()
        if follower and role in (NodeRole.LEADER, NodeRole.FORWARDER, NodeRole.FOLLOWER):
            self.link.machine.configure(follower, now)

    # ==================================================================
    # leadership, epochs, fencing
    # ==================================================================

    def check_writable(self, now: float) -> None:
        """NotLeader unless this node may commit now."""
        if not self.running:
            raise NotLeader(f"node {self.address} is not running", "")
        if self.role != NodeRole.LEADER:
            raise NotLeader(f"{self.address} is not the leader", self.leader_address)
        if self.epoch_spent and self.successor:
            raise NotLeader(f"{self.address} is handing over to {self.successor} (switchover)",
                            self.successor)
        if self.epoch_spent:
            raise NotLeader(f"{self.address} writes nothing more in epoch {self.leader_id} (it "
                            "restarted, or could not log a batch it sent): waiting for a new "
                            "epoch", "")
        if self.lease_enforced and now > self.lease_until:
            raise NotLeader(f"{self.address} holds no valid leader lease (the supervisor has "
                            "not renewed it): not accepting writes", "")

    def renew_lease(self, leader_id: Any, lease: Any, now: float) -> None:
        """Let this leader accept writes for ``lease`` more seconds; refused
        (``StaleLeader``) unless it leads epoch ``leader_id``."""
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease <= 3600:
            raise ProtocolError(f"lease must be a number of seconds in (0, 3600], got {lease!r}")
        if self.role != NodeRole.LEADER or leader_id != self.leader_id:
            raise StaleLeader(f"lease for epoch {leader_id} refused: {self.address} is "
                              f"{self.role.name} of epoch {self.leader_id}",
                              leader_id if isinstance(leader_id, int) else 0, self.leader_id)
        self.lease_enforced = True
        # never longer than this node's own lease setting: an hour-long
        # renewal (a mistaken or hostile caller) would defeat the fencing
        lease = min(float(lease), self.cfg.lease)
        self.lease_until = max(self.lease_until, now + lease)  # a late renewal never shortens it

    def step_down(self, leader_id: Any, successor: Any, now: float) -> Effects:
        """A planned switchover: this leader of ``leader_id`` takes no more
        writes and answers no more leader reads in its epoch (it is spent),
        while what it already logged goes on to its follower and is
        acknowledged as usual.  The supervisor promotes ``successor`` once
        it holds all of it.  Refused (StaleLeader) unless this node leads
        that epoch; saying it again is harmless."""
        leader_id = check_leader_id(leader_id)
        if not isinstance(successor, str) or not successor:
            raise ProtocolError("step_down takes the successor's address")
        if self.role != NodeRole.LEADER or leader_id != self.leader_id:
            raise StaleLeader(f"step_down for epoch {leader_id} refused: {self.address} is "
                              f"{self.role.name} of epoch {self.leader_id}",
                              leader_id, self.leader_id)
        if self.epoch_spent and self.successor == successor:
            return []
        self.epoch_spent = True
        self.successor = successor
        self.leader_address = successor
        return [FailPending(NotLeader(f"{self.address} is handing over to {successor} "
                                      "(switchover)", successor)),
                ReadsReady(),
                Log(INFO, f"stepping down for {successor}: no more writes in epoch "
                          f"{leader_id}")]

    def _check_jump(self, leader_id: int, why: str) -> None:
        if leader_id > self.leader_id + self.cfg.max_epoch_jump:
            raise ProtocolError(f"{why} with leader_id {leader_id}: more than max_epoch_jump "
                                f"({self.cfg.max_epoch_jump}) above this node's "
                                f"{self.leader_id}: refused")

    def _adopt_epoch(self, leader_id: int, why: str) -> Effects:
        """A larger epoch: refuse a smaller one, persist a larger one."""
        if leader_id < self.leader_id:
            raise StaleLeader(f"{why} with leader_id {leader_id}: this node obeys "
                              f"{self.leader_id}", leader_id, self.leader_id)
        self._check_jump(leader_id, why)
        if leader_id > self.leader_id:
            self.leader_id = leader_id
            return [Persist(leader_id=leader_id)]
        return []

    def _check_epoch(self, leader_id: Any) -> int:
        """Calls that change a follower's state must carry exactly the epoch
        it obeys (a newer one must connect first)."""
        leader_id = check_leader_id(leader_id)
        if leader_id < self.leader_id:
            raise StaleLeader(f"leader_id {leader_id} is stale: this node obeys {self.leader_id}",
                              leader_id, self.leader_id)
        if leader_id > self.leader_id:
            raise StaleLeader(f"leader_id {leader_id} is not the one this node obeys "
                              f"({self.leader_id}); connect first", leader_id, self.leader_id)
        return leader_id

    def set_role(self, role: NodeRole, leader_id: Any, now: float) -> Effects:
        leader_id = check_leader_id(leader_id)
        was, current = self.role, self.leader_id
        if leader_id < current:
            raise StaleLeader(f"set_role with leader_id {leader_id}: this node obeys {current}",
                              leader_id, current)
        self._check_jump(leader_id, "set_role")
        out: Effects = []
        if role == NodeRole.LEADER:
            if leader_id == current and was == NodeRole.LEADER:
                return []  # already leader of this epoch
            if leader_id == current:
                raise StaleLeader(f"a new leadership needs a leader_id above {current}",
                                  leader_id, current)
            self.leader_id = leader_id
            self.role = NodeRole.LEADER
            self.epoch_spent = False
            self.successor = ""
            self._leading_since = now
            self._last_seen.clear()
            # (epochs that began after what this node holds wrote nothing
            # here: they drop out, and the new one begins after its log)
            self.history = [(e, f) for e, f in self.history if f <= self.position] + \
                [(leader_id, self.position + 1)]
            self.history_version += 1
            out.append(Persist(role=role, leader_id=leader_id, history=list(self.history)))
            self.lease_until = 0.0  # a new leadership waits for its own lease
            # what this node holds is confirmed once a follower holds it too
            self.commit_index = 0 if self.cfg.require_sync else self.position
            out += self._drop_upstream()
            out.append(Log(WARNING, f"now LEADER with leader_id {leader_id} from WAL id "
                                    f"{self.position + 1}"))
        else:
            self.leader_id = leader_id
            self.role = role
            # (a handover, or a restarted leader rejoining: expected, INFO)
            expected = bool(self.successor) or self.epoch_spent
            self.epoch_spent = False
            self.successor = ""
            out.append(Persist(role=role, leader_id=leader_id))
            if was == NodeRole.LEADER:
                out.append(FailPending(NotLeader(f"{self.address} stepped down",
                                                 self.leader_address)))
                out.append(ReadsReady())
                out.append(Log(INFO if expected else WARNING,
                               f"stepped down to {role.name} (leader_id {leader_id})"))
        if leader_id != current or was != role:
            out += self._restart_link("role or epoch changed", now)
        return out

    def set_leader(self, address: str) -> None:
        self.leader_address = address

    def set_follower(self, address: str, now: float) -> Effects:
        self.follower = address
        return [Persist(follower=address)] + self._restart_link(
            "follower set to " + (address or "none"), now)

    def _set_history(self, history: list) -> Effects:
        """Adopt the upstream's epoch history (it goes on down the chain
        with the next batch this node sends)."""
        history = [(int(a), int(b)) for a, b in history]
        if history == self.history:
            return []
        self.history = history
        self.history_version += 1
        return [Persist(history=list(history))]

    # ==================================================================
    # the upstream side: handshake, data, state syncs
    # ==================================================================

    def on_connect(self, leader_id: Any, address: Any, stream: Any, history: Any, depth: Any,
                   now: float, upstream_position: Any = None, upstream_role: Any = None,
                   head: Any = None) -> tuple[dict, Effects]:
        """The follower side of the handshake: adopt the upstream's epoch
        and stream; returns what this node reports of its log (the engine
        adds the WAL's bounds) and the effects.

        Refused without changing anything: a smaller epoch (StaleLeader);
        within its epoch, any upstream but the one this node follows
        (WrongUpstream: a restarted node resuming an old link must not take
        a follower over); an upstream that does not lead and holds less of
        its own epoch than this node (StaleUpstream: its state sync would
        discard entries that may be acknowledged)."""
        leader_id = check_leader_id(leader_id)
        if not isinstance(address, str) or isinstance(stream, bool) or \
                not isinstance(stream, int) or stream < 0:
            raise ProtocolError("connect takes leader_id, address and a stream token")
        for peer in (address, head or ""):
            if not isinstance(peer, str):
                raise ProtocolError("connect takes addresses as strings")
            if peer:
                try:
                    protocol.endpoints(peer)
                except ValueError as exc:
                    raise ProtocolError(str(exc)) from None
        current = self.leader_id
        self._check_jump(leader_id, f"connect from {address}")
        if leader_id == current and self.leader_address and address != self.leader_address:
            raise WrongUpstream(f"{self.address} follows {self.leader_address} in epoch "
                                f"{current}, not {address}")
        self._check_not_behind(address, upstream_position, depth, upstream_role)
        out: Effects
        if self.role == NodeRole.LEADER:
            if leader_id <= current:
                raise StaleLeader(f"{self.address} leads epoch {current} itself" if
                                  leader_id == current else
                                  f"connect from {address} with leader_id {leader_id}: this node "
                                  f"obeys {current}", leader_id, current)
            self.leader_id = leader_id
            self.role = NodeRole.FOLLOWER
            handed_over = self.successor == address
            self.successor = ""
            self.epoch_spent = False
            out = [Persist(role=NodeRole.FOLLOWER, leader_id=leader_id),
                   FailPending(NotLeader(f"{self.address} stepped down", address)),
                   ReadsReady(),
                   Log(INFO if handed_over else WARNING,
                       f"{'following my successor' if handed_over else 'deposed by'} {address} "
                       f"(leader_id {leader_id}): now FOLLOWER")]
        else:
            out = self._adopt_epoch(leader_id, f"connect from {address}")
        self.up_stream = stream
        self.leader_address = address
        # Does the upstream's log hold all of this node's?  If not, it will
        # rebuild this node; until then, nothing of it goes further down.
        # (an older peer sends no position: then only the histories can tell)
        up_pos = upstream_position if isinstance(upstream_position, int) and \
            not isinstance(upstream_position, bool) else self.position
        try:
            up_history = [(int(a), int(b)) for a, b in history] if history else self.history
        except (TypeError, ValueError):
            up_history = self.history
        suspect = bool(not_held(up_history, up_pos, self.history, self.position))
        was_checked = self.serves_follower()
        self.checked_by = None if suspect else (address, self.leader_id)
        old_depth = self.depth
        self.depth = depth if isinstance(depth, int) and not isinstance(depth, bool) \
            and 0 < depth < 1000 else 1
        out += self._abort_state_in()
        if self.state_incomplete and self.position == 0:
            # an abandoned state sync may have left part of a state in the
            # App: empty it, so that it matches position 0 whatever comes next
            self.sessions.clear()
            out.append(ClearState())
        if address:
            out.append(ConnectUpstream(address))
        old_head = self.head
        self.head = head if head and head != self.address else ""
        out.append(ConnectHead(self.head))
        info = {"leader_id": self.leader_id, "max_applied_wal": self.position,
                "epoch_history": [list(x) for x in self.history]}
        if leader_id != current or self.depth != old_depth or \
                (self.head != old_head and self.link.machine.streaming):
            # our own follower must hear of the new epoch (its depth, its head)
            out += self._restart_link("upstream changed", now)
        elif suspect and was_checked and self.link.state != FollowerState.NONE:
            out += self._restart_link(f"{address} holds less than this node", now)
        elif not was_checked and self.serves_follower():
            out.append(Wake())  # the follower's handshake may go now
        return info, out

    def serves_follower(self) -> bool:
        """May this node handshake with its follower?  The leader may; any
        other node once its upstream checked its log (see the module)."""
        return self.role == NodeRole.LEADER or \
            self.checked_by == (self.leader_address, self.leader_id)

    def _check_not_behind(self, address: str, upstream_position: Any, depth: Any,
                          upstream_role: Any) -> None:
        """A leader's log is the truth of its epoch; any other upstream must
        hold at least what this node holds of that epoch."""
        if upstream_role is not None:
            if upstream_role == NodeRole.LEADER:
                return
        elif isinstance(depth, bool) or not isinstance(depth, int) or depth <= 1:
            return  # from the leader itself (an older peer says so only by its depth)
        if isinstance(upstream_position, bool) or not isinstance(upstream_position, int):
            return
        if upstream_position >= self.position or not self.history:
            return
        # Whatever epoch this node's extra entries are from (an older one
        # too): only the leader can tell whether they were acknowledged.
        raise StaleUpstream(
            f"{address} holds WAL up to {upstream_position}, this node up to "
            f"{self.position} of epoch {epoch_at(self.history, self.position)}: it is behind "
            "and must not be the upstream")

    def _drop_upstream(self) -> Effects:
        self.up_stream = 0
        self.depth = 0
        self.leader_address = ""
        self.head = ""
        return self._abort_state_in() + [ConnectUpstream(""), ConnectHead("")]

    def accepts(self, leader_id: int, stream: int) -> bool:
        """Is a data message part of the conversation this node agreed to?
        (Anything else is dropped and counted.)"""
        if stream == 0 or stream != self.up_stream or leader_id != self.leader_id:
            self.counters["dropped_messages"] += 1
            return False
        return True

    def _check_continues(self, first: Any, n: int) -> None:
        if n <= 0:
            raise ProtocolError("empty WAL batch")
        if first != self.position + 1:
            raise WALGap(f"WAL batch starts at {first}, this node expects {self.position + 1}")

    def on_wal(self, stream: int, first: int, n: int, history: list | None, now: float
               ) -> tuple[Batch | None, tuple | None, Effects]:
        """A WAL batch from the upstream (the App lock held).  Returns the
        batch in flight to this node's follower and the header to forward it
        with (``(leader_id, stream, history)``), or (None, None) when the
        link does not forward; and the effects to carry out before writing
        it.  Raises to refuse it."""
        self._check_continues(first, n)
        out = self._set_history(history) if history is not None else []
        if not self.serves_follower():
            # (an upstream streams only to a follower whose log it checked)
            self.checked_by = (self.leader_address, self.leader_id)
            out.append(Wake())
        if not self.history:
            # A later failover compares histories to find where two logs
            # diverge; every upstream sends its history with the first batch
            # of a stream.  (In a chain the newest epoch may still be on its
            # way down, so only "none at all" is certain to be wrong.)
            raise ProtocolError("WAL batch, but no epoch history has reached this node: the "
                                "upstream did not send it with the stream")
        if not self.link.forwarding:
            return None, None, out
        last = first + n - 1
        batch = Batch(first, last, sent=now, upstream=(stream, last))
        return batch, self._forward(batch), out

    def on_wal_applied(self, stream: int, first: int, last: int, batch: Batch | None,
                       codes: list[int], codes_bytes: bytes,
                       sessions: list[tuple[int, bytes, int]], now: float) -> Effects:
        """A batch from the upstream is logged and applied."""
        self._advance(first, last, codes, sessions)
        if batch is None or not self._acks_wait_for_follower(batch):
            down = ""
            if batch is not None:
                batch.upstream = None
                if batch.forwarded and self.cfg.sync_downstream:
                    # (straight acks: the head waits for the follower itself)
                    down = batch.announced = self.link.address
            to_head = bool(self.head) and self.head != self.leader_address
            out: Effects = [SendAck(protocol.ack_message(stream, WAL, last, codes_bytes, None,
                                                         "" if to_head else down))]
            if to_head:
                out.append(SendHeadAck(protocol.member_ack_message(
                    self.leader_id, first, last, codes_bytes, self.address, down)))
        else:
            out = []
        if batch is not None:
            out += self._local_done(batch, codes, codes_bytes, now)
        return out

    def _acks_wait_for_follower(self, batch: Batch) -> bool:
        """THE ACK TOPOLOGY: a node acknowledges a batch to its upstream
        once it has logged and applied it.  When it forwarded the batch over
        a synchronous link, the head must also hear from the follower
        before it commits: straight from the follower, if this node's
        handshake with it named the chain's head (then this node's ack,
        sent at once, names the follower: the head counts acknowledgements
        per member, see :meth:`on_member_ack`); otherwise through this
        node, which then waits for the follower's ack first, and
        acknowledgements travel back up the chain."""
        return batch.forwarded and self.cfg.sync_downstream and \
            not (self.head and self.link.head_sent == self.head)

    def refuse(self, stream: int, kind: int, exc: BaseException) -> Effects:
        """A batch this node cannot take: the upstream hears why."""
        self.counters["refused_batches"] += 1
        err = exc if isinstance(exc, ReplicationError) else ProtocolError(str(exc))
        return [Log(WARNING, f"refused a batch from {self.leader_address}: {exc}"),
                SendAck(protocol.ack_message(stream, kind, 0, b"", err))]

    def on_wal_failed(self, first: int, last: int, batch: Batch | None, exc: BaseException,
                      logged: bool, now: float,
                      applied: tuple[list[int], list] | None = None) -> Effects:
        """Writing or applying a batch from the upstream failed (the caller
        refuses it upstream).  If it was forwarded, the follower may hold
        what this node does not: the link restarts.  ``logged`` and
        ``applied`` as for :meth:`batch_failed`."""
        if applied is not None:
            self._advance(first, last, *applied)
        elif logged:
            self.position = last
        if batch is None:
            return []
        batch.upstream = None
        batch.failed = True
        batch.set_local(None, None)
        if not batch.forwarded:
            return []
        return self.link_failed(ReplicationError(
            f"could not log WAL {first}..{last} after forwarding it: {exc}"), now)

    def control_apply_wal(self, leader_id: Any, first: Any, n: int) -> None:
        """The seed's ``Follower.apply_wal`` as a control call."""
        self._check_epoch(leader_id)
        if self.role == NodeRole.LEADER:
            raise ProtocolError("apply_wal refused: this node is the leader")
        self._check_continues(first, n)

    def control_applied(self, first: int, last: int, codes: list[int],
                        sessions: list[tuple[int, bytes, int]]) -> None:
        self._advance(first, last, codes, sessions)

    def control_apply_state(self, leader_id: Any) -> None:
        self._check_epoch(leader_id)

    def on_clear_state(self, leader_id: Any, now: float, stream: Any = None) -> Effects:
        """The upstream starts a state sync.  ``stream``: the conversation
        it belongs to - a clear_state from an upstream this node no longer
        follows (in the same epoch: it was re-chained, and the old
        upstream's call arrived late) must not empty a node another
        upstream already counts as holding its writes."""
        self._check_epoch(leader_id)
        if self.role == NodeRole.LEADER:
            raise ProtocolError("clear_state refused: this node is the leader")
        if stream is not None and stream != self.up_stream:
            raise WrongUpstream(f"clear_state of stream {stream}: {self.address} follows "
                                f"{self.leader_address or 'nobody'} on another stream now")
        self.sessions.clear()
        # a cleared node holds nothing to offer a follower (which may hold
        # acknowledged writes) until a state sync, or the log from 1, arrives
        self.state_incomplete = True
        return [ClearState()] + self._jump(0, "state cleared", now)

    def on_state_begin(self, stream: int, wal_id: int, section: dict, now: float) -> Effects:
        out = self._abort_state_in()
        self.sessions.clear()
        out += [ClearState()] + self._jump(0, "a state sync begins", now)
        self.state_incomplete = True
        self.snap_in = SnapshotIn(wal_id, stream,
                                  [tuple(x) for x in section.get("epoch_history", [])],
                                  dict(section))
        self.counters["state_syncs_received"] += 1
        return out + [BeginStateIn(wal_id, self.leader_id),
                      Log(INFO, f"receiving a full state sync at WAL id {wal_id}")]

    def on_state_zrepl(self, stream: int, section: dict) -> None:
        """zrepl's own state (client sessions), before the App's."""
        snap = self.snap_in
        if snap is None or snap.stream != stream or snap.app_started:
            raise ProtocolError("zrepl section outside the start of a state sync")
        self.sessions.load_section(section.get("sessions"))
        snap.section.update({k: v for k, v in section.items() if k != "epoch_history"})

    def on_state_batch(self, stream: int, n: int) -> bool:
        """A batch of App entries; True if it is the first (the App's
        section begins)."""
        snap = self.snap_in
        if snap is None or snap.stream != stream:
            raise ProtocolError("state batch outside a state sync")
        snap.received += n
        first = not snap.app_started
        snap.app_started = True
        return first

    def on_state_end(self, stream: int, wal_id: int, count: int, now: float) -> Effects:
        snap = self.snap_in
        if snap is None or snap.stream != stream or snap.wal_id != wal_id:
            raise ProtocolError("state end outside a state sync")
        if count != snap.received:
            self._abort_state_in()
            raise ProtocolError(f"state sync carried {snap.received} entries, the upstream "
                                f"sent {count}")
        self.snap_in = None
        self.state_incomplete = False
        # the checkpoint of the state sync is durable before the history
        # it came with (a crash between them can only make the next
        # handshake more conservative)
        out: Effects = [EndStateIn(wal_id, True), ClearWAL()]
        self.checked_by = (self.leader_address, self.leader_id)
        out += self._jump(wal_id, "a state sync completed", now)
        if snap.history:
            out += self._set_history(snap.history)
        return out + [Log(INFO, f"state sync complete: {count} entries at WAL id {wal_id}")]

    def _abort_state_in(self) -> Effects:
        snap, self.snap_in = self.snap_in, None
        return [EndStateIn(snap.wal_id, False)] if snap is not None else []

    # ==================================================================
    # the position
    # ==================================================================

    def _advance(self, first: int, last: int, codes: list[int],
                 sessions: list[tuple[int, bytes, int]]) -> None:
        """A batch applied in order."""
        self.position = last
        if sessions:
            self.sessions.record_batch(first, codes, sessions)
        if first == 1 and self.state_incomplete and self.snap_in is None:
            self.state_incomplete = False  # cleared, then rebuilt from the log's start

    def _jump(self, position: int, why: str, now: float) -> Effects:
        """THE RULE for a position that does not move by a contiguous batch:
        the downstream link restarts, because what the follower
        acknowledged no longer relates to what this node holds."""
        self.position = position
        self.commit_index = min(self.commit_index, position)
        if self.link.state == FollowerState.NONE and not self.follower:
            return []
        return self._restart_link(f"position jumped to {position} ({why})", now)

    # ==================================================================
    # the commit path (leader)
    # ==================================================================

    def awaiting_acks(self) -> bool:
        """Batches wait for the follower's ack, or for chain members'."""
        link = self.link
        return bool(link.inflight or link.confirming)

    def window_full(self) -> bool:
        """Batches go through the follower and ``window`` of them wait for
        it: no more is sent (commits queue, a forwarder stops reading its
        upstream) until an ack frees a place."""
        link = self.link
        return link.forwarding and \
            len(link.inflight) + len(link.confirming) >= self.cfg.window

    def commit_gate(self) -> int:
        """May queued submissions be committed now?"""
        if self.cfg.require_sync and not self.link.forwarding:
            return WAIT_SYNC
        if self.window_full():
            return WINDOW_FULL
        if self.reads_waiting:
            return HOLD_FOR_READS
        return OPEN

    def open_batch(self, first: int, last: int, pieces: list, now: float
                   ) -> tuple[Batch, tuple | None]:
        """A leader's batch about to be written: in flight to the follower
        when the link forwards.  Returns the batch and the header to send
        it with (None: not sent)."""
        batch = Batch(first, last, pieces, sent=now)
        return batch, (self._forward(batch) if self.link.forwarding else None)

    def _forward(self, batch: Batch) -> tuple:
        """Put ``batch`` in flight to the follower; the header to send it
        with: (leader_id, stream, the epoch history if this stream has not
        had its current version - the first batch of a stream always
        carries it)."""
        link = self.link
        batch.forwarded = True
        link.inflight.append(batch)
        if link.history_sent == self.history_version:
            return self.leader_id, link.stream, None
        link.history_sent = self.history_version
        return self.leader_id, link.stream, [list(x) for x in self.history]

    def batch_failed(self, batch: Batch, exc: BaseException, logged: bool, now: float,
                     applied: tuple[list[int], list] | None = None) -> Effects:
        """The local half of a leader's batch failed (the WAL write, or the
        App).  Its callers fail; if it was sent, the follower may hold what
        this node does not: the link restarts.  ``logged``: App.apply failed
        on a logged batch.  ``applied`` (codes, sessions): the write failed
        yet the log holds the batch (an fsync error), so the engine applied
        it - the App equals the log, as a restart would make it."""
        if applied is not None:
            self._advance(batch.first, batch.last, *applied)
        elif logged:
            self.position = batch.last  # in the WAL: replayed at restart
        out: Effects = [Failure(f"{'App.apply' if logged else 'WAL write'} failed on WAL "
                                f"{batch.first}..{batch.last}: {exc}")]
        if batch.pieces:
            out.append(Resolve(batch.pieces, None, exc))
            batch.pieces = []
        batch.failed = True
        batch.set_local(None, None)
        if batch.forwarded and applied is None and not logged and not self.epoch_spent:
            self.epoch_spent = True  # the follower may hold entries this log never will
            out.append(Log(ERROR, f"WAL {batch.first}..{batch.last} was sent but not logged: "
                                  f"no more writes in epoch {self.leader_id}"))
        if batch.forwarded:
            out += self.link_failed(ReplicationError(
                f"leader could not log WAL {batch.first}..{batch.last} after sending it: {exc}"),
                now)
        return out

    def batch_applied(self, batch: Batch, codes: list[int], codes_bytes: bytes,
                      sessions: list[tuple[int, bytes, int]], now: float) -> Effects:
        """The local half of a leader's batch is done."""
        self._advance(batch.first, batch.last, codes, sessions)
        if not batch.forwarded:
            batch.set_local(codes, codes_bytes)
            if self.cfg.require_sync:
                return self._resolve_unacked(batch, Timeout("no synchronous follower"))
            return self._commit(batch)
        out: Effects = []
        if not self.cfg.sync_downstream and batch.pieces:
            # an asynchronous link: answered now, the ack is still compared
            batch.codes = codes
            out += self._commit(batch)
        return out + self._local_done(batch, codes, codes_bytes, now)

    def _local_done(self, batch: Batch, codes: list[int] | None, codes_bytes: bytes | None,
                    now: float) -> Effects:
        """The local half of ``batch`` is known: settle it if nothing else
        is awaited (batches the follower acknowledged settle in order)."""
        if not batch.set_local(codes, codes_bytes):
            return []
        return self._confirm(now) if batch.queued else self._finalize(batch, now)

    def _confirm(self, now: float) -> Effects:
        """Settle, in order, the batches the follower acknowledged whose
        local half and chain members are all in."""
        out: Effects = []
        queue = self.link.confirming
        while queue:
            b = queue[0]
            if not b.local_done or b.waiting:
                break
            queue.popleft()
            b.queued = False
            out += self._finalize(b, now)
        return out

    def _commit(self, batch: Batch) -> Effects:
        """``batch`` is confirmed: answer its callers (or its upstream)."""
        if not batch.failed and batch.last > self.commit_index:
            self.commit_index = batch.last
        out = self._answer(batch, None)
        if self.reads_waiting and self.commit_index >= self.position:
            out.append(ReadsReady())
        return out

    def _answer(self, batch: Batch, error: BaseException | None) -> Effects:
        if batch.upstream is not None:
            stream, last = batch.upstream
            batch.upstream = None
            codes = (batch.codes_bytes or b"") if error is None else b""
            return [SendAck(protocol.ack_message(stream, WAL, last, codes, error))]
        if batch.pieces:
            pieces, batch.pieces = batch.pieces, []
            return [Resolve(pieces, batch.codes, error)]
        return []

    def _finalize(self, batch: Batch, now: float) -> Effects:
        """Both halves of a batch are known: decide what it answers."""
        remote = batch.remote
        if isinstance(remote, BaseException):
            return self._unannounce(batch, remote) + self._resolve_unacked(batch, remote)
        mine = batch.codes_bytes
        if mine is not None:
            who = self.link.address if remote != mine else \
                next((m for m, c in (batch.members or {}).items() if c != mine), None)
            if who is not None:
                theirs = remote if remote != mine else batch.members[who]  # type: ignore[index]
                exc = FollowerMismatch(
                    f"{'follower' if who == self.link.address else 'chain member'} {who} "
                    f"answered {protocol.codes_from_bytes(theirs)[:8]} where this node answered "
                    f"{(batch.codes or [])[:8]} for WAL {batch.first}..{batch.last}: the App "
                    "is not deterministic")
                return self._unannounce(batch, exc) + self._answer(batch, exc) + \
                    self.link_failed(exc, now)
        return self._commit(batch)

    def _unannounce(self, batch: Batch, exc: BaseException) -> Effects:
        """A member whose acknowledgement named its follower (so the head
        waits for that follower) lost the follower's: it tells the head,
        which stops waiting for it - or, when this node would answer an
        error (require_sync, a mismatch), fails the batch."""
        follower = batch.announced
        if not follower:
            return []
        batch.announced = False
        err = exc if self.cfg.require_sync or isinstance(exc, FollowerMismatch) else None
        return [SendHeadAck(protocol.member_drop_message(
            self.leader_id, batch.first, batch.last, self.address, follower, err))]

    def _resolve_unacked(self, batch: Batch, exc: BaseException) -> Effects:
        """A batch whose follower failed before acknowledging it."""
        if self.cfg.require_sync or isinstance(exc, FollowerMismatch):
            return self._answer(batch, exc if isinstance(exc, FollowerMismatch) else Timeout(
                f"follower did not acknowledge WAL {batch.first}..{batch.last} ({exc}); the "
                "write is on the leader only (outcome unknown)"))
        return self._commit(batch)  # availability first: committed on this node

    # ==================================================================
    # the downstream link
    # ==================================================================

    def ack_limit(self) -> float:
        """How long this node's follower may stay silent while batches
        wait: shorter deeper in a chain."""
        cfg = self.cfg
        return cfg.ack_timeout * max(cfg.ack_timeout_floor,
                                     1.0 - cfg.ack_timeout_hop_step * self.depth)

    def ack_deadline(self) -> float | None:
        """FAILED, not busy: when the link fails unless the follower
        acknowledges something - ``ack_limit()`` after its last
        acknowledgement or the oldest batch's sending, whichever is later
        (None: nothing waits)."""
        link = self.link
        deadline = None
        if link.inflight:
            deadline = max(link.inflight[0].sent, link.last_ack_at) + self.ack_limit()
        queue = link.confirming
        if queue and queue[0].waiting:
            # chain members too: a member whose link to its follower breaks
            # says so within its own, shorter, limit
            members = queue[0].acked_at + self.ack_limit()
            if deadline is None or members < deadline:
                deadline = members
        return deadline

    def check_acks(self, now: float) -> Effects:
        """The ack timer: fail the link if its follower, or a chain member
        it named, went silent."""
        deadline = self.ack_deadline()
        if deadline is not None and now >= deadline:
            queue = self.link.confirming
            if queue and queue[0].waiting and now >= queue[0].acked_at + self.ack_limit():
                b = queue[0]
                return self.link_failed(Timeout(
                    f"chain member(s) {', '.join(sorted(b.waiting or ()))} did not acknowledge "
                    f"WAL {b.first}..{b.last} within {self.ack_limit():g}s"), now)
            return self.link_failed(Timeout(
                f"follower {self.link.address} acknowledged nothing within "
                f"{self.ack_limit():g}s"), now)
        return []

    def on_ack(self, stream: int, kind: int, position: int, codes: bytes, err: Any,
               now: float, downstream: str = "") -> Effects:
        """An acknowledgement from the follower; ``downstream``: the
        follower forwarded the batch to that node, which acknowledges it
        straight to this head too (see :meth:`_acks_wait_for_follower`)."""
        link = self.link
        if stream == 0 or stream != link.stream:
            self.counters["dropped_messages"] += 1  # from an older conversation
            return []
        if err is not None:
            return self.link_failed(protocol.error_from_wire(err), now)
        if kind == WAL:
            if not link.inflight or link.inflight[0].last != position:
                expected = link.inflight[0].last if link.inflight else None
                return self.link_failed(ProtocolError(
                    f"follower acknowledged WAL {position}, expected {expected}"), now)
            batch = link.inflight.popleft()
            link.last_ack_at = now
            machine = link.machine
            if position > machine.acked:
                machine.acked = position
            if position >= self.position:
                link.synced_at = now
            batch.set_remote(codes)
            if downstream and self.role == NodeRole.LEADER:
                self._expect(batch, downstream, link.address)
            batch.acked_at = now
            batch.queued = True
            link.confirming.append(batch)
            out = self._confirm(now)
            if machine.state == FollowerState.SYNCING_LOG:
                out += self._claim_if_caught_up()
            return out
        if kind in (STATE, protocol.STATE_END):
            snap = link.snap
            if snap is not None and snap.stream == stream:
                link.last_ack_at = snap.last_progress = now
                if kind == STATE:
                    snap.acked_seq = max(snap.acked_seq, position)
                elif snap.end_sent:
                    return self._snapshot_done(snap, now)
            return []
        return self.link_failed(ProtocolError(f"ack of unknown kind {kind}"), now)

    # --- chain members, acknowledging straight to this head ------------------------

    def on_member_ack(self, leader_id: int, first: int, last: int, codes: bytes, member: str,
                      downstream: str, now: float) -> Effects:
        """A chain member logged and applied WAL ``first..last`` of epoch
        ``leader_id`` (and forwarded it to ``downstream``, if not "").  Under
        one epoch a WAL id has one entry, so this is a fact about this
        head's log whichever stream carried it; it counts for a batch in
        flight only once the member's upstream named it for that batch."""
        batch = self._batch_at(leader_id, first, last)
        if batch is None:
            return []
        if (batch.members and member in batch.members) or \
                (batch.dropped and member in batch.dropped):
            return []
        if batch.waiting and member in batch.waiting:
            batch.waiting.discard(member)
            if batch.members is None:
                batch.members = {}
            batch.members[member] = codes
            if downstream:
                self._expect(batch, downstream, member)
            return self._confirm(now)
        if batch.early is None:
            batch.early = {}
        batch.early[member] = (codes, downstream)  # named later (its acks race)
        return []

    def on_member_drop(self, leader_id: int, first: int, last: int, member: str, dropped: str,
                       err: Any, now: float) -> Effects:
        """``member``'s link to ``dropped`` failed with WAL ``first..last``
        in flight: stop waiting for ``dropped`` (and whom it named) where
        ``member`` named it - or, with ``err`` (that member answers an error
        under its policy), fail the link as if the follower had refused."""
        if self.role != NodeRole.LEADER or leader_id != self.leader_id:
            self.counters["dropped_messages"] += 1
            return []
        touched = [b for b in (*self.link.confirming, *self.link.inflight)
                   if b.first <= last and b.last >= first]
        if not touched:
            return []
        if err is not None:
            return self.link_failed(protocol.error_from_wire(err), now)
        for b in touched:
            self._drop_member(b, dropped, member)
        return self._confirm(now)

    def _batch_at(self, leader_id: int, first: int, last: int) -> Batch | None:
        if self.role != NodeRole.LEADER or leader_id != self.leader_id:
            self.counters["dropped_messages"] += 1
            return None
        link = self.link
        for b in (*link.confirming, *link.inflight):
            if b.first == first and b.last == last:
                return b
        return None

    def _expect(self, batch: Batch, member: str, parent: str) -> None:
        """``parent`` forwarded ``batch`` to ``member``: the batch waits
        for it (unless it acknowledged already, or ``parent`` said it lost
        it)."""
        if member == self.address or member == self.link.address or \
                (batch.members and member in batch.members) or \
                (batch.waiting and member in batch.waiting) or \
                (batch.dropped and batch.dropped.get(member) == parent):
            return
        if batch.parents is None:
            batch.parents = {}
        batch.parents[member] = parent
        early = batch.early.pop(member, None) if batch.early else None
        if early is not None:
            if batch.members is None:
                batch.members = {}
            batch.members[member] = early[0]
            if early[1]:
                self._expect(batch, early[1], member)
            return
        if batch.waiting is None:
            batch.waiting = set()
        batch.waiting.add(member)

    def _drop_member(self, batch: Batch, member: str, by: str) -> None:
        """``by`` lost ``member``: the batch no longer waits for it, nor for
        those it named."""
        if batch.dropped is None:
            batch.dropped = {}
        parents = batch.parents or {}
        if member in parents and parents[member] != by:
            return  # (not the node that named it)
        batch.dropped[member] = by
        if batch.waiting:
            batch.waiting.discard(member)
        for child, parent in list(parents.items()):
            if parent == member:
                self._drop_member(batch, child, member)

    def link_failed(self, exc: BaseException, now: float) -> Effects:
        """The streaming link failed: resolve what is in flight by policy,
        close it, and handshake again (at once after a gap or a truncated
        WAL, with backoff otherwise, never after a fatal refusal)."""
        link = self.link
        if not link.machine.streaming:
            return []
        address = link.address
        out: Effects = [Log(WARNING, f"link to follower {address} failed: {exc}"),
                        Failure(f"follower {address}: {exc}")]
        out += self._drop_link(exc, now)
        link.machine.failed(exc, now, retry_now=isinstance(exc, (WALTruncated, WALGap)))
        if isinstance(exc, FATAL):
            out.append(Failure(f"follower {address} refused: {exc}"))
        return out + [Wake()]

    def _drop_link(self, exc: BaseException, now: float) -> Effects:
        link = self.link
        out: Effects = []
        pending = list(link.confirming) + list(link.inflight)
        link.confirming.clear()
        link.inflight.clear()
        link.forwarding = False
        for b in pending:
            b.queued = False
            if b.remote is None or b.waiting:
                # (the follower's ack, or a member's, will not come now)
                b.remote, b.waiting = exc, None
            if b.local_done:
                out += self._finalize(b, now)
        link.stream = 0
        link.head_sent = ""
        link.snap = None
        link.call = None
        link.history_sent = -1
        link.closing = True  # tick() closes it, on the engine's thread
        if self.reads_waiting and self.commit_index >= self.position:
            out.append(ReadsReady())
        return out

    def _restart_link(self, why: str, now: float) -> Effects:
        """Tear the link down and start over with the configured follower."""
        out: Effects = [Log(INFO, f"restarting the follower link: {why}")]
        out += self._drop_link(ReplicationError(f"link reset: {why}"), now)
        address = self.follower if self.role in (NodeRole.LEADER, NodeRole.FORWARDER,
                                                 NodeRole.FOLLOWER) else ""
        self.link.machine.configure(address, now)
        return out + [Wake()]

    def follower_synchronous(self) -> bool:
        """THE DEFINITION of a SYNCHRONOUS follower, the promise the
        supervisor acts on: the follower has acknowledged everything this
        node acknowledged, and every entry this node holds beyond that is
        in flight to it within the window.  (See the module essay.)"""
        link = self.link
        return (link.state == FollowerState.SYNCHRONOUS and self.cfg.sync_downstream
                and link.forwarding and len(link.inflight) <= self.cfg.window
                and link.covers(self.position))

    def _claim_if_caught_up(self) -> Effects:
        """SYNCING_LOG -> SYNCHRONOUS once the link forwards and the follower
        acknowledged everything sent before it began to."""
        link = self.link
        if not link.forwarding or link.acked < link.sync_from:
            return []
        link.machine.caught_up()
        if self.role == NodeRole.LEADER and link.acked > self.commit_index:
            # the follower holds everything up to here (after a state sync
            # too, where no batch was acknowledged): confirmed
            self.commit_index = min(link.acked, self.position)
        return [Log(INFO, f"follower {link.address} is synchronous at WAL id {link.acked}")]

    def tick(self, now: float) -> tuple[Effects, float]:
        """The link's timers: a control call that got no reply, a stalled
        state sync, a handshake that is due.
        Returns the effects and the seconds until the next timer."""
        link = self.link
        out: Effects = []
        if link.closing:
            link.closing = False
            out.append(CloseLink())
        wait = 1.0
        call = link.call
        if call is not None:
            if now >= call.deadline:
                link.call = None
                out += self._call_failed(call, Timeout(
                    f"follower {link.address} did not answer {call.op} within "
                    f"{self.cfg.rpc_timeout:g}s"), now)
            else:
                wait = min(wait, call.deadline - now)
        # (acks are judged by check_acks, which the engine calls after it
        # has read the ones waiting: never here, where one may sit unread)
        deadline = self.ack_deadline()
        if deadline is not None:
            wait = min(wait, max(0.001, deadline - now))
        snap = link.snap
        if snap is not None and link.state == FollowerState.SYNCING_STATE:
            waiting = snap.end_sent or snap.sent_seq > snap.acked_seq
            if waiting and now - snap.last_progress > self.cfg.state_sync_stall_timeout:
                out += self.link_failed(Timeout(
                    f"follower {link.address} acknowledged nothing of the state sync for "
                    f"{self.cfg.state_sync_stall_timeout:g}s"), now)
        # (no handshake while an incoming state sync is incomplete: a
        # partial App has nothing to offer a follower; none while this
        # leader's epoch is spent: after a restart its follower may hold
        # acknowledged writes that it lost, and the handshake would rebuild
        # the follower from this node)
        if link.state == FollowerState.NOT_CONNECTED and link.call is None and \
                not self.state_incomplete and not self.epoch_spent and self.serves_follower():
            if link.machine.connect_due(now):
                out += self._start_handshake(now)
                wait = min(wait, self.cfg.rpc_timeout)
            else:
                wait = min(wait, max(0.001, link.machine.next_attempt - now))
        return out, max(wait, 0.0)

    def _call(self, op: str, args: dict, stream: int, now: float) -> Effects:
        self._calls += 1
        self.link.call = PendingCall(op, self._calls, now + self.cfg.rpc_timeout, stream)
        return [CallFollower(self.link.address, op, args, self._calls)]

    def _start_handshake(self, now: float) -> Effects:
        stream = self._rng.getrandbits(63) or 1
        # the follower acknowledges straight to the head of the chain
        head = self.link.head_sent = self.address if self.role == NodeRole.LEADER else self.head
        return self._call("connect", {
            "head": head,
            "leader_id": self.leader_id, "address": self.address, "stream": stream,
            "epoch_history": [list(x) for x in self.history],
            # a node that is not the leader is at least the second hop, even
            # when it does not know its own depth yet (just restarted)
            "depth": self.depth + 1 if self.role == NodeRole.LEADER else max(self.depth, 1) + 1,
            "position": self.position, "role": int(self.role)}, stream, now)

    def on_follower_reply(self, token: int, result: Any, error: BaseException | None,
                          now: float, min_wal: int) -> Effects:
        """A control call to the follower answered (``result``) or failed
        (``error``).  Call with the App lock held: a handshake's plan and a
        state sync's snapshot need a position that does not move."""
        link = self.link
        call = link.call
        if call is None or call.token != token:
            return []  # a call given up on
        link.call = None
        if error is not None:
            return self._call_failed(call, error, now)
        if call.op == "connect":
            try:
                fi = FollowerInfo.from_reply(result)
            except (KeyError, TypeError, ValueError) as exc:
                return self._call_failed(call, ProtocolError(f"bad handshake reply: {exc}"), now)
            return self._begin_sync(fi, call.stream, now, min_wal)
        if call.op == "clear_state" and link.state == FollowerState.SYNCING_STATE and \
                link.stream == call.stream:
            return self._start_snapshot(now)
        return []

    def _call_failed(self, call: PendingCall, exc: BaseException, now: float) -> Effects:
        link = self.link
        if call.op != "connect":
            return self.link_failed(exc, now)
        link.closing = True  # a REQ socket that lost its reply is reopened
        out: Effects = [Wake()]
        if isinstance(exc, (WrongUpstream, StaleUpstream)):
            out.append(Log(INFO, f"{link.address} refused this node as its upstream: {exc}"))
        elif not isinstance(exc, Timeout):
            out.append(Log(WARNING, f"handshake with {link.address} failed: {exc}"))
        if isinstance(exc, FATAL):
            out.append(Failure(f"follower {link.address} refused: {exc}"))
        link.machine.failed(exc, now)
        return out

    def _begin_sync(self, fi: FollowerInfo, stream: int, now: float, min_wal: int) -> Effects:
        link = self.link
        plan = plan_sync(UpstreamView(list(self.history), min_wal, self.position), fi)
        link.machine.connected(plan, fi.position)
        link.stream = stream
        link.history_sent = -1  # the first batch of a stream carries the history
        link.opened_at = link.last_ack_at = now
        out: Effects = [OpenLink(link.address),
                        Log(INFO, f"follower {link.address} at {fi.position}: {plan.reason}")]
        if plan.state == FollowerState.SYNCING_LOG:
            self.counters["log_catchups"] += 1
            link.catchup_pos = plan.start
            if self.role == NodeRole.LEADER and fi.position > self.commit_index:
                # the follower holds this prefix of our log: it is confirmed
                self.commit_index = min(fi.position, self.position)
            return out
        link.slot = self.position + 1
        return out + self._call("clear_state", {"leader_id": self.leader_id, "stream": stream},
                                stream, now)

    def _start_snapshot(self, now: float) -> Effects:
        link = self.link
        wal_id = self.position
        link.snap = SnapshotOut(wal_id, link.stream, now)
        link.slot = wal_id + 1
        self.counters["state_syncs_sent"] += 1
        return [StartSnapshot(wal_id, link.stream, self.leader_id,
                              {"epoch_history": [list(x) for x in self.history]}),
                Log(INFO, f"full state sync to {link.address} at WAL id {wal_id}")]

    def snapshot_may_send(self) -> bool:
        snap = self.link.snap
        return snap is not None and not snap.end_sent and \
            snap.sent_seq - snap.acked_seq < self.cfg.window

    def snapshot_sent(self, seq: int, now: float) -> None:
        snap = self.link.snap
        if snap is not None:
            snap.sent_seq = max(snap.sent_seq, seq)
            snap.last_progress = now

    def snapshot_end(self, produced_seq: int, count: int) -> bytes | None:
        """The source produced everything (``produced_seq`` messages,
        ``count`` App entries): the end message, once every message before
        it is sent and acknowledged (None: not yet).  Report the send with
        :meth:`snapshot_end_sent`."""
        snap = self.link.snap
        if snap is None or snap.end_sent:
            return None
        snap.count = count
        if not snap.acked_seq == snap.sent_seq == produced_seq:
            return None
        return protocol.state_message(protocol.STATE_END, self.leader_id, snap.stream,
                                      snap.wal_id, count)

    def snapshot_end_sent(self, now: float) -> None:
        snap = self.link.snap
        if snap is not None:
            snap.end_sent = True
            snap.last_progress = now

    def _snapshot_done(self, snap: SnapshotOut, now: float) -> Effects:
        link = self.link
        link.snap = None
        link.machine.snapshot_done(snap.wal_id)
        link.catchup_pos = snap.wal_id + 1
        return [Log(INFO, f"state sync to {link.address} done: {snap.count} entries at WAL id "
                          f"{snap.wal_id}"), Wake()]

    def catchup_next(self, now: float) -> tuple[tuple[int, int] | None, Effects]:
        """The next WAL range to stream while SYNCING_LOG: ``(start,
        count)``, or None (the window is full, or nothing to send).  When
        everything was sent the link starts forwarding; call it with the
        App lock held so that no write starts in between."""
        link = self.link
        if link.state != FollowerState.SYNCING_LOG or link.forwarding or \
                len(link.inflight) >= self.cfg.window:
            return None, []
        if link.catchup_pos <= self.position:
            return (link.catchup_pos, min(self.cfg.stream_batch_entries,
                                          self.position - link.catchup_pos + 1)), []
        link.forwarding = True
        link.sync_from = self.position
        return None, [Log(INFO, f"follower {link.address} has everything up to WAL id "
                                f"{self.position} in flight: forwarding")
                      ] + self._claim_if_caught_up()

    def catchup_batch(self, start: int, n: int, now: float) -> tuple[Batch, tuple]:
        """A catch-up batch read from the WAL, put in flight: the batch and
        the header to send it with."""
        batch = Batch(start, start + n - 1, sent=now, local_done=True)  # nothing to compare
        return batch, self._forward(batch)

    def catchup_sent(self, batch: Batch) -> None:
        self.link.catchup_pos = batch.last + 1

    def catchup_unsent(self, batch: Batch, now: float) -> Effects:
        """A catch-up send that did not go out (not connected yet, or the
        queue is full): taken back, the history counts as not sent."""
        link = self.link
        if link.inflight and link.inflight[-1] is batch:
            link.inflight.pop()
        link.history_sent = -1
        if now - link.opened_at > self.cfg.rpc_timeout:
            return self.link_failed(Timeout(f"follower {link.address} data endpoint "
                                            "unreachable"), now)
        return []

    def follower_needs(self) -> int:
        """First WAL id the follower may still ask for (0: none)."""
        link = self.link
        if not link.address or link.state in (FollowerState.NONE, FollowerState.ERROR):
            return 0
        if link.state == FollowerState.SYNCING_STATE:
            return link.slot
        return link.acked + 1

    def truncation_limit(self, oldest_checkpoint: int) -> int:
        """The WAL may be truncated before this id: what the oldest kept
        checkpoint covers, but never what the follower still needs, unless
        it is more than ``max_retained_wal`` behind (it then gets a state
        sync when it returns)."""
        limit = oldest_checkpoint + 1
        needed = self.follower_needs()
        if needed and self.position - needed <= self.cfg.max_retained_wal:
            limit = min(limit, needed)
        return limit

    # ==================================================================
    # reads and client sessions
    # ==================================================================

    def leader_read(self, now: float) -> bool:
        """A ``leader_only`` read: True to answer it now (call with the App
        lock held: the App then holds exactly the acknowledged writes),
        False to wait until the writes in flight are acknowledged.  Raises
        NotLeader when this node may not answer at all."""
        self.check_writable(now)
        return self.commit_index >= self.position

    def check_submission(self, session: tuple[bytes, int], now: float) -> int | None:
        """A remote client's command: None to admit it as new, or the code
        to answer from the session table.  Raises a retryable Timeout when
        it is queued already or applied but not yet confirmed, or when a new
        client would push out a session active within ``session_expiry``;
        SessionExpired when it is too old to tell."""
        cid = session[0]
        hit = self.sessions.lookup(*session, active=self._has_pending)
        if hit is None:
            if session in self.sessions_pending:
                raise Timeout("this command is queued already; retry for its answer")
            if cid not in self.sessions and not self._has_pending(cid):
                self._admit_new_client(now)
            self.sessions_pending.add(session)
            self._seen_at(cid, now)
            return None
        self._seen_at(cid, now)
        code, wal_id = hit
        if wal_id > self.commit_index:
            raise Timeout("this command is applied but not yet confirmed; retry for its answer")
        self.counters["duplicates_answered"] += 1
        return code

    def _admit_new_client(self, now: float) -> None:
        """A new client's first command pushes the least recently active
        sessions out of a full table when it is applied (on every node
        alike); admit it only if those were idle for ``session_expiry`` as
        this leader saw them (sessions it never saw count as active when it
        became leader), so that no client retrying within that time finds
        its session gone."""
        new = 1 + len({c for c, _ in list(self.sessions_pending) if c not in self.sessions})
        for victim in self.sessions.victims(new):
            if now - self._last_seen.get(victim, self._leading_since) < self.cfg.session_expiry:
                raise Timeout(f"all {self.cfg.max_sessions} client sessions were active within "
                              f"{self.cfg.session_expiry:g}s: a new client must wait; retry")

    def _seen_at(self, client_id: bytes, now: float) -> None:
        seen = self._last_seen
        seen[client_id] = now
        if len(seen) > 2 * self.cfg.max_sessions + 64:  # keep it bounded
            for cid in [c for c in seen if c not in self.sessions]:
                del seen[cid]

    def _has_pending(self, client_id: bytes) -> bool:
        """Commands of this client wait here (seldom asked: only for an
        unknown client past its first command)."""
        return any(cid == client_id for cid, _ in list(self.sessions_pending))

    def submission_done(self, session: tuple[bytes, int]) -> None:
        """A remote client's command was answered (it is recorded in the
        session table if it was applied).  Any thread."""
        self.sessions_pending.discard(session)

    def stop(self) -> Effects:
        """The node stops: nothing more is committed, and batches still
        waiting for their follower have an unknown outcome."""
        self.running = False
        exc = Timeout(f"node {self.address} stopped before the follower acknowledged")
        out: Effects = []
        for b in (*self.link.confirming, *self.link.inflight):
            out += self._answer(b, exc)
        self.link.confirming.clear()
        self.link.inflight.clear()
        self.link.forwarding = False
        return out

    # ==================================================================
    # status
    # ==================================================================

    def status_fields(self, now: float) -> dict:
        link = self.link
        has_follower = bool(link.address)
        acked = link.acked if has_follower else 0
        lag = max(0, self.position - acked) if has_follower else 0
        return {
            "role": self.role, "leader_id": self.leader_id, "max_applied_wal": self.position,
            "follower": link.address, "follower_state": link.state,
            "leader": self.leader_address, "epoch_history": list(self.history),
            "follower_acked_wal": acked, "follower_lag": lag,
            "follower_lag_seconds": round(now - link.synced_at, 6)
            if lag and link.synced_at else 0.0,
            "follower_sync": self.follower_synchronous(),
            "extra": {"follower_error": link.machine.error,
                      "follower_reason": link.machine.reason,
                      "require_sync": self.cfg.require_sync,
                      "lease_left": round(max(0.0, self.lease_until - now), 6)
                      if self.lease_enforced else None,
                      "commit_index": self.commit_index,
                      "in_flight": len(link.inflight), "confirming": len(link.confirming),
                      "depth": self.depth, "head": self.head,
                      "epoch_spent": self.epoch_spent,
                      "stepped_down": bool(self.successor),
                      "clock": now,  # echoed by the supervisor's next renewal
                      "boot": self.boot,
                      "acks_durable": self.cfg.fsync == "always",
                      "dropped_messages": 0, "denied_calls": 0,
                      "checkpoint_failures": 0, **self.counters}}
