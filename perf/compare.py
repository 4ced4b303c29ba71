"""zrepl next to the tools people use today, on their own kind of benchmark,
in the same run (DESIGN.md's two comparison targets).

1. **Synchronous commit from a remote client**, one client process, 64-byte
   values, one write at a time:

   * zrepl: ``workers.kv.KVClient.set`` on a leader node whose every
     acknowledged write is on a synchronous follower node;
   * Redis: ``SET`` then ``WAIT 1`` from redis-py, against a master with
     one replica (``appendonly yes``, ``appendfsync everysec``: zrepl's
     default ``fsync="batch"`` is the nearest);
   * reference: a bare pyzmq REQ/REP round trip.

   The cases run in alternating rounds so that drift hits all alike; each
   figure is the median of the rounds' p50.  Target: zrepl p50 <= Redis.

2. **Throughput, many concurrent submitters, synchronous to one follower**,
   64-byte commands:

   * zrepl: 64 threads calling ``Manager.apply_many`` (64 commands each) on
     a leader in this process with a follower node process
     (``perf/throughput.py``'s ``many`` mode);
   * PySyncObj: a two-node cluster (a Raft commit needs both), each node
     submitting ``@replicated`` calls with callbacks and a bounded number
     in flight, as PySyncObj's own benchmark does; its log is kept in
     memory (its default: no journal file), zrepl's is on disk.  Its
     throughput depends on how many calls are in flight, so several
     windows are tried and its best counts.

   Target (DESIGN.md): zrepl >= 15 x PySyncObj and >= 250,000 commands/s.

Needs ``pip install -e '.[perf]'`` (redis-py, pysyncobj) and a
``redis-server`` binary on PATH (Debian: ``apt-get install redis-server``);
a part whose tool is missing is skipped with a note.

    python3 perf/compare.py [--seconds 2] [--rounds 3] [--parts redis,pysyncobj]
                            [--windows 1000,5000,20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from _common import ECHO_SERVER, Workdir, pct, tcp_address, wait_until
from kv import run_case
from throughput import run_mode

from workers.kv import KV  # noqa: E402
from zrepl import (Config, FileStorage, FollowerState, NodeClient, NodeRole,  # noqa: E402
                   Replica)

REDIS_CLIENT = r"""
import json, sys, time
import redis
port, start_at, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
r = redis.Redis(host="127.0.0.1", port=port)
value = b"v" * 64
keys = [f"k{i}" for i in range(1000)]
r.set(keys[0], value)
while time.time() < start_at:
    time.sleep(0.0005)
lat, n, clock = [], 0, time.perf_counter
end = clock() + seconds
while clock() < end:
    t0 = clock()
    r.set(keys[n % 1000], value)
    if r.wait(1, 1000) < 1:
        raise SystemExit("WAIT 1 timed out: the replica did not acknowledge")
    lat.append(clock() - t0)
    n += 1
print(json.dumps({"n": n, "seconds": seconds, "lat": lat}))
"""

SYNCOBJ_NODE = r"""
import json, sys, threading, time
from pysyncobj import SyncObj, SyncObjConf, replicated, FAIL_REASON

class Store(SyncObj):
    def __init__(self, me, partners):
        super().__init__(me, partners, SyncObjConf(dynamicMembershipChange=False))
        self.applied = 0

    @replicated
    def put(self, value):
        self.applied += 1

me, partners = sys.argv[1], sys.argv[2].split(",")
start_at, seconds, window = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
store = Store(me, partners)
slots = threading.Semaphore(window)
ok = [0]
failed = [0]

def done(result, err):
    if err == FAIL_REASON.SUCCESS:
        ok[0] += 1
    else:
        failed[0] += 1
    slots.release()

deadline = time.time() + 60
while store.getStatus().get("leader") is None:
    if time.time() > deadline:
        raise SystemExit("no Raft leader within 60 s")
    time.sleep(0.05)
while time.time() < start_at:
    time.sleep(0.001)
value = b"v" * 64
t_end = time.time() + seconds
counted_from = None
while True:
    now = time.time()
    if counted_from is None and now >= start_at + 0.5:  # after a warm-up
        counted_from, ok_from = now, ok[0]
    if now >= t_end:
        break
    if not slots.acquire(timeout=10):  # callbacks stopped coming: slots leaked
        print(json.dumps({"stalled": True}))
        sys.stdout.flush()
        store.destroy()
        raise SystemExit(0)
    store.put(value, callback=done)
