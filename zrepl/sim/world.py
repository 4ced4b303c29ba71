"""One seeded run of a whole cluster under faults, and its invariants.

A :class:`Run` builds N nodes (the real :class:`~zrepl.engine.replica.
Replica`), the real supervisor and clients with sessions on the in-memory
transport (:mod:`zrepl.engine.simulation`), then for ``steps`` scheduler
rounds injects faults drawn from the seed, checking invariants after every
round; then it heals everything, lets the cluster converge (*quiesce*) and
checks the end state.  Every random choice comes from the seed, so a run
replays exactly: the trace (faults, appointments, the engines' own log
lines, client outcomes) hashes to the same value every time.

Faults (``FAULT_KINDS``), each with a duration, then healed:

``delay``      extra latency up to 0.5 s on one link (messages of one
               connection stay in order; different connections reorder)
``drop``       messages on one link lost with a probability
``dup``        client requests delivered twice (a retry racing its original)
``partition``  one node isolated, a one-way cut, the supervisor cut off,
               the leader cut from its follower only, a chain cut in the
               middle
``crash``      a node or the supervisor killed and restarted: nothing
               written is lost (the kernel holds it)
``power``      a node's machine loses power: its WAL keeps what the fsync
               policy made durable plus a torn part of the rest
``pause``      a node stops the world for 1.2 to 4 leases, then resumes
``skew``       a node's or the supervisor's clock runs up to ``skew`` (5 %)
               fast or slow
``disk``       a node's WAL writes fail (ENOSPC) or its fsync fails (EIO)
``slow``       a node's WAL writes or its App's applies take 5 to 50 ms

Opt-in (``--faults ...,switchover``; not in the default mix, whose seeds
the regression list pins):

``switchover`` an operator asks the supervisor for a planned switchover,
               to a random node or to the leader's synchronous follower,
               within 0.2 to 3 s (it may be refused, or given up)
``member``     an operator removes a node from the membership (it may be
               refused, or given up), and adds it back when the fault heals

At most one machine may have lost unsynced data (``power``) at a time: two
power losses before the cluster has healed can lose acknowledged writes
with ``fsync="batch"`` by design (both copies were in page caches).
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import logging
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..core import protocol
from ..core.errors import ReplicationError, SessionExpired, Timeout
from ..core.session import unwrap
from ..core.types import NodeRole, WALEntry
from ..engine.applier import state_digest
from ..engine.simulation import INF, SimNode, SkewedClock, Simulation
from . import history
from .storage import SimStorage
from .workload import Planned, Workload, workload_for

FAULT_KINDS = ("delay", "drop", "dup", "partition", "crash", "power", "pause", "skew", "disk",
               "slow")
EXTRA_FAULT_KINDS = ("switchover", "member")
SUPERVISOR = "sim-supervisor"


@dataclass
class Settings:
    nodes: int = 3
    app: str = "workers.kv:KV"
    faults: tuple[str, ...] = FAULT_KINDS
    steps: int = 20_000  # scheduler rounds under faults
    clients: int = 3
    fault_gap: float = 0.6  # mean virtual seconds between two faults
    fsync: str = "batch"
    skew: float = 0.05  # clock rates within 1 +- skew
    think: float = 0.01  # a client's longest pause between two operations
    quiesce: float = 60.0  # virtual seconds the healed cluster gets to converge
    max_sessions: int = 0  # 0: clients + 2 (clients also start new sessions)
    new_sessions: float = 0.005  # chance a client starts a new session before an operation
    session_expiry: float = 6.0  # above the clients' retry_for, as the docs require
    client_retry_for: float = 5.0
    config: dict = field(default_factory=dict)  # more zrepl.Config settings for every node


@dataclass
class Fault:
    at: float  # virtual seconds after the run began
    kind: str
    target: tuple[str, ...]
    duration: float
    params: dict = field(default_factory=dict)

    def __str__(self) -> str:
        args = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in sorted(self.params.items()))
        return (f"{self.kind} {'->'.join(self.target)} for {self.duration:.3f}s"
                + (f" ({args})" if args else ""))


@dataclass
class Violation:
    invariant: str
    detail: str
    at: float

    def __str__(self) -> str:
        return f"[{self.invariant}] at {self.at:.4f}: {self.detail}"


@dataclass
class Result:
    seed: int
    steps: int = 0
    simulated: float = 0.0  # virtual seconds
    faults: collections.Counter = field(default_factory=collections.Counter)
    script: list[Fault] = field(default_factory=list)
    ops: collections.Counter = field(default_factory=collections.Counter)
    violations: list[Violation] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    trace_hash: str = ""
    undecided: int = 0  # linearizability checks that ran out of budget

    @property
    def ok(self) -> bool:
        return not self.violations


def load_app(spec: str) -> type:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--app takes MODULE:CLASS, got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the working directory, as python3 -m does
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"cannot import {module!r}: {exc}") from None
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{module!r} has no {name!r}")
    return obj


class _TraceHandler(logging.Handler):
    """The engines' log lines, in the trace, stamped with virtual time."""

    def __init__(self, run: "Run"):
        super().__init__(logging.INFO)
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        self.run.note("log", f"{record.levelname} {record.getMessage()}")


