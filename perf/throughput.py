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

Target (issue "Replication engine"): >= 250,000 commands/s synchronous.
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time
from pathlib import Path

from _common import Workdir, process_stats, tcp_address, wait_until

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
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    modes = args.modes.split(",")
    cfg = Config(fsync=args.fsync)
    results: dict = {}
    with Workdir() as w:
        follower_addr = tcp_address()
        follower = w.start_node("follower", follower_addr, {"fsync": args.fsync})
        with NodeClient(follower_addr) as fc:
            fc.set_role(NodeRole.FOLLOWER, 1)
        storage = FileStorage(w.path / "leader", config=cfg)
        leader = Replica(KV(), storage, tcp_address(), cfg).start()
        alone_storage = FileStorage(w.path / "alone", config=cfg)
        alone = Replica(KV(), alone_storage, tcp_address(), cfg).start()
        try:
            leader.set_role(NodeRole.LEADER, 1)
            leader.set_follower(follower_addr)
            alone.set_role(NodeRole.LEADER, 1)
            wait_until(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 30,
                       "synchronous follower")
            for mode in modes:
                n, t = run_mode(alone.manager, mode, args.submitters, args.seconds)
                results[(mode, "alone")] = n / t
                n, t = run_mode(leader.manager, mode, args.submitters, args.seconds)
                results[(mode, "sync")] = n / t
                if leader.status().follower_state != FollowerState.SYNCHRONOUS:
                    raise RuntimeError("follower fell out of SYNCHRONOUS during the run")
            top = leader.status().max_wal
            wait_until(lambda: leader.status().follower_acked_wal >= top, 30, "final acks")
            with NodeClient(follower_addr) as fc:
                f_applied = fc.status().max_applied_wal
            stats = process_stats([follower.pid])
        finally:
            leader.stop()
            alone.stop()
            storage.close()
            alone_storage.close()

    print(f"commit throughput, {args.submitters} submitters, 64-byte commands, "
          f"fsync={args.fsync}, {args.seconds:g} s per measurement")
    print(f"{'mode':10} {'synchronous':>14} {'leader alone':>14} {'ratio':>7}")
    for mode in modes:
        s, a = results[(mode, "sync")], results[(mode, "alone")]
        print(f"{mode:10} {s:12,.0f}/s {a:12,.0f}/s {s / a:6.0%}")
    print(f"follower applied {f_applied:,} entries = leader's {top:,}; follower RSS "
          f"{stats.get(follower.pid, {}).get('rss_mib', 0):.0f} MiB")
    best = max(results[(m, "sync")] for m in modes)
    print(f"target >= 250,000 commands/s synchronous: {'met' if best >= 250_000 else 'MISSED'} "
          f"(best mode {best:,.0f}/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{m}/{k}": v for (m, k), v in results.items()},
                                              indent=1))
    return 0 if f_applied == top else 1


if __name__ == "__main__":
    raise SystemExit(main())
