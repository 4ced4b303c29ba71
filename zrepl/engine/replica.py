"""Replica: the engine of one node - the core's decisions carried out on
threads, sockets and files.

Theory of operation
-------------------

:class:`~zrepl.core.node.NodeCore` decides everything; the Replica feeds it
events and carries out the effects it returns.  The work is split between
objects that each own their fields:

* :class:`~.applier.Applier` - the App, the WAL and the App lock;
* :class:`~.pipeline.CommitPipeline` - the leader's group commit and the
  reading of acks;
* :class:`~.downstream.DownstreamLink` - the sockets toward the follower,
  the state sync being sent, the catch-up reads;
* :class:`~.upstream.UpstreamLink` - batches from the upstream, acks back,
  the incoming state sync's checkpoint;
* :class:`~.control.ControlServer` and :class:`~.clients.ClientEndpoint` -
  the control and client endpoints;
* :class:`~.checkpointer.Checkpointer` - checkpoint files and WAL
  truncation.

Threads.  The hot path never hands work between threads (in CPython a
wake-up costs ~10 µs and a busy thread holds the GIL for up to 5 ms):
*caller threads* commit their own batches and read their acks (see
``pipeline.py``); *the engine thread* serves the endpoints, runs every
control call, drives the follower link and reads acks whenever nobody else
does.  Control calls made in-process from another thread (``set_role``...)
are handed to the engine thread and waited for.

Locks, always taken in this order: the App lock (the App, WAL writes, the
data path to the follower), the pipeline's ack role (one reader of the ack
endpoint), the core lock (every call into the core: short, no I/O inside),
the upstream's ack-path lock.

Two ways to run.  On a threaded transport (ZeroMQ) ``start()`` starts the
engine thread.  On the in-memory transport the node has no thread: a
deterministic simulation calls :meth:`Replica.step` with the virtual time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import random
import threading
from pathlib import Path
from typing import Any, Callable

import psutil

from ..core import effects as fx
from ..core.config import Config
from ..core.epochs import divergence_point
from ..core.errors import CorruptStorage, NotLeader, ProtocolError, ReplicationError, Timeout
from ..core.interfaces import App, Manager, Node, Storage
from ..core.node import NodeCore
from ..core.protocol import endpoints
from ..core.session import SessionTable, unwrap
from ..core.types import FollowerState, NodeRole, NodeStatus
from ..storage import fsutil
from ..storage.base import check_role
from ..storage.snapshot import datas_per_entry, iter_app_batches, read_checkpoint
from .applier import Applier
from .checkpointer import Checkpointer
from .clients import ClientEndpoint
from .clock import MONOTONIC, Clock
from .control import ControlServer
from .downstream import DownstreamLink
from .pipeline import CommitPipeline
from .progress import Progress
from .sinks import resolve_effect
from .security import from_config
from .transport import NodeEndpoints, Transport, ZmqTransport
from .upstream import UpstreamLink

log = logging.getLogger("zrepl.replica")

# effects that only the engine's thread may carry out
_ENGINE_ONLY = (fx.Persist, fx.ConnectUpstream, fx.ConnectHead, fx.OpenLink, fx.CloseLink, fx.CallFollower,
                fx.StartSnapshot, fx.ClearState, fx.ClearWAL, fx.BeginStateIn, fx.EndStateIn)


class _Log(logging.LoggerAdapter):
    """Prefixes each message with the node's address (readable under any
    handler) and passes it as ``record.node`` (for zrepl.logs' formats)."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {"node": self.extra["address"]}
        return f"[{self.extra['address']}] {msg}", kwargs


def machine_boot_id() -> str:
    """This machine's boot (Linux: a new random id at every boot).  Elsewhere
    a fresh id per process: every restart then counts as a reboot, which
    is only more cautious."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return _PROCESS_BOOT


_PROCESS_BOOT = os.urandom(8).hex()


class ReplicaManager(Manager):
    """The Manager of a Replica: what host code calls to write."""

    def __init__(self, replica: "Replica"):
        self._r = replica

    def apply(self, cmd: Any) -> int:
        return self._r.pipeline.apply_blocking([cmd])[0]

    def apply_many(self, cmds: list) -> list[int]:
        if not isinstance(cmds, list):
            cmds = list(cmds)
        if not cmds:
            return []
        return self._r.pipeline.apply_blocking(cmds)

    def apply_async(self, cmd: Any) -> concurrent.futures.Future:
        return self._r.pipeline.apply_async(cmd)

    def report_failed(self, fmt: str, *args: Any) -> None:
        self._r.report_failed(fmt % args if args else fmt)


class Replica(Node):
    """The replication engine of one node.

    ``Replica(app, storage, address, config)``; ``start()`` restores the
    App from the newest checkpoint plus the WAL after it, binds the
    endpoints and starts serving; ``stop()`` stops (the storage stays open:
    its owner closes it).  ``manager`` is the Manager for host code; the
    ``Node`` methods act locally.  ``transport``, ``clock`` and ``rng``
    default to ZeroMQ, the monotonic clock and fresh randomness; the
    in-memory simulation passes its own.  ``snapshots`` is "fork" (the
    default where fork exists) or "copy".
    """

    def __init__(self, app: App, storage: Storage, address: str,
                 config: Config | None = None, *, transport: Transport | None = None,
                 clock: Clock | None = None, rng: random.Random | None = None,
                 snapshots: str | None = None, boot_id: Callable[[], str] | None = None):
        self.app = app
        self.storage = storage
        self.address = address
        self.config = config or Config()
        self.endpoints = endpoints(address)
        # our own ZeroMQ transport is made by start() (and closed by stop())
        self._own_transport = transport is None
        self.transport: Transport = transport  # type: ignore[assignment]
        self.clock = clock or MONOTONIC
        self.rng = rng or random.Random()
        self.boot_id = boot_id or machine_boot_id
        threaded = transport is None or transport.threaded
        if snapshots is None:
            snapshots = "fork" if hasattr(os, "fork") and threaded else "copy"
        if snapshots not in ("fork", "copy"):
            raise ValueError(f"snapshots must be 'fork' or 'copy', got {snapshots!r}")
        self.snapshot_mode = snapshots
        self.manager = ReplicaManager(self)
        self.log = _Log(log, {"address": address})
        self.applier = Applier(app, storage)
        self.applier.on_broken = self._store_broken  # type: ignore[method-assign]
        self.core_lock = threading.Lock()
        self.core: NodeCore = None  # type: ignore[assignment]  # built by start()
        self.endpoints_bound: NodeEndpoints = None  # type: ignore[assignment]
        self.pipeline = CommitPipeline(self)
        self.downstream = DownstreamLink(self)
        self.upstream = UpstreamLink(self)
        self.control = ControlServer(self)
        self.clients = ClientEndpoint(self)
        self.checkpointer = Checkpointer(self)
        self.failures: collections.deque[str] = collections.deque(maxlen=20)
        self.failure_count = 0
        self._proc = psutil.Process()
        self._handlers: dict[type, Callable[[Any], None]] = {
            fx.Persist: self._persist, fx.Log: self._log_effect,
            fx.Failure: lambda e: self.report_failed(e.text),
            fx.Resolve: resolve_effect,
            fx.FailPending: lambda e: self.pipeline.fail_pending(e.error),
            fx.SendAck: self.upstream.ack_effect,
            fx.SendHeadAck: self.upstream.head_ack_effect,
            fx.ConnectUpstream: lambda e: self.upstream.connect(e.address),
            fx.ConnectHead: lambda e: self.upstream.connect_head(e.address),
            fx.OpenLink: lambda e: self.downstream.open(e.address),
            fx.CloseLink: lambda e: self.downstream.close(),
            fx.CallFollower: self.downstream.call,
            fx.StartSnapshot: self.downstream.start_snapshot,
            fx.ClearState: self._clear_state,
            fx.ClearWAL: self._clear_wal,
            fx.BeginStateIn: self.upstream.begin_state_in,
            fx.EndStateIn: self.upstream.end_state_in,
            fx.ReadsReady: lambda e: self.poke(),
            fx.Wake: lambda e: self.poke(),
        }
        for kind in _ENGINE_ONLY:
            self._handlers[kind] = self._engine_only(self._handlers[kind])
        self._calls: collections.deque = collections.deque()  # in-process Node calls
        self._thread: threading.Thread | None = None
        self.engine_ident = 0
        self._wake_r, self._wake_w = -1, -1
        self._wants_step = False
        self._stopping = False
        self._started = False
        self.stopped = threading.Event()
        self.crashed: BaseException | None = None
        self.loop_alive_at = 0.0  # the clock's time the engine loop last came round
        self.read_endpoint = ""  # where this node's reader processes answer ("" if none)

    # ====================================================================
    # lifecycle
    # ====================================================================

    def start(self) -> "Replica":
        if self._started:
            raise ReplicationError("replica already started")
        self._started = True
        self._open_store()
        with self.applier.lock:
            try:
                self.applier.rebuilding = True
                position, sessions = self._restore()
                self.applier.publish(position)
            finally:
                self.applier.rebuilding = False
        st = self.storage
        self.core = NodeCore(self.address, self.config, role=st.role(), leader_id=st.leader_id(),
                             history=st.epoch_history(), follower=st.follower_address(),
                             position=position, sessions=sessions, rng=self.rng,
                             now=self.clock.now(), boot=self.boot_id())
        self.checkpointer.position = position
        if self._own_transport:
            self.transport = ZmqTransport(security=from_config(self.config))
        try:
            self.endpoints_bound = self.transport.bind(self.endpoints, self.config)
        except BaseException:
            if self._own_transport:
                self.transport.close()
            raise
        if st.address() != self.address:  # (only an address it could bind)
            st.set_address(self.address)
        self.core.running = True
        if self.transport.threaded:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._thread = threading.Thread(target=self._run,
                                            name=f"zrepl-engine {self.address}", daemon=True)
            self._thread.start()
        else:
            self.engine_ident = threading.get_ident()
        self.log.info("serving: role %s, leader_id %d, WAL %d..%d, applied %d%s",
                      st.role().name, st.leader_id(), st.min_wal(), st.max_wal(), position,
                      " (restarted: it writes nothing more in that epoch and waits for the "
                      "supervisor to give it a role)" if self.core.epoch_spent else "")
        return self

    def _open_store(self) -> None:
        """Open the App's SharedStore, if it keeps its state in one that is
        not open yet: in ``shared_dir``, or DATA/shared beside a file
        storage, or in memory (``docs/shared.md``)."""
        store = self.applier.store
        if store is None or store.opened:
            return
        data = getattr(self.storage, "path", None)
        root = self.config.shared_dir or (str(Path(data) / "shared") if data else "")
        if not root:
            store.open_memory()
        else:
            store.open(root, self.config.shared_map_bytes)
            if data:  # where LocalReader finds it (shared_root)
                named = Path(data) / "shared.path"
                if self.config.shared_dir:
                    fsutil.atomic_write(named, (str(Path(root).resolve()) + "\n").encode())
                else:
                    named.unlink(missing_ok=True)
        self._own_store = True

    _own_store = False  # opened by start(), closed by stop()

    readers_alive: Callable[[], int] = staticmethod(lambda: 0)  # set by whoever runs readers

    def request_stop(self) -> None:
        """Stop at the engine's next turn (signal handlers, the stop call)."""
        self._stopping = True
        self.poke()

    def stop(self) -> None:
        """Stop serving: fail waiting callers, end children, close endpoints."""
        if not self._started or self.stopped.is_set():
            return
        self._stopping = True
        if not self.transport.threaded:
            self._shutdown()
            return
        self.poke()
        if self._thread is not None and threading.get_ident() != self.engine_ident:
            self._thread.join(timeout=30)

    def _shutdown(self) -> None:
        """On the engine thread as it exits (or the simulation's, at stop)."""
        if self.stopped.is_set():
            return
        exc = NotLeader(f"node {self.address} stopped", "")
        self.downstream.close()
        with self.applier.lock:
            self.pipeline.fail_pending(exc)
            self.checkpointer.kill()
            with self.core_lock:
                effects = self.core.stop()
        self.run(effects)
        self.clients.fail_reads(exc)
        self.upstream.close()
        for call in self._calls:
            call[2].set_exception(exc)
        self._calls.clear()
        self.clients.send_replies()
        self.endpoints_bound.close()
        if self._own_transport:
            self.transport.close()
        if self._own_store:
            with self.applier.lock:
                self.applier.store.close()
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

    @staticmethod
    def _checkpoint_of_this_history(snap: Any, history: list[tuple[int, int]]) -> bool:
        """Does the checkpoint describe this node's log?  (Frames carry
        checksums; this is the other half of trusting a checkpoint file: the
        epochs it was taken under agree with this node's up to its WAL id.)
        A checkpoint without a history, or a node without one, cannot be
        judged and is taken."""
        try:
            theirs = [(int(a), int(b)) for a, b in snap.zrepl.get("epoch_history") or []]
        except (TypeError, ValueError):
            return False
        if not theirs or not history:
            return True
        return divergence_point(history, theirs, snap.wal_id) is None

    def _restore(self) -> tuple[int, SessionTable]:
        st, cfg = self.storage, self.config
        sessions = SessionTable(cfg.session_window, cfg.max_sessions)
        position = 0
        self.applier.begin_rebuild()
        store = self.checkpointer.store
        for wal_id, path in reversed(store.list() if store is not None else []):
            try:
                snap = read_checkpoint(path)
            except (CorruptStorage, OSError) as exc:
                self.log.warning("skipping unreadable checkpoint %s: %s", path.name, exc)
                continue
            if not self._checkpoint_of_this_history(snap, st.epoch_history()):
                self.log.warning("skipping checkpoint %s: taken under an epoch history that is "
                                 "not this node's", path.name)
                continue
            loading = Progress(self.log, f"loading checkpoint {path.name}", snap.entries,
                               clock=self.clock.now, every=cfg.progress_interval)
            per_entry = datas_per_entry(snap.zrepl)  # 2: a shared store's pairs
            for datas in iter_app_batches(path):
                self.applier.apply_state(datas, per_entry == 2)
                loading.add(len(datas) // per_entry)
            sessions.load_section(snap.zrepl.get("sessions"))
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
            replay = Progress(self.log, f"replaying WAL {start}..{top}", top - start + 1,
                              clock=self.clock.now, every=cfg.progress_interval)
            while start <= top:
                datas = st.read_wal_data(start, cfg.stream_batch_entries)
                if not datas:
                    break
                try:
                    app_datas, batch_sessions = unwrap(datas)
                except ValueError as exc:
                    raise CorruptStorage(f"WAL entries from {start}: {exc} (not a zrepl WAL?)"
                                         ) from None
                codes = self.applier.apply_app_datas(start, app_datas)
                sessions.record_batch(start, codes, batch_sessions)
                start += len(datas)
                replay.add(len(datas))
            position = start - 1
            self.log.info("replayed %d WAL entries up to %d", replay.done, position)
        st.set_max_applied_wal(position)
        return position, sessions

    # ====================================================================
    # effects
    # ====================================================================

    def run(self, effects: list) -> None:
        """Carry out the core's effects, in order (on the commit path too:
        kept to one lookup per effect)."""
        handlers = self._handlers
        for e in effects:
            handlers[type(e)](e)

    def _engine_only(self, handler: Callable[[Any], None]) -> Callable[[Any], None]:
        """Effects on what the engine's thread owns (sockets of the links,
        metadata, the App's wholesale changes): a bug anywhere else."""
        def checked(e: Any) -> None:
            if threading.get_ident() != self.engine_ident:
                raise RuntimeError(f"{type(e).__name__} outside the engine's thread")
            handler(e)
        return checked

    def _persist(self, e: fx.Persist) -> None:
        """Durable before anything acts on it.  A node that cannot persist
        its epoch must not go on (it could forget it): it stops."""
        st = self.storage
        try:
            if e.leader_id is not None:
                st.set_leader_id(e.leader_id)
            if e.history is not None:
                st.set_epoch_history(e.history)
            if e.role is not None:
                st.set_role(e.role)
            if e.follower is not None:
                st.set_follower_address(e.follower)
        except BaseException as exc:
            self.log.critical("cannot persist metadata (%s): stopping", exc)
            self.crashed = exc
            self.request_stop()
            raise

    def _store_broken(self, exc: BaseException) -> None:
        """The App's shared store could not take a batch: this node's state
        would have a hole, so it stops (readers keep the last whole state)."""
        if self.crashed is None:
            self.log.critical("%s: stopping (the WAL holds every entry: a restart rebuilds the "
                              "store once there is room)", exc)
            self.crashed = exc
            self.report_failed(str(exc))
        self.request_stop()

    def _log_effect(self, e: fx.Log) -> None:
        self.log.log(e.level, "%s", e.text)

    def _clear_state(self, e: fx.ClearState) -> None:
        self.applier.clear()
        self.checkpointer.forget()

    def _clear_wal(self, e: fx.ClearWAL) -> None:
        self.storage.clear_wal()
        self.storage.set_max_applied_wal(self.core.position)

    def report_failed(self, message: str) -> None:
        self.failure_count += 1
        self.failures.append(message)
        self.log.error("replication failure: %s", message)

    # ====================================================================
    # Node interface (local)
    # ====================================================================

    def _on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the engine's thread (control calls change what the
        engine thread owns) and return its result."""
        if not self._started or self.stopped.is_set() or \
                threading.get_ident() == self.engine_ident or self._thread is None:
            return fn(*args)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.append((fn, args, fut))
        self.poke()
        try:
            return fut.result(timeout=max(30.0, self.config.rpc_timeout))
        except concurrent.futures.TimeoutError:
            raise Timeout(f"{self.address}: the engine did not take the call within 30s") \
                from None

    def status(self) -> NodeStatus:
        st = self.storage
        try:
            with self._proc.oneshot():
                rss = self._proc.memory_info().rss
                cpu = self._proc.cpu_percent(None)
        except psutil.Error:
            rss, cpu = 0, 0.0
        with self.core_lock:
            fields = self.core.status_fields(self.clock.now())
        extra = fields.pop("extra")
        bound = self.endpoints_bound
        if bound is not None:  # (data and acks from keys not a node's: dropped)
            extra["denied_calls"] += bound.data.denied + bound.ack.denied
        extra["connections_refused"] = self.transport.refused_connections()
        extra["checkpoint_error"] = self.checkpointer.last_error
        extra["read_endpoint"] = self.read_endpoint
        extra["readers"] = self.readers_alive()
        extra.update({"failures": self.failure_count,
                      "last_failure": self.failures[-1] if self.failures else "",
                      "pending": len(self.pipeline.pending),
                      "wal_broken": getattr(st, "wal_broken", "")})
        return NodeStatus(address=self.address, max_wal=st.max_wal(), min_wal=st.min_wal(),
                          pid=os.getpid(), rss_bytes=rss, cpu_percent=cpu, extra=extra, **fields)

    def set_role(self, role: NodeRole, leader_id: int) -> None:
        role = check_role(role, ProtocolError)
        self._on_engine(self._core_call, "set_role", role, leader_id)

    def _core_call(self, name: str, *args: Any) -> None:
        """The core's ``name(*args, now)`` - a change of role - under the App
        lock and the core lock, then its effects (on the engine thread)."""
        with self.applier.lock:
            with self.core_lock:
                effects = getattr(self.core, name)(*args, self.clock.now())
            self.run(effects)

    def step_down(self, leader_id: int, successor: str) -> None:
        """A planned switchover (see NodeCore.step_down)."""
        successor = self._check_peer(successor, "step_down")
        self._on_engine(self._core_call, "step_down", leader_id, successor)


    def set_leader(self, address: str) -> None:
        address = self._check_peer(address, "set_leader")
        with self.core_lock:
            self.core.set_leader(address)

    def set_follower(self, address: str) -> None:
        address = self._check_peer(address, "set_follower")
        self._on_engine(self._set_follower, address)

    def _set_follower(self, address: str) -> None:
        with self.core_lock:
            effects = self.core.set_follower(address, self.clock.now())
        self.run(effects)

    def renew_lease(self, leader_id: int, lease: float, start: float | None = None) -> None:
        """Let this leader accept writes for ``lease`` seconds from ``start``
        (default: now)."""
        with self.core_lock:
            self.core.renew_lease(leader_id, lease, self.clock.now() if start is None else start)

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

    # ====================================================================
    # the engine's turn
    # ====================================================================

    def poke(self) -> None:
        """Wake the engine: something is due."""
        self._wants_step = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    def _run_calls(self) -> None:
        while self._calls:
            fn, args, fut = self._calls.popleft()
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the caller gets it
                fut.set_exception(exc)

    def _housekeeping(self, now: float) -> float:
        """Timers and the link drivers; returns the seconds until the next
        timer."""
        self.loop_alive_at = now  # read by the systemd watchdog (runs >= 5x/s)
        self._run_calls()
        with self.core_lock:
            effects, timeout = self.core.tick(now)
        if effects:
            self.run(effects)
        timeout = min(timeout, self.downstream.pump(now))
        if self.clients.reads:
            timeout = min(timeout, self.clients.answer_reads(now))
        if self.pipeline.pending:
            # submissions left queued while this thread held the App lock
            # (apply_async pokes it), or waiting for a synchronous follower
            # (or their deadline)
            self.pipeline.flush()
            if self.config.require_sync:
                timeout = min(timeout, 0.05)
        timeout = min(timeout, self.checkpointer.tick(now), 0.2)  # the watchdog wants 5 turns/s
        return max(timeout, 0.0)

    def step(self, now: float | None = None) -> float:
        """One turn of the engine without blocking (the in-memory
        simulation's way to run a node): every message waiting is handled,
        timers that are due fire.  Returns the seconds until the node wants
        its next turn (0: at once)."""
        if self.stopped.is_set():
            return float("inf")
        self.engine_ident = threading.get_ident()
        self._wants_step = False
        now = self.clock.now() if now is None else now
        ep = self.endpoints_bound
        timeout = self._housekeeping(now)
        again = self.control.serve() > 0  # a call may have changed what is due
        if self._stopping:
            self._shutdown()
            return float("inf")
        self.clients.serve()
        if not self.core.window_full():
            self.upstream.serve()
        self.pipeline.drain_acks()
        if self.downstream.rpc is not None and self.downstream.call_token:
            again |= self.downstream.on_reply()
        with self.core_lock:  # after the acks waiting were read
            effects = self.core.check_acks(now)
        if effects:
            self.run(effects)
        deadline = self.core.ack_deadline()
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - now))
        self.clients.send_replies()
        busy = again or ep.control.pending() or ep.client.pending() or ep.ack.pending() or \
            (ep.data.pending() and not self.core.window_full())
        return 0.0 if busy or self._wants_step else timeout

    def _run(self) -> None:
        """The engine loop.  Kept lean: it runs once or twice per batch on a
        follower or forwarder.  The housekeeping (timers, the link drivers)
        runs when it is due, when poked, or while the follower link is
        streaming."""
        self.engine_ident = threading.get_ident()
        poller = self.transport.poller()
        ep = self.endpoints_bound
        core = self.core
        clock = self.clock
        pipeline = self.pipeline
        cfg = self.config
        hk_due = 0.0
        streaming_states = (FollowerState.SYNCING_STATE, FollowerState.SYNCING_LOG)
        link = core.link
        machine = link.machine
        downstream = self.downstream
        try:
            while not self._stopping:
                now = clock.now()
                streaming = machine.state in streaming_states
                if now >= hk_due or streaming:
                    timeout = self._housekeeping(now)
                    hk_due = now + timeout
                else:
                    timeout = hk_due - now
                # Only a leader's callers read acks; elsewhere the engine always
                # may, so its ack endpoint stays registered.
                inflight = core.awaiting_acks()
                own_ack = bool(core.role != NodeRole.LEADER or inflight or streaming) \
                    and pipeline.take_ack_role()
                if own_ack and inflight:
                    deadline = core.ack_deadline()
                    if deadline is not None:
                        timeout = min(timeout, max(0.001, deadline - now))
                items: list = [ep.control, self._wake_r]
                if not core.window_full():
                    items.append(ep.data)  # else the upstream waits (backpressure)
                if len(pipeline.pending) < cfg.max_pending:
                    items.append(ep.client)  # else the transport holds clients back
                if own_ack:
                    items.append(ep.ack)
                rpc = downstream.rpc if downstream.call_token else None
                if rpc is not None:
                    items.append(rpc)
                fd = downstream.fileno() if downstream.source is not None else -1
                if fd >= 0:
                    items.append(fd)
                try:
                    polled_at = clock.now()
                    ready = poller.poll(items, timeout)
                    if ep.control not in ready:
                        self.control.empty_at = polled_at
                    if own_ack:
                        if ep.ack in ready:
                            pipeline.drain_acks()
                        if core.awaiting_acks():
                            with self.core_lock:
                                effects = core.check_acks(clock.now())
                            if effects:
                                self.run(effects)
                finally:
                    if own_ack:
                        pipeline.release_ack_role(hand_over=False)
                if not ready:
                    continue
                if self._wake_r in ready:
                    hk_due = 0.0  # whoever poked wants the housekeeping to look
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                if ep.control in ready:
                    self.control.serve()
                    hk_due = 0.0  # a control call may have changed what is due
                if ep.client in ready:
                    self.clients.serve()
                if ep.data in ready:
                    self.upstream.serve()
                if rpc is not None and rpc in ready:
                    self.downstream.on_reply()
                    hk_due = 0.0
                if fd >= 0 and fd in ready:
                    hk_due = 0.0  # the state sync's source has more
                if self.clients.replies:
                    self.clients.send_replies()
        except BaseException as exc:  # never die silently
            self.crashed = exc
            self.log.critical("engine thread crashed: %r", exc, exc_info=True)
        finally:
            self._stopping = True
            self._shutdown()

