"""Memory under sustained load: does every node's RSS stay flat?

A supervised-style chain of three ``zrepl node`` processes (leader ->
forwarder -> follower, workers.kv, default settings: checkpoints on) takes
writes from ``--clients`` client processes, each pipelining
``Client.apply_many`` batches of ``set`` over a fixed key space (so the
App's own state stops growing once every key exists, and what is left to
grow is zrepl's).  Every second it samples each node's RSS and its status
(WAL span, pending and in-flight submissions).

Reported per node: RSS after the warm-up (the first ``--warmup`` fraction
of the run) and at the end, the growth in between, and the growth per
million commands.  Reference in the same run: the RSS of an idle node
started beside them (what the process costs before any work).

    python3 perf/soak.py [--seconds 60] [--clients 4] [--keys 10000] [--json FILE]

Target (DESIGN.md): flat RSS under sustained load; every queue and buffer
bounded.  "Flat" here: growth after the warm-up under 10 % of the RSS at
its end (the verdict is printed; the figures are the result).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil

from _common import ROOT, Workdir, tcp_address, wait_until

from zrepl import NodeClient  # noqa: E402

CLIENT = r"""
import sys, time
sys.path.insert(0, {root!r})
from workers.kv import KVClient, encode
address, index, keys, end_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
kv = KVClient([address], timeout=5.0, retry_for=30.0)
value = b"v" * 50
n = 0
while time.time() < end_at:
    batch = [encode(("set", f"k{{(n + j) % keys}}", value)) for j in range(64)]
    codes = kv.client.apply_many(batch)
    assert not any(codes), codes
    n += len(batch)
kv.close()
print(n)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--warmup", type=float, default=0.2,
                    help="fraction of the run before the baseline sample (default 0.2)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = ("leader", "forwarder", "follower")
    with Workdir("zrepl-soak-") as w:
        addrs = dict(zip(names, w.start_chain(list(names))))
        addrs["idle"] = tcp_address()
        w.start_node("idle", addrs["idle"])
        ps = {n: psutil.Process(w.procs[n].pid) for n in names + ("idle",)}
        start = time.time()
        end_at = start + args.seconds
        clients = w.spawn_scripts(CLIENT.format(root=str(ROOT)),
                                  [[addrs["leader"], str(i), str(args.keys), str(end_at)]
                                   for i in range(args.clients)])
        samples: list[dict] = []
        ncs = {n: NodeClient(addrs[n], timeout=5) for n in names}
        try:
            next_at = start
            while time.time() < end_at:
                next_at += 1.0
                row = {"t": round(time.time() - start, 1)}
                for n in names + ("idle",):
                    row[f"{n}_rss_mib"] = ps[n].memory_info().rss / 2**20
                for n in names:
                    st = ncs[n].status()
                    row[f"{n}_wal"] = [st.min_wal, st.max_wal]
                    row[f"{n}_queued"] = st.extra.get("pending", 0) + st.extra.get("in_flight", 0)
                samples.append(row)
                if len(samples) % 5 == 1:  # a line every 5 s
                        print(f"  {row['t']:6.1f}s  leader WAL {row['leader_wal'][1]:>11,}  RSS MiB: "
                          + "  ".join(f"{n} {row[f'{n}_rss_mib']:6.1f}" for n in names) +
                          f"  queued {row['leader_queued']}", flush=True)
                time.sleep(max(0.0, next_at - time.time()))  # the sampling rate
            done = sum(w.collect_json(clients, 120, "a client"))
            top = ncs["leader"].status().max_wal
            wait_until(lambda: ncs["follower"].status().max_applied_wal >= top, 60,
                       "the follower to apply everything")
            digests = {ncs[n].state_digest()["sha256"] for n in names}
        finally:
            for nc in ncs.values():
                nc.close()
    base_i = min(len(samples) - 1, int(len(samples) * args.warmup))
    base, last = samples[base_i], samples[-1]
    print(f"\n{done:,} commands in {args.seconds:g} s ({done / args.seconds:,.0f}/s) from "
          f"{args.clients} pipelining clients over {args.keys:,} keys; replicas identical: "
          f"{'yes' if len(digests) == 1 else 'NO'}")
    print(f"idle node (reference): {last['idle_rss_mib']:.1f} MiB")
    print(f"{'node':10} {'RSS at ' + str(base['t']) + 's':>14} {'at end':>9} {'growth':>9} "
          f"{'per 1M cmds':>12}  verdict")
    results = {"commands": done, "seconds": args.seconds, "samples": samples, "nodes": {}}
    flat_all = True
    frac = (samples[-1]["t"] - base["t"]) / max(1e-9, samples[-1]["t"])
    for n in names:
        b, e = base[f"{n}_rss_mib"], last[f"{n}_rss_mib"]
        growth = e - b
        per_m = growth / max(1e-9, done * frac / 1e6)
        flat = growth < 0.1 * e
        flat_all &= flat
        results["nodes"][n] = {"rss_base_mib": b, "rss_end_mib": e, "growth_mib": growth}
        print(f"{n:10} {b:12.1f}MiB {e:7.1f}MiB {growth:+7.1f}MiB {per_m:+10.2f}MiB  "
              f"{'flat' if flat else 'GROWING'}")
    print(f"\ntarget: flat RSS under sustained load: {'met' if flat_all else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
