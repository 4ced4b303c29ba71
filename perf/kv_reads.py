"""Reads of workers.kv: through the engine, through reader processes, and
in-process from shared memory (issue 13).

While a paced writer process commits ``--pace`` sets per second to a
leader, ``--clients`` reader-client processes each call ``KVClient.get``
in a closed loop for ``--seconds``.  Measured in the same run:

* ``engine``: a node without readers (every get is a message to its
  engine thread: how reads were served before shared state);
* ``readers=1,2,4``: the same node with N reader processes (the gets go to
  the read endpoint; the engine never sees them);
* ``LocalReader``: each client process reads the node's store directly
  (``workers.kv.LocalReader``), no message at all;
* the writer's commit latency (a blocking set, p50/p99) with no reads
  (idle), and during each read case;
* a full state sync of ``--keys`` keys to an empty follower: the
  store-backed KV (one LMDB read snapshot, no fork) against a dict-backed
  KV (the App as it was: a forked copy-on-write child), in entries/s.

Every figure is quoted with ``nproc``: on 2 cores, reader processes and
client processes share the same two CPUs.

    python3 perf/kv_reads.py [--seconds 3] [--clients 4] [--pace 500] [--keys 200000]
                             [--repeat 3] [--json FILE]

Two kinds of remote client: ``KVClient`` (a blocking get per call, as a
service would) and ``pipelined`` (a raw DEALER keeping 32 gets in flight,
so that the clients cost little and the server side is what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
from _common import ROOT, Workdir, pct, wait_until

from _dictkv import DictKV  # noqa: E402
from workers.kv import KV, KVClient, encode  # noqa: E402
from zrepl import Config, FileStorage, FollowerState, NodeClient, NodeRole, Replica  # noqa: E402
from zrepl.core.protocol import endpoints, read_endpoints  # noqa: E402
from zrepl.local import free_tcp_base  # noqa: E402

READER = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from workers.kv import KVClient, LocalReader
address, data, mode, index, start_at, seconds = sys.argv[1:7]
seconds, start_at = float(seconds), float(start_at)
keys = [f"k{{i}}" for i in range(1000)]
n = 0
clock = time.perf_counter
if mode == "pipelined":
    # a raw DEALER keeping 32 gets in flight: the client costs little, the
    # server side is what is measured
    import msgpack, zmq
    from zrepl.core import protocol
    sock = zmq.Context.instance().socket(zmq.DEALER)
    for ep in address.split(","):  # (a node's readers: the DEALER deals to them in turn)
        sock.connect(ep)
    reqs = [protocol.query_request(i, msgpack.packb(("get", k))) for i, k in enumerate(keys)]
    sock.send_multipart([b"", reqs[0]])
    reply = protocol.parse_reply(sock.recv_multipart()[-1])
    assert reply[2] is None, reply
    while time.time() < start_at:
        time.sleep(0.0005)
    end = clock() + seconds
    cpu0 = time.process_time()
    for i in range(32):
        sock.send_multipart([b"", reqs[i]])
    sent = 32
    while clock() < end:
        sock.recv_multipart()
        n += 1
        sock.send_multipart([b"", reqs[sent % 1000]])
        sent += 1
    sock.close(linger=0)
else:
    if mode == "local":
        r = LocalReader(data)
        get = r.get
    else:
        kv = KVClient([address], timeout=5.0, retry_for=10.0)
        get = kv.get
    assert get("k1") is not None
    while time.time() < start_at:
        time.sleep(0.0005)
    end = clock() + seconds
    cpu0 = time.process_time()
    while clock() < end:
        for _ in range(64):
            get(keys[n % 1000])
            n += 1
print(json.dumps({{"n": n, "seconds": seconds, "cpu": time.process_time() - cpu0}}))
"""

WRITER = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from workers.kv import KVClient
address, pace, start_at, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
kv = KVClient([address], timeout=5.0, retry_for=10.0)
kv.set("w", 0)
while time.time() < start_at:
    time.sleep(0.0005)
