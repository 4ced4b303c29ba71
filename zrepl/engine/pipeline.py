"""The commit pipeline: the leader's write path and the reading of acks.

Part of :class:`zrepl.Replica` (a mixin: its state lives in
``Replica.__init__``; see the theory of operation in ``replica.py``).
Everything here runs on whichever thread commits or reads acks: caller
threads on the hot path, the engine thread otherwise.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Any, Callable

import zmq

from ..core import protocol
from .commit import Batch, FutureSink, Sink, Submission, WaitSink
from ..core.errors import (
    FollowerMismatch,
    NotLeader,
    ProtocolError,
    ReplicationError,
    StorageError,
    Timeout,
)
from ..core.protocol import ACK, STATE, STATE_END, WAL, codes_from_bytes, codes_to_bytes
from ..storage.base import entries_from
from ..core.session import wrap_client, wrap_plain
from ..core.types import WALEntry
from .zmqutil import NOBLOCK as _NOBLOCK
from .zmqutil import ready as _ready


class CommitPipeline:
    """Group commit, the synchronous wait, and acknowledgements."""

    def _check_writable(self) -> None:
        if self._stopping or not self._started:
            raise NotLeader(f"node {self.address} is not running", "")
        if not self._is_leader:
            raise NotLeader(f"{self.address} is not the leader", self._leader_address)
        if self._lease_enforced and time.monotonic() > self._lease_until:
            raise NotLeader(f"{self.address} holds no valid leader lease (the supervisor has "
                            "not renewed it): not accepting writes", "")

    def _apply_blocking(self, cmds: list) -> list[int]:
        if not self._is_leader or self._stopping or self._lease_enforced:
            self._check_writable()
        cfg = self.config
        sink = WaitSink(len(cmds))
        now = time.monotonic()
        sub = Submission(sink, cmds, None, now + (
            cfg.sync_wait_timeout if cfg.require_sync else cfg.commit_timeout))
        self._pending.append(sub)
        self._flush_pending()
        if not sink.resolved:
            self._wait(sink, sub, now + cfg.commit_timeout)
        if sink.error is not None:
            raise sink.error
        return sink.codes

    def _apply_async(self, cmd: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._check_writable()
            if len(self._pending) >= self.config.max_pending:
                # Backpressure: the queue is full, so this caller waits for
                # its own command like apply() would.
                fut.set_result(self._apply_blocking([cmd])[0])
                return fut
        except Exception as exc:  # noqa: BLE001 - the future carries it
            fut.set_exception(exc)
            return fut
        sub = Submission(FutureSink(fut), cmds=[cmd],
                         deadline=time.monotonic() + self.config.sync_wait_timeout)
        self._pending.append(sub)
        self._flush_pending()
        if not fut.done():
            self._poke()  # nobody waits here: the engine reads the ack
        return fut

    def _flush_pending(self) -> None:
        """Group commit: whoever gets the App lock commits everything queued;
        a thread that does not get it leaves its submission to the holder,
        which looks at the queue again after releasing the lock."""
        while self._pending:
            if not self._app_lock.acquire(blocking=False):
                return
            try:
                self._commit_pending_locked()
            finally:
                self._app_lock.release()
            if self.config.require_sync and not self._synchronous:
                return  # they wait for a synchronous follower (or time out)
            if self._synchronous and len(self._inflight) >= self.config.window:
                return  # the next ack commits what is queued

    def _commit_pending_locked(self) -> None:
        """Pack queued submissions into batches and commit them.  App lock held."""
        cfg = self.config
        pending = self._pending
        if not self._is_leader or self._stopping or (
                self._lease_enforced and time.monotonic() > self._lease_until):
            self._fail_pending(NotLeader(f"{self.address} is not the leader or holds no valid "
                                         "lease", self._leader_address))
            return
        max_n, max_size = cfg.max_batch_entries, cfg.max_batch_data
        while pending:
            if cfg.require_sync and not self._synchronous:
                self._expire_pending(time.monotonic())
                return
            if self._synchronous and len(self._inflight) >= cfg.window:
                # The window is full: leave the rest queued.  Whoever reads
                # the next ack commits it, as one batch (group commit).
                return
            wal_datas: list[bytes] = []
            cmds: list = []
            sessions: list[tuple[int, bytes, int]] = []
            pieces: list[tuple[Sink, int, int]] = []
            next_id = self._position + 1
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
                self._commit_batch(next_id, wal_datas, cmds, sessions, pieces)

    def _prepare(self, sub: Submission, start: int, count: int, first_id: int
                 ) -> tuple[list[bytes], list]:
        """The WAL envelopes and the decoded commands of part of a submission."""
        app = self.app
        if sub.cmds is not None:
            cmds = sub.cmds[start:start + count]
            entries = [app.encode_cmd(c, WALEntry(i)) for i, c in enumerate(cmds, first_id)]
            try:
                datas = [wrap_plain(e.data) for e in entries]
            except TypeError:
                raise TypeError("App.encode_cmd must set entry.data to bytes") from None
            return datas, cmds
        raw = sub.datas[start:start + count]  # type: ignore[index]
        cmds = [app.decode_cmd(e) for e in entries_from(first_id, raw)]
        if sub.session is not None:
            return [wrap_client(sub.session[0], sub.session[1], raw[0])], cmds
        return [wrap_plain(d) for d in raw], cmds

    def _commit_batch(self, first: int, datas: list[bytes], cmds: list,
                      sessions: list[tuple[int, bytes, int]],
                      pieces: list[tuple[Sink, int, int]]) -> None:
        """Send (when synchronous), write and apply one batch.  App lock held.

        Sending first lets the follower work while the leader writes and
        applies; nothing is answered before both halves are done, and a
        leader that dies in between leaves a follower *ahead* of it, which
        the handshake treats as divergence (state sync), never as loss.
        """
        last = first + len(datas) - 1
        batch = Batch(first, last, pieces)
        sent = self._synchronous and self._send_downstream(batch, datas)
        try:
            self.storage.write_wal_data(first, datas)
        except StorageError as exc:
            self._report_failed(f"WAL write failed: {exc}")
            self._abandon_batch(batch, sent, exc)
            return
        try:
            codes = self.app.apply(cmds)
            if len(codes) != len(cmds):
                raise ValueError(f"App.apply returned {len(codes)} codes for {len(cmds)} commands")
            cb = codes_to_bytes(codes)
        except Exception as exc:
            # The batch is in the WAL already: this App is broken.
            self._position = last
            self._report_failed(f"App.apply failed on WAL {first}..{last}: {exc!r}")
            self._abandon_batch(batch, sent, ReplicationError(f"App.apply failed: {exc!r}"))
            return
        self._position = last
        self.storage.set_max_applied_wal(last)
        self._sessions.record_batch(first, codes, sessions)
        if sent:
            self._complete_local(batch, codes, cb)
        else:
            batch.set_local(codes, cb)
            if self.config.require_sync:
                self._resolve_unacked(batch, self._link_broken or Timeout("no synchronous follower"))
            else:
                batch.resolve()
        self._after_commit()

    def _complete_local(self, batch: Batch, codes: list[int], cb: bytes) -> None:
        """The local half of a sent batch is done.  On an asynchronous link
        (``sync_downstream = false``) its callers are answered now; the
        follower's ack is still awaited, compared and counted."""
        if not self.config.sync_downstream and batch.pieces:
            batch.codes = codes
            batch.resolve()
            with self._inflight_lock:
                batch.pieces = []
        with self._inflight_lock:
            finalize = batch.set_local(codes, cb)
        if finalize:
            self._finalize(batch)

    def _abandon_batch(self, batch: Batch, sent: bool, exc: BaseException) -> None:
        """The local half of a batch failed: fail its callers; if it was
        sent, the follower may hold what this node does not: restart the link."""
        batch.fail(exc)
        with self._inflight_lock:
            batch.pieces = []
            batch.set_local(None, None)
        if sent:
            self._link_failure(ReplicationError(f"leader could not log WAL {batch.first}.."
                                                f"{batch.last} after sending it: {exc}"))

    def _after_commit(self) -> None:
        cfg = self.config
        if cfg.checkpoint_entries and self._position - self._ckpt_position >= cfg.checkpoint_entries:
            if not self._ckpt_requested:
                self._ckpt_requested = True
                self._poke()

    def _send_downstream(self, batch: Batch, datas: list[bytes]) -> bool:
        """Put ``batch`` in flight and send it.  App lock held.  False if the
        link is down (the caller resolves the batch by policy)."""
        try:
            return self._send_wal(batch, datas, self._send_waiting, synchronous_only=True)
        except (zmq.ZMQError, AttributeError) as exc:
            self._link_failure(Timeout(f"cannot send to follower {self._sync.address}: {exc} "
                                       f"({len(self._inflight)} batches in flight)"))
            return False

    def _send_waiting(self, msg: bytes) -> bool:
        """Send on the data socket; when its queue is full for a moment, wait
        for room as long as an ack may take, then raise.  App lock held."""
        sock = self._data_out
        try:
            sock.send(msg, _NOBLOCK)  # type: ignore[union-attr]
        except zmq.Again:
            if not sock.poll(int(self.config.ack_timeout * 1000), zmq.POLLOUT):  # type: ignore[union-attr]
                raise
            sock.send(msg, _NOBLOCK)  # type: ignore[union-attr]
        return True

    def _unsent_history(self) -> list | None:
        """The epoch history if this stream has not had its current version."""
        if self._history_sent == self._history_version:
            return None
        return [list(x) for x in self._history]

    def _send_wal(self, batch: Batch, datas: list[bytes], send: Callable[[bytes], bool],
                  synchronous_only: bool = False) -> bool:
        """Append ``batch`` to the in-flight queue and ``send`` it - with the
        epoch history if this stream has not had its current version (the
        first batch of a stream always carries it).  A send that returns
        False or raises takes the batch back out; the history then counts
        as not sent, so the retry carries it.  ``synchronous_only``: refuse
        (False) unless the link is up and synchronous, checked under the
        same lock that appends."""
        with self._inflight_lock:
            if synchronous_only and (self._link_broken is not None or not self._synchronous):
                return False
            self._inflight.append(batch)
        version = self._history_version
        history = self._unsent_history()
        sent = False
        try:
            sent = send(protocol.wal_message(self.storage.leader_id(), self._stream_out,
                                             batch.first, datas, history))
        finally:
            if sent:
                self._history_sent = version
            else:
                with self._inflight_lock:
                    if self._inflight and self._inflight[-1] is batch:
                        self._inflight.pop()
        return sent

    def _wait(self, sink: WaitSink, sub: Submission, deadline: float) -> None:
        """Wait for ``sink``, helping rather than sleeping:

        * still queued and the window has room: take the App lock (blocking:
          whoever holds it may be forking a snapshot, not committing) and
          commit the queue ourselves;
        * still queued behind a full window, or in flight: read acks
          ourselves unless another thread does (then it resolves us, or
          commits the queue when the window frees).

        The short timed waits are a safety net only: every resolution
        releases the sink's lock at once."""
        cfg = self.config
        while not sink.resolved:
            now = time.monotonic()
            if now >= deadline or (sub.taken == 0 and now >= sub.deadline):
                self._abandon(sub, sink)
                return
            if sub.taken == 0:
                blocked = (cfg.require_sync and not self._synchronous) or \
                    (self._synchronous and len(self._inflight) >= cfg.window)
                if not blocked:
                    if self._app_lock.acquire(timeout=min(0.05, deadline - now)):
                        try:
                            self._commit_pending_locked()
                        finally:
                            self._app_lock.release()
                    continue
                if self._inflight and self._take_ack_role():
                    try:
                        self._read_acks(lambda: sub.taken > 0 or sink.resolved,
                                        min(deadline, sub.deadline, now + cfg.ack_timeout))
                    finally:
                        self._release_ack_role()
                else:
                    sink.wait(min(0.05, sub.deadline - now, deadline - now))
                continue
            if self._inflight and self._take_ack_role():
                try:
                    self._read_acks(lambda: sink.resolved, min(deadline, now + cfg.ack_timeout * 2))
                finally:
                    self._release_ack_role()
            else:
                sink.wait(min(0.05, deadline - now))

    def _abandon(self, sub: Submission, sink: WaitSink) -> None:
        with self._app_lock:
            if sub.taken == 0 and sub in self._pending:
                self._pending.remove(sub)
                if self.config.require_sync and not self._synchronous:
                    sink.fail(self._no_sync_follower())
                else:
                    sink.fail(Timeout("command was not committed in time; nothing was written"))
                return
        sink.fail(Timeout(f"commit not confirmed within {self.config.commit_timeout:g}s "
                          "(outcome unknown)"))

    def _expire_pending(self, now: float) -> None:
        """require_sync: fail queued submissions whose wait ran out.  App lock held."""
        keep = collections.deque()
        while self._pending:
            sub = self._pending.popleft()
            if sub.taken == 0 and now >= sub.deadline:
                sub.sink.fail(self._no_sync_follower())
            else:
                keep.append(sub)
        self._pending.extend(keep)

    def _no_sync_follower(self) -> Timeout:
        return Timeout(f"no synchronous follower within {self.config.sync_wait_timeout:g}s "
                       "(require_sync): nothing was written")

    def _fail_pending(self, exc: BaseException) -> None:
        while self._pending:
            self._pending.popleft().sink.fail(exc)

    def _take_ack_role(self) -> bool:
        """Become the thread that reads acks, if nobody is (check
        ``_ack_owner`` first where the caller may hold it already)."""
        if self._ack_lock.acquire(blocking=False):
            self._ack_owner = threading.get_ident()
            return True
        return False

    def _ack_limit(self) -> float:
        """How long this node waits for its follower's ack.  Deeper in a
        chain means shorter (10 % of ``ack_timeout`` less per hop, at least
        20 %), so when a tail hangs, the link next to it fails first and
        its upstream is answered before the upstream's own timer fires."""
        return self.config.ack_timeout * max(0.2, 1.0 - 0.1 * self._depth)

    def _ack_overdue(self, now: float) -> bool:
        """The oldest batch in flight waited longer than ``_ack_limit()``:
        the link fails (True)."""
        limit = self._ack_limit()
        if self._inflight and now - self._inflight[0].sent > limit:
            self._link_failure(Timeout(
                f"follower {self._sync.address} did not acknowledge within {limit:g}s"))
            return True
        return False

    def _release_ack_role(self, hand_over: bool = True) -> None:
        self._ack_owner = 0
        self._ack_lock.release()
        if hand_over and self._inflight and threading.get_ident() != self._engine_ident:
            self._poke()  # the engine takes over reading

    def _read_acks(self, done: Callable[[], bool], deadline: float) -> None:
        """Read acks until ``done()`` or ``deadline``.  One message per
        wake-up: the common case (one batch, one ack) returns as soon as it
        is handled, and whatever else is queued waits for the next reader."""
        sock = self._ack_in
        poll = self._ack_poller.poll
        while not done():
            now = time.monotonic()
            if self._inflight:
                if self._ack_overdue(now):
                    return
                until = min(deadline, self._inflight[0].sent + self._ack_limit())
            else:
                until = deadline
            if now >= until:
                return
            if poll(max(1, int((until - now) * 1000 + 0.999))):
                try:
                    raw = sock.recv(_NOBLOCK)
                except zmq.Again:
                    continue
                self._handle_ack(raw)

    def _drain_acks(self) -> None:
        for raw in _ready(self._ack_in):
            self._handle_ack(raw)

    def _handle_ack(self, raw: bytes) -> None:
        try:
            msg = protocol.parse_data(raw)
            if msg[1] != ACK:
                raise ProtocolError("expected an ack on the ack endpoint")
        except ProtocolError as exc:
            self._dropped += 1
            self.log.warning("dropped a bad ack: %s", exc)
            return
        _, _, stream, kind, position, codes, err = msg
        if stream == 0 or stream != self._stream_out:
            self._dropped += 1
            return  # from an older conversation
        if err is not None:
            self._link_failure(protocol.error_from_wire(err))
            return
        if kind == WAL:
            finalize = False
            with self._inflight_lock:
                if not self._inflight or self._inflight[0].last != position:
                    expected = self._inflight[0].last if self._inflight else None
                    batch = None
                else:
                    batch = self._inflight.popleft()
                    finalize = batch.set_remote(codes)
            if batch is None:
                self._link_failure(ProtocolError(
                    f"follower acknowledged WAL {position}, expected {expected}"))
                return
            if position > self._acked:
                self._acked = position
                if position >= self._position:
                    self._synced_at = time.monotonic()
            if finalize:
                self._finalize(batch)
            if self._pending:
                self._flush_pending()  # the window has room again
        elif kind in (STATE, STATE_END):
            snap = self._snap_out
            if snap is not None and snap.stream == stream:
                if kind == STATE:
                    if position > snap.acked_seq:
                        snap.progress.add(position - snap.acked_seq)
                        snap.acked_seq = position
                else:
                    snap.done = True
                snap.last_progress = time.monotonic()
        else:
            self._link_failure(ProtocolError(f"ack of unknown kind {kind}"))

    def _link_failure(self, exc: BaseException) -> None:
        """The downstream link failed: stop sending, resolve what is in
        flight by policy, and let the engine thread reconnect."""
        with self._inflight_lock:
            if self._link_broken is not None:
                return
            self._link_broken = exc
            self._synchronous = False
            ready = self._fail_inflight_locked(exc)
        self.log.warning("link to follower %s failed: %s", self._sync.address, exc)
        for b in ready:
            self._finalize(b)
        self._poke()

    def _fail_inflight_locked(self, exc: BaseException) -> list[Batch]:
        """Give every batch in flight the link's failure as its remote half;
        returns those whose local half is done too.  In-flight lock held."""
        ready = [b for b in self._inflight if b.set_remote(exc)]
        self._inflight.clear()
        return ready

    def _finalize(self, batch: Batch) -> None:
        """Both halves of a batch are known: answer its callers."""
        remote = batch.remote
        if isinstance(remote, BaseException):
            self._resolve_unacked(batch, remote)
        elif batch.codes_bytes is not None and remote != batch.codes_bytes:
            exc = FollowerMismatch(
                f"follower {self._sync.address} answered {codes_from_bytes(remote)[:8]} "
                f"where the leader answered {(batch.codes or [])[:8]} for WAL "
                f"{batch.first}..{batch.last}: the App is not deterministic")
            batch.fail(exc)
            self._link_failure(exc)
        else:
            batch.resolve()

    def _resolve_unacked(self, batch: Batch, exc: BaseException) -> None:
        if not batch.pieces:
            return
        if self.config.require_sync or isinstance(exc, FollowerMismatch):
            batch.fail(exc if isinstance(exc, FollowerMismatch) else Timeout(
                f"follower did not acknowledge WAL {batch.first}..{batch.last} ({exc}); "
                "the write is on the leader only (outcome unknown)"))
        else:
            batch.resolve()  # availability first: committed on the leader
