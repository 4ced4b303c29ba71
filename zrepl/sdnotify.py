"""The systemd notify protocol, with the standard library only.

A service of ``Type=notify`` tells systemd it is ready (``READY=1``), that
it is alive (``WATCHDOG=1``, at least every ``WatchdogSec``) and that it is
stopping (``STOPPING=1``) by datagrams to the socket named in
``$NOTIFY_SOCKET`` (``@name`` is the abstract namespace).  Without that
variable every call does nothing, so the same code runs under systemd and
anywhere else.
"""

from __future__ import annotations

import os
import socket
from typing import Callable


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1\\nSTATUS=serving"); True if sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), path)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half of
    WatchdogSec, as sd_watchdog_enabled advises), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 / 2 if value > 0 else None


def wait_with_watchdog(wait: Callable[[float], bool], healthy: Callable[[float], bool],
                       step: float = 0.5) -> None:
    """Block until ``wait(timeout)`` returns True.  After each wait, call
    ``healthy(interval)`` (``interval``: seconds between the pings systemd
    expects, 0 without a watchdog) and, under a watchdog, send WATCHDOG=1
    when it returns True: a process whose real work stalled stops pinging
    although this loop still runs."""
    interval = watchdog_interval() or 0.0
    if interval:
        step = min(step, interval)
    while not wait(step):
        if healthy(interval) and interval:
            notify("WATCHDOG=1")
