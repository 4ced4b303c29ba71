"""Real node processes for the integration tests.

Each node is ``python3 -m zrepl node`` in its own process, with its data
directory and an ipc:// address inside one temporary directory that the
cluster removes at the end (so no socket file is left behind).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgpack

from zrepl import Client, Config, NodeClient, NodeRole, ReplicationError
from zrepl.engine.remote import supervisor_view
from zrepl.core.types import FollowerState
from zrepl.engine.security import keygen

from . import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent

DEFAULT_SETTINGS = {
    "fsync": "batch",
    "segment_bytes": 64 * 1024,
    "checkpoint_entries": 0,
    "checkpoint_interval": 0,
}


def kv_set(key: str, value: Any) -> bytes:
    return msgpack.packb(("set", key, value), use_bin_type=True)


def kv_incr(key: str, n: int = 1) -> bytes:
    return msgpack.packb(("incr", key, n), use_bin_type=True)


def tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a log file ("" if there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class NodeProc:
    def __init__(self, cluster: "Cluster", name: str, settings: dict[str, Any],
                 app: str = "workers.kv:KV"):
        self.cluster = cluster
        self.name = name
        self.app = app
        self.data = cluster.root / name
        self.address = f"ipc://{cluster.root}/{name}.sock"
        self.config_path = cluster.root / f"{name}.toml"
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.log_path = cluster.root / f"{name}.log"
        self._client: NodeClient | None = None

    def write_config(self) -> None:
        lines = [f"{k} = {json.dumps(v)}" for k, v in self.settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, wait: bool = True) -> "NodeProc":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.write_config()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zrepl", "node", "--app", self.app,
             "--data", str(self.data), "--listen", self.address,
             "--config", str(self.config_path)],
            stdout=log, stderr=log, env=env, cwd=ROOT)
        log.close()
        if wait:
            wait_for(self._answers, timeout=20, what=f"node {self.name} to answer")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node {self.name} exited with {self.proc.returncode}:\n"
                                 + self.log_tail())
        try:
            return self.client.ping(timeout=0.2)
        except ReplicationError:
            return False

    @property
    def client(self) -> NodeClient:
        if self._client is None:
            self._client = NodeClient(self.address, timeout=5.0, config=self.cluster.operator)
        return self._client

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Graceful stop through the control endpoint."""
        if self.proc is not None and self.proc.poll() is None:
            self.client.stop()
            self.proc.wait(timeout=30)

    def status(self):
        return self.client.status()

    def state(self) -> dict:
        out = {}
        for data in self.client.dump_state():
            op, key, value = msgpack.unpackb(data, raw=False)
            out[key] = value
        return out

    def digest(self) -> dict:
        return self.client.state_digest()

    def log_tail(self, n: int = 40) -> str:
        return tail(self.log_path, n)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._client is not None:
            self._client.close()
            self._client = None


