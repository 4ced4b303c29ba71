"""Replica: the replication engine of one node, in one process.

Theory of operation
-------------------

Threads.  The hot path never hands work between threads (in CPython a
wake-up costs ~10 µs and a busy thread holds the GIL for up to 5 ms):

* **Caller threads** commit.  ``Manager.apply`` queues its command and, if
  no other thread is committing, becomes the *batch leader*: it takes every
  queued command, writes them as one WAL batch, applies them to the App,
  sends the batch to a synchronous follower and then waits for the
  acknowledgement by reading the ack socket itself (*group commit, first
  waiter leads*).  A caller that finds the ack socket taken waits for
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
import errno
import hashlib
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

from . import protocol
from .commit import Batch, CallbackSink, FutureSink, Sink, Submission, WaitSink
from .config import Config
from .errors import (CorruptStorage, FollowerMismatch, NotLeader, ProtocolError,
                     ReplicationError, StaleLeader, StorageError, Timeout, WALGap,
                     WALTruncated)
from .interfaces import App, Manager, Node, Storage
from .protocol import (ACK, STATE, STATE_BEGIN, STATE_END, WAL, codes_from_bytes,
                       codes_to_bytes, endpoints)
from .snapshot import (CheckpointFileWriter, FrameReader, fork_checkpoint,
                       fork_snapshot_to_pipe, iter_app_batches, list_checkpoints,
                       read_checkpoint)
from .storage import entries_from
from .sync import FollowerInfo, FollowerSync, UpstreamView, plan_sync
from .types import FollowerState, NodeRole, NodeStatus, WALEntry

log = logging.getLogger("zrepl.replica")

_DRAIN = 256  # messages handled per socket per engine iteration (fairness)
# Plain ints: pyzmq's constants are enums whose operators run Python code.
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def _ready(sock: zmq.Socket, multipart: bool = False, limit: int = _DRAIN):
    """Messages waiting on ``sock`` (at most ``limit``), without paying for
    a zmq.Again exception at the end of every burst."""
    recv = sock.recv_multipart if multipart else sock.recv
    getsockopt = sock.getsockopt
    for _ in range(limit):
        try:
            yield recv(_NOBLOCK)
        except zmq.Again:
            return
        if not getsockopt(_EVENTS) & _POLLIN:
            return


class _Log(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['address']}] {msg}", kwargs


@dataclass
class _DownCall:
    op: str
    deadline: float
    on_ok: Callable[[Any], None]
    on_err: Callable[[BaseException], None]


@dataclass
class _SnapshotOut:
    """A full state sync in progress toward the follower."""

    wal_id: int
    stream: int
    pid: int = 0
    fd: int = -1
    reader: FrameReader = field(default_factory=FrameReader)
    queue: collections.deque = field(default_factory=collections.deque)  # (seq, message)
    seq: int = 0  # STATE batches read from the child
    sent_seq: int = 0  # STATE batches sent
    acked_seq: int = 0  # STATE batches acknowledged
    entries: int = 0
    child_count: int | None = None  # from the child's end frame
    eof: bool = False
    end_sent: bool = False
    done: bool = False
    last_progress: float = field(default_factory=time.monotonic)


@dataclass
class _SnapshotIn:
    """A full state sync being received from the upstream."""

    wal_id: int
    stream: int
    history: list
    entries: int = 0
    writer: CheckpointFileWriter | None = None


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


class Replica(Node):
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
        self._leader_address = ""
        self._stream_history: list | None = None
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
        self._proc = psutil.Process()
        self._ctx: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._engine_ident = 0
        self._wake_r, self._wake_w = -1, -1
        self._stopping = False
        self._started = False
        self.stopped = threading.Event()
        self.crashed: BaseException | None = None

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
        if follower and self.storage.role() in (NodeRole.LEADER, NodeRole.FORWARDER):
            self._sync.configure(follower, time.monotonic())
        self._ckpt_position = self._position
        self._is_leader = self.storage.role() == NodeRole.LEADER
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
            for datas in iter_app_batches(path):
                app.apply([app.decode_cmd(e) for e in entries_from(1, datas)])
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
            replayed = 0
            while start <= top:
                entries = st.read_wal(start, self.config.stream_batch_entries)
                if not entries:
                    break
                app.apply([app.decode_cmd(e) for e in entries])
                start = entries[-1].wal_id + 1
                replayed += len(entries)
            position = start - 1
            self.log.info("replayed %d WAL entries up to %d", replayed, position)
        self._position = position
        st.set_max_applied_wal(position)

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
        return NodeStatus(
            address=self.address, role=st.role(), leader_id=st.leader_id(),
            max_wal=st.max_wal(), min_wal=st.min_wal(), max_applied_wal=self._position,
            follower=sync.address, follower_state=sync.state,
            leader=self._leader_address, epoch_history=st.epoch_history(),
            follower_acked_wal=acked,
            follower_lag=max(0, self._position - acked) if has_follower else 0,
            follower_sync=sync.state == FollowerState.SYNCHRONOUS,
            pid=os.getpid(), rss_bytes=rss, cpu_percent=cpu,
            extra={"failures": self._failure_count,
                   "last_failure": self._failures[-1] if self._failures else "",
                   "follower_error": sync.error, "follower_reason": sync.reason,
                   "require_sync": self.config.require_sync,
                   "dropped_messages": self._dropped, **self._counters,
                   "pending": len(self._pending), "in_flight": len(self._inflight)})

    def set_role(self, role: NodeRole, leader_id: int) -> None:
        role = self._check_role(role)
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
                history = self.storage.epoch_history()
                history.append((leader_id, self._position + 1))
                self.storage.set_epoch_history(history)
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
        if not isinstance(address, str):
            raise ProtocolError("set_leader takes an address string")
        if address:
            endpoints(address)  # validate
        self._leader_address = address

    def set_follower(self, address: str) -> None:
        if not isinstance(address, str):
            raise ProtocolError("set_follower takes an address string")
        if address:
            try:
                endpoints(address)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            if address == self.address:
                raise ProtocolError("a node cannot follow itself")
        self.storage.set_follower_address(address)
        self._restart_link("follower set to " + (address or "none"))

    # ====================================================================
    # commit path (caller threads)
    # ====================================================================

    def _check_writable(self) -> None:
        if self._stopping or not self._started:
            raise NotLeader(f"node {self.address} is not running", "")
        if not self._is_leader:
            raise NotLeader(f"{self.address} is not the leader", self._leader_address)

    def _persist_role(self, role: NodeRole) -> None:
        """Store the role and keep the commit path's cached view of it."""
        self.storage.set_role(role)
        self._is_leader = role == NodeRole.LEADER

    def _apply_blocking(self, cmds: list) -> list[int]:
        if not self._is_leader or self._stopping:
            self._check_writable()
        cfg = self.config
        sink = WaitSink(len(cmds))
        now = time.monotonic()
        sub = Submission(sink, cmds, None, now + (
            cfg.sync_wait_timeout if cfg.require_sync else cfg.commit_timeout))
        self._pending.append(sub)
        self._flush_pending()
        if not sink.resolved:
            self._wait(sink, sub, now + cfg.commit_timeout)
        if sink.error is not None:
            raise sink.error
        return sink.codes

    def _apply_async(self, cmd: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._check_writable()
        except NotLeader as exc:
            fut.set_exception(exc)
            return fut
        sub = Submission(FutureSink(fut), cmds=[cmd],
                         deadline=time.monotonic() + self.config.sync_wait_timeout)
        self._pending.append(sub)
        self._flush_pending()
        if not fut.done():
            self._poke()  # nobody waits here: the engine reads the ack
        return fut

    def _flush_pending(self) -> None:
        """Group commit: whoever gets the App lock commits everything queued;
        a thread that does not get it leaves its submission to the holder,
        which looks at the queue again after releasing the lock."""
        while self._pending:
            if not self._app_lock.acquire(blocking=False):
                return
            try:
                self._commit_pending_locked()
            finally:
                self._app_lock.release()
            if self.config.require_sync and not self._synchronous:
                return  # they wait for a synchronous follower (or time out)
            if self._synchronous and len(self._inflight) >= self.config.window:
                return  # the next ack commits what is queued

    def _commit_pending_locked(self) -> None:
        """Pack queued submissions into batches and commit them.  App lock held."""
        cfg = self.config
        pending = self._pending
        if not self._is_leader or self._stopping:
            self._fail_pending(NotLeader(f"{self.address} is not the leader",
                                         self._leader_address))
            return
        max_n, max_size = cfg.max_batch_entries, cfg.max_batch_data
        while pending:
            if cfg.require_sync and not self._synchronous:
                self._expire_pending(time.monotonic())
                return
            if self._synchronous and len(self._inflight) >= cfg.window:
                # The window is full: leave the rest queued.  Whoever reads
                # the next ack commits it, as one batch (group commit).
                return
            entries: list[WALEntry] = []
            cmds: list = []
            pieces: list[tuple[Sink, int, int]] = []
            next_id = self._position + 1
            n = size = 0
            while pending and n < max_n and size < max_size:
                sub = pending[0]
                start = sub.taken
                take = sub.size - start
                if take > max_n - n:
                    take = max_n - n
                try:
                    new_entries, new_cmds = self._prepare(sub, start, take, next_id + n)
                except Exception as exc:  # the App refused to encode/decode one
                    pending.popleft()
                    sub.sink.fail(exc if isinstance(exc, (ValueError, TypeError, ReplicationError))
                                  else ReplicationError(f"command rejected by the App: {exc!r}"))
                    continue
                entries += new_entries
                cmds += new_cmds
                size += len(new_entries[0].data) * take  # an estimate is enough here
                pieces.append((sub.sink, start, take))
                n += take
                sub.taken = start + take
                if sub.taken >= sub.size:
                    pending.popleft()
            if entries:
                self._commit_batch(entries, cmds, pieces)

    def _prepare(self, sub: Submission, start: int, count: int, first_id: int
                 ) -> tuple[list[WALEntry], list]:
        app = self.app
        if sub.cmds is not None:
            cmds = sub.cmds[start:start + count]
            entries = [app.encode_cmd(c, WALEntry(i)) for i, c in enumerate(cmds, first_id)]
            try:
                b"".join([e.data for e in entries])  # bytes, checked before anything is sent
            except TypeError:
                raise TypeError("App.encode_cmd must set entry.data to bytes") from None
            return entries, cmds
        entries = entries_from(first_id, sub.datas[start:start + count])  # type: ignore[index]
        return entries, [app.decode_cmd(e) for e in entries]

    def _commit_batch(self, entries: list[WALEntry], cmds: list,
                      pieces: list[tuple[Sink, int, int]]) -> None:
        """Send (when synchronous), write and apply one batch.  App lock held.

        Sending first lets the follower work while the leader writes and
        applies; nothing is answered before both halves are done, and a
        leader that dies in between leaves a follower *ahead* of it, which
        the handshake treats as divergence (state sync), never as loss.
        """
        first, last = entries[0].wal_id, entries[-1].wal_id
        datas = [e.data for e in entries]
        batch = Batch(first, last, pieces)
        sent = self._synchronous and self._send_downstream(batch, datas)
        try:
            self.storage.write_wal_data(first, datas)
        except StorageError as exc:
            self._report_failed(f"WAL write failed: {exc}")
            self._abandon_batch(batch, sent, exc)
            return
        try:
            codes = self.app.apply(cmds)
            if len(codes) != len(cmds):
                raise ValueError(f"App.apply returned {len(codes)} codes for {len(cmds)} commands")
            cb = codes_to_bytes(codes)
        except Exception as exc:
            # The batch is in the WAL already: this App is broken.
            self._position = last
            self._report_failed(f"App.apply failed on WAL {first}..{last}: {exc!r}")
            self._abandon_batch(batch, sent, ReplicationError(f"App.apply failed: {exc!r}"))
            return
        self._position = last
        self.storage.set_max_applied_wal(last)
        if sent:
            with self._inflight_lock:
                finalize = batch.set_local(codes, cb)
            if finalize:
                self._finalize(batch)
        else:
            batch.set_local(codes, cb)
            if self.config.require_sync:
                self._resolve_unacked(batch, self._link_broken or Timeout("no synchronous follower"))
            else:
                batch.resolve()
        self._after_commit()

    def _abandon_batch(self, batch: Batch, sent: bool, exc: BaseException) -> None:
        """The local half of a batch failed: fail its callers; if it was
        sent, the follower may hold what this node does not: restart the link."""
        batch.fail(exc)
        with self._inflight_lock:
            batch.pieces = []
            batch.set_local(None, None)
        if sent:
            self._link_failure(ReplicationError(f"leader could not log WAL {batch.first}.."
                                                f"{batch.last} after sending it: {exc}"))

    def _after_commit(self) -> None:
        cfg = self.config
        if cfg.checkpoint_entries and self._position - self._ckpt_position >= cfg.checkpoint_entries:
            if not self._ckpt_requested:
                self._ckpt_requested = True
                self._poke()

    def _send_downstream(self, batch: Batch, datas: list[bytes]) -> bool:
        """Put ``batch`` in flight and send it.  App lock held.  False if the
        link is down (the caller resolves the batch by policy)."""
        with self._inflight_lock:
            if self._link_broken is not None or not self._synchronous:
                return False
            self._inflight.append(batch)
        msg = protocol.wal_message(self.storage.leader_id(), self._stream_out, batch.first, datas)
        sock = self._data_out
        try:
            try:
                sock.send(msg, _NOBLOCK)  # type: ignore[union-attr]
            except zmq.Again:
                # The queue toward the follower is full for a moment: wait
                # for room as long as an ack may take, then give up.
                if not sock.poll(int(self.config.ack_timeout * 1000), zmq.POLLOUT):  # type: ignore[union-attr]
                    raise
                sock.send(msg, _NOBLOCK)  # type: ignore[union-attr]
        except (zmq.ZMQError, AttributeError) as exc:
            with self._inflight_lock:
                if self._inflight and self._inflight[-1] is batch:
                    self._inflight.pop()
            self._link_failure(Timeout(f"cannot send to follower {self._sync.address}: {exc} "
                                       f"({len(self._inflight)} batches in flight)"))
            return False
        return True

    def _wait(self, sink: WaitSink, sub: Submission, deadline: float) -> None:
        """Wait for ``sink``.  Not yet in a batch: try to lead one.  In
        flight: read the acks ourselves unless another thread does (then it
        resolves us).  The short timed waits are a safety net only: every
        resolution releases the sink's lock at once."""
        while not sink.resolved:
            now = time.monotonic()
            if now >= deadline or (sub.taken == 0 and now >= sub.deadline):
                self._abandon(sub, sink)
                return
            if sub.taken == 0:
                self._flush_pending()
                if sub.taken or sink.resolved:
                    continue
                # Still queued: the window is full or another thread commits.
                # Reading acks frees the window and commits the queue.
                if self._inflight and self._take_ack_role():
                    try:
                        self._read_acks(lambda: sub.taken > 0 or sink.resolved,
                                        min(deadline, sub.deadline, now + self.config.ack_timeout))
                    finally:
                        self._release_ack_role()
                else:
                    sink.wait(min(0.05, sub.deadline - now, deadline - now))
                continue
            if self._inflight and self._take_ack_role():
                try:
                    self._read_acks(lambda: sink.resolved,
                                    min(deadline, now + self.config.ack_timeout * 2))
                finally:
                    self._release_ack_role()
            else:
                sink.wait(min(0.05, deadline - now))

    def _abandon(self, sub: Submission, sink: WaitSink) -> None:
        with self._app_lock:
            if sub.taken == 0 and sub in self._pending:
                self._pending.remove(sub)
                if self.config.require_sync and not self._synchronous:
                    sink.fail(Timeout(f"no synchronous follower within "
                                      f"{self.config.sync_wait_timeout:g}s (require_sync): "
                                      "nothing was written"))
                else:
                    sink.fail(Timeout("command was not committed in time; nothing was written"))
                return
        sink.fail(Timeout(f"commit not confirmed within {self.config.commit_timeout:g}s "
                          "(outcome unknown)"))

    def _expire_pending(self, now: float) -> None:
        """require_sync: fail queued submissions whose wait ran out.  App lock held."""
        keep = collections.deque()
        while self._pending:
            sub = self._pending.popleft()
            if sub.taken == 0 and now >= sub.deadline:
                sub.sink.fail(Timeout(
                    f"no synchronous follower within {self.config.sync_wait_timeout:g}s "
                    "(require_sync): nothing was written"))
            else:
                keep.append(sub)
        self._pending.extend(keep)

    def _fail_pending(self, exc: BaseException) -> None:
        while self._pending:
            self._pending.popleft().sink.fail(exc)

    # ====================================================================
    # acks from the downstream (whoever holds _ack_lock)
    # ====================================================================

    def _take_ack_role(self) -> bool:
        """Become the thread that reads acks, if nobody is (check
        ``_ack_owner`` first where the caller may hold it already)."""
        if self._ack_lock.acquire(blocking=False):
            self._ack_owner = threading.get_ident()
            return True
        return False

    def _release_ack_role(self, hand_over: bool = True) -> None:
        self._ack_owner = 0
        self._ack_lock.release()
        if hand_over and self._inflight and threading.get_ident() != self._engine_ident:
            self._poke()  # the engine takes over reading

    def _read_acks(self, done: Callable[[], bool], deadline: float) -> None:
        """Read acks until ``done()`` or ``deadline``.  One message per
        wake-up: the common case (one batch, one ack) returns as soon as it
        is handled, and whatever else is queued waits for the next reader."""
        sock = self._ack_in
        poll = self._ack_poller.poll
        while not done():
            now = time.monotonic()
            if self._inflight:
                oldest = self._inflight[0].sent
                if now - oldest > self.config.ack_timeout:
                    self._link_failure(Timeout(
                        f"follower {self._sync.address} did not acknowledge within "
                        f"{self.config.ack_timeout:g}s"))
                    return
                until = min(deadline, oldest + self.config.ack_timeout)
            else:
                until = deadline
            if now >= until:
                return
            if poll(max(1, int((until - now) * 1000 + 0.999))):
                try:
                    raw = sock.recv(_NOBLOCK)
                except zmq.Again:
                    continue
                self._handle_ack(raw)

    def _drain_acks(self) -> None:
        for raw in _ready(self._ack_in):
            self._handle_ack(raw)

    def _handle_ack(self, raw: bytes) -> None:
        try:
            msg = protocol.parse_data(raw)
            if msg[1] != ACK:
                raise ProtocolError("expected an ack on the ack endpoint")
        except ProtocolError as exc:
            self._dropped += 1
            self.log.warning("dropped a bad ack: %s", exc)
            return
        _, _, stream, kind, position, codes, err = msg
        if stream == 0 or stream != self._stream_out:
            self._dropped += 1
            return  # from an older conversation
        if err is not None:
            self._link_failure(protocol.error_from_wire(err))
            return
        if kind == WAL:
            finalize = False
            with self._inflight_lock:
                if not self._inflight or self._inflight[0].last != position:
                    expected = self._inflight[0].last if self._inflight else None
                    batch = None
                else:
                    batch = self._inflight.popleft()
                    finalize = batch.set_remote(codes)
            if batch is None:
                self._link_failure(ProtocolError(
                    f"follower acknowledged WAL {position}, expected {expected}"))
                return
            if position > self._acked:
                self._acked = position
            if finalize:
                self._finalize(batch)
            if self._pending:
                self._flush_pending()  # the window has room again
        elif kind in (STATE, STATE_END):
            snap = self._snap_out
            if snap is not None and snap.stream == stream:
                if kind == STATE:
                    snap.acked_seq = max(snap.acked_seq, position)
                else:
                    snap.done = True
                snap.last_progress = time.monotonic()
        else:
            self._link_failure(ProtocolError(f"ack of unknown kind {kind}"))

    def _link_failure(self, exc: BaseException) -> None:
        """The downstream link failed: stop sending, resolve what is in
        flight by policy, and let the engine thread reconnect."""
        with self._inflight_lock:
            if self._link_broken is not None:
                return
            self._link_broken = exc
            self._synchronous = False
            ready = self._fail_inflight_locked(exc)
        self.log.warning("link to follower %s failed: %s", self._sync.address, exc)
        for b in ready:
            self._finalize(b)
        self._poke()

    def _fail_inflight_locked(self, exc: BaseException) -> list[Batch]:
        """Give every batch in flight the link's failure as its remote half;
        returns those whose local half is done too.  In-flight lock held."""
        ready = [b for b in self._inflight if b.set_remote(exc)]
        self._inflight.clear()
        return ready

    def _finalize(self, batch: Batch) -> None:
        """Both halves of a batch are known: answer its callers."""
        remote = batch.remote
        if isinstance(remote, BaseException):
            self._resolve_unacked(batch, remote)
        elif batch.codes_bytes is not None and remote != batch.codes_bytes:
            exc = FollowerMismatch(
                f"follower {self._sync.address} answered {codes_from_bytes(remote)[:8]} "
                f"where the leader answered {(batch.codes or [])[:8]} for WAL "
                f"{batch.first}..{batch.last}: the App is not deterministic")
            batch.fail(exc)
            self._link_failure(exc)
        else:
            batch.resolve()

    def _resolve_unacked(self, batch: Batch, exc: BaseException) -> None:
        if not batch.pieces:
            return
        if self.config.require_sync or isinstance(exc, FollowerMismatch):
            batch.fail(exc if isinstance(exc, FollowerMismatch) else Timeout(
                f"follower did not acknowledge WAL {batch.first}..{batch.last} ({exc}); "
                "the write is on the leader only (outcome unknown)"))
        else:
            batch.resolve()  # availability first: committed on the leader

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
        self._engine_ident = threading.get_ident()
        poller = zmq.Poller()
        for s in (self._control, self._client, self._data_in):
            poller.register(s, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout = self._housekeeping(now)
                extra = []
                own_ack = bool(self._inflight or self._sync.state in (
                    FollowerState.SYNCING_STATE, FollowerState.SYNCING_LOG)) \
                    and self._take_ack_role()
                if own_ack:
                    extra.append((self._ack_in, zmq.POLLIN))
                    if self._inflight:
                        timeout = min(timeout, max(0.001, self._inflight[0].sent
                                                   + self.config.ack_timeout - now))
                if self._down_call is not None and self._down_req is not None:
                    extra.append((self._down_req, zmq.POLLIN))
                snap = self._snap_out
                if snap is not None and snap.fd >= 0 and not snap.eof and \
                        len(snap.queue) < self.config.window * 2:
                    extra.append((snap.fd, zmq.POLLIN))
                for s, flags in extra:
                    poller.register(s, flags)
                try:
                    events = dict(poller.poll(max(0, int(timeout * 1000))))
                    if own_ack:
                        if self._ack_in in events:
                            self._drain_acks()
                        if self._inflight and time.monotonic() - self._inflight[0].sent > \
                                self.config.ack_timeout:
                            self._link_failure(Timeout(
                                f"follower {self._sync.address} did not acknowledge within "
                                f"{self.config.ack_timeout:g}s"))
                finally:
                    for s, _ in extra:
                        poller.unregister(s)
                    if own_ack:
                        self._release_ack_role(hand_over=False)
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                if self._control in events:
                    self._serve_control()
                if self._client in events:
                    self._serve_clients()
                if self._data_in in events:
                    self._serve_data()
                if self._down_req is not None and self._down_req in events:
                    self._on_down_reply()
                if snap is not None and snap.fd in events:
                    self._read_snapshot_pipe(snap)
                self._send_replies()
        except BaseException as exc:  # never die silently
            self.crashed = exc
            self.log.critical("engine thread crashed: %r", exc, exc_info=True)
        finally:
            self._stopping = True
            self._shutdown()

    def _housekeeping(self, now: float) -> float:
        """Timers and the downstream driver; returns the poll timeout."""
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

    def _serve_control(self) -> None:
        for frames in _ready(self._control, multipart=True):
            if len(frames) < 2:
                self._dropped += 1
                continue
            envelope, payload = frames[:-1], frames[-1]
            stop_after = False
            try:
                op, args = protocol.parse_control_request(payload)
                handler = self._CONTROL.get(op)
                if handler is None:
                    raise ProtocolError(f"unknown control operation {op!r}")
                try:
                    result = handler(self, **args)
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

    def _op_status(self) -> dict:
        return self.status().to_dict()

    def _op_set_role(self, role: Any, leader_id: Any) -> None:
        self.set_role(role, leader_id)

    def _op_set_leader(self, address: Any) -> None:
        self.set_leader(address)

    def _op_set_follower(self, address: Any) -> None:
        self.set_follower(address)

    def _op_stop(self) -> None:
        return None

    def _op_ping(self) -> str:
        return "pong"

    def _op_connect(self, leader_id: Any, address: Any, stream: Any = 0,
                    epoch_history: Any = None) -> dict:
        """Follower side of the handshake."""
        leader_id = self._check_leader_id(leader_id)
        if not isinstance(address, str) or not isinstance(stream, int) or stream < 0:
            raise ProtocolError("connect takes leader_id, address and a stream token")
        if address:
            try:
                up = endpoints(address)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
        with self._app_lock:
            current = self.storage.leader_id()
            if leader_id < current:
                raise StaleLeader(f"connect from {address} with leader_id {leader_id}: this node "
                                  f"obeys {current}", leader_id, current)
            if self.storage.role() == NodeRole.LEADER:
                if leader_id == current:
                    raise StaleLeader(f"{self.address} leads epoch {current} itself", leader_id,
                                      current)
                self.storage.set_leader_id(leader_id)
                self._persist_role(NodeRole.FOLLOWER)
                self._fail_pending(NotLeader(f"{self.address} stepped down", address))
                self.log.warning("deposed by %s (leader_id %d): now FOLLOWER", address, leader_id)
            elif leader_id > current:
                self.storage.set_leader_id(leader_id)  # persist before acting
            self._stream_in = stream
            self._leader_address = address
            self._stream_history = [tuple(x) for x in epoch_history] if epoch_history else None
            self._abort_snapshot_in()
            if address:
                self._connect_ack_out(up.ack)
            info = {"leader_id": self.storage.leader_id(), "max_wal": self.storage.max_wal(),
                    "min_wal": self.storage.min_wal(), "max_applied_wal": self._position,
                    "epoch_history": [list(x) for x in self.storage.epoch_history()]}
        if leader_id != current:
            self._restart_link("epoch changed")  # our own follower must hear of it
        return info

    def _op_max_applied_wal(self) -> int:
        return self._position

    def _check_epoch(self, leader_id: Any) -> int:
        leader_id = self._check_leader_id(leader_id)
        current = self.storage.leader_id()
        if leader_id < current:
            raise StaleLeader(f"leader_id {leader_id} is stale: this node obeys {current}",
                              leader_id, current)
        if leader_id > current:
            raise StaleLeader(f"leader_id {leader_id} is not the one this node obeys "
                              f"({current}); connect first", leader_id, current)
        return leader_id

    def _op_clear_state(self, leader_id: Any) -> None:
        self._check_epoch(leader_id)
        if self.storage.role() == NodeRole.LEADER:
            raise ProtocolError("clear_state refused: this node is the leader")
        with self._app_lock:
            self._clear_local_state()

    def _clear_local_state(self) -> None:
        self.app.clear_state()
        self.storage.clear_wal()
        self._position = 0
        self.storage.set_max_applied_wal(0)

    def _op_apply_state(self, leader_id: Any, datas: Any) -> None:
        self._check_epoch(leader_id)
        datas = self._check_datas(datas)
        with self._app_lock:
            self.app.apply([self.app.decode_cmd(e) for e in entries_from(1, datas)])

    def _op_apply_wal(self, leader_id: Any, first_id: Any, datas: Any) -> list[int]:
        self._check_epoch(leader_id)
        datas = self._check_datas(datas)
        if self.storage.role() == NodeRole.LEADER:
            raise ProtocolError("apply_wal refused: this node is the leader")
        with self._app_lock:
            codes = self._apply_upstream_batch(first_id, datas)
        return codes

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

    _CONTROL: dict[str, Callable[..., Any]] = {
        "status": _op_status, "set_role": _op_set_role, "set_leader": _op_set_leader,
        "set_follower": _op_set_follower, "stop": _op_stop, "ping": _op_ping,
        "connect": _op_connect, "max_applied_wal": _op_max_applied_wal,
        "clear_state": _op_clear_state, "apply_state": _op_apply_state,
        "apply_wal": _op_apply_wal, "dump_state": _op_dump_state,
        "state_digest": _op_state_digest, "checkpoint": _op_checkpoint,
    }

    @staticmethod
    def _check_role(role: Any) -> NodeRole:
        try:
            if isinstance(role, bool):
                raise ValueError
            return NodeRole(role)
        except (ValueError, TypeError):
            raise ProtocolError(f"unknown role {role!r}") from None

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
        for frames in _ready(self._client, multipart=True):
            if len(frames) < 2:
                self._dropped += 1
                continue
            envelope, payload = frames[:-1], frames[-1]
            try:
                request_id, data = protocol.parse_submit(payload)
            except ProtocolError as exc:
                self._replies.append((envelope, protocol.submit_reply(None, None, exc)))
                continue
            try:
                self._check_writable()
            except NotLeader as exc:
                self._replies.append((envelope, protocol.submit_reply(request_id, None, exc)))
                continue
            self._counters["client_requests"] += 1
            sink = CallbackSink(self._client_callback(envelope, request_id))
            self._pending.append(Submission(
                sink, datas=[data], deadline=time.monotonic() + self.config.sync_wait_timeout))
        self._flush_pending()

    def _client_callback(self, envelope: list, request_id: Any
                         ) -> Callable[[int | None, BaseException | None], None]:
        def reply(code: int | None, exc: BaseException | None) -> None:
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

    # --- data from the upstream --------------------------------------------------

    def _serve_data(self) -> None:
        for raw in _ready(self._data_in):
            try:
                msg = protocol.parse_data(raw)
            except ProtocolError as exc:
                self._dropped += 1
                self.log.warning("dropped a bad data frame: %s", exc)
                continue
            kind = msg[1]
            if kind == ACK:
                self._dropped += 1
                continue
            leader_id, stream = msg[2], msg[3]
            if stream == 0 or stream != self._stream_in or leader_id != self.storage.leader_id():
                self._dropped += 1  # not the conversation this node agreed to
                continue
            try:
                if kind == WAL:
                    with self._app_lock:
                        codes = self._apply_upstream_batch(msg[4], msg[5])
                    self._ack_upstream(stream, WAL, msg[4] + len(msg[5]) - 1,
                                       codes_to_bytes(codes))
                elif kind == STATE_BEGIN:
                    self._state_begin(stream, msg[4], msg[5])
                elif kind == STATE:
                    self._state_batch(stream, msg[4], msg[5])
                    self._ack_upstream(stream, STATE, msg[4], b"")
                elif kind == STATE_END:
                    self._state_end(stream, msg[4], msg[5])
                    self._ack_upstream(stream, STATE_END, msg[4], b"")
            except (ReplicationError, ValueError, TypeError) as exc:
                self.log.warning("refused a batch from %s: %s", self._leader_address, exc)
                err = exc if isinstance(exc, ReplicationError) else ProtocolError(str(exc))
                self._ack_upstream(stream, kind if kind != STATE_BEGIN else STATE, 0, b"", err)

    def _apply_upstream_batch(self, first: int, datas: list[bytes]) -> list[int]:
        """Log and apply a batch from the upstream.  App lock held."""
        if not datas:
            raise ProtocolError("empty WAL batch")
        expected = self._position + 1
        if first != expected:
            raise WALGap(f"WAL batch starts at {first}, this node expects {expected}")
        self.storage.write_wal_data(first, datas)
        if self._stream_history is not None:
            if self._stream_history != self.storage.epoch_history():
                self.storage.set_epoch_history(self._stream_history)
            self._stream_history = None
        app = self.app
        codes = app.apply([app.decode_cmd(e) for e in entries_from(first, datas)])
        last = first + len(datas) - 1
        self._position = last
        self.storage.set_max_applied_wal(last)
        self._after_commit()
        return codes

    def _ack_upstream(self, stream: int, kind: int, position: int, codes: bytes,
                      error: BaseException | None = None) -> None:
        msg = protocol.ack_message(stream, kind, position, codes, error)
        with self._up_lock:
            if self._ack_out is None:
                return
            try:
                self._ack_out.send(msg, _NOBLOCK)
            except zmq.ZMQError:
                self._dropped += 1

    def _connect_ack_out(self, endpoint: str) -> None:
        with self._up_lock:
            if self._ack_out is not None and self._ack_out_endpoint == endpoint:
                return
            if self._ack_out is not None:
                self._ack_out.close(linger=0)
            self._ack_out = self._sock(zmq.PUSH, endpoint, bind=False,
                                       options={zmq.SNDHWM: 10_000})
            self._ack_out_endpoint = endpoint

    def _drop_upstream(self) -> None:
        self._stream_in = 0
        self._leader_address = ""
        self._abort_snapshot_in()
        with self._up_lock:
            if self._ack_out is not None:
                self._ack_out.close(linger=0)
                self._ack_out = None
                self._ack_out_endpoint = ""

    # --- receiving a full state sync ------------------------------------------------

    def _state_begin(self, stream: int, wal_id: int, section: dict) -> None:
        history = section.get("epoch_history", [])
        with self._app_lock:
            self._abort_snapshot_in()
            self._clear_local_state()
            snap = _SnapshotIn(wal_id, stream, [tuple(x) for x in history])
            if self._ckpt_dir is not None:
                snap.writer = CheckpointFileWriter(self._ckpt_dir, wal_id)
                snap.writer.write_raw_frame(["header", {"format": 1, "wal_id": wal_id,
                                                        "leader_id": self.storage.leader_id(),
                                                        "created_ns": time.time_ns()}])
                snap.writer.write_raw_frame(["section", "zrepl", section])
                snap.writer.write_raw_frame(["section", "app"])
            self._snap_in = snap
        self._counters["state_syncs_received"] += 1
        self.log.info("receiving a full state sync at WAL id %d", wal_id)

    def _state_batch(self, stream: int, seq: int, datas: list[bytes]) -> None:
        snap = self._snap_in
        if snap is None or snap.stream != stream:
            raise ProtocolError("state batch outside a state sync")
        b"".join(datas)  # every item is bytes (TypeError otherwise)
        with self._app_lock:
            app = self.app
            app.apply([app.decode_cmd(e) for e in entries_from(1, datas)])
            snap.entries += len(datas)
            if snap.writer is not None:
                snap.writer.write_raw_frame(["batch", datas])

    def _state_end(self, stream: int, wal_id: int, count: int) -> None:
        snap = self._snap_in
        if snap is None or snap.stream != stream or snap.wal_id != wal_id:
            raise ProtocolError("state end outside a state sync")
        if count != snap.entries:
            self._abort_snapshot_in()
            raise ProtocolError(f"state sync carried {snap.entries} entries, the leader "
                                f"sent {count}")
        with self._app_lock:
            if snap.writer is not None:
                snap.writer.write_raw_frame(["end", {"entries": count}])
                snap.writer.commit()  # before the history: see docs/replication.md
                snap.writer = None
                self._ckpt_position = wal_id
                self._prune_checkpoints(wal_id)
            self.storage.clear_wal()
            self._position = wal_id
            self.storage.set_max_applied_wal(wal_id)
            if snap.history:
                self.storage.set_epoch_history(snap.history)
            self._stream_history = None
            self._snap_in = None
        self.log.info("state sync complete: %d entries at WAL id %d", count, wal_id)

    def _abort_snapshot_in(self) -> None:
        if self._snap_in is not None and self._snap_in.writer is not None:
            self._snap_in.writer.abort()
        self._snap_in = None

    # ====================================================================
    # driving the downstream link (engine thread)
    # ====================================================================

    def _restart_link(self, why: str) -> None:
        """Tear the link down and start over with the stored follower
        address.  Commits stop going downstream at once; the engine thread
        does the rest."""
        with self._inflight_lock:
            self._synchronous = False
            self._link_restart = why
        if threading.get_ident() == self._engine_ident:
            self._apply_link_restart(time.monotonic())
        else:
            self._poke()

    def _apply_link_restart(self, now: float) -> None:
        why, self._link_restart = self._link_restart, ""
        self.log.info("restarting the follower link: %s", why)
        self._reset_link()
        self._configure_link(now)

    def _configure_link(self, now: float) -> None:
        address = self.storage.follower_address()
        role = self.storage.role()
        if role not in (NodeRole.LEADER, NodeRole.FORWARDER, NodeRole.FOLLOWER):
            address = ""
        self._sync.configure(address, now)

    def _reset_link(self) -> None:
        """Close the downstream sockets and forget the conversation."""
        with self._app_lock:
            with self._inflight_lock:
                exc = self._link_broken or ReplicationError("link reset")
                ready = self._fail_inflight_locked(exc)
                self._synchronous = False
                self._link_broken = None
            for b in ready:
                self._finalize(b)
            if self._data_out is not None:
                self._data_out.close(linger=0)
                self._data_out = None
            self._stream_out = 0
            self._kill_snapshot_out()
        if self._down_req is not None:
            self._down_req.close(linger=0)
            self._down_req = None
        self._down_call = None

    def _handle_link_broken(self, now: float) -> None:
        exc = self._link_broken
        if exc is None:
            return
        self._report_failed(f"follower {self._sync.address}: {exc}")
        self._reset_link()
        # A gap or WAL that is no longer held: re-handshake at once, the
        # plan will say what to do.
        self._sync.failed(exc, now, retry_now=isinstance(exc, (WALTruncated, WALGap)))

    def _drive_downstream(self, now: float) -> float:
        s = self._sync
        if self._down_call is not None:
            if now >= self._down_call.deadline:
                call = self._down_call
                self._down_call = None
                if self._down_req is not None:
                    self._down_req.close(linger=0)  # lazy pirate: a fresh socket next time
                    self._down_req = None
                call.on_err(Timeout(f"follower {s.address} did not answer {call.op} within "
                                    f"{self.config.rpc_timeout:g}s"))
            else:
                return self._down_call.deadline - now
        if s.state == FollowerState.NOT_CONNECTED:
            if s.connect_due(now):
                self._start_handshake(now)
                return self.config.rpc_timeout
            return max(0.001, s.next_attempt - now)
        if s.state == FollowerState.SYNCING_STATE:
            return self._pump_snapshot(now)
        if s.state == FollowerState.SYNCING_LOG:
            return self._pump_catchup(now)
        return 0.2

    def _down_rpc(self, op: str, args: dict, on_ok: Callable[[Any], None],
                  on_err: Callable[[BaseException], None]) -> None:
        if self._down_req is None:
            self._down_req = self._sock(zmq.REQ, endpoints(self._sync.address).control,
                                        bind=False)
        try:
            self._down_req.send(protocol.control_request(op, args), _NOBLOCK)
        except zmq.ZMQError as exc:
            self._down_req.close(linger=0)
            self._down_req = None
            on_err(Timeout(f"cannot send {op} to {self._sync.address}: {exc}"))
            return
        self._down_call = _DownCall(op, time.monotonic() + self.config.rpc_timeout, on_ok, on_err)

    def _on_down_reply(self) -> None:
        call = self._down_call
        assert self._down_req is not None
        try:
            raw = self._down_req.recv(_NOBLOCK)
        except zmq.Again:
            return
        self._down_call = None
        if call is None:
            return
        try:
            result = protocol.parse_control_reply(raw)
        except ReplicationError as exc:
            call.on_err(exc)
            return
        call.on_ok(result)

    def _start_handshake(self, now: float) -> None:
        stream = random.getrandbits(63) or 1
        leader_id = self.storage.leader_id()
        history = [list(x) for x in self.storage.epoch_history()]

        def on_ok(info: Any) -> None:
            try:
                fi = FollowerInfo(int(info["leader_id"]), int(info["max_wal"]),
                                  int(info["min_wal"]), int(info["max_applied_wal"]),
                                  [(int(a), int(b)) for a, b in info["epoch_history"]])
            except (KeyError, TypeError, ValueError) as exc:
                self._sync.failed(ProtocolError(f"bad handshake reply: {exc}"), time.monotonic())
                return
            self._begin_sync(fi, stream)

        def on_err(exc: BaseException) -> None:
            if not isinstance(exc, Timeout):
                self.log.warning("handshake with %s failed: %s", self._sync.address, exc)
            if isinstance(exc, (StaleLeader, ProtocolError)):
                self._report_failed(f"follower {self._sync.address} refused: {exc}")
            self._sync.failed(exc, time.monotonic())

        self._down_rpc("connect", {"leader_id": leader_id, "address": self.address,
                                   "stream": stream, "epoch_history": history}, on_ok, on_err)

    def _begin_sync(self, fi: FollowerInfo, stream: int) -> None:
        with self._app_lock:
            view = UpstreamView(self.storage.epoch_history(), self.storage.min_wal(),
                                self._position)
            plan = plan_sync(view, fi)
            self._sync.connected(plan, fi.position)
            self._acked = fi.position
            self._stream_out = stream
            # IMMEDIATE: a send fails at once while the follower is not
            # connected, instead of queueing for a peer that may be gone.
            self._data_out = self._sock(zmq.PUSH, endpoints(self._sync.address).data, bind=False,
                                        options={zmq.IMMEDIATE: 1,
                                                 zmq.SNDHWM: self.config.window * 4 + 16})
            self._data_out_ready = time.monotonic()
            self._link_broken = None
        self.log.info("follower %s at %d: %s", self._sync.address, fi.position, plan.reason)
        if plan.state == FollowerState.SYNCING_LOG:
            self._counters["log_catchups"] += 1
            self._catchup_pos = plan.start
            self._slot = plan.start
        else:
            self._slot = self._position + 1

            def cleared(_: Any) -> None:
                if self._sync.state == FollowerState.SYNCING_STATE and self._stream_out == stream:
                    self._fork_snapshot(stream)

            def failed(exc: BaseException) -> None:
                self._link_failure(exc)

            self._down_rpc("clear_state", {"leader_id": self.storage.leader_id()}, cleared,
                           failed)

    # --- sending a full state sync -----------------------------------------------

    def _fork_snapshot(self, stream: int) -> None:
        with self._app_lock:
            wal_id = self._position
            section = {"epoch_history": [list(x) for x in self.storage.epoch_history()]}
            pid, fd = fork_snapshot_to_pipe(self.app, wal_id, self.storage.leader_id(), section,
                                            self.config.snapshot_batch_entries)
            self._slot = wal_id + 1
        snap = _SnapshotOut(wal_id, stream, pid, fd)
        self._snap_out = snap
        self._counters["state_syncs_sent"] += 1
        msg = protocol.packb([protocol.PROTOCOL_VERSION, STATE_BEGIN, self.storage.leader_id(),
                              stream, wal_id, section])
        snap.queue.append((0, msg))
        self.log.info("full state sync to %s at WAL id %d (child pid %d)", self._sync.address,
                      wal_id, pid)

    def _read_snapshot_pipe(self, snap: _SnapshotOut) -> None:
        try:
            chunk = os.read(snap.fd, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            snap.eof = True
            return
        snap.reader.feed(chunk)
        leader_id = self.storage.leader_id()
        for obj in snap.reader.frames():
            if obj[0] == "batch":
                snap.seq += 1
                snap.entries += len(obj[1])
                snap.queue.append((snap.seq, protocol.packb([
                    protocol.PROTOCOL_VERSION, STATE, leader_id, snap.stream, snap.seq, obj[1]])))
            elif obj[0] == "end":
                snap.child_count = obj[1].get("entries")

    def _pump_snapshot(self, now: float) -> float:
        snap = self._snap_out
        if snap is None:
            return 0.05  # waiting for clear_state's reply
        if snap.done:
            self._finish_snapshot(snap)
            return 0.0
        while snap.queue and snap.sent_seq - snap.acked_seq < self.config.window:
            seq, msg = snap.queue[0]
            if not self._send_data(msg):
                break  # not connected yet, or the queue is full: the timeout below decides
            snap.queue.popleft()
            snap.sent_seq = max(snap.sent_seq, seq)
            snap.last_progress = now
        if snap.eof and snap.pid:
            pid, status = os.waitpid(snap.pid, os.WNOHANG)
            if pid:
                snap.pid = 0
                os.close(snap.fd)
                snap.fd = -1
                if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or \
                        snap.child_count != snap.entries:
                    self._link_failure(ReplicationError(
                        f"snapshot child failed (status {status}, {snap.entries} entries)"))
                    return 0.0
            else:
                return 0.005
        if snap.eof and not snap.pid and not snap.queue and not snap.end_sent and \
                snap.acked_seq == snap.sent_seq == snap.seq:
            if self._send_data(protocol.packb([protocol.PROTOCOL_VERSION, STATE_END,
                                               self.storage.leader_id(), snap.stream,
                                               snap.wal_id, snap.entries])):
                snap.end_sent = True
                snap.last_progress = now
        waiting = snap.end_sent or snap.sent_seq > snap.acked_seq or snap.queue
        if waiting and now - snap.last_progress > self.config.ack_timeout * 4:
            self._link_failure(Timeout(f"follower {self._sync.address} stopped acknowledging "
                                       "the state sync"))
        return 0.001 if snap.queue and snap.sent_seq - snap.acked_seq < self.config.window else 0.05

    def _finish_snapshot(self, snap: _SnapshotOut) -> None:
        self._snap_out = None
        self._sync.snapshot_done(snap.wal_id)
        self._acked = snap.wal_id
        self._catchup_pos = snap.wal_id + 1
        self._slot = snap.wal_id + 1
        self.log.info("state sync to %s done: %d entries at WAL id %d", self._sync.address,
                      snap.entries, snap.wal_id)

    def _send_data(self, msg: bytes) -> bool:
        with self._app_lock:
            if self._data_out is None:
                return False
            try:
                self._data_out.send(msg, _NOBLOCK)
                return True
            except zmq.Again:
                return False

    def _kill_snapshot_out(self) -> None:
        snap = self._snap_out
        self._snap_out = None
        if snap is None:
            return
        if snap.pid:
            try:
                os.kill(snap.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(snap.pid, 0)
        if snap.fd >= 0:
            os.close(snap.fd)

    # --- catching up from the log ----------------------------------------------------

    def _pump_catchup(self, now: float) -> float:
        window = self.config.window
        while len(self._inflight) < window and self._link_broken is None:
            pos = self._catchup_pos
            if pos > self._position:
                with self._app_lock:
                    if self._catchup_pos > self._position and self._link_broken is None:
                        self._sync.caught_up()
                        self._synchronous = True
                        self._slot = 0
                        self.log.info("follower %s is synchronous at WAL id %d",
                                      self._sync.address, self._position)
                        if self._pending:
                            self._commit_pending_locked()
                        return 0.2
                continue
            try:
                datas = self._read_wal_datas(pos, min(self.config.stream_batch_entries,
                                                      self._position - pos + 1))
            except WALTruncated as exc:
                self._link_failure(exc)
                return 0.0
            if not datas:
                return 0.01
            batch = Batch(pos, pos + len(datas) - 1, local_done=True)  # nothing to compare
            with self._inflight_lock:
                self._inflight.append(batch)
            msg = protocol.wal_message(self.storage.leader_id(), self._stream_out, pos, datas)
            if not self._send_data(msg):
                with self._inflight_lock:
                    if self._inflight and self._inflight[-1] is batch:
                        self._inflight.pop()
                if now - self._data_out_ready > self.config.rpc_timeout:
                    self._link_failure(Timeout(f"follower {self._sync.address} data endpoint "
                                               "unreachable"))
                return 0.001
            self._catchup_pos = batch.last + 1
        return 0.05

    def _read_wal_datas(self, start: int, count: int) -> list[bytes]:
        return self.storage.read_wal_data(start, count)

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
                section = {"epoch_history": [list(x) for x in self.storage.epoch_history()]}
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

    def _follower_needs(self) -> int:
        """First WAL id the follower may still ask for (0: none)."""
        s = self._sync
        if not s.address or s.state in (FollowerState.NONE, FollowerState.ERROR):
            return 0
        if s.state == FollowerState.SYNCING_STATE:
            return self._slot
        return self._acked + 1

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
