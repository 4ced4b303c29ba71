"""Batches in flight: the core's bookkeeping of what went downstream.

A *batch* is a run of consecutive WAL entries sent to the follower in one
message.  It has two halves that finish in either order:

* the *local* half - this node writes and applies the batch after sending
  it, so that its own work overlaps the follower's (``set_local``);
* the *remote* half - the follower's response codes, or the error that
  ended the link (``set_remote``).

Whichever finishes second finalizes the batch: the core then decides what
its callers hear (:meth:`zrepl.core.node.NodeCore`).  ``pieces`` are the
callers' sinks with their offsets; the core carries them and never looks
inside.  A batch that came from this node's upstream (a forwarder's) has
``upstream`` set instead: ``(stream, last WAL id)`` of the acknowledgement
it owes.

At the head of a chain whose members acknowledge straight to it, a batch
the follower acknowledged may still wait for deeper members: ``waiting``
(announced, not yet heard from), ``members`` (their codes), ``parents``
(who announced each), ``early`` (acks that came before their
announcement) and ``dropped`` (member -> who said its link to it failed).
All None until a chain makes them needed.  On a member, ``announced`` is
the follower its acknowledgement named, when that went up before the
follower's.
"""

from __future__ import annotations

from typing import Any


class Batch:
    __slots__ = ("first", "last", "pieces", "codes", "codes_bytes", "local_done", "remote",
                 "sent", "upstream", "forwarded", "failed", "announced", "queued", "acked_at", "waiting",
                 "members", "parents", "early", "dropped")

    def __init__(self, first: int, last: int, pieces: list | None = None, sent: float = 0.0,
                 local_done: bool = False, upstream: tuple[int, int] | None = None):
        self.first = first
        self.last = last
        self.pieces = pieces or []  # (sink, offset, count): opaque to the core
        self.codes: list[int] | None = None  # this node's codes
        self.codes_bytes: bytes | None = None  # None: nothing to compare (log catch-up)
        self.local_done = local_done
        self.remote: Any = None  # None (pending), the follower's codes (bytes) or an exception
        self.sent = sent  # when it was sent (the clock passed in)
        self.upstream = upstream
        self.forwarded = False  # sent to the follower, whose ack it waits for
        self.failed = False  # its local half failed: it confirms nothing
        self.announced = ""  # (member) the follower its early acknowledgement named
        self.queued = False  # in the link's ``confirming`` queue
        self.acked_at = 0.0  # when the follower acknowledged it
        self.waiting: set[str] | None = None
        self.members: dict[str, bytes] | None = None
        self.parents: dict[str, str] | None = None
        self.early: dict[str, tuple[bytes, str]] | None = None
        self.dropped: dict[str, str] | None = None

    def set_local(self, codes: list[int] | None, codes_bytes: bytes | None) -> bool:
        """The local half is done; True when the remote half is too."""
        self.codes, self.codes_bytes, self.local_done = codes, codes_bytes, True
        return self.remote is not None

    def set_remote(self, outcome: Any) -> bool:
        """The remote half is known; True when the local half is done too.
        Only the first outcome counts."""
        if self.remote is not None:
            return False
        self.remote = outcome
        return self.local_done

    def __repr__(self) -> str:
        return f"Batch({self.first}..{self.last})"
