"""Progress lines for long work (restart replay, checkpoint load, state
syncs): at most one log line every ``every`` seconds
(``Config.progress_interval``), with the count, the total when known and
the rate, so an operator watching a node that takes minutes to come back
sees it moving."""

from __future__ import annotations

from typing import Any, Callable


class Progress:
    def __init__(self, log: Any, what: str, total: int | None = None,
                 unit: str = "entries", *, clock: Callable[[], float], every: float):
        self.log = log
        self.what = what
        self.total = total
        self.unit = unit
        self.clock = clock
        self.done = 0
        self.started = clock()
        self.every = every
        self._next = self.started + self.every

    def add(self, n: int) -> None:
        """Count ``n`` more; log a line if the last one is ``every`` old."""
        self.done += n
        now = self.clock()
        if now >= self._next:
            self._next = now + self.every
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        rate = self.done / max(now - self.started, 1e-9)
        of = ""
        if self.total:
            of = f" of {self.total:,} ({100 * self.done / self.total:.0f}%)"
        return f"{self.what}: {self.done:,}{of} {self.unit}, {rate:,.0f}/s"
