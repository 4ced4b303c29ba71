"""Checkpoints: a forked child writes the App's state to
``DIR/checkpoints/ckpt-S.zck`` every ``checkpoint_entries`` entries or
``checkpoint_interval`` seconds (or when asked), the newest
``checkpoints_kept`` are kept, and the WAL is truncated up to the oldest
kept one - but never past what the follower still needs (the core's
:meth:`~zrepl.core.node.NodeCore.truncation_limit`).

Dependencies (``node``): the core (position, the truncation rule, whether
the state is complete), the Applier (App lock, App), storage, the clock,
the config, the log and ``report_failed``.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from ..core.errors import ReplicationError
from ..storage.snapshot import FileCheckpoints, write_checkpoint
from .snapshots import fork_checkpoint

if TYPE_CHECKING:
    from .replica import Replica


def checkpoint_store(storage: Any) -> Any:
    """Where ``storage``'s node keeps checkpoints: files beside a
    FileStorage, the memory of a ``MemoryStorage(checkpoints=True)``, or
    nowhere (None)."""
    store = getattr(storage, "checkpoints", None)
    if store is not None:
        return store
    path = getattr(storage, "path", None)
    return FileCheckpoints(Path(path) / "checkpoints") if path else None


class Checkpointer:
    last_error = ""  # why the last checkpoint failed ("" once one succeeds)

    def __init__(self, node: "Replica"):
        self.node = node
        self.store = checkpoint_store(node.storage)
        self.child: tuple[int, int] | None = None  # (pid, wal_id)
        self.position = 0  # WAL id of the newest checkpoint
        self.time = node.clock.now()
        self.requested = False

    def after_apply(self, position: int) -> None:
        cfg = self.node.config
        if cfg.checkpoint_entries and position - self.position >= cfg.checkpoint_entries \
                and not self.requested:
            self.requested = True
            self.node.poke()

    def request(self) -> int:
        """Start a checkpoint now; the WAL id it will capture (0: this
        storage keeps no checkpoints)."""
        if self.store is None:
            return 0
        self.requested = True
        self.node.poke()
        return self.node.core.position

    def tick(self, now: float) -> float:
        """Reap a finished child, start a due checkpoint; the seconds until
        it wants to look again."""
        node = self.node
        cfg = node.config
        if self.store is None:
            return 1.0
        if self.child is not None:
            child, wal_id = self.child
            if isinstance(child, CheckpointThread):
                if child.is_alive():
                    return 0.02
                self.child = None
                if child.error:
                    self._failed(wal_id, child.error)
                else:
                    self._written(wal_id, now)
            else:
                done, status = os.waitpid(child, os.WNOHANG)
                if not done:
                    return 0.02
                self.child = None
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                    self._written(wal_id, now)
                else:
                    self._failed(wal_id, f"the checkpoint process exited with status {status} "
                                         "(its error is in the node's log)")
        due = self.requested
        if cfg.checkpoint_interval and now - self.time >= cfg.checkpoint_interval and \
                node.core.position > self.position:
            due = True
        if due and self.child is None and not node.core.state_incomplete:
            self.requested = False
            with node.applier.lock:
                core = node.core
                wal_id = core.position
                history = [list(x) for x in core.history]
                sessions = core.sessions
                section = lambda: {"epoch_history": history,  # noqa: E731 - runs in the child
                                   "sessions": sessions.to_section()}
                shared = node.applier.store
                app, datas, per_entry = node.applier.app, None, 1
                if shared is not None:
                    # the shared store's pairs from one read snapshot, taken now like
                    # the sessions: no fork, no App encoding
                    section = {**section(), "store": 1}  # type: ignore[assignment]
                    app, datas, per_entry = None, shared.raw_datas(), 2
                args = (wal_id, core.leader_id, section, cfg.snapshot_batch_entries)
                target = self.store
                if isinstance(self.store, FileCheckpoints):
                    target = self.store.directory
                    if shared is not None:  # written by a thread while the node applies on
                        self.child = (CheckpointThread(target, datas, *args), wal_id)
                        return 0.02
                    if node.snapshot_mode == "fork":
                        self.child = (fork_checkpoint(target, app, *args,
                                                      cfg.snapshot_child_nice), wal_id)
                        return 0.02
                try:
                    write_checkpoint(target, app, *args, datas=datas, per_entry=per_entry)
                except Exception as exc:  # the App's iter_state or encode_cmd: report, go on
                    self._failed(wal_id, f"{type(exc).__name__}: {exc}")
                    return 1.0
            self._written(wal_id, now)
        if cfg.checkpoint_interval:
            return max(0.05, cfg.checkpoint_interval - (now - self.time))
        return 1.0

    def _failed(self, wal_id: int, why: str) -> None:
        """Loudly: without checkpoints the WAL is never truncated, so each
        failure is an ERROR, a count in the status and the metrics, and
        the reason stays in the status until a checkpoint succeeds."""
        node = self.node
        node.core.counters["checkpoint_failures"] += 1
        self.last_error = f"checkpoint at WAL id {wal_id} failed: {why}"
        node.report_failed(self.last_error + " (the WAL is not truncated until one succeeds)")

    def _written(self, wal_id: int, now: float) -> None:
        self.last_error = ""
        self.position = wal_id
        self.time = now
        self.prune(wal_id)
        self.node.log.info("checkpoint at WAL id %d written", wal_id)

    def received(self, wal_id: int) -> None:
        """A state sync arrived as a checkpoint at ``wal_id``: the only one
        of this node's history now (any other was taken from the state the
        sync replaced, and one at a higher WAL id would be restored in its
        place)."""
        self.position = wal_id
        store = self.store
        assert store is not None
        for cp_id, cp in store.list():
            if cp_id != wal_id:
                store.remove(cp)
        self.prune(wal_id)

    def forget(self) -> None:
        """The state was cleared (a state sync begins, or clear_state): no
        checkpoint describes this node's history any more."""
        store = self.store
        if store is not None:
            for _, cp in store.list():
                store.remove(cp)

    def prune(self, newest: int) -> None:
        """Keep the newest ``checkpoints_kept`` files and truncate the WAL up
        to the oldest kept one, within the core's limit."""
        node = self.node
        store = self.store
        assert store is not None
        kept = store.list()
        for _, cp in kept[:-node.config.checkpoints_kept]:
            store.remove(cp)
        for path, pid in store.leftovers():
            if not psutil.pid_exists(pid):
                path.unlink(missing_ok=True)  # left by a crashed writer
        kept = store.list()
        if not kept:
            return
        with node.core_lock:
            limit = node.core.truncation_limit(kept[0][0])
        if limit > 1:
            node.storage.truncate_wal_before_id(limit)

    def kill(self) -> None:
        if self.child is not None:
            child, _ = self.child
            if isinstance(child, CheckpointThread):
                child.cancel()
            else:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(child, 0)
            self.child = None


class CheckpointThread(threading.Thread):
    """A checkpoint of a shared store: its pairs from a read snapshot taken
    by the caller (App lock held), written to a file by this thread while
    the node applies on."""

    def __init__(self, directory: Path, datas: Any, wal_id: int, leader_id: int,
                 section: Any, batch_entries: int):
        super().__init__(name=f"zrepl-checkpoint {wal_id}", daemon=True)
        self.error = ""
        self._stop_now = threading.Event()
        self._datas = datas
        self._args = (directory, None, wal_id, leader_id, section, batch_entries)
        self.start()

    def _checked(self) -> Any:
        for n, data in enumerate(self._datas):
            if not n & 4095 and self._stop_now.is_set():
                raise ReplicationError("checkpoint cancelled: the node is stopping")
            yield data

    def run(self) -> None:
        try:
            write_checkpoint(*self._args, datas=self._checked(), per_entry=2)
        except BaseException as exc:  # noqa: BLE001 - reported by the checkpointer
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            close = getattr(self._datas, "close", None)
            if close is not None:
                close()  # ends the read transaction

    def cancel(self) -> None:
        """Stop at the next entries (the temporary file is removed) and wait."""
        self._stop_now.set()
        self.join()
