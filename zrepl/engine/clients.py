"""The client endpoint: commands from remote clients (``zrepl.Client``) and
reads (``App.query``).

A submission carries the client's session (id, sequence): the core answers
a retry from the session table instead of applying it twice.  A
``leader_only`` read is answered only while the leader's App holds exactly
the acknowledged writes (the core's read barrier); until then it waits
here, and the commits behind it wait too.  Replies are queued and sent by
the engine's thread.

Dependencies (``node``): the core and its lock, the commit pipeline, the
Applier (App lock, App.query), the client endpoint, the clock, the config.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..core import protocol
from ..core.errors import NotLeader, ProtocolError, ReplicationError, Timeout
from .sinks import CallbackSink, Submission

if TYPE_CHECKING:
    from .replica import Replica


class ClientEndpoint:
    def __init__(self, node: "Replica"):
        self.node = node
        self.replies: collections.deque[tuple[Any, bytes]] = collections.deque()
        self.reads: collections.deque[tuple[Any, Any, bytes, float]] = collections.deque()

    def serve(self) -> None:
        node = self.node
        core = node.core
        now = node.clock.now()
        for handle, payload in node.endpoints_bound.client.drain(node.config.messages_per_turn):
            try:
                op, fields = protocol.parse_client_request(payload)
            except ProtocolError as exc:
                self.replies.append((handle, protocol.submit_reply(None, None, exc)))
                continue
            if op == "query":
                self._query(handle, *fields, now)
                continue
            request_id, data, cid, seq = fields
            session = None if cid is None else (cid, seq)
            try:
                core.check_writable(now)
                if session is not None:
                    with node.core_lock:
                        code = core.check_submission(session, now)
                    if code is not None:
                        self.replies.append((handle, protocol.submit_reply(
                            request_id, code, None, core.position)))
                        continue
            except ReplicationError as exc:
                self.replies.append((handle, protocol.submit_reply(request_id, None, exc)))
                continue
            node.core.counters["client_requests"] += 1
            sink = CallbackSink(self._callback(handle, request_id, session))
            node.pipeline.submit(Submission(sink, datas=[data],
                                            deadline=now + node.config.sync_wait_timeout,
                                            session=session))
        client = node.endpoints_bound.client
        node.core.counters["dropped_messages"] += client.dropped
        node.core.counters["denied_calls"] += client.denied
        client.dropped = client.denied = 0
        node.pipeline.flush()

    def _callback(self, handle: Any, request_id: Any, session: tuple[bytes, int] | None
                  ) -> Callable[[int | None, BaseException | None], None]:
        node = self.node

        def reply(code: int | None, exc: BaseException | None) -> None:
            if session is not None:
                node.core.submission_done(session)  # recorded at apply: see check_submission
            # (the position now is at least this command's WAL id: a client
            # reads its own write from any node with min_wal_id)
            self.replies.append((handle, protocol.submit_reply(
                request_id, code, exc, node.core.position if exc is None else None)))
            if threading.get_ident() != node.engine_ident:
                node.poke()
        return reply

    # --- reads --------------------------------------------------------------------------

    def _query(self, handle: Any, request_id: Any, request: bytes, leader_only: bool,
               min_wal_id: int, now: float) -> None:
        node = self.node
        try:
            with node.applier.lock:
                if min_wal_id > node.core.position and not leader_only:
                    # (a leader read is linearizable: it sees every acknowledged write)
                    raise Timeout(f"node {node.address} has applied WAL id {node.core.position},"
                                  f" not yet {min_wal_id}")
                if leader_only:
                    with node.core_lock:
                        ready = node.core.leader_read(now)
                    if not ready:
                        self.reads.append((handle, request_id, request,
                                           now + node.config.leader_read_timeout))
                        node.core.reads_waiting = len(self.reads)
                        return
                answer = self._ask_app(request)
        except ReplicationError as exc:
            answer = protocol.submit_reply(request_id, None, exc)
            self.replies.append((handle, answer))
            return
        self.replies.append((handle, self._reply(request_id, answer)))

    def _ask_app(self, request: bytes) -> Any:
        """App.query's answer, or the exception it raised (App lock held)."""
        return ask_app(self.node.applier.app.query, request)

    def _reply(self, request_id: Any, answer: Any) -> bytes:
        """A query's reply, with the WAL id the App reflects (App lock
        held) and where this node's readers answer."""
        node = self.node
        if isinstance(answer, bytes):
            node.core.counters["queries"] += 1
        return query_reply(request_id, answer, node.core.position, node.read_endpoint)

    def answer_reads(self, now: float) -> float:
        """Answer the waiting leader reads if the barrier is passed, fail
        them if this node may no longer answer, expire the late ones.
        Returns the seconds until the next deadline."""
        node = self.node
        if not self.reads:
            return 1.0
        failure: NotLeader | None = None
        with node.applier.lock:
            try:
                with node.core_lock:
                    ready = node.core.leader_read(now)
            except NotLeader as exc:
                ready, failure = False, exc
            while ready and self.reads:
                handle, request_id, request, _ = self.reads.popleft()
                self.replies.append((handle, self._reply(request_id, self._ask_app(request))))
        if failure is not None:
            self.fail_reads(failure)
        late = Timeout("the writes applied before this leader read were not acknowledged "
                       f"within {node.config.leader_read_timeout:g}s")
        while self.reads and now >= self.reads[0][3]:  # deadlines in arrival order
            handle, request_id, _, _ = self.reads.popleft()
            self.replies.append((handle, protocol.submit_reply(request_id, None, late)))
        node.core.reads_waiting = len(self.reads)
        if self.reads:
            return max(0.001, self.reads[0][3] - now)
        if node.pipeline.pending:
            node.pipeline.flush()  # commits held for the reads go on
        return 1.0

    def fail_reads(self, exc: BaseException) -> None:
        while self.reads:
            handle, request_id, _, _ = self.reads.popleft()
            self.replies.append((handle, protocol.submit_reply(request_id, None, exc)))
        self.node.core.reads_waiting = 0

    def send_replies(self) -> None:
        node = self.node
        client = node.endpoints_bound.client
        while self.replies:
            handle, payload = self.replies.popleft()
            if client.reply(handle, payload):
                node.core.counters["client_replies"] += 1
            else:
                node.core.counters["client_replies_dropped"] += 1  # the client went away


def ask_app(query: Callable[[bytes], Any], request: bytes) -> Any:
    """``App.query(request)``'s answer, or the exception it raised (user
    code: a bad request must not kill the caller).  The node's engine and
    its reader processes both ask this way."""
    try:
        answer = query(request)
        if type(answer) is not bytes:
            raise ReplicationError(f"App.query returned {type(answer).__name__}, not bytes")
        return answer
    except Exception as exc:  # noqa: BLE001 - answered as an error
        return exc


def query_reply(request_id: Any, answer: Any, wal_id: int, readers: str) -> bytes:
    """The client reply for :func:`ask_app`'s ``answer`` at ``wal_id``."""
    if isinstance(answer, bytes):
        return protocol.submit_reply(request_id, answer, None, wal_id, readers)
    if isinstance(answer, ReplicationError):
        return protocol.submit_reply(request_id, None, answer, wal_id, readers)
    detail = str(answer) if isinstance(answer, (ValueError, TypeError)) else \
        f"{type(answer).__name__}: {answer}"
    return protocol.submit_reply(request_id, None, ProtocolError(f"bad query: {detail}"),
                                 wal_id, readers)
