"""``zrepl node``: run one node (a Replica over a FileStorage) until it is
stopped by a control call, SIGTERM or SIGINT."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import time
import traceback
from typing import Any

from . import sdnotify
from .core.config import Config
from .core.errors import ReplicationError
from .storage.file import FileStorage
from .core.interfaces import App
from .metrics import MetricsServer, open_metrics, parse_listen, render
from .core.protocol import endpoints
from .engine.replica import Replica
from .engine.security import check_exposure


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
    try:
        storage = FileStorage(data, config=config)
    except ReplicationError as exc:
        raise SetupError(str(exc)) from None
    server: MetricsServer | None = None
    try:
        replica = Replica(app, storage, listen, config)
        if metrics:  # bound before the node starts: a taken port is a setup error
            try:
                server = open_metrics(metrics, lambda: render(replica.status()))
            except ValueError as exc:
                raise SetupError(str(exc)) from None
        try:
            replica.start()
        except (ReplicationError, ValueError) as exc:
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
        replica.stop()
        return 1 if replica.crashed else 0
    finally:
        if server is not None:
            server.stop()
        storage.close()
