"""workers.kv served to remote clients: set/get throughput and latency.

Each client is its own process running ``workers.kv.KVClient`` (so 16
clients are 16 processes, as 16 service instances would be), all starting
at the same instant.  Measured, in the same run:

* ``alone``: a leader with no follower (the ceiling: one process, its WAL);
* ``sync``: a leader whose every acknowledged write is on a synchronous
  follower in another process.

Reference in the same run: a bare pyzmq REQ/REP round trip between two
processes (one client).  Operations: ``set`` (a blocking ``KVClient.set`` per command), ``get`` (a
``KVClient.get`` served by the leader's ``App.query``), and ``pipelined``
(``Client.apply_many`` of 256 sets at a time, one client).  Reported per
case: commands/s over all clients and the per-command latency p50/p99 seen
by the clients; then the ratio sync/alone.

    python3 perf/kv.py [--seconds 3] [--clients 1,16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import ECHO_SERVER, ROOT, Workdir, pct, tcp_address, wait_until

from zrepl import NodeClient  # noqa: E402

CLIENT = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from workers.kv import KVClient, encode
address, op, index, start_at, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
value = b"v" * 50
keys = [f"c{{index}}-{{i}}" for i in range(1000)]
if op == "echo":
    import zmq
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(address)
    msg = encode(("set", keys[0], value))
else:
    kv = KVClient([address], timeout=5.0, retry_for=10.0)
    for k in keys[:10]:
        kv.set(k, value)
lat = []
n = 0
clock = time.perf_counter
while time.time() < start_at:
    time.sleep(0.0005)
end = clock() + seconds
if op == "echo":
    while clock() < end:
        t0 = clock()
        sock.send(msg)
        sock.recv()
        lat.append(clock() - t0)
        n += 1
    sock.close(linger=0)
elif op == "pipelined":
    batch = [encode(("set", k, value)) for k in keys[:256]]
    while clock() < end:
        t0 = clock()
        codes = kv.client.apply_many(batch)
        lat.append((clock() - t0) / len(batch))
        n += len(batch)
        assert not any(codes)
else:
    call = kv.set if op == "set" else kv.get
    while clock() < end:
        k = keys[n % 1000] if op == "set" else keys[n % 10]
        t0 = clock()
        if op == "set":
            kv.set(k, value)
        else:
            assert kv.get(k) == value
        lat.append(clock() - t0)
        n += 1
if op != "echo":
    kv.close()
print(json.dumps({{"n": n, "seconds": seconds, "lat": lat}}))
"""


def run_case(w: Workdir, address: str, op: str, clients: int, seconds: float) -> dict:
    start_at = time.time() + 1.0 + 0.05 * clients  # every client connected by then
    procs = w.spawn_scripts(CLIENT.format(root=str(ROOT)),
                            [[address, op, str(i), str(start_at), str(seconds)]
                             for i in range(clients)])
    results = w.collect_json(procs, seconds + 120, f"a {op} client")
    lat = [x for r in results for x in r["lat"]]
    n = sum(r["n"] for r in results)
    return {"op": op, "clients": clients, "ops_per_s": n / seconds,
            "p50_us": pct(lat, 0.5) * 1e6, "p99_us": pct(lat, 0.99) * 1e6, "n": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", default="1,16", help="comma-separated client counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    settings = {"fsync": "batch", "checkpoint_entries": 0, "checkpoint_interval": 0}
    rows: list[dict] = []
    with Workdir() as w:
        [solo] = w.start_chain(["solo"], settings)
        lead, fol = w.start_chain(["lead", "fol"], settings)
        echo = tcp_address()
        w.start_python(ECHO_SERVER % echo)
        ref = run_case(w, echo, "echo", 1, args.seconds)
        rows.append({"setup": "reference", **ref})
        print(f"reference: bare pyzmq REQ/REP round trip between two processes, 1 client: "
              f"{ref['ops_per_s']:,.0f}/s, p50 {ref['p50_us']:.0f}µs, p99 {ref['p99_us']:.0f}µs\n")
        cases = [(op, n) for op in ("set", "get") for n in counts] + [("pipelined", 1)]
        print(f"{'case':<24} {'alone ops/s':>12} {'p50':>9} {'p99':>9}   {'sync ops/s':>11} "
              f"{'p50':>9} {'p99':>9}   sync/alone p50", flush=True)
        for op, n in cases:
            alone = run_case(w, solo, op, n, args.seconds)
            sync = run_case(w, lead, op, n, args.seconds)
            rows.append({"setup": "alone", **alone})
            rows.append({"setup": "sync", **sync})
            print(f"{op + f' x{n} client' + ('s' if n > 1 else ''):<24} "
                  f"{alone['ops_per_s']:12,.0f} {alone['p50_us']:7.0f}µs {alone['p99_us']:7.0f}µs"
                  f"   {sync['ops_per_s']:11,.0f} {sync['p50_us']:7.0f}µs {sync['p99_us']:7.0f}µs"
                  f"   {sync['p50_us'] / alone['p50_us']:.2f}x", flush=True)
        with NodeClient(lead) as c, NodeClient(fol) as f:
            top = c.status().max_wal
            wait_until(lambda: f.status().max_applied_wal >= top, 30, "the follower")
            same = c.state_digest()["sha256"] == f.state_digest()["sha256"]
        set1 = next(r for r in rows if r["setup"] == "sync" and r["op"] == "set"
                    and r["clients"] == 1)
        print(f"\nsynchronous set x1 p50 = {set1['p50_us'] / ref['p50_us']:.2f}x the bare "
              f"round trip; follower state identical to the leader's: "
              f"{'yes' if same else 'NO'}; pipelined latency is per command (batch / 256)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
