"""A whole cluster in one process, deterministically, in virtual time.

The real engine (:class:`~.replica.Replica`), the real supervisor runner
and a client with sessions run on the in-memory transport, each as a
*host* that the :class:`Simulation` steps when a message reaches it or a
timer it asked for is due.  Nothing reads the wall clock and every random
choice comes from the seed, so a run replays exactly.  Tests use it for
the engine's scenarios (handshake, state syncs, chains, failover, fencing)
with no sleeps and no wall-clock timeouts; ``zrepl sim`` will inject
faults into it.

    sim = Simulation(seed=1)
    a, b = sim.node("A"), sim.node("B")
    ...
    sim.run_until(lambda: a.status().follower_sync, timeout=5)   # virtual seconds
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from typing import Any, Callable

from ..core import protocol
from ..core.config import Config
from ..core.errors import NotLeader, ReplicationError, SessionExpired, Timeout
from ..core.interfaces import App
from ..core.plan import Memory
from ..core.types import NodeRole, NodeStatus
from ..storage.base import MemoryStorage
from .clock import Clock, FakeClock
from .inmem import InmemNetwork, InmemTransport
from .replica import Replica
from .supervisor import Supervisor

INF = float("inf")
MIN_DELAY = 1e-6  # seconds: the shortest wait a host gets (virtual time is a float)


class SkewedClock(Clock):
    """A host's clock that runs at ``rate`` times true (virtual) time; the
    rate may change (``set_rate``) and the reading stays continuous."""

    def __init__(self, true: FakeClock, rate: float = 1.0):
        self.true = true
        self.rate = rate
        self._base_true = true.now()
        self._base = self._base_true

    def now(self) -> float:
        return self._base + (self.true.now() - self._base_true) * self.rate

    def set_rate(self, rate: float) -> None:
        self._base, self._base_true = self.now(), self.true.now()
        self.rate = rate

    def to_true(self, seconds: float) -> float:
        """A delay on this clock, in true seconds."""
        return seconds / self.rate


class SimulationStuck(AssertionError):
    """A condition did not hold within its virtual-time budget."""


class Simulation:
    def __init__(self, seed: int = 0, latency: float = 100e-6, jitter: float = 20e-6,
                 start: float = 1000.0):
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = FakeClock(start)
        self.network = InmemNetwork(self.clock, random.Random(self.rng.getrandbits(64)),
                                    latency, jitter)
        self._hosts: dict[str, Callable[[float], float]] = {}
        self._wake: dict[str, float] = {}
        self._wants: dict[str, Callable[[], bool]] = {}
        self.nodes: dict[str, SimNode] = {}
        self.rounds = 0

    # --- hosts --------------------------------------------------------------------

    def transport(self, host: str) -> InmemTransport:
        return InmemTransport(self.network, host)

    def add_host(self, host: str, step: Callable[[float], float],
                 wants: Callable[[], bool] = lambda: False) -> None:
        self._hosts[host] = step
        self._wants[host] = wants
        self._wake[host] = self.clock.now()

    def remove_host(self, host: str) -> None:
        self._hosts.pop(host, None)
        self._wake.pop(host, None)
        self._wants.pop(host, None)

    def node(self, name: str, app: Callable[[], App] | None = None, *,
             clock: SkewedClock | None = None, storage: MemoryStorage | None = None,
             **settings: Any) -> "SimNode":
        """A node (started) named ``name``; ``clock`` (default: true time)
        and ``storage`` (default: a MemoryStorage) for fault injection."""
        n = SimNode(self, name, app, Config(**{**SIM_DEFAULTS, **settings}), clock, storage)
        self.nodes[name] = n
        return n.start()

    def supervisor(self, nodes: list["SimNode"], *, clock: SkewedClock | None = None,
                   **settings: Any) -> "SimSupervisor":
        return SimSupervisor(self, nodes, Config(**{**SIM_DEFAULTS, **settings}), clock)

    def client(self, nodes: list["SimNode"], name: str = "client", **kw: Any) -> "SimClient":
        return SimClient(self, name, [n.address for n in nodes], **kw)

    # --- the supervisor's job, by hand -------------------------------------------------

    def chain(self, nodes: list["SimNode"], leader_id: int = 1, wait: bool = True) -> None:
        """Roles and links for nodes[0] -> nodes[1] -> ...: FORWARDER in the
        middle, FOLLOWER at the tail; then (``wait``) run until every link
        is synchronous."""
        for i, n in enumerate(nodes[1:], 1):
            n.replica.set_role(NodeRole.FORWARDER if i < len(nodes) - 1 else NodeRole.FOLLOWER,
                               leader_id)
            n.replica.set_leader(nodes[i - 1].address)
        nodes[0].replica.set_role(NodeRole.LEADER, leader_id)
        for up, down in zip(nodes, nodes[1:]):
            up.replica.set_follower(down.address)
        if wait:
            self.run_until(lambda: all(n.status().follower_sync for n in nodes[:-1]), 30,
                           "every link of the chain synchronous")

    def leader_of(self, nodes: list["SimNode"]) -> "SimNode | None":
        """The running node that leads the highest epoch."""
        best = None
        for n in nodes:
            if n.running and n.replica.core.role == NodeRole.LEADER and \
                    (best is None or n.replica.core.leader_id > best.replica.core.leader_id):
                best = n
        return best

    def healthy_chain(self, nodes: list["SimNode"]) -> list["SimNode"] | None:
        """[leader, forwarders..., follower] when ``nodes`` form one chain of
        synchronous links."""
        leader = self.leader_of(nodes)
        if leader is None:
            return None
        by_address = {n.address: n for n in nodes if n.running}
        chain = [leader]
        while True:
            core = chain[-1].replica.core  # (cheaper than a status: run_until asks often)
            if not core.link.address:
                break
            if not core.follower_synchronous() or core.link.address not in by_address:
                return None
            chain.append(by_address[core.link.address])
        return chain if len(chain) == len(nodes) else None

    # --- time -----------------------------------------------------------------------

    def run_once(self, limit: float = INF) -> bool:
        """Deliver what is due and step every host that has something to
        do; when nobody has, move the clock to the next event.  False when
        nothing will happen again before ``limit`` (the clock then stays)."""
        self.rounds += 1
        now = self.clock.now()
        net = self.network
        net.deliver(now)
        woken = net.woken
        ran = False
        for host in sorted(self._hosts):
            if not (host in woken or self._wake[host] <= now or self._wants[host]()):
                continue
            busy = net.busy_until.get(host, 0.0)
            if busy > now:
                self._wake[host] = min(self._wake[host], busy) if host not in woken else busy
                continue
            woken.discard(host)
            delay = self._hosts[host](now)
            if 0.0 < delay < MIN_DELAY:
                delay = MIN_DELAY  # (a timer due in a rounding error: now + delay == now)
            self._wake[host] = now + delay if delay != INF else INF
            ran = True
        if ran:
            return True
        later = [t for t in self._wake.values() if t > now]
        t = min([net.next_delivery()] + later)
        if t == INF or t > limit:
            return False
        self.clock.set(max(t, now))
        return True

    def run_until(self, cond: Callable[[], Any], timeout: float = 10.0, what: str = "",
                  max_rounds: int = 2_000_000) -> Any:
        """Run until ``cond()`` is true; SimulationStuck after ``timeout``
        virtual seconds (or ``max_rounds`` rounds)."""
        deadline = self.clock.now() + timeout
        start_rounds = self.rounds
        still, still_since = self.clock.now(), self.rounds
        while True:
            value = cond()
            if value:
                return value
            now = self.clock.now()
            if now > deadline or self.rounds - start_rounds > max_rounds:
                raise SimulationStuck(f"seed {self.seed}: not within {timeout:g} virtual "
                                      f"seconds: {what or cond}")
            if now != still:
                still, still_since = now, self.rounds
            elif self.rounds - still_since > 100_000:
                raise SimulationStuck(f"seed {self.seed}: time stands still at {now} (a host "
                                      f"asks to run again at once, forever): {what or cond}")
            if not self.run_once():
                raise SimulationStuck(f"seed {self.seed}: nothing left to happen: "
                                      f"{what or cond}")

    def run_for(self, seconds: float) -> None:
        """Run until ``seconds`` of virtual time have passed."""
        end = self.clock.now() + seconds
        while self.run_once(limit=end):
            pass
        self.clock.set(max(self.clock.now(), end))

    def close(self) -> None:
        for n in list(self.nodes.values()):
            n.crash()


SIM_DEFAULTS: dict[str, Any] = {"checkpoint_entries": 0, "checkpoint_interval": 0,
                                "fsync": "off"}


def _default_app() -> App:
    from workers.kv import KV  # the reference App
    return KV()


class SimNode:
    """A node of the simulation: a Replica on the in-memory transport over a
    MemoryStorage that survives its crashes."""

    def __init__(self, sim: Simulation, name: str, app: Callable[[], App] | None,
                 config: Config, clock: SkewedClock | None = None,
                 storage: MemoryStorage | None = None):
        self.sim = sim
        self.name = name
        self.address = f"ipc://sim/{name}"
        self.make_app = app or _default_app
        self.config = config
        self.clock = clock
        self.storage = storage or MemoryStorage(clock=lambda: int(sim.clock.now() * 1e9),
                                                checkpoints=True)
        self.replica: Replica | None = None
        self.transport: InmemTransport | None = None
        self.starts = 0
        self.boot = "boot-1"  # its machine's boot id: a power loss reboots it

    @property
    def app(self) -> Any:
        assert self.replica is not None
        return self.replica.app

    def start(self) -> "SimNode":
        assert self.replica is None, f"{self.name} is running"
        self.starts += 1
        self.transport = self.sim.transport(self.address)
        self.replica = Replica(self.make_app(), self.storage, self.address, self.config,
                               transport=self.transport, clock=self.clock or self.sim.clock,
                               rng=random.Random(self.sim.rng.getrandbits(64)),
                               snapshots="copy", boot_id=lambda: self.boot).start()
        r = self.replica
        self.sim.add_host(self.address, _on_own_clock(r.step, self.clock),
                          lambda: r._wants_step)
        return self

    def crash(self) -> None:
        """Gone at once: no goodbye, its endpoints vanish, what it stored stays."""
        if self.replica is None:
            return
        self.sim.remove_host(self.address)
        self.transport.close()  # type: ignore[union-attr]
        self.replica.downstream.close()  # ends a state sync's copy
        self.replica = None

    def restart(self) -> "SimNode":
        self.crash()
        return self.start()

    @property
    def running(self) -> bool:
        return self.replica is not None

    def status(self) -> NodeStatus:
        assert self.replica is not None, f"{self.name} is down"
        return self.replica.status()

    def state(self) -> dict:
        return dict(self.app.data)

    def digest(self) -> dict:
        assert self.replica is not None, f"{self.name} is down"
        return self.replica.control.op_state_digest()

    @property
    def position(self) -> int:
        assert self.replica is not None, f"{self.name} is down"
        return self.replica.core.position


def _on_own_clock(step: Callable[[float], float], clock: SkewedClock | None
                  ) -> Callable[[float], float]:
    """A host's step for the simulation, which speaks true time: the host
    reads its own clock and its delays are converted back."""
    if clock is None:
        return step
    return lambda now: step(clock.now()) / clock.rate


class _StateInMemory(Supervisor):
    """A supervisor whose state file is a dict that outlives its crashes."""

    def __init__(self, saved: dict, *args: Any, **kw: Any):
        self._saved = saved
        super().__init__(*args, **kw)

    def _load_state(self) -> Memory:
        return Memory.from_persisted(self._saved["state"]) if "state" in self._saved \
            else Memory()

    def _save_state(self) -> None:
        self._saved["state"] = self.memory.persisted()


class SimSupervisor:
    def __init__(self, sim: Simulation, nodes: list[SimNode], config: Config,
                 clock: SkewedClock | None = None):
        self.sim = sim
        self.nodes = nodes
        self.config = config
        self.clock = clock
        self.host = "sim-supervisor"
        self.saved: dict = {}  # its state file
        self.sup: Supervisor | None = None
        self.start()

    def start(self) -> "SimSupervisor":
        self.sup = _StateInMemory(self.saved, [n.address for n in self.nodes],
                                  config=self.config, transport=self.sim.transport(self.host),
                                  clock=self.clock or self.sim.clock)
        self.sim.add_host(self.host, _on_own_clock(self.sup.step, self.clock))
        return self

    @property
    def running(self) -> bool:
        return self.sup is not None

    def crash(self) -> None:
        if self.sup is not None:
            self.sim.remove_host(self.host)
            self.sup.transport.close()
            self.sup = None

    def status(self) -> dict:
        assert self.sup is not None
        return self.sup.status()


@dataclass
class Op:
    """One command (or read) a client submitted, and what became of it."""
    data: bytes
    seq: int
    invoked: float
    completed: float = 0.0
    code: int | None = None
    error: ReplicationError | None = None
    node: str = ""  # who answered
    query: bool = False  # a read (App.query): ``answer`` holds the reply
    leader_only: bool = False
    answer: bytes | None = None
    client: bytes = b""  # the session (client id) it was submitted under

    @property
    def done(self) -> bool:
        return self.completed > 0.0


class SimClient:
    """``zrepl.Client``'s behaviour as a host of the simulation: one command
    at a time, the known leader first, redirects followed, retried with the
    same (client id, sequence) until ``retry_for`` runs out, so a command is
    never applied twice."""

    def __init__(self, sim: Simulation, name: str, addresses: list[str],
                 timeout: float = 0.5, retry_for: float = 10.0, max_pause: float = 0.05):
        self.sim = sim
        self.host = f"sim-client/{name}"
        self.addresses = addresses
        self.timeout = timeout
        self.retry_for = retry_for
        self.max_pause = max_pause
        self.client_id = sim.rng.getrandbits(128).to_bytes(16, "big")
        self.transport = sim.transport(self.host)
        self._requesters: dict[str, Any] = {}
        self.queue: collections.deque[Op] = collections.deque()
        self.ops: list[Op] = []
        self.acked: list[Op] = []  # commands confirmed, in the order their answers came
        self.leader = ""
        self._seq = 0
        self._ids = 0
        self._current: Op | None = None
        self._round: list[str] = []  # candidates left in this round of attempts
        self._tried: set[str] = set()
        self._timed_out: dict[str, float] = {}  # address -> when it last did not answer
        self._waiting: tuple[str, int, float] | None = None  # (address, request id, deadline)
        self._next_try = 0.0
        self._pause = 0.01
        self._give_up = 0.0
        self.generator: Callable[[int], bytes] | None = None  # keeps writing when set
        self._written = 0
        sim.add_host(self.host, self.step, lambda: False)

    def new_session(self) -> None:
        """Go on as a new ``zrepl.Client`` would: a fresh client id, its
        sequence from 1 (for commands submitted from now on)."""
        self.client_id = self.sim.rng.getrandbits(128).to_bytes(16, "big")
        self._seq = 0

    def submit(self, data: bytes) -> Op:
        self._seq += 1
        op = Op(data, self._seq, self.sim.clock.now(), client=self.client_id)
        self.queue.append(op)
        self.ops.append(op)
        return op

    def query(self, request: bytes, leader_only: bool = False) -> Op:
        """A read, queued behind the commands before it."""
        op = Op(request, 0, self.sim.clock.now(), query=True, leader_only=leader_only)
        self.queue.append(op)
        self.ops.append(op)
        return op

    def keep_writing(self, make: Callable[[int], bytes]) -> None:
        """Submit ``make(i)`` for i = 0, 1, ... one after the other."""
        self.generator = make

    def stop_writing(self) -> None:
        self.generator = None


    def _requester(self, address: str) -> Any:
        r = self._requesters.get(address)
        if r is None:
            r = self._requesters[address] = self.transport.requester(
                protocol.endpoints(address).client, Config())
        return r

    def _drop(self, address: str) -> None:
        r = self._requesters.pop(address, None)
        if r is not None:
            r.close()

    def _candidates(self, now: float) -> list[str]:
        """The known leader first; a node that did not answer lately is
        skipped for a while (as ``zrepl.Client`` does)."""
        fresh = [a for a in self.addresses
                 if now - self._timed_out.get(a, -1e9) > self.timeout * 2]
        return ([self.leader] if self.leader in fresh else []) + \
            [a for a in fresh if a != self.leader]

    def step(self, now: float) -> float:
        if self._current is None:
            if not self.queue and self.generator is not None:
                self.submit(self.generator(self._written))
                self._written += 1
            if not self.queue:
                return INF
            self._current = self.queue.popleft()
            self._current.invoked = now
            self._give_up = now + self.retry_for
            self._tried = set()
            self._round = self._candidates(now)
            self._pause = 0.01
            self._next_try = now
            self._maybe = 0  # requests of it that may have been applied
        op = self._current
        if self._waiting is not None:
            address, rid, deadline = self._waiting
            raw = self._requesters[address].recv()
            if raw is None:
                if now < deadline:
                    return deadline - now
                self._waiting = None
                self._maybe += 1
                self._drop(address)
                self._timed_out[address] = now
                if self.leader == address:
                    self.leader = ""
                return self._next_in_round(op, now)
            self._waiting = None
            got, code, err = protocol.parse_submit_reply(raw)
            if err is None and got == rid:
                if op.query:
                    op.answer = code
                else:
                    op.code = code
                    self.acked.append(op)
                op.completed, op.node = now, address
                self.leader = address
                self._current = None
                return 0.0
            if isinstance(err, NotLeader):
                hint = err.leader_address
                if hint in self.addresses and hint in self._candidates(now) and \
                        hint not in self._round and hint not in self._tried:
                    self._round.insert(0, hint)  # follow the redirect
                return self._next_in_round(op, now)
            if isinstance(err, Timeout):
                self._maybe += 1
                self.leader = address  # the leader, not ready to answer: retry there
                return self._end_round(op, now, err)
            if isinstance(err, SessionExpired) and not op.query and not self._maybe:
                # forgotten, and nothing of it applied: a new session (as
                # zrepl.Client does)
                self.new_session()
                self._seq += 1
                op.client, op.seq = self.client_id, self._seq
                self._round.insert(0, address)
                self._tried.discard(address)
                return self._next_in_round(op, now)
            op.error, op.completed, op.node = err, now, address  # retrying cannot change it
            self._current = None
            return 0.0
        if now < self._next_try:
            return self._next_try - now
        return self._next_in_round(op, now)

    def _next_in_round(self, op: Op, now: float) -> float:
        while self._round:
            address = self._round.pop(0)
            if address in self._tried:
                continue
            self._tried.add(address)
            self._ids += 1
            self._requester(address).send(
                protocol.query_request(self._ids, op.data, op.leader_only) if op.query else
                protocol.submit_request(self._ids, op.data, op.client, op.seq))
            self._waiting = (address, self._ids, now + self.timeout)
            return self.timeout
        return self._end_round(op, now)

    def _end_round(self, op: Op, now: float, last: ReplicationError | None = None) -> float:
        if now >= self._give_up:
            if op.query and last is not None:
                op.error = last  # a read: what the node said (as Client.query)
            else:
                op.error = Timeout(f"not confirmed within {self.retry_for:g}s (outcome unknown)")
            op.completed = now
            self._current = None
            return 0.0
        self._tried = set()
        self._round = self._candidates(now)
        self._next_try = now + self._pause
        self._pause = min(self._pause * 2, self.max_pause)
        return self._next_try - now


def kv_set(key: str, value: Any) -> bytes:
    from workers.kv import encode
    return encode(("set", key, value))


__all__ = ["Simulation", "SimNode", "SimSupervisor", "SimClient", "Op", "SimulationStuck",
           "NodeRole", "kv_set"]
