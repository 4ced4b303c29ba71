"""Handles on remote nodes: the supervisor's ``Node``, a leader's
``Follower``, and the client that submits commands."""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Any

import zmq

from . import protocol
from .errors import NotLeader, ProtocolError, ReplicationError, Timeout
from .interfaces import Follower, Node
from .rpc import RpcClient, new_context
from .sync import FollowerInfo
from .types import NodeRole, NodeStatus, WALEntry


class NodeClient(Node):
    """``Node`` over a node's control endpoint.  Thread-safe (one call at a
    time).  Every call raises ``Timeout`` if the node does not answer within
    ``timeout`` seconds, or the ``ReplicationError`` the node reported."""

    def __init__(self, address: str, timeout: float = 1.0):
        self.address = address
        self._rpc = RpcClient(protocol.endpoints(address).control, timeout)
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

    def __init__(self, address: str, timeout: float = 1.0, upstream_address: str = ""):
        self._node = NodeClient(address, timeout)
        self._upstream = upstream_address
        self._stream = 0

    def handshake(self, leader_id: int, address: str,
                  epoch_history: list[tuple[int, int]] | None = None) -> FollowerInfo:
        self._stream = random.getrandbits(63) or 1
        info = self._node.call("connect", leader_id=leader_id, address=address,
                               stream=self._stream,
                               epoch_history=[list(x) for x in epoch_history or []])
        return FollowerInfo(info["leader_id"], info["max_wal"], info["min_wal"],
                            info["max_applied_wal"], [tuple(x) for x in info["epoch_history"]])

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
    """Submits commands (their encoded bytes) to the leader.

    Tries the given nodes in turn and follows ``NotLeader`` redirects.  A
    ``Timeout`` means the outcome is unknown: the command may or may not
    have been committed.  Not thread-safe: one Client per thread.
    """

    def __init__(self, addresses: list[str] | str, timeout: float = 5.0):
        if isinstance(addresses, str):
            addresses = [addresses]
        if not addresses:
            raise ValueError("Client needs at least one node address")
        self.addresses = list(addresses)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._leader: str | None = None
        self._rpcs: dict[str, RpcClient] = {}
        self._timed_out: dict[str, float] = {}  # address -> when it last did not answer

    def _rpc(self, address: str) -> RpcClient:
        rpc = self._rpcs.get(address)
        if rpc is None:
            rpc = self._rpcs[address] = RpcClient(protocol.endpoints(address).client,
                                                  self.timeout)
        return rpc

    def apply(self, data: bytes) -> int:
        """Submit one encoded command; return its response code."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Client.apply takes bytes, got {type(data).__name__}")
        now = time.monotonic()
        # A node that did not answer lately is skipped for a while (after a
        # failover its old address would cost a full timeout per call).
        fresh = [a for a in self.addresses
                 if now - self._timed_out.get(a, -1e9) > self.timeout * 2]
        candidates = ([self._leader] if self._leader in fresh else []) + \
            [a for a in fresh if a != self._leader]
        last_error: ReplicationError | None = None
        tried: set[str] = set()
        while candidates:
            address = candidates.pop(0)
            if address in tried:
                continue
            tried.add(address)
            request_id = next(self._ids)
            try:
                raw = self._rpc(address).request(
                    protocol.submit_request(request_id, bytes(data)), what="submit")
            except Timeout:
                # Outcome unknown here.  Do not stick to a node that may be
                # dead: the next call starts with the others.
                self._timed_out[address] = time.monotonic()
                if self._leader == address:
                    self._leader = None
                self.addresses.remove(address) if address in self.addresses else None
                self.addresses.append(address)
                raise
            rid, code, err = protocol.parse_submit_reply(raw)
            if err is None:
                if rid != request_id:
                    raise ProtocolError(f"reply for request {rid}, expected {request_id}")
                self._leader = address
                return code  # type: ignore[return-value]
            if isinstance(err, NotLeader):
                last_error = err
                hint = err.leader_address
                if hint and hint not in tried and \
                        now - self._timed_out.get(hint, -1e9) > self.timeout * 2:
                    candidates.insert(0, hint)  # follow the redirect (not to a node just lost)
                continue
            raise err
        raise last_error or NotLeader("no leader reachable among " + ", ".join(self.addresses))

    def apply_many(self, datas: list[bytes], window: int = 1024) -> list[int]:
        """Submit many encoded commands pipelined (up to ``window`` awaiting
        replies) to the node that last accepted a command (or the first
        address); returns their codes in order.  Raises the first error a
        command got (``NotLeader`` included); commands before it may have
        been committed.  ``Timeout`` if a reply is later than ``timeout``."""
        address = self._leader or self.addresses[0]
        ctx = new_context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(protocol.endpoints(address).client)
        try:
            codes: list[int | None] = [None] * len(datas)
            base = next(self._ids)
            self._ids = itertools.count(base + len(datas) + 1)
            sent = received = 0
            first_error: ReplicationError | None = None
            while received < len(datas):
                while sent < len(datas) and sent - received < window:
                    sock.send(protocol.submit_request(base + sent, bytes(datas[sent])))
                    sent += 1
                if not sock.poll(int(self.timeout * 1000), zmq.POLLIN):
                    raise Timeout(f"{address} did not answer within {self.timeout:g}s "
                                  f"({received} of {len(datas)} answered; outcome of the rest "
                                  "unknown)")
                rid, code, err = protocol.parse_submit_reply(sock.recv())
                index = rid - base if isinstance(rid, int) else -1
                if not 0 <= index < len(datas) or codes[index] is not None:
                    raise ProtocolError(f"unexpected reply for request {rid!r}")
                received += 1
                if err is not None:
                    first_error = first_error or err
                    codes[index] = -1
                else:
                    codes[index] = code
            if first_error is not None:
                raise first_error
            self._leader = address
            return codes  # type: ignore[return-value]
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        for rpc in self._rpcs.values():
            rpc.close()
        self._rpcs.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
