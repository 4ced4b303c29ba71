"""What a round trip between two processes costs on this machine, and why:
the reference that every other ratio in perf/ is measured against.

Round trips of 64 bytes between this process and an echo process:

* ``pyzmq REQ/REP``: the bare round trip of perf/latency.py and perf/kv.py;
  each message passes the sender's and the receiver's ZeroMQ I/O thread,
  so a round trip is six thread wake-ups;
* the same with both processes pinned to one CPU, and to two different
  CPUs (``os.sched_setaffinity``): how much of it is waking a thread on the
  other CPU;
* ``raw TCP``: a plain socket echo (TCP_NODELAY), two wake-ups per round
  trip;
* ``raw TCP via a Python relay``: the same through a do-nothing relay
  process: what a chain hop would cost at least over plain sockets (the
  pyzmq figure for a relay hop is in perf/latency.py --hops).

Each figure is the median of ``--rounds`` rounds' p50, the cases
alternating.

    python3 perf/wakeups.py [--rounds 5] [--per-round 3000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import zmq

from _common import ECHO_SERVER, Workdir, free_tcp_base, pct, wait_until

TCP_ECHO = """
import os, socket
cpus = %r
if cpus:
    os.sched_setaffinity(0, cpus)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", %d))
s.listen(1)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    m = c.recv(65536)
    if not m:
        break
    c.sendall(m)
"""

# A do-nothing relay on plain sockets: what one hop of a chain would cost
# at least if the nodes' data link were plain TCP instead of ZeroMQ.
TCP_RELAY = """
import selectors, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", %d))
s.listen(1)
front, _ = s.accept()
back = socket.create_connection(("127.0.0.1", %d))
for c in (front, back):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
other = {front: back, back: front}
sel = selectors.DefaultSelector()
sel.register(front, selectors.EVENT_READ)
sel.register(back, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        m = key.fileobj.recv(65536)
        if not m:
            raise SystemExit(0)
        other[key.fileobj].sendall(m)
"""

PINNED_ECHO = "import os\ncpus = %r\nif cpus:\n    os.sched_setaffinity(0, cpus)\n" + ECHO_SERVER


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=3000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    mine = set(cpus)
    other = {cpus[1]} if len(cpus) > 1 else {cpus[0]}
    payload = b"x" * 64
    # (name, this process's CPUs, the echo's CPUs, transport)
    cases = [("pyzmq REQ/REP", mine, None, "zmq"),
             ("pyzmq, both on one CPU", {cpus[0]}, {cpus[0]}, "zmq"),
             ("pyzmq, on two CPUs", {cpus[0]}, other, "zmq"),
             ("raw TCP", mine, None, "tcp"),
             ("raw TCP via a Python relay", mine, None, "tcp-relay")]
    results: dict[str, list[float]] = {name: [] for name, *_ in cases}
    with Workdir("zrepl-wakeups-") as w:
        contexts: list[zmq.Context] = []
        calls = {}
        conns: list[socket.socket] = []
        try:
            for name, my_cpus, echo_cpus, transport in cases:
                port = free_tcp_base()
                if transport == "zmq":
                    w.start_python(PINNED_ECHO % (echo_cpus, f"tcp://127.0.0.1:{port}"))
                    # A thread keeps the CPUs it was started with: pin before
                    # the context starts its I/O thread (at its first socket).
                    os.sched_setaffinity(0, my_cpus)
                    ctx = zmq.Context()
                    contexts.append(ctx)
                    s = ctx.socket(zmq.REQ)
                    s.setsockopt(zmq.LINGER, 0)
                    s.connect(f"tcp://127.0.0.1:{port}")
                    os.sched_setaffinity(0, mine)
                    calls[name] = (lambda s=s: (s.send(payload), s.recv()))
                else:
                    w.start_python(TCP_ECHO % (echo_cpus, port))
                    if transport == "tcp-relay":
                        echo_port, port = port, free_tcp_base()
                        wait_until(lambda: _listening(echo_port), 30, "the TCP echo")
                        w.start_python(TCP_RELAY % (port, echo_port))
                    conn = wait_until(lambda: _connect(port), 30, "the TCP echo")
                    conns.append(conn)
                    calls[name] = (lambda c=conn: (c.sendall(payload), c.recv(65536)))
            for _ in range(args.rounds):
                for name, my_cpus, _, _ in cases:
                    os.sched_setaffinity(0, my_cpus)
                    call = calls[name]
                    for _ in range(200):  # settle after the move
                        call()
                    lat = []
                    for _ in range(args.per_round):
                        t = time.perf_counter()
                        call()
                        lat.append(time.perf_counter() - t)
                    results[name].append(pct(lat, 0.5))
        finally:
            os.sched_setaffinity(0, mine)
            for ctx in contexts:
                ctx.destroy(linger=0)
            for conn in conns:
                conn.close()
    print(f"round trip of {len(payload)} bytes between two processes, CPUs {cpus}, "
          f"median of {args.rounds} rounds' p50")
    base = statistics.median(results[cases[0][0]])
    summary = {}
    for name, *_ in cases:
        med = statistics.median(results[name])
        summary[name] = med
        print(f"  {name:26} {med * 1e6:7.1f} µs  {med / base:5.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def _listening(port: int) -> bool:
    """Whether something listens on ``port``, without connecting to it (the
    echo serves one connection only)."""
    import psutil
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.net_connections("tcp4"))


def _connect(port: int) -> socket.socket | None:
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError:
        return None
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


if __name__ == "__main__":
    raise SystemExit(main())
