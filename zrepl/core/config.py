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

    # --- replication ------------------------------------------------------

    ack_timeout: float = 0.5
    """Seconds a leader waits for its follower to acknowledge a batch before
    it declares the link failed.  While a synchronous follower is silent,
    commits stall this long at most; 0.5 s is far above a healthy round
    trip (well under 1 ms) and short enough not to freeze writers."""

    commit_timeout: float = 10.0
    """Longest time ``Manager.apply`` waits for its command to commit
    before raising ``Timeout`` (outcome unknown)."""

    require_sync: bool = False
    """If true, a leader without a synchronous follower does not commit
    locally: ``apply`` waits up to ``sync_wait_timeout`` for one and then
    raises ``Timeout``, and a batch whose follower fails before
    acknowledging it raises ``Timeout``.  Off by default: availability
    first, the write is still durable on the leader."""

    sync_wait_timeout: float = 5.0
    """With ``require_sync``: how long ``apply`` waits for a synchronous
    follower before raising ``Timeout``."""

    sync_downstream: bool = True
    """Whether this node's link to its follower is synchronous: a leader
    answers its callers, and a forwarder acknowledges its upstream, only
    after the follower acknowledged.  False makes the link asynchronous
    (answered after the local apply; the follower still receives every
    batch, in order): for a WAN hop at the end of a chain.  Status
    reports each link's ``follower_sync``."""

    window: int = 8
    """Batches sent downstream and not yet acknowledged, at most.  Enough
    to keep leader and follower busy at the same time; bounds memory."""

    max_batch_entries: int = 1024
    """Commands packed into one WAL batch at most (group commit)."""

    max_batch_data: int = 4 * 1024 * 1024
    """Bytes of command data in one batch, at most (a single larger
    command travels alone)."""

    lease_required: bool = False
    """As leader, accept writes only under a lease granted by the
    supervisor (renewed by its polls).  Leases are enforced anyway once one
    was granted; this makes a restarted leader wait for the first renewal
    too.  Set it on every node run under a supervisor."""

    max_pending: int = 65536
    """Submissions queued on a leader and not yet in a batch, at most.  Past
    it, ``apply_async`` blocks like ``apply`` and the node stops reading
    its client endpoint (ZeroMQ then pushes back on clients): memory stays
    bounded when submitters outrun the follower."""

    session_window: int = 1024
    """Per remote client, how many recent commands' response codes the
    nodes remember (replicated) so that a retry is answered instead of
    applied twice.  At least a client's pipelining window."""

    max_sessions: int = 10_000
    """Remote clients remembered; the least recently active is forgotten
    first (its old retries are then refused, never re-applied)."""

    rpc_timeout: float = 0.5
    """Seconds to wait for a reply to a control call (handshake, status)
    before the socket is reopened and the call fails."""

    connect_backoff_min: float = 0.05
    """First retry delay after a failed handshake with the follower;
    doubles on every failure up to ``connect_backoff_max``."""

    connect_backoff_max: float = 1.0
    """Longest delay between handshake retries."""

    max_message_bytes: int = 64 * 1024 * 1024
    """Largest ZeroMQ message any endpoint accepts; a peer that sends a
    larger one is disconnected.  Larger than any batch zrepl sends."""

    stream_batch_entries: int = 2048
    """WAL entries per batch when a follower catches up from the log."""

    snapshot_batch_entries: int = 4096
    """App commands per batch of a full state sync or checkpoint."""

    max_retained_wal: int = 10_000_000
    """WAL entries kept beyond the newest checkpoint for a follower that
    is syncing or disconnected (like a replication slot).  A follower that
    falls further behind gets a full state sync instead."""

    checkpoint_entries: int = 1_000_000
    """Write a checkpoint after this many entries were applied since the
    last one (0 disables).  Restart time is checkpoint load + replay of at
    most this many entries."""

    checkpoint_interval: float = 300.0
    """Also write a checkpoint this many seconds after the last one, if
    anything was applied since (0 disables)."""

    checkpoints_kept: int = 2
    """Checkpoint files kept; older ones are removed.  Two, so that a
    checkpoint that turns out unreadable still leaves one to fall back on
    (the WAL is only truncated up to the older kept one)."""

    # --- supervisor -------------------------------------------------------

    heartbeat_interval: float = 0.1
    """Seconds between the supervisor's polls of every node (each poll of
    the leader renews its lease).  With the defaults below a dead leader is
    detected in ~0.3 s and replaced within ~1 s."""

    missed_heartbeats: int = 3
    """Consecutive unanswered polls after which a node counts as dead."""

    lease: float = 0.5
    """Seconds a leader may accept writes after a renewal.  Five heartbeats:
    a leader survives a few slow polls; the supervisor waits
    ``lease * lease_margin`` after the last renewal before promoting
    another node, so a cut-off leader has stopped writing by then."""

    lease_margin: float = 1.2
    """Safety factor on ``lease`` for clock-rate differences between the
    supervisor's and the leader's machines."""

    # --- helpers ----------------------------------------------------------

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(
                f"fsync must be one of {', '.join(FSYNC_POLICIES)}; got {self.fsync!r}"
            )
        positive = {name: getattr(self, name) for name in (
            "fsync_interval", "fsync_bytes", "segment_bytes", "max_batch_bytes",
            "ack_timeout", "commit_timeout", "sync_wait_timeout", "window", "max_pending",
            "session_window", "max_sessions",
            "max_batch_entries", "max_batch_data", "rpc_timeout", "connect_backoff_min",
            "connect_backoff_max", "max_message_bytes", "stream_batch_entries",
            "snapshot_batch_entries", "max_retained_wal", "checkpoints_kept",
            "heartbeat_interval", "missed_heartbeats", "lease", "lease_margin")}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        for name in ("checkpoint_entries", "checkpoint_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0 (0 disables); got {value!r}")
        for name in ("require_sync", "sync_downstream", "lease_required"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if self.max_batch_bytes >= 2**32:
            raise ValueError("max_batch_bytes must be below 4 GiB (record length field)")

    def replace(self, **changes: Any) -> "Config":
        """A copy with some settings changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)
