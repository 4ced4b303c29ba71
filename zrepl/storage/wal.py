"""The write-ahead log on disk: segment files of checksummed batch records.

Theory of operation
-------------------

The log is a directory of *segment* files named after the first WAL id they
hold (``00000000000000000001.wal``), each starting with a 16-byte header
(magic ``ZREPLWAL``, format version).  A segment is a sequence of
*records*; one record is one ``write_wal`` batch::

    u32 length | u64 first_id | u32 count | u64 time_ns | u32 crc32 | payload

``payload`` is a msgpack array of ``count`` binary strings (the entries'
data, ids ``first_id .. first_id+count-1``); ``crc32`` covers the 24 header
bytes before it and the payload.  A batch is therefore written with one
``pwritev`` and found after a crash either whole or not at all: one msgpack
call and one checksum per batch, never per entry, which is what lets the
commit path stay near the cost of the raw ``write``.

Invariants
~~~~~~~~~~
* Ids are contiguous across records and segments; a segment's name is the
  ``first_id`` of its first record.
* Record times never decrease (each is ``max(now, previous)``), so "written
  before t" is always a prefix of the log, and a segment's newest time is its
  last record's.
* Only the last segment is ever appended to; older ones are *sealed*.
* On open, the first record that is torn (short), fails its checksum, or
  breaks contiguity ends the log: the segment is cut there and every later
  segment removed, with a warning.  Nothing past it is ever returned.
* Truncation drops whole sealed segments, oldest first, never the last one,
  so the newest entry survives and ``max_id`` only moves back on ``clear``.
  ``clear`` also deletes oldest first: a crash in the middle leaves a
  suffix of the log, which is a valid (truncated) log.

The in-memory index is two ``array('Q')`` per segment (each record's first
id and file offset): ``read`` finds a record by bisection and reads the
records it needs with one ``pread``.

Durability follows the fsync policy (``Config.fsync``): ``always`` fsyncs
before ``append`` returns; ``batch`` leaves it to a flusher thread that
fsyncs at most ``fsync_interval`` after the first unsynced write (or at once,
in the writer, past ``fsync_bytes``); ``off`` never fsyncs the segments.
Segment creation and removal fsync the directory under ``always`` and
``batch``.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import msgpack

from ..core.config import Config
from ..core.errors import CorruptStorage, StorageError, WALTruncated
from .fsutil import create, fsync_dir, make_dir, numbered_files

log = logging.getLogger("zrepl.wal")

SEGMENT_MAGIC = b"ZREPLWAL"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sII")  # magic, version, reserved
RECORD_HEAD = struct.Struct("<IQIQ")  # length, first_id, count, time_ns
RECORD_CRC = struct.Struct("<I")
HEAD_SIZE = RECORD_HEAD.size + RECORD_CRC.size  # 28
SEGMENT_NAME = re.compile(r"^(\d{20})\.wal$")
_SEGMENT_HEADER_BYTES = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0)
_MAX_OPEN_READERS = 16

_packb = msgpack.Packer(use_bin_type=True).pack
_crc32 = zlib.crc32


def segment_name(first_id: int) -> str:
    return f"{first_id:020d}.wal"


def record_head(payload: bytes, first_id: int, count: int, time_ns: int) -> bytes:
    """The 28-byte header of a record whose payload is ``payload``."""
    head = RECORD_HEAD.pack(len(payload), first_id, count, time_ns)
    return head + RECORD_CRC.pack(_crc32(payload, _crc32(head)))


def encode_record(first_id: int, datas: list[bytes], time_ns: int) -> tuple[bytes, bytes]:
    """Return (header, payload) of one record."""
    payload = _packb(datas)
    return record_head(payload, first_id, len(datas), time_ns), payload


@dataclass
class Record:
    offset: int
    first_id: int
    count: int
    time_ns: int
    payload: memoryview | bytes

    def datas(self) -> list[bytes]:
        items = msgpack.unpackb(self.payload, use_list=True, raw=False)
        if type(items) is not list or len(items) != self.count:
            raise CorruptStorage(
                f"WAL record at offset {self.offset} (ids from {self.first_id}) does not "
                f"hold {self.count} entries"
            )
        return items


def parse_records(buf: memoryview | bytes, base_offset: int, expect_first: int | None
                  ) -> tuple[list[Record], int, str | None]:
    """Parse consecutive records from ``buf`` (which starts at file offset
    ``base_offset``).  Returns (records, bytes consumed, problem): parsing
    stops at the first torn, corrupt or out-of-sequence record and ``problem``
    says why (None when the buffer ended cleanly on a record boundary)."""
    records: list[Record] = []
    pos = 0
    end = len(buf)
    unpack_head = RECORD_HEAD.unpack_from
    unpack_crc = RECORD_CRC.unpack_from
    while pos < end:
        if end - pos < HEAD_SIZE:
            return records, pos, f"torn record header at offset {base_offset + pos}"
        length, first_id, count, time_ns = unpack_head(buf, pos)
        (crc,) = unpack_crc(buf, pos + RECORD_HEAD.size)
        body = pos + HEAD_SIZE
        if length > end - body:
            return records, pos, (f"torn record at offset {base_offset + pos} "
                                  f"({length} payload bytes announced, {end - body} present)")
        payload = buf[body:body + length]
        if _crc32(payload, _crc32(buf[pos:pos + RECORD_HEAD.size])) != crc:
            return records, pos, f"checksum mismatch in record at offset {base_offset + pos}"
        if count == 0:
            return records, pos, f"empty record at offset {base_offset + pos}"
        if expect_first is not None and first_id != expect_first:
            return records, pos, (f"record at offset {base_offset + pos} starts at id "
                                  f"{first_id}, expected {expect_first}")
        records.append(Record(base_offset + pos, first_id, count, time_ns, payload))
        expect_first = first_id + count
        pos = body + length
    return records, pos, None


@dataclass
class SegmentScan:
    records: list[Record]
    valid_size: int  # bytes of header + valid records
    problem: str | None


def scan_segment(path: Path, expect_first: int) -> SegmentScan:
    """Read-only check of one segment file.  Never modifies it."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < SEGMENT_HEADER.size:
            return SegmentScan([], 0, f"{path.name}: torn segment header ({size} bytes)")
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
            magic, version, _ = SEGMENT_HEADER.unpack_from(mm, 0)
            if magic != SEGMENT_MAGIC:
                return SegmentScan([], 0, f"{path.name}: not a zrepl WAL segment (bad magic)")
            if version != SEGMENT_VERSION:
                return SegmentScan([], 0, f"{path.name}: unsupported segment version {version}")
            view = memoryview(mm)
            try:
                records, used, problem = parse_records(view[SEGMENT_HEADER.size:],
                                                       SEGMENT_HEADER.size, expect_first)
                # Detach payloads from the mapping before it closes.
                for r in records:
                    r.payload = b""
            finally:
                view.release()
    if problem:
        problem = f"{path.name}: {problem}"
    return SegmentScan(records, SEGMENT_HEADER.size + used, problem)


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    return numbered_files(directory, SEGMENT_NAME)


