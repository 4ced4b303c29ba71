"""The KV App as it was before shared state - its state in a dict, its
snapshots taken by a forked copy-on-write child - kept for
``perf/kv_reads.py`` to compare state syncs against."""

from __future__ import annotations

from typing import Any, Iterator

from workers.kv import KV


class DictKV(KV):
    """``set`` only (what the benchmark writes)."""

    def __init__(self) -> None:
        self.store = None  # type: ignore[assignment]  # not store-backed
        self.state: dict[Any, Any] = {}

    def apply(self, cmds: list) -> list[int]:
        for cmd in cmds:
            self.state[cmd[1]] = cmd[2]
        return [0] * len(cmds)

    def clear_state(self) -> None:
        self.state.clear()

    def iter_state(self) -> Iterator[Any]:
        for key, value in self.state.items():
            yield ("set", key, value)