lat = []
clock = time.perf_counter
period = 1.0 / pace
t_next = clock()
end = t_next + seconds
i = 0
while clock() < end:
    t0 = clock()
    kv.set(f"k{{i % 1000}}", i)
    lat.append(clock() - t0)
    i += 1
    t_next += period
    pause = t_next - clock()
    if pause > 0:
        time.sleep(pause)  # pacing an open-loop writer, not a synchronisation
print(json.dumps({{"lat": lat}}))
"""


def run_case(w: Workdir, address: str, data: str, mode: str, clients: int, pace: float,
             seconds: float, writer_at: str = "", server_pid: int = 0) -> dict:
    start_at = time.time() + 1.0 + 0.1 * clients
    writer = w.spawn_scripts(WRITER.format(root=str(ROOT)),
                             [[writer_at or address, str(pace), str(start_at), str(seconds)]])
    readers = w.spawn_scripts(READER.format(root=str(ROOT)),
                              [[address, data, mode, str(i), str(start_at), str(seconds)]
                               for i in range(clients)]) if clients else []
    server = psutil.Process(server_pid)

    def server_cpu() -> float:  # the node and its reader processes
        total = 0.0
        for p in [server, *server.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total
    time.sleep(max(0.0, start_at - time.time()))  # (sampling at the window's edges)
    cpu0 = server_cpu()
    time.sleep(seconds)
    cpu1 = server_cpu()
    results = w.collect_json(readers, seconds + 120, f"a {mode} reader")
    [wres] = w.collect_json(writer, seconds + 120, "the writer")
    lat = wres["lat"]
    return {"mode": mode, "clients": clients,
            "gets_per_s": sum(r["n"] for r in results) / seconds if results else 0.0,
            # the CPUs the clients themselves took (of nproc), while measured
            "client_cpus": sum(r["cpu"] for r in results) / seconds if results else 0.0,
            "server_cpus": (cpu1 - cpu0) / seconds,  # the node and its readers
            "commit_p50_us": pct(lat, 0.5) * 1e6, "commit_p99_us": pct(lat, 0.99) * 1e6,
            "commits": len(lat)}


def median_case(repeat: int, *args: object, **kw: object) -> dict:
    """``run_case`` ``repeat`` times: the median of each figure."""
    runs = [run_case(*args, **kw) for _ in range(repeat)]  # type: ignore[arg-type]
    out = dict(runs[0])
    for key in ("gets_per_s", "commit_p50_us", "commit_p99_us", "client_cpus", "server_cpus"):
        out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = [r["gets_per_s"] for r in runs]
    return out


def state_sync(w: Workdir, app_cls: type, keys: int, name: str) -> dict:
    """entries/s of a full state sync of ``keys`` keys from a leader in this
    process (its WAL truncated: the log cannot serve) to an empty follower
    process."""
    settings = {"fsync": "batch", "checkpoint_entries": 0, "checkpoint_interval": 0,
                "segment_bytes": 64 << 10}
    cfg = Config(**settings)
    storage = FileStorage(w.root / f"{name}-L", config=cfg)
    leader = Replica(app_cls(), storage, f"tcp://127.0.0.1:{free_tcp_base(4)}", cfg).start()
    try:
        leader.set_role(NodeRole.LEADER, 1)
        for s in range(0, keys, 4096):
            leader.manager.apply_many([("set", f"k{i:08d}", i)
                                       for i in range(s, min(keys, s + 4096))])
        storage.truncate_wal_before_id(storage.max_wal())
        assert storage.min_wal() > 1
        b = f"tcp://127.0.0.1:{free_tcp_base(4)}"
        w.start_node(f"{name}-F", b, settings,
                     app="workers.kv:KV" if app_cls is KV else "_dictkv:DictKV")
        with NodeClient(b, timeout=60) as fc:
            fc.set_role(NodeRole.FOLLOWER, 1)
            t0 = time.perf_counter()
            leader.set_follower(b)
            wait_until(lambda: leader.core.link.state == FollowerState.SYNCHRONOUS, 600,
                       "the follower after a state sync")
            took = time.perf_counter() - t0
            same = fc.state_digest()["sha256"] == leader.control.op_state_digest()["sha256"]
            syncs = fc.status().extra["state_syncs_received"]
    finally:
        leader.stop()
        storage.close()
    w.kill(f"{name}-F")
    return {"app": app_cls.__name__, "keys": keys, "seconds": took,
            "entries_per_s": keys / took, "identical": same, "state_syncs": syncs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=4, help="reader-client processes per case")
    ap.add_argument("--pace", type=float, default=500.0, help="writes/s of the paced writer")
    ap.add_argument("--keys", type=int, default=200_000, help="keys of the state-sync case")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (medians quoted)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    nproc = os.cpu_count()
    settings = {"fsync": "batch", "checkpoint_entries": 0, "checkpoint_interval": 0}
    rows: list[dict] = []
    ok = True
    with Workdir() as w:
        w._env["PYTHONPATH"] += os.pathsep + str(Path(__file__).resolve().parent)  # _dictkv
        print(f"nproc = {nproc}; {args.clients} reader-client processes per case, a writer "
              f"paced at {args.pace:g} sets/s, {args.seconds:g}s each, median of "
              f"{args.repeat} runs\n")
        print(f"{'case':<24} {'gets/s':>10} {'vs engine':>10} {'commit p50':>11} "
              f"{'p99':>9} {'vs idle p50':>12} {'CPUs: clients':>14} {'node+readers':>12}",
              flush=True)
        base: dict[str, float] = {}  # the engine's gets/s, per client kind
        idle = None
        for readers in (0, 1, 2, 4):
            address = f"tcp://127.0.0.1:{free_tcp_base(4 + readers)}"
            name = f"r{readers}"
            w.start_node(name, address, {**settings, "readers": readers})
            with NodeClient(address) as c:
                c.set_role(NodeRole.LEADER, 1)
                with KVClient([address], timeout=10) as kv:  # the keys the readers get
                    kv.client.apply_many([encode(("set", f"k{i}", i)) for i in range(1000)])
                if readers:
                    wait_until(lambda: c.status().extra["readers"] == readers, 30, "readers")
            data = str(w.root / name)
            if readers == 0:
                idle = median_case(args.repeat, w, address, data, "idle", 0, args.pace,
                                   args.seconds, server_pid=w.procs[name].pid)
                rows.append({"case": "idle", **idle})
                print(f"{'writer alone (idle)':<24} {'-':>10} {'-':>10} "
                      f"{idle['commit_p50_us']:9.0f}µs {idle['commit_p99_us']:7.0f}µs "
                      f"{'1.00x':>12}", flush=True)
            who = "engine" if readers == 0 else f"readers={readers}"
            served = endpoints(address).client if readers == 0 else \
                ",".join(read_endpoints(address, readers))
            cases = [(f"{who}, KVClient", "remote", address),
                     (f"{who}, pipelined", "pipelined", served)]
            if readers == 0:
                cases.append(("LocalReader", "local", address))
            for label, mode, target in cases:
                r = median_case(args.repeat, w, target, data, mode, args.clients, args.pace,
                                args.seconds, writer_at=address, server_pid=w.procs[name].pid)
                ref = base.setdefault(mode if mode != "local" else "remote", r["gets_per_s"])
                rows.append({"case": label, "readers": readers, "nproc": nproc, **r})
                assert idle
                print(f"{label:<24} {r['gets_per_s']:10,.0f} {r['gets_per_s'] / ref:9.1f}x "
                      f"{r['commit_p50_us']:9.0f}µs {r['commit_p99_us']:7.0f}µs "
                      f"{r['commit_p50_us'] / idle['commit_p50_us']:11.2f}x "
                      f"{r['client_cpus']:11.2f}/{nproc} {r['server_cpus']:10.2f}/{nproc}",
                      flush=True)
            w.kill(name)
        print("\nfull state sync to an empty follower (two node processes):", flush=True)
        for app, label in ((KV, "store-backed KV (read snapshot)"),
                           (DictKV, "dict-backed KV (forked child)")):
            r = state_sync(w, app, args.keys, label.split()[0])
            rows.append({"case": "state_sync", **r})
            ok = ok and r["identical"] and r["state_syncs"] == 1
            print(f"  {label:<34} {r['keys']:,} keys in {r['seconds']:.2f}s = "
                  f"{r['entries_per_s']:,.0f} entries/s; identical: "
                  f"{'yes' if r['identical'] else 'NO'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"nproc": nproc, "rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
