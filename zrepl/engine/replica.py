"""Replica: the replication engine of one node, in one process.

Theory of operation
-------------------

Threads.  The hot path never hands work between threads (in CPython a
wake-up costs ~10 µs and a busy thread holds the GIL for up to 5 ms):

* **Caller threads** commit.  ``Manager.apply`` queues its command and, if
  no other thread is committing, becomes the *batch leader*: it takes every
  queued command, sends them as one batch to a synchronous follower, writes
  the batch to the WAL and applies it while the follower does the same,
  then waits for the acknowledgement by reading the ack socket itself
  (*group commit, first waiter leads*).  A caller that finds the ack socket taken waits for
  whoever holds it to resolve its command.
* **The engine thread** serves the control, client and data endpoints,
  drives the follower-sync machine (handshake, snapshot, catch-up) and reads
  acks whenever batches are in flight and no caller reads them.

Locks (always taken in this order):

* ``_app_lock`` — the App, WAL writes, the position, the data-out socket.
  Whoever holds it owns the App; snapshots fork while holding it.
* ``_ack_lock`` — the ack-in socket: held by the one thread reading acks.
* ``_inflight_lock`` — the queue of batches in flight and the link-broken
  flag (tiny critical sections).
* ``_up_lock`` — the ack-out socket (acks to this node's upstream).

Sockets (see ``protocol.endpoints``): a ROUTER for control calls, a PULL
for data from the upstream, a PULL for acks from the downstream, a ROUTER
for clients; a PUSH to the downstream's data endpoint, a PUSH to the
upstream's ack endpoint, and a REQ for control calls to the downstream.

The code is split by concern: ``pipeline.py`` (commits and acks),
``downstream.py`` (driving this node's follower), ``upstream.py`` (serving
the node this one follows); this module holds the lifecycle, the engine
loop, the control and client endpoints and checkpoints.

Safety rules enforced here: the stored ``leader_id`` is persisted before it
is acted on and calls carrying a smaller one are refused (``StaleLeader``);
a follower accepts data only from the stream (random token) of its last
handshake; the leader compares the follower's response codes with its own
(``FollowerMismatch``); a batch is answered to its caller only after the
synchronous follower acknowledged it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import zmq

from ..core import protocol
from .commit import Batch, CallbackSink, Submission
from ..core.config import Config
from .downstream import DownstreamLink, _DownCall, _SnapshotOut
from ..core.errors import CorruptStorage, NotLeader, ProtocolError, ReplicationError, StaleLeader, Timeout
from ..core.interfaces import App, Manager, Node, Storage
from .pipeline import CommitPipeline
from .progress import Progress
from ..core.protocol import endpoints
from ..storage.snapshot import fork_checkpoint, iter_app_batches, list_checkpoints, read_checkpoint
from ..core.session import SessionTable, unwrap
from ..storage.base import check_role, entries_from
from ..core.sync import FollowerSync
from ..core.types import FollowerState, NodeRole, NodeStatus, WALEntry
from .upstream import UpstreamSide, _SnapshotIn
from .zmqutil import NOBLOCK as _NOBLOCK
from .zmqutil import ready as _ready

log = logging.getLogger("zrepl.replica")

class _Log(logging.LoggerAdapter):
    """Prefixes each message with the node's address (readable under any
    handler) and passes it as ``record.node`` (for zrepl.logs' formats)."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {"node": self.extra["address"]}
        return f"[{self.extra['address']}] {msg}", kwargs


class ReplicaManager(Manager):
    """The Manager of a Replica: what host code calls to write."""

    def __init__(self, replica: "Replica"):
        self._r = replica

    def apply(self, cmd: Any) -> int:
        return self._r._apply_blocking([cmd])[0]

    def apply_many(self, cmds: list) -> list[int]:
        if not isinstance(cmds, list):
            cmds = list(cmds)
        if not cmds:
            return []
        return self._r._apply_blocking(cmds)

    def apply_async(self, cmd: Any) -> concurrent.futures.Future:
        return self._r._apply_async(cmd)

    def report_failed(self, fmt: str, *args: Any) -> None:
        self._r._report_failed(fmt % args if args else fmt)


class Replica(CommitPipeline, UpstreamSide, DownstreamLink, Node):
    """The replication engine of one node.

    ``Replica(app, storage, address, config)``; ``start()`` restores the
    App from the newest checkpoint plus the WAL after it, binds the
    endpoints and starts serving; ``stop()`` stops (the storage stays open:
    its owner closes it).  ``manager`` is the Manager for host code; the
    ``Node`` methods act locally.
    """

    def __init__(self, app: App, storage: Storage, address: str,
                 config: Config | None = None):
        self.app = app
        self.storage = storage
        self.address = address
        self.config = config or Config()
        self.endpoints = endpoints(address)
        self.manager = ReplicaManager(self)
        self.log = _Log(log, {"address": address})
        self._ckpt_dir: Path | None = (Path(storage.path) / "checkpoints"
                                       if getattr(storage, "path", None) else None)
        # locks (see module docstring for the order)
        self._app_lock = threading.Lock()
        self._ack_lock = threading.Lock()
        self._inflight_lock = threading.Lock()
        self._up_lock = threading.Lock()
        # commit pipeline
        self._pending: collections.deque[Submission] = collections.deque()
        self._inflight: collections.deque[Batch] = collections.deque()
        self._link_broken: BaseException | None = None
        self._ack_owner = 0  # thread ident holding _ack_lock (0: none)
        self._link_restart = ""  # why the engine must restart the link ("" = no)
        self._synchronous = False  # commits go to the follower and wait for its ack
        self._is_leader = False  # cached storage.role() == LEADER (see _persist_role)
        self._lease_enforced = self.config.lease_required  # once a lease was granted: always
        self._lease_until = 0.0  # monotonic time the supervisor's lease runs out
        self._synced_at = 0.0  # when the follower last held everything this node held
        self._position = 0  # last applied WAL id
        # downstream link (engine thread)
        self._sync = FollowerSync(self.config.connect_backoff_min, self.config.connect_backoff_max)
        self._stream_out = 0
        self._acked = 0
        self._catchup_pos = 0
        self._slot = 0  # first WAL id the follower still needs (0: none)
        self._snap_out: _SnapshotOut | None = None
        self._down_call: _DownCall | None = None
        self._down_req: zmq.Socket | None = None
        self._data_out: zmq.Socket | None = None
        self._data_out_ready = 0.0
        # upstream link
        self._stream_in = 0
        self._depth = 0  # hops from the leader (0: leader or not following)
        self._leader_address = ""
        self._history: list[tuple[int, int]] = []  # cached storage.epoch_history()
        self._history_version = 0  # bumped on every change (what to send downstream)
        self._history_sent = -1  # version last sent on the current downstream stream
        self._snap_in: _SnapshotIn | None = None
        self._ack_out: zmq.Socket | None = None
        self._ack_out_endpoint = ""
        # checkpoints
        self._ckpt_child: tuple[int, int] | None = None  # (pid, wal_id)
        self._ckpt_position = 0
        self._ckpt_time = time.monotonic()
        self._ckpt_requested = False
        # bookkeeping
        self._replies: collections.deque = collections.deque()
        self._failures: collections.deque[str] = collections.deque(maxlen=20)
        self._failure_count = 0
        self._dropped = 0
        self._counters: collections.Counter[str] = collections.Counter()
        self._sessions = SessionTable(self.config.session_window, self.config.max_sessions)
        self._sessions_pending: set[tuple[bytes, int]] = set()  # queued, not yet applied
        self._proc = psutil.Process()
        self._ctx: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._engine_ident = 0
        self._wake_r, self._wake_w = -1, -1
        self._stopping = False
        self._started = False
        self.stopped = threading.Event()
        self.crashed: BaseException | None = None
        self.loop_alive_at = 0.0  # monotonic time the engine loop last came round

    # ====================================================================
    # lifecycle
    # ====================================================================

    def start(self) -> "Replica":
        if self._started:
            raise ReplicationError("replica already started")
        self._started = True
        with self._app_lock:
            self._restore()
        if self.storage.address() != self.address:
            self.storage.set_address(self.address)
        self._ctx = zmq.Context()
        try:
            self._bind()
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        follower = self.storage.follower_address()
        if follower and self.storage.role() in (NodeRole.LEADER, NodeRole.FORWARDER,
                                                NodeRole.FOLLOWER):
            self._sync.configure(follower, time.monotonic())
        self._ckpt_position = self._position
        self._is_leader = self.storage.role() == NodeRole.LEADER
        self._history = self.storage.epoch_history()
        self._thread = threading.Thread(target=self._run, name=f"zrepl-engine {self.address}",
                                        daemon=True)
        self._thread.start()
        self.log.info("serving: role %s, leader_id %d, WAL %d..%d, applied %d",
                      self.storage.role().name, self.storage.leader_id(), self.storage.min_wal(),
                      self.storage.max_wal(), self._position)
        return self

    def _sock(self, kind: int, endpoint: str, bind: bool,
              options: dict[int, int] | None = None) -> zmq.Socket:
        """A socket with zrepl's limits; ``options`` are set before it binds
        or connects (high-water marks only apply to pipes made after)."""
        assert self._ctx is not None
        s = self._ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        for opt, value in (options or {}).items():
            s.setsockopt(opt, value)
        try:
            if bind:
                s.bind(endpoint)
            else:
                s.connect(endpoint)
        except zmq.ZMQError as exc:
            s.close(linger=0)
            raise ReplicationError(f"cannot {'bind' if bind else 'connect'} {endpoint}: "
                                   f"{exc}") from None
        return s

    def _bind(self) -> None:
        ep = self.endpoints
        socks = []
        try:
            # A ROUTER drops replies past its high-water mark; clients bound
            # what they have outstanding, so a deep queue costs little, and
            # ROUTER_MANDATORY makes a full queue visible instead of silent.
            client_opts = {zmq.SNDHWM: 100_000, zmq.ROUTER_MANDATORY: 1}
            for kind, endpoint, opts in ((zmq.ROUTER, ep.control, None),
                                         (zmq.PULL, ep.data, {zmq.RCVHWM: 10_000}),
                                         (zmq.PULL, ep.ack, None),
                                         (zmq.ROUTER, ep.client, client_opts)):
                socks.append(self._sock(kind, endpoint, bind=True, options=opts))
        except BaseException:
            for s in socks:
                s.close(linger=0)
            raise
        self._control, self._data_in, self._ack_in, self._client = socks
        self._ack_poller = zmq.Poller()
        self._ack_poller.register(self._ack_in, zmq.POLLIN)

    def stop(self) -> None:
        """Stop serving: fail waiting callers, end children, close sockets."""
        if not self._started or self._stopping:
            self.stopped.wait(10)
            return
        self._stopping = True
        self._poke()
        if self._thread is not None and threading.get_ident() != self._engine_ident:
            self._thread.join(timeout=30)

    def _shutdown(self) -> None:
        """Runs on the engine thread as it exits."""
        exc = NotLeader(f"node {self.address} stopped", "")
        with self._app_lock:
            self._fail_pending(exc)
            self._kill_children()
        with self._inflight_lock:
            self._link_broken = exc
            ready = self._fail_inflight_locked(
                Timeout(f"node {self.address} stopped before the follower acknowledged"))
        for b in ready:
            b.fail(b.remote)
        if self._snap_in and self._snap_in.writer:
            self._snap_in.writer.abort()
        self._send_replies()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self.log.info("stopped")
        self.stopped.set()

    def __enter__(self) -> "Replica":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ====================================================================
    # restore from checkpoint + WAL
    # ====================================================================

    def _restore(self) -> None:
        app, st = self.app, self.storage
        position = 0
        app.clear_state()
        for wal_id, path in reversed(list_checkpoints(self._ckpt_dir) if self._ckpt_dir else []):
            try:
                snap = read_checkpoint(path)
            except (CorruptStorage, OSError) as exc:
                self.log.warning("skipping unreadable checkpoint %s: %s", path.name, exc)
                continue
            loading = Progress(self.log, f"loading checkpoint {path.name}", snap.entries)
            for datas in iter_app_batches(path):
                self._apply_state_datas(datas)
                loading.add(len(datas))
            self._sessions.load_section(snap.zrepl.get("sessions"))
            position = snap.wal_id
            self.log.info("loaded checkpoint %s (%d entries)", path.name, snap.entries)
            break
        top = st.max_wal()
        if top > position:
            start = position + 1
            if st.min_wal() > start:
                raise CorruptStorage(
                    f"cannot restore: state is at WAL id {position} but the WAL starts at "
                    f"{st.min_wal()} (entries {start}..{st.min_wal() - 1} are missing)")
            replay = Progress(self.log, f"replaying WAL {start}..{top}", top - start + 1)
            while start <= top:
                datas = st.read_wal_data(start, self.config.stream_batch_entries)
                if not datas:
                    break
                try:
                    app_datas, sessions = unwrap(datas)
                except ValueError as exc:
                    raise CorruptStorage(f"WAL entries from {start}: {exc} (not a zrepl WAL?)"
                                         ) from None
                self._apply_app_datas(start, app_datas, sessions)
                start += len(datas)
                replay.add(len(datas))
            position = start - 1
            self.log.info("replayed %d WAL entries up to %d", replay.done, position)
        self._position = position
        st.set_max_applied_wal(position)

    def _apply_state_datas(self, datas: list[bytes]) -> None:
        """Apply the App commands of a checkpoint or a state sync (the App's
        encodings, not WAL envelopes; their codes mean nothing).  App lock
        held."""
        app = self.app
        app.apply([app.decode_cmd(e) for e in entries_from(1, datas)])

    def _apply_app_datas(self, first: int, app_datas: list[bytes],
                         sessions: list[tuple[int, bytes, int]]) -> list[int]:
        """Decode and apply unwrapped WAL entries ``first..``; record the
        client sessions they carry.  App lock held."""
        app = self.app
        codes = app.apply([app.decode_cmd(e) for e in entries_from(first, app_datas)])
        self._sessions.record_batch(first, codes, sessions)
        return codes

    # ====================================================================
    # Node interface (local)
    # ====================================================================

    def status(self) -> NodeStatus:
        st = self.storage
        sync = self._sync
        has_follower = bool(sync.address)
        try:
            with self._proc.oneshot():
                rss = self._proc.memory_info().rss
                cpu = self._proc.cpu_percent(None)
        except psutil.Error:
            rss, cpu = 0, 0.0
        acked = self._acked if has_follower else 0
        lag = max(0, self._position - acked) if has_follower else 0
        now = time.monotonic()
        return NodeStatus(
            address=self.address, role=st.role(), leader_id=st.leader_id(),
            max_wal=st.max_wal(), min_wal=st.min_wal(), max_applied_wal=self._position,
            follower=sync.address, follower_state=sync.state,
            leader=self._leader_address, epoch_history=list(self._history),
            follower_acked_wal=acked,
            follower_lag=lag,
            follower_lag_seconds=round(now - self._synced_at, 6) if lag and self._synced_at else 0.0,
            follower_sync=sync.state == FollowerState.SYNCHRONOUS and self.config.sync_downstream,
            pid=os.getpid(), rss_bytes=rss, cpu_percent=cpu,
            extra={"failures": self._failure_count,
                   "last_failure": self._failures[-1] if self._failures else "",
                   "follower_error": sync.error, "follower_reason": sync.reason,
                   "require_sync": self.config.require_sync,
                   "lease_left": round(max(0.0, self._lease_until - now), 6)
                   if self._lease_enforced else None,
                   "dropped_messages": self._dropped, **self._counters,
                   "pending": len(self._pending), "in_flight": len(self._inflight)})

    def set_role(self, role: NodeRole, leader_id: int) -> None:
        role = check_role(role, ProtocolError)
        leader_id = self._check_leader_id(leader_id)
        with self._app_lock:
            current = self.storage.leader_id()
            was = self.storage.role()
            if leader_id < current:
                raise StaleLeader(f"set_role with leader_id {leader_id}: this node obeys "
                                  f"{current}", leader_id, current)
            if role == NodeRole.LEADER:
                if leader_id == current and was == NodeRole.LEADER:
                    return  # already leader of this epoch
                if leader_id == current:
                    raise StaleLeader(f"a new leadership needs a leader_id above {current}",
                                      leader_id, current)
                self.storage.set_leader_id(leader_id)  # persist before acting
                self._set_history(self._history + [(leader_id, self._position + 1)])
                self._lease_until = 0.0  # a new leadership waits for its own lease
                self._persist_role(NodeRole.LEADER)
                self._drop_upstream()
                self.log.warning("now LEADER with leader_id %d from WAL id %d", leader_id,
                                 self._position + 1)
            else:
                if leader_id > current:
                    self.storage.set_leader_id(leader_id)
                self._persist_role(role)
                if was == NodeRole.LEADER:
                    self._fail_pending(NotLeader(f"{self.address} stepped down",
                                                 self._leader_address))
                    self.log.warning("stepped down to %s (leader_id %d)", role.name, leader_id)
            epoch_changed = leader_id != current
        if epoch_changed or was != role:
            self._restart_link("role or epoch changed")

    def set_leader(self, address: str) -> None:
        self._leader_address = self._check_peer(address, "set_leader")

    def set_follower(self, address: str) -> None:
        self.storage.set_follower_address(self._check_peer(address, "set_follower"))
        self._restart_link("follower set to " + (address or "none"))

    def _check_peer(self, address: Any, op: str) -> str:
        """A neighbour's address ("" for none), or ProtocolError."""
        if not isinstance(address, str):
            raise ProtocolError(f"{op} takes an address string")
        if address:
            try:
                endpoints(address)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            if address == self.address:
                raise ProtocolError("a node cannot follow itself")
        return address

    def _set_history(self, history: list) -> None:
        """Persist a new epoch history; it goes down the chain with the next
        batch this node sends."""
        history = [(int(a), int(b)) for a, b in history]
        if history == self._history:
            return
        self.storage.set_epoch_history(history)
        self._history = history
        self._history_version += 1

    def _persist_role(self, role: NodeRole) -> None:
        """Store the role and keep the commit path's cached view of it."""
        self.storage.set_role(role)
        self._is_leader = role == NodeRole.LEADER

    # ====================================================================
    # the engine thread
    # ====================================================================

    def _poke(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    def _run(self) -> None:
        """The engine loop.  Kept lean: it runs once or twice per batch on a
        follower or forwarder.  Poller registrations change only when the
        set of sockets to watch does, and the housekeeping (timers, the
        downstream driver) runs when it is due, when poked, or while the
        follower link is streaming."""
        self._engine_ident = threading.get_ident()
        poller = zmq.Poller()
        registered: tuple = ()
        hk_due = 0.0
        cfg = self.config
        streaming_states = (FollowerState.SYNCING_STATE, FollowerState.SYNCING_LOG)
        try:
            while not self._stopping:
                now = time.monotonic()
                streaming = self._sync.state in streaming_states
                if now >= hk_due or streaming or self._link_broken is not None \
                        or self._link_restart:
                    timeout = self._housekeeping(now)
                    hk_due = now + timeout
                else:
                    timeout = hk_due - now
                # Only a leader's callers read acks; elsewhere the engine always
                # may, so its ack socket stays registered.
                own_ack = bool(not self._is_leader or self._inflight or streaming) \
                    and self._take_ack_role()
                if own_ack and self._inflight:
                    timeout = min(timeout, max(0.001, self._inflight[0].sent
                                               + self._ack_limit() - now))
                snap = self._snap_out
                snap_fd = snap.fd if snap is not None and snap.fd >= 0 and not snap.eof and \
                    len(snap.queue) < cfg.window * 2 else -1
                down = self._down_req if self._down_call is not None else None
                signature = (not (self._synchronous and len(self._inflight) >= cfg.window),
                             len(self._pending) < cfg.max_pending, own_ack, down, snap_fd)
                if signature != registered:
                    wanted = [self._control, self._wake_r]
                    if signature[0]:
                        wanted.append(self._data_in)  # else the upstream waits
                    if signature[1]:
                        wanted.append(self._client)  # else ZeroMQ holds clients back
                    if own_ack:
                        wanted.append(self._ack_in)
                    if down is not None:
                        wanted.append(down)
                    if snap_fd >= 0:
                        wanted.append(snap_fd)
                    poller = zmq.Poller()
                    for sock in wanted:
                        poller.register(sock, zmq.POLLIN)
                    registered = signature
                try:
                    events = dict(poller.poll(max(0, int(timeout * 1000))))
                    if own_ack:
                        if self._ack_in in events:
                            self._drain_acks()
                        self._ack_overdue(time.monotonic())
                finally:
                    if own_ack:
                        self._release_ack_role(hand_over=False)
                if not events:
                    continue
                if self._wake_r in events:
                    hk_due = 0.0  # whoever poked wants the housekeeping to look
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                if self._control in events:
                    self._serve_control()
                    hk_due = 0.0  # a control call may have changed what is due
                if self._client in events:
                    self._serve_clients()
                if self._data_in in events:
                    self._serve_data()
                if self._down_req is not None and self._down_req in events:
                    self._on_down_reply()
                    hk_due = 0.0
                if snap is not None and snap.fd in events:
                    self._read_snapshot_pipe(snap)
                if self._replies:
                    self._send_replies()
        except BaseException as exc:  # never die silently
            self.crashed = exc
            self.log.critical("engine thread crashed: %r", exc, exc_info=True)
        finally:
            self._stopping = True
            self._shutdown()

    def _housekeeping(self, now: float) -> float:
        """Timers and the downstream driver; returns the poll timeout."""
        self.loop_alive_at = now  # read by the systemd watchdog (runs >= 5x/s)
        timeout = 0.2
        if self._link_restart:
            self._apply_link_restart(now)
        elif self._link_broken is not None:
            self._handle_link_broken(now)
        timeout = min(timeout, self._drive_downstream(now))
        if self._pending and self.config.require_sync:
            # submissions waiting for a synchronous follower (or their deadline)
            self._flush_pending()
            timeout = min(timeout, 0.05)
        timeout = min(timeout, self._checkpoint_timers(now))
        return max(timeout, 0.0)

    # --- control endpoint ------------------------------------------------

    def _requests(self, sock: zmq.Socket) -> Iterator[tuple[list, bytes]]:
        """(envelope, payload) of each request waiting on a ROUTER socket;
        a message without an envelope is dropped and counted."""
        for frames in _ready(sock, multipart=True):
            if len(frames) < 2:
                self._dropped += 1
                continue
            yield frames[:-1], frames[-1]

    def _serve_control(self) -> None:
        for envelope, payload in self._requests(self._control):
            stop_after = False
            try:
                op, args = protocol.parse_control_request(payload)
                name = self._CONTROL.get(op)
                if name is None:
                    raise ProtocolError(f"unknown control operation {op!r}")
                try:
                    result = getattr(self, name)(**args)
                except TypeError as exc:
                    raise ProtocolError(f"bad arguments for {op}: {exc}") from None
                reply = protocol.control_ok(result)
                stop_after = op == "stop"
            except ReplicationError as exc:
                reply = protocol.control_err(exc)
            except Exception as exc:  # a bug or a bad value: report, keep serving
                self.log.warning("control call failed: %r", exc)
                reply = protocol.control_err(ReplicationError(f"{type(exc).__name__}: {exc}"))
            try:
                self._control.send_multipart(envelope + [reply], _NOBLOCK)
            except zmq.ZMQError:
                pass
            if stop_after:
                self._stopping = True

    def _op_status(self, renew_lease_for: Any = 0, lease: Any = 0.0) -> dict:
        """Status; the supervisor's poll of the leader also renews its lease
        (``renew_lease_for`` must be this node's epoch and role LEADER)."""
        refused = ""
        if renew_lease_for:
            try:
                self.renew_lease(renew_lease_for, lease)
            except ReplicationError as exc:  # report it in the status, do not fail the poll
                refused = str(exc)
        d = self.status().to_dict()
        if refused:
            d["extra"]["lease_refused"] = refused
        return d

    def renew_lease(self, leader_id: int, lease: float) -> None:
        """Let this leader accept writes for ``lease`` more seconds.
        Refused (``StaleLeader``) unless this node leads epoch ``leader_id``."""
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease <= 3600:
            raise ProtocolError(f"lease must be a number of seconds in (0, 3600], got {lease!r}")
        if not self._is_leader or leader_id != self.storage.leader_id():
            raise StaleLeader(f"lease for epoch {leader_id} refused: {self.address} is "
                              f"{self.storage.role().name} of epoch {self.storage.leader_id()}",
                              leader_id, self.storage.leader_id())
        self._lease_enforced = True
        self._lease_until = time.monotonic() + lease

    def _op_stop(self) -> None:
        return None

    def _op_ping(self) -> str:
        return "pong"

    def _op_dump_state(self, limit: Any = 1_000_000) -> list[bytes]:
        """Diagnostic: the App's state as encoded commands (in the engine,
        under the App lock: for tests and small states)."""
        with self._app_lock:
            out = []
            for cmd in self.app.iter_state():
                if len(out) >= limit:
                    break
                out.append(self.app.encode_cmd(cmd, WALEntry(0)).data)
            return out

    def _op_state_digest(self) -> dict:
        """Diagnostic: an order-independent digest of the App's state."""
        with self._app_lock:
            datas = sorted(self.app.encode_cmd(c, WALEntry(0)).data for c in self.app.iter_state())
            position = self._position
        h = hashlib.sha256()
        for d in datas:
            h.update(len(d).to_bytes(8, "little"))
            h.update(d)
        return {"wal_id": position, "entries": len(datas), "sha256": h.hexdigest()}

    def _op_checkpoint(self) -> int:
        """Start a checkpoint now; returns the WAL id it will capture
        (0 when this storage keeps no checkpoints)."""
        if self._ckpt_dir is None:
            return 0
        self._ckpt_requested = True
        return self._position

    _CONTROL = {  # operation -> method name (the methods live in several mixins)
        "status": "_op_status", "set_role": "set_role", "set_leader": "set_leader",
        "set_follower": "set_follower", "stop": "_op_stop", "ping": "_op_ping",
        "connect": "_op_connect", "max_applied_wal": "_op_max_applied_wal",
        "clear_state": "_op_clear_state", "apply_state": "_op_apply_state",
        "apply_wal": "_op_apply_wal", "dump_state": "_op_dump_state",
        "state_digest": "_op_state_digest", "checkpoint": "_op_checkpoint",
    }

    @staticmethod
    def _check_leader_id(leader_id: Any) -> int:
        if isinstance(leader_id, bool) or not isinstance(leader_id, int) or leader_id < 0:
            raise ProtocolError(f"leader_id must be a non-negative int, got {leader_id!r}")
        return leader_id

    @staticmethod
    def _check_datas(datas: Any) -> list[bytes]:
        if not isinstance(datas, list) or any(type(d) is not bytes for d in datas):
            raise ProtocolError("entries must be a list of bytes")
        return datas

    # --- client endpoint ------------------------------------------------------

    def _serve_clients(self) -> None:
        for envelope, payload in self._requests(self._client):
            try:
                op, fields = protocol.parse_client_request(payload)
            except ProtocolError as exc:
                self._replies.append((envelope, protocol.submit_reply(None, None, exc)))
                continue
            if op == "query":
                self._replies.append((envelope, self._answer_query(*fields)))
                continue
            request_id, data, cid, seq = fields
            try:
                self._check_writable()
                session = None if cid is None else (cid, seq)
                if session is not None and self._answer_duplicate(envelope, request_id, session):
                    continue
            except ReplicationError as exc:
                self._replies.append((envelope, protocol.submit_reply(request_id, None, exc)))
                continue
            self._counters["client_requests"] += 1
            sink = CallbackSink(self._client_callback(envelope, request_id, session))
            self._pending.append(Submission(
                sink, datas=[data], deadline=time.monotonic() + self.config.sync_wait_timeout,
                session=session))
        self._flush_pending()

    def _answer_query(self, request_id: Any, request: bytes, leader_only: bool) -> bytes:
        """A read, answered from this node's App between two applies.
        ``leader_only`` reads need the leader with a valid lease: they see
        every acknowledged write."""
        try:
            if leader_only:
                self._check_writable()
            with self._app_lock:
                answer = self.app.query(request)
            if type(answer) is not bytes:
                raise ReplicationError(f"App.query returned {type(answer).__name__}, not bytes")
            self._counters["queries"] += 1
            return protocol.submit_reply(request_id, answer)
        except ReplicationError as exc:
            return protocol.submit_reply(request_id, None, exc)
        except Exception as exc:  # App.query is user code: a bad request must not kill us
            detail = str(exc) if isinstance(exc, (ValueError, TypeError)) else \
                f"{type(exc).__name__}: {exc}"
            return protocol.submit_reply(request_id, None, ProtocolError(f"bad query: {detail}"))

    def _answer_duplicate(self, envelope: list, request_id: Any,
                          session: tuple[bytes, int]) -> bool:
        """A command this client sent before: answer it from the session
        table (True), or admit it as new (False).  A command applied but not
        yet confirmed, or still queued, gets a retryable Timeout."""
        hit = self._sessions.lookup(*session)  # SessionExpired for a retry too old to tell
        if hit is None:
            if session in self._sessions_pending:
                raise Timeout("this command is queued already; retry for its answer")
            self._sessions_pending.add(session)
            return False
        code, wal_id = hit
        if wal_id > self._durable_position():
            raise Timeout("this command is applied but not yet confirmed; retry for its answer")
        self._counters["duplicates_answered"] += 1
        self._replies.append((envelope, protocol.submit_reply(request_id, code)))
        return True

    def _durable_position(self) -> int:
        """The last WAL id whose commit has been confirmed to callers."""
        if self.config.require_sync:
            return self._acked if self._sync.address else 0
        return self._position

    def _client_callback(self, envelope: list, request_id: Any,
                         session: tuple[bytes, int] | None = None
                         ) -> Callable[[int | None, BaseException | None], None]:
        def reply(code: int | None, exc: BaseException | None) -> None:
            if session is not None:
                # after the session was recorded (at apply): see _answer_duplicate
                self._sessions_pending.discard(session)
            self._replies.append((envelope, protocol.submit_reply(request_id, code, exc)))
            if threading.get_ident() != self._engine_ident:
                self._poke()
        return reply

    def _send_replies(self) -> None:
        while self._replies:
            envelope, payload = self._replies.popleft()
            try:
                self._client.send_multipart(envelope + [payload], _NOBLOCK)
                self._counters["client_replies"] += 1
            except zmq.ZMQError:
                self._counters["client_replies_dropped"] += 1  # the client went away

    # ====================================================================
    # checkpoints (engine thread)
    # ====================================================================

    def _checkpoint_timers(self, now: float) -> float:
        if self._ckpt_dir is None:
            return 1.0
        if self._ckpt_child is not None:
            pid, wal_id = self._ckpt_child
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                return 0.02
            self._ckpt_child = None
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                self._ckpt_position = wal_id
                self._ckpt_time = now
                self._prune_checkpoints(wal_id)
                self.log.info("checkpoint at WAL id %d written", wal_id)
            else:
                self._report_failed(f"checkpoint at WAL id {wal_id} failed (status {status})")
        cfg = self.config
        due = self._ckpt_requested
        if cfg.checkpoint_interval and now - self._ckpt_time >= cfg.checkpoint_interval and \
                self._position > self._ckpt_position:
            due = True
        if due and self._ckpt_child is None and self._snap_in is None:
            self._ckpt_requested = False
            with self._app_lock:
                wal_id = self._position
                history = [list(x) for x in self._history]
                sessions = self._sessions
                section = lambda: {"epoch_history": history,  # noqa: E731 - runs in the child
                                   "sessions": sessions.to_section()}
                pid = fork_checkpoint(self._ckpt_dir, self.app, wal_id, self.storage.leader_id(),
                                      section, cfg.snapshot_batch_entries)
            self._ckpt_child = (pid, wal_id)
            return 0.02
        if cfg.checkpoint_interval:
            return max(0.05, cfg.checkpoint_interval - (now - self._ckpt_time))
        return 1.0

    def _prune_checkpoints(self, newest: int) -> None:
        """Keep the newest ``checkpoints_kept`` files and truncate the WAL up
        to the oldest kept one, but never past what the follower needs."""
        assert self._ckpt_dir is not None
        kept = list_checkpoints(self._ckpt_dir)
        for _, path in kept[:-self.config.checkpoints_kept]:
            path.unlink(missing_ok=True)
        for p in self._ckpt_dir.glob(".ckpt-*.tmp.*"):
            pid = p.name.rsplit(".", 1)[-1]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                p.unlink(missing_ok=True)  # left by a crashed writer
        kept = list_checkpoints(self._ckpt_dir)
        if not kept:
            return
        limit = kept[0][0] + 1
        needed = self._follower_needs()
        if needed and self._position - needed <= self.config.max_retained_wal:
            limit = min(limit, needed)
        if limit > 1:
            self.storage.truncate_wal_before_id(limit)

    def _kill_children(self) -> None:
        self._kill_snapshot_out()
        if self._ckpt_child is not None:
            pid, _ = self._ckpt_child
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            self._ckpt_child = None

    # ====================================================================
    # failures
    # ====================================================================

    def _report_failed(self, message: str) -> None:
        self._failure_count += 1
        self._failures.append(message)
        self.log.error("replication failure: %s", message)
