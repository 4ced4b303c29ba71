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

Targets (issue "Replication engine"): p50 <= 1.5 x the bare round trip,
p99 <= 4 x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import psutil
import zmq

from _common import ECHO_SERVER, Workdir, pct, process_stats, tcp_address, wait_until

from workers.kv import KV  # noqa: E402
from zrepl import (Config, FileStorage, FollowerState, NodeClient, NodeRole, Replica,  # noqa: E402
                   WALEntry)

VALUE = b"v" * 50  # ("set", "k12345", VALUE) encodes to 64 bytes


def bare_round_trips(sock: zmq.Socket, n: int, payload: bytes) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        sock.send(payload)
        sock.recv()
        out.append(time.perf_counter() - t)
    return out


def commits(manager, n: int, start: int) -> list[float]:
    out = []
    for i in range(start, start + n):
        cmd = ("set", f"k{i % 100000:05d}", VALUE)
        t = time.perf_counter()
        manager.apply(cmd)
        out.append(time.perf_counter() - t)
    return out


def session(args, w: Workdir, index: int) -> dict:
    addr = (lambda name: f"ipc://{w.path}/{name}{index}") if args.ipc else \
        (lambda name: tcp_address())
    echo_addr = addr("echo")
    echo = w.start_python(ECHO_SERVER % echo_addr)
    follower_addr = addr("follower")
    follower = w.start_node(f"follower{index}", follower_addr,
                            {"fsync": args.follower_fsync or args.fsync})
    cfg = Config(fsync=args.fsync)
    storage = FileStorage(w.path / f"leader{index}", config=cfg)
    leader = Replica(KV(), storage, addr("leader"), cfg).start()
    ctx = zmq.Context()
    try:
        with NodeClient(follower_addr) as fc:
            fc.set_role(NodeRole.FOLLOWER, 1)
        leader.set_role(NodeRole.LEADER, 1)
        leader.set_follower(follower_addr)
        wait_until(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 30,
                   "synchronous follower")
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(echo_addr)
        payload = b"x" * 64
        bare_round_trips(req, 300, payload)  # warm up both paths
        commits(leader.manager, 300, 0)
        bare, zr = [], []
        n = args.per_round
        me, fp, ep = psutil.Process(), psutil.Process(follower.pid), psutil.Process(echo.pid)
        cpu = {"leader": 0.0, "follower": 0.0, "bare_client": 0.0, "echo": 0.0}

        def cpu_of(p: psutil.Process) -> float:
            t = p.cpu_times()
            return t.user + t.system

        for r in range(args.rounds):
            c0, e0 = cpu_of(me), cpu_of(ep)
            bare += bare_round_trips(req, n, payload)
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
        follower.kill()
        follower.wait()
        echo.kill()
        echo.wait()
    total = n * args.rounds
    return {"bare": bare, "zrepl": zr, "follower_rss_mib": stats.get(follower.pid, {}).get("rss_mib"),
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
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()

    cmd_len = len(KV().encode_cmd(("set", "k00000", VALUE), WALEntry(1)).data)
    transport = "ipc" if args.ipc else "tcp loopback"
    print(f"synchronous commit latency: {cmd_len}-byte commands, {transport}, "
          f"fsync={args.fsync}" + (f"/{args.follower_fsync}" if args.follower_fsync else "") +
          f"; {args.sessions} sessions x {args.rounds} interleaved rounds x {args.per_round}")
    print(f"{'session':8} {'bare p50':>10} {'p99':>9} {'zrepl p50':>11} {'p99':>9} "
          f"{'p99.9':>9} {'p50 x':>7} {'p99 x':>7}")
    results = []
    with Workdir() as w:
        for i in range(args.sessions):
            r = session(args, w, i)
            b50, b99 = pct(r["bare"], .5), pct(r["bare"], .99)
            z50, z99, z999 = pct(r["zrepl"], .5), pct(r["zrepl"], .99), pct(r["zrepl"], .999)
            results.append({"bare_p50": b50, "bare_p99": b99, "zrepl_p50": z50,
                            "zrepl_p99": z99, "zrepl_p999": z999,
                            "ratio_p50": z50 / b50, "ratio_p99": z99 / b99,
                            "follower_rss_mib": r["follower_rss_mib"], "cpu_us": r["cpu_us"]})
            print(f"{i + 1:<8} {b50 * 1e6:8.1f}µs {b99 * 1e6:7.1f}µs {z50 * 1e6:9.1f}µs "
                  f"{z99 * 1e6:7.1f}µs {z999 * 1e6:7.1f}µs {z50 / b50:6.2f}x {z99 / b99:6.2f}x")
    med = {k: statistics.median(r[k] for r in results) for k in results[0]
           if k not in ("follower_rss_mib", "cpu_us")}
    cpu = {k: statistics.median(r["cpu_us"][k] for r in results) for k in results[0]["cpu_us"]}
    print(f"{'median':8} {med['bare_p50'] * 1e6:8.1f}µs {med['bare_p99'] * 1e6:7.1f}µs "
          f"{med['zrepl_p50'] * 1e6:9.1f}µs {med['zrepl_p99'] * 1e6:7.1f}µs "
          f"{med['zrepl_p999'] * 1e6:7.1f}µs {med['ratio_p50']:6.2f}x {med['ratio_p99']:6.2f}x")
    print(f"CPU per operation (median over sessions): leader process {cpu['leader']:.1f} µs + "
          f"follower {cpu['follower']:.1f} µs per commit; bare client {cpu['bare_client']:.1f} µs "
          f"+ echo server {cpu['echo']:.1f} µs per round trip")
    ok50, ok99 = med["ratio_p50"] <= 1.5, med["ratio_p99"] <= 4
    print(f"target p50 <= 1.5x bare: {'met' if ok50 else 'MISSED'}; "
          f"p99 <= 4x bare: {'met' if ok99 else 'MISSED'} (medians over sessions)")
    if args.json:
        Path(args.json).write_text(json.dumps({"sessions": results, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