class Run:
    def __init__(self, seed: int, settings: Settings | None = None,
                 script: list[Fault] | None = None):
        self.seed = seed
        self.settings = s = settings or Settings()
        self.script = None if script is None else sorted(script, key=lambda f: f.at)
        rng = random.Random(seed)
        self.fault_rng = random.Random(rng.getrandbits(64))
        self.net_rng = random.Random(rng.getrandbits(64))
        self.work_rng = random.Random(rng.getrandbits(64))
        self.crash_rng = random.Random(rng.getrandbits(64))
        self.sim = Simulation(seed=rng.getrandbits(64))
        self.t0 = self.sim.clock.now()
        self.result = Result(seed)
        self.app_cls = load_app(s.app)
        self.workload: Workload = workload_for(self.app_cls, self.work_rng, s.clients)
        self.node_settings = dict(require_sync=True, lease_required=True, fsync=s.fsync,
                                  max_sessions=s.max_sessions or s.clients + 2,
                                  session_expiry=s.session_expiry, **s.config)
        self.clocks: dict[str, SkewedClock] = {}
        self.nodes: list[SimNode] = []
        self.by_host: dict[str, SimNode] = {}
        self.appointed: dict[int, tuple[str, float]] = {}  # epoch -> (node, true time)
        self.admitters: dict[int, str] = {}  # epoch -> the node that admitted writes in it
        self.top_epoch = 0
        self.link_faults: dict[tuple[str, str], tuple[str, float]] = {}
        self.dup: float = 0.0
        self.active: list[tuple[float, Fault]] = []  # (ends at, fault)
        self.down: set[str] = set()
        self.paused: set[str] = set()
        self.power_lost: set[str] = set()  # lost unsynced data and not yet healed
        self._restart_at: dict[str, float] = {}  # engines that stopped themselves
        self.slow_apply: dict[str, float] = {}
        self.client_endpoints: set[str] = set()
        self.control_endpoints: dict[str, str] = {}  # -> node address
        self.history: list[tuple[int, Planned, Any]] = []  # (client, planned, Op)
        self._open: list[tuple[int, Planned, Any]] = []  # not yet completed
        self._checked: dict[tuple, int] = {}
        self._acked_unique: list[Any] = []
        self._seen_violation: set[str] = set()

    # --- the trace ------------------------------------------------------------------

    def now(self) -> float:
        return self.sim.clock.now() - self.t0

    def note(self, kind: str, text: str) -> None:
        self.result.trace.append(f"{self.now():.6f} {kind} {text}")

    def violate(self, invariant: str, detail: str) -> None:
        key = f"{invariant}:{detail}"
        if key in self._seen_violation:
            return
        self._seen_violation.add(key)
        v = Violation(invariant, detail, self.now())
        self.result.violations.append(v)
        self.note("VIOLATION", str(v))

    # --- building the cluster ---------------------------------------------------------

    def build(self) -> None:
        s = self.settings
        sim = self.sim
        sim.network.faults = self._net_fault
        for i in range(1, s.nodes + 1):
            name = f"n{i}"
            clock = self.clocks[name] = SkewedClock(sim.clock)
            storage = SimStorage(sim.clock.now, s.fsync, 0.02)
            node = sim.node(name, self.app_cls, clock=clock, storage=storage,
                            **self.node_settings)
            storage.charge = (lambda host: lambda sec: sim.network.charge(host, sec))(
                node.address)
            self.nodes.append(node)
            self.by_host[node.address] = node
            self.client_endpoints.add(protocol.endpoints(node.address).client)
            self.control_endpoints[protocol.endpoints(node.address).control] = node.address
            self._instrument(node)
        self.clocks[SUPERVISOR] = SkewedClock(sim.clock)
        self.supervisor = sim.supervisor(self.nodes, clock=self.clocks[SUPERVISOR],
                                         **self.node_settings)
        self.clients = [sim.client(self.nodes, f"c{i}", timeout=0.3, retry_for=s.client_retry_for)
                        for i in range(s.clients)]
        self._client_next = [0.0] * s.clients

    def _instrument(self, node: SimNode) -> None:
        """Hooks into a (re)started node: a write or leader read admitted
        under the lease is checked against the supervisor's appointments;
        a completed state sync adopts its upstream's log; slow applies."""
        r = node.replica
        core = r.core
        real_check = core.check_writable
        run = self

        def check_writable(now: float) -> None:
            real_check(now)
            run._admitted(node, core.leader_id)
        core.check_writable = check_writable  # type: ignore[method-assign]

        real_commit = core._commit

        def commit(batch: Any) -> list:
            out = real_commit(batch)
            if core.role == NodeRole.LEADER and not batch.failed:
                run._committed(node, batch.last)
            return out
        core._commit = commit  # type: ignore[method-assign]

        real_end = r._handlers[_EndStateIn]

        def end_state_in(e: Any) -> None:
            real_end(e)
            if e.ok:
                up = self.by_host.get(core.leader_address)
                if up is not None:
                    node.storage.adopt(up.storage.archive, e.wal_id)  # type: ignore[attr-defined]
                self.note("sync", f"{node.name} received a state sync at WAL id {e.wal_id} "
                                  f"from {up.name if up else core.leader_address}")
        r._handlers[_EndStateIn] = end_state_in

        app = r.applier.app
        real_apply = app.apply

        def apply(cmds: list) -> list[int]:
            slow = self.slow_apply.get(node.address, 0.0)
            if slow:
                self.sim.network.charge(node.address, slow)
            return real_apply(cmds)
        app.apply = apply  # type: ignore[method-assign]

    # --- invariants checked as it runs ---------------------------------------------------

    def _admitted(self, node: SimNode, epoch: int) -> None:
        """A node admitted a write (or a leader read) under its lease in
        ``epoch``: no leader of a later epoch may have been appointed
        before now (true time) - the supervisor appoints one only once it
        counts the old lease as expired."""
        now = self.sim.clock.now()
        first = self.admitters.setdefault(epoch, node.address)
        if first != node.address:
            self.violate("epochs", f"{node.name} and {self.by_host[first].name} both admit "
                                   f"writes in epoch {epoch}")
        for e, (who, at) in self.appointed.items():
            if e > epoch and at < now and who != node.address:
                self.violate("lease", f"{node.name} admits writes in epoch {epoch} at "
                                      f"{now - self.t0:.4f}, after {self.by_host[who].name} "
                                      f"was made leader of epoch {e} at {at - self.t0:.4f}")
                return

    def _committed(self, leader: SimNode, last: int) -> None:
        """THE MEANING OF AN ACKNOWLEDGEMENT: a leader confirms a batch only
        once every node of its synchronous chain holds it.  The chain is
        walked as the nodes claim it now (``follower_synchronous``), each
        link to the incarnation of the follower its stream reached."""
        core = leader.replica.core
        up, seen = core, {leader.address}
        while up.follower_synchronous():
            nxt = self.by_host.get(up.link.address)
            if nxt is None or not nxt.running or nxt.address in seen:
                return
            down = nxt.replica.core
            if down.up_stream != up.link.stream or down.leader_id != core.leader_id:
                return  # (a restarted follower: this link's claim is about its old self)
            if down.position < last:
                self.violate("chain", f"{leader.name} confirmed WAL up to {last} in epoch "
                                      f"{core.leader_id} while {nxt.name}, synchronous in its "
                                      f"chain, holds {down.position}")
                return
            seen.add(nxt.address)
            up = down

    def _appointment(self, node_host: str, epoch: int) -> None:
        who = self.by_host[node_host].name
        prior = self.appointed.get(epoch)
        if prior is not None and prior[0] != node_host:
            self.violate("epochs", f"epoch {epoch} given to {who} and to "
                                   f"{self.by_host[prior[0]].name}")
        elif prior is None:
            if epoch <= self.top_epoch:
                self.violate("epochs", f"epoch {epoch} issued after epoch {self.top_epoch}")
            self.top_epoch = max(self.top_epoch, epoch)
            self.appointed[epoch] = (node_host, self.sim.clock.now())
            self.note("appoint", f"{who} leader of epoch {epoch}")

    def _check_round(self) -> None:
        """After every round: a node that may accept writes holds every
        write acknowledged so far (the workload's write-once keys)."""
        acked = self._acked_unique
        for n in self.nodes:
            if not n.running or n.address in self.paused:
                continue
            core = n.replica.core
            if core.role != NodeRole.LEADER:
                continue
            try:
                type(core).check_writable(core, self.clocks[n.name].now())
            except ReplicationError:
                continue
            key = (n.name, n.starts, core.leader_id)
            done = self._checked.get(key, 0)
            if done < len(acked):
                app = n.replica.applier.app
                for ukey in acked[done:]:
                    if not self.workload.holds(app, ukey):
                        self.violate("lost", f"{n.name} accepts writes in epoch "
                                             f"{core.leader_id} without acknowledged {ukey!r}")
                        break
                self._checked[key] = len(acked)

    def _check_histories(self) -> None:
        first: dict[int, tuple[int, str]] = {}
        for n in self.nodes:
            if not n.running:
                continue
            for epoch, start in n.replica.core.history:
                seen = first.get(epoch)
                if seen is None:
                    first[epoch] = (start, n.name)
                elif seen[0] != start:
                    self.violate("epochs", f"epoch {epoch} begins at WAL id {seen[0]} on "
                                           f"{seen[1]} but at {start} on {n.name}")

    # --- the network's faults ---------------------------------------------------------

    def _net_fault(self, src: str, dst: str, endpoint: str, item: Any) -> list[float]:
        if src == SUPERVISOR and isinstance(item, tuple) and item[0] == "req" and \
                endpoint in self.control_endpoints:
            self._tap_supervisor(self.control_endpoints[endpoint], item[3])
        delays = [0.0]
        f = self.link_faults.get((src, dst))
        if f is not None:
            kind, amount = f
            if kind == "drop" and self.net_rng.random() < amount:
                return []
            if kind == "delay":
                delays = [self.net_rng.random() * amount]
        if self.dup and endpoint in self.client_endpoints and isinstance(item, tuple) \
                and item[0] == "req" and self.net_rng.random() < self.dup:
            delays.append(delays[0] + self.net_rng.random() * 0.2)
        return delays

    def _tap_supervisor(self, dst: str, payload: bytes) -> None:
        try:
            op, args = protocol.parse_control_request(payload)
        except ReplicationError:
            return
        if op == "set_role" and args.get("role") == int(NodeRole.LEADER):
            self._appointment(dst, int(args["leader_id"]))

    # --- injecting faults -----------------------------------------------------------------

    def _hosts(self) -> list[str]:
        return [n.address for n in self.nodes]

    def _leader(self) -> SimNode | None:
        return self.sim.leader_of([n for n in self.nodes if n.running])

    def _chain(self) -> list[SimNode]:
        leader = self._leader()
        chain = [leader] if leader else []
        while chain:
            nxt = self.by_host.get(chain[-1].replica.core.link.address)
            if nxt is None or nxt in chain or not nxt.running:
                break
            chain.append(nxt)
        return chain

    def _draw(self) -> Fault | None:
        """A fault, its targets resolved against the cluster as it is now."""
        rng = self.fault_rng
        kinds = list(self.settings.faults)
        kind = rng.choice(kinds)
        at = self.now()
        names = [n.name for n in self.nodes]
        up = [n.name for n in self.nodes if n.running and n.name not in self.paused]
        if kind in ("delay", "drop"):
            a, b = rng.sample(names + ["supervisor"], 2)
            amount = rng.uniform(0.01, 0.5) if kind == "delay" else rng.uniform(0.05, 0.5)
            return Fault(at, kind, (a, b), rng.uniform(0.3, 3.0), {"amount": amount})
        if kind == "dup":
            return Fault(at, kind, ("clients",), rng.uniform(0.5, 3.0),
                         {"p": rng.uniform(0.1, 0.5)})
        if kind == "partition":
            shape = rng.choice(["isolate", "oneway", "supervisor", "leader-follower",
                                "chain-middle"])
            chain = [n.name for n in self._chain()]
            if shape == "isolate":
                target: tuple = (rng.choice(names),)
            elif shape == "oneway":
                target = tuple(rng.sample(names + ["supervisor"], 2))
            elif shape == "supervisor":
                target = ("supervisor",)
            elif shape == "leader-follower" and len(chain) >= 2:
                target = (chain[0], chain[1])
            elif shape == "chain-middle" and len(chain) >= 3:
                mid = len(chain) // 2
                target = (chain[mid - 1], chain[mid])
            else:
                shape, target = "isolate", (rng.choice(names),)
            return Fault(at, kind, target, rng.uniform(0.3, 4.0), {"shape": shape})
        if kind == "crash":
            victim = rng.choice(names + ["supervisor"])
            return Fault(at, kind, (victim,), rng.uniform(0.1, 3.0))
        if kind == "power":
            if self.power_lost or not up:
                return None
            return Fault(at, kind, (rng.choice(up),), rng.uniform(0.1, 3.0))
        if kind == "pause":
            if not up:
                return None
            lease = self.nodes[0].config.lease
            return Fault(at, kind, (rng.choice(up),), rng.uniform(1.2, 4.0) * lease)
        if kind == "skew":
            who = rng.choice(names + ["supervisor"])
            rate = 1.0 + rng.uniform(-1.0, 1.0) * self.settings.skew
            return Fault(at, kind, (who,), rng.uniform(1.0, 10.0), {"rate": rate})
        if kind == "disk":
            return Fault(at, kind, (rng.choice(names),), rng.uniform(0.05, 1.0),
                         {"fail": rng.choice(["write", "fsync"])})
        if kind == "member":
            return Fault(at, kind, (rng.choice(names),), rng.uniform(0.5, 5.0),
                         {"timeout": rng.uniform(0.2, 3.0)})
        if kind == "switchover":
            return Fault(at, kind, (rng.choice(names + ["sync"]),), 0.01,
                         {"timeout": rng.uniform(0.2, 3.0)})
        if kind == "slow":
            return Fault(at, kind, (rng.choice(names),), rng.uniform(0.5, 3.0),
                         {"what": rng.choice(["write", "apply"]),
                          "seconds": rng.uniform(0.005, 0.05)})
        raise AssertionError(kind)

    def _host(self, name: str) -> str:
        if name == "supervisor":
            return SUPERVISOR
        return f"ipc://sim/{name}"

    def _node(self, name: str) -> SimNode:
        return self.by_host[self._host(name)]

    def inject(self, f: Fault) -> None:
        net = self.sim.network
        t = f.target
        if f.kind in ("crash", "power", "pause") and (t[0] in self.down or t[0] in self.paused):
            return  # already down: nothing happens
        if f.kind == "power" and self.power_lost:
            return
        self.result.faults[f.kind] += 1
        self.result.script.append(f)
        self.note("fault", str(f))
        if f.kind in ("delay", "drop"):
            self.link_faults[(self._host(t[0]), self._host(t[1]))] = (f.kind, f.params["amount"])
        elif f.kind == "dup":
            self.dup = f.params["p"]
        elif f.kind == "partition":
            for a, b, both in self._cuts(f):
                net.cut(a, b, both)
        elif f.kind == "crash":
            self.down.add(t[0])
            if t[0] == "supervisor":
                self.supervisor.crash()
            else:
                self._node(t[0]).crash()
        elif f.kind == "power":
            node = self._node(t[0])
            node.crash()
            lost = node.storage.power_loss(self.crash_rng)  # type: ignore[attr-defined]
            node.boot = f"boot-{self.result.faults['power'] + 1}"
            self.down.add(t[0])
            self.power_lost.add(t[0])
            self.note("power", f"{t[0]} lost {lost} unsynced WAL entries")
        elif f.kind == "pause":
            self.paused.add(t[0])
            net.charge(self._host(t[0]), f.duration)
        elif f.kind == "skew":
            self.clocks[t[0] if t[0] != "supervisor" else SUPERVISOR].set_rate(f.params["rate"])
        elif f.kind == "disk":
            self._node(t[0]).storage.fail = f.params["fail"]  # type: ignore[attr-defined]
        elif f.kind == "member":
            sup = self.supervisor.sup
            if sup is not None and "supervisor" not in self.down:
                try:
                    sup.remove_member(self._host(t[0]), f.params["timeout"])
                    self.note("member", f"removing {t[0]}")
                except ValueError as exc:
                    self.note("member", f"removal refused: {exc}")
        elif f.kind == "switchover":
            sup = self.supervisor.sup
            if sup is not None and "supervisor" not in self.down:
                to = "" if t[0] == "sync" else self._host(t[0])
                try:
                    self.note("switchover", f"to {sup.switchover(to, f.params['timeout'])}")
                except ValueError as exc:
                    self.note("switchover", f"refused: {exc}")
        elif f.kind == "slow":
            if f.params["what"] == "write":
                self._node(t[0]).storage.slow_write = f.params["seconds"]  # type: ignore
            else:
                self.slow_apply[self._host(t[0])] = f.params["seconds"]
        self.active.append((self.sim.clock.now() + f.duration, f))

    def _rejoin(self, address: str) -> None:
        """A node removed by a ``member`` fault is a member again (a removal
        still under way is called off)."""
        sup = self.supervisor.sup
        if sup is None:
            return  # (the supervisor is down: retried at the final heal)
        sup.memory.leaving.pop(address, None)
        if address not in sup.nodes:
            sup.add_member(address)
            self.note("member", f"{address} added back")

    def _cuts(self, f: Fault) -> list[tuple[str, str, bool]]:
        shape = f.params["shape"]
        hosts = self._hosts() + [SUPERVISOR] + [c.host for c in self.clients]
        if shape == "isolate":
            x = self._host(f.target[0])
            return [(x, h, True) for h in hosts if h != x]
        if shape == "supervisor":
            return [(SUPERVISOR, h, True) for h in self._hosts()]
        if shape == "oneway":
            return [(self._host(f.target[0]), self._host(f.target[1]), False)]
        return [(self._host(f.target[0]), self._host(f.target[1]), True)]

    def heal(self, f: Fault) -> None:
        net = self.sim.network
        t = f.target
        self.note("heal", str(f))
        if f.kind in ("delay", "drop"):
            self.link_faults.pop((self._host(t[0]), self._host(t[1])), None)
        elif f.kind == "dup":
            self.dup = 0.0
        elif f.kind == "partition":
            for a, b, both in self._cuts(f):
                net._cut.discard((a, b))
                if both:
                    net._cut.discard((b, a))
        elif f.kind in ("crash", "power"):
            self.down.discard(t[0])
            if t[0] == "supervisor":
                self.supervisor.start()
            else:
                node = self._node(t[0])
                node.start()
                self._instrument(node)
        elif f.kind == "pause":
            self.paused.discard(t[0])
        elif f.kind == "skew":
            self.clocks[t[0] if t[0] != "supervisor" else SUPERVISOR].set_rate(1.0)
        elif f.kind == "disk":
            self._node(t[0]).storage.fail = ""  # type: ignore[attr-defined]
        elif f.kind == "slow":
            self._node(t[0]).storage.slow_write = 0.0  # type: ignore[attr-defined]
        elif f.kind == "member":
            self._rejoin(self._host(t[0]))
            self.slow_apply.pop(self._host(t[0]), None)

    def _heal_due(self, everything: bool = False) -> None:
        now = self.sim.clock.now()
        due = [(end, f) for end, f in self.active if everything or end <= now]
        for item in due:
            self.active.remove(item)
            self.heal(item[1])

    # --- clients -----------------------------------------------------------------------

    def _drive_clients(self, writing: bool) -> None:
        now = self.sim.clock.now()
        for i, c in enumerate(self.clients):
            if c._current is not None or c.queue:
                continue
            if not writing or now < self._client_next[i]:
                continue
            if self.work_rng.random() < self.settings.new_sessions:
                c.new_session()
            planned = self.workload.next(i)
            op = c.query(planned.data, planned.leader_only) if planned.query else \
                c.submit(planned.data)
            self.history.append((i, planned, op))
            self._open.append((i, planned, op))
            self.sim._wake[c.host] = now
            self._client_next[i] = now + self.work_rng.random() * self.settings.think

    def _collect_outcomes(self) -> None:
        """Completed operations: acknowledged write-once keys join the
        continuous check; the workload learns what its clients saw."""
        if not any(h[2].done for h in self._open):
            return
        still = []
        for h in self._open:
            i, planned, op = h
            if not op.done:
                still.append(h)
                continue
            self.workload.saw(i, planned, op)
            self.note("client", f"c{i} {'read' if op.query else '#%d' % op.seq} "
                                f"{_show(op.data)} -> "
                                f"{_outcome(op)} from {op.node.rsplit('/', 1)[-1] or '-'}")
            if planned.unique_key is not None and op.error is None and op.code == 0:
                self._acked_unique.append(planned.unique_key)
        self._open = still

    # --- the run ----------------------------------------------------------------------

    def execute(self) -> Result:
        handler = _TraceHandler(self)
        logger = logging.getLogger("zrepl")
        old_level, old_propagate = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            self.build()
            self._faulty_phase()
            self._quiesce()
        except Exception as exc:  # the engine raised where it must not: a bug
            import traceback
            self.violate("crash", f"{type(exc).__name__}: {exc} | "
                         + " | ".join(traceback.format_exc().strip().splitlines()[-6:]))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_propagate
            self.sim.close()
        r = self.result
        r.simulated = self.now()
        r.trace_hash = hashlib.sha256("\n".join(r.trace).encode()).hexdigest()[:16]
        return r

    def _faulty_phase(self) -> None:
        sim, s = self.sim, self.settings
        script = list(self.script) if self.script is not None else None
        next_fault = self.fault_rng.expovariate(1 / s.fault_gap) if s.faults else INF
        for step in range(s.steps):
            if script is not None:
                while script and script[0].at <= self.now():
                    self.inject(script.pop(0))
            elif self.now() >= next_fault:
                f = self._draw()
                if f is not None:
                    self.inject(f)
                next_fault = self.now() + self.fault_rng.expovariate(1 / s.fault_gap)
            self._heal_due()
            self._restart_stopped()
            if self.power_lost:
                self._power_healed()
            self._drive_clients(writing=True)
            sim.run_once()
            self._collect_outcomes()
            self._check_round()
            if step % 64 == 0:
                self._check_histories()
            self.result.steps += 1

    def _restart_stopped(self) -> None:
        """An engine that stopped itself (it could not persist its epoch)
        is restarted a second later, as systemd's Restart=on-failure does."""
        now = self.sim.clock.now()
        for n in self.nodes:
            if n.running and n.replica.stopped.is_set():
                self.note("stopped", f"{n.name}'s engine stopped itself: restarting it in 1 s")
                n.crash()
                self._restart_at[n.name] = now + 1.0
        for name, at in list(self._restart_at.items()):
            if now >= at:
                del self._restart_at[name]
                node = self._node(name)
                if not node.running and name not in self.down:
                    node.start()
                    self._instrument(node)

    def _power_healed(self) -> None:
        """A node that lost unsynced data is whole again once the supervisor
        saw it synchronous (or leading) since its reboot: only then may
        another machine lose power (two at once can lose acknowledged
        writes with fsync="batch", by design)."""
        sup = self.supervisor.sup
        if sup is None:
            return
        m = sup.memory
        for name in list(self.power_lost):
            node = self._node(name)
            if m.sync_boot.get(node.address) == node.boot and \
                    (node.address == m.leader or node.address in dict(m.sync_chain)):
                self.power_lost.discard(name)

    def _quiesce(self) -> None:
        sim, s = self.sim, self.settings
        self._heal_due(everything=True)
        if "member" in s.faults:
            for n in self.nodes:  # (a heal may have found the supervisor down)
                self._rejoin(n.address)
        for c in self.clocks.values():
            c.set_rate(1.0)
        self.note("quiesce", "every fault healed")
        deadline = sim.clock.now() + s.quiesce

        def converged() -> bool:
            chain = sim.healthy_chain(self.nodes)
            if not chain or any(c._current is not None or c.queue for c in self.clients):
                return False
            top = chain[0].replica.core
            return top.commit_index == top.position and \
                all(n.position == top.position for n in self.nodes)

        still, still_rounds = sim.clock.now(), 0
        while not converged():
            if sim.clock.now() != still:
                still, still_rounds = sim.clock.now(), 0
            still_rounds += 1
            if still_rounds > 50_000:
                spinning = [h for h, want in sim._wants.items() if want()]
                self.violate("liveness", f"time stands still: hosts ask to run again at once "
                                         f"forever ({spinning or 'woken by messages'})")
                return
            if sim.clock.now() > deadline:
                self.violate("liveness", f"no healthy, converged cluster {s.quiesce:g}s after "
                                         f"healing: {self._describe()}")
                return
            self._drive_clients(writing=False)
            self._restart_stopped()
            if not sim.run_once(limit=deadline):
                sim.clock.set(deadline + 1e-3)
            self._collect_outcomes()
            self._check_round()
        self.note("quiesce", "converged")
        self._final_checks()

    def _describe(self) -> str:
        """The cluster in one line (for a liveness failure)."""
        parts = []
        for n in self.nodes:
            if not n.running:
                parts.append(f"{n.name} down")
                continue
            c = n.replica.core
            parts.append(f"{n.name} {c.role.name} e{c.leader_id} at {c.position} commit "
                         f"{c.commit_index} -> {self.by_host[c.link.address].name if c.link.address in self.by_host else '-'} "
                         f"{c.link.state.name}{' spent' if c.epoch_spent else ''}")
        busy = [f"c{i}" for i, c in enumerate(self.clients) if c._current is not None or c.queue]
        sup = self.supervisor.sup
        return "; ".join(parts) + f"; clients busy {busy}; supervisor: " + \
            (sup.memory.note if sup is not None else "down")

    # --- at the end ---------------------------------------------------------------------

    def _final_checks(self) -> None:
        leader = self._leader()
        assert leader is not None
        archive = leader.storage.archive  # type: ignore[attr-defined]
        top = leader.position
        missing = [k for k in range(1, top + 1) if k not in archive]
        if missing:
            self.violate("log", f"the leader's log lacks WAL ids {missing[:5]}...")
            return
        for n in self.nodes:
            a = n.storage.archive  # type: ignore[attr-defined]
            for k in range(1, top + 1):
                if a.get(k) != archive[k]:
                    self.violate("divergence", f"{n.name}'s log differs from the leader's "
                                               f"{leader.name} at WAL id {k}")
                    break
        # replay the log on a fresh App: the state every replica must hold
        app = self.app_cls()
        datas = [archive[k] for k in range(1, top + 1)]
        app_datas, sessions = unwrap(datas)
        cmds = [app.decode_cmd(e) for e in map(WALEntry, range(1, top + 1), app_datas)]
        codes = app.apply(cmds) if cmds else []
        digest = state_digest(app)["sha256"]
        for n in self.nodes:
            d = n.digest()
            if d["sha256"] != digest:
                self.violate("state", f"{n.name}'s state differs from the replayed log "
                                      f"({d['entries']} entries, {digest[:8]} vs "
                                      f"{d['sha256'][:8]})")
        where: dict[tuple[bytes, int], list[int]] = collections.defaultdict(list)
        for i, cid, seq in sessions:
            where[(cid, seq)].append(i)
        for (cid, seq), at in where.items():
            if len(at) > 1:
                self.violate("exactly-once", f"command #{seq} of client {cid.hex()[:8]} "
                                             f"applied {len(at)} times (WAL ids "
                                             f"{[i + 1 for i in at]})")
        ops = self.result.ops
        for i, planned, op in self.history:
            if op.query:
                ops["reads_ok" if op.error is None and op.done else "reads_failed"] += 1
                continue
            if op.error is None and op.done:
                ops["ok"] += 1
                at = where.get((op.client, op.seq))
                if not at:
                    self.violate("lost", f"acknowledged command #{op.seq} of client "
                                         f"{op.client.hex()[:8]} ({_show(op.data)}) is in "
                                         "no replica's log")
                elif codes[at[0]] != op.code:
                    self.violate("codes", f"command #{op.seq} of client {op.client.hex()[:8]} "
                                          f"was answered {op.code}, the log gives "
                                          f"{codes[at[0]]}")
            elif isinstance(op.error, (Timeout, SessionExpired)) or not op.done:
                ops["unknown"] += 1
            else:
                ops["failed"] += 1
        final, accounts = self.workload.final_state(app, list(zip(cmds, codes)))
        verdict = history.check(self.workload.ops(self.history), final, accounts)
        for key in verdict.undecided:
            self.result.undecided += 1
            self.note("linearizability", key)
        for kind, text in verdict.violations:
            self.violate(_VERDICT_NAMES[kind], text)


_VERDICT_NAMES = {"lost": "lost", "duplicated": "exactly-once", "nonlinearizable": "linearizable",
                  "ledger": "app"}


def _outcome(op: Any) -> str:
    if op.error is not None:
        return f"{type(op.error).__name__}: {op.error}"[:80]
    if op.query:
        try:
            return repr(msgpack.unpackb(op.answer, raw=False))[:40]
        except Exception:  # noqa: BLE001 - only for a message
            return "?"
    return f"code {op.code}"


def _show(data: bytes) -> str:
    try:
        return repr(tuple(msgpack.unpackb(data, raw=False)))[:60]
    except Exception:  # noqa: BLE001 - only for a message
        return data[:30].hex()


from ..core.effects import EndStateIn as _EndStateIn  # noqa: E402

__all__ = ["Run", "Settings", "Fault", "Result", "Violation", "FAULT_KINDS", "load_app"]
