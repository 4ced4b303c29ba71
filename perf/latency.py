"""Synchronous commit latency: ``Manager.apply`` in the leader's process
with one synchronous follower in another process, 64-byte commands, next to
a bare pyzmq REQ/REP round trip between two processes measured in the same
run.

Where the scheduler puts the processes and their threads on the cores
shifts both figures from one start to the next, so the script runs several
*sessions* (fresh follower, leader and echo processes each time) and, inside
each, alternates rounds of bare round trips and commits so that drift hits
both alike.  It reports every session and the median over sessions.

    python3 perf/latency.py [--sessions 3] [--rounds 5] [--per-round 1000] [--ipc]
                            [--hops 1,2,3] [--curve]

``--hops`` measures chains: 1 is leader -> follower, 2 is leader ->
forwarder -> follower, 3 adds a second forwarder; every link synchronous.

``--curve`` measures each session twice, without keys and then with every
link CURVE-encrypted (README, "Security"), and reports what encryption
costs as the ratio of the two medians.

Targets: p50 <= 1.5 x the bare round trip and p99 <= 4 x for one hop
(issue "Replication engine"); each extra synchronous hop adds <= 1 bare
round trip at p50 (issue "Chained replication").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import psutil
import zmq

from _common import (ECHO_SERVER, RELAY_C_SERVER, RELAY_SERVER, Workdir, bare_round_trips,
                     keys_for, pct,
                     process_stats, tcp_address, wait_until)

from workers.kv import KV  # noqa: E402
from zrepl import (Config, FileStorage, FollowerState, NodeClient, NodeRole, Replica,  # noqa: E402
                   WALEntry)

RELAYS = {"Python": RELAY_SERVER, "C": RELAY_C_SERVER}
VALUE = b"v" * 50  # ("set", "k12345", VALUE) encodes to 64 bytes


def commits(manager, n: int, start: int) -> list[float]:
    out = []
    for i in range(start, start + n):
        cmd = ("set", f"k{i % 100000:05d}", VALUE)
        t = time.perf_counter()
        manager.apply(cmd)
        out.append(time.perf_counter() - t)
    return out


def session(args, w: Workdir, index: int, hops: int, curve: bool = False) -> dict:
    tag = f"{index}-{hops}{'-curve' if curve else ''}"
    addr = (lambda name: f"ipc://{w.path}/{name}{tag}") if args.ipc else \
        (lambda name: tcp_address())
    echo_addr = addr("echo")
    echo = w.start_python(ECHO_SERVER % echo_addr)
    # references: the same chain length of do-nothing relays, in Python and in C
    relays = []
    relay_addrs = {}
    for kind, code in RELAYS.items():
        relay_addrs[kind] = echo_addr
        for r in range(hops - 1):
            front = addr(f"relay{kind}{r}")
            relays.append(w.start_python(code % (front, relay_addrs[kind])))
            relay_addrs[kind] = front
    chain_addrs = [addr(f"n{h}") for h in range(hops)]
    leader_addr = addr("leader")
    keys: dict = {}
    operator = None
    if curve:
        keys, operator = keys_for(w, tag, {"leader": leader_addr,
                                           **{f"n{h}": a for h, a in enumerate(chain_addrs)}})
    w.operator = operator
    chain = [w.start_node(f"n{h}-{tag}", a, {"fsync": args.follower_fsync or args.fsync,
                                              **keys.get(f"n{h}", {})})
             for h, a in enumerate(chain_addrs)]
    follower = chain[0]
    cfg = Config(fsync=args.fsync, **keys.get("leader", {}))
    storage = FileStorage(w.path / f"leader{tag}", config=cfg)
    leader = Replica(KV(), storage, leader_addr, cfg).start()
    ctx = zmq.Context()
    try:
        for h, a in enumerate(chain_addrs):
            with NodeClient(a, config=operator) as nc:
                nc.set_role(NodeRole.FORWARDER if h < hops - 1 else NodeRole.FOLLOWER, 1)
        leader.set_role(NodeRole.LEADER, 1)
        leader.set_follower(chain_addrs[0])
        for up, down in zip(chain_addrs, chain_addrs[1:]):
            with NodeClient(up, config=operator) as nc:
                nc.set_follower(down)
        wait_until(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 30,
                   "synchronous follower")
        for a in chain_addrs[:-1]:
            with NodeClient(a, config=operator) as nc:
                wait_until(lambda: nc.status().follower_state == FollowerState.SYNCHRONOUS, 30,
                           "synchronous chain")
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(echo_addr)
        payload = b"x" * 64
        bare_round_trips(req, 300, payload)  # warm up both paths
        relayed: dict[str, list[float]] = {kind: [] for kind in relay_addrs} if relays else {}
        rreqs = {}
        for kind in relayed:
            rreqs[kind] = ctx.socket(zmq.REQ)
            rreqs[kind].setsockopt(zmq.LINGER, 0)
            rreqs[kind].connect(relay_addrs[kind])
            bare_round_trips(rreqs[kind], 300, payload)
        commits(leader.manager, 300, 0)
        bare, zr = [], []
        n = args.per_round
        me, fp, ep = psutil.Process(), psutil.Process(follower.pid), psutil.Process(echo.pid)
        # CPU of the whole chain is counted as "follower"
        extra_procs = [psutil.Process(p.pid) for p in chain[1:]]
        cpu = {"leader": 0.0, "follower": 0.0, "bare_client": 0.0, "echo": 0.0}

        def cpu_of(p: psutil.Process) -> float:
            procs = [p] + (extra_procs if p is fp else [])
            return sum(x.cpu_times().user + x.cpu_times().system for x in procs)

        for r in range(args.rounds):
            c0, e0 = cpu_of(me), cpu_of(ep)
            bare += bare_round_trips(req, n, payload)
            for kind, rreq in rreqs.items():
                relayed[kind] += bare_round_trips(rreq, n, payload)
            c1, e1, f1 = cpu_of(me), cpu_of(ep), cpu_of(fp)
            zr += commits(leader.manager, n, (r + 1) * n)
            c2, f2 = cpu_of(me), cpu_of(fp)
            cpu["bare_client"] += c1 - c0
            cpu["echo"] += e1 - e0
            cpu["leader"] += c2 - c1
            cpu["follower"] += f2 - f1
        if leader.status().follower_state != FollowerState.SYNCHRONOUS:
            raise RuntimeError("the follower stopped being synchronous during the run")
        req.send(b"quit")
        req.recv()
        req.close()
        stats = process_stats([follower.pid])
    finally:
        ctx.destroy(linger=0)
        leader.stop()
        storage.close()
        for proc in chain:
            proc.kill()
            proc.wait()
        echo.kill()
        echo.wait()
    total = n * args.rounds
    for proc in relays:
        proc.kill()
        proc.wait()
    return {"bare": bare, "zrepl": zr, "relayed": relayed, "follower_rss_mib": stats.get(follower.pid, {}).get("rss_mib"),
            "cpu_us": {k: v / total * 1e6 for k, v in cpu.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=1000)
    ap.add_argument("--ipc", action="store_true", help="ipc:// instead of tcp loopback")
    ap.add_argument("--fsync", default="batch", choices=["always", "batch", "off"],
                    help="WAL fsync policy of both nodes (default: batch, the default)")
    ap.add_argument("--follower-fsync", default=None, choices=["always", "batch", "off"],
                    help="override the follower's policy")
    ap.add_argument("--hops", default="1", help="chain lengths to measure, e.g. 1,2,3")
    ap.add_argument("--curve", action="store_true",
                    help="measure every session without and with CURVE keys: what encryption "
                         "costs")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()

    cmd_len = len(KV().encode_cmd(("set", "k00000", VALUE), WALEntry(1)).data)
    transport = "ipc" if args.ipc else "tcp loopback"
    hops_list = [int(h) for h in args.hops.split(",")]
    print(f"synchronous commit latency: {cmd_len}-byte commands, {transport}, "
          f"fsync={args.fsync}" + (f"/{args.follower_fsync}" if args.follower_fsync else "") +
          f"; {args.sessions} sessions x {args.rounds} interleaved rounds x {args.per_round}")
    summary = {}
    with Workdir() as w:
        for hops in hops_list:
            print(f"\n{hops} hop{'s' if hops > 1 else ''} "
                  f"(leader -> {' -> '.join(['forwarder'] * (hops - 1) + ['follower'])})")
            print(f"{'session':8} {'bare p50':>10} {'p99':>9} {'zrepl p50':>11} {'p99':>9} "
                  f"{'p99.9':>9} {'p50 x':>7} {'p99 x':>7}")
            results = []
            curved: list[dict] = []
            for i in range(args.sessions):
                r = session(args, w, i, hops)
                b50, b99 = pct(r["bare"], .5), pct(r["bare"], .99)
                z50, z99, z999 = pct(r["zrepl"], .5), pct(r["zrepl"], .99), pct(r["zrepl"], .999)
                results.append({"bare_p50": b50, "bare_p99": b99, "zrepl_p50": z50,
                                "zrepl_p99": z99, "zrepl_p999": z999,
                                "ratio_p50": z50 / b50, "ratio_p99": z99 / b99,
                                **{f"relayed_{k}_p50": pct(v, .5) for k, v in r["relayed"].items()},
                                "cpu_us": r["cpu_us"]})
                print(f"{i + 1:<8} {b50 * 1e6:8.1f}µs {b99 * 1e6:7.1f}µs {z50 * 1e6:9.1f}µs "
                      f"{z99 * 1e6:7.1f}µs {z999 * 1e6:7.1f}µs {z50 / b50:6.2f}x {z99 / b99:6.2f}x")
                if args.curve:  # the same session again, every link encrypted
                    c = session(args, w, i, hops, curve=True)
                    c50, c99, cb50 = pct(c["zrepl"], .5), pct(c["zrepl"], .99), pct(c["bare"], .5)
                    curved.append({"zrepl_p50": c50, "zrepl_p99": c99, "bare_p50": cb50,
                                   "ratio_p50": c50 / cb50})
                    print(f"{'  CURVE':8} {cb50 * 1e6:8.1f}µs {'':9} {c50 * 1e6:9.1f}µs "
                          f"{c99 * 1e6:7.1f}µs {'':9} {c50 / cb50:6.2f}x")
            med = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "cpu_us"}
            cpu = {k: statistics.median(r["cpu_us"][k] for r in results) for k in results[0]["cpu_us"]}
            print(f"{'median':8} {med['bare_p50'] * 1e6:8.1f}µs {med['bare_p99'] * 1e6:7.1f}µs "
                  f"{med['zrepl_p50'] * 1e6:9.1f}µs {med['zrepl_p99'] * 1e6:7.1f}µs "
                  f"{med['zrepl_p999'] * 1e6:7.1f}µs {med['ratio_p50']:6.2f}x {med['ratio_p99']:6.2f}x")
            for kind in RELAYS if hops > 1 else ():
                print(f"reference: the bare round trip through {hops - 1} do-nothing {kind} "
                      f"relay{'s' if hops > 2 else ''}: p50 {med[f'relayed_{kind}_p50'] * 1e6:.1f} µs")
            print(f"CPU per commit (median): leader process {cpu['leader']:.1f} µs, chain "
                  f"{cpu['follower']:.1f} µs; per bare round trip: client {cpu['bare_client']:.1f} "
                  f"µs + echo {cpu['echo']:.1f} µs")
            summary[hops] = {"median": med, "cpu_us": cpu, "sessions": results}
            if curved:
                cm = {k: statistics.median(r[k] for r in curved) for k in curved[0]}
                print(f"CURVE (median): p50 {cm['zrepl_p50'] * 1e6:.1f} µs = "
                      f"{cm['zrepl_p50'] / med['zrepl_p50']:.2f}x the same commit without keys "
                      f"({cm['ratio_p50']:.2f}x bare); p99 {cm['zrepl_p99'] * 1e6:.1f} µs = "
                      f"{cm['zrepl_p99'] / med['zrepl_p99']:.2f}x")
                summary[hops]["curve"] = {"median": cm, "sessions": curved,
                                          "cost_p50": cm["zrepl_p50"] / med["zrepl_p50"],
                                          "cost_p99": cm["zrepl_p99"] / med["zrepl_p99"]}
    print()
    if 1 in summary:
        med = summary[1]["median"]
        ok50, ok99 = med["ratio_p50"] <= 1.5, med["ratio_p99"] <= 4
        print(f"1 hop: p50 {med['ratio_p50']:.2f}x bare (target <= 1.5x: "
              f"{'met' if ok50 else 'MISSED'}), p99 {med['ratio_p99']:.2f}x bare p99 (target <= 4x: "
              f"{'met' if ok99 else 'MISSED'})")
        for hops in hops_list:
            if hops == 1:
                continue
            m = summary[hops]["median"]
            extra = (m["zrepl_p50"] - med["zrepl_p50"]) / (hops - 1)
            bare = statistics.median([summary[h]["median"]["bare_p50"] for h in hops_list])
            print(f"{hops} hops: p50 {m['zrepl_p50'] * 1e6:.1f} µs, p99 {m['zrepl_p99'] * 1e6:.1f} µs;"
                  f" each extra hop adds {extra * 1e6:.1f} µs = {extra / bare:.2f} bare round trips "
                  f"at p50 (target <= 1: {'met' if extra <= bare else 'MISSED'})")
            for kind in RELAYS:
                relay_hop = (m[f"relayed_{kind}_p50"] - m["bare_p50"]) / (hops - 1)
                print(f"    a do-nothing {kind} relay hop adds {relay_hop * 1e6:.1f} µs = "
                      f"{relay_hop / bare:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in summary.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
