"""``zrepl sim``: the whole cluster under seeded faults.

A fixed set of seeds runs on every suite run (about a minute); each must
keep every invariant.  Planted bugs show the simulator catches what it
claims to; a seed replays exactly; the linearizability checker tells a
bad history from a good one; the command line behaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zrepl.sim import linear
from zrepl.sim.bugs import BUGS, planted
from zrepl.sim.linear import ABSENT, INF, RegOp
from zrepl.sim.runner import shrink
from zrepl.sim.world import FAULT_KINDS, Run, Settings

# Seeds that once broke an invariant, each the first to find one of the
# bugs fixed with it (see the commit "Safety: nine ways..."): they must keep
# passing.  With the code of the time they failed as noted.
REGRESSIONS = {
    2: "fsync failed after the write: the App missed a logged batch",
    3: "same epoch, two entries at one WAL id (a leader's failed forwarded write)",
    10: "restarted leader rebuilt its follower from a shorter log; float timer stall",
    12: "planner promoted the old synchronous follower, not the leader's new one",
    16: "a cleared forwarder rebuilt its follower; a partial state sync left in the App",
    26: "follower power loss after acknowledging unsynced writes, then leader paused",
    27: "a checkpoint of a replaced history restored at restart",
    43: "a new leader without a follower restarted after a power loss kept its epoch",
    73: "a leader that rebooted was given its epoch back though a follower held more",
    95: "lease renewals delayed past the lease margin",
    117: "a restarted supervisor re-adopted a leader of an epoch below one it issued",
    1079: "a forgotten client's first command retried and applied twice (count eviction)",
    5169: "a stale synchronous claim for a follower that rebooted, recorded as fresh",
    5191: "no leader remembered: the most advanced live node chosen while a dead one held more",
    10643: "a new leader's history kept an epoch that began after its log (engine stopped)",
    20545: "the same, on another node",
    20721: "a follower that never joined the epoch blocked every promotion",
    10954: "a forwarder behind its follower rebuilt it once the follower obeyed a newer epoch",
    10991: "a follower given to the leader, then rebooted, counted as holding the most",
    30001: "a lost promotion said again to a leader that had rebooted and lost writes",
    40098: "a forwarder streamed a tail no leader wrote; its follower then refused it",
    50394: "a follower fresh from a state sync (empty WAL) ranked below one that held less",
    130015: "a leader whose epoch was spent deposed for reaching no follower: nobody promotable",
    130058: "the same: deposed, it was never replaced by the node holding more",
}
FIXED_SEEDS = list(range(1, 31))


def run(seed: int, **settings) -> "object":
    return Run(seed, Settings(**settings)).execute()


def assert_clean(r) -> None:
    assert not r.violations, f"seed {r.seed}: " + "; ".join(map(str, r.violations[:5])) + \
        f" (replay: python3 -m zrepl sim --seed {r.seed} --replay)"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("chunk", range(3))
def test_fixed_seeds_keep_every_invariant(chunk):
    seeds = FIXED_SEEDS[chunk::3]
    total = {"ok": 0, "faults": 0}
    for seed in seeds:
        r = run(seed)
        assert_clean(r)
        assert r.faults and r.ops["ok"] > 100  # it did inject faults and did write
        total["ok"] += r.ops["ok"]
        total["faults"] += sum(r.faults.values())
    assert total["faults"] >= 20 * len(seeds)


@pytest.mark.timeout(300)
def test_switchovers_and_membership_changes_among_the_faults_keep_every_invariant():
    """The opt-in operator faults (not in the default mix, which the
    regression seeds pin): planned switchovers and removals (added back when
    the fault heals) among crashes, partitions, pauses and message faults."""
    faults = ("switchover", "member", "crash", "partition", "pause", "delay", "drop")
    for seed in range(300, 306):
        r = run(seed, faults=faults)
        assert_clean(r)
        assert r.faults["switchover"] and r.faults["member"]


def test_seeds_that_found_bugs_stay_fixed():
    for seed in sorted(set(REGRESSIONS) - set(FIXED_SEEDS)):
        assert_clean(run(seed))


@pytest.mark.timeout(300)
def test_ledger_and_four_node_chains():
    for seed in (1, 2, 3):
        r = run(seed, app="workers.ledger:Ledger")
        assert_clean(r)
        assert r.ops["ok"] > 100
    for seed in (1, 2):
        assert_clean(run(seed, nodes=4))


class Counter:
    """A user's App, as the docs show it: sim_command makes its commands."""

    def __init__(self):
        self.n = 0

    def apply(self, cmds):
        self.n += sum(cmds)
        return [0] * len(cmds)

    def clear_state(self):
        self.n = 0

    def iter_state(self):
        yield self.n

    @staticmethod
    def sim_command(rng):
        return str(rng.randint(1, 9)).encode()

    def encode_cmd(self, cmd, entry):
        entry.data = str(cmd).encode()
        return entry

    def decode_cmd(self, entry):
        return int(entry.data)


