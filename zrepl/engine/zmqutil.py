"""Small ZeroMQ helpers shared by the engine's parts."""

from __future__ import annotations

from typing import Iterator

import zmq

DRAIN = 256  # messages handled per socket per engine iteration (fairness)
# Plain ints: pyzmq's constants are enums whose operators run Python code.
NOBLOCK = int(zmq.NOBLOCK)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)


def ready(sock: zmq.Socket, multipart: bool = False, limit: int = DRAIN) -> Iterator:
    """Messages waiting on ``sock`` (at most ``limit``), without paying for
    a zmq.Again exception at the end of every burst."""
    recv = sock.recv_multipart if multipart else sock.recv
    getsockopt = sock.getsockopt
    for _ in range(limit):
        try:
            yield recv(NOBLOCK)
        except zmq.Again:
            return
        if not getsockopt(EVENTS) & POLLIN:
            return
