"""systemd integration: the unit files verify, and nodes and the supervisor
speak the notify protocol (READY=1, WATCHDOG=1, STOPPING=1) on a socket the
test binds, as systemd would with Type=notify and WatchdogSec."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zrepl import Client, NodeClient, NodeRole, ReplicationError, sdnotify

from .helpers import reap, stop_process
from .helpers.cluster import ROOT, Cluster, kv_set

UNITS = ROOT / "systemd"


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def _next(self, deadline: float) -> list[str] | None:
        """The next datagram's lines, or None at the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        self.sock.settimeout(left)
        try:
            msg = self.sock.recv(4096).decode()
        except socket.timeout:
            return None
        self.messages.append(msg)
        return msg.split("\n")

    def wait_for(self, state: str, timeout: float = 20.0) -> None:
        """Receive until a datagram holds ``state``."""
        deadline = time.monotonic() + timeout
        while (lines := self._next(deadline)) is None or state not in lines:
            assert lines is not None, f"no {state!r} within {timeout}s; got {self.messages}"

    def count_for(self, state: str, seconds: float) -> int:
        """How many datagrams holding ``state`` arrive within ``seconds``."""
        n = 0
        deadline = time.monotonic() + seconds
        while (lines := self._next(deadline)) is not None:
            n += state in lines
        return n

    def close(self) -> None:
        self.sock.close()


def notify_env(path: Path, watchdog_usec: int = 200_000) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=str(path),
               WATCHDOG_USEC=str(watchdog_usec))
    env.pop("WATCHDOG_PID", None)
    return env


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_units_verify_cleanly(tmp_path):
    # The units run the venv of the install steps (/opt/zrepl), which this
    # machine need not have: verify copies that run this Python instead.
    units = []
    for p in sorted(UNITS.glob("*.service")):
        copy = tmp_path / p.name
        copy.write_text(p.read_text().replace("/opt/zrepl/bin/python3", sys.executable))
        units.append(str(copy))
    assert len(units) == 2
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values too: they are warnings,
    # so any line naming one of our files is a failure.
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if "zrepl" in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_units_have_the_promised_settings():
    node = (UNITS / "zrepl-node@.service").read_text()
    sup = (UNITS / "zrepl-supervisor.service").read_text()
    for text in (node, sup):
        for line in ("Type=notify", "Restart=on-failure", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "User=zrepl"):
            assert f"\n{line}\n" in text, line
        assert "WatchdogSec=" in text and "-m zrepl" in text
    assert "ReadWritePaths=/var/lib/zrepl/%i" in node and "--data /var/lib/zrepl/%i" in node
    assert "ReadWritePaths=/var/lib/zrepl/supervisor" in sup
    for text in (node, sup):  # issue 12's hardening
        for line in ("SystemCallFilter=@system-service", "ProtectProc=invisible",
                     "PrivateUsers=yes", "RemoveIPC=yes", "UMask=0077", "LimitNOFILE=65536",
                     "ExecStart=/opt/zrepl/bin/python3 -m zrepl"):
            assert line in text, line


def test_notify_without_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 2.0


def test_notify_abstract_socket(monkeypatch):
    name = f"zrepl-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert s.recv(100) == b"READY=1"


def _popen(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "zrepl", *args], env=env, cwd=ROOT,
                                stdout=out, stderr=out)


def _stop(proc: subprocess.Popen) -> int:
    try:
        return stop_process(proc)
    finally:
        reap(proc)


def test_node_sends_ready_watchdog_and_stopping(data_dir):
    sock = NotifySocket(data_dir / "notify")
    address = f"ipc://{data_dir}/n.sock"
    proc = _popen(["node", "--app", "tests.helpers.apps:WedgingKV", "--data",
                   str(data_dir / "d"), "--listen", address, "--fsync", "off"],
                  notify_env(sock.path), data_dir / "n.log")
    try:
        sock.wait_for("READY=1")
        # READY means serving: the node answers at once.
        with NodeClient(address, timeout=2.0) as c:
            assert c.ping()
            c.set_role(NodeRole.LEADER, 1)
        # WatchdogSec=0.2 s: pings every 0.1 s while the engine loop runs.
        assert sock.count_for("WATCHDOG=1", 1.0) >= 4
        # An App stuck in apply wedges the engine loop: the pings stop, so
        # systemd would restart the node, though its main thread is alive.
        release = data_dir / "release"
        with Client([address], timeout=0.3, retry_for=0) as client:
            with pytest.raises(ReplicationError):
                client.apply(kv_set("wedge", str(release)))
        sock.count_for("WATCHDOG=1", 0.3)  # pings already on their way
        assert sock.count_for("WATCHDOG=1", 1.0) == 0, sock.messages[-5:]
        assert proc.poll() is None
        release.touch()
        sock.wait_for("WATCHDOG=1")  # the loop came back: so do the pings
        assert _stop(proc) == 0
        sock.wait_for("STOPPING=1")
    finally:
        _stop(proc)
        sock.close()


def test_supervisor_sends_ready_and_watchdog(data_dir):
    sock = NotifySocket(data_dir / "notify")
    with Cluster(fsync="off") as cluster:
        a = cluster.node("a").start()
        proc = _popen(["supervisor", "--node", a.address, "--state", str(data_dir / "st.json"),
                       "--log-level", "INFO"],
                      notify_env(sock.path, watchdog_usec=400_000), data_dir / "s.log")
        try:
            sock.wait_for("READY=1")
            assert sock.count_for("WATCHDOG=1", 1.0) >= 3
            assert _stop(proc) == 0
            sock.wait_for("STOPPING=1")
        finally:
            _stop(proc)
            sock.close()
