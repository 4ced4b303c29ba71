"""The supervisor process's engine: polls the nodes, runs the plan, makes
the calls.

The decisions are :func:`zrepl.core.plan.plan` (pure; its essay explains
them).  This runner is a small machine over a :class:`~.transport.
Transport`, so the same code runs on ZeroMQ threads and in the in-memory
simulation:

    IDLE --(tick due)--> POLLING --(every status in, or the poll deadline)-->
    plan --> CALLING --(every call answered or timed out)--> IDLE

Every ``heartbeat_interval`` it asks every node for its status at once (the
poll of the leader renews its lease) and waits up to
``heartbeat_interval * poll_timeout_fraction``; a node that did not answer
counts as missed and its requester is reopened (a REQ socket that lost its
reply is stuck).  The plan's calls go out in order per node, to all nodes
at once.  A new epoch is written to the state file before any node hears
of it.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
import logging
import os
import threading
from pathlib import Path
from typing import Any

from ..core import protocol
from ..core.config import Config
from ..core.errors import PermissionDenied, ProtocolError, ReplicationError, Timeout
from ..core.plan import (Call, Memory, Plan, plan, removal_refused, renewal_at, renews,
                         switchover_target)
from ..core.types import NodeRole, NodeStatus
from ..storage.fsutil import atomic_write
from .clock import MONOTONIC, Clock
from .security import from_config
from .transport import Requester, Router, Transport, ZmqTransport

log = logging.getLogger("zrepl.supervisor")

IDLE, POLLING, CALLING = "idle", "polling", "calling"


@dataclass
class _Switch:
    """A switchover an operator asked for, as this process follows it."""

    old_leader: str
    started: float
    timeout: float
    stepped_at: float = 0.0  # when the step-down call went out (the pause starts)
    promoted: tuple[str, int] | None = None  # (new leader, epoch): must become writable
    writable_by: float = 0.0  # ... by then, or the switchover ends without it
    handle: Any = None  # the operator's request, answered when it ends


def _check_seconds(value: Any, most: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= most:
        raise ValueError(f"timeout must be a number of seconds in (0, {most:g}], got {value!r}")


class Supervisor:
    """Runs :func:`~zrepl.core.plan.plan` against real nodes.

    ``Supervisor(nodes=[address, ...], state_path=FILE, config=Config())``;
    ``run()`` blocks until ``stop()``; ``start()`` runs it in a thread.
    ``state_path`` keeps the largest epoch issued, the leader and the
    synchronous chain across restarts (atomic writes); without it a
    restarted supervisor still never reuses an epoch it can see in any
    node, but forgets which nodes were synchronous.  ``listen`` is an
    optional endpoint answering "status" with :meth:`status`.  On the
    in-memory transport a simulation calls :meth:`step` instead of
    :meth:`run`.
    """

    def __init__(self, nodes: list[str], state_path: str | os.PathLike | None = None,
                 config: Config | None = None, listen: str = "", *,
                 transport: Transport | None = None, clock: Clock | None = None):
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
        if self.memory.members:
            if self.memory.members != self.nodes:
                log.info("members as last changed at run time (%s): %s - the configured "
                         "list is only the initial one", self.state_path,
                         ", ".join(self.memory.members))
            self.nodes = list(self.memory.members)
        else:
            self.memory.members = list(self.nodes)
        self.last_observed: dict[str, NodeStatus | None] = {}
        self.ticks = 0
        self.promotions = 0  # new epochs this process issued
        self._own_transport = transport is None
        self.transport = transport or ZmqTransport(security=from_config(self.config))
        self.clock = clock or MONOTONIC
        self.listen = listen
        self._router: Router | None = None
        self._requesters: dict[str, Requester] = {}
        self._waiting: dict[str, tuple[str, Call | None, float]] = {}  # address -> (op, call, deadline)
        self._calls: dict[str, collections.deque[Call]] = {}
        self._observed: dict[str, NodeStatus | None] = {}
        self._node_clock: dict[str, float] = {}  # address -> its clock in its last status
        self._renewing: set[str] = set()  # nodes whose current poll renews their lease
        self._phase = IDLE
        self._tick_at = self.clock.now()
        self._poll_deadline = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened = False
        self._last_note: str | None = None
        self._last_steady: str | None = None  # the last note not about a missed poll
        self._switch: _Switch | None = None  # a switchover under way (see switchover)
        self._removing: dict[str, Any] = {}  # address -> the request to answer
        # After a restart the old leader may have been renewed just before.
        self.memory.lease_safe_at = self.clock.now() + self.config.lease * self.config.lease_margin

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
    def open(self) -> "Supervisor":
        """Bind the listen endpoint (``run`` and ``step`` do it on first use)."""
        if not self._opened:
            self._opened = True
            if self.listen:
                self._router = self.transport.router(self.listen, self.config, 1 << 16)
            log.info("supervising %s", ", ".join(self.nodes))
        return self

    def start(self) -> "Supervisor":
        self._thread = threading.Thread(target=self.run, name="zrepl-supervisor", daemon=True)
        self._thread.start()
        return self

    def running(self) -> bool:
        """The loop started by :meth:`start` is still going."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        elif self._thread is None:
            self.close()

    def close(self) -> None:
        if self._router is not None:
            self._router.close()
            self._router = None
        for r in self._requesters.values():
            r.close()
        self._requesters.clear()
        if self._own_transport:
            self.transport.close()
            self._own_transport = False

    def run(self) -> None:
        self.open()
        poller = self.transport.poller()
        try:
            while not self._stop.is_set():
                timeout = self.step()
                items: list = [self._requesters[a] for a in self._waiting]
                if self._router is not None:
                    items.append(self._router)
                poller.poll(items, min(timeout, 0.2))
        finally:
            self.close()

    def status(self) -> dict:
        """The supervisor's own view, for logs and operators."""
        m = self.memory
        return {"leader": m.leader, "leader_id": m.leader_id, "max_leader_id": m.max_leader_id,
                "chain": [m.leader] + m.chain if m.leader else m.chain,
                "synchronous_chain": [a for a, _ in m.sync_chain], "note": m.note,
                "ticks": self.ticks, "promotions": self.promotions,
                "fenced": dict(m.fenced),  # node -> an epoch this supervisor never issued
                "members": list(self.nodes),
                "dead": [a for a in self.nodes
                         if m.misses.get(a, 0) >= self.config.missed_heartbeats]}

    # --- the machine -------------------------------------------------------------------

    def step(self, now: float | None = None) -> float:
        """Everything due now; returns the seconds until the next thing
        that is (a reply may come sooner)."""
        self.open()
        now = self.clock.now() if now is None else now
        self._answer_listeners()
        self._collect(now)
        if self._phase == IDLE and now >= self._tick_at:
            self._start_poll(now)
        if self._phase == POLLING and (not self._waiting or now >= self._poll_deadline):
            self._finish_poll(now)
        if self._phase == CALLING:
            self._send_calls(now)
            if not self._waiting and not any(self._calls.values()):
                self._phase = IDLE
                self.ticks += 1
                if self._switch is not None:
                    self._tick_at = now  # a switchover: poll again at once
        if self._phase == IDLE:
            return max(0.0, self._tick_at - now)
        deadlines = [d for _, _, d in self._waiting.values()]
        return max(0.0, min(deadlines) - now) if deadlines else 0.0

    def _requester(self, address: str) -> Requester:
        r = self._requesters.get(address)
        if r is None:
            r = self._requesters[address] = self.transport.requester(
                protocol.endpoints(address).control, self.config)
        return r

    def _reset(self, address: str) -> None:
        """Lazy pirate: a requester that lost its reply is reopened."""
        r = self._requesters.pop(address, None)
        if r is not None:
            r.close()

    def _send(self, address: str, op: str, args: dict, call: Call | None, deadline: float
              ) -> None:
        if self._requester(address).send(protocol.control_request(op, args)):
            self._waiting[address] = (op, call, deadline)
        else:
            self._reset(address)
            self._failed(address, op, call, Timeout(f"{address} is not accepting requests"))

    def _start_poll(self, now: float) -> None:
        cfg = self.config
        m = self.memory
        self._observed = {a: None for a in self.nodes}
        self._poll_deadline = now + cfg.heartbeat_interval * cfg.poll_timeout_fraction
        self._tick_at = max(self._tick_at + cfg.heartbeat_interval, now)  # no burst to catch up
        self._phase = POLLING
        self._renewing = set()
        for a in self.nodes:
            args: dict[str, Any] = {}
            if renews(m, a) and a in self._node_clock:
                args = {"renew_lease_for": m.leader_id, "lease": cfg.lease,
                        "since": self._node_clock[a]}
                renewal_at(m, now, cfg)
                self._renewing.add(a)
            self._send(a, "status", args, None, self._poll_deadline)

    def _collect(self, now: float) -> None:
        """Replies that arrived; requests past their deadline fail."""
        for address in list(self._waiting):
            op, call, deadline = self._waiting[address]
            raw = self._requesters[address].recv()
            if raw is None:
                if now >= deadline:
                    del self._waiting[address]
                    self._reset(address)
                    self._failed(address, op, call, Timeout(f"no reply from {address} to {op}"))
                continue
            del self._waiting[address]
            try:
                result = protocol.parse_control_reply(raw)
            except ReplicationError as exc:
                self._failed(address, op, call, exc)
                continue
            self._answered(address, op, call, result, now)

    def _answered(self, address: str, op: str, call: Call | None, result: Any, now: float
                  ) -> None:
        m = self.memory
        if op == "status" and call is None:
            try:
                st = NodeStatus.from_dict(result)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s answered with a malformed status: %s", address, exc)
                return
            self._observed[address] = st
            self._note_clock(address, st.extra)
            if address in self._renewing and address == m.leader and \
                    st.role == NodeRole.LEADER and st.leader_id == m.leader_id and \
                    not st.extra.get("lease_refused"):
                # confirmed (only a poll that carried a renewal: a deposed
                # leader is still polled, and its lease must run out)
                renewal_at(m, now, self.config)
            return
        if call is not None and call.op == "renew":
            if isinstance(result, dict):
                self._note_clock(address, result.get("extra", {}))
            if not (isinstance(result, dict) and result.get("extra", {}).get("lease_refused")):
                renewal_at(m, now, self.config)  # confirmed
        log.info("%s", call)

    def _note_clock(self, address: str, extra: Any) -> None:
        """The node's clock in a status just received: the start of the
        lease the next renewal grants (see ControlServer.op_status)."""
        clock = extra.get("clock") if isinstance(extra, dict) else None
        if isinstance(clock, (int, float)) and not isinstance(clock, bool):
            self._node_clock[address] = float(clock)

    def _failed(self, address: str, op: str, call: Call | None, exc: ReplicationError) -> None:
        if call is not None:
            log.warning("%s failed: %s", call, exc)
        elif not isinstance(exc, Timeout):
            log.warning("%s answered with a malformed status: %s", address, exc)

    def _finish_poll(self, now: float) -> None:
        for address in list(self._waiting):  # late: counts as not answering
            del self._waiting[address]
            self._reset(address)
        self.last_observed = dict(self._observed)
        result = self.tick_with(self._observed, now)
        switch = self._switch
        if switch is not None and result.handover is not None:
            promoted, why = result.handover
            if promoted:
                switch.promoted = (self.memory.leader, self.memory.leader_id)
                switch.writable_by = now + switch.timeout
            else:
                self._switch_ends(protocol.control_err(ReplicationError(
                    f"switchover refused: {why}")))
        if self._switch is not None and self._switch.promoted:
            self._switch_check(now)
        for address, removed, why in result.removals:
            if removed:
                self._reset(address)
                self._node_clock.pop(address, None)
            handle = self._removing.pop(address, None)
            if handle is not None and self._router is not None:
                self._router.reply(handle, protocol.control_ok({"members": self.nodes})
                                   if removed else protocol.control_err(ReplicationError(
                                       f"removal of {address} refused: {why}")))
        for call in result.calls:
            self._calls.setdefault(call.address, collections.deque()).append(call)
        self._phase = CALLING

    def tick_with(self, observed: dict[str, NodeStatus | None], now: float) -> Plan:
        """Plan from ``observed`` and keep the memory (the new epoch is
        durable before any call carries it)."""
        result = plan(self.nodes, observed, self.memory, self.config, now)
        if result.memory.members and result.memory.members != self.nodes:
            self.nodes = list(result.memory.members)  # (a removal)
        for level, text in result.events:
            log.log(level, "%s", text)
        if result.new_epoch:
            self.promotions += 1
        self.memory = result.memory
        if result.new_epoch or result.persist:
            self._save_state()
        note = result.memory.note
        if note != self._last_note:
            # A poll missed now and then (a busy machine) is not news: DEBUG,
            # and the steady state it interrupted is not said again after.
            # Declaring a node dead and what follows come as events.
            if result.quiet:
                log.debug("%s", note)
            else:
                if note != self._last_steady:
                    log.info("%s", note)
                self._last_steady = note
            self._last_note = note
        return result

    def _send_calls(self, now: float) -> None:
        deadline = now + self.config.rpc_timeout
        for address, queue in self._calls.items():
            if address in self._waiting or not queue:
                continue
            call = queue.popleft()
            if call.op == "set_role":
                args = {"role": int(call.role), "leader_id": call.leader_id}  # type: ignore[arg-type]
                self._send(address, "set_role", args, call, deadline)
            elif call.op == "step_down":
                if self._switch is not None and not self._switch.stepped_at:
                    self._switch.stepped_at = now
                self._send(address, "step_down", {"leader_id": call.leader_id,
                                                  "successor": call.target}, call, deadline)
            elif call.op == "renew":
                if address not in self._node_clock:
                    continue  # no status from it yet: no lease (the next poll renews)
                renewal_at(self.memory, now, self.config)
                self._send(address, "status", {"renew_lease_for": call.leader_id,
                                               "lease": self.config.lease,
                                               "since": self._node_clock[address]},
                           call, deadline)
            else:
                self._send(address, call.op, {"address": call.target}, call, deadline)

    # --- switchover ----------------------------------------------------------------------

    def switchover(self, to: str = "", timeout: float = 5.0, now: float | None = None) -> str:
        """Begin a planned switchover to ``to`` (default: the leader's
        synchronous follower); returns the target.  ValueError with the
        reason when it is refused at once; the rest is decided tick by tick
        (:func:`~zrepl.core.plan.handover_step`)."""
        _check_seconds(timeout, 600)
        if self._switch is not None:
            raise ValueError("a switchover is under way")
        target = switchover_target(self.nodes, self.memory, to)
        now = self.clock.now() if now is None else now
        self.memory.handover, self.memory.handover_until = target, now + timeout
        self._switch = _Switch(self.memory.leader, now, float(timeout))
        self._tick_at = min(self._tick_at, now)
        log.info("switchover to %s requested (within %gs)", target, timeout)
        return target

    def _switch_check(self, now: float) -> None:
        """After the promotion: is the new leader writable yet (leading its
        epoch with a synchronous follower, or without require_sync)?"""
        switch = self._switch
        assert switch is not None and switch.promoted is not None
        leader, epoch = switch.promoted
        st = self._observed.get(leader)
        writable = st is not None and st.role == NodeRole.LEADER and st.leader_id == epoch and \
            not st.extra.get("epoch_spent") and \
            (st.follower_sync or not st.extra.get("require_sync"))
        if not writable and now < switch.writable_by:
            return
        start = switch.stepped_at or switch.started
        result = {"from": switch.old_leader, "leader": leader, "epoch": epoch,
                  "writable": writable, "pause_ms": round((now - start) * 1000, 1),
                  "total_ms": round((now - switch.started) * 1000, 1)}
        if writable:
            log.info("switchover done: %s leads epoch %d; writes paused %.1f ms", leader, epoch,
                     result["pause_ms"])
        else:
            log.warning("switchover: %s leads epoch %d but has no synchronous follower yet",
                        leader, epoch)
        self._switch_ends(protocol.control_ok(result))

    def _switch_ends(self, reply: bytes) -> None:
        switch, self._switch = self._switch, None
        if switch is not None and switch.handle is not None and self._router is not None:
            self._router.reply(switch.handle, reply)

    # --- membership -------------------------------------------------------------------------

    def add_member(self, address: str) -> list[str]:
        """A node joins at the tail of the chain (a state sync or a
        catch-up) and becomes promotable once seen synchronous.  The new
        member list is in the state file before this returns."""
        try:
            protocol.endpoints(address)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if address in self.nodes:
            raise ValueError(f"{address} is a member already")
        self.nodes.append(address)
        self.memory.members = list(self.nodes)
        self._save_state()
        log.info("%s joins as a member", address)
        return list(self.nodes)

    def remove_member(self, address: str, timeout: float = 30.0,
                      now: float | None = None) -> None:
        """Begin removing ``address``: it moves to the tail, and leaves once
        the others are synchronous ahead of it (:func:`~zrepl.core.plan.
        removable`).  ValueError with the reason when refused at once."""
        _check_seconds(timeout, 3600)
        why = removal_refused(self.nodes, self.memory, address)
        if why:
            raise ValueError(why)
        now = self.clock.now() if now is None else now
        self.memory.leaving[address] = now + timeout
        self._tick_at = min(self._tick_at, now)
        log.info("removing %s (within %gs)", address, timeout)

    def members(self) -> list[dict]:
        """Each member with what the last poll saw of it."""
        m = self.memory
        sync = [a for a, _ in m.sync_chain]
        out = []
        for a in self.nodes:
            st = self.last_observed.get(a)
            out.append({"address": a,
                        "role": "LEADER" if a == m.leader else
                        (st.role.name if st is not None else "UNKNOWN"),
                        "answering": st is not None, "synchronous": a in sync,
                        "promotable": a in sync or a == m.leader,
                        "leaving": a in m.leaving,
                        "wal": st.position if st is not None else None})
        return out

    # --- the listen endpoint ----------------------------------------------------------------

    def _answer_listeners(self) -> None:
        """Serve the supervisor's status, and an operator's switchover, on
        its listen endpoint."""
        router = self._router
        if router is None:
            return
        for handle, payload in router.drain(16):
            try:
                op, args = protocol.parse_control_request(payload)
                if op == "status":
                    reply = protocol.control_ok(self.status())
                elif op in ("switchover", "member_add", "member_remove") and \
                        getattr(handle, "role", None) not in (None, "operator"):
                    raise PermissionDenied(f"a {handle.role} key may not call {op}")
                elif op == "members":
                    reply = protocol.control_ok(self.members())
                elif op == "member_add":
                    try:
                        reply = protocol.control_ok({"members": self.add_member(
                            str(args.get("address", "")))})
                    except ValueError as exc:
                        raise ReplicationError(f"member add refused: {exc}") from None
                elif op == "member_remove":
                    address = str(args.get("address", ""))
                    try:
                        self.remove_member(address, args.get("timeout", 30.0))
                    except ValueError as exc:
                        raise ReplicationError(f"removal refused: {exc}") from None
                    self._removing[address] = handle  # answered when it ends
                    continue
                elif op == "switchover":
                    try:
                        self.switchover(str(args.get("to", "") or ""),
                                        args.get("timeout", 5.0))
                    except ValueError as exc:
                        raise ReplicationError(f"switchover refused: {exc}") from None
                    self._switch.handle = handle  # type: ignore[union-attr]
                    continue
                else:
                    raise ProtocolError(f"unknown supervisor operation {op!r} (it answers "
                                        "status, switchover, members, member_add, "
                                        "member_remove)")
            except ReplicationError as exc:
                reply = protocol.control_err(exc)
            router.reply(handle, reply)
