"""What flows through the commit pipeline: submissions, their sinks, and
batches in flight.

A *submission* is one call (``apply``, ``apply_async``, ``apply_many``, a
remote client request): some commands and a *sink* that receives their
response codes or an error.  The batch leader packs the commands of many
submissions into one WAL batch; a big submission may span several batches
(its sink then receives its codes in pieces, by offset).  A *batch in
flight* remembers which pieces of which sinks it carries, and is resolved
once, when the follower acknowledges it or the link fails.

Sinks do no I/O and hold no locks of the engine: resolving one only stores
a result and wakes whoever waits on it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


class Sink:
    """Receives the outcome of a submission's commands."""

    def done(self, offset: int, codes: list[int]) -> None:
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        raise NotImplementedError


class WaitSink(Sink):
    """For blocking callers (``apply`` / ``apply_many``): codes land in a
    list; a lock released on completion lets the caller block cheaply."""

    __slots__ = ("codes", "error", "remaining", "_lock", "in_flight")

    def __init__(self, n: int):
        self.codes: list[int] = [0] * n
        self.error: BaseException | None = None
        self.remaining = n
        self.in_flight = False  # some of its commands wait for a follower ack
        self._lock = threading.Lock()
        self._lock.acquire()

    @property
    def resolved(self) -> bool:
        return self.remaining <= 0 or self.error is not None

    def done(self, offset: int, codes: list[int]) -> None:
        self.codes[offset:offset + len(codes)] = codes
        self.remaining -= len(codes)
        if self.remaining <= 0 and self.error is None:
            self._release()

    def fail(self, exc: BaseException) -> None:
        if self.error is None and self.remaining > 0:
            self.error = exc
            self._release()

    def _release(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # already released
            pass

    def wait(self, timeout: float) -> bool:
        """Block until resolved or ``timeout``; True if resolved."""
        if self.resolved:
            return True
        if self._lock.acquire(timeout=max(timeout, 0)):
            self._lock.release()
        return self.resolved


class FutureSink(Sink):
    """One command whose outcome goes to a ``concurrent.futures.Future``."""

    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future):
        self.future = future

    def done(self, offset: int, codes: list[int]) -> None:
        if not self.future.done():
            self.future.set_result(codes[0])

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class CallbackSink(Sink):
    """One command whose outcome goes to ``callback(code, error)``
    (remote client requests, forwarded batches)."""

    __slots__ = ("callback", "fired")

    def __init__(self, callback: Callable[[int | None, BaseException | None], None]):
        self.callback = callback
        self.fired = False

    def done(self, offset: int, codes: list[int]) -> None:
        if not self.fired:
            self.fired = True
            self.callback(codes[0], None)

    def fail(self, exc: BaseException) -> None:
        if not self.fired:
            self.fired = True
            self.callback(None, exc)


@dataclass
class Submission:
    """Commands from one call: ``cmds`` (local: encoded by the leader) or
    ``datas`` (remote: already encoded, decoded by the leader to apply)."""

    sink: Sink
    cmds: list | None = None
    datas: list[bytes] | None = None
    taken: int = 0  # commands already packed into batches
    deadline: float = 0.0

    @property
    def size(self) -> int:
        return len(self.cmds if self.cmds is not None else self.datas)  # type: ignore[arg-type]


@dataclass
class Batch:
    """A WAL batch sent downstream and not yet acknowledged."""

    first: int
    last: int
    codes: list[int] | None = None  # the leader's codes (None: catch-up, not compared)
    codes_bytes: bytes | None = None
    pieces: list[tuple[Sink, int, int]] = field(default_factory=list)  # (sink, offset, count)
    sent: float = field(default_factory=time.monotonic)

    def resolve(self) -> None:
        codes = self.codes or []
        pos = 0
        for sink, offset, count in self.pieces:
            sink.done(offset, codes[pos:pos + count])
            pos += count

    def fail(self, exc: BaseException) -> None:
        for sink, _, _ in self.pieces:
            sink.fail(exc)


def resolve_all(batches: list[Batch], exc: BaseException | None,
                on_unacked: Callable[[Batch, BaseException], Any]) -> None:
    for b in batches:
        if exc is None:
            b.resolve()
        else:
            on_unacked(b, exc)