def iter_wal(directory: Path) -> Iterator[tuple[str, int, int, int, list[bytes] | str]]:
    """Offline, read-only walk of a WAL directory for ``zrepl wal dump``.

    Yields ("record", first_id, count, time_ns, datas) for each valid record
    and ("problem", 0, 0, 0, message) where the log would be cut on open."""
    expect = None
    for first, path in list_segments(directory):
        if expect is not None and first != expect:
            yield ("problem", 0, 0, 0, f"{path.name}: gap, expected a segment starting at {expect}")
            return
        data = path.read_bytes()
        if len(data) < SEGMENT_HEADER.size or data[:8] != SEGMENT_MAGIC:
            yield ("problem", 0, 0, 0, f"{path.name}: bad or torn segment header")
            return
        records, _, problem = parse_records(memoryview(data)[SEGMENT_HEADER.size:],
                                            SEGMENT_HEADER.size, first)
        for r in records:
            yield ("record", r.first_id, r.count, r.time_ns, r.datas())
        if problem:
            yield ("problem", 0, 0, 0, f"{path.name}: {problem}")
            return
        if records:
            expect = records[-1].first_id + records[-1].count


@dataclass
class Segment:
    path: Path
    first_id: int
    last_id: int = 0
    size: int = 0
    max_time_ns: int = 0
    rec_ids: array = field(default_factory=lambda: array("Q"))
    rec_offs: array = field(default_factory=lambda: array("Q"))


