"""Snapshots: the framed, versioned stream of a node's state at one WAL id.

The same format serves two purposes: the stream a leader sends to a
follower that needs a full state sync, and the local *checkpoint* file a
node restarts from.  A stream is a sequence of frames::

    u32 length | u32 crc32(payload) | payload (msgpack)

preceded, in a file, by the 16-byte file header (``ZREPLCKP``, version).
Payloads, in order::

    ["header",  {"format": 1, "wal_id": S, "leader_id": L, "created_ns": T}]
    ["section", "zrepl", {"epoch_history": [[leader_id, first_wal_id], ...]}]
    ["section", "app"]
    ["batch",   [data, ...]]        # App commands from iter_state(), encoded
    ...
    ["end",     {"entries": N}]

An App keeping its state in a ``SharedStore`` is written as the store's
own key/value pairs instead (``[key, value, key, value, ...]`` per batch,
N counting pairs), and its zrepl section says ``"store": 1``.

zrepl's own replicated state comes first, the App's after it; a reader
skips sections it does not know, so later versions can add sections (the
table of client sessions, for instance) without breaking older readers.
A stream without its ``end`` frame, or with any frame failing its checksum,
is invalid as a whole.

Producing a snapshot while the node keeps applying (a forked child, or a
copy) is the engine's business: ``zrepl.engine.snapshots``.
"""

from __future__ import annotations

import io
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import msgpack

from ..core.errors import CorruptStorage
from .fsutil import create, fsync_dir, make_dir, numbered_files
from ..core.types import WALEntry

FILE_MAGIC = b"ZREPLCKP"
FORMAT = 1
FILE_HEADER = struct.Struct("<8sII")
FRAME = struct.Struct("<II")
CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{20})\.zck$")
MAX_FRAME = 1 << 30

_packb = msgpack.Packer(use_bin_type=True).pack


def frame(payload_obj: Any) -> bytes:
    payload = _packb(payload_obj)
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


class FrameWriter:
    """Buffered frame output to a file descriptor (blocking writes)."""

    def __init__(self, fd: int, buffer_bytes: int = 1 << 20):
        self.fd = fd
        self._buf: list[bytes] = []
        self._size = 0
        self._limit = buffer_bytes

    def write(self, payload_obj: Any) -> None:
        self.write_bytes(frame(payload_obj))

    def write_bytes(self, data: bytes) -> None:
        """Buffer ``data`` as it is (already framed by the caller)."""
        self._buf.append(data)
        self._size += len(data)
        if self._size >= self._limit:
            self.flush()

    def flush(self) -> None:
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


class _BufferedReader:
    """Bytes fed in pieces; a subclass takes whole frames off the front."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


class FrameReader(_BufferedReader):
    """Incremental frame parser: feed bytes, take whole frames out."""

    def frames(self) -> Iterator[list]:
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= FRAME.size:
                length, crc = FRAME.unpack_from(buf, pos)
                if length > MAX_FRAME:
                    raise CorruptStorage(f"snapshot frame of {length} bytes is too large")
                end = pos + FRAME.size + length
                if end > len(buf):
                    break
                payload = bytes(buf[pos + FRAME.size:end])
                if zlib.crc32(payload) != crc:
                    raise CorruptStorage("snapshot frame fails its checksum")
                obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
                if type(obj) is not list or not obj or not isinstance(obj[0], str):
                    raise CorruptStorage("snapshot frame is not [kind, ...]")
                pos = end
                yield obj
        finally:
            del buf[:pos]


def datas_per_entry(zrepl_section: dict) -> int:
    """Items per state entry: 2 for a shared store's key/value pairs (its
    zrepl section says ``"store": 1``), 1 for App commands."""
    return 2 if zrepl_section.get("store") else 1


def write_snapshot(out: Any, app: Any, wal_id: int, leader_id: int,
                   zrepl_section: dict | Callable[[], dict], batch_entries: int,
                   datas: Iterable[bytes] | None = None, per_entry: int = 1) -> int:
    """Write a whole snapshot of ``app`` (in this process).  Returns the
    number of App commands written.  ``zrepl_section`` may be a function:
    in a forked child it then reads zrepl's own state (the client sessions)
    from the frozen copy, instead of the parent building it.  ``datas``:
    the entries themselves instead of ``app``'s (a shared store's pairs:
    ``per_entry`` 2, so that counts and batches are in pairs)."""
    out.write(["header", {"format": FORMAT, "wal_id": wal_id, "leader_id": leader_id,
                          "created_ns": time.time_ns()}])
    out.write(["section", "zrepl", zrepl_section() if callable(zrepl_section)
               else zrepl_section])
    out.write(["section", "app"])
    batch: list[bytes] = []
    count = 0
    if datas is None:
        encode = app.encode_cmd
        datas = (encode(cmd, WALEntry(0)).data for cmd in app.iter_state())
    for data in datas:
        batch.append(data)
        if len(batch) >= batch_entries * per_entry:
            out.write(["batch", batch])
            count += len(batch) // per_entry
            batch = []
    if batch:
        out.write(["batch", batch])
        count += len(batch) // per_entry
    out.write(["end", {"entries": count}])
    out.flush()
    return count


# --- checkpoint files --------------------------------------------------------------------


def checkpoint_name(wal_id: int) -> str:
    return f"ckpt-{wal_id:020d}.zck"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(wal_id, path) of the complete-looking checkpoint files, oldest first."""
    return numbered_files(directory, CHECKPOINT_NAME)


