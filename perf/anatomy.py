"""Where one synchronous commit's time and CPU go: every step of a commit
time-stamped on both sides, next to a bare pyzmq round trip measured in the
same run.

A leader ``Replica`` runs in this process, its follower in a child process
(this script's ``follower_main``), one 64-byte ``set`` committed at a time
(``Manager.apply``, as ``perf/latency.py``).  Both processes stamp the same
clock (``CLOCK_MONOTONIC``, shared by every process of the host) at the
seams of the engine:

    leader    submitted -> batch built -> sent -> WAL written -> applied ->
              store transaction committed ... ack received -> caller woken
    follower  received -> WAL written -> applied -> store transaction
              committed -> ack sent

The stamps come from thin wrappers put on the engine's objects (the data
pusher, the storage, the App, its SharedStore, the ack endpoint), not from
code in the engine.  The wrappers cost something; a session without them,
measured in the same run, says how much.

Printed: the commits whose latency lies in the middle fifth (p40-p60)
broken down step by step (their means add up to their mean latency) and
each step's own p50; the critical path (what the caller waits for, leg by
leg); the CPU per commit of every thread of both processes
(``psutil``), beside the CPU of each side of the bare round trip.
``--profile`` adds a cProfile of the leader's caller thread and the
follower's engine thread (by each function's own time).

    python3 perf/anatomy.py [--commits 4000] [--rounds 5] [--profile] [--fsync batch]
                            [--json FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

from _common import ECHO_SERVER, ROOT, Workdir, bare_round_trips, pct, tcp_address, wait_until

from workers.kv import KV  # noqa: E402
from zrepl import (Config, FileStorage, FollowerState, NodeClient, NodeRole,  # noqa: E402
                   Replica)
from zrepl.local import pings  # noqa: E402

VALUE = b"v" * 50
clock_ns = time.perf_counter_ns  # CLOCK_MONOTONIC: the same clock in every process

# (stage, what it ends) in the order a commit passes them
LEADER_STAGES = [
    ("submitted", "Manager.apply called"),
    ("built", "batch built (encoded, packed, in flight in the core)"),
    ("sent", "handed to ZeroMQ (the data socket's send returned)"),
    ("wal", "written to the leader's WAL"),
    ("applied", "App.apply returned (inside the store transaction)"),
    ("txn", "store transaction committed"),
    ("ack", "ack received (the ack socket gave it)"),
    ("woken", "caller woken (Manager.apply returned)"),
]
FOLLOWER_STAGES = [
    ("recv", "batch received (the data socket gave it)"),
    ("wal", "written to the follower's WAL"),
    ("applied", "App.apply returned"),
    ("acked", "ack handed to ZeroMQ"),
    ("txn", "store transaction committed (after the ack: the engine groups a turn's batches)"),
]


class Stamps:
    """Stamps in the order they fire: (stage, ns, WAL id or 0)."""

    def __init__(self) -> None:
        self.on = False
        self.events: list[tuple[str, int, int]] = []

    def mark(self, stage: str, wal_id: int = 0) -> None:
        if self.on:
            self.events.append((stage, clock_ns(), wal_id))


def _around(obj: Any, name: str, before: Callable[..., None] | None,
            after: Callable[..., None] | None) -> Callable[[], None]:
    """Wrap the bound method ``obj.name`` (an instance attribute shadows the
    class's); returns the undo."""
    inner = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(*args)
        result = inner(*args, **kwargs)
        if after is not None:
            after(result, *args)
        return result

    setattr(obj, name, wrapper)
    return lambda: obj.__dict__.pop(name, None)


def _stamp_store_and_app(stamps: Stamps, replica: Replica, storage: Any) -> list:
    """The seams both sides share: the WAL write, App.apply, the store
    transaction's commit (where a batch commits alone: when ``run_batch``
    returns; where the engine groups batches: when the group ends)."""
    app = replica.applier.app
    store = replica.applier.store
    undo = [_around(storage, "write_wal_data", None,
                    lambda _r, first, *_: stamps.mark("wal", first)),
            _around(app, "apply", None, lambda _r, *_: stamps.mark("applied"))]
    if store is not None:
        def committed(_r: Any, *_: Any) -> None:
            if store._group is None:  # (inside a group nothing is committed yet)
                stamps.mark("txn")

        undo.append(_around(store, "run_batch", None, committed))
        ended = store.end_group

        def end_group() -> None:
            had = bool(store._group)
            ended()
            if had:
                stamps.mark("txn")

        store.end_group = end_group  # type: ignore[method-assign]
        undo.append(lambda: store.__dict__.pop("end_group", None))
    return undo


def stamp_leader(stamps: Stamps, leader: Replica, storage: Any) -> list:
    undo = _stamp_store_and_app(stamps, leader, storage)
    undo.append(_around(leader.downstream, "send_wait", lambda *_: stamps.mark("built"),
                        lambda *_: stamps.mark("sent")))
    ack = leader.endpoints_bound.ack

    def got(result: Any, *_: Any) -> None:
        if result is not None:
            stamps.mark("ack")

    undo.append(_around(ack, "recv_wait", None, got))
    undo.append(_stamp_drain(ack, stamps, "ack"))
    return undo


def _stamp_drain(receiver: Any, stamps: Stamps, stage: str) -> Callable[[], None]:
    """Stamp ``stage`` for each message ``receiver.drain`` yields; the undo."""
    inner = receiver.drain

    def drain(limit: int) -> Any:
        for raw in inner(limit):
            stamps.mark(stage)
            yield raw

    receiver.drain = drain
    return lambda: receiver.__dict__.pop("drain", None)


# --- the follower process ------------------------------------------------------------


def follower_main(address: str, data: str, out: str, fsync: str, profile: bool) -> None:
    cfg = Config(fsync=fsync)
    storage = FileStorage(data, config=cfg)
    node = Replica(KV(), storage, address, cfg)
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        run = node._run

        def profiled_run() -> None:
            prof.enable()
            try:
                run()
            finally:
                prof.disable()
        node._run = profiled_run  # type: ignore[method-assign]
    node.start()
    stamps = Stamps()
    stamps.on = True
    _stamp_store_and_app(stamps, node, storage)
    _stamp_drain(node.endpoints_bound.data, stamps, "recv")
    _around(node.upstream, "send_ack", None, lambda *_: stamps.mark("acked"))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    # SIGUSR1: a CPU reading of every thread (to OUT.cpu), then go on
    def cpu_reading(*_: Any) -> None:
        Path(out + ".cpu.tmp").write_text(json.dumps(thread_cpu(psutil.Process())))
        os.replace(out + ".cpu.tmp", out + ".cpu")

    signal.signal(signal.SIGUSR1, cpu_reading)
    Path(out + ".ready").write_text("1")
    done.wait()
    node.stop()
    storage.close()
    result: dict[str, Any] = {"events": stamps.events}
    if prof is not None:
        result["profile"] = profile_text(prof)
    Path(out).write_text(json.dumps(result))


# --- threads and their CPU ----------------------------------------------------------


def thread_cpu(proc: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of every thread of ``proc``, by name (Python's
    thread names where this process is ``proc``, else the OS's: ZeroMQ
    names its I/O thread ``ZMQbg/IO/0``)."""
    names = {t.native_id: t.name for t in threading.enumerate()} \
        if proc.pid == os.getpid() else {}
    out: dict[str, float] = {}
    for t in proc.threads():
        name = names.get(t.id)
        if name is None:
            try:
                name = Path(f"/proc/{proc.pid}/task/{t.id}/comm").read_text().strip()
            except OSError:
                name = str(t.id)
        # one engine per process here: drop addresses and paths from names
        name = name.split(" ")[0]
        if name == "python3" or name.startswith("python"):
            name = "main"
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out


def cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def profile_text(prof: cProfile.Profile, lines: int = 22) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(lines)
    return buf.getvalue()


# --- one session -------------------------------------------------------------------------


def session(args: argparse.Namespace, w: Workdir, tag: str, traced: bool) -> dict[str, Any]:
    echo_addr, faddr, laddr = tcp_address(), tcp_address(), tcp_address()
    echo = w.start_python(ECHO_SERVER % echo_addr)
    out = str(w.path / f"follower-{tag}.json")
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'perf')!r}, {str(ROOT)!r}]\n"
            "import anatomy\n"
            f"anatomy.follower_main({faddr!r}, {str(w.path / ('f' + tag))!r}, {out!r}, "
            f"{args.fsync!r}, {bool(args.profile and traced)!r})\n") if traced else None
    if code is not None:
        follower = w.start_python(code)
        wait_until(lambda: Path(out + ".ready").exists(), 30, "the follower to start")
    else:
        follower = w.start_node(f"f{tag}", faddr, {"fsync": args.fsync})
    wait_until(lambda: pings(faddr), 30, "the follower to answer")
    cfg = Config(fsync=args.fsync)
    storage = FileStorage(w.path / f"leader{tag}", config=cfg)
    leader = Replica(KV(), storage, laddr, cfg).start()
    stamps = Stamps()
    ctx = zmq.Context()
    try:
        with NodeClient(faddr) as nc:
            nc.set_role(NodeRole.FOLLOWER, 1)
        leader.set_role(NodeRole.LEADER, 1)
        leader.set_follower(faddr)
        wait_until(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 30,
                   "a synchronous follower")
        if traced:
            stamp_leader(stamps, leader, storage)
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(echo_addr)
        payload = b"x" * 64
        bare_round_trips(req, 300, payload)
        manager = leader.manager
        for i in range(300):  # warm up
            manager.apply(("set", f"w{i}", VALUE))
        me, fp, ep = psutil.Process(), psutil.Process(follower.pid), psutil.Process(echo.pid)
        bare: list[float] = []
        lat: list[int] = []
        cpu_l: dict[str, float] = {}
        cpu_f: dict[str, float] = {}
        cpu_bare_client = cpu_bare_echo = 0.0
        prof = cProfile.Profile() if args.profile and traced else None

        def follower_cpu() -> dict[str, float]:
            if not traced:
                return thread_cpu(fp)
            Path(out + ".cpu").unlink(missing_ok=True)
            os.kill(follower.pid, signal.SIGUSR1)
            wait_until(lambda: Path(out + ".cpu").exists(), 10, "the follower's CPU reading")
            return json.loads(Path(out + ".cpu").read_text())

        n = args.commits // args.rounds
        for r in range(args.rounds):
            c0, e0 = me.cpu_times(), ep.cpu_times()
            bare += bare_round_trips(req, n, payload)
            c1, e1 = me.cpu_times(), ep.cpu_times()
            cpu_bare_client += c1.user + c1.system - c0.user - c0.system
            cpu_bare_echo += e1.user + e1.system - e0.user - e0.system
            l0, f0 = thread_cpu(me), follower_cpu()
            stamps.on = traced
            if prof is not None:
                prof.enable()
            for i in range(n):
                cmd = ("set", f"k{(r * n + i) % 100000:05d}", VALUE)
                t = clock_ns()
                stamps.mark("submitted")
                manager.apply(cmd)
                stamps.mark("woken")
                lat.append(clock_ns() - t)
            if prof is not None:
                prof.disable()
            stamps.on = False
            l1, f1 = thread_cpu(me), follower_cpu()
            for k, v in cpu_delta(l1, l0).items():
                cpu_l[k] = cpu_l.get(k, 0.0) + v
            for k, v in cpu_delta(f1, f0).items():
                cpu_f[k] = cpu_f.get(k, 0.0) + v
        if leader.status().follower_state != FollowerState.SYNCHRONOUS:
            raise RuntimeError("the follower stopped being synchronous during the run")
        req.send(b"quit")
        req.recv()
        req.close()
    finally:
        ctx.destroy(linger=0)
        leader.stop()
        storage.close()
        follower.send_signal(signal.SIGTERM)
        follower.wait(timeout=30)
        echo.kill()
        echo.wait()
    total = n * args.rounds
    result: dict[str, Any] = {
        "bare_p50_us": pct(bare, .5) * 1e6, "commit_p50_us": pct([x / 1e9 for x in lat], .5) * 1e6,
        "cpu_us": {"leader": {k: v / total * 1e6 for k, v in cpu_l.items()},
                   "follower": {k: v / total * 1e6 for k, v in cpu_f.items()},
                   "bare_client": cpu_bare_client / total * 1e6,
                   "bare_echo": cpu_bare_echo / total * 1e6}}
    if traced:
        fdoc = json.loads(Path(out).read_text())
        result["leader_events"] = stamps.events
        result["follower_events"] = fdoc["events"]
        if prof is not None:
            result["profile"] = {"leader": profile_text(prof), "follower": fdoc.get("profile", "")}
    return result


# --- putting the stamps together -------------------------------------------------------------


def commits_of(leader_events: list, follower_events: list) -> list[dict[str, Any]]:
    """One dict per commit: stage -> ns on each side ("L." and "F." keys),
    for commits that passed every stage exactly once."""
    by_wal: dict[int, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for stage, t, wal_id in follower_events:
        if stage == "recv":
            current = {"F.recv": t}
        elif current is not None:
            current[f"F.{stage}"] = t
            if stage == "wal":
                by_wal[wal_id] = current
    out = []
    cur: dict[str, Any] = {}
    for stage, t, wal_id in leader_events:
        if stage == "submitted":
            cur = {"L.submitted": t}
            continue
        if f"L.{stage}" in cur:  # a stage twice: not the plain one-batch commit
            cur["bad"] = True
        cur[f"L.{stage}"] = t
        if stage == "wal":
            cur["wal_id"] = wal_id
        if stage == "woken":
            f = by_wal.get(cur.get("wal_id", -1))
            want = {f"L.{s}" for s, _ in LEADER_STAGES} | {"wal_id"}
            if f is not None and not cur.get("bad") and want <= cur.keys() and \
                    len(f) == len(FOLLOWER_STAGES):
                cur.update(f)
                out.append(cur)
            cur = {}
    return out


def critical_path(c: dict[str, int]) -> list[tuple[str, int]]:
    """What the caller waits for, leg by leg (ns); the legs add up to its
    latency."""
    return [
        ("leader: submit, build the batch (encode, pack, core)", c["L.built"] - c["L.submitted"]),
        ("leader: hand it to ZeroMQ (the send call)", c["L.sent"] - c["L.built"]),
        ("down: leader's I/O thread, TCP, follower's I/O thread, follower wakes",
         c["F.recv"] - c["L.sent"]),
        ("follower: parse, write the WAL", c["F.wal"] - c["F.recv"]),
        ("follower: App.apply", c["F.applied"] - c["F.wal"]),
        ("follower: the ack packed and handed to ZeroMQ", c["F.acked"] - c["F.applied"]),
        ("up: follower's I/O thread, TCP, leader's I/O thread, leader wakes",
         c["L.ack"] - c["F.acked"]),
        ("leader: handle the ack, answer the caller", c["L.woken"] - c["L.ack"]),
    ]


def follower_after(c: dict[str, int]) -> list[tuple[str, int]]:
    """What the follower does after its ack, off the critical path."""
    return [("store transaction commit", c["F.txn"] - c["F.acked"])]


def leader_local(c: dict[str, int]) -> list[tuple[str, int]]:
    """The leader's own half, overlapping the follower's."""
    return [
        ("write the WAL", c["L.wal"] - c["L.sent"]),
        ("App.apply", c["L.applied"] - c["L.wal"]),
        ("store transaction commit", c["L.txn"] - c["L.applied"]),
        ("idle until the ack arrives", c["L.ack"] - c["L.txn"]),
    ]


def middle(lat: list[int], frac: float = 0.2) -> tuple[int, int]:
    s = sorted(lat)
    lo = s[int(len(s) * (0.5 - frac / 2))]
    hi = s[min(len(s) - 1, int(len(s) * (0.5 + frac / 2)))]
    return lo, hi


def table(rows_by_commit: list[list[tuple[str, int]]], title: str) -> list[dict[str, Any]]:
    print(f"\n{title}")
    print(f"  {'':70} {'mean':>8} {'p50':>8}")
    out = []
    for i, (label, _) in enumerate(rows_by_commit[0]):
        vals = [rows[i][1] for rows in rows_by_commit]
        m, p = statistics.mean(vals) / 1000, statistics.median(vals) / 1000
        print(f"  {label:70} {m:6.1f}µs {p:6.1f}µs")
        out.append({"step": label, "mean_us": m, "p50_us": p})
    total = statistics.mean(sum(v for _, v in rows) for rows in rows_by_commit) / 1000
    print(f"  {'total':70} {total:6.1f}µs")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fsync", default="batch", choices=["always", "batch", "off"])
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the leader's caller thread and the follower's engine thread")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.commits < args.rounds * 10:
        ap.error("--commits must be at least 10 x --rounds")
    with Workdir("zrepl-anatomy-") as w:
        plain = session(args, w, "plain", traced=False)
        traced = session(args, w, "traced", traced=True)
    commits = commits_of(traced["leader_events"], traced["follower_events"])
    if len(commits) < args.commits // 2:
        raise SystemExit(f"only {len(commits)} of {args.commits} commits passed every stage once")
    lat = [c["L.woken"] - c["L.submitted"] for c in commits]
    lo, hi = middle(lat)
    mid = [c for c, x in zip(commits, lat) if lo <= x <= hi]
    print(f"one synchronous commit (64-byte set, tcp loopback, fsync={args.fsync}): "
          f"{len(commits)} commits traced, {len(mid)} in the middle fifth "
          f"({lo / 1000:.1f}-{hi / 1000:.1f} µs)")
    print(f"bare pyzmq REQ/REP round trip, same run: p50 {traced['bare_p50_us']:.1f} µs "
          f"(untraced session {plain['bare_p50_us']:.1f} µs)")
    print(f"commit p50: traced {traced['commit_p50_us']:.1f} µs = "
          f"{traced['commit_p50_us'] / traced['bare_p50_us']:.2f}x bare; untraced "
          f"{plain['commit_p50_us']:.1f} µs = {plain['commit_p50_us'] / plain['bare_p50_us']:.2f}x "
          "bare (the stamps' own cost is the difference in ratio)")
    crit = table([critical_path(c) for c in mid], "the critical path (what the caller waits for):")
    if all(c["F.txn"] > c["F.acked"] for c in mid):
        table([follower_after(c) for c in mid], "the follower after its ack (off the path):")
    local = table([leader_local(c) for c in mid],
                  "the leader's own half, after the send (overlapping the follower's):")
    print("\nCPU per commit by thread (µs; psutil, over the traced rounds):")
    doc_cpu = {}
    for label, sess in (("untraced", plain), ("traced", traced)):
        cpu = sess["cpu_us"]
        lsum, fsum = sum(cpu["leader"].values()), sum(cpu["follower"].values())
        print(f"  {label}: leader process {lsum:.1f} = " +
              " + ".join(f"{k} {v:.1f}" for k, v in sorted(cpu["leader"].items(),
                                                         key=lambda kv: -kv[1]) if v >= 0.05))
        print(f"  {'':{len(label)}}  follower process {fsum:.1f} = " +
              " + ".join(f"{k} {v:.1f}" for k, v in sorted(cpu["follower"].items(),
                                                         key=lambda kv: -kv[1]) if v >= 0.05))
        print(f"  {'':{len(label)}}  bare round trip: client {cpu['bare_client']:.1f}, echo "
              f"{cpu['bare_echo']:.1f} -> leader = {lsum / cpu['bare_echo']:.2f}x one echo side")
        doc_cpu[label] = {"leader_total": lsum, "follower_total": fsum, **cpu}
    if args.profile and "profile" in traced:
        for side in ("leader", "follower"):
            print(f"\ncProfile, {side} ({'caller thread' if side == 'leader' else 'engine thread'}"
                  ", own time):")
            print(traced["profile"][side])
    if args.json:
        Path(args.json).write_text(json.dumps({
            "bare_p50_us": traced["bare_p50_us"], "commit_p50_us": traced["commit_p50_us"],
            "untraced": {k: plain[k] for k in ("bare_p50_us", "commit_p50_us")},
            "critical_path": crit, "leader_local": local, "cpu_us": doc_cpu}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
