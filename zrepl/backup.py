"""Online backup, verification and point-in-time restore of a node.

A backup is a directory::

    DIR/checkpoint.zck   a checkpoint the node wrote for the backup (the
                         snapshot file format, every frame checksummed)
    DIR/wal.zwal         the WAL entries after it, as frames
                         ["wal", first_id, [data, ...]] in the same format
    DIR/manifest.json    written last: the App, the node, the epoch
                         history, the checkpoint's WAL id, the WAL range,
                         each file's size and SHA-256

:func:`backup` asks a running node (its control endpoint, an operator's
key on a secured cluster) for a checkpoint at its current WAL id, copies
it and the WAL entries after it up to what the node held when the copy
began, and checks the copy before writing the manifest: a directory
without a manifest is not a backup.  The node keeps serving throughout
(its checkpoint is written by a child process or a thread).

:func:`restore` builds a data directory from a backup, up to any WAL id
the backup covers (``to_wal``: point in time).  The directory's node has
no role: a new supervisor makes it the first node of a new cluster with a
new epoch, or ``zrepl member add`` joins it to a running cluster, whose
leader catches it up (or rebuilds it, if it holds entries the cluster's
history does not).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from . import __version__
from .core.config import Config
from .core.errors import CorruptStorage, ReplicationError
from .core.types import NodeRole
from .engine.remote import NodeClient
from .storage.file import FileStorage
from .storage.fsutil import atomic_write, fsync_dir
from .storage.snapshot import (FILE_HEADER, FILE_MAGIC, FORMAT, FrameReader, FrameWriter,
                               checkpoint_name, frame, read_checkpoint)

MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint.zck"
WAL = "wal.zwal"
MANIFEST_FORMAT = 1
CHUNK = 4 << 20
WAL_BATCH = 5_000


class BackupError(ReplicationError):
    """A backup could not be taken, verified or restored (the message says why)."""


def _empty_dir(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BackupError(f"{what} {path} exists and is not an empty directory")
    path.mkdir(parents=True, exist_ok=True)


def _say(progress: Callable[[str], None] | None, text: str) -> None:
    if progress is not None:
        progress(text)


def backup(node: str, out: str | os.PathLike, config: Config | None = None,
           progress: Callable[[str], None] | None = None, wait: float = 300.0) -> dict:
    """Back ``node`` up into the new directory ``out``; returns the manifest."""
    out = Path(out)
    _empty_dir(out, "backup directory")
    with NodeClient(node, timeout=30.0, config=config) as c:
        c.call("backup_info")  # (refuses a node that keeps no checkpoint files)
        wanted = c.checkpoint()
        _say(progress, f"checkpoint at WAL id {wanted} requested from {node}")
        deadline = time.monotonic() + wait
        while True:
            info = c.call("backup_info")
            if any(w >= wanted for w, _ in info["checkpoints"]) and \
                    not info["checkpoint_running"]:
                break
            if info["checkpoint_error"] and not info["checkpoint_running"]:
                raise BackupError(f"{node}: {info['checkpoint_error']}")
            if time.monotonic() > deadline:
                raise BackupError(f"{node} wrote no checkpoint at WAL id {wanted} within "
                                  f"{wait:g} s")
            time.sleep(0.05)  # the node writes it in the background
        start, size = max((w, s) for w, s in info["checkpoints"])
        last = max(info["max_wal"], start)
        if info["role"] == NodeRole.LEADER.name:
            # (the WAL tail only to what it confirmed; its checkpoint may hold
            # a window of writes still in flight - outcome unknown to clients)
            last = min(last, max(info["commit_index"], start))
        ckpt_sha = hashlib.sha256()
        with open(out / CHECKPOINT, "wb") as f:
            offset = 0
            while True:
                chunk = c.call("backup_read", wal_id=start, offset=offset, length=CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                ckpt_sha.update(chunk)
                offset += len(chunk)
                _say(progress, f"checkpoint: {offset >> 20} of {size >> 20} MiB")
            f.flush()
            os.fsync(f.fileno())
        n = 0
        # (hashed as received, like the checkpoint: the check below then
        # compares the file with what came, not with itself)
        wal_sha = hashlib.sha256()
        fd = os.open(out / WAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            writer = FrameWriter(fd)
            piece = FILE_HEADER.pack(FILE_MAGIC, FORMAT, 0)
            wal_sha.update(piece)
            writer.write_bytes(piece)
            nxt = start + 1
            while nxt <= last:
                datas = c.call("backup_wal", start=nxt, count=min(WAL_BATCH, last - nxt + 1))
                if not datas:
                    raise BackupError(f"{node} returned no WAL entries from {nxt} (its WAL ends "
                                      f"at {last}?)")
                piece = frame(["wal", nxt, datas])
                wal_sha.update(piece)
                writer.write_bytes(piece)
                nxt += len(datas)
                n += len(datas)
                _say(progress, f"WAL: {n} of {last - start} entries")
            writer.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
    history = [list(x) for x in info["epoch_history"]]
    manifest = {
        "format": MANIFEST_FORMAT, "zrepl": __version__, "app": info["app"], "node": node,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "leader_id": info["leader_id"], "epoch_history": history,
        "checkpoint": {"file": CHECKPOINT, "wal_id": start, "bytes": offset,
                       "sha256": ckpt_sha.hexdigest()},
        "wal": {"file": WAL, "first": start + 1, "last": start + n,
                "bytes": (out / WAL).stat().st_size, "sha256": wal_sha.hexdigest()},
    }
    _check(out, manifest)  # what was written reads back whole
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(out)
    return manifest


def _manifest(path: Path) -> dict:
    try:
        m = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{path}: no {MANIFEST} - not a backup, or one that did not "
                          "finish") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"{path}/{MANIFEST} is unreadable: {exc}") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise BackupError(f"{path}/{MANIFEST}: unsupported format "
                          f"{m.get('format') if isinstance(m, dict) else m!r}")
    try:
        int(m["checkpoint"]["wal_id"]), int(m["wal"]["first"]), int(m["wal"]["last"])
        str(m["app"]), [(int(a), int(b)) for a, b in m["epoch_history"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"{path}/{MANIFEST} lacks or garbles {exc}") from None
    return m


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wal_frames(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    with open(path, "rb") as f:
        head = f.read(FILE_HEADER.size)
        if len(head) < FILE_HEADER.size or FILE_HEADER.unpack(head)[0] != FILE_MAGIC:
            raise CorruptStorage(f"{path.name}: not a zrepl frame file")
        reader = FrameReader()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            reader.feed(chunk)
            for obj in reader.frames():
                if not (isinstance(obj, list) and len(obj) == 3 and obj[0] == "wal"):
                    raise CorruptStorage(f"{path.name}: unexpected frame {str(obj)[:60]}")
                yield int(obj[1]), list(obj[2])
        if reader.pending_bytes:
            raise CorruptStorage(f"{path.name}: torn final frame")


def _check(path: Path, m: dict) -> dict:
    """Every file whole and as the manifest says: sizes, SHA-256, every
    frame's checksum, the checkpoint's WAL id, a contiguous WAL."""
    for part in ("checkpoint", "wal"):
        f = path / m[part]["file"]
        if not f.is_file():
            raise BackupError(f"{path}: {f.name} is missing")
        if f.stat().st_size != m[part]["bytes"]:
            raise BackupError(f"{path}: {f.name} holds {f.stat().st_size} bytes, the manifest "
                              f"says {m[part]['bytes']}")
        if _sha256(f) != m[part]["sha256"]:
            raise BackupError(f"{path}: {f.name} does not match its SHA-256 in the manifest "
                              "(damaged)")
    try:
        snap = read_checkpoint(path / m["checkpoint"]["file"])
        if snap.wal_id != m["checkpoint"]["wal_id"]:
            raise BackupError(f"{path}: the checkpoint is at WAL id {snap.wal_id}, the manifest "
                              f"says {m['checkpoint']['wal_id']}")
        expect = m["wal"]["first"]
        for first, datas in _wal_frames(path / m["wal"]["file"]):
            if first != expect:
                raise BackupError(f"{path}: WAL frames jump from {expect - 1} to {first}")
            expect += len(datas)
    except CorruptStorage as exc:
        raise BackupError(f"{path}: {exc}") from None
    if expect - 1 != m["wal"]["last"]:
        raise BackupError(f"{path}: the WAL ends at {expect - 1}, the manifest says "
                          f"{m['wal']['last']}")
    return {"entries": snap.entries}


def verify(path: str | os.PathLike) -> dict:
    """Check a backup without restoring it; its manifest plus what was
    checked (BackupError with the first problem found)."""
    path = Path(path)
    m = _manifest(path)
    return {**m, **_check(path, m)}


def restore(path: str | os.PathLike, data: str | os.PathLike, to_wal: int | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
    """A data directory ``data`` (new or empty) from the backup at ``path``,
    holding the state at ``to_wal`` (default: all the backup covers)."""
    path, data = Path(path), Path(data)
    m = verify(path)
    start, last = m["checkpoint"]["wal_id"], m["wal"]["last"]
    to_wal = last if to_wal is None else to_wal
    if not start <= to_wal <= last:
        raise BackupError(f"--to-wal {to_wal} is outside what this backup covers: WAL ids "
                          f"{start} (its checkpoint) to {last}")
    _empty_dir(data, "data directory")
    history = [(int(a), int(b)) for a, b in m["epoch_history"] if int(b) <= max(to_wal, 1)]
    st = FileStorage(data, fsync="batch")
    try:
        cdir = data / "checkpoints"
        cdir.mkdir(exist_ok=True)
        target = cdir / checkpoint_name(start)
        with open(path / m["checkpoint"]["file"], "rb") as src, open(target, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        fsync_dir(cdir)
        n = 0
        for first, datas in _wal_frames(path / m["wal"]["file"]):
            if first > to_wal:
                break
            datas = datas[:to_wal - first + 1]
            st.write_wal_data(first, datas)
            n += len(datas)
            _say(progress, f"WAL: {n} of {to_wal - start} entries")
        st.set_epoch_history(history)
        st.set_leader_id(history[-1][0] if history else 0)
        st.set_role(NodeRole.UNKNOWN)
        st.sync()
    finally:
        st.close()
    return {"data": str(data), "app": m["app"], "wal_id": to_wal, "checkpoint": start,
            "replayed": n, "leader_id": history[-1][0] if history else 0}
