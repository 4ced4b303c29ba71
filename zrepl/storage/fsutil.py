"""File-system primitives with the durability rules zrepl relies on."""

from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path

from ..core.errors import StorageLocked


def numbered_files(directory: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    """(number, path) of the files in ``directory`` whose name matches
    ``pattern`` (group 1: the number), in number order; [] if the directory
    does not exist."""
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir()
                  if (m := pattern.match(p.name)))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DIR_MODE, FILE_MODE = 0o700, 0o600  # a node's data is its own: whatever the umask


def make_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing; one it creates gets
    DIR_MODE exactly, whatever the umask."""
    if path.is_dir():
        return
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def create(path: str | os.PathLike, flags: int, mode: int = FILE_MODE) -> int:
    """``os.open`` with O_CREAT: a new file gets ``mode`` exactly, whatever
    the umask."""
    fd = os.open(path, flags | os.O_CREAT, mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old
    or the new content, never a mix: write a temp file, fsync it, rename it
    over the target, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = create(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class DirLock:
    """An exclusive ``flock`` on ``DIR/LOCK`` held while a storage is open.

    The kernel drops it when the process dies, so a crash never leaves a
    stale lock.  A second opener (another process, or another object in this
    one) gets ``StorageLocked`` naming the holder's pid.
    """

    def __init__(self, directory: Path):
        self.path = directory / "LOCK"
        self._fd = create(self.path, os.O_RDWR)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageLocked(
                    f"{directory} is already in use (locked by pid {holder}); "
                    "one storage per data directory"
                ) from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