@pytest.mark.timeout(120)
def test_the_chaos_harness_app_runs_with_its_checks_and_a_torn_transfer_is_caught():
    r = Run(5, Settings(app="workers.bank:Bank", steps=8000)).execute()
    assert_clean(r)
    assert r.ops["ok"] > 50
    from workers.bank import Bank
    real = Bank._transfer

    def debit_only(self, src, dst, amount):  # a planted bug: money leaves, never arrives
        code = real(self, src, dst, amount)
        if code == 0:
            self.store.put(store_key(dst), packb(self.get(dst) - amount))
        return code
    from workers.kv import packb, store_key
    Bank._transfer = debit_only
    try:
        r = Run(5, Settings(app="workers.bank:Bank", steps=8000)).execute()
    finally:
        Bank._transfer = real
    assert any(v.invariant == "app" and "ledger total" in v.detail for v in r.violations)


@pytest.mark.timeout(120)
def test_a_users_own_app_runs_with_the_generic_invariants():
    r = Run(4, Settings(app="tests.test_sim:Counter", steps=8000)).execute()
    assert_clean(r)
    assert r.ops["ok"] > 50


# --- planted bugs: the simulator must bite -------------------------------------------

# (bug, settings, seeds tried from 1, the invariants that count as
# catching it).  Measured with this code, first catching seed: 19 (with 5
# nodes and faults twice as often; it was 13 with 4 nodes until chain
# members acknowledged straight to the head, after which a head waiting
# for every member stops most of the loss on its own and 4 nodes first
# catch it at seed 137; with 3 nodes the planner's rules for
# deeper chain members stop the loss on their own; it was seed 1 at the
# default fault rate until the supervisor learned to route around a
# broken link, which closes most windows in which a forwarder serves a
# follower its own upstream has not checked: 60 with 5 nodes, 69 with 4
# and no network faults), 28 (with partitions, pauses and
# crashes only: the loss of a write a leader read saw needs a failover at
# that moment), 11 (3 before the rule that only a checked log goes down the
# chain), 4, 6.  A
# forgetful session table bites only when a retry comes after its session
# was pushed out, which session_expiry (above the clients' retry_for)
# prevents: it is shown with session_expiry at 0.2 s and frequent new
# sessions (first catching seed 49; it was within 35 before the supervisor
# routed around broken links).  (Which seed finds a bug moves when the code moves: the bounds
# leave some room and say so when they no longer hold.)
PLANTED = [("forwarder-calls-empty-follower-synchronous", {"nodes": 5, "fault_gap": 0.3}, 30,
            {"divergence", "state", "lost"}),
           ("leader-read-unacknowledged", {"faults": ("partition", "pause", "crash")}, 40,
            {"linearizable"}),
           # (first catching seed 2 with faults twice as often; 43 at the
           # default rate since the batches a follower acknowledged wait in
           # order for their confirmation - seeds move when the code does)
           ("no-stale-epoch-check", {"fault_gap": 0.3}, 10, {"lost", "linearizable"}),
           ("no-lease-check", {}, 10, {"lease"}),
           ("forgetful-session-table", {"session_expiry": 0.2, "new_sessions": 0.05}, 60,
            {"exactly-once"}),
           # (first catching seed 1: a switchover whose old leader keeps its lease
           # admits a write after its successor was appointed)
           ("switchover-without-step-down", {"faults": ("switchover", "delay", "crash")}, 10,
            {"lease"}),
           # (first catching seed 1: with members acknowledging straight to
           # the head, the follower's own ack comes before the member holds it)
           ("head-ignores-chain-members", {}, 5, {"chain"})]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("bug,settings,seeds,invariants", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_bugs_are_caught(bug, settings, seeds, invariants):
    with planted(bug):
        for seed in range(1, seeds + 1):
            r = run(seed, **settings)
            if any(v.invariant in invariants for v in r.violations):
                return
    pytest.fail(f"{bug} not caught by seeds 1..{seeds}")


def test_every_planted_bug_is_put_back():
    from zrepl.core.node import NodeCore
    before = {name: [owner.__dict__[attr] for owner, attr, _ in parts]
              for name, parts in BUGS.items()}
    for name in BUGS:
        with planted(name):
            pass
    assert before == {name: [owner.__dict__[attr] for owner, attr, _ in parts]
                      for name, parts in BUGS.items()}
    assert NodeCore.check_writable.__module__ == "zrepl.core.node"
    with pytest.raises(ValueError, match="unknown planted bug"):
        with planted("nonsense"):
            pass


# --- replay and shrinking ----------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_seed_replays_step_for_step():
    a, b = run(9, steps=6000), run(9, steps=6000)
    assert a.trace == b.trace and a.trace_hash == b.trace_hash
    assert run(10, steps=6000).trace_hash != a.trace_hash


@pytest.mark.timeout(120)
def test_a_failing_seed_shrinks_to_fewer_faults():
    with planted("no-lease-check"):
        r = run(4, steps=6000)
        assert r.violations
        script, best = shrink(4, Settings(steps=6000), r, budget=12)
    assert len(script) < len(r.script)
    assert any(v.invariant == r.violations[0].invariant for v in best.violations)


# --- the linearizability checker -----------------------------------------------------

W = lambda v, a, b: RegOp("write", a, b, v, 0)  # noqa: E731
R = lambda v, a, b: RegOp("read", a, b, None, v)  # noqa: E731


def test_linearizability_checker():
    assert linear.check([W(1, 0, 1), R(1, 2, 3)])[0] is True
    assert linear.check([W(1, 0, 1), R(ABSENT, 2, 3)])[0] is False  # stale read
    # an unknown write may take effect late, or never
    assert linear.check([W(1, 0, 1), W(2, 0.5, INF), R(1, 2, 3), R(2, 4, 5)])[0] is True
    assert linear.check([W(1, 0, 1), W(2, 0.5, INF), R(2, 2, 3), R(1, 4, 5)])[0] is False
    # concurrent operations may be ordered either way
    assert linear.check([W(1, 0, 3), R(1, 1, 2), R(ABSENT, 1.5, 2.5)])[0] is True
    cas = RegOp("cas", 4, 5, (1, 2), linear.OK)
    assert linear.check([W(1, 0, 1), cas, R(2, 6, 7)])[0] is True
    assert linear.check([W(1, 0, 1), RegOp("cas", 4, 5, (3, 2), linear.OK)])[0] is False
    ok, why = linear.check([W(i, i, i + 0.5) for i in range(30)] + [R(-1, 100, 101)], budget=10)
    assert ok in (False, None) and why


# --- the command line ----------------------------------------------------------------

def zrepl(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "zrepl", "sim", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.timeout(200)
def test_command_line_summary_json_and_replay(tmp_path):
    out = tmp_path / "sim.json"
    p = zrepl("--seeds", "2", "--first", "5", "--steps", "5000", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "zrepl sim: 2 seeds, 10000 steps" in p.stdout and "0 invariant violations" in p.stdout
    s = json.loads(out.read_text())
    assert s["seeds"] == 2 and s["violations"] == {} and s["acknowledged"] > 0
    assert set(s["faults"]) <= set(FAULT_KINDS) and sum(s["faults"].values()) > 0
    hashes = []
    for hashseed in ("1", "2"):  # the same trace whatever Python's hash seed
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        p = zrepl("--seed", "5", "--steps", "5000", "--replay", env=env)
        assert p.returncode == 0, p.stderr
        hashes.append(p.stdout.strip().splitlines()[-1].rsplit("trace ", 1)[-1])
        assert "fault " in p.stdout and "appoint " in p.stdout
    assert hashes[0] == hashes[1] == s["results"][0]["trace_hash"]


@pytest.mark.timeout(60)
def test_command_line_errors():
    for args, msg in [(["--app", "nosuch:Thing"], "cannot import 'nosuch'"),
                      (["--faults", "crash,meteor"], "unknown fault kind(s) meteor"),
                      (["--seed", "1", "--seeds", "2"], "not both"),
                      (["--replay"], "give --seed"),
                      (["--nodes", "1"], "at least 2"),
                      (["--app", "workers.kv:Nope"], "has no 'Nope'"),
                      (["--app", "tests.test_sim:Settings"], "sim_command")]:
        p = zrepl(*args, "--steps", "100")
        assert p.returncode == 1 and msg in p.stderr, (args, p.stderr)
