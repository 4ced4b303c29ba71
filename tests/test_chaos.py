"""The chaos harness, short: real node, supervisor and client processes in
network namespaces of their own, under partitions, slow links, pauses,
kills and a full disk for a minute; the history checked like Jepsen's
(perf/chaos.py, docs/faults.md).  Skipped, with the reason, where there
is no root or no network namespaces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zrepl.sim import history
from zrepl.sim.linear import ABSENT, INF

ROOT = Path(__file__).resolve().parent.parent
CHAOS = ROOT / "perf" / "chaos.py"


def chaos(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """perf/chaos.py; past ``timeout`` it gets SIGTERM, and cleans up."""
    p = subprocess.Popen([sys.executable, str(CHAOS), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.timeout(300)
def test_a_minute_of_chaos_loses_nothing_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "chaos.json"
    r = chaos(["--minutes", "1", "--json", str(out)], timeout=270)
    if r.returncode == 2 and not out.exists():
        pytest.skip(r.stderr.strip() or "chaos harness unavailable")
    assert out.exists(), f"no report (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rep = json.loads(out.read_text())
    detail = f"seed {rep['seed']}:\n{r.stdout[-4000:]}"
    assert r.returncode == 0, detail
    assert (rep["lost"], rep["duplicated"], rep["nonlinearizable"], rep["divergent"]) == \
        (0, 0, 0, 0), detail
    assert rep["ledger_total_ok"] and rep["converged"], detail
    assert sum(rep["faults"].values()) >= 5 and len(rep["faults"]) >= 3, detail
    assert rep["ops"]["ok"] > 1000, detail
    assert set(rep["max_unavailable_s"]) == set(rep["faults"])
    # nothing left: namespaces, the bridge, the tmpfs, the directory
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert rep["netns_prefix"] + "-" not in ns
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert rep["netns_prefix"] + "br" not in links
    assert not Path(rep["workdir"]).exists()


# --- the checker it shares with the simulator, on made-up histories -----------------


def op(kind, key, arg=None, t=(0, 1), outcome=history.OK, result=0):
    return history.Op(kind, key, arg, t[0], t[1] if outcome == history.OK else INF, outcome,
                      result)


def test_the_checker_finds_a_lost_write_a_duplicate_and_a_stale_read():
    ops = [op("unique", "u1"), op("unique", "u2"), op("unique", "u3", outcome=history.UNKNOWN),
           op("incr", "n", 1), op("incr", "n", 1), op("incr", "n", 1, outcome=history.UNKNOWN),
           op("write", "r", "a", (0, 1)), op("write", "r", "b", (2, 3)),
           op("read", "r", None, (4, 5), result="a")]
    v = history.check(ops, {"u1": 1, "n": 4, "r": "b"})
    assert "u2" in v.lost[0] and len(v.lost) == 1  # u3's outcome is unknown: absent is fine
    assert len(v.duplicated) == 1 and "'n' is 4" in v.duplicated[0]  # 2 acked + 1 unknown
    assert len(v.nonlinearizable) == 1 and "'r'" in v.nonlinearizable[0]
    # the same history, told right, passes
    ops[-1] = op("read", "r", None, (4, 5), result="b")
    v = history.check(ops, {"u1": 1, "u2": 1, "n": 3, "r": "b"})
    assert v.violations == []
    assert history.check(ops, {"u1": 1, "u2": 1, "n": 1, "r": "b"}).lost  # 2 acked, 1 left


def test_the_checker_holds_the_ledger_total_in_every_read_and_at_the_end():
    accounts = {"a": 100, "b": 0}
    ok = [op("transfer", "a", ["b", 30]), op("total", "acct/", result=100)]
    assert history.check(ok, {"a": 70, "b": 30}, accounts).ledger_total_ok is True
    v = history.check(ok, {"a": 70, "b": 60}, accounts)
    assert v.ledger_total_ok is False and "130 != 100" in v.ledger[0]
    v = history.check([op("total", "acct/", result=70)], {"a": 70, "b": 30}, accounts)
    assert v.ledger_total_ok is False and "total of 70" in v.ledger[0]
    assert history.check(ok, {}, None).ledger_total_ok is None


def test_an_unknown_outcome_may_apply_or_not_and_a_refusal_never_does():
    from zrepl import NotLeader, Timeout
    assert history.outcome_of(None) == history.OK
    assert history.outcome_of(Timeout("x")) == history.UNKNOWN
    assert history.outcome_of(NotLeader("x")) == history.FAILED
    assert history.outcome_of(ValueError("x")) == history.FAILED
    assert history.outcome_of(None, done=False) == history.UNKNOWN
    w = op("write", "r", "x", outcome=history.UNKNOWN)
    assert history.check([w, op("read", "r", None, (2, 3), result="x")], {}).violations == []
    assert history.check([w, op("read", "r", None, (2, 3), result=ABSENT)], {}).violations == []


@pytest.mark.timeout(200)
def test_a_leader_cut_from_its_follower_writes_again_before_the_cut_heals(tmp_path):
    """The supervisor routes the chain around the broken link (plan.reroute)
    or deposes a leader that reaches no follower (plan.isolated): writes
    come back while the cut lasts (4 s each), instead of after it."""
    out = tmp_path / "chaos.json"
    r = chaos(["--minutes", "0.4", "--hold", "4", "--faults",
               "partition-leader-follower,partition-leader-followers", "--json", str(out)],
              timeout=180)
    if r.returncode == 2 and not out.exists():
        pytest.skip(r.stderr.strip() or "chaos harness unavailable")
    rep = json.loads(out.read_text())
    detail = f"seed {rep['seed']}:\n{r.stdout[-4000:]}"
    assert r.returncode == 0, detail
    cuts = [f for f in rep["fault_log"] if f["held_s"] >= 4]
    assert cuts, detail
    assert all(f["acked_in_second_half"] > 0 for f in cuts), detail
