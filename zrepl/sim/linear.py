"""Linearizability of one register's history (Wing & Gong's search with
Lowe's memoisation), for ``leader_only`` reads of ``workers.kv``.

An operation is a write, a compare-and-set or a read of one key, with the
(virtual) times it was invoked and completed.  An operation whose outcome
is unknown (the client gave up, or got an error that does not say it did
not happen) may take effect at any point after its invocation, or never:
it gets completion time infinity and need not be linearized.  The history
is linearizable if some order of the operations (a) respects real time -
an operation that completed before another was invoked comes first - and
(b) replayed on a register gives every known result.  Search is
depth-first over "which pending operation takes effect next", memoised on
(the set taken, the register's value): P-compositionality lets each key be
checked alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INF = float("inf")
ABSENT = ("<absent>",)  # the register's value before any write

OK, NOT_FOUND, COMPARE_FAILED = 0, 1, 2  # workers.kv's codes


@dataclass
class RegOp:
    kind: str  # "write", "cas", "read"
    invoked: float
    completed: float  # INF: outcome unknown
    arg: Any = None  # write: value; cas: (expected, new)
    result: Any = None  # cas: code; read: value or ABSENT; None when unknown
    label: str = ""

    @property
    def known(self) -> bool:
        return self.completed != INF


def _step(op: RegOp, state: Any) -> tuple[bool, Any]:
    """(does ``op`` taking effect in ``state`` give its result?, new state)"""
    if op.kind == "write":
        return True, op.arg
    if op.kind == "read":
        return (not op.known) or op.result == state, state
    expected, new = op.arg
    if state is ABSENT:
        code, after = (OK, new) if expected is None else (NOT_FOUND, state)
    elif state == expected:
        code, after = OK, new
    else:
        code, after = COMPARE_FAILED, state
    return (not op.known) or op.result == code, after


def check(ops: list[RegOp], budget: int = 200_000) -> tuple[bool | None, str]:
    """(True, "") if linearizable; (False, why) if not; (None, why) if the
    search ran out of ``budget`` states (undecided)."""
    ops = sorted(ops, key=lambda o: o.invoked)
    n = len(ops)
    if n == 0:
        return True, ""
    required = 0
    for i, o in enumerate(ops):
        if o.known:
            required |= 1 << i
    seen: set[tuple[int, Any]] = set()
    best = (0, 0)  # (ops taken, mask) of the deepest point reached: for the report
    stack: list[tuple[int, Any]] = [(0, ABSENT)]
    explored = 0
    while stack:
        done, state = stack.pop()
        if done & required == required:
            return True, ""
        explored += 1
        if explored > budget:
            return None, f"undecided after {budget} states ({n} operations)"
        taken = bin(done).count("1")
        if taken > best[0]:
            best = (taken, done)
        # the earliest completion among operations not yet taken bounds
        # which of them may take effect next
        horizon = min((o.completed for i, o in enumerate(ops) if not done >> i & 1),
                      default=INF)
        for i, o in enumerate(ops):
            if done >> i & 1:
                continue
            if o.invoked >= horizon:
                break  # sorted by invocation: no later one may go first either
            good, after = _step(o, state)
            if not good:
                continue
            key = (done | 1 << i, after)
            if key not in seen:
                seen.add(key)
                stack.append(key)
    taken, mask = best
    stuck = [o for i, o in enumerate(ops) if not mask >> i & 1 and o.known]
    first = min(stuck, key=lambda o: o.completed) if stuck else None
    return False, (f"no order explains {len(stuck)} of {n} operations; e.g. {first.label} "
                   f"({first.kind} {first.arg!r} -> {first.result!r}, "
                   f"{first.invoked:.4f}..{first.completed:.4f})" if first else "no order")
