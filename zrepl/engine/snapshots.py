"""Capturing the App's state while the node keeps applying.

A full state sync streams the App's state *at one WAL id* while new writes
go on.  Two ways to freeze it, behind one interface (:class:`Source`):

* :class:`ForkedSnapshot` forks the process.  The child shares the
  parent's memory copy-on-write, so it sees the App as it was at the fork
  (a point between two applies: the caller holds the App lock) while the
  parent keeps applying.  The child never touches the parent's sockets or
  locks: it iterates the state, writes ready-to-send messages into a pipe,
  and leaves with ``os._exit``.  The default where ``os.fork`` exists.
* :class:`StreamedSnapshot` reads a ``SharedStore``: one LMDB read
  transaction, its key/value pairs sent as they are (no App encoding on
  either side), a few batches at a time: no fork, no copy.
* :class:`CopiedSnapshot` copies the encoded state in-process at that
  point.  It costs the copy's memory and the time to encode it on the
  engine's thread; the in-memory simulation uses it (a fork there would
  copy the simulator).

Checkpoint files are written by a forked child too (:func:`fork_checkpoint`).
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import struct
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack

from ..core.errors import CorruptStorage
from ..core.types import WALEntry
from ..storage.snapshot import MAX_FRAME, FrameWriter, _BufferedReader, _packb, write_checkpoint, \
    write_snapshot

MakeMessage = Callable[[int, list[bytes]], bytes]
MakeSection = Callable[[int, dict], bytes]


def _child_main(nice: int, fn: Callable, *args: Any) -> None:  # pragma: no cover - child
    code = 0
    try:
        gc.disable()  # no finalizer may close the parent's sockets from here
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if nice:
            try:
                os.nice(nice)
            except OSError:
                pass
        fn(*args)
    except BaseException:
        code = 1
        try:
            os.write(2, ("zrepl snapshot child failed:\n" + traceback.format_exc()).encode())
        except OSError:
            pass
    os._exit(code)


class MessageWriter:
    """Snapshot output for a pipe to the parent: each App batch leaves the
    child as the finished network message (``make_message(seq, datas)``),
    so the parent only forwards bytes and does no per-entry work while
    its own commits go on.  Pipe frames are ``u32 length | kind | payload``
    with kind ``M`` (a message to send) or ``E`` (the end: msgpack
    ``{"entries": N}``).  Header and section frames are not forwarded: the
    parent announces the snapshot itself."""

    def __init__(self, fd: int, make_message: MakeMessage, make_section: MakeSection):
        self._out = FrameWriter(fd)
        self._make = make_message
        self._make_section = make_section
        self.seq = 0

    def write(self, payload_obj: Any) -> None:
        kind = payload_obj[0]
        if kind == "batch":
            self.seq += 1
            self._emit(b"M" + self._make(self.seq, payload_obj[1]))
        elif kind == "section" and payload_obj[1] == "zrepl":
            self.seq += 1  # zrepl's own state, ahead of the App's
            self._emit(b"M" + self._make_section(self.seq, payload_obj[2]))
        elif kind == "end":
            self._emit(b"E" + _packb(payload_obj[1]))

    def _emit(self, body: bytes) -> None:
        self._out.write_bytes(struct.pack("<I", len(body)) + body)

    def flush(self) -> None:
        self._out.flush()


class MessageReader(_BufferedReader):
    """Parent side of :class:`MessageWriter`: feed bytes, take (kind,
    payload) pairs out."""

    def messages(self) -> Iterator[tuple[bytes, bytes]]:
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (length,) = struct.unpack_from("<I", buf, pos)
                if length > MAX_FRAME or length == 0:
                    raise CorruptStorage(f"snapshot pipe frame of {length} bytes")
                end = pos + 4 + length
                if end > len(buf):
                    break
                yield bytes(buf[pos + 4:pos + 5]), bytes(buf[pos + 5:end])
                pos = end
        finally:
            del buf[:pos]


class Source:
    """Ready-to-send STATE messages of one snapshot, numbered from 1."""

    failed = ""  # why the source broke ("" while it did not)
    count: int | None = None  # App entries, once everything was produced
    finished = False  # every message produced (and a child reaped)

    def fileno(self) -> int:
        """A descriptor that becomes readable when :meth:`pump` has more
        (-1: never blocks)."""
        return -1

    def pump(self) -> list[bytes]:
        """Messages produced since the last call, in order (never blocks)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop producing (kill a child); idempotent."""


class ForkedSnapshot(Source):
    def __init__(self, app: Any, wal_id: int, leader_id: int,
                 zrepl_section: dict | Callable[[], dict], batch_entries: int,
                 make_message: MakeMessage, make_section: MakeSection, nice: int = 10):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            _child_main(nice, lambda: write_snapshot(
                MessageWriter(w, make_message, make_section), app, wal_id, leader_id,
                zrepl_section, batch_entries))
        os.close(w)
        os.set_blocking(r, False)
        self.pid, self.fd = pid, r
        self._reader = MessageReader()
        self._eof = False

    def fileno(self) -> int:
        return self.fd if not self._eof else -1

    def pump(self) -> list[bytes]:
        out: list[bytes] = []
        if self.finished or self.failed:
            return out
        if not self._eof:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                self._eof = True
            elif chunk:
                self._reader.feed(chunk)
                try:
                    for kind, payload in self._reader.messages():
                        if kind == b"M":
                            out.append(payload)
                        elif kind == b"E":
                            self.count = _unpack_count(payload)
                except CorruptStorage as exc:
                    self.failed = str(exc)
        if self._eof and self.pid:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                os.close(self.fd)
                self.fd = -1
                if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or \
                        self.count is None or self._reader.pending_bytes:
                    self.failed = (f"snapshot child failed (exit status {status}, end frame "
                                   f"{'seen' if self.count is not None else 'missing'})")
                else:
                    self.finished = True
        return out

    def close(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _unpack_count(payload: bytes) -> int | None:
    try:
        return int(msgpack.unpackb(payload, raw=False).get("entries"))
    except Exception:
        return None


class StreamedSnapshot(Source):
    """Entries from an iterator that took its snapshot when it was made -
    a ``SharedStore``'s ``raw_datas`` (one LMDB read transaction: key,
    value, key, value...) - sent a few messages per pump, in this process:
    no fork and no copy."""

    def __init__(self, datas: Iterator[bytes], wal_id: int, leader_id: int,
                 zrepl_section: dict | Callable[[], dict], batch_entries: int,
                 make_message: MakeMessage, make_section: MakeSection, per_entry: int = 1):
        self._it = datas
        self._per_entry = per_entry  # datas per entry (2: key/value pairs)
        self._section = zrepl_section() if callable(zrepl_section) else zrepl_section
        self._batch = batch_entries
        self._make, self._make_section = make_message, make_section
        self._seq = 0
        self._count = 0
        self._per_pump = 16  # messages per pump: the engine interleaves other work

    def pump(self) -> list[bytes]:
        out: list[bytes] = []
        if self.finished:
            return out
        if self._seq == 0:
            self._seq = 1
            out.append(self._make_section(1, self._section))
        while len(out) < self._per_pump:
            datas = list(itertools.islice(self._it, self._batch * self._per_entry))
            if not datas:
                self.count = self._count
                self.finished = True
                self.close()
                break
            self._count += len(datas) // self._per_entry
            self._seq += 1
            out.append(self._make(self._seq, datas))
        return out

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()  # ends the read transaction


class CopiedSnapshot(StreamedSnapshot):
    """Any App's state, encoded now in this process (it costs the copy's
    memory and the time to encode it on the engine's thread); messages are
    made as they are asked for."""

    def __init__(self, app: Any, *args: Any):
        encode = app.encode_cmd
        super().__init__(iter([encode(cmd, WALEntry(0)).data for cmd in app.iter_state()]),
                         *args)


def fork_checkpoint(directory: Path, app: Any, wal_id: int, leader_id: int,
                    zrepl_section: dict | Callable[[], dict], batch_entries: int,
                    nice: int = 10) -> int:
    """Fork a child that writes a checkpoint file; returns its pid.  Its
    exit status says whether the file was committed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        _child_main(nice, write_checkpoint, directory, app, wal_id, leader_id, zrepl_section,
                    batch_entries)
    return pid
