"""Handles on remote nodes: the supervisor's ``Node``, a leader's
``Follower``, and the client that submits commands."""

from __future__ import annotations

import collections
import itertools
import os
import random
import threading
import time
from typing import Any, Callable

import zmq

from ..core import protocol
from ..core.errors import NotLeader, ProtocolError, ReplicationError, SessionExpired, Timeout
from ..core.interfaces import Follower, Node
from .rpc import RpcClient, new_context
from .security import KeyFileError, from_config
from ..core.epochs import FollowerInfo
from ..core.config import Config
from ..core.types import NodeRole, NodeStatus, WALEntry


class NodeClient(Node):
    """``Node`` over a node's control endpoint.  Thread-safe (one call at a
    time).  Every call raises ``Timeout`` if the node does not answer within
    ``timeout`` seconds, or the ``ReplicationError`` the node reported."""

    def __init__(self, address: str, timeout: float = 1.0, config: Config | None = None):
        self.address = address
        self._rpc = RpcClient(protocol.endpoints(address).control, timeout,
                              security=from_config(config))
        self._lock = threading.Lock()

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        with self._lock:
            return self._rpc.call(op, timeout, **args)

    def status(self) -> NodeStatus:
        raw = self.call("status")
        try:
            return NodeStatus.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"{self.address} sent a malformed status: {exc}") from None

    def set_role(self, role: NodeRole, leader_id: int) -> None:
        self.call("set_role", role=int(role), leader_id=leader_id)

    def set_leader(self, address: str) -> None:
        self.call("set_leader", address=address)

    def step_down(self, leader_id: int, successor: str) -> None:
        """A planned switchover's first step (the supervisor's to make)."""
        self.call("step_down", leader_id=leader_id, successor=successor)

    def set_follower(self, address: str) -> None:
        self.call("set_follower", address=address)

    def stop(self) -> None:
        self.call("stop")

    # diagnostics (not part of the seed's Node)
    def ping(self, timeout: float | None = None) -> bool:
        return self.call("ping", timeout) == "pong"

    def dump_state(self, limit: int = 1_000_000) -> list[bytes]:
        return self.call("dump_state", limit=limit)

    def state_digest(self) -> dict:
        return self.call("state_digest")

    def checkpoint(self) -> int:
        return self.call("checkpoint")

    def close(self) -> None:
        with self._lock:
            self._rpc.close()

    def __enter__(self) -> "NodeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteFollower(Follower):
    """The seed's ``Follower`` as blocking control calls.  The engine uses
    the pipelined data path instead; this handle serves tools and tests."""

    def __init__(self, address: str, timeout: float = 1.0, upstream_address: str = "",
                 config: Config | None = None):
        self._node = NodeClient(address, timeout, config)
        self._upstream = upstream_address
        self._stream = 0

    def handshake(self, leader_id: int, address: str,
                  epoch_history: list[tuple[int, int]] | None = None) -> FollowerInfo:
        self._stream = random.getrandbits(63) or 1
        info = self._node.call("connect", leader_id=leader_id, address=address,
                               stream=self._stream,
                               epoch_history=[list(x) for x in epoch_history or []])
        return FollowerInfo.from_reply(info)

    def connect(self, leader_id: int, address: str) -> None:
        self.handshake(leader_id, address)

    def max_applied_wal(self) -> int:
        return self._node.call("max_applied_wal")

    def clear_state(self, leader_id: int) -> None:
        self._node.call("clear_state", leader_id=leader_id)

    def apply_state(self, leader_id: int, entries: list[WALEntry]) -> None:
        self._node.call("apply_state", leader_id=leader_id, datas=[e.data for e in entries])

    def apply_wal(self, leader_id: int, entries: list[WALEntry]) -> list[int]:
        if not entries:
            return []
        return self._node.call("apply_wal", leader_id=leader_id, first_id=entries[0].wal_id,
                               datas=[e.data for e in entries])

    def close(self) -> None:
        self._node.close()


