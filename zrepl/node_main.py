"""``zrepl node``: run one node (a Replica over a FileStorage) until it is
stopped by a control call, SIGTERM or SIGINT."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

import zmq

from . import sdnotify
from .core.config import Config
from .core import protocol
from .core.errors import NotLeader, ProtocolError, ReplicationError, StorageError
from .storage.file import FileStorage
from .core.interfaces import App
from .metrics import (MULTIPROC_ENV, MetricsServer, add_reader_metrics, node_families,
                      open_metrics, parse_listen, reader_queries_counter)
from .core.protocol import endpoints, read_endpoints
from .engine.replica import Replica
from .engine.clients import ask_app, query_reply
from .engine.security import check_exposure, from_config
from .engine.transport import ZmqTransport
from .storage.shared import SharedReader, shared_store_of


class SetupError(Exception):
    """A one-line reason why the node cannot start."""


def _where(exc: BaseException) -> str:
    """' (FILE:LINE)' of the innermost frame of ``exc`` (user code, most
    likely), or of the SyntaxError's own location."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}:{exc.lineno})"
    tb = traceback.extract_tb(exc.__traceback__)
    return f" ({tb[-1].filename}:{tb[-1].lineno})" if tb else ""


def load_app(spec: str) -> App:
    """Import MODULE and instantiate CLASS; a SetupError names what failed
    and where (a broken module or constructor gets one line, not a
    traceback)."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise SetupError(f"--app must be MODULE:CLASS, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SetupError(f"cannot import {module_name}: {exc}") from None
    except Exception as exc:
        raise SetupError(f"cannot import {module_name}: {type(exc).__name__}: "
                         f"{getattr(exc, 'msg', None) or exc}{_where(exc)}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise SetupError(f"{module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, App)):
        raise SetupError(f"{spec} is not a zrepl.App subclass")
    try:
        return cls()
    except Exception as exc:
        raise SetupError(f"{spec}() failed: {type(exc).__name__}: {exc}{_where(exc)}") from None


def raise_fd_limit() -> None:
    """The soft limit on open files up to the hard one: every connection
    holds a descriptor, and the node needs some of its own (WAL segments,
    checkpoints, its clients).  Under systemd, LimitNOFILE sets both."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # (some systems cap it below the hard limit: keep the soft one)


def run_node(app_spec: str, data: str, listen: str, config: Config,
             metrics: str | None = None) -> int:
    """Serve until stopped; exit status 0, or 1 if the engine crashed.

    The main thread only waits: for a signal, for the engine to stop, and to
    tell systemd (when it started us with ``Type=notify``) READY=1 once the
    node serves and WATCHDOG=1 while the engine loop keeps coming round.
    A wedged engine stops the pings and systemd restarts the node.
    ``metrics`` (HOST:PORT) also serves Prometheus metrics there.
    """
    log = logging.getLogger("zrepl.node")
    try:
        endpoints(listen)
        if metrics:
            parse_listen(metrics)
        check_exposure(listen, config)
    except (ValueError, ReplicationError) as exc:
        raise SetupError(str(exc)) from None
    raise_fd_limit()
    app = load_app(app_spec)
    # a directory this run creates goes again if the node cannot start (an
    # address it cannot bind, say): nothing of a node that never ran is kept
    created = not os.path.exists(data)
    try:
        storage = FileStorage(data, config=config)
    except ReplicationError as exc:
        raise SetupError(str(exc)) from None
    started = False
    server: MetricsServer | None = None
    readers: ReaderPool | None = None
    try:
        replica = Replica(app, storage, listen, config)
        if metrics:  # bound before the node starts: a taken port is a setup error
            try:
                server = open_metrics(metrics, lambda: node_families(replica.status()))
            except ValueError as exc:
                raise SetupError(str(exc)) from None
        try:
            replica.start()
        except (ReplicationError, ValueError) as exc:
            raise SetupError(str(exc)) from None
        started = True
        if config.readers:
            try:
                readers = ReaderPool(replica, app_spec, config.readers,
                                     logging.getLevelName(logging.getLogger().level))
                readers.start()
                if server is not None:
                    add_reader_metrics(server.registry, readers.metrics_dir)
            except (SetupError, ReplicationError, ValueError) as exc:
                if readers is not None:
                    shutil.rmtree(readers.metrics_dir, ignore_errors=True)
                replica.stop()
                raise SetupError(str(exc)) from None
        if server is not None:
            server.start()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("[%s] signal %d: stopping", listen, signum, extra={"node": listen})
            replica.request_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        sdnotify.notify(f"READY=1\nSTATUS=serving on {listen}\nMAINPID={os.getpid()}")
        sdnotify.wait_with_watchdog(
            replica.stopped.wait,
            lambda interval: time.monotonic() - replica.loop_alive_at < interval)
        sdnotify.notify("STOPPING=1")
        if readers is not None:
            readers.stop()
        replica.stop()
        return 1 if replica.crashed else 0
    finally:
        if server is not None:
            server.stop()
        try:
            storage.close()
        except StorageError as exc:
            # (a full disk: what the WAL holds is whole, and a restart replays it)
            raise SetupError(f"could not close {data}: {exc}") from None
        if created and not started:
            shutil.rmtree(data, ignore_errors=True)