ok_to, t_to = ok[0], time.time()
print(json.dumps({"ok": ok_to - ok_from, "seconds": t_to - counted_from, "failed": failed[0],
                  "applied": store.applied}))
sys.stdout.flush()
store.destroy()
"""


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def redis_server(w: Workdir, name: str, port: int, *extra: str) -> subprocess.Popen:
    d = w.path / name
    d.mkdir()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(d), "--save", "", "--appendonly", "yes",
                             "--appendfsync", "everysec", "--logfile", str(d / "log"),
                             *extra], cwd=d)
    w.extra.append(proc)
    return proc


def run_redis_client(w: Workdir, port: int, seconds: float) -> dict:
    start_at = time.time() + 1.0
    [r] = w.collect_json(w.spawn_scripts(REDIS_CLIENT, [[str(port), str(start_at),
                                                         str(seconds)]]),
                         seconds + 60, "the Redis client")
    return {"ops_per_s": r["n"] / seconds, "p50_us": pct(r["lat"], 0.5) * 1e6,
            "p99_us": pct(r["lat"], 0.99) * 1e6}


def part_redis(w: Workdir, args) -> dict:
    import redis
    m_port, r_port = (int(tcp_address().rsplit(":", 1)[1]) for _ in range(2))
    redis_server(w, "redis-master", m_port)
    redis_server(w, "redis-replica", r_port, "--replicaof", "127.0.0.1", str(m_port))
    master = redis.Redis(host="127.0.0.1", port=m_port)
    wait_until(lambda: _redis_info(master).get("connected_slaves") == 1, 30,
               "the Redis replica to connect")
    wait_until(lambda: master.set("probe", b"x") and master.wait(1, 100) == 1, 30,
               "the Redis replica to acknowledge")

    settings = {"fsync": "batch", "checkpoint_entries": 0, "checkpoint_interval": 0}
    lead, fol = w.start_chain(["lead", "fol"], settings)
    echo = tcp_address()
    w.start_python(ECHO_SERVER % echo)

    rounds: dict[str, list[dict]] = {"bare": [], "zrepl": [], "redis": []}
    print(f"{'round':6} {'bare p50':>9} {'zrepl p50':>10} {'p99':>8} {'redis p50':>10} "
          f"{'p99':>8}", flush=True)
    for i in range(args.rounds):
        rounds["bare"].append(run_case(w, echo, "echo", 1, args.seconds))
        rounds["zrepl"].append(run_case(w, lead, "set", 1, args.seconds))
        rounds["redis"].append(run_redis_client(w, m_port, args.seconds))
        b, z, r = (rounds[k][-1] for k in ("bare", "zrepl", "redis"))
        print(f"{i + 1:<6} {b['p50_us']:7.0f}µs {z['p50_us']:8.0f}µs {z['p99_us']:6.0f}µs "
              f"{r['p50_us']:8.0f}µs {r['p99_us']:6.0f}µs", flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("p50_us", "p99_us", "ops_per_s")}
           for k, v in rounds.items()}
    with NodeClient(lead) as c, NodeClient(fol) as f:
        top = c.status().max_wal
        wait_until(lambda: f.status().max_applied_wal >= top, 30, "the follower")
        same = c.state_digest()["sha256"] == f.state_digest()["sha256"]
    z, r, b = med["zrepl"], med["redis"], med["bare"]
    print(f"median: bare {b['p50_us']:.0f}µs; zrepl set p50 {z['p50_us']:.0f}µs "
          f"({z['ops_per_s']:,.0f}/s), Redis SET+WAIT 1 p50 {r['p50_us']:.0f}µs "
          f"({r['ops_per_s']:,.0f}/s): zrepl/Redis = {z['p50_us'] / r['p50_us']:.2f} "
          f"(target <= 1: {'met' if z['p50_us'] <= r['p50_us'] else 'MISSED'}); follower "
          f"state identical: {'yes' if same else 'NO'}")
    return {"median": med, "rounds": rounds, "follower_identical": same}


def _redis_info(r) -> dict:
    try:
        return r.info("replication")
    except Exception:  # not up yet
        return {}


def run_pysyncobj(w: Workdir, seconds: float, window: int) -> dict | None:
    """One fresh two-node cluster; commits/s over both nodes, or None if
    callbacks stopped coming (PySyncObj lost some: their slots leaked)."""
    ports = [int(tcp_address().rsplit(":", 1)[1]) for _ in range(2)]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    start_at = time.time() + 5.0  # time to elect a leader
    procs = w.spawn_scripts(SYNCOBJ_NODE, [[a, ",".join(x for x in addrs if x != a),
                                            str(start_at), str(seconds), str(window)]
                                           for a in addrs])
    results = w.collect_json(procs, seconds + 120, "a PySyncObj node")
    if any(r.get("stalled") for r in results):
        return None
    return {"per_s": sum(r["ok"] / r["seconds"] for r in results),
            "failed": sum(r["failed"] for r in results)}


def part_pysyncobj(w: Workdir, args) -> dict:
    seconds = max(args.seconds, 3.0)
    by_window = {}
    for window in (int(x) for x in args.windows.split(",")):
        r = run_pysyncobj(w, seconds, window)
        by_window[window] = r
        print(f"PySyncObj, 2 nodes, both submitting, {window} calls in flight each: " +
              (f"{r['per_s']:,.0f} commits/s ({r['failed']} failed callbacks)" if r else
               "stalled (callbacks stopped coming)"), flush=True)
    best = max((r for r in by_window.values() if r), key=lambda r: r["per_s"], default=None)
    if best is None:
        raise RuntimeError("PySyncObj stalled at every window")
    syncobj = best["per_s"]

    cfg = Config(fsync="batch")
    follower_addr = tcp_address()
    w.start_node("tp-follower", follower_addr, {"fsync": "batch"})
    with NodeClient(follower_addr) as fc:
        fc.set_role(NodeRole.FOLLOWER, 1)
    storage = FileStorage(w.path / "tp-leader", config=cfg)
    leader = Replica(KV(), storage, tcp_address(), cfg).start()
    try:
        leader.set_role(NodeRole.LEADER, 1)
        leader.set_follower(follower_addr)
        wait_until(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 30,
                   "synchronous follower")
        runs = []
        for _ in range(args.rounds):
            n, t = run_mode(leader.manager, "many", 64, args.seconds)
            runs.append(n / t)
        if leader.status().follower_state != FollowerState.SYNCHRONOUS:
            raise RuntimeError("the follower fell out of SYNCHRONOUS during the run")
    finally:
        leader.stop()
        storage.close()
    zrepl = statistics.median(runs)
    print(f"zrepl apply_many, 64 submitters, synchronous follower: median {zrepl:,.0f}/s "
          f"over {args.rounds} runs ({', '.join(f'{x:,.0f}' for x in runs)})")
    print(f"zrepl/PySyncObj (its best window) = {zrepl / syncobj:.1f}x (target >= 15x: "
          f"{'met' if zrepl >= 15 * syncobj else 'MISSED'}; >= 250,000/s: "
          f"{'met' if zrepl >= 250_000 else 'MISSED'})")
    return {"pysyncobj_per_s": syncobj, "pysyncobj_by_window": by_window, "zrepl_per_s": zrepl,
            "zrepl_runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per round (default 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="redis,pysyncobj")
    ap.add_argument("--windows", default="1000,5000,20000",
                    help="PySyncObj calls in flight per node, each tried; its best counts "
                         "(default 1000,5000,20000)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    parts = args.parts.split(",")
    results: dict = {}
    with Workdir("zrepl-compare-") as w:
        if "redis" in parts:
            print("1. synchronous commit from a remote client, one client, 64-byte values")
            if not have("redis") or not shutil.which("redis-server"):
                print("   skipped: needs redis-py (pip install -e '.[perf]') and redis-server "
                      "on PATH (apt-get install redis-server)\n")
            else:
                results["redis"] = part_redis(w, args)
                print()
        if "pysyncobj" in parts:
            print("2. throughput, many submitters, synchronous to one follower, 64-byte "
                  "commands")
            if not have("pysyncobj"):
                print("   skipped: needs pysyncobj (pip install -e '.[perf]')")
            else:
                results["pysyncobj"] = part_pysyncobj(w, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
