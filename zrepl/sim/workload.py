"""What the simulated clients do, per App, and what can be checked about it.

A workload makes each client's next operation (a command or a read) and
knows, for the checker, what a command means:

- ``workers.kv:KV`` - registers ``r0..r2`` written, compare-and-set and
  read with ``leader_only=True`` (checked for linearizability), a counter
  ``n`` incremented, and keys written once each (``u...``: checked at
  every step on every node that may accept writes);
- ``workers.ledger:Ledger`` - accounts opened, transfers between them
  (the total must equal what was opened);
- any other App: its class provides ``sim_command(rng) -> bytes`` (one
  random encoded command) and optionally ``sim_query(rng) -> bytes`` (a
  read); only the generic invariants apply.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import msgpack

from ..core.interfaces import App
from .linear import ABSENT, INF, RegOp


@dataclass
class Planned:
    """An operation a client is about to submit."""
    data: bytes
    query: bool = False
    leader_only: bool = False
    meta: tuple = ()  # what it means, for the checker
    unique_key: Any = None  # a command that writes this key once (checked continuously)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class Workload:
    name = "generic"

    def __init__(self, app_cls: type, rng: random.Random, clients: int):
        self.app_cls = app_cls
        self.rng = rng
        self.clients = clients
        self.count = 0

    def next(self, client: int) -> Planned:
        self.count += 1
        q = getattr(self.app_cls, "sim_query", None)
        if q is not None and self.rng.random() < 0.2:
            return Planned(q(self.rng), query=True)
        return Planned(self.app_cls.sim_command(self.rng))

    def holds(self, app: App, key: Any) -> bool:
        return True

    def saw(self, client: int, planned: Planned, op: Any) -> None:
        """A client's operation completed (to pick the next ones)."""

    def registers(self, history: list) -> dict[str, list[RegOp]]:
        return {}

    def final(self, app: App, applied: list[tuple[Any, int]]) -> list[str]:
        """App-specific problems with the final state (``applied``: every
        command of the log and its code)."""
        return []

    @staticmethod
    def check_app(app_cls: type) -> None:
        if not callable(getattr(app_cls, "sim_command", None)):
            raise ValueError(
                f"{app_cls.__module__}.{app_cls.__qualname__} has no sim_command(rng) -> bytes: "
                "the simulator needs it to make commands for your App (docs/simulation.md)")


class KVWorkload(Workload):
    name = "kv"
    REGISTERS = ("r0", "r1", "r2")

    def __init__(self, app_cls: type, rng: random.Random, clients: int):
        super().__init__(app_cls, rng, clients)
        self.last_seen: dict[tuple[int, str], Any] = {}

    def next(self, client: int) -> Planned:
        self.count += 1
        r, i = self.rng.random(), self.count
        key = self.rng.choice(self.REGISTERS)
        if r < 0.25:
            value = f"c{client}-{i}"
            return Planned(_pack(("set", key, value)), meta=("write", key, value))
        if r < 0.4:
            expected = self.last_seen.get((client, key))
            new = f"c{client}-{i}"
            return Planned(_pack(("cas", key, expected, new)), meta=("cas", key, expected, new))
        if r < 0.65:
            return Planned(_pack(("get", key)), query=True, leader_only=True, meta=("read", key))
        if r < 0.8:
            return Planned(_pack(("incr", "n", 1)), meta=("incr", "n"))
        ukey = f"u{client}-{i}"
        return Planned(_pack(("set", ukey, i)), meta=("unique", ukey), unique_key=ukey)

    def holds(self, app: App, key: Any) -> bool:
        return app.get(key, ABSENT) is not ABSENT  # type: ignore[attr-defined]

    def saw(self, client: int, planned: Planned, op: Any) -> None:
        kind = planned.meta[0] if planned.meta else ""
        if kind == "read" and op.answer is not None and op.error is None:
            found, value = msgpack.unpackb(op.answer, raw=False)
            self.last_seen[(client, planned.meta[1])] = value if found else None
        elif kind in ("write", "cas") and op.code == 0 and op.error is None:
            self.last_seen[(client, planned.meta[1])] = planned.meta[-1]

    def registers(self, history: list) -> dict[str, list[RegOp]]:
        out: dict[str, list[RegOp]] = {k: [] for k in self.REGISTERS}
        for client, planned, op in history:
            kind = planned.meta[0] if planned.meta else ""
            if kind not in ("write", "cas", "read") or not op.invoked:
                continue
            key = planned.meta[1]
            label = f"c{client}#{op.seq or 'read'}@{op.node.rsplit('/', 1)[-1]}"
            if kind == "read":
                if op.error is not None or op.answer is None:
                    continue  # a read that failed had no effect
                found, value = msgpack.unpackb(op.answer, raw=False)
                out[key].append(RegOp("read", op.invoked, op.completed, None,
                                      value if found else ABSENT, label))
                continue
            known = op.error is None and op.code is not None
            done = op.completed if known else INF
            if kind == "write":
                out[key].append(RegOp("write", op.invoked, done, planned.meta[2],
                                      0 if known else None, label))
            else:
                out[key].append(RegOp("cas", op.invoked, done, (planned.meta[2], planned.meta[3]),
                                      op.code if known else None, label))
        return out


class LedgerWorkload(Workload):
    name = "ledger"
    ACCOUNTS = ("a0", "a1", "a2", "a3", "a4")

    def next(self, client: int) -> Planned:
        self.count += 1
        i = self.count
        if i <= len(self.ACCOUNTS):
            acct = self.ACCOUNTS[i - 1]
            return Planned(_pack(("open", acct, 1000)), meta=("open", acct))
        r = self.rng.random()
        if r < 0.1:
            acct = f"x{client}-{i}"
            return Planned(_pack(("open", acct, 10)), meta=("open", acct), unique_key=acct)
        if r < 0.2:
            return Planned(_pack(("total",)), query=True, leader_only=True, meta=("total",))
        src, dst = self.rng.sample(self.ACCOUNTS, 2)
        amount = self.rng.randint(1, 400)
        return Planned(_pack(("transfer", src, dst, amount)), meta=("transfer",))

    def holds(self, app: App, key: Any) -> bool:
        return key in app.balances  # type: ignore[attr-defined]

    def final(self, app: App, applied: list[tuple[Any, int]]) -> list[str]:
        opened = sum(cmd[2] for cmd, code in applied if cmd[0] == "open" and code == 0)
        total = sum(app.balances.values())  # type: ignore[attr-defined]
        if total != opened:
            return [f"ledger total {total} != {opened} opened"]
        return []


def workload_for(app_cls: type, rng: random.Random, clients: int) -> Workload:
    name = f"{app_cls.__module__}:{app_cls.__qualname__}"
    if name == "workers.kv:KV":
        return KVWorkload(app_cls, rng, clients)
    if name == "workers.ledger:Ledger":
        return LedgerWorkload(app_cls, rng, clients)
    Workload.check_app(app_cls)
    return Workload(app_cls, rng, clients)

