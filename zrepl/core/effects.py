"""What the core asks the engine to do.

The core's methods are events (a message arrived, a timer fired, a command
was submitted, a write finished); they return effects, in the order in
which the engine must carry them out.  ``Persist`` always comes first when
durable metadata changed: the engine makes it durable before anything
else, so a node never acts on an epoch it could forget.

Effects name *what* to do; the engine decides *how* (a ZeroMQ socket or
the in-memory transport, a forked child or an in-process copy).
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import NodeRole

# Log levels as numbers (the core does not import logging: it logs nothing
# itself, it says what is worth logging).
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40


class Effect:
    __slots__ = ()


@dataclass(slots=True)
class Persist(Effect):
    """Make these metadata durable before acting on anything after it."""
    role: NodeRole | None = None
    leader_id: int | None = None
    history: list[tuple[int, int]] | None = None
    follower: str | None = None


@dataclass(slots=True)
class Log(Effect):
    level: int
    text: str


@dataclass(slots=True)
class Failure(Effect):
    """A replication failure: logged, counted, shown in the status
    (``Manager.report_failed``)."""
    text: str


@dataclass(slots=True)
class Resolve(Effect):
    """Answer the callers of a batch: ``pieces`` are their (sink, offset,
    count); each gets its slice of ``codes``, or ``error``."""
    pieces: list
    codes: list[int] | None
    error: BaseException | None = None


@dataclass(slots=True)
class FailPending(Effect):
    """Fail every submission still queued (this node stopped leading)."""
    error: BaseException


@dataclass(slots=True)
class SendAck(Effect):
    """An acknowledgement to the upstream (an encoded ack message)."""
    payload: bytes


@dataclass(slots=True)
class SendHeadAck(Effect):
    """A chain member's message to the head of its chain (a MEMBER_ACK or
    MEMBER_DROP): through the upstream's ack path when the upstream is the
    head, else straight to the head's ack endpoint."""
    payload: bytes


@dataclass(slots=True)
class ConnectUpstream(Effect):
    """Acknowledgements go to this upstream from now on ("" : none)."""
    address: str


@dataclass(slots=True)
class ConnectHead(Effect):
    """Member acknowledgements go to this chain head from now on ("": none)."""
    address: str


@dataclass(slots=True)
class OpenLink(Effect):
    """Open the data path to the follower at ``address``."""
    address: str


@dataclass(slots=True)
class CloseLink(Effect):
    """Close the data and control paths to the follower and end any state
    sync being sent (its child or copy).  Always from ``NodeCore.tick``:
    on the engine's thread, before a new handshake can start."""


@dataclass(slots=True)
class CallFollower(Effect):
    """A control call to the follower; its reply or failure comes back as
    ``NodeCore.on_follower_reply(token, ...)``."""
    address: str
    op: str
    args: dict
    token: int


@dataclass(slots=True)
class StartSnapshot(Effect):
    """Capture the App's state now (between two applies) at WAL id
    ``wal_id`` and stream it to the follower as STATE messages of
    ``stream``, zrepl's ``section`` first."""
    wal_id: int
    stream: int
    leader_id: int
    section: dict


@dataclass(slots=True)
class ClearState(Effect):
    """Empty the App, the session table's copy and the WAL (the position is
    0 now)."""


@dataclass(slots=True)
class ClearWAL(Effect):
    """Drop the WAL: a state sync made it obsolete (the state is at the
    snapshot's WAL id)."""


@dataclass(slots=True)
class BeginStateIn(Effect):
    """A state sync arrives: keep a checkpoint of it (where checkpoints are
    kept) at ``wal_id``."""
    wal_id: int
    leader_id: int


@dataclass(slots=True)
class EndStateIn(Effect):
    """The incoming state sync is complete (``ok``) or abandoned."""
    wal_id: int
    ok: bool


@dataclass(slots=True)
class ReadsReady(Effect):
    """Leader reads that wait should be looked at again: the writes before
    them are acknowledged, or this node stopped leading."""


@dataclass(slots=True)
class Wake(Effect):
    """The engine's loop should look at its timers and links now."""
