"""The follower's side of a link: handshake calls from the upstream, WAL
and snapshot batches arriving, acknowledgements going back.

Part of :class:`zrepl.Replica` (a mixin: its state lives in
``Replica.__init__``).  Runs on the engine thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from ..core import protocol
from .commit import AckSink, Batch
from ..core.errors import NotLeader, ProtocolError, ReplicationError, StaleLeader, WALGap
from ..core.protocol import (ACK, STATE, STATE_BEGIN, STATE_END, STATE_ZREPL, WAL, codes_to_bytes,
                       endpoints)
from .progress import Progress
from ..storage.snapshot import CheckpointFileWriter
from ..core.session import unwrap
from ..core.types import NodeRole
from .zmqutil import NOBLOCK as _NOBLOCK
from .zmqutil import ready as _ready


@dataclass
class _SnapshotIn:
    """A full state sync being received from the upstream."""

    wal_id: int
    stream: int
    history: list
    progress: Progress  # App entries received so far (and the log lines of a long sync)
    writer: CheckpointFileWriter | None = None
    section: dict = field(default_factory=dict)  # zrepl's section, completed by STATE_ZREPL
    app_started: bool = False


class UpstreamSide:
    """Everything a node does for the node it follows."""

    def _op_connect(self, leader_id: Any, address: Any, stream: Any = 0,
                    epoch_history: Any = None, depth: Any = 1) -> dict:
        """Follower side of the handshake."""
        leader_id = self._check_leader_id(leader_id)
        if not isinstance(address, str) or not isinstance(stream, int) or stream < 0:
            raise ProtocolError("connect takes leader_id, address and a stream token")
        if address:
            try:
                up = endpoints(address)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
        with self._app_lock:
            current = self.storage.leader_id()
            if leader_id < current:
                raise StaleLeader(f"connect from {address} with leader_id {leader_id}: this node "
                                  f"obeys {current}", leader_id, current)
            if self.storage.role() == NodeRole.LEADER:
                if leader_id == current:
                    raise StaleLeader(f"{self.address} leads epoch {current} itself", leader_id,
                                      current)
                self.storage.set_leader_id(leader_id)
                self._persist_role(NodeRole.FOLLOWER)
                self._fail_pending(NotLeader(f"{self.address} stepped down", address))
                self.log.warning("deposed by %s (leader_id %d): now FOLLOWER", address, leader_id)
            elif leader_id > current:
                self.storage.set_leader_id(leader_id)  # persist before acting
            self._stream_in = stream
            self._leader_address = address
            old_depth = self._depth
            self._depth = depth if isinstance(depth, int) and 0 < depth < 1000 else 1
            self._abort_snapshot_in()
            if address:
                self._connect_ack_out(up.ack)
            info = {"leader_id": self.storage.leader_id(), "max_wal": self.storage.max_wal(),
                    "min_wal": self.storage.min_wal(), "max_applied_wal": self._position,
                    "epoch_history": [list(x) for x in self._history]}
        if leader_id != current or self._depth != old_depth:
            # our own follower must hear of the new epoch (and its depth)
            self._restart_link("upstream changed")
        return info

    def _op_max_applied_wal(self) -> int:
        return self._position

    def _check_epoch(self, leader_id: Any) -> int:
        leader_id = self._check_leader_id(leader_id)
        current = self.storage.leader_id()
        if leader_id < current:
            raise StaleLeader(f"leader_id {leader_id} is stale: this node obeys {current}",
                              leader_id, current)
        if leader_id > current:
            raise StaleLeader(f"leader_id {leader_id} is not the one this node obeys "
                              f"({current}); connect first", leader_id, current)
        return leader_id

    def _op_clear_state(self, leader_id: Any) -> None:
        self._check_epoch(leader_id)
        if self.storage.role() == NodeRole.LEADER:
            raise ProtocolError("clear_state refused: this node is the leader")
        with self._app_lock:
            self._clear_local_state()

    def _clear_local_state(self) -> None:
        self.app.clear_state()
        self._sessions.clear()
        self.storage.clear_wal()
        self._position = 0
        self.storage.set_max_applied_wal(0)

    def _op_apply_state(self, leader_id: Any, datas: Any) -> None:
        self._check_epoch(leader_id)
        datas = self._check_datas(datas)
        with self._app_lock:
            self._apply_state_datas(datas)

    def _op_apply_wal(self, leader_id: Any, first_id: Any, datas: Any) -> list[int]:
        self._check_epoch(leader_id)
        datas = self._check_datas(datas)
        if self.storage.role() == NodeRole.LEADER:
            raise ProtocolError("apply_wal refused: this node is the leader")
        with self._app_lock:
            codes = self._apply_upstream_batch(first_id, datas)
        return codes

    def _serve_data(self) -> None:
        for raw in _ready(self._data_in):
            self._handle_data(raw)
            if self._synchronous and len(self._inflight) >= self.config.window:
                return  # forwarding is full: read on once acks free the window

    def _handle_data(self, raw: bytes) -> None:
        try:
            msg = protocol.parse_data(raw)
        except ProtocolError as exc:
            self._dropped += 1
            self.log.warning("dropped a bad data frame: %s", exc)
            return
        kind = msg[1]
        if kind == ACK:
            self._dropped += 1
            return
        leader_id, stream = msg[2], msg[3]
        if stream == 0 or stream != self._stream_in or leader_id != self.storage.leader_id():
            self._dropped += 1  # not the conversation this node agreed to
            return
        try:
            if kind == WAL:
                self._receive_wal(stream, msg[4], msg[5], msg[6])
            elif kind == STATE_BEGIN:
                self._state_begin(stream, msg[4], msg[5])
            elif kind == STATE:
                self._state_batch(stream, msg[4], msg[5])
                self._ack_upstream(stream, STATE, msg[4], b"")
            elif kind == STATE_ZREPL:
                self._state_zrepl(stream, msg[5])
                self._ack_upstream(stream, STATE, msg[4], b"")
            elif kind == STATE_END:
                self._state_end(stream, msg[4], msg[5])
                self._ack_upstream(stream, STATE_END, msg[4], b"")
        except (ReplicationError, ValueError, TypeError) as exc:
            self._counters["refused_batches"] += 1
            self.log.warning("refused a batch from %s: %s", self._leader_address, exc)
            err = exc if isinstance(exc, ReplicationError) else ProtocolError(str(exc))
            self._ack_upstream(stream, kind if kind != STATE_BEGIN else STATE, 0, b"", err)

    def _receive_wal(self, stream: int, first: int, datas: list[bytes],
                     history: list | None) -> None:
        """A WAL batch from the upstream: forward it when this node's own
        follower is synchronous (before logging it, so both work at once),
        log and apply it, and acknowledge it upstream - at once, or once
        the follower acknowledged it (a synchronous chain)."""
        last = first + len(datas) - 1
        with self._app_lock:
            self._check_continues(first, datas)
            if history is not None:
                self._set_history(history)
            self._check_history_known()
            batch = None
            if self._synchronous:
                batch = Batch(first, last, [(AckSink(self._forwarded_ack(stream, last)), 0,
                                             len(datas))])
                if not self._send_downstream(batch, datas):
                    batch = None
            try:
                codes = self._apply_upstream_batch(first, datas)
                cb = codes_to_bytes(codes)
            except Exception as exc:
                if batch is not None:
                    batch.pieces = []  # the error ack below answers the upstream
                    self._abandon_batch(batch, True, exc)
                raise
            if batch is not None:
                self._complete_local(batch, codes, cb)
                return
        self._ack_upstream(stream, WAL, last, cb)

    def _check_history_known(self) -> None:
        """Refuse to log entries while this node's epoch history is empty: a
        later failover compares histories to find where two logs diverge,
        and every upstream has a history (a leader starts one when it is
        promoted) which it sends with the first batch of each stream.  (In
        a chain the newest epoch may still be on its way down while older
        entries are forwarded, so only "none at all" is certain to be wrong.)"""
        if not self._history:
            raise ProtocolError("WAL batch, but no epoch history has reached this node: the "
                                "upstream did not send it with the stream")

    def _forwarded_ack(self, stream: int, last: int
                       ) -> Callable[[list[int] | None, BaseException | None], None]:
        def ack(codes: list[int] | None, exc: BaseException | None) -> None:
            if exc is None:
                self._ack_upstream(stream, WAL, last, codes_to_bytes(codes or []))
            else:
                self._ack_upstream(stream, WAL, last, b"", exc)
        return ack

    def _check_continues(self, first: int, datas: list[bytes]) -> None:
        if not datas:
            raise ProtocolError("empty WAL batch")
        expected = self._position + 1
        if first != expected:
            raise WALGap(f"WAL batch starts at {first}, this node expects {expected}")

    def _apply_upstream_batch(self, first: int, datas: list[bytes]) -> list[int]:
        """Log and apply a batch from the upstream.  App lock held."""
        self._check_continues(first, datas)
        try:
            app_datas, sessions = unwrap(datas)  # checked before anything is written
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        self.storage.write_wal_data(first, datas)
        codes = self._apply_app_datas(first, app_datas, sessions)
        last = first + len(datas) - 1
        self._position = last
        self.storage.set_max_applied_wal(last)
        self._after_commit()
        return codes

    def _ack_upstream(self, stream: int, kind: int, position: int, codes: bytes,
                      error: BaseException | None = None) -> None:
        msg = protocol.ack_message(stream, kind, position, codes, error)
        with self._up_lock:
            if self._ack_out is None:
                return
            try:
                self._ack_out.send(msg, _NOBLOCK)
            except zmq.ZMQError:
                self._dropped += 1

    def _connect_ack_out(self, endpoint: str) -> None:
        with self._up_lock:
            if self._ack_out is not None and self._ack_out_endpoint == endpoint:
                return
            if self._ack_out is not None:
                self._ack_out.close(linger=0)
            self._ack_out = self._sock(zmq.PUSH, endpoint, bind=False,
                                       options={zmq.SNDHWM: 10_000})
            self._ack_out_endpoint = endpoint

    def _drop_upstream(self) -> None:
        self._stream_in = 0
        self._depth = 0
        self._leader_address = ""
        self._abort_snapshot_in()
        with self._up_lock:
            if self._ack_out is not None:
                self._ack_out.close(linger=0)
                self._ack_out = None
                self._ack_out_endpoint = ""

    def _state_begin(self, stream: int, wal_id: int, section: dict) -> None:
        history = section.get("epoch_history", [])
        with self._app_lock:
            self._abort_snapshot_in()
            self._clear_local_state()
            snap = _SnapshotIn(wal_id, stream, [tuple(x) for x in history],
                               Progress(self.log, f"receiving a state sync at WAL id {wal_id}"))
            if self._ckpt_dir is not None:
                snap.writer = CheckpointFileWriter(self._ckpt_dir, wal_id)
                snap.writer.write_raw_frame(["header", {"format": 1, "wal_id": wal_id,
                                                        "leader_id": self.storage.leader_id(),
                                                        "created_ns": time.time_ns()}])
            snap.section = dict(section)
            self._snap_in = snap
        self._counters["state_syncs_received"] += 1
        self.log.info("receiving a full state sync at WAL id %d", wal_id)

    def _state_batch(self, stream: int, seq: int, datas: list[bytes]) -> None:
        snap = self._snap_in
        if snap is None or snap.stream != stream:
            raise ProtocolError("state batch outside a state sync")
        b"".join(datas)  # every item is bytes (TypeError otherwise)
        with self._app_lock:
            self._begin_app_section(snap)
            self._apply_state_datas(datas)
            snap.progress.add(len(datas))
            if snap.writer is not None:
                snap.writer.write_raw_frame(["batch", datas])

    def _state_end(self, stream: int, wal_id: int, count: int) -> None:
        snap = self._snap_in
        if snap is None or snap.stream != stream or snap.wal_id != wal_id:
            raise ProtocolError("state end outside a state sync")
        if count != snap.progress.done:
            self._abort_snapshot_in()
            raise ProtocolError(f"state sync carried {snap.progress.done} entries, the leader "
                                f"sent {count}")
        with self._app_lock:
            self._begin_app_section(snap)
            if snap.writer is not None:
                snap.writer.write_raw_frame(["end", {"entries": count}])
                snap.writer.commit()  # before the history: see docs/replication.md
                snap.writer = None
                self._ckpt_position = wal_id
                self._prune_checkpoints(wal_id)
            self.storage.clear_wal()
            self._position = wal_id
            self.storage.set_max_applied_wal(wal_id)
            if snap.history:
                self._set_history(snap.history)
            self._snap_in = None
        self.log.info("state sync complete: %d entries at WAL id %d", count, wal_id)

    def _state_zrepl(self, stream: int, section: dict) -> None:
        """zrepl's own state (client sessions), sent before the App's."""
        snap = self._snap_in
        if snap is None or snap.stream != stream or snap.app_started:
            raise ProtocolError("zrepl section outside the start of a state sync")
        with self._app_lock:
            self._sessions.load_section(section.get("sessions"))
            snap.section.update({k: v for k, v in section.items() if k != "epoch_history"})

    def _begin_app_section(self, snap: "_SnapshotIn") -> None:
        """The checkpoint file gets zrepl's section (complete now) once, then
        the App's."""
        if snap.app_started:
            return
        snap.app_started = True
        if snap.writer is not None:
            snap.writer.write_raw_frame(["section", "zrepl", snap.section])
            snap.writer.write_raw_frame(["section", "app"])

    def _abort_snapshot_in(self) -> None:
        if self._snap_in is not None and self._snap_in.writer is not None:
            self._snap_in.writer.abort()
        self._snap_in = None
