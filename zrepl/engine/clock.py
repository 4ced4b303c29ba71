"""Clocks: the engine reads time only through one of these, so a whole
cluster can run in virtual time (the in-memory transport's simulation)."""

from __future__ import annotations

import time


class Clock:
    """Seconds on a monotonic scale (only differences mean anything)."""

    def now(self) -> float:
        raise NotImplementedError


class MonotonicClock(Clock):
    def __init__(self) -> None:
        self.now = time.monotonic  # type: ignore[method-assign]  # the builtin: no frame per call


class FakeClock(Clock):
    """Virtual time: it moves only when told (``set`` / ``advance``)."""

    def __init__(self, start: float = 1000.0):
        self._now = start

    def now(self) -> float:
        return self._now

    def set(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"a clock does not go back ({t} < {self._now})")
        self._now = t

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)


MONOTONIC = MonotonicClock()
