"""Bringing a follower up to date: full state sync and catch-up from the log.

1. **Full state sync.**  A leader (in this process) holding ``--keys``
   keys, whose WAL no longer starts at 1 (a checkpoint let it be
   truncated), gets an empty follower (another process).  Measured: time
   from ``set_follower`` until the snapshot is applied, in entries/s; and
   the leader's own commit latency (a paced writer) during the sync,
   next to the same writer's idle latency measured just before.
2. **Catch-up from the log.**  The follower is stopped, the leader commits
   ``--keys`` more entries, the follower restarts: time until it is
   synchronous again, in entries/s.

    python3 perf/sync.py [--keys 1000000] [--pace 2000]

Targets (DESIGN.md): state sync >= 1,000,000 entries/s with leader p99
during it <= 3 x idle p99; catch-up >= 1,000,000 entries/s.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from pathlib import Path

from _common import Workdir, pct, process_stats, tcp_address, us, wait_until

from workers.kv import KV  # noqa: E402
from zrepl import (Config, FileStorage, FollowerState, NodeClient, NodeRole,  # noqa: E402
                   Replica)


class PacedWriter(threading.Thread):
    """Commits one small write every 1/pace seconds and records latencies."""

    def __init__(self, manager, pace: float):
        super().__init__(daemon=True)
        self.manager = manager
        self.period = 1.0 / pace
        self.latencies: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        next_t = time.perf_counter()
        while not self.halt.is_set():
            t = time.perf_counter()
            self.manager.apply(("set", f"w{i % 1000}", i))
            self.latencies.append(time.perf_counter() - t)
            i += 1
            next_t += self.period
            delay = next_t - time.perf_counter()
            if delay > 0:
                self.halt.wait(delay)  # pacing, not synchronisation

    def stop(self) -> list[float]:
        self.halt.set()
        self.join()
        return self.latencies


def load(manager, start: int, n: int) -> None:
    chunk = 4096
    for base in range(start, start + n, chunk):
        manager.apply_many([("set", f"k{i:08d}", i) for i in range(base, min(base + chunk, start + n))])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--pace", type=float, default=2000, help="paced writer's commits per second")
    ap.add_argument("--idle-seconds", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = args.keys
    settings = {"fsync": "batch", "checkpoint_entries": 0, "checkpoint_interval": 0,
                "segment_bytes": 8 << 20}
    cfg = Config(**settings, max_retained_wal=10 * n)
    out: dict = {}
    with Workdir() as w:
        storage = FileStorage(w.path / "leader", config=cfg)
        leader = Replica(KV(), storage, tcp_address(), cfg).start()
        try:
            leader.set_role(NodeRole.LEADER, 1)
            t0 = time.perf_counter()
            load(leader.manager, 0, n)
            print(f"loaded {n:,} keys into the leader in {time.perf_counter() - t0:.1f} s")
            leader.checkpointer.request()
            wait_until(lambda: leader.status().min_wal > 1, 120, "checkpoint and WAL truncation")

            writer = PacedWriter(leader.manager, args.pace)
            writer.start()
            time.sleep(args.idle_seconds)  # the idle reference: a measurement window
            idle = writer.stop()

            follower_addr = tcp_address()
            fsettings = dict(settings, max_retained_wal=10 * n)
            follower = w.start_node("follower", follower_addr, fsettings)
            with NodeClient(follower_addr) as fc:
                fc.set_role(NodeRole.FOLLOWER, 1)
            writer = PacedWriter(leader.manager, args.pace)
            writer.start()
            t0 = time.perf_counter()
            leader.set_follower(follower_addr)
            wait_until(lambda: leader.core.link.state == FollowerState.SYNCING_STATE, 30, "state sync")
            wait_until(lambda: leader.core.link.state in (FollowerState.SYNCING_LOG,
                                                      FollowerState.SYNCHRONOUS), 600,
                       "state sync to finish")
            t_state = time.perf_counter() - t0
            during = writer.stop()
            snap_entries = leader.core.link.acked  # the snapshot's WAL id
            wait_until(lambda: leader.core.link.state == FollowerState.SYNCHRONOUS, 60, "synchronous")
            st = leader.status()
            state_rate = n / t_state
            out["state_sync"] = {"entries": n, "seconds": t_state, "entries_per_s": state_rate,
                                 "idle_p50": pct(idle, .5), "idle_p99": pct(idle, .99),
                                 "during_p50": pct(during, .5), "during_p99": pct(during, .99)}
            print(f"\nfull state sync of {n:,} keys (snapshot at WAL {snap_entries:,}): "
                  f"{t_state:.2f} s = {state_rate:,.0f} entries/s")
            print(f"leader commit latency, paced writer at {args.pace:g}/s (local commits: the "
                  f"follower is not synchronous yet)")
            print(f"   idle before:     p50 {us(pct(idle, .5))}  p99 {us(pct(idle, .99))}  "
                  f"({len(idle)} commits)")
            print(f"   during the sync: p50 {us(pct(during, .5))}  p99 {us(pct(during, .99))}  "
                  f"({len(during)} commits)  p99 ratio {pct(during, .99) / pct(idle, .99):.2f}x")

            # --- catch-up from the log
            follower.send_signal(signal.SIGKILL)
            follower.wait()
            base = st.max_wal
            load(leader.manager, n, n)
            target = leader.status().max_wal
            follower = w.start_node("follower", follower_addr, fsettings)
            wait_until(lambda: leader.core.link.state == FollowerState.SYNCHRONOUS and
                       leader.core.link.acked >= target, 600, "catch-up")
            # from the handshake that started the catch-up (the node may well
            # be done before start_node has seen it answer a ping)
            t_log = time.monotonic() - leader.core.link.opened_at
            behind = target - base
            log_rate = behind / t_log
            syncs = leader.status().extra.get("state_syncs_sent", 0)
            out["catch_up"] = {"entries": behind, "seconds": t_log, "entries_per_s": log_rate}
            print(f"\ncatch-up from the log: {behind:,} entries in {t_log:.2f} s (from the "
                  f"leader's handshake with the restarted follower) = {log_rate:,.0f} entries/s"
                  f"; state syncs sent in all: {syncs}")
            with NodeClient(follower_addr, timeout=60) as fc:
                same = fc.state_digest() == leader.control.op_state_digest()
            print(f"follower state identical to the leader's: {same}")
            if not same:
                raise RuntimeError("follower and leader states differ")
            stats = process_stats([follower.pid])
            print(f"follower RSS {stats.get(follower.pid, {}).get('rss_mib', 0):.0f} MiB")
        finally:
            leader.stop()
            storage.close()
    ok = [("state sync >= 1,000,000 entries/s", state_rate >= 1_000_000),  # (DESIGN.md)
          ("leader p99 during state sync <= 3x idle p99",
           out["state_sync"]["during_p99"] <= 3 * out["state_sync"]["idle_p99"]),
          ("catch-up >= 1,000,000 entries/s", log_rate >= 1_000_000)]
    print()
    for text, good in ok:
        print(f"target {text}: {'met' if good else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
