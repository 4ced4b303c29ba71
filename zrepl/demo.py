"""``python3 -m zrepl demo``: a local cluster replicates, loses its leader
and loses nothing.

Three ``zrepl node`` processes running workers.kv (a leader, a forwarder and
a follower, chained by a ``zrepl supervisor`` process) in a temporary
directory.  Clients write through ``zrepl.Client``; every write is
``incr("client-N", 1)``, so a lost write shows as a counter below the number
of acknowledged increments and a write applied twice as a counter above it.
Halfway the leader is SIGKILLed; the supervisor promotes the node holding
every acknowledged write, the clients follow, and the killed node is
restarted to rejoin at the tail.  At the end every node's counters are
checked against the clients' tallies.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

import msgpack

from .core.errors import ReplicationError
from .local import LocalCluster, wait_until
from .engine.remote import Client, NodeClient
from .engine.remote import poll_statuses, supervisor_view
from .core.types import NodeStatus

NAMES = ("a", "b", "c")


class Histogram:
    """Latencies in log-scale buckets 1 % wide: the percentiles of a run of
    any length in a few thousand counters at most."""
    STEPS = 100  # buckets per factor e

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.n = 0
        self.max = 0.0

    def add(self, x: float) -> None:
        self.counts[math.floor(math.log(max(x, 1e-9)) * self.STEPS)] += 1
        self.n += 1
        self.max = max(self.max, x)

    def merge(self, other: "Histogram") -> None:
        self.counts.update(other.counts)
        self.n += other.n
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """The middle of the bucket holding quantile ``q`` (within 0.5 % of
        the true value); 0 if empty."""
        rank, seen = min(self.n - 1, int(self.n * q)), 0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if seen > rank:
                return math.exp((k + 0.5) / self.STEPS)
        return 0.0


RECENT = 50_000  # per writer: more than a second of writes from one blocking client


@dataclass
class Tally:
    """One writer's record of what it knows happened, in bounded memory.
    Written by the writer's thread, read by the main thread under ``lock``."""
    acked: int = 0
    unknown: int = 0  # raised after retrying: may or may not have been applied
    # (done, latency) of the latest writes, for the progress line
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=RECENT))
    latency: Histogram = field(default_factory=Histogram)
    first_ack_by: dict[str, float] = field(default_factory=dict)  # node -> its first ack
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, done: float, latency: float, node: str) -> None:
        with self.lock:
            self.acked += 1
            self.recent.append((done, latency))
            self.latency.add(latency)
            self.first_ack_by.setdefault(node, done)


class Writer(threading.Thread):
    def __init__(self, index: int, addresses: list[str]):
        super().__init__(name=f"demo-writer-{index}", daemon=True)
        self.key = f"client-{index}"
        self.client = Client(addresses, timeout=0.5, retry_for=10.0)
        self.command = msgpack.packb(("incr", self.key, 1), use_bin_type=True)
        self.tally = Tally()
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        tally, clock = self.tally, time.monotonic
        try:
            while not self.halt.is_set():
                t0 = clock()
                try:
                    code = self.client.apply(self.command)
                except ReplicationError:
                    tally.unknown += 1
                    continue
                t1 = clock()
                if code != 0:
                    raise RuntimeError(f"incr answered code {code}")
                tally.record(t1, t1 - t0, self.client.leader or "")
        except BaseException as exc:  # reported by the main thread
            self.error = exc