class CheckpointFileWriter:
    """Writes a checkpoint file atomically: a temp file, renamed into place
    by :meth:`commit` after an fsync, then the directory is fsynced."""

    def __init__(self, directory: Path, wal_id: int):
        self.dir = directory
        make_dir(self.dir)
        self.wal_id = wal_id
        self.final = directory / checkpoint_name(wal_id)
        self.tmp = directory / f".{checkpoint_name(wal_id)}.tmp.{os.getpid()}"
        self.fd = create(self.tmp, os.O_WRONLY | os.O_TRUNC)
        os.write(self.fd, FILE_HEADER.pack(FILE_MAGIC, FORMAT, 0))
        self.frames = FrameWriter(self.fd)

    def write_raw_frame(self, payload_obj: Any) -> None:
        self.frames.write(payload_obj)

    def commit(self) -> Path:
        self.frames.flush()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.final)
        fsync_dir(self.dir)
        return self.final

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


def write_checkpoint(directory: "Path | MemoryCheckpoints", app: Any, wal_id: int,
                     leader_id: int, zrepl_section: dict | Callable[[], dict],
                     batch_entries: int, datas: Iterable[bytes] | None = None,
                     per_entry: int = 1) -> Any:
    """Write a whole checkpoint of ``app`` in this process (a forked child
    for files, the engine itself for memory) and commit it."""
    w = directory.writer(wal_id) if isinstance(directory, MemoryCheckpoints) else \
        CheckpointFileWriter(directory, wal_id)
    try:
        write_snapshot(w.frames, app, wal_id, leader_id, zrepl_section, batch_entries, datas,
                       per_entry)
        return w.commit()
    except BaseException:
        w.abort()
        raise


# --- where checkpoints live: files, or memory (the simulation's twin) ----------------


class FileCheckpoints:
    """``DIR/checkpoints/ckpt-S.zck`` files."""

    def __init__(self, directory: Path):
        self.directory = directory

    def list(self) -> list[tuple[int, Any]]:
        """(wal_id, checkpoint) of the complete-looking checkpoints, oldest first."""
        return list_checkpoints(self.directory)

    def writer(self, wal_id: int) -> "CheckpointFileWriter":
        return CheckpointFileWriter(self.directory, wal_id)

    def remove(self, checkpoint: Any) -> None:
        checkpoint.unlink(missing_ok=True)

    def leftovers(self) -> list[tuple[Path, int]]:
        """Temporary files of writers and the pid that wrote each."""
        out = []
        for p in self.directory.glob(".ckpt-*.tmp.*"):
            pid = p.name.rsplit(".", 1)[-1]
            if pid.isdigit():
                out.append((p, int(pid)))
        return out


class MemoryCheckpoint:
    """A checkpoint held in memory, read like a file."""

    def __init__(self, wal_id: int, data: bytes):
        self.name = checkpoint_name(wal_id)
        self.data = data

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)


class _MemoryFrames:
    """FrameWriter's interface, into a list."""

    def __init__(self) -> None:
        self.parts: list[bytes] = [FILE_HEADER.pack(FILE_MAGIC, FORMAT, 0)]

    def write(self, payload_obj: Any) -> None:
        self.parts.append(frame(payload_obj))

    def write_bytes(self, data: bytes) -> None:
        self.parts.append(data)

    def flush(self) -> None:
        pass


