"""The supervisor: keeps one leader and a healthy chain behind it.

Theory of operation
-------------------

The supervisor is *level-triggered*.  Every ``heartbeat_interval`` it polls
every node's status (the poll of the leader also renews the leader's
lease), hands the observations to :func:`plan`, and performs only the calls
the plan returns.  :func:`plan` does no I/O: observed statuses and the
supervisor's memory in, calls and the new memory out.  Tests drive it with
made-up statuses, failures included.

What :func:`plan` decides, in order:

1. **Liveness.**  A node that answered is alive; one that missed
   ``missed_heartbeats`` polls in a row is dead.  In between it is
   *suspect*: nothing is changed around it yet.
2. **Who leads.**  The remembered leader while it lives.  With no memory (a
   first start, or a lost state file) the supervisor adopts a live node
   that already leads the highest epoch, or, on a fresh cluster once every
   node answered or was declared dead, makes the most advanced node
   (latest epoch, then longest WAL, then configured order) the leader.
3. **Failover.**  When the leader is dead the supervisor waits until its
   lease has surely run out (the last renewal + ``lease * lease_margin``):
   from then on the old leader accepts no write, even if it is only cut
   off.  It then promotes the node that holds every acknowledged write:
   a live member of the *synchronous chain* it last observed (the nodes
   linked to the leader through synchronous links), still obeying the
   leader's epoch and holding at least the WAL it held then.  Among those,
   the longest WAL.  If there is none it promotes nobody, says so, and
   waits.  The new epoch is larger than any issued or seen and is
   persisted before it is used.
4. **The chain.**  The leader, then the live followers in their current
   order; a node that comes back joins at the tail.  FORWARDER in the
   middle, FOLLOWER at the tail, each linked to the next.  Only calls that
   change something are issued: a node with the wrong role or an older
   epoch gets ``set_role``, a node pointing at the wrong follower gets
   ``set_follower``, and so on.  A deposed leader that returns is just a
   node with the wrong role: it becomes a follower at the tail, its
   upstream's handshake finds its divergent tail and rebuilds it.

The synchronous chain is the safety record.  With ``require_sync`` a
leader cannot acknowledge anything while its chain is broken, so the last
non-empty synchronous chain still holds every acknowledged write and is
kept until a new one is seen.  Without ``require_sync`` the leader keeps
committing alone, so only the chain seen at the very last poll counts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from ..core import protocol
from ..core.config import Config
from ..core.errors import ProtocolError, ReplicationError, Timeout
from ..storage.fsutil import atomic_write
from .rpc import RpcClient, new_context
from ..core.types import FollowerState, NodeRole, NodeStatus

log = logging.getLogger("zrepl.supervisor")

STATE_FORMAT = 1
ERROR_RETRY = 5.0  # seconds between set_follower retries of a link in ERROR


@dataclass
class Call:
    """One call the supervisor makes to a node."""

    op: str  # set_role | set_leader | set_follower | renew
    address: str
    role: NodeRole | None = None
    leader_id: int = 0
    target: str = ""  # set_leader / set_follower argument

    def __str__(self) -> str:
        if self.op == "set_role":
            return f"{self.address}: set_role({self.role.name}, {self.leader_id})"  # type: ignore[union-attr]
        if self.op == "renew":
            return f"{self.address}: renew lease (epoch {self.leader_id})"
        return f"{self.address}: {self.op}({self.target!r})"


@dataclass
class Memory:
    """What the supervisor knows between ticks.  The first five fields are
    persisted in the state file; the rest are rebuilt after a restart."""

    max_leader_id: int = 0
    leader: str = ""
    leader_id: int = 0
    sync_chain: list[tuple[str, int]] = field(default_factory=list)  # (address, max_wal then)
    chain: list[str] = field(default_factory=list)  # followers in order, leader excluded
    misses: dict[str, int] = field(default_factory=dict)
    lease_safe_at: float = 0.0  # monotonic time the leader's lease has surely run out
    error_retry: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def key(self) -> tuple:
        """What must be durable: the state file is rewritten when this
        changes (positions in the synchronous chain ride along, they are
        not worth a write per tick)."""
        return (self.max_leader_id, self.leader, self.leader_id,
                tuple(a for a, _ in self.sync_chain), tuple(self.chain))

    def persisted(self) -> dict:
        return {"format": STATE_FORMAT, "max_leader_id": self.max_leader_id,
                "leader": self.leader, "leader_id": self.leader_id,
                "sync_chain": [list(x) for x in self.sync_chain], "chain": list(self.chain)}

    @classmethod
    def from_persisted(cls, d: dict) -> "Memory":
        if d.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported supervisor state format {d.get('format')!r}")
        return cls(max_leader_id=int(d["max_leader_id"]), leader=str(d.get("leader", "")),
                   leader_id=int(d.get("leader_id", 0)),
                   sync_chain=[(str(a), int(p)) for a, p in d.get("sync_chain", [])],
                   chain=[str(a) for a in d.get("chain", [])])


@dataclass
class Plan:
    calls: list[Call]
    memory: Memory
    new_epoch: int = 0  # persist this before making the calls (0: none)
    persist: bool = False  # the persisted part of the memory changed
    events: list[tuple[int, str]] = field(default_factory=list)  # (logging level, text) to log


def _last_epoch(st: NodeStatus) -> int:
    return st.epoch_history[-1][0] if st.epoch_history else 0


def synchronous_chain(leader: str, observed: dict[str, NodeStatus | None]
                      ) -> list[tuple[str, int]]:
    """The nodes linked to ``leader`` through synchronous links, in order,
    with the WAL each held, as observed now."""
    out: list[tuple[str, int]] = []
    seen = {leader}
    st = observed.get(leader)
    while st is not None and st.follower and st.follower_sync and st.follower not in seen:
        nxt = observed.get(st.follower)
        if nxt is None:
            break
        out.append((st.follower, nxt.position))
        seen.add(st.follower)
        st = nxt
    return out


def plan(order: list[str], observed: dict[str, NodeStatus | None], memory: Memory,
         cfg: Config, now: float) -> Plan:
    """Decide this tick's calls.  ``observed`` maps every configured address
    to its status, or None if it did not answer this poll.  Pure: the given
    memory is not modified and nothing is logged (what is worth logging
    comes back in ``Plan.events``)."""
    mem = dataclasses.replace(memory, sync_chain=list(memory.sync_chain),
                              chain=list(memory.chain), misses=dict(memory.misses),
                              error_retry=dict(memory.error_retry))
    persisted_before = mem.key()
    calls: list[Call] = []
    events: list[tuple[int, str]] = []
    new_epoch = 0
    alive = {a: st for a, st in observed.items() if st is not None}
    for a in order:
        mem.misses[a] = 0 if a in alive else mem.misses.get(a, 0) + 1
    dead = {a for a in order if mem.misses[a] >= cfg.missed_heartbeats}
    seen_max = max([st.leader_id for st in alive.values()] + [0])
    mem.max_leader_id = max(mem.max_leader_id, seen_max)

    def done(note: str) -> Plan:
        mem.note = note
        return Plan(calls, mem, new_epoch, mem.key() != persisted_before, events)

    def promote(address: str) -> int:
        """A new epoch led by ``address``: its calls, and the memory of it."""
        epoch = mem.max_leader_id + 1
        mem.max_leader_id = epoch
        mem.leader, mem.leader_id = address, epoch
        mem.chain = [a for a in mem.chain if a != address]
        mem.sync_chain = []
        calls.append(Call("set_role", address, NodeRole.LEADER, epoch))
        calls.append(Call("renew", address, leader_id=epoch))
        return epoch

    # --- 2. who leads -------------------------------------------------------------
    if not mem.leader:
        claimers = sorted((st.leader_id, a) for a, st in alive.items()
                          if st.role == NodeRole.LEADER)
        if claimers and claimers[-1][0] >= seen_max:
            mem.leader_id, mem.leader = claimers[-1]
            mem.chain = [a for a in mem.chain if a != mem.leader]
        elif len(alive) + len(dead - set(alive)) < len(order):
            return done("starting: waiting for every node to answer or be declared dead")
        elif not alive:
            return done("no node answers")
        else:
            best = max(alive, key=lambda a: (_last_epoch(alive[a]), alive[a].position,
                                            -order.index(a)))
            new_epoch = promote(best)
            events.append((logging.WARNING,
                           f"no leader: making {best} the leader of epoch {new_epoch}"))

    leader = mem.leader
    lst = alive.get(leader)
    if lst is not None and (lst.role != NodeRole.LEADER or lst.leader_id != mem.leader_id) \
            and not new_epoch:
        # The remembered leader does not lead this epoch (it restarted and was
        # told otherwise, or someone else changed it): find out again.
        if lst.leader_id > mem.leader_id or lst.role != NodeRole.LEADER:
            mem.leader = ""
            return done(f"{leader} no longer leads epoch {mem.leader_id}: re-adopting")

    # --- 3. failover --------------------------------------------------------------
    if leader in dead:
        if now < mem.lease_safe_at:
            return done(f"leader {leader} is dead; waiting {mem.lease_safe_at - now:.2f}s for "
                        "its lease to run out")
        candidates = [(alive[a].max_wal, -i, a) for i, (a, pos) in enumerate(mem.sync_chain)
                      if a in alive and a not in dead and alive[a].leader_id == mem.leader_id
                      and alive[a].position >= pos]
        if not candidates:
            note = (f"leader {leader} is dead and no node known to hold every acknowledged "
                    f"write is reachable (synchronous chain was "
                    f"{[a for a, _ in mem.sync_chain] or 'empty'}): promoting nobody, waiting")
            if note != memory.note:
                events.append((logging.ERROR, note))
            return done(note)
        new_leader = max(candidates)[2]
        new_epoch = promote(new_leader)
        events.append((logging.WARNING, f"leader {leader} is dead: promoting {new_leader} "
                                        f"with epoch {new_epoch}"))
        leader = new_leader
    elif leader not in alive:
        return done(f"leader {leader} missed {mem.misses.get(leader, 0)} poll(s)")
    else:
        # the leader answered: record who holds every acknowledged write
        chain_now = synchronous_chain(leader, observed)
        require_sync = bool(alive[leader].extra.get("require_sync"))
        if chain_now or not require_sync:
            mem.sync_chain = chain_now

    # --- 4. the chain -------------------------------------------------------------
    chain = [a for a in mem.chain if a != leader and a not in dead and a in order]
    for a in order:  # newcomers and returning nodes join at the tail
        if a != leader and a not in chain and a in alive:
            chain.append(a)
    mem.chain = chain
    full = [leader] + chain
    for i, a in enumerate(full):
        st = alive.get(a)
        if st is None:
            continue  # suspect: leave it (and the links to it) alone this tick
        want_follower = full[i + 1] if i + 1 < len(full) else ""
        if i > 0:
            want_role = NodeRole.FORWARDER if want_follower else NodeRole.FOLLOWER
            if st.role != want_role or st.leader_id < mem.leader_id:
                calls.append(Call("set_role", a, want_role, mem.leader_id))
            if st.leader != full[i - 1]:
                calls.append(Call("set_leader", a, target=full[i - 1]))
        if st.follower != want_follower:
            calls.append(Call("set_follower", a, target=want_follower))
        elif want_follower and st.follower_state == FollowerState.ERROR and \
                now - mem.error_retry.get(a, 0.0) >= ERROR_RETRY:
            mem.error_retry[a] = now
            calls.append(Call("set_follower", a, target=want_follower))  # retry the link
    synced = [a for a, _ in mem.sync_chain]
    return done(f"leader {leader} (epoch {mem.leader_id}); chain {' -> '.join(full)}; "
                f"synchronous: {', '.join(synced) if synced else 'none'}")


# --- the runner --------------------------------------------------------------------


class Supervisor:
    """Runs :func:`plan` against real nodes.

    ``Supervisor(nodes=[address, ...], state_path=FILE, config=Config())``;
    ``run()`` blocks until ``stop()``; ``start()`` runs it in a thread.
    ``state_path`` keeps the largest epoch issued, the leader and the
    synchronous chain across restarts (atomic writes); without it a
    restarted supervisor still never reuses an epoch it can see in any
    node, but forgets which nodes were synchronous.
    """

    def __init__(self, nodes: list[str], state_path: str | os.PathLike | None = None,
                 config: Config | None = None, listen: str = ""):
        if not nodes:
            raise ValueError("a supervisor needs at least one node")
        if len(set(nodes)) != len(nodes):
            raise ValueError("each node may be listed once")
        for a in nodes:
            protocol.endpoints(a)  # validates
        self.nodes = list(nodes)
        self.config = config or Config()
        self.state_path = Path(state_path) if state_path else None
        if self.state_path is not None and not os.access(self.state_path.parent or ".",
                                                         os.W_OK | os.X_OK):
            # found now, not at the first failover, when the epoch must be saved
            raise ReplicationError(f"supervisor state {self.state_path}: cannot write to "
                                   f"{self.state_path.parent}")
        self.memory = self._load_state()
        self.last_observed: dict[str, NodeStatus | None] = {}
        self.ticks = 0
        self.promotions = 0  # new epochs this process issued
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx = new_context()
        self._socks: dict[str, zmq.Socket] = {}
        self._rpcs = {a: RpcClient(protocol.endpoints(a).control, self.config.rpc_timeout,
                                   context=self._ctx) for a in nodes}
        # After a restart the old leader may have been renewed just before.
        self.memory.lease_safe_at = time.monotonic() + self.config.lease * self.config.lease_margin
        self.listen = listen  # optional REP endpoint answering "status" with status()

    # --- state file ---------------------------------------------------------------
    def _load_state(self) -> Memory:
        if self.state_path is None or not self.state_path.exists():
            return Memory()
        try:
            return Memory.from_persisted(json.loads(self.state_path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplicationError(f"supervisor state {self.state_path} is unreadable ({exc}); "
                                   "fix or remove it") from None

    def _save_state(self) -> None:
        if self.state_path is not None:
            atomic_write(self.state_path, json.dumps(self.memory.persisted(), indent=1).encode())

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> "Supervisor":
        self._thread = threading.Thread(target=self.run, name="zrepl-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def run(self) -> None:
        log.info("supervising %s", ", ".join(self.nodes))
        rep = None
        if self.listen:
            rep = self._ctx.socket(zmq.ROUTER)
            rep.setsockopt(zmq.LINGER, 0)
            rep.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
            rep.bind(self.listen)
        try:
            next_tick = time.monotonic()
            while not self._stop.is_set():
                self.tick()
                next_tick += self.config.heartbeat_interval
                while not self._stop.is_set():
                    delay = next_tick - time.monotonic()
                    if delay <= 0:
                        break
                    if rep is None:
                        self._stop.wait(delay)
                    elif rep.poll(max(1, int(delay * 1000))):
                        self._answer(rep)
                if time.monotonic() - next_tick > self.config.heartbeat_interval:
                    next_tick = time.monotonic()  # fell behind: do not catch up in a burst
        finally:
            if rep is not None:
                rep.close(linger=0)
            for s in self._socks.values():
                s.close(linger=0)
            self._socks.clear()
            for r in self._rpcs.values():
                r.close()

    def _answer(self, rep: zmq.Socket) -> None:
        """Serve the supervisor's status on its listen endpoint."""
        try:
            frames = rep.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            op, _ = protocol.parse_control_request(frames[-1])
            if op != "status":
                raise ProtocolError(f"the supervisor answers only 'status', not {op!r}")
            reply = protocol.control_ok(self.status())
        except ReplicationError as exc:
            reply = protocol.control_err(exc)
        try:
            rep.send_multipart(frames[:-1] + [reply], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def status(self) -> dict:
        """The supervisor's own view, for logs and operators."""
        m = self.memory
        return {"leader": m.leader, "leader_id": m.leader_id, "max_leader_id": m.max_leader_id,
                "chain": [m.leader] + m.chain if m.leader else m.chain,
                "synchronous_chain": [a for a, _ in m.sync_chain], "note": m.note,
                "ticks": self.ticks, "promotions": self.promotions,
                "dead": [a for a in self.nodes
                         if m.misses.get(a, 0) >= self.config.missed_heartbeats]}

    # --- one tick ----------------------------------------------------------------------
    def tick(self) -> Plan:
        now = time.monotonic()
        observed = self._poll(now)
        self.last_observed = observed
        result = plan(self.nodes, observed, self.memory, self.config, time.monotonic())
        for level, text in result.events:
            log.log(level, "%s", text)
        if result.new_epoch:
            self.promotions += 1
        if result.new_epoch or result.persist:
            self.memory = result.memory
            self._save_state()  # the new epoch is durable before any node hears of it
        self.memory = result.memory
        if result.memory.note != getattr(self, "_last_note", None):
            log.info("%s", result.memory.note)
            self._last_note = result.memory.note
        for call in result.calls:
            self._execute(call)
        self.ticks += 1
        return result

    def _sock(self, address: str) -> zmq.Socket:
        s = self._socks.get(address)
        if s is None:
            s = self._ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
            s.connect(protocol.endpoints(address).control)
            self._socks[address] = s
        return s

    def _poll(self, now: float) -> dict[str, NodeStatus | None]:
        """Ask every node for its status at once; the leader's poll renews
        its lease.  A node that does not answer in time, or answers
        nonsense, counts as not answering (and its socket is reopened)."""
        m = self.memory
        requests = {}
        for a in self.nodes:
            args: dict[str, Any] = {}
            if a == m.leader and m.leader_id:
                args = {"renew_lease_for": m.leader_id, "lease": self.config.lease}
            requests[a] = (self._sock(a), protocol.control_request("status", args))
        observed: dict[str, NodeStatus | None] = {a: None for a in self.nodes}
        for a, st in ask_all(requests, now + self.config.heartbeat_interval * 0.8).items():
            if isinstance(st, Timeout):
                self._reset(a)  # lazy pirate: a REQ socket that lost its reply is stuck
                continue
            if isinstance(st, ReplicationError):
                log.warning("%s answered with a malformed status: %s", a, st)
                continue
            observed[a] = st
            if a == m.leader and st.role == NodeRole.LEADER and \
                    st.leader_id == m.leader_id and not st.extra.get("lease_refused"):
                self._lease_granted()
        return observed

    def _lease_granted(self) -> None:
        """The leader confirmed a renewal just now: its lease runs at most
        until now + lease (with the clock-rate margin)."""
        self.memory.lease_safe_at = max(
            self.memory.lease_safe_at,
            time.monotonic() + self.config.lease * self.config.lease_margin)

    def _reset(self, address: str) -> None:
        s = self._socks.pop(address, None)
        if s is not None:
            s.close(linger=0)

    def _execute(self, call: Call) -> None:
        rpc = self._rpcs[call.address]
        try:
            if call.op == "set_role":
                rpc.call("set_role", role=int(call.role), leader_id=call.leader_id)  # type: ignore[arg-type]
            elif call.op == "renew":
                d = rpc.call("status", renew_lease_for=call.leader_id, lease=self.config.lease)
                if not d.get("extra", {}).get("lease_refused"):
                    self._lease_granted()
            else:
                rpc.call(call.op, address=call.target)
            log.info("%s", call)
        except (ReplicationError, zmq.ZMQError) as exc:
            log.warning("%s failed: %s", call, exc)


def supervisor_view(listen: str, timeout: float = 0.5) -> dict | None:
    """A running supervisor's own status (``Supervisor.status()``) from its
    ``--listen`` endpoint; None while it does not answer."""
    try:
        with RpcClient(listen, timeout) as rpc:
            return rpc.call("status")
    except ReplicationError:
        return None


def ask_all(requests: dict[str, tuple[zmq.Socket, bytes]], deadline: float
            ) -> dict[str, NodeStatus | ReplicationError]:
    """Send every node its status request at once, then collect the replies
    until ``deadline`` (``time.monotonic()``): a dead node costs the wait
    once, not once per node.  Each node gets a NodeStatus, the error it
    reported, a ProtocolError for a malformed reply, or Timeout.  The
    sockets are REQ sockets; one that got no reply must be closed."""
    out: dict[str, NodeStatus | ReplicationError] = {}
    waiting: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    for a, (sock, payload) in requests.items():
        try:
            sock.send(payload, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            out[a] = Timeout(f"{a} is not accepting requests: {exc}")
            continue
        waiting[sock] = a
        poller.register(sock, zmq.POLLIN)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for sock, _ in poller.poll(max(1, int(left * 1000))):
            a = waiting.pop(sock)
            poller.unregister(sock)
            try:
                out[a] = NodeStatus.from_dict(protocol.parse_control_reply(sock.recv()))
            except ReplicationError as exc:
                out[a] = exc
            except (KeyError, TypeError, ValueError) as exc:
                out[a] = ProtocolError(f"malformed status from {a}: {exc}")
    for a in waiting.values():
        out[a] = Timeout(f"no status from {a} within the deadline")
    return out


def poll_statuses(addresses: list[str], timeout: float = 1.0
                  ) -> dict[str, NodeStatus | ReplicationError]:
    """One status per node (for ``zrepl status`` and the demo), asked of all
    nodes at once: a NodeStatus or the error that stood in its way.  The
    whole poll takes at most ``timeout``, however many nodes are down."""
    ctx = new_context()
    out: dict[str, NodeStatus | ReplicationError] = {}
    requests = {}
    try:
        for a in addresses:
            try:
                control = protocol.endpoints(a).control
            except ValueError as exc:
                out[a] = ProtocolError(str(exc))
                continue
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, Config().max_message_bytes)
            try:
                sock.connect(control)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                out[a] = ProtocolError(f"cannot connect to {a}: {exc}")
                continue
            requests[a] = (sock, protocol.control_request("status", {}))
        out.update(ask_all(requests, time.monotonic() + timeout))
    finally:
        for sock, _ in requests.values():
            sock.close(linger=0)
    return {a: out[a] for a in addresses}

