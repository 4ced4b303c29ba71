"""The engine's side of the link to this node's follower.

The core decides (handshake, plan, window, when the follower is
synchronous); this object owns the link's I/O: the data path and the
control requester toward the follower, the state sync being sent (its
forked child or copy, and the messages it produced) and the catch-up
reads from the WAL.  It carries out ``OpenLink``, ``CloseLink``,
``CallFollower`` and ``StartSnapshot`` and pumps catch-up and state-sync
messages within the core's window, on the engine's thread;
:meth:`send_wait` serves the commit path on whichever thread commits (App
lock held: the data path is shared).

Dependencies (``node``): the core and its lock, the App lock and storage,
the transport, the clock, the config, the effects runner, the log.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from ..core import protocol
from ..core.effects import CallFollower, StartSnapshot
from ..core.errors import ReplicationError, Timeout, WALTruncated
from ..core.protocol import STATE, STATE_BEGIN, STATE_ZREPL, endpoints
from ..core.types import FollowerState
from .progress import Progress
from .snapshots import CopiedSnapshot, StreamedSnapshot, ForkedSnapshot, Source
from .transport import Pusher, Requester

if TYPE_CHECKING:
    from .replica import Replica


class DownstreamLink:
    def __init__(self, node: "Replica"):
        self.node = node
        self.data: Pusher | None = None
        self.rpc: Requester | None = None
        self.rpc_address = ""
        self.call_token = 0  # the core's token of the call awaiting a reply
        self.source: Source | None = None
        self.queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self.produced = 0  # messages taken from the source
        self.progress: Progress | None = None
        self._acked_seen = 0

    # --- effects -----------------------------------------------------------------

    def open(self, address: str) -> None:
        """OpenLink (App lock held: the commit path shares the data path)."""
        node = self.node
        self._close_data()
        self.data = node.transport.pusher(endpoints(address).data, node.config,
                                          hwm=node.config.send_queue_batches, immediate=True)

    def close(self) -> None:
        """CloseLink: every path to the follower, and the state sync.  (Not
        with the App lock held: it takes it, the commit path shares the data
        path.)"""
        with self.node.applier.lock:
            self._close_data()
        if self.rpc is not None:
            self.rpc.close()
            self.rpc = None
        self.call_token = 0
        self._end_source()

    def _close_data(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None

    def _end_source(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
        self.queue.clear()
        self.progress = None

    def call(self, e: CallFollower) -> None:
        node = self.node
        if self.rpc is not None and self.rpc_address != e.address:
            self.rpc.close()
            self.rpc = None
        if self.rpc is None:
            self.rpc = node.transport.requester(endpoints(e.address).control, node.config)
            self.rpc_address = e.address
        if self.rpc.send(protocol.control_request(e.op, e.args)):
            self.call_token = e.token
            return
        self.rpc.close()
        self.rpc = None
        self._reply(e.token, None, Timeout(f"cannot send {e.op} to {e.address}"))

    def on_reply(self) -> bool:
        """The follower answered the control call in flight (True)."""
        if self.rpc is None:
            return False
        raw = self.rpc.recv()
        if raw is None:
            return False
        token, self.call_token = self.call_token, 0
        try:
            result, error = protocol.parse_control_reply(raw), None
        except ReplicationError as exc:
            result, error = None, exc
        self._reply(token, result, error)
        return True

    def _reply(self, token: int, result: Any, error: BaseException | None) -> None:
        node = self.node
        # the App lock: a handshake's plan, and the snapshot it may start,
        # need a position that does not move
        with node.applier.lock:
            with node.core_lock:
                effects = node.core.on_follower_reply(token, result, error, node.clock.now(),
                                                      node.storage.min_wal())
            node.run(effects)

    def start_snapshot(self, e: StartSnapshot) -> None:
        """StartSnapshot (App lock held: the state is frozen between two
        applies)."""
        node = self.node
        cfg = node.config
        self._end_source()
        leader_id, stream = e.leader_id, e.stream

        def message(seq: int, datas: list[bytes]) -> bytes:  # in the child, if forked
            return protocol.state_message(STATE, leader_id, stream, seq, datas)

        def section_message(seq: int, sect: dict) -> bytes:
            return protocol.state_message(STATE_ZREPL, leader_id, stream, seq, sect)

        sessions = node.core.sessions
        section = e.section
        store = node.applier.store
        if store is not None:  # the store's pairs as they are: the follower's store takes them
            section = {**section, "store": 1}
        args = (e.wal_id, leader_id, lambda: {**section, "sessions": sessions.to_section()},
                cfg.snapshot_batch_entries, message, section_message)
        app = node.applier.app
        if store is not None:
            self.source = StreamedSnapshot(store.raw_datas(), *args, per_entry=2)
        elif node.snapshot_mode == "fork":
            self.source = ForkedSnapshot(app, *args, nice=cfg.snapshot_child_nice)
        else:
            self.source = CopiedSnapshot(app, *args)
        self.queue.append((0, protocol.state_message(STATE_BEGIN, leader_id, stream, e.wal_id,
                                                     section)))  # ("store": 1 says pairs)
        self.produced = 0
        self._acked_seen = 0
        self.progress = Progress(node.log, f"state sync to {node.core.link.address} at WAL id "
                                 f"{e.wal_id} (up to {cfg.snapshot_batch_entries} entries per "
                                 "batch)", unit="batches acknowledged", clock=node.clock.now,
                                 every=cfg.progress_interval)

    # --- pumping -------------------------------------------------------------------

    def fileno(self) -> int:
        """A descriptor to wait on while the source has more (-1: none)."""
        if self.source is None or len(self.queue) >= self.node.config.window * 2:
            return -1
        return self.source.fileno()

    def pump(self, now: float) -> float:
        """Send what the link's state calls for; the seconds until it wants
        to be called again."""
        state = self.node.core.link.state
        if state == FollowerState.SYNCING_STATE:
            return self._pump_snapshot(now)
        if self.source is not None:
            self._end_source()  # the state sync is over
        if state == FollowerState.SYNCING_LOG:
            return self._pump_catchup(now)
        return 1.0

    def _send(self, msg: bytes) -> bool:
        """A catch-up or state-sync message (the pumps do not hold the App
        lock; the data path is shared with the commit path)."""
        with self.node.applier.lock:
            return self.data is not None and self.data.send(msg)

    def send_wait(self, msg: bytes) -> bool:
        """Send a committed batch, waiting for room as long as an ack may
        take (App lock held)."""
        data = self.data
        return data is not None and data.send_wait(msg, self.node.config.ack_timeout)

    def _pump_snapshot(self, now: float) -> float:
        node = self.node
        core, lock = node.core, node.core_lock
        source = self.source
        snap = core.link.snap
        if source is None or snap is None:
            return 0.05  # waiting for clear_state's reply
        if self.progress is not None and snap.acked_seq > self._acked_seen:
            self.progress.add(snap.acked_seq - self._acked_seen)
            self._acked_seen = snap.acked_seq
        if len(self.queue) < node.config.window * 2:
            for msg in source.pump():
                self.produced += 1
                self.queue.append((self.produced, msg))
        if source.failed:
            with lock:
                effects = core.link_failed(ReplicationError(source.failed), now)
            node.run(effects)
            return 0.0
        while self.queue:
            with lock:
                may = core.snapshot_may_send()
            if not may:
                break
            seq, msg = self.queue[0]
            if not self._send(msg):
                break  # not connected yet, or the queue is full: the stall timer decides
            self.queue.popleft()
            with lock:
                core.snapshot_sent(seq, now)
        if source.finished and not self.queue:
            with lock:
                end = core.snapshot_end(self.produced, source.count or 0)
            if end is not None and self._send(end):
                with lock:
                    core.snapshot_end_sent(now)
            return 0.05
        if self.queue:
            return 0.001 if core.snapshot_may_send() else 0.05
        return 0.0 if source.fileno() < 0 else 0.05

    def _pump_catchup(self, now: float) -> float:
        node = self.node
        core, lock = node.core, node.core_lock
        while True:
            with node.applier.lock:  # becoming synchronous needs a position that does not move
                with lock:
                    want, effects = core.catchup_next(now)
                if effects:
                    node.run(effects)
            if want is None:
                if core.link.forwarding:
                    if node.pipeline.pending:
                        node.pipeline.flush()  # submissions waited for this
                    return 0.2
                return 0.05  # the window is full: acks free it
            start, count = want
            try:
                datas = node.storage.read_wal_data(start, count)
            except WALTruncated as exc:
                with lock:
                    effects = core.link_failed(exc, now)
                node.run(effects)
                return 0.0
            if not datas:
                return 0.01
            with lock:
                batch, header = core.catchup_batch(start, len(datas), now)
            if not self._send(protocol.wal_message(header[0], header[1], start, datas,
                                                   header[2])):
                with lock:
                    effects = core.catchup_unsent(batch, now)
                node.run(effects)
                return 0.001
            with lock:
                core.catchup_sent(batch)
