"""The follower-sync machine and the epoch rules, without any I/O.

Theory of operation
-------------------

An upstream node (a leader or a forwarder) drives its follower through

    NONE -> NOT_CONNECTED -> SYNCING_STATE -> SYNCING_LOG -> SYNCHRONOUS
                 ^   \\____________________________^            |
                 |________________ failure _____________________|
                          ERROR (stale epoch, mismatch, protocol)

* ``NOT_CONNECTED``: a follower address is configured; the upstream tries
  the handshake (``connect``), retrying with exponential backoff.
* On a successful handshake the follower reports its log (positions and
  epoch history) and :func:`plan_sync` decides: stream the log from where
  the follower is (``SYNCING_LOG``), or, when the follower diverged or the
  WAL it needs is gone, rebuild it from a snapshot (``SYNCING_STATE``,
  which ends in ``SYNCING_LOG`` from the snapshot's WAL id + 1).
* ``SYNCING_LOG`` ends when the follower has everything the upstream has,
  checked while no new write can start: from then on every batch waits
  for the follower's acknowledgement (``SYNCHRONOUS``).
* A transport failure (timeout, lost connection) goes back to
  ``NOT_CONNECTED`` and retries.  A refusal that retrying cannot fix (the
  follower obeys a newer epoch, its response codes differ, it speaks
  another protocol) is ``ERROR``: reported, and sticky until the follower
  is configured again.

Epochs
~~~~~~

``leader_id`` is an epoch; an *epoch history* is the list of
``(leader_id, first WAL id written under it)``.  Within one epoch a single
leader wrote a single sequence, so two logs hold the same entry at id ``x``
exactly when the epoch that wrote ``x`` is the same in both histories
(:func:`epoch_at`).  :func:`divergence_point` finds the first id where they
differ: the follower's entries from there on were never part of the
upstream's log (an old leader's unacknowledged tail) and the follower
must be rebuilt.  PostgreSQL's timeline histories solve the same problem.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from .errors import FollowerMismatch, ProtocolError, StaleLeader
from .types import FollowerState

History = list[tuple[int, int]]

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


def epoch_at(history: History, wal_id: int) -> int:
    """The leader_id under which ``wal_id`` was written (0 if before any)."""
    i = bisect_right([first for _, first in history], wal_id) - 1
    return history[i][0] if i >= 0 else 0


def divergence_point(upstream: History, follower: History, position: int) -> int | None:
    """First WAL id ``<= position`` that the follower's log holds from a
    different epoch than the upstream's, or None if the follower's log up to
    ``position`` is a prefix of the upstream's."""
    if position <= 0:
        return None
    candidates = sorted({1} | {first for _, first in upstream} | {first for _, first in follower})
    for wal_id in candidates:
        if wal_id > position:
            break
        if epoch_at(upstream, wal_id) != epoch_at(follower, wal_id):
            return wal_id
    return None


@dataclass
class FollowerInfo:
    """What a follower reports in the handshake."""

    leader_id: int
    max_wal: int
    min_wal: int
    max_applied_wal: int
    epoch_history: History = field(default_factory=list)

    @property
    def position(self) -> int:
        """Last WAL id the follower holds (after a snapshot its WAL may be
        empty while it has applied up to the snapshot's id)."""
        return max(self.max_wal, self.max_applied_wal)

    @classmethod
    def from_reply(cls, info: Any) -> "FollowerInfo":
        """From a ``connect`` reply; KeyError/TypeError/ValueError if it is
        malformed."""
        return cls(int(info["leader_id"]), int(info["max_wal"]), int(info["min_wal"]),
                   int(info["max_applied_wal"]),
                   [(int(a), int(b)) for a, b in info["epoch_history"]])


@dataclass
class UpstreamView:
    """The upstream's own log when it decides."""

    epoch_history: History
    min_wal: int  # 0 when its WAL is empty
    position: int  # last WAL id it holds and applied


@dataclass
class SyncPlan:
    state: FollowerState  # SYNCING_STATE or SYNCING_LOG
    start: int  # SYNCING_LOG: first WAL id to send
    reason: str


def plan_sync(up: UpstreamView, f: FollowerInfo) -> SyncPlan:
    """Decide how to bring a follower up to date after a handshake."""
    pos = f.position
    d = divergence_point(up.epoch_history, f.epoch_history, min(pos, up.position))
    if d is not None:
        return SyncPlan(FollowerState.SYNCING_STATE, 0,
                        f"logs diverge at WAL id {d} (the follower holds entries of another "
                        f"epoch from there)")
    if pos > up.position:
        return SyncPlan(FollowerState.SYNCING_STATE, 0,
                        f"follower is ahead ({pos} > {up.position}): its extra entries were "
                        "never committed here")
    need = pos + 1
    if need == up.position + 1:
        return SyncPlan(FollowerState.SYNCING_LOG, need, "follower is up to date")
    if up.min_wal == 0 or need < up.min_wal:
        held = f"{up.min_wal}..{up.position}" if up.min_wal else "nothing"
        return SyncPlan(FollowerState.SYNCING_STATE, 0,
                        f"follower needs WAL from {need}; this node holds {held}")
    return SyncPlan(FollowerState.SYNCING_LOG, need, f"streaming WAL {need}..{up.position}")


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
