"""What flows through the commit pipeline: submissions and their sinks.

A *submission* is one call (``apply``, ``apply_async``, ``apply_many``, a
remote client request): some commands and a *sink* that receives their
response codes or an error.  The batch leader packs the commands of many
submissions into one WAL batch; a big submission may span several batches
(its sink then receives its codes in pieces, by offset).  A batch
(``zrepl.core.commit.Batch``) remembers which pieces of which sinks it
carries; the core decides what they hear, :func:`resolve` tells them.

Sinks do no I/O and hold no locks of the engine: resolving one only stores
a result and wakes whoever waits on it.
"""

from __future__ import annotations

import concurrent.futures
import threading
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

    __slots__ = ("codes", "error", "remaining", "resolved", "_lock")

    def __init__(self, n: int):
        self.codes: list[int] = [0] * n
        self.error: BaseException | None = None
        self.remaining = n
        self.resolved = False  # every code arrived, or an error did
        self._lock = threading.Lock()
        self._lock.acquire()

    def done(self, offset: int, codes: list[int]) -> None:
        n = len(codes)
        self.codes[offset:offset + n] = codes
        self.remaining -= n
        if self.remaining <= 0 and not self.resolved:
            self.resolved = True
            self._release()

    def fail(self, exc: BaseException) -> None:
        if not self.resolved:
            self.error = exc
            self.resolved = True
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


class Submission:
    """Commands from one call: ``cmds`` (local: encoded by the leader) or
    ``datas`` (remote: already encoded, decoded by the leader to apply).
    A plain slotted class: one is made per call on the commit path."""

    __slots__ = ("sink", "cmds", "datas", "size", "taken", "deadline", "session")

    def __init__(self, sink: Sink, cmds: list | None = None, datas: list[bytes] | None = None,
                 deadline: float = 0.0, session: tuple[bytes, int] | None = None):
        self.sink = sink
        self.cmds = cmds
        self.datas = datas
        self.session = session  # (client id, sequence) of a remote client's command
        self.size = len(cmds if cmds is not None else datas)  # type: ignore[arg-type]
        self.taken = 0  # commands already packed into batches
        self.deadline = deadline


def resolve(pieces: list, codes: list[int] | None, error: BaseException | None) -> None:
    """Answer a batch's callers: each piece its slice of ``codes``, or
    ``error``."""
    if error is not None:
        for sink, _, _ in pieces:
            sink.fail(error)
        return
    pos = 0
    codes = codes or []
    for sink, offset, count in pieces:
        sink.done(offset, codes[pos:pos + count])
        pos += count


def resolve_effect(e: Any) -> None:
    """The ``Resolve`` effect (one call less on the commit path)."""
    if e.error is not None:
        for sink, _, _ in e.pieces:
            sink.fail(e.error)
        return
    pos = 0
    codes = e.codes or []
    for sink, offset, count in e.pieces:
        sink.done(offset, codes[pos:pos + count])
        pos += count
