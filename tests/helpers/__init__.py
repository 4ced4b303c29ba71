"""Helpers shared by the tests (no fixtures here; see conftest.py)."""

from __future__ import annotations

import signal
import subprocess
from typing import Callable

from zrepl.local import wait_until


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.005) -> object:
    """``cond()``'s first truthy value, polled until ``timeout``; a test
    failure (AssertionError) naming ``what`` after that."""
    try:
        return wait_until(cond, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Send ``sig`` (if ``proc`` still runs) and return its exit status; a
    process that ignores it for ``timeout`` is killed and the test fails."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        reap(proc)
        raise AssertionError(f"process {proc.pid} did not exit within {timeout}s of "
                             f"signal {sig}") from None


def reap(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, wait for it, and close its pipes (for
    ``finally:`` blocks: nothing is left behind whatever the test did)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
