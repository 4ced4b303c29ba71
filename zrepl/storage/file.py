"""FileStorage: the embedded default Storage, a data directory on disk.

Layout of a data directory::

    DIR/LOCK         flock held while open (pid inside, for the error message)
    DIR/meta.json    metadata, replaced atomically (temp, fsync, rename, fsync dir)
    DIR/wal/*.wal    WAL segments (see zrepl.wal)
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..core.config import Config
from ..core.errors import CorruptStorage, StorageError
from .fsutil import DirLock, atomic_write, make_dir
from .base import (
    EMPTY_META,
    BaseStorage,
    check_data_batch,
    check_epoch_history,
    check_id,
    check_read,
    check_role,
    datetime_to_ns,
)
from .wal import SegmentedWAL

log = logging.getLogger("zrepl.storage")

META_FORMAT = 1


class FileStorage(BaseStorage):
    """Storage in a directory.  One open FileStorage per directory (others,
    in any process, get ``StorageLocked``).

    ``fsync`` overrides ``config.fsync`` (``"always"``, ``"batch"`` or
    ``"off"``; see :class:`zrepl.Config` for what each may lose).  ``clock``
    returns the time in ns stamped on WAL records (tests inject one).
    """

    def __init__(self, path: str | Path, fsync: str | None = None, *,
                 config: Config | None = None, clock: Callable[[], int] = time.time_ns):
        config = config or Config()
        if fsync is not None:
            try:
                config = config.replace(fsync=fsync)
            except ValueError as exc:
                raise StorageError(str(exc)) from None
        self.config = config
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StorageError(f"{self.path} exists and is not a directory")
        try:
            make_dir(self.path)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {self.path}: {exc}") from None
        super().__init__()
        self._dirlock = DirLock(self.path)
        try:
            self._meta_path = self.path / "meta.json"
            self._meta.update(self._load_meta())
            self._saved_max_applied = self._meta["max_applied_wal"]
            self._wal = SegmentedWAL(self.path / "wal", config, self._lock, clock,
                                     label=str(self.path))
        except BaseException:
            self._dirlock.release()
            raise
        self._closed = False

    # --- metadata ------------------------------------------------------------
    def _load_meta(self) -> dict[str, Any]:
        try:
            raw = self._meta_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            if doc.get("format") != META_FORMAT:
                raise ValueError(f"unsupported format {doc.get('format')!r}")
            meta = {k: doc[k] for k in EMPTY_META if k in doc}
            check_id(meta.get("leader_id", 0), "leader_id")
            check_id(meta.get("max_applied_wal", 0), "max_applied_wal")
            check_role(meta.get("role", 0))
            meta["epoch_history"] = [list(x) for x in
                                     check_epoch_history(meta.get("epoch_history", []))]
            for key in ("address", "follower_address"):
                if not isinstance(meta.get(key, ""), str):
                    raise ValueError(f"{key} is not a string")
        except (ValueError, StorageError) as exc:
            # Never fall back to empty metadata: forgetting the stored
            # leader_id would let a deposed leader write again.
            raise CorruptStorage(f"{self._meta_path} is unreadable ({exc}); "
                                 "restore it or remove the data directory") from None
        return meta

    def _save_meta(self) -> None:
        self._check_open()
        self._write_meta()

    def _write_meta(self) -> None:
        doc = {"format": META_FORMAT, **self._meta}
        try:
            atomic_write(self._meta_path, json.dumps(doc, indent=1).encode() + b"\n")
        except OSError as exc:
            raise StorageError(f"cannot write {self._meta_path}: {exc}") from exc
        self._saved_max_applied = self._meta["max_applied_wal"]

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise StorageError(f"storage {self.path} is closed")

    # --- WAL ---------------------------------------------------------------------
    def _append(self, first_id: int, datas: list[bytes], payload: bytes | None = None) -> None:
        self._wal.append(first_id, datas, payload)

    def write_wal_data(self, first_id: int, datas: list[bytes], payload: bytes | None = None
                       ) -> None:
        # (BaseStorage's, with its steps inlined: this is on every node's commit path)
        with self._lock:
            if self._closed:
                raise StorageError(f"storage {self.path} is closed")
            wal = self._wal
            check_data_batch(first_id, datas, wal.max_id)
            if datas:
                wal.append(first_id, datas, payload)

    def _max_wal(self) -> int:
        return self._wal.max_id

    def read_wal_data(self, start_id: int, max_count: int) -> list[bytes]:
        check_read(start_id, max_count)
        with self._lock:
            self._check_open()
            return self._wal.read(start_id, max_count)

    def max_wal(self) -> int:
        with self._lock:
            return self._wal.max_id

    def min_wal(self) -> int:
        with self._lock:
            return self._wal.min_id

    def clear_wal(self) -> None:
        with self._lock:
            self._check_open()
            self._wal.clear()

    def truncate_wal_before_id(self, wal_id: int) -> None:
        check_id(wal_id, "wal_id")
        with self._lock:
            self._check_open()
            self._wal.truncate_before_id(wal_id)

    def truncate_wal_before_time(self, t: datetime) -> None:
        ns = datetime_to_ns(t)
        with self._lock:
            self._check_open()
            self._wal.truncate_before_time(ns)

    @property
    def wal_broken(self) -> str:
        """Why the WAL takes no more writes until a restart ("" while it does)."""
        return self._wal.broken

    def sync(self) -> None:
        """Force unsynced WAL data to disk now, whatever the fsync policy."""
        self._check_open()
        self._wal.sync()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            # Not under self._lock: the WAL's flusher needs it to finish.
            self._wal.close()
            with self._lock:
                if self._meta["max_applied_wal"] != self._saved_max_applied:
                    self._write_meta()
        finally:
            self._dirlock.release()

    def __repr__(self) -> str:
        return f"FileStorage({str(self.path)!r}, fsync={self.config.fsync!r})"
