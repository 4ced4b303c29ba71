"""The engine's side of the link from this node's upstream: WAL and state
batches arriving on the data endpoint, acknowledgements going back, and
the checkpoint file an incoming state sync is written to.

The core decides whether a message belongs to the stream this node agreed
to, whether a batch continues its log, and when its acknowledgement is
due (at once, or once this node's own follower acknowledged it); this
object decodes, writes, applies and sends.  Runs on the engine's thread.

Dependencies (``node``): the core and its lock, the Applier (App, WAL,
App lock), the transport, the checkpointer, the downstream link (to
forward), the clock, the config, the effects runner, the log.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from ..core import protocol
from ..core.effects import BeginStateIn, EndStateIn, SendAck, SendHeadAck
from ..core.errors import ProtocolError, ReplicationError
from ..core.node import SnapshotIn
from ..core.protocol import ACK, STATE, STATE_BEGIN, STATE_END, STATE_ZREPL, WAL, endpoints
from ..storage.snapshot import datas_per_entry
from .applier import LoggedDespiteError
from .progress import Progress
from .transport import Pusher

if TYPE_CHECKING:
    from .replica import Replica


class UpstreamLink:
    def __init__(self, node: "Replica"):
        self.node = node
        self.acks: Pusher | None = None
        self.acks_to = ""  # the upstream's address
        # member acknowledgements straight to the chain's head (when it is
        # not the upstream: then they go with the upstream's)
        self.head_acks: Pusher | None = None
        self.head_to = ""
        self._head_direct = ""  # where head_acks is connected ("": not)
        self._lock = threading.Lock()  # the ack path (any thread may acknowledge)
        self.writer: Any = None  # the incoming state sync's checkpoint writer
        self.snap: SnapshotIn | None = None  # the core's record of it
        self.app_section = False  # the checkpoint's App section has begun
        self.progress: Progress | None = None

    # --- acknowledgements ------------------------------------------------------------

    def connect(self, address: str) -> None:
        """ConnectUpstream: acknowledgements go to ``address`` ("" : none)."""
        node = self.node
        with self._lock:
            if self.acks is not None and self.acks_to == address:
                return
            if self.acks is not None:
                self.acks.close()
                self.acks = None
            self.acks_to = address
            if address:
                self.acks = node.transport.pusher(endpoints(address).ack, node.config,
                                                  hwm=node.config.ack_queue_messages)

    def connect_head(self, address: str) -> None:
        """ConnectHead: member acknowledgements go to ``address`` ("": none),
        with the upstream's when the upstream is the head."""
        node = self.node
        with self._lock:
            self.head_to = address
            direct = address if address and address != self.acks_to else ""
            if direct == self._head_direct:
                return
            if self.head_acks is not None:
                self.head_acks.close()
                self.head_acks = None
            self._head_direct = direct
            if direct:
                self.head_acks = node.transport.pusher(endpoints(direct).ack, node.config,
                                                       hwm=node.config.ack_queue_messages)

    def send_ack(self, payload: bytes) -> None:
        with self._lock:
            if self.acks is None or not self.acks.send(payload):
                self.node.core.counters["dropped_messages"] += 1

    def ack_effect(self, e: SendAck) -> None:
        self.send_ack(e.payload)

    def head_ack_effect(self, e: SendHeadAck) -> None:
        with self._lock:
            pusher = self.acks if self.head_to == self.acks_to else self.head_acks
            if pusher is None or not pusher.send(e.payload):
                self.node.core.counters["dropped_messages"] += 1

    def close(self) -> None:
        self.connect("")
        self.connect_head("")
        self.abort_state_in()

    # --- data ---------------------------------------------------------------------------

    def serve(self) -> None:
        """Batches from the upstream, until the forwarding window is full:
        the upstream then waits (backpressure through the acks).  The WAL
        batches of one turn share the App lock and one store transaction
        (``Applier.begin_group``): each is logged, applied and acknowledged
        in turn, and the group commits before the lock is let go."""
        node = self.node
        window_full = node.core.window_full
        applier = node.applier
        with applier.lock:
            applier.begin_group()
            try:
                for raw in node.endpoints_bound.data.drain(node.config.messages_per_turn):
                    self.handle(raw)
                    if window_full():
                        return
            finally:
                applier.end_group()

    def handle(self, raw: bytes) -> None:
        """One data message (App lock held)."""
        node = self.node
        try:
            msg = protocol.parse_data(raw)
        except ProtocolError as exc:
            node.core.counters["dropped_messages"] += 1
            node.log.warning("dropped a bad data frame: %s", exc)
            return
        kind = msg[1]
        if kind == ACK:
            node.core.counters["dropped_messages"] += 1
            return
        stream = msg[3]
        try:
            if kind == WAL:
                self._wal(raw, msg)
                return
            with node.core_lock:
                if not node.core.accepts(msg[2], stream):
                    return  # not the conversation this node agreed to
            node.applier.end_group()  # (a state sync's messages are not WAL batches)
            if kind == STATE_BEGIN:
                self._state_begin(stream, msg[4], msg[5])
            elif kind == STATE:
                self._state_batch(stream, msg[4], msg[5])
            elif kind == STATE_ZREPL:
                with node.core_lock:
                    node.core.on_state_zrepl(stream, msg[5])
                self.send_ack(protocol.ack_message(stream, STATE, msg[4], b""))
            elif kind == STATE_END:
                self._state_end(stream, msg[4], msg[5])
        except (ReplicationError, ValueError, TypeError) as exc:
            with node.core_lock:
                effects = node.core.refuse(stream, kind if kind != STATE_BEGIN else STATE, exc)
            node.run(effects)

    def _wal(self, raw: bytes, msg: list) -> None:
        """A WAL batch: forwarded first when this node's link forwards (so
        both nodes work at once), then logged and applied; its
        acknowledgement goes up when the core says.  The entries go on
        down and into the WAL as the upstream packed them."""
        node = self.node
        core, lock = node.core, node.core_lock
        stream, first, datas = msg[3], msg[4], msg[5]
        now = node.clock.now()
        last = first + len(datas) - 1
        with lock:
            if not core.accepts(msg[2], stream):
                return  # not the conversation this node agreed to
            batch, header, effects = core.on_wal(stream, first, len(datas), msg[6], now)
        if effects:
            node.run(effects)
        payload = protocol.wal_payload(raw, msg)
        if header is not None:
            if payload is None:
                payload = protocol.packb(datas)
            fwd = protocol.wal_frame(header[0], header[1], first, payload, header[2])
            if not node.downstream.send_wait(fwd):
                with lock:
                    effects = core.link_failed(ReplicationError(
                        f"cannot forward to follower {core.link.address}"), now)
                node.run(effects)
        try:
            codes, cb, sessions = node.applier.log_and_apply(first, datas, payload)
        except Exception as exc:
            applied = (exc.codes, exc.sessions) if isinstance(exc, LoggedDespiteError) else None
            with lock:
                effects = core.on_wal_failed(first, last, batch, exc,
                                             node.storage.max_wal() >= last, now, applied)
            node.run(effects)
            raise exc if isinstance(exc, ReplicationError) else ProtocolError(str(exc))
        with lock:
            effects = core.on_wal_applied(stream, first, last, batch, codes, cb, sessions, now)
        node.run(effects)
        node.checkpointer.after_apply(last)

    def _state_begin(self, stream: int, wal_id: int, section: dict) -> None:
        node = self.node
        with node.core_lock:
            effects = node.core.on_state_begin(stream, wal_id, section, node.clock.now())
        node.run(effects)

    def _state_batch(self, stream: int, seq: int, datas: list) -> None:
        node = self.node
        b"".join(datas)  # every item is bytes (TypeError otherwise)
        snap = node.core.snap_in
        per_entry = datas_per_entry(snap.section) if snap is not None else 1
        n = len(datas) // per_entry
        with node.core_lock:
            first = node.core.on_state_batch(stream, n)
        if first:
            self._begin_app_section()
        node.applier.apply_state(datas, per_entry == 2)
        if self.progress is not None:
            self.progress.add(n)
        if self.writer is not None:
            self.writer.write_raw_frame(["batch", datas])
        self.send_ack(protocol.ack_message(stream, STATE, seq, b""))

    def _state_end(self, stream: int, wal_id: int, count: int) -> None:
        node = self.node
        with node.core_lock:
            effects = node.core.on_state_end(stream, wal_id, count, node.clock.now())
        node.run(effects)
        self.send_ack(protocol.ack_message(stream, STATE_END, wal_id, b""))

    # --- the incoming state sync's checkpoint file ------------------------------------

    def begin_state_in(self, e: BeginStateIn) -> None:
        node = self.node
        self.abort_state_in()
        self.snap = node.core.snap_in
        self.app_section = False
        self.progress = Progress(node.log, f"receiving a state sync at WAL id {e.wal_id}",
                                 clock=node.clock.now, every=node.config.progress_interval)
        store = node.checkpointer.store
        if store is not None:
            self.writer = store.writer(e.wal_id)
            self.writer.write_raw_frame(["header", {"format": 1, "wal_id": e.wal_id,
                                                    "leader_id": e.leader_id,
                                                    "created_ns": time.time_ns()}])

    def _begin_app_section(self) -> None:
        """The checkpoint file gets zrepl's section (complete now) once,
        then the App's."""
        if self.app_section:
            return
        self.app_section = True
        if self.writer is not None and self.snap is not None:
            self.writer.write_raw_frame(["section", "zrepl", self.snap.section])
            self.writer.write_raw_frame(["section", "app"])

    def end_state_in(self, e: EndStateIn) -> None:
        if e.ok:
            self.node.applier.publish(e.wal_id)  # readers of a shared store move to it now
        if not e.ok or self.writer is None:
            self.abort_state_in()
            return
        self._begin_app_section()  # a state with no App entries still has the section
        writer, self.writer = self.writer, None
        writer.write_raw_frame(["end", {"entries": self.snap.received if self.snap else 0}])
        writer.commit()
        self.snap = None
        self.progress = None
        self.node.checkpointer.received(e.wal_id)

    def abort_state_in(self) -> None:
        writer, self.writer = self.writer, None
        self.snap = None
        self.progress = None
        if writer is not None:
            writer.abort()
