"""Request/reply over ZeroMQ that never wedges (the "lazy pirate" pattern).

A REQ socket that lost its reply is stuck forever; :class:`RpcClient`
waits for a reply with a deadline and, on timeout, closes the socket and
opens a fresh one before raising ``Timeout``.  Not thread-safe: one client
per thread, or a lock around it.
"""

from __future__ import annotations

from typing import Any

import zmq

# pyzmq's Cython send and setsockopt, without zmq.Socket's Python layer
_send = zmq.backend.Socket.send
_set = zmq.backend.Socket.set
NOBLOCK, RCVTIMEO = int(zmq.NOBLOCK), int(zmq.RCVTIMEO)

from ..core.config import Config
from ..core.errors import Timeout
from ..core.protocol import control_request, parse_control_reply
from .security import KeyFileError, Security


def new_context() -> zmq.Context:
    """The process-wide context (pyzmq makes a fresh one after fork)."""
    return zmq.Context.instance()


class RpcClient:
    def __init__(self, endpoint: str, timeout: float = 1.0, *,
                 context: zmq.Context | None = None, max_message_bytes: int | None = None,
                 security: Security | None = None):
        self.endpoint = endpoint
        self.security = security
        self.timeout = timeout
        self._ctx = context or new_context()
        self._max = max_message_bytes or Config().max_message_bytes
        self._sock: zmq.Socket | None = None
        self._rcvtimeo = -1  # the socket's receive timeout (ms) as last set

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, self._max)
            if self.security is not None:
                try:
                    self.security.connect_to(s, self.endpoint)
                except KeyFileError:
                    s.close(linger=0)
                    raise
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def reset(self) -> None:
        """Drop the socket; the next call opens a new one."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            self._rcvtimeo = -1

    def request(self, payload: bytes, timeout: float | None = None,
                what: str = "request") -> bytes:
        """Send raw bytes, return the raw reply, or raise Timeout."""
        t = self.timeout if timeout is None else timeout
        sock = self._socket()
        try:
            _send(sock, payload, NOBLOCK)
        except zmq.Again:
            self.reset()
            raise Timeout(f"{self.endpoint} is not accepting {what} (queue full)") from None
        ms = max(1, int(t * 1000))
        if ms != self._rcvtimeo:
            _set(sock, RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            return sock.recv()  # (blocks up to RCVTIMEO)
        except zmq.Again:
            pass
        self.reset()
        raise Timeout(f"no reply from {self.endpoint} to {what} within {t:g}s")

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Call a control operation; returns its result or raises the
        ReplicationError the peer reported (or Timeout / ProtocolError)."""
        return parse_control_reply(self.request(control_request(op, args), timeout, op))

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
