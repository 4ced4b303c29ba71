"""The downstream link: this node's view of its follower, without I/O.

The follower-sync machine
-------------------------

An upstream node (a leader or a forwarder) drives its follower through

    NONE -> NOT_CONNECTED -> SYNCING_STATE -> SYNCING_LOG -> SYNCHRONOUS
                 ^   \\____________________________^            |
                 |________________ failure _____________________|
                          ERROR (stale epoch, mismatch, protocol)

* ``NOT_CONNECTED``: a follower address is configured; the upstream tries
  the handshake (``connect``), retrying with exponential backoff.
* On a successful handshake the follower reports its log (positions and
  epoch history) and :func:`zrepl.core.epochs.plan_sync` decides: stream
  the log from where the follower is (``SYNCING_LOG``), or, when the
  follower diverged or the WAL it needs is gone, rebuild it from a snapshot
  (``SYNCING_STATE``, which ends in ``SYNCING_LOG`` from the snapshot's WAL
  id + 1).
* ``SYNCING_LOG`` ends in two steps.  When everything this node holds has
  been *sent* (checked while no write can start) the link starts
  *forwarding*: every new batch goes through the follower and waits for its
  acknowledgement.  Once the follower has *acknowledged* everything that
  was sent before, the link is ``SYNCHRONOUS`` (the definition is in
  :mod:`zrepl.core.node`).
* A transport failure (timeout, lost connection) goes back to
  ``NOT_CONNECTED`` and retries.  A refusal that retrying cannot fix (the
  follower obeys a newer epoch, its response codes differ, it speaks
  another protocol) is ``ERROR``: reported, and sticky until the follower
  is configured again.

:class:`FollowerSync` is the machine alone (its transitions are checked
against :data:`ALLOWED`); :class:`Link` adds what the link carries: the
stream token, the batches in flight (the window), what the follower
acknowledged, the catch-up position, the state sync being sent and the
control call being waited for.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from .commit import Batch
from .epochs import SyncPlan
from .errors import FollowerMismatch, ProtocolError, StaleLeader
from .types import FollowerState

# Every transition the machine may make; tests check each step against it.
ALLOWED: dict[FollowerState, set[FollowerState]] = {
    FollowerState.NONE: {FollowerState.NOT_CONNECTED},
    FollowerState.NOT_CONNECTED: {FollowerState.SYNCING_STATE, FollowerState.SYNCING_LOG,
                                  FollowerState.NOT_CONNECTED, FollowerState.ERROR},
    FollowerState.SYNCING_STATE: {FollowerState.SYNCING_LOG, FollowerState.NOT_CONNECTED,
                                  FollowerState.ERROR},
    FollowerState.SYNCING_LOG: {FollowerState.SYNCHRONOUS, FollowerState.NOT_CONNECTED,
                                FollowerState.ERROR},
    FollowerState.SYNCHRONOUS: {FollowerState.NOT_CONNECTED, FollowerState.ERROR},
    FollowerState.ERROR: {FollowerState.NOT_CONNECTED},
}
for _s in FollowerState:  # dropping the follower is always allowed
    ALLOWED[_s].add(FollowerState.NONE)
    ALLOWED[_s].add(FollowerState.NOT_CONNECTED)  # re-configuring restarts the handshake

FATAL = (StaleLeader, FollowerMismatch, ProtocolError)


class OutOfOrder(Exception):
    """An event that makes no sense in the current state (an engine bug);
    the state is left unchanged."""


class FollowerSync:
    """The state of one upstream->follower link.  Methods are events; the
    engine performs the I/O they call for and reports the outcome back."""

    def __init__(self, backoff_min: float = 0.05, backoff_max: float = 1.0):
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.address = ""
        self.state = FollowerState.NONE
        self.error = ""
        self.reason = ""
        self.acked = 0  # highest WAL id the follower is known to hold
        self.next_attempt = 0.0
        self._backoff = backoff_min
        self.trail: list[tuple[FollowerState, FollowerState]] = []  # last transitions
        self.transitions = 0

    def _move(self, new: FollowerState, reason: str = "") -> None:
        old = self.state
        if new not in ALLOWED[old]:
            raise AssertionError(f"follower sync: illegal transition {old.name} -> {new.name}")
        self.state = new
        self.reason = reason
        self.transitions += 1
        self.trail.append((old, new))
        del self.trail[:-32]

    def configure(self, address: str, now: float) -> None:
        """A follower address was set ("" drops the follower)."""
        self.address = address
        self.error = ""
        self.acked = 0
        self._backoff = self.backoff_min
        self.next_attempt = now
        self._move(FollowerState.NOT_CONNECTED if address else FollowerState.NONE,
                   "configured" if address else "no follower")

    def connect_due(self, now: float) -> bool:
        return self.state == FollowerState.NOT_CONNECTED and now >= self.next_attempt

    def connected(self, plan: SyncPlan, follower_position: int) -> None:
        if self.state != FollowerState.NOT_CONNECTED:
            raise OutOfOrder(f"connected while {self.state.name}")
        self.acked = follower_position
        self._backoff = self.backoff_min
        self._move(plan.state, plan.reason)

    def snapshot_done(self, snapshot_wal_id: int) -> None:
        if self.state != FollowerState.SYNCING_STATE:
            raise OutOfOrder(f"snapshot done while {self.state.name}")
        self.acked = snapshot_wal_id
        self._move(FollowerState.SYNCING_LOG, f"snapshot at {snapshot_wal_id} applied")

    def caught_up(self) -> None:
        if self.state != FollowerState.SYNCING_LOG:
            raise OutOfOrder(f"caught up while {self.state.name}")
        self._move(FollowerState.SYNCHRONOUS, "caught up")

    def acked_to(self, wal_id: int) -> None:
        if wal_id > self.acked:
            self.acked = wal_id

    def failed(self, exc: BaseException, now: float, retry_now: bool = False) -> None:
        """The handshake or the link failed.  Fatal refusals go to ERROR;
        anything else retries after a growing backoff (or at once)."""
        if self.state in (FollowerState.NONE, FollowerState.ERROR):
            return
        self.error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, FATAL):
            self._move(FollowerState.ERROR, self.error)
            return
        self.next_attempt = now if retry_now else now + self._backoff
        if not retry_now:
            self._backoff = min(self._backoff * 2, self.backoff_max)
        self._move(FollowerState.NOT_CONNECTED, self.error)

    @property
    def streaming(self) -> bool:
        return self.state in (FollowerState.SYNCING_STATE, FollowerState.SYNCING_LOG,
                              FollowerState.SYNCHRONOUS)


@dataclass
class PendingCall:
    """A control call to the follower whose reply is awaited."""

    op: str
    token: int
    deadline: float
    stream: int


@dataclass
class SnapshotOut:
    """A full state sync being sent: counters of the STATE messages (the
    engine holds the messages themselves and the child or copy that makes
    them)."""

    wal_id: int
    stream: int
    last_progress: float
    sent_seq: int = 0  # STATE messages sent (sequence numbers from 1)
    acked_seq: int = 0  # STATE messages acknowledged
    count: int | None = None  # App entries in the snapshot, from the source
    end_sent: bool = False


class Link:
    """One upstream -> follower link."""

    def __init__(self, backoff_min: float, backoff_max: float):
        self.machine = FollowerSync(backoff_min, backoff_max)
        self.stream = 0  # token of the current stream (0: none)
        self.inflight: collections.deque[Batch] = collections.deque()
        # acknowledged by the follower, not yet confirmed: the local half, or
        # chain members, still to come (in order: they are confirmed in order)
        self.confirming: collections.deque[Batch] = collections.deque()
        self.head_sent = ""  # the chain's head this stream's handshake named
        self.forwarding = False  # new batches go through the follower and wait for it
        self.sync_from = 0  # SYNCHRONOUS once the follower acknowledged up to here
        self.catchup_pos = 0  # next WAL id to stream while SYNCING_LOG
        self.slot = 0  # SYNCING_STATE: first WAL id the follower will need after it
        self.snap: SnapshotOut | None = None
        self.call: PendingCall | None = None
        self.closing = False  # the engine must close the link's sockets (next tick)
        self.history_sent = -1  # history version last sent on this stream
        self.opened_at = 0.0  # when this stream's data path was opened
        self.last_ack_at = 0.0  # when the follower last acknowledged anything
        self.synced_at = 0.0  # when it last held everything this node held

    @property
    def state(self) -> FollowerState:
        return self.machine.state

    @property
    def address(self) -> str:
        return self.machine.address

    @property
    def acked(self) -> int:
        """Highest WAL id the follower is known to hold."""
        return self.machine.acked

    def covers(self, position: int) -> bool:
        """Everything up to ``position`` is acknowledged by the follower
        or in flight to it, in one contiguous run."""
        acked = self.machine.acked
        if not self.inflight:
            return acked >= position
        return self.inflight[0].first <= acked + 1 and self.inflight[-1].last >= position
