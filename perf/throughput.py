"""Commit throughput with many concurrent submitters, synchronous to one
follower in another process, 64-byte commands.

Three ways to submit, 64 submitters each:

* ``blocking``: 64 threads, each calling ``Manager.apply`` in a loop (a
  thread wake-up per command: CPython's cost, shown for reference);
* ``many``: 64 threads, each calling ``Manager.apply_many`` with 64
  commands at a time;
* ``async``: 64 submitters in one thread, each keeping 64
  ``Manager.apply_async`` futures outstanding.

Each mode is measured with the synchronous follower and, in the same run,
on a leader with no follower (the local ceiling).  Every acknowledged
command is counted; at the end the follower must hold as many entries as
the leader acknowledged.

    python3 perf/throughput.py [--seconds 3] [--submitters 64] [--modes blocking,many,async]
                               [--curve]

``--curve`` adds a second leader and follower whose every link is
CURVE-encrypted (README, "Security"), measured in the same run: what
encryption costs.

Target (issue "Replication engine"): >= 250,000 commands/s synchronous.
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time
from pathlib import Path

from _common import Workdir, keys_for, process_stats, tcp_address, wait_until

from workers.kv import KV  # noqa: E402
from zrepl import (Config, FileStorage, FollowerState, NodeClient, NodeRole,  # noqa: E402
                   Replica)

VALUE = b"v" * 50


def run_mode(manager, mode: str, submitters: int, seconds: float) -> tuple[int, float]:
    stop = threading.Event()
    counts = [0] * submitters

    def blocking(i: int) -> None:
        n = 0
        while not stop.is_set():
            manager.apply(("set", f"b{i}-{n % 1000}", VALUE))
            n += 1
        counts[i] = n

    def many(i: int) -> None:
        n = 0
        while not stop.is_set():
            manager.apply_many([("set", f"m{i}-{(n + j) % 1000}", VALUE) for j in range(64)])
            n += 64
        counts[i] = n

    t0 = time.perf_counter()
    if mode == "async":
        queues = [collections.deque() for _ in range(submitters)]
        done = 0
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for i, q in enumerate(queues):
                while q and q[0].done():
                    q.popleft().result()
                    done += 1
                while len(q) < 64:
                    q.append(manager.apply_async(("set", f"a{i}-{done % 1000}", VALUE)))
            if queues[0]:
                queues[0][0].result(timeout=10)
        for q in queues:
            for f in q:
                f.result(timeout=10)
                done += 1
        return done, time.perf_counter() - t0
    target = {"blocking": blocking, "many": many}[mode]
    threads = [threading.Thread(target=target, args=(i,)) for i in range(submitters)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--submitters", type=int, default=64)
    ap.add_argument("--modes", default="blocking,many,async")
    ap.add_argument("--fsync", default="batch", choices=["always", "batch", "off"])
    ap.add_argument("--curve", action="store_true",
                    help="also measure a pair whose links are CURVE-encrypted")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    modes = args.modes.split(",")
    results: dict = {}
    kinds = ["sync"] + (["curve"] if args.curve else [])
    started: list = []
    with Workdir() as w:
        pairs = {}
        for kind in kinds:
            follower_addr, leader_addr = tcp_address(), tcp_address()
            keys, operator = keys_for(w, kind, {"leader": leader_addr, "follower": follower_addr}) \
                if kind == "curve" else ({}, None)
            w.operator = operator
            follower = w.start_node(f"follower-{kind}", follower_addr,
                                    {"fsync": args.fsync, **keys.get("follower", {})})
            with NodeClient(follower_addr, config=operator) as fc:
                fc.set_role(NodeRole.FOLLOWER, 1)
            cfg = Config(fsync=args.fsync, **keys.get("leader", {}))
            storage = FileStorage(w.path / f"leader-{kind}", config=cfg)
            leader = Replica(KV(), storage, leader_addr, cfg).start()
            started.append((leader, storage))
            pairs[kind] = (leader, follower, follower_addr, operator)
        cfg = Config(fsync=args.fsync)
        alone_storage = FileStorage(w.path / "alone", config=cfg)
        alone = Replica(KV(), alone_storage, tcp_address(), cfg).start()
        started.append((alone, alone_storage))
        try:
            for leader, _, follower_addr, _ in pairs.values():
                leader.set_role(NodeRole.LEADER, 1)
                leader.set_follower(follower_addr)
                wait_until(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS,
                           30, "synchronous follower")
            alone.set_role(NodeRole.LEADER, 1)
            for mode in modes:
                n, t = run_mode(alone.manager, mode, args.submitters, args.seconds)
                results[(mode, "alone")] = n / t
                for kind, (leader, *_) in pairs.items():
                    n, t = run_mode(leader.manager, mode, args.submitters, args.seconds)
                    results[(mode, kind)] = n / t
                    if leader.status().follower_state != FollowerState.SYNCHRONOUS:
                        raise RuntimeError("follower fell out of SYNCHRONOUS during the run")
            checks = {}
            for kind, (leader, follower, follower_addr, operator) in pairs.items():
                top = leader.status().max_wal
                wait_until(lambda: leader.status().follower_acked_wal >= top, 30, "final acks")
                with NodeClient(follower_addr, config=operator) as fc:
                    checks[kind] = (fc.status().max_applied_wal, top)
            follower = pairs["sync"][1]
            stats = process_stats([follower.pid])
        finally:
            for r, st in started:
                r.stop()
                st.close()
    f_applied, top = checks["sync"]

    print(f"commit throughput, {args.submitters} submitters, 64-byte commands, "
          f"fsync={args.fsync}, {args.seconds:g} s per measurement")
    print(f"{'mode':10} {'synchronous':>14} {'leader alone':>14} {'ratio':>7}"
          + (f" {'with CURVE':>14} {'÷ plain':>10}" if args.curve else ""))
    for mode in modes:
        s, a = results[(mode, "sync")], results[(mode, "alone")]
        line = f"{mode:10} {s:12,.0f}/s {a:12,.0f}/s {s / a:6.0%}"
        if args.curve:
            c = results[(mode, "curve")]
            line += f" {c:12,.0f}/s {c / s:9.2f}x"
        print(line)
    print(f"follower applied {f_applied:,} entries = leader's {top:,}; follower RSS "
          f"{stats.get(follower.pid, {}).get('rss_mib', 0):.0f} MiB")
    best = max(results[(m, "sync")] for m in modes)
    print(f"target >= 250,000 commands/s synchronous: {'met' if best >= 250_000 else 'MISSED'} "
          f"(best mode {best:,.0f}/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{m}/{k}": v for (m, k), v in results.items()},
                                              indent=1))
    return 0 if all(applied == top for applied, top in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