class MemoryCheckpointWriter:
    def __init__(self, store: "MemoryCheckpoints", wal_id: int):
        self.store = store
        self.wal_id = wal_id
        self.frames = _MemoryFrames()

    def write_raw_frame(self, payload_obj: Any) -> None:
        self.frames.write(payload_obj)

    def commit(self) -> MemoryCheckpoint:
        cp = MemoryCheckpoint(self.wal_id, b"".join(self.frames.parts))
        self.store.files[self.wal_id] = cp
        return cp

    def abort(self) -> None:
        self.frames.parts.clear()


class MemoryCheckpoints:
    """Checkpoints in memory, for a MemoryStorage that outlives its node
    (the simulation crashes and restarts nodes over the same storage)."""

    def __init__(self) -> None:
        self.files: dict[int, MemoryCheckpoint] = {}

    def list(self) -> list[tuple[int, Any]]:
        return sorted(self.files.items())

    def writer(self, wal_id: int) -> MemoryCheckpointWriter:
        return MemoryCheckpointWriter(self, wal_id)

    def remove(self, checkpoint: Any) -> None:
        self.files = {k: v for k, v in self.files.items() if v is not checkpoint}

    def leftovers(self) -> list:
        return []


@dataclass
class Snapshot:
    """What a verified checkpoint file holds (its App batches are read
    again, streamed, by :func:`iter_app_batches`)."""

    path: Path
    wal_id: int
    leader_id: int
    zrepl: dict
    entries: int


def _iter_file_frames(path: Any) -> Iterator[list]:
    """Frames of a checkpoint: a file's path, or a MemoryCheckpoint."""
    with (open(path, "rb") if isinstance(path, Path) else path.open()) as f:
        head = f.read(FILE_HEADER.size)
        if len(head) < FILE_HEADER.size:
            raise CorruptStorage(f"{path.name}: shorter than its header")
        magic, version, _ = FILE_HEADER.unpack(head)
        if magic != FILE_MAGIC:
            raise CorruptStorage(f"{path.name}: not a zrepl checkpoint")
        if version != FORMAT:
            raise CorruptStorage(f"{path.name}: unsupported checkpoint format {version}")
        reader = FrameReader()
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            reader.feed(chunk)
            yield from reader.frames()
        if reader.pending_bytes:
            raise CorruptStorage(f"{path.name}: torn final frame")


def read_checkpoint(path: Path) -> Snapshot:
    """Verify a checkpoint file whole (every checksum, section order, the
    end frame and its count) without keeping its batches in memory."""
    snap: Snapshot | None = None
    section = ""
    ended = False
    count = 0
    try:
        for obj in _iter_file_frames(path):
            kind = obj[0]
            if ended:
                raise CorruptStorage(f"{path.name}: frames after the end frame")
            if kind == "header":
                hdr = obj[1] if len(obj) > 1 else None
                if snap is not None or not isinstance(hdr, dict) or hdr.get("format") != FORMAT:
                    raise CorruptStorage(f"{path.name}: bad header frame")
                snap = Snapshot(path, int(hdr["wal_id"]), int(hdr.get("leader_id", 0)), {}, 0)
            elif snap is None:
                raise CorruptStorage(f"{path.name}: first frame is not the header")
            elif kind == "section":
                section = obj[1]
                if section == "zrepl" and isinstance(obj[2], dict):
                    snap.zrepl = obj[2]
            elif kind == "batch":
                if section == "app":
                    count += len(obj[1]) // datas_per_entry(snap.zrepl)
            elif kind == "end":
                if obj[1].get("entries") != count:
                    raise CorruptStorage(f"{path.name}: end frame counts "
                                         f"{obj[1].get('entries')} entries, the file holds {count}")
                snap.entries = count
                ended = True
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise CorruptStorage(f"{path.name}: malformed frame ({exc})") from None
    if snap is None or not ended:
        raise CorruptStorage(f"{path.name}: incomplete (no end frame)")
    return snap


def iter_app_batches(path: Path) -> Iterator[list[bytes]]:
    """The App section's batches of a checkpoint verified by
    :func:`read_checkpoint` (checksums are checked again as it goes)."""
    section = ""
    for obj in _iter_file_frames(path):
        if obj[0] == "section":
            section = obj[1]
        elif obj[0] == "batch" and section == "app":
            yield obj[1]
