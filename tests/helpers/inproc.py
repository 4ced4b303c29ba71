"""Replicas in the test's own process (fast; the multi-process behaviour is
in tests/helpers/cluster.py)."""

from __future__ import annotations

from pathlib import Path

from workers.kv import KV
from zrepl import Config, MemoryStorage, Replica

FAST = dict(fsync="off", ack_timeout=0.3, rpc_timeout=0.3, sync_wait_timeout=0.3,
            checkpoint_entries=0, checkpoint_interval=0)


class Nodes:
    """Started Replicas at ``ipc://ROOT/NAME.sock``, stopped by ``close``."""

    def __init__(self, root: Path):
        self.root = root
        self.started: list[Replica] = []

    def make(self, name: str, app=None, storage=None, **settings) -> Replica:
        cfg = Config(**{**FAST, **settings})
        storage = storage or MemoryStorage()
        r = Replica(app or KV(), storage, f"ipc://{self.root}/{name}.sock", cfg).start()
        self.started.append(r)
        return r

    def close(self):
        for r in self.started:
            r.stop()
            r.storage.close()
