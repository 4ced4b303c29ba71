"""Every zrepl setting, documented beside its default.

One dataclass, so that a node, the supervisor, the command line and the TOML
config file all share the same names.  Each default says why it is what it
is.  Later features add their settings here, never as loose constants.

Settings come in groups (:data:`GROUPS`): ``storage`` and ``replication``
are read by nodes, ``supervisor`` by the supervisor, ``client`` by
``zrepl.Client``, and ``limits`` (message sizes, queues) by every process.
A TOML file may set them flat or under a table named after their group
(``[replication]``, ``[supervisor]``...).  :meth:`Config.validate` checks
each field alone and then the fields against each other (like
hashicorp/raft's ``ValidateConfig``): every refusal is one line naming the
fields involved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FSYNC_POLICIES = ("always", "batch", "off")

# Which process reads which settings (the sections of Config below, and the
# optional tables of a TOML file).
GROUPS: dict[str, tuple[str, ...]] = {
    'storage': (
        'fsync',
        'fsync_interval',
        'fsync_bytes',
        'segment_bytes',
        'max_batch_bytes',
        'checkpoint_entries',
        'checkpoint_interval',
        'checkpoints_kept',
        'max_retained_wal',
    ),
    'replication': (
        'require_sync',
        'sync_wait_timeout',
        'sync_downstream',
        'lease_required',
        'ack_timeout',
        'ack_timeout_hop_step',
        'ack_timeout_floor',
        'commit_timeout',
        'window',
        'max_batch_entries',
        'max_batch_data',
        'max_pending',
        'session_window',
        'max_sessions',
        'session_expiry',
        'leader_read_timeout',
        'rpc_timeout',
        'connect_backoff_min',
        'connect_backoff_max',
        'stream_batch_entries',
        'snapshot_batch_entries',
        'state_sync_stall_timeout',
        'snapshot_child_nice',
        'progress_interval',
    ),
    'shared': (
        'shared_dir',
        'shared_map_bytes',
        'readers',
        'read_wait_timeout',
    ),
    'supervisor': (
        'heartbeat_interval',
        'missed_heartbeats',
        'lease',
        'lease_margin',
        'follower_error_retry',
        'poll_timeout_fraction',
    ),
    'client': (
        'client_max_pause',
    ),
    'security': (
        'key',
        'trust',
        'insecure',
        'max_epoch_jump',
        'handshake_timeout',
        'max_connections',
    ),
    'limits': (
        'max_message_bytes',
        'max_control_bytes',
        'max_ack_bytes',
        'max_client_bytes',
        'data_queue_messages',
        'send_queue_batches',
        'ack_queue_messages',
        'client_reply_queue',
        'messages_per_turn',
    ),
}

ZERO_DISABLES = frozenset({"checkpoint_entries", "checkpoint_interval"})

# (smaller, larger, why): cross-field rules checked by Config.validate.
_ORDER = [
    ("connect_backoff_min", "connect_backoff_max",
     "the handshake backoff starts at the minimum and doubles up to the maximum"),
    ("ack_timeout", "commit_timeout",
     "a blocking apply would give up before its follower is declared failed"),
    ("ack_timeout", "state_sync_stall_timeout",
     "a state batch takes longer to apply than a WAL batch"),
    ("window", "send_queue_batches", "every batch in flight must fit in the send queue"),
    ("max_batch_data", "max_message_bytes", "a batch must fit in one message"),
    ("rpc_timeout", "sync_wait_timeout",
     "a leader waiting for a synchronous follower must allow one handshake"),
]


@dataclass
class Config:
    # --- storage -----------------------------------------------------------

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

    max_retained_wal: int = 10_000_000
    """WAL entries kept beyond the newest checkpoint for a follower that
    is syncing or disconnected (like a replication slot).  A follower that
    falls further behind gets a full state sync instead."""

    # --- replication -------------------------------------------------------

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
    """Whether this node's link to its follower is synchronous: the head of
    the chain answers its callers only after the follower acknowledged (a
    forwarder's follower acknowledges straight to the head; see
    ``docs/replication.md``).  False makes the link asynchronous
    (answered after the local apply; the follower still receives every
    batch, in order): for a WAN hop at the end of a chain.  Status
    reports each link's ``follower_sync``."""

    lease_required: bool = False
    """As leader, accept writes only under a lease granted by the
    supervisor (renewed by its polls).  Leases are enforced anyway once one
    was granted; this makes a restarted leader wait for the first renewal
    too.  Set it on every node run under a supervisor."""

    ack_timeout: float = 0.5
    """Seconds a leader waits for its follower to acknowledge a batch before
    it declares the link failed.  While a synchronous follower is silent,
    commits stall this long at most; 0.5 s is far above a healthy round
    trip (well under 1 ms) and short enough not to freeze writers."""

    ack_timeout_hop_step: float = 0.1
    """In a chain, each hop from the leader waits ``ack_timeout`` shortened
    by this fraction per hop (``ack_timeout * (1 - step * depth)``), so that
    when a tail hangs the link next to it fails first and the nodes above
    are answered before their own, longer timers fire."""

    ack_timeout_floor: float = 0.2
    """The per-hop shortening never goes below this fraction of
    ``ack_timeout``: a deep chain still gives its tail a fair chance."""

    commit_timeout: float = 10.0
    """Longest time ``Manager.apply`` waits for its command to commit
    before raising ``Timeout`` (outcome unknown)."""

    window: int = 8
    """Batches sent downstream and not yet acknowledged, at most.  Enough
    to keep leader and follower busy at the same time; bounds memory."""

    max_batch_entries: int = 1024
    """Commands packed into one WAL batch at most (group commit)."""

    max_batch_data: int = 4 * 1024 * 1024
    """Bytes of command data in one batch, at most (a single larger
    command travels alone)."""

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

    session_expiry: float = 60.0
    """Seconds a client session must have been idle before a new client may
    push it out of a full table: until then a new client is told to retry
    (``Timeout``), so a client retrying within this time always finds its
    session.  Keep it above every client's ``retry_for`` (10 s by default);
    a retry later than that is refused (``SessionExpired``) or, for a
    client's very first command, could be taken as new."""

    leader_read_timeout: float = 2.0
    """Longest time a ``leader_only`` read waits for the writes applied
    before it to be acknowledged (the read barrier) before it fails with
    ``Timeout``.  Reads wait only while writes are in flight; an idle
    leader answers at once."""

    rpc_timeout: float = 0.5
    """Seconds to wait for a reply to a control call (handshake, status)
    before the socket is reopened and the call fails."""

    connect_backoff_min: float = 0.05
    """First retry delay after a failed handshake with the follower;
    doubles on every failure up to ``connect_backoff_max``."""

    connect_backoff_max: float = 1.0
    """Longest delay between handshake retries."""

    stream_batch_entries: int = 2048
    """WAL entries per batch when a follower catches up from the log."""

    snapshot_batch_entries: int = 4096
    """App commands per batch of a full state sync or checkpoint."""

    state_sync_stall_timeout: float = 2.0
    """Seconds a full state sync may go without the follower acknowledging
    any of its batches before the link is declared failed.  Four times
    ``ack_timeout``: a state batch carries thousands of entries, and a
    follower that keeps acknowledging is busy, not dead."""

    snapshot_child_nice: int = 10
    """Nice increment of the forked child that writes a state sync or a
    checkpoint: it is background work, and on a busy machine the parent's
    commit path must win the CPU when it wakes (measured with
    perf/sync.py).  0 keeps the parent's priority."""

    progress_interval: float = 5.0
    """Seconds between two progress lines of long work (restart replay,
    checkpoint load, state syncs): an operator watching a node that takes
    minutes to come back sees it moving, without a line per batch."""

    # --- shared state (docs/shared.md) -------------------------------------

    shared_dir: str = ""
    """Where an App keeping its state in ``zrepl.SharedStore`` has it: an
    LMDB directory written only by the node.  Empty (default): ``DATA/shared``.
    The store is rebuilt from checkpoint + WAL at every start, so a tmpfs
    (``/dev/shm/...``) is a good place: it costs no durability."""

    shared_map_bytes: int = 1 << 30
    """The shared store's initial LMDB map: address space, not memory or
    disk (the file grows as pages are used).  Doubled whenever a batch
    fills it."""

    readers: int = 0
    """Reader processes serving ``get``/``scan``/``App.query`` from the
    shared store, never through the engine thread, each on an endpoint of
    its own (``PORT+4``, ``PORT+5``... or ``PATH.read0``, ``PATH.read1``...).
    0: none (reads go to the engine); at most 16.  Needs a store-backed
    App."""

    read_wait_timeout: float = 1.0
    """Longest a read carrying ``min_wal_id`` waits for the store to catch
    up before it fails with ``Timeout`` (read-your-writes across
    processes)."""

    # --- supervisor --------------------------------------------------------

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
    another node, so a cut-off leader has stopped writing by then.  A node
    never takes a longer lease than its own setting, whatever a renewal
    asks for."""

    lease_margin: float = 1.2
    """Safety factor on ``lease`` for clock-rate differences between the
    supervisor's and the leader's machines: the supervisor promotes only
    ``lease * lease_margin`` after the last renewal, so clocks may drift
    apart by up to 20 % before a cut-off leader could still be writing."""

    follower_error_retry: float = 5.0
    """Seconds between the supervisor's attempts to re-link a follower whose
    link is in ``ERROR`` (a refusal that retrying at once cannot fix); also
    how long the supervisor avoids a link it routed the chain around (a
    node that could not reach its follower while both answered it)."""

    poll_timeout_fraction: float = 0.8
    """The share of ``heartbeat_interval`` the supervisor waits for status
    replies; the rest of the interval is left for its calls."""

    # --- client ------------------------------------------------------------

    client_max_pause: float = 0.05
    """Longest wait of ``zrepl.Client`` between two rounds of attempts.
    During a failover every live node answers NotLeader at once until one
    is promoted; a short cap finds the new leader within 50 ms of its
    promotion, for a few cheap requests per round."""

    # --- limits ------------------------------------------------------------

    max_message_bytes: int = 64 * 1024 * 1024
    """Largest ZeroMQ message any endpoint accepts; a peer that sends a
    larger one is disconnected.  Larger than any batch zrepl sends."""

    max_control_bytes: int = 4 * 1024 * 1024
    """Largest message a node's control endpoint takes (handshakes, the
    supervisor's calls; a tool's apply_wal); a larger one drops its sender."""

    max_ack_bytes: int = 256 * 1024
    """Largest message a node's ack endpoint takes (an ack carries one code
    per entry of a batch)."""

    max_client_bytes: int = 4 * 1024 * 1024
    """Largest message a node's client endpoint takes: one command or query,
    with its envelope."""

    data_queue_messages: int = 10_000
    """Messages a node's data endpoint queues from its upstream before
    ZeroMQ pushes back (receive high-water mark).  Batches are bounded by
    the upstream's window; this only absorbs bursts."""

    send_queue_batches: int = 48
    """Messages queued toward the follower's data endpoint before a send
    waits (send high-water mark).  At least ``window``: every batch in
    flight must fit, plus a state sync's messages."""

    ack_queue_messages: int = 10_000
    """Acknowledgements queued toward the upstream before ZeroMQ pushes
    back (send high-water mark)."""

    client_reply_queue: int = 100_000
    """Replies queued toward remote clients.  Clients bound what they have
    outstanding, so a deep queue costs little; a full one is counted
    (``client_replies_dropped``), never silent."""

    messages_per_turn: int = 256
    """Messages the engine takes from one endpoint before it looks at the
    others: fairness between data, acks, clients and control calls."""

    # --- security ---------------------------------------------------------

    key: str = ""
    """This member's secret key file (``NAME.key_secret``, made by
    ``python3 -m zrepl keygen``).  With ``trust``, every endpoint this
    process binds is a ZeroMQ CURVE server and every one it connects to a
    CURVE client: encrypted, and open only to the trust directory's keys,
    each limited to what its role may do (README, "Security")."""

    trust: str = ""
    """The trust directory: the public key files (``NAME.key``) of every
    node, supervisor, operator and client of the cluster."""

    insecure: bool = False
    """Let a node or supervisor listen on a TCP address other than loopback
    without keys.  Off by default: such a process refuses to start, since
    anyone who reaches its ports could then rebuild or read the cluster."""

    handshake_timeout: float = 2.0
    """Seconds a connection to a node's or supervisor's endpoint has to
    complete its ZeroMQ (and CURVE) handshake before it is closed
    (ZMQ_HANDSHAKE_IVL; libzmq's default is 30 s).  Idle connections from
    strangers then hold a file descriptor for seconds, not half a minute,
    while the node may be out of descriptors for its own clients."""

    max_connections: int = 1000
    """With keys: the most connections each endpoint of a node or
    supervisor holds; beyond it a new handshake is refused (and counted),
    so the process keeps file descriptors for its own work."""

    max_epoch_jump: int = 1_000_000
    """The most a node's epoch (leader_id) may grow in one call: a larger
    jump is refused, so no call can exhaust the epochs (the supervisor
    raises them by one per failover; a node that missed a million
    failovers must be rebuilt)."""

    # --- helpers ----------------------------------------------------------

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting (or pair of
        settings)."""
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(
                f"fsync must be one of {', '.join(FSYNC_POLICIES)}; got {self.fsync!r}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "str":
                if not isinstance(value, str):
                    raise ValueError(f"{f.name} must be a string; got {value!r}")
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name} must be true or false; got {value!r}")
            elif kind in ("int", "float"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                        (kind == "int" and not isinstance(value, int)):
                    raise ValueError(f"{f.name} must be {'an integer' if kind == 'int' else 'a number'}"
                                     f"; got {value!r}")
                if f.name in ZERO_DISABLES:
                    if value < 0:
                        raise ValueError(f"{f.name} must be >= 0 (0 disables); got {value!r}")
                elif f.name == "readers":
                    if not 0 <= value <= 16:
                        raise ValueError(f"readers must be in 0..16; got {value!r}")
                elif f.name == "snapshot_child_nice":
                    if not 0 <= value <= 19:
                        raise ValueError(f"snapshot_child_nice must be in 0..19; got {value!r}")
                elif value <= 0:
                    raise ValueError(f"{f.name} must be a positive number; got {value!r}")
        if bool(self.key) != bool(self.trust):
            raise ValueError("key and trust go together: a secret key file, and the directory "
                             "of the cluster's public keys")
        if self.max_batch_bytes >= 2**32:
            raise ValueError("max_batch_bytes must be below 4 GiB (record length field)")
        for name in ("ack_timeout_hop_step", "ack_timeout_floor", "poll_timeout_fraction"):
            if getattr(self, name) >= 1:
                raise ValueError(f"{name} must be below 1; got {getattr(self, name)!r}")
        # --- fields against each other -------------------------------------
        for a, b, why in _ORDER:
            if getattr(self, a) > getattr(self, b):
                raise ValueError(f"{a} ({getattr(self, a)!r}) must not exceed {b} "
                                 f"({getattr(self, b)!r}): {why}")
        if self.lease_margin < 1:
            raise ValueError(f"lease_margin ({self.lease_margin!r}) must be >= 1: the supervisor "
                             "would promote before the old leader's lease has run out")
        if self.lease < 2 * self.heartbeat_interval:
            raise ValueError(f"lease ({self.lease!r}) must be at least twice heartbeat_interval "
                             f"({self.heartbeat_interval!r}): a shorter lease lapses whenever one "
                             "renewal poll is late")
        if self.lease > self.heartbeat_interval * self.missed_heartbeats * 100:
            raise ValueError(f"lease ({self.lease!r}) must be at most 100 x heartbeat_interval x "
                             f"missed_heartbeats ({self.heartbeat_interval * self.missed_heartbeats:g}"
                             "): a failover waits out the whole lease")

    @staticmethod
    def flatten(doc: dict[str, Any]) -> dict[str, Any]:
        """Settings from a TOML document that may group them under tables
        named after their group (``[replication]``); a setting under the
        wrong table, or given twice, is a ``ValueError``.  Keys that are
        not settings are passed through for the caller to judge."""
        flat: dict[str, Any] = {}
        for key, value in doc.items():
            if key in GROUPS and isinstance(value, dict):
                for name, v in value.items():
                    if name not in GROUPS[key]:
                        owner = next((g for g, names in GROUPS.items() if name in names), None)
                        raise ValueError(f"[{key}] has no setting {name!r}" + (
                            f" (it belongs in [{owner}])" if owner else ""))
                    if name in flat or name in doc:
                        raise ValueError(f"{name} is set twice (flat and under [{key}])")
                    flat[name] = v
            else:
                flat[key] = value
        return flat

    def replace(self, **changes: Any) -> "Config":
        """A copy with some settings changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)
