"""What the simulated clients do, per App, and what can be checked about it.

A workload makes each client's next operation (a command or a read) and
knows, for the checker, what a command means:

- ``workers.kv:KV`` - registers ``r0..r2`` written, compare-and-set and
  read with ``leader_only=True`` (checked for linearizability), a counter
  ``n`` incremented, and keys written once each (``u...``: checked at
  every step on every node that may accept writes);
- ``workers.ledger:Ledger`` - accounts opened, transfers between them
  (the total must equal what was opened);
- ``workers.bank:Bank`` - KV's, and transfers between five accounts (the
  chaos harness's mix);
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
from .history import OK, Op, outcome_of
from .linear import ABSENT


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

    def ops(self, history: list) -> list[Op]:
        """The history in the checker's terms (``history.py``); operations
        this workload gives no meaning to are left out."""
        out = []
        for client, planned, op in history:
            if not planned.meta or not op.invoked:
                continue
            label = f"c{client}#{op.seq or 'read'}@{op.node.rsplit('/', 1)[-1]}"
            outcome = outcome_of(op.error, op.done)
            meaning = self.meaning(planned, op, outcome)
            if meaning is not None:
                kind, key, arg, result = meaning
                out.append(Op(kind, key, arg, op.invoked, op.completed, outcome, result, label))
        return out

    def meaning(self, planned: Planned, op: Any, outcome: str) -> tuple | None:
        """(kind, key, arg, result) of one completed operation, or None."""
        return None

    def final_state(self, app: App, applied: list[tuple[Any, int]]
                    ) -> tuple[dict, dict | None]:
        """The replayed App's state as key -> value, and the ledger's
        accounts with what was opened in each (None without a ledger)
        (``applied``: every command of the log and its code)."""
        return {}, None

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

    def meaning(self, planned: Planned, op: Any, outcome: str) -> tuple | None:
        kind = planned.meta[0]
        if kind == "read":
            if outcome != OK or op.answer is None:
                return None
            found, value = msgpack.unpackb(op.answer, raw=False)
            return "read", planned.meta[1], None, value if found else ABSENT
        if kind == "write":
            return "write", planned.meta[1], planned.meta[2], op.code
        if kind == "cas":
            return "cas", planned.meta[1], (planned.meta[2], planned.meta[3]), op.code
        if kind == "incr":
            return "incr", planned.meta[1], 1, op.code
        return "unique", planned.meta[1], None, op.code

    def final_state(self, app: App, applied: list[tuple[Any, int]]
                    ) -> tuple[dict, dict | None]:
        return app.data, None  # type: ignore[attr-defined]


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

    def meaning(self, planned: Planned, op: Any, outcome: str) -> tuple | None:
        if planned.meta[0] == "open" and planned.unique_key is not None:
            return "unique", planned.unique_key, None, op.code
        return None

    def final_state(self, app: App, applied: list[tuple[Any, int]]
                    ) -> tuple[dict, dict | None]:
        opened: dict[str, int] = {}
        for cmd, code in applied:
            if cmd[0] == "open" and code == 0:
                opened[cmd[1]] = cmd[2]
        return dict(app.balances), opened  # type: ignore[attr-defined]


class BankWorkload(KVWorkload):
    """``workers.bank:Bank``: KV's mix, and transfers between five accounts
    the first operations open (their total must never change) - the chaos
    harness's App and mix (``perf/chaos.py``)."""
    name = "bank"
    ACCOUNTS = {f"acct/a{i}": 1000 for i in range(5)}

    def next(self, client: int) -> Planned:
        if self.count < len(self.ACCOUNTS):
            self.count += 1
            acct = sorted(self.ACCOUNTS)[self.count - 1]
            return Planned(_pack(("set", acct, self.ACCOUNTS[acct])), meta=("open", acct))
        if self.rng.random() < 0.25:
            self.count += 1
            src, dst = self.rng.sample(sorted(self.ACCOUNTS), 2)
            return Planned(_pack(("transfer", src, dst, self.rng.randint(1, 300))),
                           meta=("transfer", src))
        return super().next(client)

    def meaning(self, planned: Planned, op: Any, outcome: str) -> tuple | None:
        if planned.meta[0] in ("open", "transfer"):
            return None
        return super().meaning(planned, op, outcome)

    def final_state(self, app: App, applied: list[tuple[Any, int]]
                    ) -> tuple[dict, dict | None]:
        opened = {cmd[1]: cmd[2] for cmd, code in applied
                  if cmd[0] == "set" and cmd[1] in self.ACCOUNTS and code == 0}
        return app.data, opened  # type: ignore[attr-defined]


def workload_for(app_cls: type, rng: random.Random, clients: int) -> Workload:
    name = f"{app_cls.__module__}:{app_cls.__qualname__}"
    if name == "workers.kv:KV":
        return KVWorkload(app_cls, rng, clients)
    if name == "workers.ledger:Ledger":
        return LedgerWorkload(app_cls, rng, clients)
    if name == "workers.bank:Bank":
        return BankWorkload(app_cls, rng, clients)
    Workload.check_app(app_cls)
    return Workload(app_cls, rng, clients)

