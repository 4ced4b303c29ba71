"""The upstream's side of a link: driving the follower through the sync
machine (handshake, full state sync from a forked snapshot, catch-up from
the log) until it is synchronous.

Part of :class:`zrepl.Replica` (a mixin: its state lives in
``Replica.__init__``).  Runs on the engine thread; the decisions are in
``sync.py`` and do no I/O.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from ..core import protocol
from .commit import Batch
from ..core.errors import ProtocolError, ReplicationError, StaleLeader, Timeout, WALGap, WALTruncated
from ..core.protocol import STATE, STATE_BEGIN, STATE_END, STATE_ZREPL, endpoints
from .progress import Progress
from ..storage.snapshot import MessageReader, fork_snapshot_to_pipe
from ..core.sync import FollowerInfo, UpstreamView, plan_sync
from ..core.types import FollowerState, NodeRole
from .zmqutil import NOBLOCK as _NOBLOCK


@dataclass
class _DownCall:
    op: str
    deadline: float
    on_ok: Callable[[Any], None]
    on_err: Callable[[BaseException], None]


@dataclass
class _SnapshotOut:
    """A full state sync in progress toward the follower."""

    wal_id: int
    stream: int
    progress: Progress  # STATE batches acknowledged, as log lines of a long sync
    pid: int = 0
    fd: int = -1
    reader: MessageReader = field(default_factory=MessageReader)
    queue: collections.deque = field(default_factory=collections.deque)  # (seq, message)
    seq: int = 0  # STATE batches read from the child
    sent_seq: int = 0  # STATE batches sent
    acked_seq: int = 0  # STATE batches acknowledged
    child_count: int | None = None  # App entries, from the child's end frame
    eof: bool = False
    end_sent: bool = False
    done: bool = False
    last_progress: float = field(default_factory=time.monotonic)


class DownstreamLink:
    """Everything a node does for the node that follows it."""

    def _restart_link(self, why: str) -> None:
        """Tear the link down and start over with the stored follower
        address.  Commits stop going downstream at once; the engine thread
        does the rest."""
        with self._inflight_lock:
            self._synchronous = False
            self._link_restart = why
        if threading.get_ident() == self._engine_ident:
            self._apply_link_restart(time.monotonic())
        else:
            self._poke()

    def _apply_link_restart(self, now: float) -> None:
        why, self._link_restart = self._link_restart, ""
        self.log.info("restarting the follower link: %s", why)
        self._reset_link()
        self._configure_link(now)

    def _configure_link(self, now: float) -> None:
        address = self.storage.follower_address()
        role = self.storage.role()
        if role not in (NodeRole.LEADER, NodeRole.FORWARDER, NodeRole.FOLLOWER):
            address = ""
        self._sync.configure(address, now)

    def _reset_link(self) -> None:
        """Close the downstream sockets and forget the conversation."""
        with self._app_lock:
            with self._inflight_lock:
                exc = self._link_broken or ReplicationError("link reset")
                ready = self._fail_inflight_locked(exc)
                self._synchronous = False
                self._link_broken = None
            for b in ready:
                self._finalize(b)
            if self._data_out is not None:
                self._data_out.close(linger=0)
                self._data_out = None
            self._stream_out = 0
            self._kill_snapshot_out()
        if self._down_req is not None:
            self._down_req.close(linger=0)
            self._down_req = None
        self._down_call = None

    def _handle_link_broken(self, now: float) -> None:
        exc = self._link_broken
        if exc is None:
            return
        self._report_failed(f"follower {self._sync.address}: {exc}")
        self._reset_link()
        # A gap or WAL that is no longer held: re-handshake at once, the
        # plan will say what to do.
        self._sync.failed(exc, now, retry_now=isinstance(exc, (WALTruncated, WALGap)))

    def _drive_downstream(self, now: float) -> float:
        s = self._sync
        if self._down_call is not None:
            if now >= self._down_call.deadline:
                call = self._down_call
                self._down_call = None
                if self._down_req is not None:
                    self._down_req.close(linger=0)  # lazy pirate: a fresh socket next time
                    self._down_req = None
                call.on_err(Timeout(f"follower {s.address} did not answer {call.op} within "
                                    f"{self.config.rpc_timeout:g}s"))
            else:
                return self._down_call.deadline - now
        if s.state == FollowerState.NOT_CONNECTED:
            if s.connect_due(now):
                self._start_handshake(now)
                return self.config.rpc_timeout
            return max(0.001, s.next_attempt - now)
        if s.state == FollowerState.SYNCING_STATE:
            return self._pump_snapshot(now)
        if s.state == FollowerState.SYNCING_LOG:
            return self._pump_catchup(now)
        return 0.2

    def _down_rpc(self, op: str, args: dict, on_ok: Callable[[Any], None],
                  on_err: Callable[[BaseException], None]) -> None:
        if self._down_req is None:
            self._down_req = self._sock(zmq.REQ, endpoints(self._sync.address).control,
                                        bind=False)
        try:
            self._down_req.send(protocol.control_request(op, args), _NOBLOCK)
        except zmq.ZMQError as exc:
            self._down_req.close(linger=0)
            self._down_req = None
            on_err(Timeout(f"cannot send {op} to {self._sync.address}: {exc}"))
            return
        self._down_call = _DownCall(op, time.monotonic() + self.config.rpc_timeout, on_ok, on_err)

    def _on_down_reply(self) -> None:
        call = self._down_call
        assert self._down_req is not None
        try:
            raw = self._down_req.recv(_NOBLOCK)
        except zmq.Again:
            return
        self._down_call = None
        if call is None:
            return
        try:
            result = protocol.parse_control_reply(raw)
        except ReplicationError as exc:
            call.on_err(exc)
            return
        call.on_ok(result)

    def _start_handshake(self, now: float) -> None:
        stream = random.getrandbits(63) or 1
        leader_id = self.storage.leader_id()
        history = [list(x) for x in self._history]

        def on_ok(info: Any) -> None:
            try:
                fi = FollowerInfo.from_reply(info)
            except (KeyError, TypeError, ValueError) as exc:
                self._sync.failed(ProtocolError(f"bad handshake reply: {exc}"), time.monotonic())
                return
            self._begin_sync(fi, stream)

        def on_err(exc: BaseException) -> None:
            if not isinstance(exc, Timeout):
                self.log.warning("handshake with %s failed: %s", self._sync.address, exc)
            if isinstance(exc, (StaleLeader, ProtocolError)):
                self._report_failed(f"follower {self._sync.address} refused: {exc}")
            self._sync.failed(exc, time.monotonic())

        self._down_rpc("connect", {"leader_id": leader_id, "address": self.address,
                                   "stream": stream, "epoch_history": history,
                                   "depth": self._depth + 1}, on_ok, on_err)

    def _begin_sync(self, fi: FollowerInfo, stream: int) -> None:
        with self._app_lock:
            view = UpstreamView(list(self._history), self.storage.min_wal(),
                                self._position)
            plan = plan_sync(view, fi)
            self._sync.connected(plan, fi.position)
            self._acked = fi.position
            self._stream_out = stream
            self._history_sent = -1  # the first batch of a stream carries the history
            # IMMEDIATE: a send fails at once while the follower is not
            # connected, instead of queueing for a peer that may be gone.
            self._data_out = self._sock(zmq.PUSH, endpoints(self._sync.address).data, bind=False,
                                        options={zmq.IMMEDIATE: 1,
                                                 zmq.SNDHWM: self.config.window * 4 + 16})
            self._data_out_ready = time.monotonic()
            self._link_broken = None
        self.log.info("follower %s at %d: %s", self._sync.address, fi.position, plan.reason)
        if plan.state == FollowerState.SYNCING_LOG:
            self._counters["log_catchups"] += 1
            self._catchup_pos = plan.start
            self._slot = plan.start
        else:
            self._slot = self._position + 1

            def cleared(_: Any) -> None:
                if self._sync.state == FollowerState.SYNCING_STATE and self._stream_out == stream:
                    self._fork_snapshot(stream)

            def failed(exc: BaseException) -> None:
                self._link_failure(exc)

            self._down_rpc("clear_state", {"leader_id": self.storage.leader_id()}, cleared,
                           failed)

    def _fork_snapshot(self, stream: int) -> None:
        with self._app_lock:
            wal_id = self._position
            section = {"epoch_history": [list(x) for x in self._history]}
            sessions = self._sessions
            leader_id = self.storage.leader_id()

            def message(seq: int, datas: list[bytes]) -> bytes:  # runs in the child
                return protocol.state_message(STATE, leader_id, stream, seq, datas)

            def zrepl_message(seq: int, sect: dict) -> bytes:  # runs in the child
                return protocol.state_message(STATE_ZREPL, leader_id, stream, seq, sect)

            pid, fd = fork_snapshot_to_pipe(
                self.app, wal_id, leader_id,
                lambda: {**section, "sessions": sessions.to_section()},  # in the child
                self.config.snapshot_batch_entries, message, zrepl_message)
            self._slot = wal_id + 1
        snap = _SnapshotOut(wal_id, stream, Progress(
            self.log, f"state sync to {self._sync.address} at WAL id {wal_id} (up to "
            f"{self.config.snapshot_batch_entries} entries per batch)",
            unit="batches acknowledged"), pid, fd)
        self._snap_out = snap
        self._counters["state_syncs_sent"] += 1
        snap.queue.append((0, protocol.state_message(STATE_BEGIN, leader_id, stream, wal_id,
                                                     section)))
        self.log.info("full state sync to %s at WAL id %d (child pid %d)", self._sync.address,
                      wal_id, pid)

    def _read_snapshot_pipe(self, snap: _SnapshotOut) -> None:
        try:
            chunk = os.read(snap.fd, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            snap.eof = True
            return
        snap.reader.feed(chunk)
        for kind, payload in snap.reader.messages():
            if kind == b"M":
                snap.seq += 1
                snap.queue.append((snap.seq, payload))
            elif kind == b"E":
                snap.child_count = protocol.unpackb(payload).get("entries")

    def _pump_snapshot(self, now: float) -> float:
        snap = self._snap_out
        if snap is None:
            return 0.05  # waiting for clear_state's reply
        if snap.done:
            self._finish_snapshot(snap)
            return 0.0
        while snap.queue and snap.sent_seq - snap.acked_seq < self.config.window:
            seq, msg = snap.queue[0]
            if not self._send_data(msg):
                break  # not connected yet, or the queue is full: the timeout below decides
            snap.queue.popleft()
            snap.sent_seq = max(snap.sent_seq, seq)
            snap.last_progress = now
        if snap.eof and snap.pid:
            pid, status = os.waitpid(snap.pid, os.WNOHANG)
            if pid:
                snap.pid = 0
                os.close(snap.fd)
                snap.fd = -1
                if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or \
                        snap.child_count is None or snap.reader.pending_bytes:
                    self._link_failure(ReplicationError(
                        f"snapshot child failed (exit status {status}, end frame "
                        f"{'seen' if snap.child_count is not None else 'missing'})"))
                    return 0.0
            else:
                return 0.005
        if snap.eof and not snap.pid and not snap.queue and not snap.end_sent and \
                snap.acked_seq == snap.sent_seq == snap.seq:
            if self._send_data(protocol.state_message(STATE_END, self.storage.leader_id(),
                                                      snap.stream, snap.wal_id,
                                                      snap.child_count)):
                snap.end_sent = True
                snap.last_progress = now
        waiting = snap.end_sent or snap.sent_seq > snap.acked_seq or snap.queue
        if waiting and now - snap.last_progress > self.config.ack_timeout * 4:
            self._link_failure(Timeout(f"follower {self._sync.address} stopped acknowledging "
                                       "the state sync"))
        return 0.001 if snap.queue and snap.sent_seq - snap.acked_seq < self.config.window else 0.05

    def _finish_snapshot(self, snap: _SnapshotOut) -> None:
        self._snap_out = None
        self._sync.snapshot_done(snap.wal_id)
        self._acked = snap.wal_id
        self._catchup_pos = snap.wal_id + 1
        self._slot = snap.wal_id + 1
        self.log.info("state sync to %s done: %s entries at WAL id %d", self._sync.address,
                      snap.child_count, snap.wal_id)

    def _send_data(self, msg: bytes) -> bool:
        with self._app_lock:
            if self._data_out is None:
                return False
            try:
                self._data_out.send(msg, _NOBLOCK)
                return True
            except zmq.Again:
                return False

    def _kill_snapshot_out(self) -> None:
        snap = self._snap_out
        self._snap_out = None
        if snap is None:
            return
        if snap.pid:
            try:
                os.kill(snap.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(snap.pid, 0)
        if snap.fd >= 0:
            os.close(snap.fd)

    def _pump_catchup(self, now: float) -> float:
        window = self.config.window
        while len(self._inflight) < window and self._link_broken is None:
            pos = self._catchup_pos
            if pos > self._position:
                with self._app_lock:
                    if self._catchup_pos > self._position and self._link_broken is None:
                        self._sync.caught_up()
                        self._synchronous = True
                        self._synced_at = time.monotonic()
                        self._slot = 0
                        self.log.info("follower %s is synchronous at WAL id %d",
                                      self._sync.address, self._position)
                        if self._pending:
                            self._commit_pending_locked()
                        return 0.2
                continue
            try:
                datas = self._read_wal_datas(pos, min(self.config.stream_batch_entries,
                                                      self._position - pos + 1))
            except WALTruncated as exc:
                self._link_failure(exc)
                return 0.0
            if not datas:
                return 0.01
            batch = Batch(pos, pos + len(datas) - 1, local_done=True)  # nothing to compare
            if not self._send_wal(batch, datas, self._send_data):
                if now - self._data_out_ready > self.config.rpc_timeout:
                    self._link_failure(Timeout(f"follower {self._sync.address} data endpoint "
                                               "unreachable"))
                return 0.001
            self._catchup_pos = batch.last + 1
        return 0.05

    def _read_wal_datas(self, start: int, count: int) -> list[bytes]:
        return self.storage.read_wal_data(start, count)

    def _follower_needs(self) -> int:
        """First WAL id the follower may still ask for (0: none)."""
        s = self._sync
        if not s.address or s.state in (FollowerState.NONE, FollowerState.ERROR):
            return 0
        if s.state == FollowerState.SYNCING_STATE:
            return self._slot
        return self._acked + 1
