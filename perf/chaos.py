"""Chaos on real processes: a supervised cluster whose every node runs in a
Linux network namespace of its own, under partitions, slow links, pauses,
kills and a full disk, while client processes write and read; the history
is then checked the way Jepsen checks one (``zrepl/sim/history.py``, the
simulator's checker).

    python3 perf/chaos.py [--minutes 10] [--nodes 3|4] [--seed S] [--json FILE]

Needs root and ``ip netns`` (exit status 2 with the reason otherwise).
Every node, the supervisor and the clients have a namespace of their own,
joined by a bridge; the script's own process reaches them all through the
bridge.  Faults act on real links and processes (``docs/faults.md``):

  partition-leader            the leader's link down: cut from everyone
  partition-supervisor        the supervisor's link down
  partition-leader-follower   leader and follower cannot reach each other;
                              both still answer the supervisor
  partition-leader-followers  the leader cut from every other node; it still
                              reaches the supervisor and the clients
  partition-chain-middle      (4 nodes) the same, between the two forwarders
  oneway-leader-follower      the leader's packets to its follower dropped
                              (a blackhole route on one side only)
  slow-link                   the leader's link delayed and lossy (``tc
                              netem``; where the kernel lacks netem, a ``tbf``
                              rate limit: queueing delay and tail drops)
  pause-leader, pause-forwarder
                              SIGSTOP past the lease, then SIGCONT
  kill-leader, kill-node      SIGKILL, restart after a while
  kill-supervisor             SIGKILL, restart after a while
  disk-full                   the last node's data directory is a small
                              tmpfs; it is filled, then emptied (the node
                              is restarted if it stopped)

Client processes (``--clients``, 4) mix: ``set``/``cas``/``get`` with
``leader_only=True`` on three hot registers, ``incr`` of a counter per
client, write-once keys, transfers between five accounts
(``workers.bank``) and ``leader_only`` reads of their total.  At the end
every fault is healed, the cluster gets a quiet period, and the checker
reports acknowledged writes lost, commands applied twice, non-linearizable
register histories, a changed ledger total, replicas that differ (WAL ids
and state digests), and per fault kind the longest stretch without an
acknowledged write and how long after healing writes resumed.  Exit status
1 on any violation.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from _common import Workdir, wait_until

import msgpack  # noqa: E402

from zrepl import Client, NodeClient, NodeRole, ReplicationError  # noqa: E402
from zrepl.core.types import FollowerState  # noqa: E402
from zrepl.engine.remote import supervisor_view  # noqa: E402
from zrepl.sim import history  # noqa: E402
from zrepl.sim.linear import ABSENT  # noqa: E402

APP = "workers.bank:Bank"
PORT = 7400
SETTINGS = {"require_sync": True, "lease_required": True, "insecure": True,
            "segment_bytes": 4 * 1024 * 1024,
            "checkpoint_entries": 20000}
ACCOUNTS = {f"acct/a{i}": 1000 for i in range(5)}
REGISTERS = ("r0", "r1", "r2")
KINDS = ("partition-leader", "partition-supervisor", "partition-leader-follower",
         "partition-leader-followers", "partition-chain-middle", "oneway-leader-follower",
         "slow-link", "pause-leader", "pause-forwarder", "kill-leader", "kill-node",
         "kill-supervisor", "disk-full")
TMPFS_BYTES = 256 * 1024 * 1024


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


def unavailable_reason() -> str | None:
    """Why this machine cannot run the harness (None: it can)."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces, tmpfs)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs the ip and tc commands (iproute2)"
    probe = f"zcprobe{os.getpid() % 100000}"
    r = run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


# --- the network -------------------------------------------------------------------


