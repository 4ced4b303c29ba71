"""Does a change make a commit dearer?  The commit-path figures of REF and of
the working tree (HEAD and whatever is uncommitted), run interleaved on
this machine, each with its ratio.

REF is checked out in a temporary git worktree beside this one.  Both
sides run *this* tree's measuring scripts (``perf/*.py`` are copied into the
REF worktree), so only the library differs.  The figures, CPU per commit
first because it moves least with the machine's noise:

    cpu         leader process CPU per synchronous commit (perf/latency.py),
                beside one side of a bare pyzmq echo
    latency     in-process commit p50, as a ratio to the bare REQ/REP
                round trip of the same session (perf/latency.py)
    throughput  64 apply_many submitters, synchronous follower; and the
                leader alone (perf/throughput.py --modes many)
    remote      remote KVClient.set p50 against Redis SET + WAIT 1
                (perf/compare.py --parts redis; needs redis-server)
    hops        each extra synchronous hop at p50, in bare round trips
                (perf/latency.py --hops 1,3)
    sync        full state sync and catch-up, entries/s (perf/sync.py;
                slow: about a minute per run)

Each figure runs ``--rounds`` times per side, alternating which side goes
first (REF, HEAD, HEAD, REF, ...), and the median of the rounds is
reported.  Run it on every change of the commit path
(``docs/performance.md``); a note on such a change quotes it.

    python3 perf/regress.py REF [--rounds 3] [--figures cpu,latency,throughput,remote]
                                [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

FIGURES = ("cpu", "latency", "throughput", "remote", "hops", "sync")
DEFAULT = "cpu,latency,throughput,remote,hops"


class Figure:
    """One script run (``args``) and what to read from its JSON: name ->
    (extract, unit, better)."""

    def __init__(self, script: str, args: list[str],
                 reads: dict[str, tuple[Callable[[Any], float], str, str]], timeout: float):
        self.script, self.args, self.reads, self.timeout = script, args, reads, timeout


def _lat(key: str) -> Callable[[Any], float]:
    return lambda d: d["1"]["median"][key]


FIGURE_RUNS: dict[str, Figure] = {
    "cpu": Figure("latency.py", ["--sessions", "1", "--rounds", "3", "--per-round", "1000"], {
        "leader CPU per commit": (lambda d: d["1"]["cpu_us"]["leader"], "µs", "lower"),
        "  follower CPU per commit": (lambda d: d["1"]["cpu_us"]["follower"], "µs", "lower"),
        "  one side of a bare echo (reference)": (lambda d: d["1"]["cpu_us"]["echo"], "µs", ""),
        "leader CPU / echo side": (lambda d: d["1"]["cpu_us"]["leader"] / d["1"]["cpu_us"]["echo"],
                                   "x", "lower"),
        "commit p50": (lambda d: _lat("zrepl_p50")(d) * 1e6, "µs", "lower"),
        "  bare round trip p50 (reference)": (lambda d: _lat("bare_p50")(d) * 1e6, "µs", ""),
        "commit p50 / bare round trip": (_lat("ratio_p50"), "x", "lower"),
    }, 300),
    "latency": Figure("latency.py", ["--sessions", "3", "--rounds", "5", "--per-round", "600"], {
        "commit p50 / bare round trip (3 sessions)": (_lat("ratio_p50"), "x", "lower"),
        "commit p99 / bare p99": (_lat("ratio_p99"), "x", "lower"),
    }, 600),
    "throughput": Figure("throughput.py", ["--modes", "many", "--seconds", "3"], {
        "apply_many, synchronous follower": (lambda d: d["many/sync"], "/s", "higher"),
        "apply_many, leader alone": (lambda d: d["many/alone"], "/s", "higher"),
    }, 300),
    "remote": Figure("compare.py", ["--parts", "redis", "--rounds", "2", "--seconds", "2"], {
        "remote KVClient.set p50": (lambda d: d["redis"]["median"]["zrepl"]["p50_us"], "µs",
                                    "lower"),
        "  Redis SET + WAIT 1 p50 (reference)": (
            lambda d: d["redis"]["median"]["redis"]["p50_us"], "µs", ""),
        "remote set / Redis": (lambda d: d["redis"]["median"]["zrepl"]["p50_us"] /
                               d["redis"]["median"]["redis"]["p50_us"], "x", "lower"),
    }, 600),
    "hops": Figure("latency.py", ["--hops", "1,3", "--sessions", "1", "--rounds", "3",
                                  "--per-round", "600"], {
        "each extra hop at p50, in bare round trips": (
            lambda d: (d["3"]["median"]["zrepl_p50"] - d["1"]["median"]["zrepl_p50"]) / 2 /
            statistics.median([d[h]["median"]["bare_p50"] for h in ("1", "3")]), "x", "lower"),
    }, 600),
    "sync": Figure("sync.py", [], {
        "full state sync": (lambda d: d["state_sync"]["entries_per_s"], "/s", "higher"),
        "catch-up from the log": (lambda d: d["catch_up"]["entries_per_s"], "/s", "higher"),
    }, 1200),
}


def worktree(ref: str) -> Path:
    """REF checked out beside this tree, with this tree's perf scripts."""
    path = Path(tempfile.mkdtemp(prefix="zrepl-regress-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), ref],
                   check=True)
    for script in HERE.glob("*.py"):
        shutil.copy2(script, path / "perf" / script.name)
    return path


def run_one(tree: Path, fig: Figure) -> dict[str, float] | str:
    """The figure's values on ``tree``, or why it could not be measured."""
    out = tree / f".regress-{os.getpid()}.json"
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen([sys.executable, str(tree / "perf" / fig.script), *fig.args,
                             "--json", str(out)], cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=fig.timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # (SIGTERM: the script stops its nodes on the way out)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        out.unlink(missing_ok=True)
        return f"timed out after {fig.timeout:g}s"
    try:
        if proc.returncode != 0 or not out.exists():
            tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
            return f"exit {proc.returncode}: {tail[0][:200]}"
        doc = json.loads(out.read_text())
        return {name: read(doc) for name, (read, _, _) in fig.reads.items()}
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return f"unexpected output ({type(exc).__name__}: {exc})"
    finally:
        out.unlink(missing_ok=True)


def fmt(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.1f} {unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", help="the commit to compare with (e.g. 6bd75dd)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per figure and side")
    ap.add_argument("--figures", default=DEFAULT,
                    help=f"comma-separated, of {', '.join(FIGURES)} (default: {DEFAULT})")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    figures = [f for f in args.figures.split(",") if f]
    unknown = [f for f in figures if f not in FIGURE_RUNS]
    if unknown:
        ap.error(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if "remote" in figures and shutil.which("redis-server") is None:
        print("(no redis-server on PATH: the remote figure is left out)")
        figures.remove("remote")
    try:
        ref_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.ref],
                                 check=True, capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError:
        ap.error(f"{args.ref!r} is not a commit of this repository")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                 "zrepl", "workers"], capture_output=True, text=True).stdout)
    here_label = f"{head}{'+changes' if dirty else ''}"
    ref_tree = worktree(args.ref)
    sides = {"ref": ref_tree, "head": ROOT}
    print(f"perf/regress.py: {ref_sha} (REF) against {here_label} (this tree), "
          f"{args.rounds} interleaved run(s) per figure and side")
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    failures: dict[str, dict[str, list[str]]] = {}
    try:
        for name in figures:
            fig = FIGURE_RUNS[name]
            results[name] = {"ref": {}, "head": {}}
            failures[name] = {"ref": [], "head": []}
            for r in range(args.rounds):
                order = ("ref", "head") if r % 2 == 0 else ("head", "ref")
                for side in order:
                    got = run_one(sides[side], fig)
                    if isinstance(got, str):
                        failures[name][side].append(got)
                        continue
                    for k, v in got.items():
                        results[name][side].setdefault(k, []).append(v)
                print(f"  {name}: run {r + 1} of {args.rounds} done", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_tree)],
                       capture_output=True)
        shutil.rmtree(ref_tree, ignore_errors=True)
    print(f"\n{'figure':46} {ref_sha + ' (REF)':>16} {here_label:>16} {'HEAD/REF':>9}")
    doc: dict[str, Any] = {"ref": ref_sha, "head": here_label, "rounds": args.rounds,
                           "figures": {}}
    for name in figures:
        fig = FIGURE_RUNS[name]
        for key, (_, unit, better) in fig.reads.items():
            ref_v, head_v = results[name]["ref"].get(key), results[name]["head"].get(key)
            rm = statistics.median(ref_v) if ref_v else None
            hm = statistics.median(head_v) if head_v else None
            ratio = f"{hm / rm:8.2f}x" if rm and hm else ""
            print(f"{key:46} {fmt(rm, unit) if rm is not None else 'n/a':>16} "
                  f"{fmt(hm, unit) if hm is not None else 'n/a':>16} {ratio:>9}"
                  f"{'  (' + better + ' is better)' if better and ratio else ''}")
            doc["figures"][key] = {"ref": ref_v, "head": head_v, "ref_median": rm,
                                   "head_median": hm, "unit": unit}
        for side, errs in failures[name].items():
            for e in errs:
                print(f"  ! {name} on {'REF' if side == 'ref' else 'this tree'}: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