class Client:
    """Submits commands (their encoded bytes) to whichever node leads.

    Each command carries this client's id and a sequence number, which the
    nodes remember in replicated state: a command is retried - after a
    timeout, a redirect or a failover - until ``retry_for`` seconds have
    passed, and a retry of a command that was already applied gets its
    original answer instead of being applied again.  ``apply`` returns only
    a code the leader confirmed; ``Timeout`` after ``retry_for`` means the
    outcome is unknown.  Errors that retrying cannot change (the App
    refused the command, ``SessionExpired``) are raised at once.

    ``timeout`` bounds one attempt at one node.  Not thread-safe: one Client
    per thread (each has its own session).
    """

    RETRYABLE = (NotLeader, Timeout)

    def __init__(self, addresses: list[str] | str, timeout: float = 1.0,
                 retry_for: float = 10.0, config: Config | None = None):
        if isinstance(addresses, str):
            addresses = [addresses]
        if not addresses:
            raise ValueError("Client needs at least one node address")
        for a in addresses:
            protocol.endpoints(a)  # validates
        self.addresses = list(addresses)
        self.timeout = timeout
        self.retry_for = retry_for
        # longest pause between rounds of attempts (Config.client_max_pause)
        self.max_pause = (config or Config()).client_max_pause
        self.security = from_config(config)  # CURVE keys, if configured
        self.client_id = os.urandom(16)
        self._seq = itertools.count(1)
        self._ids = itertools.count(1)
        self._leader: str | None = None
        self._rpcs: dict[str, RpcClient] = {}
        self._dealers: dict[str, zmq.Socket] = {}  # apply_many's pipelines, one per node
        self._timed_out: dict[str, float] = {}  # address -> when it last did not answer
        self._readers: dict[str, str] = {}  # address -> its reader processes' endpoint
        self._reader_rpcs: dict[str, RpcClient] = {}
        self._turn = 0  # which of a node's readers asks next
        self.last_wal_id = 0  # the WAL id the last answer reflects (see query's min_wal_id)

    @property
    def leader(self) -> str | None:
        """The node that confirmed this client's last command (None before
        the first, or once that node stopped answering)."""
        return self._leader

    def _rpc(self, address: str) -> RpcClient:
        rpc = self._rpcs.get(address)
        if rpc is None:
            rpc = self._rpcs[address] = RpcClient(protocol.endpoints(address).client,
                                                  self.timeout, security=self.security)
        return rpc

    def _candidates(self) -> list[str]:
        """The nodes to try, the known leader first.  A node that did not
        answer lately is skipped for a while (after a failover its address
        would cost a full timeout per attempt)."""
        now = time.monotonic()
        fresh = [a for a in self.addresses
                 if now - self._timed_out.get(a, -1e9) > self.timeout * 2]
        return ([self._leader] if self._leader in fresh else []) + \
            [a for a in fresh if a != self._leader]

    def _request(self, address: str, payload: bytes, what: str) -> bytes:
        """One request to one node; a node that does not answer (Timeout)
        is skipped for a while."""
        try:
            return self._rpc(address).request(payload, what=what)
        except Timeout:
            self._lost(address)
            raise

    def _lost(self, address: str) -> None:
        self._timed_out[address] = time.monotonic()
        if self._leader == address:
            self._leader = None

    def apply(self, data: bytes) -> int:
        """Submit one encoded command; return its confirmed response code."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Client.apply takes bytes, got {type(data).__name__}")
        data = bytes(data)
        seq = next(self._seq)
        maybe = [0]  # requests of this command that may have been applied

        def attempt() -> int:
            nonlocal seq
            try:
                return self._attempt(data, seq, maybe)
            except SessionExpired:
                if maybe[0]:
                    raise  # an earlier request may have been applied: unknown
                # Refused, and no request of it can have been applied: the
                # nodes forgot this client (max_sessions others since its
                # last command).  Go on as a new session.
                self.client_id = os.urandom(16)
                self._seq = itertools.count(1)
                seq = next(self._seq)
                return self._attempt(data, seq, maybe)

        return self._retry(attempt, lambda last: Timeout(
            f"no leader confirmed the command within {self.retry_for:g}s "
            f"(outcome unknown; last: {type(last).__name__}: {last})"))

    def _retry(self, attempt: Callable[[], Any],
               give_up: Callable[[ReplicationError], ReplicationError]) -> Any:
        """``attempt()`` until it returns or raises something retrying cannot
        change; between rounds a backoff pause (at most ``max_pause``); after
        ``retry_for`` seconds, ``give_up(last retryable error)`` is raised."""
        deadline = time.monotonic() + self.retry_for
        pause = 0.01
        while True:
            try:
                return attempt()
            except self.RETRYABLE as exc:
                last = exc
            if time.monotonic() + pause > deadline:
                raise give_up(last)
            time.sleep(pause)  # back off between rounds of attempts
            pause = min(pause * 2, self.max_pause)

    def _attempt(self, data: bytes, seq: int, maybe: list[int]) -> int:
        """One round over the candidates; raises NotLeader or Timeout to retry."""
        candidates = self._candidates()
        last_error: ReplicationError | None = None
        tried: set[str] = set()
        while candidates:
            address = candidates.pop(0)
            if address in tried:
                continue
            tried.add(address)
            request_id = next(self._ids)
            try:
                raw = self._request(address, protocol.submit_request(
                    request_id, data, self.client_id, seq), "submit")
            except Timeout as exc:
                maybe[0] += 1  # no answer: it may have been applied
                last_error = exc
                continue
            rid, code, err, wal_id, _ = protocol.parse_reply(raw)
            if err is None:
                self.last_wal_id = max(self.last_wal_id, wal_id)
                if rid != request_id:
                    raise ProtocolError(f"reply for request {rid}, expected {request_id}")
                self._leader = address
                return code  # type: ignore[return-value]
            if isinstance(err, NotLeader):
                last_error = err
                hint = err.leader_address
                if hint and hint not in tried and hint in self._candidates():
                    candidates.insert(0, hint)  # follow the redirect
                continue
            if isinstance(err, Timeout):
                maybe[0] += 1
                self._leader = address  # the leader, just not ready to answer: retry there
                raise err
            raise err
        raise last_error or NotLeader("no leader reachable among " + ", ".join(self.addresses))

    def query(self, request: bytes, leader_only: bool = False, min_wal_id: int = 0) -> bytes:
        """A read (``App.query``).  By default from any node that answers
        (the known leader first; a follower's answer may be stale), through
        its reader processes when it runs some (``docs/shared.md``);
        ``leader_only`` reads from the leader holding a valid lease once it
        holds exactly the acknowledged writes (``docs/reads.md``).  With
        ``min_wal_id`` (say ``last_wal_id`` after a write): only an answer
        reflecting at least that WAL id - read-your-writes from any node.
        ``last_wal_id`` is then the WAL id the answer reflects.  Retried
        like :meth:`apply`."""
        request = bytes(request)
        if type(min_wal_id) is not int or min_wal_id < 0:
            raise ValueError(f"min_wal_id must be an int >= 0; got {min_wal_id!r}")
        return self._retry(lambda: self._query_round(request, leader_only, min_wal_id),
                           lambda last: last)

    def _query_round(self, request: bytes, leader_only: bool, min_wal_id: int) -> bytes:
        last: ReplicationError | None = None
        for address in self._candidates():
            rid = next(self._ids)
            payload = protocol.query_request(rid, request, leader_only, min_wal_id)
            raw = None
            readers = "" if leader_only else self._readers.get(address, "")
            if readers:  # the node's reader processes, in turn
                eps = readers.split(",")
                self._turn += 1
                ep = eps[self._turn % len(eps)]
                try:
                    raw = self._reader_rpc(ep).request(payload, what="query")
                except Timeout:
                    self._readers.pop(address, None)  # (the node's reply says again)
                    self._reader_rpcs.pop(ep).close()
            if raw is None:
                try:
                    raw = self._request(address, payload, "query")
                except Timeout as exc:
                    last = exc
                    continue
            _, answer, err, wal_id, readers = protocol.parse_reply(raw)
            if readers or address in self._readers:
                self._readers[address] = readers or self._readers[address]
            if err is None:
                self.last_wal_id = wal_id
                if leader_only:
                    self._leader = address
                return answer
            if not isinstance(err, (NotLeader, Timeout)):
                raise err
            last = err
        raise last or NotLeader("no node answered the query")

    def _reader_rpc(self, endpoint: str) -> RpcClient:
        rpc = self._reader_rpcs.get(endpoint)
        if rpc is None:
            rpc = self._reader_rpcs[endpoint] = RpcClient(endpoint, self.timeout,
                                                          security=self.security)
        return rpc

    def apply_many(self, datas: list[bytes], window: int = 512) -> list[int]:
        """Submit many encoded commands pipelined (``window`` awaiting an
        answer at a time) with the same guarantees as :meth:`apply`: each is
        retried until confirmed or ``retry_for`` runs out.  Returns the codes
        in order; raises the first error that retrying cannot change."""
        datas = [bytes(d) for d in datas]
        seqs = [next(self._seq) for _ in datas]
        codes: list[int | None] = [None] * len(datas)
        todo = list(range(len(datas)))

        def one_round() -> list[int]:
            nonlocal todo
            candidates = self._candidates()
            if candidates:
                todo = self._pipeline(candidates[0], datas, seqs, codes, todo, window)
            if todo:
                raise NotLeader(f"{len(todo)} commands not confirmed yet")
            return codes  # type: ignore[return-value]

        return self._retry(one_round, lambda last: Timeout(
            f"{len(todo)} of {len(datas)} commands not confirmed within {self.retry_for:g}s "
            "(outcome unknown)"))

    def _pipeline(self, address: str, datas: list[bytes], seqs: list[int],
                  codes: list[int | None], todo: list[int], window: int) -> list[int]:
        """Send ``todo`` to one node, pipelined; return what must be retried.
        The socket stays open for the next call (a connection per call cost
        a TCP and ZMTP handshake each time, and left a TIME_WAIT socket
        behind: hundreds a second ran the machine out of ports).  Replies
        to an earlier call that gave up are recognised by their request id
        and skipped."""
        sock = self._dealers.get(address)
        if sock is None:
            sock = self._dealers[address] = new_context().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            endpoint = protocol.endpoints(address).client
            if self.security is not None:
                self.security.connect_to(sock, endpoint)
            sock.connect(endpoint)
        retry: list[int] = []
        by_request: dict[int, int] = {}
        try:
            queue = collections.deque(todo)
            while queue or by_request:
                while queue and len(by_request) < window:
                    i = queue.popleft()
                    rid = next(self._ids)
                    by_request[rid] = i
                    sock.send(protocol.submit_request(rid, datas[i], self.client_id, seqs[i]))
                if not sock.poll(int(self.timeout * 1000), zmq.POLLIN):
                    self._lost(address)  # no answer: everything outstanding is retried
                    self._drop_dealer(address)  # and what is queued to it is dropped
                    return sorted(retry + list(by_request.values()) + list(queue))
                rid, code, err = protocol.parse_submit_reply(sock.recv())
                i = by_request.pop(rid, -1) if isinstance(rid, int) else -1
                if i < 0:
                    continue  # an answer to an attempt given up on
                if err is None:
                    codes[i] = code
                elif isinstance(err, self.RETRYABLE):
                    retry.append(i)
                    if isinstance(err, NotLeader):
                        self._leader = None
                        if err.leader_address in self.addresses:
                            self._leader = err.leader_address
                else:
                    raise err
            if not retry:
                self._leader = address
            return sorted(retry)
        except BaseException:
            self._drop_dealer(address)  # half a pipeline in flight: start clean next time
            raise

    def _drop_dealer(self, address: str) -> None:
        sock = self._dealers.pop(address, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        for rpc in [*self._rpcs.values(), *self._reader_rpcs.values()]:
            rpc.close()
        self._rpcs.clear()
        self._reader_rpcs.clear()
        for address in list(self._dealers):
            self._drop_dealer(address)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- status tools (zrepl status, the demo, tests) ----------------------------------


def supervisor_view(listen: str, timeout: float = 0.5, config: Config | None = None
                    ) -> dict | None:
    """A running supervisor's own status (``Supervisor.status()``) from its
    ``--listen`` endpoint; None while it does not answer.  (``config``: an
    operator's key and trust directory, for a secured supervisor.)"""
    try:
        with RpcClient(listen, timeout, security=from_config(config)) as rpc:
            return rpc.call("status")
    except ReplicationError:
        return None


def ask_all(requests: dict[str, tuple[zmq.Socket, bytes]], deadline: float
            ) -> dict[str, NodeStatus | ReplicationError]:
    """Send every node its status request at once, then collect the replies
    until ``deadline`` (``time.monotonic()``): a dead node costs the wait
    once, not once per node.  Each node gets a NodeStatus, the error it
    reported, a ProtocolError for a malformed reply, or Timeout.  The
    sockets are REQ sockets; one that got no reply must be closed."""
    out: dict[str, NodeStatus | ReplicationError] = {}
    waiting: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    for a, (sock, payload) in requests.items():
        try:
            sock.send(payload, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            out[a] = Timeout(f"{a} is not accepting requests: {exc}")
            continue
        waiting[sock] = a
        poller.register(sock, zmq.POLLIN)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for sock, _ in poller.poll(max(1, int(left * 1000))):
            a = waiting.pop(sock)
            poller.unregister(sock)
            try:
                out[a] = NodeStatus.from_dict(protocol.parse_control_reply(sock.recv()))
            except ReplicationError as exc:
                out[a] = exc
            except (KeyError, TypeError, ValueError) as exc:
                out[a] = ProtocolError(f"malformed status from {a}: {exc}")
    for a in waiting.values():
        out[a] = Timeout(f"no status from {a} within the deadline")
    return out


def poll_statuses(addresses: list[str], timeout: float = 1.0, config: Config | None = None
                  ) -> dict[str, NodeStatus | ReplicationError]:
    """One status per node (for ``zrepl status`` and the demo), asked of all
    nodes at once: a NodeStatus or the error that stood in its way.  The
    whole poll takes at most ``timeout``, however many nodes are down."""
    ctx = new_context()
    security = from_config(config)
    out: dict[str, NodeStatus | ReplicationError] = {}
    requests = {}
    try:
        for a in addresses:
            try:
                control = protocol.endpoints(a).control
            except ValueError as exc:
                out[a] = ProtocolError(str(exc))
                continue
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, Config().max_message_bytes)
            try:
                if security is not None:
                    security.connect_to(sock, control)
                sock.connect(control)
            except (zmq.ZMQError, KeyFileError) as exc:
                sock.close(linger=0)
                out[a] = ProtocolError(f"cannot connect to {a}: {exc}")
                continue
            requests[a] = (sock, protocol.control_request("status", {}))
        out.update(ask_all(requests, time.monotonic() + timeout))
    finally:
        for sock, _ in requests.values():
            sock.close(linger=0)
    return {a: out[a] for a in addresses}

