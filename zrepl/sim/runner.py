"""``python3 -m zrepl sim``: many seeds, a summary, a replayable failure.

    python3 -m zrepl sim --seeds 200                 # seeds 1..200
    python3 -m zrepl sim --seed 73 --replay          # one seed's whole trace
    python3 -m zrepl sim --app workers.ledger:Ledger --faults crash,partition

Each seed is one :class:`~zrepl.sim.world.Run`.  A failing seed is printed
with its violations and the command that replays it; ``--shrink`` then
drops fault events one at a time while the same invariant still fails and
prints the smallest fault script found.  Exit status 1 if any seed broke an
invariant.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, TextIO

from .world import EXTRA_FAULT_KINDS, FAULT_KINDS, Fault, Result, Run, Settings, load_app


def shrink(seed: int, settings: Settings, failed: Result, budget: int = 80,
           progress: Callable[[str], None] = lambda s: None) -> tuple[list[Fault], Result]:
    """The smallest fault script (found greedily) with which ``seed`` still
    breaks the same invariant; and that run."""
    invariant = failed.violations[0].invariant
    script = list(failed.script)
    best = failed
    runs = 0
    i = len(script) - 1
    while i >= 0 and runs < budget:
        trial = script[:i] + script[i + 1:]
        r = Run(seed, settings, script=trial).execute()
        runs += 1
        if any(v.invariant == invariant for v in r.violations):
            script, best = trial, r
            progress(f"shrinking: {len(script)} faults left ({runs} runs)")
        i -= 1
    return script, best


def summary(results: list[Result], wall: float) -> dict[str, Any]:
    faults: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    violations: collections.Counter = collections.Counter()
    for r in results:
        faults.update(r.faults)
        ops.update(r.ops)
        violations.update(v.invariant for v in r.violations)
    return {"seeds": len(results), "steps": sum(r.steps for r in results),
            "simulated_seconds": round(sum(r.simulated for r in results), 3),
            "wall_seconds": round(wall, 3), "faults": dict(sorted(faults.items())),
            "acknowledged": ops["ok"], "ops": dict(sorted(ops.items())),
            "violations": dict(sorted(violations.items())),
            "failing_seeds": [r.seed for r in results if r.violations],
            "undecided_linearizability": sum(r.undecided for r in results)}


def main(seeds: list[int], settings: Settings, *, replay: bool = False, shrink_it: bool = False,
         json_path: str = "", out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         progress_every: float = 1.0) -> int:
    load_app(settings.app)  # a bad --app fails here, once, with its reason
    results: list[Result] = []
    t0 = last = time.monotonic()
    for n, seed in enumerate(seeds, 1):
        r = Run(seed, settings).execute()
        results.append(r)
        if r.violations:
            print(f"seed {seed}: {len(r.violations)} invariant violation(s); replay with "
                  f"`python3 -m zrepl sim --seed {seed} --replay{_flags(settings)}`", file=out)
            for v in r.violations[:5]:
                print(f"  {v}", file=out)
        now = time.monotonic()
        if err.isatty() and now - last >= progress_every and n < len(seeds):
            bad = sum(1 for x in results if x.violations)
            print(f"\r{n}/{len(seeds)} seeds, {bad} failing, "
                  f"{sum(x.simulated for x in results) / 3600:.2f} simulated hours",
                  end="", file=err, flush=True)
            last = now
        elif not err.isatty() and now - last >= 10 * progress_every and n < len(seeds):
            print(f"{n}/{len(seeds)} seeds", file=err, flush=True)
            last = now
    if err.isatty() and len(seeds) > 1:
        print("\r" + " " * 60 + "\r", end="", file=err)
    wall = time.monotonic() - t0
    if replay and len(results) == 1:
        r = results[0]
        print("\n".join(r.trace), file=out)
        print(f"trace {r.trace_hash}: {len(r.trace)} events", file=out)
    shrunk: list[Fault] | None = None
    if shrink_it:
        first = next((r for r in results if r.violations), None)
        if first is not None:
            shrunk, best = shrink(first.seed, settings, first,
                                  progress=lambda s: print(s, file=err, flush=True))
            print(f"seed {first.seed} still breaks [{best.violations[0].invariant}] with "
                  f"{len(shrunk)} of {len(first.script)} faults:", file=out)
            for f in shrunk:
                print(f"  at {f.at:.4f}s {f}", file=out)
    s = summary(results, wall)
    print(f"zrepl sim: {s['seeds']} seeds, {s['steps']} steps, "
          f"{s['simulated_seconds'] / 3600:.2f} simulated hours in {wall:.0f}s; faults "
          f"{_counts(s['faults'])}; {s['acknowledged']} commands acknowledged; "
          f"{sum(s['violations'].values())} invariant violations"
          + (f" {_counts(s['violations'])} (seeds {s['failing_seeds'][:10]})"
             if s['violations'] else "")
          + (f"; trace {results[0].trace_hash}" if len(results) == 1 else ""), file=out)
    if json_path:
        s["settings"] = asdict(settings)
        s["results"] = [{"seed": r.seed, "trace_hash": r.trace_hash, "steps": r.steps,
                         "simulated_seconds": round(r.simulated, 6), "faults": dict(r.faults),
                         "ops": dict(r.ops), "violations": [str(v) for v in r.violations]}
                        for r in results]
        if shrunk is not None:
            s["shrunk"] = [str(f) for f in shrunk]
        with open(json_path, "w") as f:
            json.dump(s, f, indent=1)
    return 1 if s["violations"] else 0


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def _flags(settings: Settings) -> str:
    d = Settings()
    out = ""
    if settings.app != d.app:
        out += f" --app {settings.app}"
    if settings.nodes != d.nodes:
        out += f" --nodes {settings.nodes}"
    if settings.steps != d.steps:
        out += f" --steps {settings.steps}"
    if tuple(settings.faults) != tuple(d.faults):
        out += f" --faults {','.join(settings.faults)}"
    return out


def parse_faults(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in FAULT_KINDS + EXTRA_FAULT_KINDS and k != "none"]
    if bad:
        raise ValueError(f"unknown fault kind(s) {', '.join(bad)}; the kinds are "
                         f"{', '.join(FAULT_KINDS + EXTRA_FAULT_KINDS)} (or none)")
    return tuple(k for k in kinds if k != "none")
