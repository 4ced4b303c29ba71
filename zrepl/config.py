"""Every zrepl setting, documented beside its default.

One dataclass, so that a node, the supervisor, the command line and the TOML
config file all share the same names.  Each default says why it is what it
is.  Later features add their settings here, never as loose constants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FSYNC_POLICIES = ("always", "batch", "off")


@dataclass
class Config:
    # --- storage ----------------------------------------------------------

    fsync: str = "batch"
    """When the WAL is forced to disk.

    ``"always"``: every ``write_wal`` batch is fsynced before it returns.  A
    power failure loses nothing that was acknowledged.  Costs one disk flush
    per batch (group commit shares it between concurrent writers).

    ``"batch"`` (default): fsync at most ``fsync_interval`` seconds or
    ``fsync_bytes`` bytes after a write, and on close.  A power failure of
    this machine loses at most that window of *local* writes; a process crash
    loses nothing (the OS still holds the data).  With a synchronous follower
    on another machine every acknowledged write also exists there, which is
    why this is the default: it keeps the commit path off the disk.

    ``"off"``: never fsync the WAL (the OS writes back when it likes).  A
    power failure may lose any amount of recent local writes.  For tests and
    for replicas that can always be rebuilt from their upstream.

    Metadata (role, leader_id, epoch history) is fsynced under every policy:
    losing an epoch could let a deposed leader write again.
    """

    fsync_interval: float = 0.02
    """With ``fsync="batch"``: longest time (seconds) written WAL data stays
    unsynced.  20 ms bounds the power-loss window well below a human-visible
    gap while costing at most 50 flushes per second."""

    fsync_bytes: int = 4 * 1024 * 1024
    """With ``fsync="batch"``: unsynced bytes that force an immediate fsync
    in the writer.  4 MiB bounds the power-loss window under heavy load and
    keeps a single flush short."""

    segment_bytes: int = 64 * 1024 * 1024
    """A WAL segment file is closed and a new one started once it reaches
    this size.  Truncation drops whole segments, so this is also the
    granularity of WAL retention.  64 MiB: few files, cheap truncation."""

    max_batch_bytes: int = 256 * 1024 * 1024
    """Largest encoded WAL batch accepted by ``write_wal``.  Guards the
    length field of the record format and the reader's memory."""

    # --- helpers ----------------------------------------------------------

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(
                f"fsync must be one of {', '.join(FSYNC_POLICIES)}; got {self.fsync!r}"
            )
        positive = {
            "fsync_interval": self.fsync_interval,
            "fsync_bytes": self.fsync_bytes,
            "segment_bytes": self.segment_bytes,
            "max_batch_bytes": self.max_batch_bytes,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        if self.max_batch_bytes >= 2**32:
            raise ValueError("max_batch_bytes must be below 4 GiB (record length field)")

    def replace(self, **changes: Any) -> "Config":
        """A copy with some settings changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)