# --- reader processes (docs/shared.md) ---------------------------------------------------

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux);
    False if the parent is already gone."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # elsewhere the reader's poll notices (below)
    return os.getppid() == parent


def run_reader(app_spec: str, root: str, endpoint: str, parent: int, config: Config) -> int:
    """One reader process: answers queries on its own ``endpoint`` (a
    ROUTER; with the node's key when it has one, admitting client and
    operator keys only) from read snapshots of the shared store in
    ``root``, never touching the node.  What is waiting is answered from
    one snapshot (up to 64 requests); a request whose ``min_wal_id`` that
    snapshot has not reached waits on its own.  Exits when the node goes
    away."""
    log = logging.getLogger("zrepl.reader")
    if not die_with_parent(parent):
        return 0
    app = load_app(app_spec)
    store = shared_store_of(app)
    if store is None:
        raise SetupError(f"{app_spec} keeps no zrepl.SharedStore in .store: no reader can serve it")
    reader = SharedReader(root, wait_timeout=config.read_wait_timeout)
    transport = ZmqTransport(security=from_config(config))
    try:
        sock = transport.reads_frontend(endpoint, config)
    except ReplicationError:
        transport.close()
        raise
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    query, reply = app.query, protocol.submit_reply
    queries = reader_queries_counter()  # (multiprocess mode: the node sums the readers')

    def parse(raw: bytes) -> tuple[Any, bytes, int] | bytes:
        """(request id, request, min_wal_id), or the reply refusing it."""
        try:
            op, fields = protocol.parse_client_request(raw)
        except ProtocolError as exc:
            return reply(None, None, exc)
        if op != "query":
            return reply(fields[0], None, NotLeader(
                "a reader process takes reads only: submit to the node", ""))
        rid, request, leader_only, min_wal_id = fields
        if leader_only:
            return reply(rid, None, ProtocolError(
                "leader_only reads go to the node's client endpoint"))
        return rid, request, min_wal_id

    def ask(txn: Any, db: Any, wal_id: int, rid: Any, request: bytes) -> bytes:
        return query_reply(rid, store.serve_from(txn, db, ask_app, query, request), wal_id, "")

    def serve(batch: list[list[bytes]]) -> None:
        jobs = [parse(frames[-1]) for frames in batch]
        later: set[int] = set()

        def answer_all(txn: Any, db: Any, wal_id: int) -> list[bytes | None]:
            out: list[bytes | None] = []
            for i, job in enumerate(jobs):
                if type(job) is bytes:
                    out.append(job)
                elif job[2] > wal_id:  # type: ignore[index]
                    out.append(None)
                    later.add(i)
                else:
                    out.append(ask(txn, db, wal_id, job[0], job[1]))  # type: ignore[index]
            return out
        try:
            answers = reader.read_at(answer_all)
        except ReplicationError as exc:
            answers = [reply(None, None, exc, reader.wal_id, "")] * len(jobs)
        for i, frames in enumerate(batch):
            if i in later:
                rid, request, min_wal_id = jobs[i]  # type: ignore[misc]
                try:
                    answer, _ = reader.read(lambda txn, db: ask(txn, db, reader.wal_id, rid,
                                                                request), min_wal_id)
                except ReplicationError as exc:
                    answer = reply(rid, None, exc, reader.wal_id, "")
            else:
                answer = answers[i]
            sock.send_multipart([*frames[:-1], answer])
        if queries is not None:
            queries.inc(sum(1 for job in jobs if type(job) is not bytes))

    try:
        while not stopping and os.getppid() == parent:
            if not sock.poll(100):  # (a SIGTERM is seen within 0.1 s)
                continue
            batch = [sock.recv_multipart()]
            while len(batch) < 64:
                try:
                    batch.append(sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            serve(batch)
    except zmq.ZMQError as exc:
        if not stopping:
            log.error("reader %d: %s", os.getpid(), exc)
            return 1
    finally:
        sock.close(linger=0)
        transport.close()
        reader.close()
    return 0


class ReaderPool:
    """The node's reader processes.

    Each reader binds an endpoint of its own (``read_endpoints``) and
    clients spread their reads over them: no read passes through the node
    at all.  A reader that dies is started again on its endpoint (at most
    one restart a second); every reader dies with the node, even by SIGKILL
    (PR_SET_PDEATHSIG, and each polls its parent)."""

    def __init__(self, replica: Replica, app_spec: str, count: int, log_level: str):
        store = replica.applier.store
        if store is None or store.root is None:
            raise SetupError(f"--readers needs an App keeping its state in zrepl.SharedStore "
                             f"(in .store); {app_spec} does not")
        self.replica = replica
        self.app_spec = app_spec
        self.log_level = log_level
        self.root = str(store.root)
        self.endpoints = read_endpoints(replica.address, count)
        # prometheus-client's multiprocess mode: the readers' counters, in
        # the data directory (a SIGKILLed node leaves nothing elsewhere)
        self.metrics_dir = os.path.join(replica.storage.path, "reader-metrics")
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        os.mkdir(self.metrics_dir)
        self.log = logging.getLogger("zrepl.node")
        self.procs: list[Any] = []
        self.restarts = 0
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._run_watch, name="zrepl-readers-watch",
                                       daemon=True)

    def start(self) -> None:
        self.procs = [self._spawn(ep) for ep in self.endpoints]
        self._watch.start()
        self.replica.read_endpoint = ",".join(self.endpoints)
        self.replica.readers_alive = self.alive  # type: ignore[method-assign]
        self.log.info("[%s] %d reader processes answer reads at %s", self.replica.address,
                      len(self.endpoints), ", ".join(self.endpoints),
                      extra={"node": self.replica.address})

    def _spawn(self, endpoint: str) -> Any:
        config = json.dumps(dataclasses.asdict(self.replica.config))
        args = [sys.executable, "-m", "zrepl", "reader", "--app", self.app_spec,
                "--shared", self.root, "--endpoint", endpoint, "--parent", str(os.getpid()),
                "--log-level", self.log_level]
        # (the node's settings - keys, limits - travel on stdin, not in ps)
        proc = subprocess.Popen(args, stdin=subprocess.PIPE,
                                env={**os.environ, MULTIPROC_ENV: self.metrics_dir})
        assert proc.stdin is not None
        proc.stdin.write(config.encode())
        proc.stdin.close()
        return proc

    def alive(self) -> int:
        return sum(1 for p in self.procs if p.poll() is None)

    def _run_watch(self) -> None:
        last_start = 0.0
        while not self._stop.wait(0.2):  # (a poll of child status, not a synchronisation)
            for i, p in enumerate(self.procs):
                if p.poll() is None or self._stop.is_set():
                    continue
                if time.monotonic() - last_start < 1.0:
                    break  # one restart a second: a reader that cannot start must not spin
                self.log.warning("[%s] reader process %d exited with status %s: restarting",
                                 self.replica.address, p.pid, p.returncode,
                                 extra={"node": self.replica.address})
                self.procs[i] = self._spawn(self.endpoints[i])
                self.restarts += 1
                last_start = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._watch.join(5)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except Exception:
                p.kill()
                p.wait()
        for ep in self.endpoints:
            if ep.startswith("ipc://"):
                try:
                    os.unlink(ep[len("ipc://"):])
                except OSError:
                    pass
        self.replica.read_endpoint = ""
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
