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
    search ran out of ``budget`` states in all (undecided).

    The history is cut into segments wherever every known operation
    invoked so far has completed before the next one is invoked: no order
    can move an operation across such a point, so each segment is searched
    alone, from every way the segments before it could have ended - the
    register's value, and which operations of unknown outcome have not yet
    taken effect (they stay pending across segments, and may never take
    effect).  A long history with little concurrency is then many small
    searches rather than one search over every operation."""
    ops = sorted(ops, key=lambda o: o.invoked)
    if not ops:
        return True, ""
    segments: list[list[int]] = [[]]  # indices into ops
    horizon = -INF  # the latest completion of a known operation in this segment
    for i, o in enumerate(ops):
        if segments[-1] and horizon < o.invoked and any(ops[j].known for j in segments[-1]):
            segments.append([])
            horizon = -INF
        segments[-1].append(i)
        if o.known:
            horizon = max(horizon, o.completed)
    starts: set[tuple[Any, tuple[int, ...]]] = {(ABSENT, ())}
    left = [budget]  # states the whole search may still explore
    for seg in segments:
        ends: set[tuple[Any, tuple[int, ...]]] = set()
        for value, pending in starts:
            found, why = _segment(ops, list(pending) + seg, len(pending), value, left)
            if found is None:
                return None, why
            ends |= found
        if not ends:
            return False, _explain([ops[j] for j in seg], len(ops))
        if len(ends) > budget:
            return None, f"undecided: {len(ends)} ways the first segments could have ended"
        starts = ends
    return True, ""


def _segment(every: list[RegOp], indices: list[int], carried: int, value: Any,
             left: list[int]) -> tuple[set[tuple[Any, tuple[int, ...]]] | None, str]:
    """Every way the operations ``every[i] for i in indices`` (the first
    ``carried`` of them pending unknown operations from earlier segments)
    can take effect from ``value`` with every known one taken: {(value
    after, indices of the unknown operations not taken)}.  None (with why)
    once the whole check's budget (``left[0]`` states) is spent."""
    ops = [every[i] for i in indices]
    n = len(ops)
    required = 0
    for i, o in enumerate(ops):
        if o.known:
            required |= 1 << i
    ends: set[tuple[Any, tuple[int, ...]]] = set()
    seen: set[tuple[int, Any]] = set()
    stack: list[tuple[int, Any]] = [(0, value)]
    while stack:
        done, state = stack.pop()
        if done & required == required:
            ends.add((state, tuple(indices[i] for i in range(n) if not done >> i & 1)))
            continue  # (taking a pending one now = taking it first in the next segment)
        left[0] -= 1
        if left[0] < 0:
            return None, f"undecided: the state budget ran out ({n} operations in one segment)"
        # the earliest completion among operations not yet taken bounds
        # which of them may take effect next
        horizon = min((o.completed for i, o in enumerate(ops) if not done >> i & 1),
                      default=INF)
        for i, o in enumerate(ops):
            if done >> i & 1:
                continue
            if i >= carried and o.invoked >= horizon:
                break  # sorted by invocation: no later one may go first either
            good, after = _step(o, state)
            if not good:
                continue
            key = (done | 1 << i, after)
            if key not in seen:
                seen.add(key)
                stack.append(key)
    return ends, ""


def _explain(seg: list[RegOp], total: int) -> str:
    known = [o for o in seg if o.known]
    first = min(known, key=lambda o: o.completed) if known else seg[0]
    return (f"no order explains the {len(seg)} operations from {first.invoked:.4f} (of "
            f"{total}); e.g. {first.label} ({first.kind} {first.arg!r} -> {first.result!r}, "
            f"{first.invoked:.4f}..{first.completed:.4f})")
