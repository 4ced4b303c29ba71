"""Shared helpers of the perf scripts: processes, ports, percentiles, output.

Every script measures zrepl next to a reference taken in the same run on
the same machine, and reports medians and ratios, never absolute promises.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zrepl import Config, FollowerState, NodeClient, NodeRole  # noqa: E402
from zrepl.engine.security import keygen  # noqa: E402
from zrepl.local import LocalCluster, free_tcp_base, wait_until  # noqa: E402,F401


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """A SIGTERM (``kill``, ``timeout``, ``perf/regress.py`` giving up)
    runs the script's ``finally`` blocks, so its nodes and temporary
    directory go with it instead of outliving it."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_term)


def tcp_address() -> str:
    return f"tcp://127.0.0.1:{free_tcp_base()}"


def bare_round_trips(sock: Any, n: int, payload: bytes) -> list[float]:
    """``n`` REQ/REP round trips of ``payload`` on ``sock`` (to an echo), in
    seconds: the bare ZeroMQ reference the scripts compare against."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        sock.send(payload)
        sock.recv()
        out.append(time.perf_counter() - t)
    return out


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def us(x: float) -> str:
    return f"{x * 1e6:8.1f} µs"


class Workdir(LocalCluster):
    """A LocalCluster in a new temporary directory (``path``), nodes logging
    warnings only, plus other processes (``extra``) killed on close."""

    def __init__(self, prefix: str = "zrepl-perf-"):
        exit_cleanly_on_sigterm()
        # Same session as the script: the nodes share the CPU with the
        # reference processes and the clients on equal terms.
        super().__init__(tempfile.mkdtemp(prefix=prefix), log_level="WARNING",
                         new_session=False)
        self.path = self.root
        self.extra: list[subprocess.Popen] = []

    def start_node(self, name: str, address: str,  # type: ignore[override]
                   settings: dict[str, Any] | None = None,
                   app: str = "workers.kv:KV") -> subprocess.Popen:
        return super().start_node(name, address, app, settings)

    def start_chain(self, names: list[str], settings: dict[str, Any] | None = None
                    ) -> list[str]:
        """One node per name on tcp loopback: the first leads epoch 1, the
        others follow it in order (forwarders, then a follower).  Returns
        their addresses once every link is synchronous."""
        addrs = [tcp_address() for _ in names]
        for name, a in zip(names, addrs):
            self.start_node(name, a, settings)
        clients = [NodeClient(a) for a in addrs]
        try:
            for i, c in enumerate(clients[1:], 1):
                c.set_role(NodeRole.FORWARDER if i < len(names) - 1 else NodeRole.FOLLOWER, 1)
            clients[0].set_role(NodeRole.LEADER, 1)
            for up, down, c_up, c_down in zip(addrs, addrs[1:], clients, clients[1:]):
                c_up.set_follower(down)
                c_down.set_leader(up)
            for c in clients[:-1]:
                wait_until(lambda: c.status().follower_state == FollowerState.SYNCHRONOUS, 30,
                           "a synchronous chain")
        finally:
            for c in clients:
                c.close()
        return addrs

    def spawn_scripts(self, code: str, argvs: list[list[str]]) -> list[subprocess.Popen]:
        """``python3 -c CODE ARGV...`` once per argv, all at once (stdout
        piped; killed on close if still running)."""
        procs = [subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE,
                                  cwd=ROOT, text=True) for argv in argvs]
        self.extra.extend(procs)
        return procs

    @staticmethod
    def collect_json(procs: list[subprocess.Popen], timeout: float, what: str) -> list[Any]:
        """Each process's stdout as JSON, once it exited 0 (RuntimeError
        naming ``what`` otherwise)."""
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"{what} failed with status {p.returncode}")
            results.append(json.loads(out))
        return results

    def start_python(self, code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.extra.append(proc)
        return proc

    def close(self) -> None:
        for p in self.extra:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        super().close()


ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.REP)
s.bind(sys.argv[1] if len(sys.argv) > 1 else %r)
while True:
    m = s.recv()
    if m == b"quit":
        s.send(b"bye")
        break
    s.send(m)
"""


RELAY_SERVER = """
import sys, zmq
ctx = zmq.Context()
front = ctx.socket(zmq.ROUTER)
front.bind(%r)
back = ctx.socket(zmq.DEALER)
back.connect(%r)
poller = zmq.Poller()
poller.register(front, zmq.POLLIN)
poller.register(back, zmq.POLLIN)
while True:  # a Python loop on purpose: the cost of one do-nothing Python hop
    for sock, _ in poller.poll():
        frames = sock.recv_multipart()
        (back if sock is front else front).send_multipart(frames)
"""


# The same relay with no Python on the path: libzmq's own proxy loop, which
# runs in C.  Its cost per hop is what any relaying node pays on this
# machine before it does any work of its own.
RELAY_C_SERVER = """
import zmq
ctx = zmq.Context()
front = ctx.socket(zmq.ROUTER)
front.bind(%r)
back = ctx.socket(zmq.DEALER)
back.connect(%r)
zmq.proxy(front, back)
"""


def process_stats(pids: list[int]) -> dict[int, dict[str, float]]:
    out = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                t = p.cpu_times()
                out[pid] = {"rss_mib": p.memory_info().rss / 2**20,
                            "cpu_s": t.user + t.system}
        except psutil.Error:
            pass
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def keys_for(w: "Workdir", tag: str, addresses: dict[str, str]) -> tuple[dict, Config]:
    """Keys for the given nodes and for this script as an operator: the
    settings each node needs, by name, and the operator's Config."""
    trust = w.path / f"trust-{tag}"
    for name, a in addresses.items():
        keygen(trust, name, "node", a)
    keygen(trust, "ops", "operator")
    settings = {name: {"key": str(trust / f"{name}.key_secret"), "trust": str(trust)}
                for name in [*addresses, "ops"]}
    return settings, Config(**settings["ops"])
