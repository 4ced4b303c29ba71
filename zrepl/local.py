"""Local clusters: zrepl node and supervisor processes on this machine, all
in one directory (data, configs, logs and ipc:// socket files), removed -
every process with it - on close.  Used by ``zrepl demo`` and the perf
scripts; a deployment runs the same commands under systemd instead."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .core.config import Config
from .core.errors import ReplicationError
from .engine.remote import NodeClient


def free_tcp_base(count: int = 4) -> int:
    """A port P such that P..P+count-1 are free on 127.0.0.1 right now
    (another process may still take one before we bind: fine for local use)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        held = []
        try:
            for port in range(base, base + count):
                t = socket.socket()
                held.append(t)
                t.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def wait_until(cond: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.01) -> Any:
    """``cond()``'s first true value, checked every ``interval`` seconds;
    TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def toml_text(settings: dict[str, Any]) -> str:
    """Flat settings as TOML (JSON's strings, numbers, booleans and lists of
    them are valid TOML values)."""
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())


def pings(address: str, timeout: float = 0.3, config: Config | None = None) -> bool:
    """Does the node at ``address`` answer a ping?  (``config``: an
    operator's key and trust directory, for a secured node.)"""
    try:
        with NodeClient(address, timeout=timeout, config=config) as c:
            return c.ping()
    except ReplicationError:
        return False


class LocalCluster:
    """Processes started by this object, in ``root`` (a new temporary
    directory unless given; removed on close unless ``keep``)."""

    def __init__(self, root: str | Path | None = None, transport: str = "ipc",
                 keep: bool = False, log_level: str = "INFO", new_session: bool = True):
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be ipc or tcp; got {transport!r}")
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix="zrepl-"))
        else:
            self.root = Path(root)
            self.root.mkdir(parents=True, exist_ok=True)
        self.transport = transport
        self.keep = keep
        self.log_level = log_level
        # A session of their own keeps a terminal's Ctrl-C from reaching the
        # nodes before the demo cleans up.  It also puts each in its own
        # scheduler autogroup, which changes how they share the CPU with
        # other processes: benchmarks pass False.
        self.new_session = new_session
        self.procs: dict[str, subprocess.Popen] = {}
        # an operator's key and trust directory, to ask secured nodes (None: unsecured)
        self.operator: Config | None = None
        self._env = dict(os.environ)
        here = str(Path(__file__).resolve().parent.parent)
        self._env["PYTHONPATH"] = os.pathsep.join(
            p for p in (here, os.getcwd(), self._env.get("PYTHONPATH", "")) if p)

    def address(self, name: str) -> str:
        if self.transport == "tcp":
            return f"tcp://127.0.0.1:{free_tcp_base()}"
        return f"ipc://{self.root}/{name}.sock"

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "zrepl", *args],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=self._env, start_new_session=self.new_session)
        self.procs[name] = proc
        return proc

    def start_node(self, name: str, address: str, app: str = "workers.kv:KV",
                   settings: dict[str, Any] | None = None, wait: float = 30.0
                   ) -> subprocess.Popen:
        """``zrepl node`` with data in ROOT/NAME; waits until it answers."""
        cfg = self.root / f"{name}.toml"
        cfg.write_text(toml_text(settings or {}))
        proc = self._spawn(name, ["node", "--app", app, "--data", str(self.root / name),
                                  "--listen", address, "--config", str(cfg),
                                  "--log-level", self.log_level])
        if wait:
            def answers() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"node {name} exited with status {proc.returncode}: "
                                       + self.log_tail(name))
                return pings(address, config=self.operator)
            wait_until(answers, wait, f"node {name} to answer")
        return proc

    def start_supervisor(self, nodes: list[str], settings: dict[str, Any] | None = None,
                         name: str = "supervisor") -> str:
        """``zrepl supervisor`` over ``nodes``; returns its listen address."""
        cfg = self.root / f"{name}.toml"
        cfg.write_text(toml_text({"nodes": nodes, **(settings or {})}))
        listen = self.address(name)
        self._spawn(name, ["supervisor", "--config", str(cfg), "--listen", listen,
                           "--state", str(self.root / f"{name}.state"),
                           "--log-level", self.log_level])
        return listen

    def log_tail(self, name: str, lines: int = 5) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def close(self) -> None:
        """SIGTERM every process (SIGKILL after 10 s), then remove the
        directory unless ``keep``."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