class SegmentedWAL:
    """The log of one data directory.  All methods expect ``self.lock``
    (shared with the owning storage) to be held by the caller, except
    ``close``, ``sync`` and the flusher, which take it themselves."""

    def __init__(self, directory: Path, config: Config, lock: threading.RLock,
                 clock: Callable[[], int] = time.time_ns, label: str = ""):
        self.dir = directory
        self.config = config
        self.lock = lock
        self._clock = clock
        self._label = label or str(directory)
        self.segments: list[Segment] = []
        self._firsts: list[int] = []  # segments' first ids, for bisection
        self._wfd = -1  # append fd of the last segment
        self._readers: OrderedDict[int, int] = OrderedDict()  # first_id -> fd
        self._last_time = 0
        self._broken: str | None = None
        self._unsynced = 0
        self._dirty_since: float | None = None
        self._closed = False
        self._cond = threading.Condition(lock)
        self._flusher: threading.Thread | None = None
        self._policy = config.fsync
        make_dir(self.dir)
        self._recover()
        if config.fsync == "batch":
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name=f"zrepl-wal-flush {self._label}")
            self._flusher.start()

    # --- open / recovery ----------------------------------------------------
    def _recover(self) -> None:
        expect: int | None = None
        found = list_segments(self.dir)
        for i, (first, path) in enumerate(found):
            if expect is not None and first != expect:
                self._cut(found[i:], None, f"{path.name}: gap, previous segment ends at {expect - 1}")
                break
            scan = scan_segment(path, first)
            if scan.records:
                seg = Segment(path, first)
                for r in scan.records:
                    seg.rec_ids.append(r.first_id)
                    seg.rec_offs.append(r.offset)
                    seg.max_time_ns = max(seg.max_time_ns, r.time_ns)
                last = scan.records[-1]
                seg.last_id = last.first_id + last.count - 1
                seg.size = scan.valid_size
                self._add_segment(seg)
                expect = seg.last_id + 1
            if scan.problem or not scan.records:
                problem = scan.problem or f"{path.name}: segment holds no record"
                self._cut(found[i + 1:], (path, scan.valid_size if scan.records else 0), problem)
                break
        if self.segments:
            self._last_time = self.segments[-1].max_time_ns
            self._open_for_append(self.segments[-1])

    def _cut(self, later: list[tuple[int, Path]], partial: tuple[Path, int] | None,
             problem: str) -> None:
        """End the log at a bad spot: shorten ``partial`` (or remove it when
        nothing valid is left) and remove every later segment."""
        log.warning("%s: WAL ends at a bad record and is cut there: %s", self._label, problem)
        if partial is not None:
            path, keep = partial
            if keep > 0:
                with open(path, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
            else:
                path.unlink()
        for _, path in later:
            log.warning("%s: removing WAL segment %s past the cut", self._label, path.name)
            path.unlink()
        fsync_dir(self.dir)

    def _add_segment(self, seg: Segment) -> None:
        self.segments.append(seg)
        self._firsts.append(seg.first_id)

    def _open_for_append(self, seg: Segment) -> None:
        # Positional writes (pwritev at seg.size), not O_APPEND: in a
        # multithreaded CPython process a write through the file position
        # was measured ~8 µs slower than pwritev once any other Python
        # thread had woken up (see docs/performance.md).
        self._wfd = os.open(seg.path, os.O_WRONLY)

    # --- properties -----------------------------------------------------------
    @property
    def min_id(self) -> int:
        return self.segments[0].first_id if self.segments else 0

    @property
    def max_id(self) -> int:
        return self.segments[-1].last_id if self.segments else 0

    # --- append -----------------------------------------------------------------
    def append(self, first_id: int, datas: list[bytes], payload: bytes | None = None) -> None:
        """Append one validated batch (ids contiguous with ``max_id``).
        ``payload``: ``datas`` msgpack-packed already (the engine has it
        from the wire or packed it once for both the wire and the log)."""
        if self._broken:
            raise StorageError(f"WAL is unusable after an earlier failure: {self._broken}")
        if self._closed:
            raise StorageError("storage is closed")
        now = self._clock()
        if now < self._last_time:
            now = self._last_time
        if payload is None:
            payload = _packb(datas)
        count = len(datas)
        size = len(payload)
        if size > self.config.max_batch_bytes:
            raise StorageError(f"batch of {size} bytes exceeds max_batch_bytes "
                               f"({self.config.max_batch_bytes})")
        head = record_head(payload, first_id, count, now)
        segments = self.segments
        seg = segments[-1] if segments else None
        if seg is None or seg.size >= self.config.segment_bytes:
            self._append_new_segment(first_id, count, now, head, payload)
            return
        offset = seg.size
        total = HEAD_SIZE + size
        try:
            written = os.pwritev(self._wfd, (head, payload), offset)
            if written != total:
                raise OSError(f"short write ({written} of {total} bytes)")
        except OSError as exc:
            self._undo_append(seg, False, exc)
            raise StorageError(f"cannot write WAL segment {seg.path}: {exc}") from exc
        seg.rec_ids.append(first_id)
        seg.rec_offs.append(offset)
        seg.size = offset + total
        seg.last_id = first_id + count - 1
        seg.max_time_ns = self._last_time = now
        policy = self._policy
        if policy == "batch":
            if self._dirty_since is not None and \
                    self._unsynced + total < self.config.fsync_bytes:
                self._unsynced += total  # the flusher knows already
            else:
                self._after_write_checked(total, False)
        elif policy == "always":
            self._after_write_checked(total, False)

    def _append_new_segment(self, first_id: int, count: int, now: int, head: bytes,
                            payload: bytes) -> None:
        seg = self._start_segment(first_id)
        total = SEGMENT_HEADER.size + len(head) + len(payload)
        try:
            written = os.pwritev(self._wfd, (_SEGMENT_HEADER_BYTES, head, payload), 0)
            if written != total:
                raise OSError(f"short write ({written} of {total} bytes)")
        except OSError as exc:
            self._undo_append(seg, True, exc)
            raise StorageError(f"cannot write WAL segment {seg.path}: {exc}") from exc
        self._add_segment(seg)
        seg.rec_ids.append(first_id)
        seg.rec_offs.append(SEGMENT_HEADER.size)
        seg.size = total
        seg.last_id = first_id + count - 1
        seg.max_time_ns = self._last_time = now
        self._after_write_checked(total, True)

    def _after_write_checked(self, nbytes: int, new_seg: bool) -> None:
        try:
            self._after_write(nbytes, new_seg)
        except OSError as exc:
            # The batch is in the file, its durability unknown; after a failed
            # fsync a later one may "succeed" without the lost pages (Linux
            # drops them): no more writes until the node restarts and reads
            # back what the disk holds.
            self._broken = f"fsync failed: {exc}"
            raise StorageError(f"WAL fsync failed: {exc} (the batch is written, not known to "
                               "be durable; this WAL takes no more writes until the node "
                               "restarts)") from exc

    def _start_segment(self, first_id: int) -> Segment:
        if self._wfd >= 0:
            if self.config.fsync != "off":
                os.fsync(self._wfd)  # seal the old segment durably
            os.close(self._wfd)
            self._wfd = -1
        path = self.dir / segment_name(first_id)
        try:
            self._wfd = create(path, os.O_WRONLY | os.O_EXCL)
        except FileExistsError:
            raise StorageError(f"WAL segment {path} already exists; the directory was "
                               "changed behind this storage") from None
        return Segment(path, first_id)

    def _undo_append(self, seg: Segment, new_seg: bool, exc: OSError) -> None:
        try:
            if new_seg:
                os.close(self._wfd)
                self._wfd = -1
                seg.path.unlink(missing_ok=True)
                if self.segments:
                    self._open_for_append(self.segments[-1])
            else:
                os.ftruncate(self._wfd, seg.size)
        except OSError as undo_exc:
            self._broken = f"{exc}; undoing the partial write failed too: {undo_exc}"

    def _after_write(self, nbytes: int, new_seg: bool) -> None:
        policy = self.config.fsync
        if policy == "always":
            os.fsync(self._wfd)
            if new_seg:
                fsync_dir(self.dir)
        elif policy == "batch":
            if new_seg:
                fsync_dir(self.dir)
            self._unsynced += nbytes
            if self._unsynced >= self.config.fsync_bytes:
                os.fsync(self._wfd)
                self._unsynced = 0
                self._dirty_since = None
            elif self._dirty_since is None:
                self._dirty_since = time.monotonic()
                self._cond.notify()

    # --- read -------------------------------------------------------------------
    def read(self, start: int, max_count: int) -> list[bytes]:
        """Data of entries ``start ..`` (at most ``max_count``)."""
        if self._closed:
            raise StorageError("storage is closed")
        if not self.segments or start > self.max_id:
            return []
        if start < self.min_id:
            raise WALTruncated(f"WAL entry {start} is no longer held (oldest is {self.min_id})",
                               start, self.min_id)
        if max_count == 0:
            return []
        end = min(start + max_count - 1, self.max_id)
        out: list[bytes] = []
        si = bisect_right(self._firsts, start) - 1
        pos = start
        while pos <= end:
            seg = self.segments[si]
            stop = min(end, seg.last_id)
            ri = bisect_right(seg.rec_ids, pos) - 1
            rj = bisect_right(seg.rec_ids, stop) - 1
            off0 = seg.rec_offs[ri]
            off1 = seg.rec_offs[rj + 1] if rj + 1 < len(seg.rec_offs) else seg.size
            buf = os.pread(self._reader(seg), off1 - off0, off0)
            records, _, problem = parse_records(buf, off0, seg.rec_ids[ri])
            if problem or len(records) != rj - ri + 1:
                raise CorruptStorage(f"{seg.path.name}: {problem or 'record index mismatch'} "
                                     "(the file changed after it was opened)")
            chunk = records[0].datas()
            for r in records[1:]:
                chunk.extend(r.datas())
            # The first record may start before ``pos``, the last may run
            # past ``stop``: keep only what was asked for.
            base = seg.rec_ids[ri]
            if pos != base or len(chunk) != stop - pos + 1:
                chunk = chunk[pos - base:stop - base + 1]
            if out:
                out.extend(chunk)
            else:
                out = chunk
            pos = stop + 1
            si += 1
        return out

    def _reader(self, seg: Segment) -> int:
        fd = self._readers.get(seg.first_id)
        if fd is not None:
            self._readers.move_to_end(seg.first_id)
            return fd
        fd = os.open(seg.path, os.O_RDONLY)
        self._readers[seg.first_id] = fd
        if len(self._readers) > _MAX_OPEN_READERS:
            _, old = self._readers.popitem(last=False)
            os.close(old)
        return fd

    def _forget_reader(self, seg: Segment) -> None:
        fd = self._readers.pop(seg.first_id, None)
        if fd is not None:
            os.close(fd)

    # --- truncate / clear ----------------------------------------------------------
    def _drop_oldest(self, n: int) -> None:
        """Remove the ``n`` oldest segments (never the last one)."""
        n = min(n, len(self.segments) - 1)
        if n <= 0:
            return
        for seg in self.segments[:n]:
            self._forget_reader(seg)
            seg.path.unlink(missing_ok=True)
        del self.segments[:n]
        del self._firsts[:n]
        if self.config.fsync != "off":
            fsync_dir(self.dir)

    def _drop_while(self, wholly_before: Callable[[Segment], bool]) -> None:
        """Drop the oldest segments as long as ``wholly_before`` holds."""
        n = 0
        while n < len(self.segments) and wholly_before(self.segments[n]):
            n += 1
        self._drop_oldest(n)

    def truncate_before_id(self, wal_id: int) -> None:
        self._drop_while(lambda seg: seg.last_id < wal_id)

    def truncate_before_time(self, time_ns: int) -> None:
        self._drop_while(lambda seg: seg.max_time_ns < time_ns)

    def clear(self) -> None:
        if self._closed:
            raise StorageError("storage is closed")
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1
        for seg in self.segments:  # oldest first: a crash leaves a valid suffix
            self._forget_reader(seg)
            seg.path.unlink(missing_ok=True)
        self.segments.clear()
        self._firsts.clear()
        self._unsynced = 0
        self._dirty_since = None
        fsync_dir(self.dir)

    # --- durability ----------------------------------------------------------------
    @property
    def broken(self) -> str:
        """Why this WAL takes no more writes ("" while it does)."""
        return self._broken or ""

    def sync(self) -> None:
        """fsync unsynced WAL data now (any policy)."""
        with self.lock:
            if self._wfd < 0:
                return
            fd = os.dup(self._wfd)
            self._unsynced = 0
            self._dirty_since = None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _flush_loop(self) -> None:
        interval = self.config.fsync_interval
        backoff = 0.0  # after a failed fsync: wait longer each time (up to 1 s), log once
        failures = 0
        while True:
            if backoff:
                with self._cond:
                    if not self._closed:
                        self._cond.wait(backoff)
            with self._cond:
                while not self._closed and self._dirty_since is None:
                    self._cond.wait()
                if self._closed:
                    return
                while not self._closed and self._dirty_since is not None:
                    left = self._dirty_since + interval - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return
                if self._dirty_since is None:
                    continue  # synced by the writer meanwhile
            try:
                self.sync()  # fsync outside the lock: writers keep going
                if failures > 1:
                    log.warning("%s: background fsync failed %d times in a row", self._label,
                                failures)
                backoff, failures = 0.0, 0
            except OSError as exc:  # report, do not die; but take no more writes
                if not failures:
                    log.error("%s: background fsync failed: %s (no more writes until restart)",
                              self._label, exc)
                failures += 1
                backoff = min(1.0, max(interval, backoff * 2))
                self._broken = f"background fsync failed: {exc}"

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._flusher is not None:
            self._flusher.join()
        with self.lock:
            if self._wfd >= 0:
                if self.config.fsync != "off" and not self._broken:
                    os.fsync(self._wfd)
                os.close(self._wfd)
                self._wfd = -1
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()
