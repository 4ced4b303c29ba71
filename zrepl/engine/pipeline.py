"""The commit pipeline: the leader's write path and the reading of acks.

Group commit, first waiter leads: ``Manager.apply`` queues its command and,
if no other thread holds the App lock, becomes the *batch leader*: it takes
every queued command, sends them as one batch to a synchronous follower,
writes the batch to the WAL and applies it while the follower does the
same, then waits for the acknowledgement by reading the ack endpoint
itself.  A caller that finds the ack endpoint taken waits for whoever reads
it to resolve its command.  The core decides (may we commit, is the batch
sent, what do its callers hear); this object does the work on whichever
thread commits: a caller's on the hot path (no hand-off between threads:
in CPython a wake-up costs ~10 µs), the engine's otherwise.

Dependencies (``node``): the core and its lock, the Applier (App, WAL,
App lock), the downstream link (to send), the ack endpoint, the clock, the
config, the effects runner and ``poke`` (wake the engine's thread).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..core import protocol
from ..core.errors import NotLeader, ProtocolError, ReplicationError, StorageError, Timeout
from ..core.node import OPEN, WAIT_SYNC, WINDOW_FULL
from ..core.protocol import ACK, MEMBER_ACK, codes_to_bytes
from ..core.session import wrap_client, wrap_plain_all
from .applier import LoggedDespiteError
from .sinks import FutureSink, Sink, Submission, WaitSink

if TYPE_CHECKING:
    from .replica import Replica


class CommitPipeline:
    def __init__(self, node: "Replica"):
        self.node = node
        self.pending: collections.deque[Submission] = collections.deque()
        self._ack_lock = threading.Lock()
        self.ack_owner = 0  # thread ident reading acks (0: none)

    # --- submitting -----------------------------------------------------------

    def _not_started(self) -> NotLeader:
        return NotLeader(f"node {self.node.address} is not running", "")

    def apply_blocking(self, cmds: list) -> list[int]:
        node = self.node
        if node.core is None:
            raise self._not_started()
        if not node.transport.threaded and node.engine_ident == threading.get_ident():
            raise ReplicationError("this node is driven step by step (in-memory transport): "
                                   "use apply_async, a blocking apply would wait forever")
        cfg = node.config
        now = node.clock.now()
        node.core.check_writable(now)  # fail fast (the commit checks again, App lock held)
        sink = WaitSink(len(cmds))
        sub = Submission(sink, cmds, None, now + (
            cfg.sync_wait_timeout if cfg.require_sync else cfg.commit_timeout))
        self.pending.append(sub)
        self.flush()
        if not sink.resolved:
            self._wait(sink, sub, now + cfg.commit_timeout)
        if sink.error is not None:
            raise sink.error
        return sink.codes

    def apply_async(self, cmd: Any) -> concurrent.futures.Future:
        node = self.node
        fut: concurrent.futures.Future = concurrent.futures.Future()
        now = node.clock.now()
        try:
            if node.core is None:
                raise self._not_started()
            node.core.check_writable(now)
            if len(self.pending) >= node.config.max_pending and node.transport.threaded:
                # Backpressure: the queue is full, so this caller waits for
                # its own command like apply() would.
                fut.set_result(self.apply_blocking([cmd])[0])
                return fut
        except Exception as exc:  # noqa: BLE001 - the future carries it
            fut.set_exception(exc)
            return fut
        self.pending.append(Submission(FutureSink(fut), cmds=[cmd],
                                       deadline=now + node.config.sync_wait_timeout))
        self.flush()
        if not fut.done():
            node.poke()  # nobody waits here: the engine reads the ack
        return fut

    def submit(self, sub: Submission) -> None:
        """A remote client's command (from the engine's thread)."""
        self.pending.append(sub)

    # --- committing ------------------------------------------------------------

    def flush(self) -> None:
        """Group commit: whoever gets the App lock commits everything queued;
        a thread that does not get it leaves its submission to the holder,
        which looks at the queue again after releasing the lock."""
        lock = self.node.applier.lock
        while self.pending:
            if not lock.acquire(blocking=False):
                return
            try:
                gate = self._commit_locked()
            finally:
                lock.release()
            if gate != OPEN:
                return  # they wait for a synchronous follower, the window or a read

    def _commit_locked(self) -> int:
        """Pack queued submissions into batches and commit them; the commit
        gate that stopped it.  App lock held."""
        node = self.node
        cfg = node.config
        core = node.core
        pending = self.pending
        now = node.clock.now()
        try:
            core.check_writable(now)
        except NotLeader as exc:
            self.fail_pending(exc)
            return OPEN
        max_n, max_size = cfg.max_batch_entries, cfg.max_batch_data
        while True:
            if not pending:
                return OPEN
            gate = core.commit_gate()
            if gate != OPEN:
                if gate == WAIT_SYNC:
                    self.expire_pending(now)
                return gate  # WINDOW_FULL: whoever reads the next ack commits the rest
            wal_datas: list[bytes] = []
            cmds: list = []
            sessions: list[tuple[int, bytes, int]] = []
            pieces: list[tuple[Sink, int, int]] = []
            next_id = core.position + 1
            n = size = 0
            while pending and n < max_n and size < max_size:
                sub = pending[0]
                start = sub.taken
                take = sub.size - start
                if take > max_n - n:
                    take = max_n - n
                try:
                    new_datas, new_cmds = self._prepare(sub, start, take, next_id + n)
                except Exception as exc:  # the App refused to encode/decode one
                    pending.popleft()
                    sub.sink.fail(exc if isinstance(exc, (ValueError, TypeError, ReplicationError))
                                  else ReplicationError(f"command rejected by the App: {exc!r}"))
                    continue
                if sub.session is not None:
                    sessions.append((n, sub.session[0], sub.session[1]))
                wal_datas += new_datas
                cmds += new_cmds
                size += len(new_datas[0]) * take  # an estimate is enough here
                pieces.append((sub.sink, start, take))
                n += take
                sub.taken = start + take
                if sub.taken >= sub.size:
                    pending.popleft()
            if wal_datas:
                self._commit_batch(next_id, wal_datas, cmds, sessions, pieces, now)

    def _prepare(self, sub: Submission, start: int, count: int, first_id: int
                 ) -> tuple[list[bytes], list]:
        """The WAL envelopes and the decoded commands of part of a submission."""
        applier = self.node.applier
        if sub.cmds is not None:
            cmds = sub.cmds if count == sub.size else sub.cmds[start:start + count]
            datas = applier.encode_cmds(cmds, first_id)
            if len(datas) != count:
                raise ReplicationError(f"App.encode_cmds gave {len(datas)} entries for "
                                       f"{count} commands")
            try:
                return wrap_plain_all(datas), cmds
            except TypeError:
                raise TypeError("App.encode_cmd must set entry.data to bytes") from None
        raw = sub.datas if count == sub.size else sub.datas[start:start + count]  # type: ignore
        cmds = applier.decode_cmds(raw, first_id)
        if len(cmds) != count:
            raise ReplicationError(f"App.decode_cmds gave {len(cmds)} commands for {count} "
                                   "entries")
        if sub.session is not None:
            return [wrap_client(sub.session[0], sub.session[1], raw[0])], cmds
        return wrap_plain_all(raw), cmds

    def _commit_batch(self, first: int, datas: list[bytes], cmds: list,
                      sessions: list[tuple[int, bytes, int]],
                      pieces: list[tuple[Sink, int, int]], now: float) -> None:
        """Send (when the link forwards), write and apply one batch.  App
        lock held.

        Sending first lets the follower work while the leader writes and
        applies; nothing is answered before both halves are done, and a
        leader that dies in between leaves a follower *ahead* of it, which
        the handshake treats as divergence (state sync), never as loss.
        """
        node = self.node
        core, lock = node.core, node.core_lock
        last = first + len(datas) - 1
        payload = protocol.packb(datas)  # once, for the wire and the WAL
        with lock:
            batch, header = core.open_batch(first, last, pieces, now)
        if header is not None:
            msg = protocol.wal_frame(header[0], header[1], first, payload, header[2])
            if not node.downstream.send_wait(msg):
                with lock:
                    effects = core.link_failed(Timeout(
                        f"cannot send to follower {core.link.address}: its queue stayed full "
                        f"for {node.config.ack_timeout:g}s or it is gone"), now)
                node.run(effects)
        try:
            node.storage.write_wal_data(first, datas, payload)
        except StorageError as exc:
            applied = None
            try:
                node.applier.follow_the_log(exc, first, len(datas),
                                            lambda: node.applier.apply(cmds, last), sessions)
            except LoggedDespiteError as logged:
                exc, applied = logged, (logged.codes, logged.sessions)
            with lock:
                effects = core.batch_failed(batch, exc, False, now, applied)
            node.run(effects)
            return
        try:
            codes = node.applier.apply(cmds, last)
            if len(codes) != len(cmds):
                raise ValueError(f"App.apply returned {len(codes)} codes for {len(cmds)} commands")
            cb = codes_to_bytes(codes)
        except Exception as exc:
            # The batch is in the WAL already: this App is broken.
            with lock:
                effects = core.batch_failed(batch, ReplicationError(f"App.apply failed: {exc!r}"),
                                            True, now)
            node.run(effects)
            return
        node.storage.set_max_applied_wal(last)
        with lock:
            effects = core.batch_applied(batch, codes, cb, sessions, now)
        if effects:
            node.run(effects)
        node.checkpointer.after_apply(last)

    # --- waiting ---------------------------------------------------------------

    def _wait(self, sink: WaitSink, sub: Submission, deadline: float) -> None:
        """Wait for ``sink``, helping rather than sleeping:

        * still queued and the gate is open: take the App lock (blocking:
          whoever holds it may be forking a snapshot, not committing) and
          commit the queue ourselves;
        * still queued behind a full window, or in flight: read acks
          ourselves unless another thread does (then it resolves us, or
          commits the queue when the window frees).

        The short timed waits are a safety net only: every resolution
        releases the sink's lock at once."""
        node = self.node
        cfg = node.config
        clock = node.clock
        core = node.core
        lock = node.applier.lock
        while not sink.resolved:
            now = clock.now()
            if now >= deadline or (sub.taken == 0 and now >= sub.deadline):
                self._abandon(sub, sink)
                return
            if sub.taken == 0:
                gate = core.commit_gate()
                if gate == OPEN:
                    if lock.acquire(timeout=min(0.05, deadline - now)):
                        try:
                            self._commit_locked()
                        finally:
                            lock.release()
                    continue
                if gate == WINDOW_FULL and self.take_ack_role():
                    try:
                        self.read_acks(lambda: sub.taken > 0 or sink.resolved,
                                       min(deadline, sub.deadline, now + cfg.ack_timeout))
                    finally:
                        self.release_ack_role()
                else:
                    sink.wait(min(0.05, sub.deadline - now, deadline - now))
                continue
            if core.awaiting_acks() and self.take_ack_role():
                try:
                    self.read_acks(lambda: sink.resolved, min(deadline, now + cfg.ack_timeout * 2))
                finally:
                    self.release_ack_role()
            else:
                sink.wait(min(0.05, deadline - now))

    def _abandon(self, sub: Submission, sink: WaitSink) -> None:
        node = self.node
        with node.applier.lock:
            if sub.taken == 0 and sub in self.pending:
                self.pending.remove(sub)
                if node.core.commit_gate() == WAIT_SYNC:
                    sink.fail(self._no_sync_follower())
                else:
                    sink.fail(Timeout("command was not committed in time; nothing was written"))
                return
        sink.fail(Timeout(f"commit not confirmed within {node.config.commit_timeout:g}s "
                          "(outcome unknown)"))

    def expire_pending(self, now: float) -> None:
        """require_sync: fail queued submissions whose wait ran out.  App lock held."""
        keep: collections.deque[Submission] = collections.deque()
        while self.pending:
            sub = self.pending.popleft()
            if sub.taken == 0 and now >= sub.deadline:
                sub.sink.fail(self._no_sync_follower())
            else:
                keep.append(sub)
        self.pending.extend(keep)

    def _no_sync_follower(self) -> Timeout:
        return Timeout(f"no synchronous follower within {self.node.config.sync_wait_timeout:g}s "
                       "(require_sync): nothing was written")

    def fail_pending(self, exc: BaseException) -> None:
        while self.pending:
            self.pending.popleft().sink.fail(exc)

    # --- acks --------------------------------------------------------------------

    def take_ack_role(self) -> bool:
        """Become the thread that reads acks, if nobody is (check
        ``ack_owner`` first where the caller may hold it already)."""
        if self._ack_lock.acquire(blocking=False):
            self.ack_owner = threading.get_ident()
            return True
        return False

    def release_ack_role(self, hand_over: bool = True) -> None:
        self.ack_owner = 0
        self._ack_lock.release()
        node = self.node
        if hand_over and node.core.awaiting_acks() and \
                threading.get_ident() != node.engine_ident:
            node.poke()  # the engine takes over reading

    def read_acks(self, done: Callable[[], bool], deadline: float) -> None:
        """Read acks until ``done()`` or ``deadline``.  One message per
        wake-up: the common case (one batch, one ack) returns as soon as it
        is handled, and whatever else is queued waits for the next reader."""
        node = self.node
        acks = node.endpoints_bound.ack
        clock = node.clock
        core = node.core
        while not done():
            now = clock.now()
            overdue_at = core.ack_deadline()
            if overdue_at is not None and now >= overdue_at:
                with node.core_lock:
                    effects = core.check_acks(now)
                node.run(effects)
                return
            until = deadline if overdue_at is None else min(deadline, overdue_at)
            if now >= until:
                return
            raw = acks.recv_wait(until - now)
            if raw is not None:
                self.handle_ack(raw)

    def drain_acks(self) -> None:
        for raw in self.node.endpoints_bound.ack.drain(self.node.config.messages_per_turn):
            self.handle_ack(raw)

    def handle_ack(self, raw: bytes) -> None:
        node = self.node
        try:
            msg = protocol.parse_ack(raw)
        except ProtocolError as exc:
            node.core.counters["dropped_messages"] += 1
            node.log.warning("dropped a bad ack: %s", exc)
            return
        what = msg[0]
        with node.core_lock:
            core = node.core
            if what == ACK:
                effects = core.on_ack(msg[1], msg[2], msg[3], msg[4], msg[5], node.clock.now(),
                                      msg[6])
            elif what == MEMBER_ACK:
                effects = core.on_member_ack(*msg[1:], node.clock.now())
            else:
                effects = core.on_member_drop(*msg[1:], node.clock.now())
        if effects:
            node.run(effects)
        if self.pending:
            self.flush()  # the window has room again
