"""A history of client operations checked against the final state, the way
Jepsen checks one: shared by the simulator (``zrepl sim``, virtual time)
and the chaos harness (``perf/chaos.py``, real processes).

Every operation has the times it was invoked and completed and an outcome:
``ok`` (the cluster answered it), ``failed`` (it surely had no effect) or
``unknown`` (the client gave up: it may take effect at any point after its
invocation, or never).  What each kind of operation lets us check:

``unique``    a write of a key written once: acknowledged and absent at the
              end is a **lost** write;
``incr``      a counter's increments: the final value must lie between the
              sum of the acknowledged ones (less: **lost**) and that plus
              the unknown ones (more: applied twice, **duplicated**);
``write``, ``cas``, ``read``
              a register's writes, compare-and-sets and ``leader_only``
              reads: the history of each key must be **linearizable**
              (``linear.py``);
``transfer``, ``total``
              money moved between accounts: every ``leader_only`` total
              read and the final balances must sum to what was opened
              (the **ledger total**).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from . import linear
from .linear import ABSENT, INF, RegOp
from ..core.errors import NotLeader, PermissionDenied

OK, FAILED, UNKNOWN = "ok", "failed", "unknown"


@dataclass
class Op:
    kind: str  # unique, incr, write, cas, read, transfer, total (see the module)
    key: Any = None
    arg: Any = None  # write: value; cas: (expected, new); incr: n
    invoked: float = 0.0
    completed: float = INF
    outcome: str = UNKNOWN
    result: Any = None  # a command's code; a read's value (ABSENT); a total's sum
    label: str = ""


# errors that say the command was refused before it could be logged
REFUSED = (NotLeader, PermissionDenied, ValueError, TypeError)


def outcome_of(error: BaseException | None, done: bool = True) -> str:
    """What a client's error says about its operation: a refusal
    (``REFUSED``) means it had no effect; any other error (``Timeout``,
    ``SessionExpired``, a storage error the leader met after logging it...)
    leaves it unknown."""
    if error is None and done:
        return OK
    if done and isinstance(error, REFUSED):
        return FAILED
    return UNKNOWN


@dataclass
class Verdict:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    nonlinearizable: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)  # searches that ran out of budget
    ledger: list[str] = field(default_factory=list)
    ledger_total_ok: bool | None = None  # None: no accounts in this history

    @property
    def violations(self) -> list[tuple[str, str]]:
        return [(kind, text) for kind in ("lost", "duplicated", "nonlinearizable", "ledger")
                for text in getattr(self, kind)]


def check(ops: Iterable[Op], final: Mapping[Any, Any],
          accounts: Mapping[Any, int] | None = None, budget: int = 200_000) -> Verdict:
    """Check ``ops`` against ``final`` (the state every replica holds at the
    end, as key -> value).  ``accounts``: the ledger's accounts and what was
    opened in each (their sum must never change)."""
    v = Verdict()
    ops = list(ops)
    counters: dict[Any, list[int]] = collections.defaultdict(lambda: [0, 0])  # [acked, unknown]
    registers: dict[Any, list[RegOp]] = collections.defaultdict(list)
    expected_total = sum(accounts.values()) if accounts else None
    for op in ops:
        if op.kind == "unique":
            if op.outcome == OK and op.result == 0 and op.key not in final:
                v.lost.append(f"acknowledged write of {op.key!r} ({op.label}) is not in the "
                              "final state")
        elif op.kind == "incr":
            if op.outcome == OK and op.result == 0:
                counters[op.key][0] += op.arg
            elif op.outcome == UNKNOWN:
                counters[op.key][1] += op.arg
        elif op.kind in ("write", "cas", "read"):
            if op.kind == "read" and op.outcome != OK:
                continue  # a read that failed had no effect
            known = op.outcome == OK
            registers[op.key].append(RegOp(op.kind, op.invoked, op.completed if known else INF,
                                           op.arg, op.result if known else None, op.label))
        elif op.kind == "total" and op.outcome == OK and expected_total is not None:
            if op.result != expected_total:
                v.ledger.append(f"a leader read ({op.label}) saw a total of {op.result}, "
                                f"not {expected_total}")
    for key, (acked, unknown) in counters.items():
        value = final.get(key, 0)
        if value < acked:
            v.lost.append(f"counter {key!r} is {value}; {acked} was acknowledged")
        elif value > acked + unknown:
            v.duplicated.append(f"counter {key!r} is {value}: more than the {acked} "
                                f"acknowledged + {unknown} unknown")
    for key, reg in registers.items():
        ok, why = linear.check(reg, budget)
        if ok is None:
            v.undecided.append(f"{key!r}: {why}")
        elif not ok:
            v.nonlinearizable.append(f"leader reads of {key!r}: {why}")
    if accounts:
        total = sum(final.get(a, 0) for a in accounts)
        v.ledger_total_ok = total == expected_total and not v.ledger
        if total != expected_total:
            v.ledger.append(f"ledger total {total} != {expected_total} opened")
    return v


__all__ = ["Op", "Verdict", "check", "outcome_of", "OK", "FAILED", "UNKNOWN", "ABSENT", "INF"]