class Screen:
    """A progress line rewritten in place on a terminal (a line per update
    otherwise), with event lines printed above it."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0

    def progress(self, text: str, every: float = 1.0) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text)
            self.out.flush()
        elif time.monotonic() - self._last >= every:
            self.out.write(text + "\n")
            self.out.flush()
            self._last = time.monotonic()

    def event(self, text: str) -> None:
        self.out.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.out.flush()


def _ms(x: float) -> str:
    return f"{x * 1000:.2f} ms" if x < 0.1 else f"{x * 1000:.0f} ms"


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else 0.0


class Demo:
    def __init__(self, cluster: LocalCluster, clients: int, out: TextIO):
        self.cluster = cluster
        self.n_clients = clients
        self.screen = Screen(out)
        self.addresses = {name: cluster.address(name) for name in NAMES}
        self.names = {a: n for n, a in self.addresses.items()}
        self.writers: list[Writer] = []
        self.sup_listen = ""
        self.t0 = 0.0

    # --- the supervisor's view --------------------------------------------------------
    def view(self) -> dict | None:
        return supervisor_view(self.sup_listen)

    def chain_text(self, view: dict) -> str:
        chain = [self.names.get(a, a) for a in view.get("chain", [])]
        roles = ["leader"] + ["forwarder"] * (len(chain) - 2) + ["follower"]
        return " -> ".join(f"{n} ({r})" for n, r in zip(chain, roles))

    def full_chain(self) -> dict | None:
        """The supervisor's view if it sees all three nodes in one
        synchronous chain."""
        v = self.view()
        return v if v and len(v["chain"]) == 3 and len(v["synchronous_chain"]) == 2 else None

    def wait_chain(self, what: str, timeout: float = 60) -> dict:
        return wait_until(self.full_chain, timeout, what, 0.05)

    # --- writing and watching -------------------------------------------------------
    def latencies_since(self, since: float) -> list[float]:
        """Latencies of the writes acknowledged after ``since`` (recent ones
        only: each writer keeps its last RECENT)."""
        out = []
        for w in self.writers:
            with w.tally.lock:
                for done, latency in reversed(w.tally.recent):
                    if done <= since:
                        break
                    out.append(latency)
        return out

    def acked(self) -> int:
        return sum(w.tally.acked for w in self.writers)

    def progress_for(self, seconds: float, until: Callable[[], bool] | None = None,
                     on_tick: Callable[[], None] | None = None) -> None:
        """Show the progress line for ``seconds`` (or until ``until()``)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            time.sleep(0.25)  # the display rate (the first line after a quarter second)
            tick = time.monotonic()
            lat = self.latencies_since(tick - 1.0)
            acked = self.acked()
            lags = []
            statuses = poll_statuses(list(self.addresses.values()), timeout=0.15)
            epoch = max((st.leader_id for st in statuses.values()
                         if isinstance(st, NodeStatus)), default=0)
            for a, st in statuses.items():
                # only the links of the epoch in force: a restarted old leader's
                # persisted link to its follower is not a lag
                if isinstance(st, NodeStatus) and st.follower and st.leader_id == epoch and \
                        not st.extra.get("epoch_spent"):
                    lags.append(f"{self.names[a]}->{self.names.get(st.follower, '?')} "
                                f"{st.follower_lag}")
            down = [self.names[a] for a, st in statuses.items() if not isinstance(st, NodeStatus)]
            if acked:  # (nothing to show before the first acknowledgement: a busy machine)
                self.screen.progress(
                    f"  {tick - self.t0:5.1f}s  {acked:8,d} writes  {len(lat):7,d}/s  "
                    f"p50 {_ms(_pct(lat, 0.5))}  p99 {_ms(_pct(lat, 0.99))}  "
                    f"lag {', '.join(lags) or '-'}"
                    + (f"  down: {', '.join(down)}" if down else ""))
            for w in self.writers:
                if w.error is not None:
                    raise RuntimeError(f"{w.name} failed: {w.error!r}")
            if on_tick:
                on_tick()

    # --- the run ---------------------------------------------------------------------
    def run(self, seconds: float) -> int:
        c, say = self.cluster, self.screen.event
        say(f"zrepl demo: 3 nodes of workers.kv and a supervisor in {c.root}")
        for name in NAMES:
            c.start_node(name, self.addresses[name])
        self.sup_listen = c.start_supervisor(list(self.addresses.values()))
        view = self.wait_chain("the supervisor to build the chain")
        say(f"chain: {self.chain_text(view)}, epoch {view['leader_id']}; every write is "
            "acknowledged only once all three nodes hold it")
        old = view["leader"]

        self.writers = [Writer(i, list(self.addresses.values())) for i in range(self.n_clients)]
        self.t0 = time.monotonic()
        for w in self.writers:
            w.start()
        say(f"writing with {self.n_clients} clients (each: incr client-N) for {seconds:g}s")
        self.progress_for(seconds)
        rate_before = self.acked() / max(1e-9, time.monotonic() - self.t0)

        c.kill(self.names[old])
        t_kill = time.monotonic()
        say(f"  {t_kill - self.t0:5.1f}s  SIGKILL leader {self.names[old]} ({old})")
        promoted: dict[str, Any] = {}
        announced = False

        def watch_promotion() -> None:  # a thread: the supervisor's view every 10 ms
            try:
                v = wait_until(lambda: (v := self.view()) and v.get("leader")
                               and v["leader"] != old and v, 30, "a new leader")
            except TimeoutError:
                return  # reported by the main thread
            promoted.update(v, at=time.monotonic())

        def announce() -> None:
            nonlocal announced
            if promoted and not announced:
                announced = True
                # (stamped when shown, so the timeline stays in order; the
                # figure is when it happened)
                say(f"  {time.monotonic() - self.t0:5.1f}s  the supervisor reports "
                    f"{self.names[promoted['leader']]} as leader (epoch "
                    f"{promoted['leader_id']}), {_ms(promoted['at'] - t_kill)} after the kill")

        watcher = threading.Thread(target=watch_promotion, daemon=True)
        watcher.start()

        def first_new_ack() -> float | None:
            firsts = []
            for w in self.writers:
                with w.tally.lock:
                    firsts += [t for node, t in w.tally.first_ack_by.items()
                               if node != old and t > t_kill]
            return min(firsts, default=None)

        self.progress_for(30, until=lambda: bool(promoted) and first_new_ack() is not None,
                          on_tick=announce)
        watcher.join(timeout=30)
        announce()
        t_ack = first_new_ack()
        if t_ack is None or not promoted:
            raise RuntimeError("no new leader accepted writes within 30 s")
        failover = t_ack - t_kill
        say(f"  {time.monotonic() - self.t0:5.1f}s  writes flow again through "
            f"{self.names[promoted['leader']]}: failover took {_ms(failover)}")

        t_after, acked_after = time.monotonic(), self.acked()
        c.start_node(self.names[old], old)
        say(f"  {time.monotonic() - self.t0:5.1f}s  restarted {self.names[old]}; the "
            "supervisor puts it back at the tail, it drops what it had not replicated "
            "and catches up")
        self.progress_for(max(seconds / 2, 0.5))
        self.progress_for(60, until=lambda: self.full_chain() is not None)
        view = self.wait_chain("the restarted node to rejoin")
        rate_after = (self.acked() - acked_after) / max(1e-9, time.monotonic() - t_after)
        for w in self.writers:
            w.halt.set()
        for w in self.writers:
            w.join(timeout=30)
        say(f"  {time.monotonic() - self.t0:5.1f}s  stopped writing; chain: "
            f"{self.chain_text(view)}")
        return self.verify(view, failover, promoted["at"] - t_kill, rate_before, rate_after,
                           old)

    def verify(self, view: dict, failover: float, promotion: float, rate_before: float,
               rate_after: float, old: str) -> int:
        leader = view["leader"]
        with NodeClient(leader, timeout=5) as lc:
            top = lc.status().max_wal
        addresses = list(self.addresses.values())
        wait_until(lambda: all(isinstance(st, NodeStatus) and st.max_applied_wal >= top
                               for st in poll_statuses(addresses, 1.0).values()),
                   60, "every node to apply the last write", 0.05)
        expected = {w.key: (w.tally.acked, w.tally.unknown) for w in self.writers}
        rows, lost_total, twice_total, digests = [], 0, 0, set()
        statuses = poll_statuses(addresses, 5.0)
        for name, address in self.addresses.items():
            with NodeClient(address, timeout=30) as nc:
                state = {}
                for data in nc.dump_state():
                    _, key, value = msgpack.unpackb(data, raw=False)
                    state[key] = value
                digest = nc.state_digest()
            lost = sum(max(0, acked - state.get(k, 0)) for k, (acked, _) in expected.items())
            twice = sum(max(0, state.get(k, 0) - acked - unknown)
                        for k, (acked, unknown) in expected.items())
            lost_total = max(lost_total, lost)  # the worst node
            twice_total = max(twice_total, twice)
            digests.add(digest["sha256"])
            st = statuses[address]
            role = st.role.name.lower() if isinstance(st, NodeStatus) else "?"
            rows.append([name + (" (killed, restarted)" if address == old else ""), role,
                         str(st.leader_id), str(st.max_applied_wal),
                         f"{sum(state.get(k, 0) for k in expected):,}", str(lost), str(twice),
                         digest["sha256"][:12]])
        lat = Histogram()
        for w in self.writers:
            lat.merge(w.tally.latency)
        acked = sum(a for a, _ in expected.values())
        unknown = sum(u for _, u in expected.values())
        head = ["NODE", "ROLE", "EPOCH", "APPLIED", "SUM OF COUNTERS", "LOST", "TWICE",
                "STATE DIGEST"]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        out = self.screen.out
        out.write("\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                                   for r in [head] + rows) + "\n\n")
        ok = lost_total == 0 and twice_total == 0 and len(digests) == 1
        out.write(
            f"acknowledged writes   {acked:,} (outcome unknown: {unknown})\n"
            f"throughput            {rate_before:,.0f}/s before the failover, "
            f"{rate_after:,.0f}/s after ({self.n_clients} clients, each waits for its reply)\n"
            f"latency               p50 {_ms(lat.quantile(0.5))}, "
            f"p99 {_ms(lat.quantile(0.99))}, max {_ms(lat.max)} (a write caught by the failover)\n"
            f"failover              first write acknowledged by the new leader {_ms(failover)} "
            f"after the SIGKILL (the supervisor reported it after {_ms(promotion)})\n"
            f"lost / applied twice  {lost_total} / {twice_total} (on the worst node)\n"
            f"replicas identical    {'yes' if len(digests) == 1 else 'NO'}\n"
            f"result                {'OK: nothing acknowledged was lost' if ok else 'FAILED'}\n")
        out.flush()
        return 0 if ok else 1


def run_demo(seconds: float = 4.0, clients: int = 4, transport: str = "ipc",
             keep: str | None = None, out: TextIO = sys.stdout) -> int:
    """Run the demo; exit status 0 only if every acknowledged write is on
    every node exactly once.  Ctrl-C (or SIGTERM) stops it and cleans up."""
    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_term) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster = LocalCluster(keep, transport=transport, keep=keep is not None,
                           log_level="INFO")
    demo = Demo(cluster, clients, out)
    try:
        return demo.run(seconds)
    except KeyboardInterrupt:
        demo.screen.event("interrupted: stopping every process and removing "
                          + ("nothing (--keep)" if keep else str(cluster.root)))
        return 130
    except (RuntimeError, TimeoutError, ReplicationError) as exc:
        demo.screen.event(f"demo failed: {exc}")
        for name in (*NAMES, "supervisor"):
            tail = cluster.log_tail(name, 3)
            if tail:
                demo.screen.event(f"  {name}.log: {tail}")
        return 1
    finally:
        for w in demo.writers:
            w.halt.set()
        for w in demo.writers:
            w.join(timeout=15)
            w.client.close()
        cluster.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