class SupervisorProc:
    """``python3 -m zrepl supervisor`` over some nodes of a cluster."""

    def __init__(self, cluster: "Cluster", nodes: list[NodeProc], settings: dict[str, Any]):
        self.cluster = cluster
        self.nodes = nodes
        self.settings = settings
        self.state = cluster.root / "supervisor.state"
        self.config_path = cluster.root / "supervisor.toml"
        self.log_path = cluster.root / "supervisor.log"
        self.address = f"ipc://{cluster.root}/supervisor.sock"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SupervisorProc":
        lines = [f"{k} = {json.dumps(v)}" for k, v in self.settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        args = [sys.executable, "-m", "zrepl", "supervisor", "--state", str(self.state),
                "--config", str(self.config_path), "--listen", self.address]
        for n in self.nodes:
            args += ["--node", n.address]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        log.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def view(self) -> dict | None:
        """The supervisor's own status (None while it does not answer)."""
        return supervisor_view(self.address, config=self.cluster.operator)

    def wait_synchronous(self, n_followers: int, timeout: float = 30) -> dict:
        """Until the supervisor has seen a synchronous chain this long (and
        so knows whom it could promote)."""
        return wait_for(lambda: (v := self.view()) and len(v["synchronous_chain"]) >= n_followers
                        and v, timeout, "the supervisor to see the synchronous chain")

    def log_tail(self, n: int = 30) -> str:
        return tail(self.log_path, n)

    def close(self) -> None:
        self.kill()


class Cluster:
    """``secure``: the names of the nodes to come; every member then gets a
    CURVE key (README, "Security"): the nodes, the supervisor, the test as
    an operator (``operator``) and as a client."""

    def __init__(self, secure: list[str] | None = None, **settings: Any):
        self.root = Path(tempfile.mkdtemp(prefix="zr-"))
        self.settings = {**DEFAULT_SETTINGS, **settings}
        self.nodes: dict[str, NodeProc] = {}
        self.supervisors: list[SupervisorProc] = []
        self._clients: list[Client] = []
        self.operator: Config | None = None
        self.keys: dict[str, dict[str, str]] = {}  # member -> its key and trust settings
        if secure is not None:
            trust = self.root / "trust"
            for name in secure:
                keygen(trust, name, "node", f"ipc://{self.root}/{name}.sock")
            keygen(trust, "supervisor", "supervisor", f"ipc://{self.root}/supervisor.sock")
            keygen(trust, "ops", "operator")
            keygen(trust, "app", "client")
            self.keys = {m: {"key": str(trust / f"{m}.key_secret"), "trust": str(trust)}
                         for m in [*secure, "supervisor", "ops", "app"]}
            self.operator = Config(**self.keys["ops"])

    def node(self, name: str, app: str = "workers.kv:KV", **settings: Any) -> NodeProc:
        n = NodeProc(self, name, {**self.settings, **self.keys.get(name, {}), **settings}, app)
        self.nodes[name] = n
        return n

    def client(self, *nodes: NodeProc, timeout: float = 5.0, retry_for: float = 3.0) -> Client:
        config = Config(**self.keys["app"]) if self.keys else None
        c = Client([n.address for n in nodes], timeout=timeout, retry_for=retry_for,
                   config=config)
        self._clients.append(c)
        return c

    def leader_with_follower(self, leader: NodeProc, follower: NodeProc, leader_id: int = 1
                             ) -> None:
        follower.client.set_role(NodeRole.FOLLOWER, leader_id)
        leader.client.set_role(NodeRole.LEADER, leader_id)
        leader.client.set_follower(follower.address)
        follower.client.set_leader(leader.address)
        wait_synchronous(leader)

    def chain(self, nodes: list[NodeProc], leader_id: int = 1, wait: bool = True) -> None:
        """Roles and links for nodes[0] -> nodes[1] -> ... (the supervisor's
        job, done by hand): FORWARDER in the middle, FOLLOWER at the tail."""
        for i, n in enumerate(nodes[1:], 1):
            role = NodeRole.FORWARDER if i < len(nodes) - 1 else NodeRole.FOLLOWER
            n.client.set_role(role, leader_id)
            n.client.set_leader(nodes[i - 1].address)
        nodes[0].client.set_role(NodeRole.LEADER, leader_id)
        for up, down in zip(nodes, nodes[1:]):
            up.client.set_follower(down.address)
        if wait:
            for up in nodes[:-1]:
                wait_synchronous(up)

    def supervisor(self, nodes: list[NodeProc], **settings: Any) -> "SupervisorProc":
        sup = SupervisorProc(self, nodes, {**self.settings, **self.keys.get("supervisor", {}),
                                           **settings})
        self.supervisors.append(sup)
        return sup.start()

    def close(self) -> None:
        for sup in self.supervisors:
            sup.close()
        for c in self._clients:
            c.close()
        for n in self.nodes.values():
            n.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_synchronous(leader: NodeProc, timeout: float = 30) -> None:
    def synchronous() -> bool:
        st = leader.status()
        return st.follower_state == FollowerState.SYNCHRONOUS
    wait_for(synchronous, timeout=timeout, what=f"{leader.name}'s follower to be synchronous")


def wait_applied(node: NodeProc, wal_id: int, timeout: float = 30) -> None:
    wait_for(lambda: node.status().max_applied_wal >= wal_id, timeout=timeout,
             what=f"{node.name} to apply WAL {wal_id}")
