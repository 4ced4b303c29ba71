"""Epochs and divergence, and the plan that brings a follower up to date.
Pure functions, no I/O.

Epochs
------

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

from .types import FollowerState

History = list[tuple[int, int]]


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


def not_held(upstream: History, up_position: int, follower: History, position: int) -> str:
    """Why the upstream's log (to ``up_position``) does not hold all of the
    follower's (to ``position``): "" when it does.  The follower must then
    be rebuilt - decided by the upstream in :func:`plan_sync`, foreseen by
    the follower at the handshake."""
    d = divergence_point(upstream, follower, min(position, up_position))
    if d is not None:
        return (f"logs diverge at WAL id {d} (the follower holds entries of another epoch "
                "from there)")
    if position > up_position:
        return f"follower is ahead ({position} > {up_position}): its extra entries were " \
            "never committed here"
    return ""


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
    why = not_held(up.epoch_history, up.position, f.epoch_history, pos)
    if why:
        return SyncPlan(FollowerState.SYNCING_STATE, 0, why)
    need = pos + 1
    if need == up.position + 1:
        return SyncPlan(FollowerState.SYNCING_LOG, need, "follower is up to date")
    if up.min_wal == 0 or need < up.min_wal:
        held = f"{up.min_wal}..{up.position}" if up.min_wal else "nothing"
        return SyncPlan(FollowerState.SYNCING_STATE, 0,
                        f"follower needs WAL from {need}; this node holds {held}")
    return SyncPlan(FollowerState.SYNCING_LOG, need, f"streaming WAL {need}..{up.position}")