class Net:
    """A bridge in this namespace and one namespace per member, each on a
    veth pair: ``IP(name)`` reaches it from anywhere until a fault says no."""

    def __init__(self, names: list[str]):
        # a prefix no other run on this machine uses now
        self.rid = next((r for r in [(os.getpid() + i) % 200 + 20 for i in range(200)]
                         if run("ip", "link", "show", f"zc{r}br", check=False).returncode),
                        os.getpid() % 200 + 20)
        self.prefix = f"zc{self.rid}"
        self.bridge = f"{self.prefix}br"
        self.names = names
        self.ip = {n: f"10.231.{self.rid}.{i + 1}" for i, n in enumerate(names)}
        self.host_ip = f"10.231.{self.rid}.254"
        self.made: list[str] = []
        self.qdisc = ""  # netem or tbf, once known

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def veth(self, name: str) -> str:
        return f"{self.prefix}{name}"  # the end in the bridge (<= 15 characters)

    def setup(self) -> None:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self.made.append("bridge")
        run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for n in self.names:
            ns, host, inner = self.ns(n), self.veth(n), f"{self.veth(n)}i"
            run("ip", "netns", "add", ns)
            self.made.append(ns)
            run("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
            run("ip", "link", "set", inner, "netns", ns)
            run("ip", "link", "set", host, "master", self.bridge)
            run("ip", "link", "set", host, "up")
            run("ip", "-n", ns, "addr", "add", f"{self.ip[n]}/24", "dev", inner)
            run("ip", "-n", ns, "link", "set", inner, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        probe = self.veth(self.names[0])
        if run("tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms",
               check=False).returncode == 0:
            run("tc", "qdisc", "del", "dev", probe, "root", check=False)
            self.qdisc = "netem"
        else:
            self.qdisc = "tbf"

    def close(self) -> None:
        for ns in [m for m in self.made if m != "bridge"]:
            run("ip", "netns", "del", ns, check=False)
        if "bridge" in self.made:
            run("ip", "link", "del", self.bridge, check=False)
        self.made = []

    # faults: each returns nothing; its heal undoes it
    def link(self, name: str, up: bool) -> None:
        run("ip", "link", "set", self.veth(name), "up" if up else "down")

    def block(self, src: str, dst: str, on: bool) -> None:
        """Drop what ``src`` sends to ``dst`` (a blackhole route in src's namespace)."""
        run("ip", "-n", self.ns(src), "route", "add" if on else "del", "blackhole",
            f"{self.ip[dst]}/32", check=on)

    def slow(self, name: str, on: bool) -> None:
        """Both directions of ``name``'s link delayed and lossy."""
        for dev, where in ((self.veth(name), []), (f"{self.veth(name)}i", ["-n", self.ns(name)])):
            if not on:
                run("tc", *where, "qdisc", "del", "dev", dev, "root", check=False)
            elif self.qdisc == "netem":
                run("tc", *where, "qdisc", "add", "dev", dev, "root", "netem", "delay", "30ms",
                    "20ms", "loss", "5%")
            else:
                run("tc", *where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "128kbit",
                    "burst", "4kb", "latency", "100ms")


# --- the processes -----------------------------------------------------------------


class Chaos(Workdir):
    def __init__(self, args: argparse.Namespace):
        super().__init__(prefix="zrepl-chaos-")
        self.args = args
        self.nodes = [f"n{i + 1}" for i in range(args.nodes)]
        self.net = Net(self.nodes + ["sup", "cl"])
        self.addr = {n: f"tcp://{self.net.ip[n]}:{PORT}" for n in self.nodes}
        self.name_of = {a: n for n, a in self.addr.items()}
        self.sup = f"tcp://{self.net.ip['sup']}:{PORT + 100}"
        self.tmpfs = self.path / "tmpfs"
        self.disk_node = self.nodes[-1]
        self.clients: list[subprocess.Popen] = []
        self.events: list[str] = []

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        ns = self.net.ns("sup" if name == "supervisor" else name)
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "zrepl",
                                     *args], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=self._env)
        self.procs[name] = proc
        return proc

    def data_dir(self, name: str) -> Path:
        return self.tmpfs / "data" if name == self.disk_node else self.root / name

    def start(self, name: str) -> None:
        if name == "supervisor":
            self.start_supervisor(list(self.addr.values()), SETTINGS)
            return
        data = self.data_dir(name)
        if data != self.root / name and not (self.root / name).exists():
            (self.root / name).symlink_to(data)  # start_node's ROOT/NAME
        self.start_node(name, self.addr[name], SETTINGS, app=APP)

    def address(self, name: str) -> str:
        # (LocalCluster.start_supervisor listens here: the supervisor's namespace)
        return self.sup if name == "supervisor" else self.addr[name]

    def setup(self) -> None:
        self.net.setup()
        self.tmpfs.mkdir()
        run("mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "chaos", str(self.tmpfs))
        (self.tmpfs / "data").mkdir()
        for n in self.nodes:
            self.start(n)
        self.start("supervisor")

    def close(self) -> None:
        for p in self.clients + list(self.procs.values()):
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.args.logs:
            keep = Path(self.args.logs)
            keep.mkdir(parents=True, exist_ok=True)
            for f in list(self.path.glob("*.log")) + list(self.path.glob("*.jsonl")):
                shutil.copy(f, keep / f.name)
        try:
            if self.tmpfs.is_mount():
                run("umount", str(self.tmpfs), check=False)
            super().close()
        finally:
            self.net.close()
            shutil.rmtree(self.path, ignore_errors=True)

    # --- views ---------------------------------------------------------------------

    def status(self, name: str):
        try:
            with NodeClient(self.addr[name], timeout=0.3) as c:
                return c.status()
        except ReplicationError:
            return None

    def chain(self) -> list[str]:
        """Leader first, as the supervisor sees it (node names), or as the
        nodes say when it does not answer."""
        view = supervisor_view(self.sup, timeout=0.3)
        if view and view.get("leader"):
            return [self.name_of[a] for a in view["chain"] if a in self.name_of]
        sts = {n: self.status(n) for n in self.nodes}
        leaders = [n for n, s in sts.items() if s is not None and s.role == NodeRole.LEADER]
        if not leaders:
            return []
        out = [max(leaders, key=lambda n: sts[n].leader_id)]
        while (st := sts.get(out[-1])) is not None and st.follower in self.name_of and \
                self.name_of[st.follower] not in out:
            out.append(self.name_of[st.follower])
        return out

    def healthy(self) -> bool:
        """One leader, every node in one synchronous chain, the supervisor
        seeing it."""
        view = supervisor_view(self.sup, timeout=0.5)
        if not view or len(view["synchronous_chain"]) != len(self.nodes) - 1:
            return False
        sts = [self.status(n) for n in self.nodes]
        return all(s is not None for s in sts) and \
            sum(s.role == NodeRole.LEADER for s in sts) == 1 and \
            all(s.follower_state == FollowerState.SYNCHRONOUS for s in sts if s.follower)

    def revive(self) -> None:
        """Restart what exited (or whose WAL broke).  Each restart is an
        event in the report: a node stops by itself when its disk fills;
        any other exit deserves a look at its log (``--logs``)."""
        for name in self.nodes + ["supervisor"]:
            p = self.procs.get(name)
            broken = False
            if name != "supervisor" and p is not None and p.poll() is None:
                st = self.status(name)
                broken = st is not None and bool(st.extra.get("wal_broken"))
                if broken:
                    p.kill()
                    p.wait()
            if p is None or p.poll() is not None:
                self.events.append(f"{name} {'had a broken WAL' if broken else 'had exited'}"
                                   f" ({p.returncode if p else '-'}): restarted")
                try:
                    self.start(name)
                except RuntimeError as exc:
                    self.events.append(f"{name} did not start: {exc}")

    # --- faults ----------------------------------------------------------------------

    def inject(self, kind: str, rng: random.Random) -> tuple[str, Callable[[], None]] | None:
        """Start one fault; (what it is, how to heal it), or None when the
        cluster gives it no target now."""
        net = self.net
        chain = self.chain()
        leader = chain[0] if chain else None
        follower = chain[1] if len(chain) > 1 else None
        if kind == "partition-leader" and leader:
            net.link(leader, False)
            return f"{leader} cut off", lambda: net.link(leader, True)
        if kind == "partition-supervisor":
            net.link("sup", False)
            return "supervisor cut off", lambda: net.link("sup", True)
        if kind == "partition-leader-follower" and follower:
            return self._cut(leader, follower, both=True)
        if kind == "partition-leader-followers" and follower:
            heals = [self._cut(leader, n, both=True)[1] for n in self.nodes if n != leader]
            return (f"{leader} <-/-> every node",
                    lambda: [heal() for heal in heals] and None)
        if kind == "partition-chain-middle" and len(chain) >= 3:
            return self._cut(chain[1], chain[2], both=True)
        if kind == "oneway-leader-follower" and follower:
            return self._cut(leader, follower, both=False)
        if kind == "slow-link" and leader:
            net.slow(leader, True)
            return f"{leader}'s link slow ({net.qdisc})", lambda: net.slow(leader, False)
        if kind in ("pause-leader", "pause-forwarder"):
            who = leader if kind == "pause-leader" else (chain[1] if len(chain) > 2 else None)
            if who is None:
                return None
            p = self.procs[who]
            p.send_signal(signal.SIGSTOP)
            return f"{who} stopped", lambda: p.send_signal(signal.SIGCONT)
        if kind in ("kill-leader", "kill-node", "kill-supervisor"):
            who = {"kill-leader": leader, "kill-supervisor": "supervisor",
                   "kill-node": rng.choice(self.nodes)}[kind]
            if who is None:
                return None
            self.kill(who)
            return f"{who} killed", lambda: self.start(who)
        if kind == "disk-full":
            return self._fill()
        return None

    def _cut(self, a: str, b: str, both: bool) -> tuple[str, Callable[[], None]]:
        self.net.block(a, b, True)
        if both:
            self.net.block(b, a, True)

        def heal() -> None:
            self.net.block(a, b, False)
            if both:
                self.net.block(b, a, False)
        return (f"{a} {'<-/->' if both else '-/->'} {b}"), heal

    def _fill(self) -> tuple[str, Callable[[], None]]:
        filler = self.tmpfs / "filler"
        st = os.statvfs(self.tmpfs)
        free = st.f_bavail * st.f_frsize
        with open(filler, "wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, max(free - 4096, 4096))
            except OSError:
                pass  # (full already)

        def heal() -> None:
            filler.unlink(missing_ok=True)
            self.revive()
        return f"{self.disk_node}'s disk full", heal


# --- the clients -------------------------------------------------------------------


def client_main(argv: list[str]) -> int:
    """One client process: operations until SIGTERM, one JSON line each."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--id", type=int, required=True)
    ap.add_argument("--nodes", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--think", type=float, default=0.02)
    a = ap.parse_args(argv)
    halt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: halt.set())
    rng = random.Random(a.seed * 1000 + a.id)
    client = Client(a.nodes.split(","), timeout=0.5, retry_for=5.0)
    seen: dict[str, Any] = {}
    pack = msgpack.Packer(use_bin_type=True).pack
    i = 0
    with open(a.out, "w", buffering=1) as out:
        while not halt.is_set():
            i += 1
            r = rng.random()
            query = False
            if r < 0.3:
                key = rng.choice(REGISTERS)
                s = rng.random()
                if s < 0.4:
                    kind, arg = "write", f"c{a.id}-{i}"
                    cmd: tuple = ("set", key, arg)
                elif s < 0.6:
                    kind, arg = "cas", [seen.get(key), f"c{a.id}-{i}"]
                    cmd = ("cas", key, arg[0], arg[1])
                else:
                    kind, arg, query = "read", None, True
                    cmd = ("get", key)
            elif r < 0.45:
                kind, key, arg = "incr", f"n{a.id}", 1
                cmd = ("incr", key, 1)
            elif r < 0.65:
                kind, key, arg = "unique", f"u{a.id}-{i}", i
                cmd = ("set", key, i)
            elif r < 0.9:
                src, dst = rng.sample(sorted(ACCOUNTS), 2)
                kind, key, arg = "transfer", src, [dst, rng.randint(1, 300)]
                cmd = ("transfer", src, dst, arg[1])
            else:
                kind, key, arg, query = "total", "acct/", None, True
                cmd = ("scan", "acct/", None)
            invoked = time.monotonic()
            error: BaseException | None = None
            result: Any = None
            try:
                if query:
                    answer = msgpack.unpackb(client.query(pack(cmd), leader_only=True), raw=False)
                    if kind == "read":
                        result = answer[1] if answer[0] else None
                        seen[key] = result
                        result = [answer[0], result]
                    else:
                        result = sum(v for _, v in answer)
                else:
                    result = client.apply(pack(cmd))
                    if kind in ("write", "cas") and result == 0:
                        seen[key] = arg if kind == "write" else arg[1]
            except (ReplicationError, ValueError, TypeError) as exc:
                error = exc
            completed = time.monotonic()
            outcome = history.outcome_of(error)
            out.write(json.dumps([kind, key, arg, invoked, completed, outcome, result,
                                  f"c{a.id}#{i}"]) + "\n")
            if a.think:
                halt.wait(rng.random() * a.think)
    client.close()
    return 0


def to_op(rec: list) -> history.Op:
    kind, key, arg, invoked, completed, outcome, result, label = rec
    if kind == "read" and result is not None:
        result = result[1] if result[0] else ABSENT
    if kind == "cas":
        arg = tuple(arg)
    return history.Op(kind, key, arg, invoked,
                      completed if outcome == history.OK else history.INF, outcome, result, label)


class Tail:
    """The client records, read as they are written."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.offsets = {p: 0 for p in paths}
        self.records: list[list] = []

    def poll(self) -> list[list]:
        new = []
        for p in self.paths:
            try:
                with open(p) as f:
                    f.seek(self.offsets[p])
                    chunk = f.read()
            except FileNotFoundError:
                continue
            complete = chunk[:chunk.rfind("\n") + 1]
            self.offsets[p] += len(complete.encode())
            new += [json.loads(line) for line in complete.splitlines() if line]
        self.records += new
        return new


# --- availability ------------------------------------------------------------------


def availability(acks: list[float], faults: list[dict], end: float) -> dict[str, dict]:
    """Per fault kind: the longest stretch without an acknowledged write
    from its start until the next fault (or the end), and the time from its
    heal to the first write acknowledged after it.  Each fault's own figures
    are added to it (with the writes acknowledged in the second half of the
    fault: did writes come back before it healed?)."""
    acks = sorted(acks)
    out: dict[str, dict] = {}
    for i, f in enumerate(faults):
        stop = faults[i + 1]["start"] if i + 1 < len(faults) else end
        lo, hi = bisect.bisect_left(acks, f["start"]), bisect.bisect_right(acks, stop)
        points = [f["start"]] + acks[lo:hi] + [stop]
        gap = max(b - a for a, b in zip(points, points[1:]))
        j = bisect.bisect_right(acks, f["healed"])
        first = acks[j] if j < len(acks) and acks[j] <= stop else stop
        resumed = first - f["healed"]
        half = f["start"] + (f["healed"] - f["start"]) / 2
        f["unavailable_s"] = round(gap, 3)
        f["acked_in_second_half"] = bisect.bisect_right(acks, f["healed"]) - \
            bisect.bisect_left(acks, half)
        d = out.setdefault(f["kind"], {"count": 0, "gaps": [], "resumed": []})
        d["count"] += 1
        d["gaps"].append(gap)
        d["resumed"].append(resumed)
    return {k: {"count": d["count"], "max_unavailable_s": round(max(d["gaps"]), 3),
                "median_unavailable_s": round(statistics.median(d["gaps"]), 3),
                "max_resumed_after_heal_s": round(max(d["resumed"]), 3)}
            for k, d in sorted(out.items())}


# --- the run -----------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--nodes", type=int, default=3, choices=(3, 4))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--faults", default=",".join(KINDS),
                    help="comma-separated fault kinds (default: all that apply)")
    ap.add_argument("--hold", type=float, default=None,
                    help="every fault lasts this long (default: 1-5 s, drawn)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--logs", default=None, metavar="DIR",
                    help="copy every process's log and the client histories here at the end")
    args = ap.parse_args()
    why = unavailable_reason()
    if why:
        print(f"chaos: {why}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    kinds = [k for k in args.faults.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    if args.nodes < 4:
        kinds = [k for k in kinds if k != "partition-chain-middle"]
    # SIGTERM cleans up like Ctrl-C: namespaces, the bridge and the tmpfs
    # outlive the processes that made them
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"chaos: {args.nodes} nodes, {args.clients} clients, {args.minutes:g} minutes, "
          f"seed {seed}", flush=True)
    with Chaos(args) as c:
        try:
            return run_chaos(c, args, kinds, rng, seed)
        finally:
            for line in c.events[-20:]:
                print(f"  event: {line}")


def run_chaos(c: Chaos, args: argparse.Namespace, kinds: list[str], rng: random.Random,
              seed: int) -> int:
    c.setup()
    print(f"network: bridge {c.net.bridge}, link faults with {c.net.qdisc}"
          f"{'' if c.net.qdisc == 'netem' else ' (this kernel has no netem)'}", flush=True)
    wait_until(c.healthy, 60, "the supervisor to build a synchronous chain")
    with Client(list(c.addr.values()), timeout=1.0, retry_for=20.0) as opener:
        for acct, amount in ACCOUNTS.items():
            code = opener.apply(msgpack.packb(("set", acct, amount)))
            assert code == 0, f"opening {acct}: code {code}"
    outs = [c.path / f"client{i}.jsonl" for i in range(args.clients)]
    nodes_arg = ",".join(c.addr.values())
    for i, out in enumerate(outs):
        with open(c.path / f"client{i}.log", "wb") as log:
            c.clients.append(subprocess.Popen(
                ["ip", "netns", "exec", c.net.ns("cl"), sys.executable, __file__, "_client",
                 "--id", str(i), "--nodes", nodes_arg, "--out", str(out), "--seed", str(seed)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=c._env))
    tail = Tail(outs)
    faults: list[dict] = []
    counts: collections.Counter = collections.Counter()
    start = time.monotonic()
    end = start + args.minutes * 60
    last_print = 0.0

    def progress(current: str) -> None:
        nonlocal last_print
        now = time.monotonic()
        tail.poll()
        if now - last_print < 5:
            return
        last_print = now
        o = collections.Counter(r[5] for r in tail.records)
        recent = sum(1 for r in tail.records[-2000:] if r[5] == "ok" and r[4] > now - 5
                     and r[0] not in ("read", "total"))
        print(f"[{now - start:6.0f}s/{args.minutes * 60:.0f}s] faults {len(faults):3}  "
              f"ops ok {o['ok']} failed {o['failed']} unknown {o['unknown']}  "
              f"writes/s {recent / 5:5.0f}  {current}", flush=True)

    def hold(seconds: float, current: str) -> None:
        t = time.monotonic() + seconds
        while time.monotonic() < t:
            progress(current)
            time.sleep(min(0.2, max(0.0, t - time.monotonic())))

    hold(3, "warming up")
    while time.monotonic() < end:
        kind = rng.choice(kinds)
        t0 = time.monotonic()
        got = c.inject(kind, rng)
        if got is None:
            hold(0.5, f"no target for {kind}")
            continue
        what, heal = got
        counts[kind] += 1
        duration = rng.uniform(1.0, 2.0) if kind.startswith("pause") else rng.uniform(1.5, 5.0)
        if kind.startswith("kill"):
            duration = rng.uniform(0.5, 3.0)
        if args.hold is not None:
            duration = args.hold
        hold(duration, f"now: {kind} ({what})")
        try:
            heal()
        except RuntimeError as exc:
            c.events.append(f"healing {kind}: {exc}")
        faults.append({"kind": kind, "what": what, "start": t0, "healed": time.monotonic()})
        c.revive()
        hold(rng.uniform(3.0, 5.0), f"healed {kind}")
    fault_end = time.monotonic()
    print("faults over: waiting for one synchronous chain of every node", flush=True)
    c.revive()
    converged = True
    try:
        wait_until(c.healthy, 90, "a healthy chain after the faults")
    except Exception as exc:  # noqa: BLE001 - reported as a violation below
        converged = False
        c.events.append(f"not converged: {exc}")
    hold(3, "quiet period")
    for p in c.clients:
        p.send_signal(signal.SIGTERM)
    for p in c.clients:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    tail.poll()
    final, divergent, replicas = final_states(c, converged)
    ops = [to_op(r) for r in tail.records]
    verdict = history.check(ops, final, ACCOUNTS)
    acks = [r[4] for r in tail.records if r[5] == "ok" and r[0] not in ("read", "total")]
    avail = availability(acks, faults, fault_end)
    tally = collections.Counter(r[5] for r in tail.records)
    report = {
        "seed": seed, "nodes": args.nodes, "clients": args.clients,
        "minutes": round((fault_end - start) / 60, 2), "link_qdisc": c.net.qdisc,
        "faults": dict(sorted(counts.items())),
        "ops": {k: tally[k] for k in ("ok", "failed", "unknown")},
        "lost": len(verdict.lost), "duplicated": len(verdict.duplicated),
        "nonlinearizable": len(verdict.nonlinearizable), "undecided": len(verdict.undecided),
        "divergent": divergent, "converged": converged,
        "ledger_total_ok": bool(verdict.ledger_total_ok),
        "max_unavailable_s": {k: v["max_unavailable_s"] for k, v in avail.items()},
        "availability": avail, "replicas": replicas,
        "fault_log": [{"kind": f["kind"], "what": f["what"],
                       "at_s": round(f["start"] - start, 2),
                       "held_s": round(f["healed"] - f["start"], 2),
                       "unavailable_s": f["unavailable_s"],
                       "acked_in_second_half": f["acked_in_second_half"]} for f in faults][-2000:],
        "problems": [f"{k}: {t}" for k, t in verdict.violations][:50],
        "events": c.events[-50:],
        "netns_prefix": c.net.prefix, "workdir": str(c.path),
    }
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    bad = report["lost"] or report["duplicated"] or report["nonlinearizable"] or divergent \
        or not converged or not report["ledger_total_ok"]
    return 1 if bad else 0


def final_states(c: Chaos, converged: bool) -> tuple[dict, int, dict]:
    """The leader's state as key -> value, the number of replicas that
    differ from it (state digest or WAL id) once every node applied all the
    leader holds, and each replica's figures."""
    chain = c.chain()
    leader = chain[0] if chain else c.nodes[0]
    top = (c.status(leader).max_wal if c.status(leader) else 0)

    def caught_up() -> bool:
        return all((s := c.status(n)) is not None and s.max_applied_wal >= top for n in c.nodes)
    try:
        wait_until(caught_up, 60, "every replica to apply the leader's WAL")
    except Exception as exc:  # noqa: BLE001 - the digests below say which
        c.events.append(f"not caught up: {exc}")
    replicas: dict[str, dict] = {}
    for n in c.nodes:
        try:
            with NodeClient(c.addr[n], timeout=30) as nc:
                st = nc.status()
                replicas[n] = {"max_applied_wal": st.max_applied_wal,
                               "digest": nc.state_digest()["sha256"][:16]}
        except ReplicationError as exc:
            replicas[n] = {"error": str(exc)}
    with NodeClient(c.addr[leader], timeout=30) as nc:
        final = {}
        for data in nc.dump_state():
            cmd = msgpack.unpackb(data, raw=False)
            final[cmd[1]] = cmd[2]
    ref = replicas.get(leader, {})
    divergent = sum(1 for n, r in replicas.items()
                    if r.get("digest") != ref.get("digest") or
                    r.get("max_applied_wal") != ref.get("max_applied_wal"))
    return final, divergent, replicas


def print_table(r: dict) -> None:
    print(f"\nchaos: {r['minutes']} minutes, {r['nodes']} nodes, seed {r['seed']}, link faults "
          f"by {r['link_qdisc']}")
    print(f"{'fault':28} {'count':>5} {'max unavail s':>14} {'median s':>9} "
          f"{'resumed after heal s':>21}")
    for k, v in r["availability"].items():
        print(f"{k:28} {v['count']:5} {v['max_unavailable_s']:14.2f} "
              f"{v['median_unavailable_s']:9.2f} {v['max_resumed_after_heal_s']:21.2f}")
    o = r["ops"]
    print(f"operations: ok {o['ok']}, failed {o['failed']}, unknown {o['unknown']}")
    print(f"lost {r['lost']}, duplicated {r['duplicated']}, non-linearizable "
          f"{r['nonlinearizable']} (undecided {r['undecided']}), divergent {r['divergent']}, "
          f"ledger total {'ok' if r['ledger_total_ok'] else 'CHANGED'}, converged "
          f"{r['converged']}")
    for p in r["problems"][:10]:
        print(f"  VIOLATION {p}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_client"]:
        raise SystemExit(client_main(sys.argv[2:]))
    raise SystemExit(main())
