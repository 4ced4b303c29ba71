"""Helpers shared by the tests (no fixtures here; see conftest.py)."""

from __future__ import annotations

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
