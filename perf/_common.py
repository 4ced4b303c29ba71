"""Shared helpers of the perf scripts: processes, ports, percentiles, output.

Every script measures zrepl next to a reference taken in the same run on
the same machine, and reports medians and ratios, never absolute promises.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zrepl.local import free_tcp_base, pings, toml_text, wait_until  # noqa: E402,F401


def tcp_address() -> str:
    return f"tcp://127.0.0.1:{free_tcp_base()}"


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def us(x: float) -> str:
    return f"{x * 1e6:8.1f} µs"


class Workdir:
    """A temporary directory removed on exit, and every process started in
    it killed on exit."""

    def __init__(self, prefix: str = "zrepl-perf-"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[subprocess.Popen] = []

    def start_node(self, name: str, address: str, settings: dict[str, Any] | None = None,
                   app: str = "workers.kv:KV") -> subprocess.Popen:
        cfg = self.path / f"{name}.toml"
        cfg.write_text(toml_text(settings or {}))
        log = open(self.path / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "zrepl", "node", "--app", app, "--data",
             str(self.path / name), "--listen", address, "--config", str(cfg),
             "--log-level", "WARNING"],
            stdout=log, stderr=log, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        log.close()
        self.procs.append(proc)
        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"node {name} exited with {proc.returncode}")
            return pings(address)
        wait_until(answers, 30, f"node {name} to answer")
        return proc

    def start_python(self, code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=30)
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "Workdir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
