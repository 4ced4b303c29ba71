"""Known bugs, planted on purpose, to show the simulator catches them.

Test-only: ``with planted("no-lease-check"): Run(seed).execute()`` puts one
bug back for the duration (by replacing one method), and the tests show
that some seed within a stated number finds it.  Nothing here runs in a
real node.

- ``forwarder-calls-empty-follower-synchronous``: issue "engine core" bug 1
  (a jump of the position keeps the link; the claim is not checked
  against the window; and, as then, a forwarder serves its follower before
  its upstream has checked its log);
- ``leader-read-unacknowledged``: bug 2 (a leader read answered whenever
  the lease is valid, writes in flight included);
- ``no-stale-epoch-check``: the handshake's epoch checks are gone: a node
  accepts an upstream from an older epoch (a deposed leader still linked
  to its old follower, which now leads) or one that holds less of the
  epochs than itself;
- ``no-lease-check``: a leader accepts writes without a valid lease;
- ``forgetful-session-table``: a retry from a client the session table
  forgot is taken as a new command;
- ``switchover-without-step-down``: a planned switchover promotes its
  target as soon as it is synchronous, without the old leader stepping
  down first (whose lease still runs);
- ``head-ignores-chain-members``: a head commits on its follower's
  acknowledgement alone, though the follower named the member it
  forwarded the batch to (members acknowledge straight to the head).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..core import plan as plan_module
from ..core.link import Link
from ..core.node import NodeCore
from ..core.errors import NotLeader
from ..core.session import SessionTable
from ..core.types import NodeRole


def _jump_without_restart(self: NodeCore, position: int, why: str, now: float) -> list:
    self.position = position
    return []


def _read_whenever_leased(self: NodeCore, now: float) -> bool:
    self.check_writable(now)
    return True


_LOOKUP = SessionTable.lookup


_ON_CONNECT = NodeCore.on_connect


def _connect_any_epoch(self: NodeCore, leader_id: Any, address: Any, *args: Any, **kw: Any
                       ) -> Any:
    """The handshake without its epoch check: an upstream of an older epoch
    (a deposed leader still linked to its old follower) is followed, even
    by a node that leads a newer epoch."""
    if isinstance(leader_id, int) and not isinstance(leader_id, bool) and \
            0 < leader_id <= self.leader_id:
        if self.role == NodeRole.LEADER:
            self.role = NodeRole.FOLLOWER
        leader_id = self.leader_id
    return _ON_CONNECT(self, leader_id, address, *args, **kw)


def _writable_without_lease(self: NodeCore, now: float) -> None:
    if not self.running:
        raise NotLeader(f"node {self.address} is not running", "")
    if self.role != NodeRole.LEADER:
        raise NotLeader(f"{self.address} is not the leader", self.leader_address)
    if self.epoch_spent:
        raise NotLeader(f"{self.address}: epoch spent", "")


def _lookup_forgetting(self: SessionTable, client_id: bytes, seq: int, active: Any = None
                       ) -> Any:
    if client_id not in self._clients:
        return None
    return _LOOKUP(self, client_id, seq)


_HANDOVER_STEP = plan_module.handover_step


def _handover_without_step_down(leader: str, observed: Any, alive: Any, dead: Any, mem: Any,
                                now: float, calls: list, give_up: Any) -> tuple[str, str]:
    target = mem.handover
    if target in dict(plan_module.synchronous_chain(leader, observed)):
        return target, ""
    return _HANDOVER_STEP(leader, observed, alive, dead, mem, now, calls, give_up)


BUGS: dict[str, list[tuple[Any, str, Any]]] = {
    "forwarder-calls-empty-follower-synchronous": [
        (NodeCore, "_jump", _jump_without_restart),
        (Link, "covers", lambda self, position: True),
        (NodeCore, "serves_follower", lambda self: True)],
    "leader-read-unacknowledged": [(NodeCore, "leader_read", _read_whenever_leased)],
    "no-stale-epoch-check": [(NodeCore, "on_connect", _connect_any_epoch),
                             (NodeCore, "_check_not_behind", lambda self, *args: None)],
    "no-lease-check": [(NodeCore, "check_writable", _writable_without_lease)],
    "forgetful-session-table": [(SessionTable, "lookup", _lookup_forgetting)],
    "switchover-without-step-down": [(plan_module, "handover_step",
                                      _handover_without_step_down)],
    "head-ignores-chain-members": [(NodeCore, "_expect", lambda self, *args: None)],
}


@contextlib.contextmanager
def planted(name: str) -> Iterator[None]:
    """Put bug ``name`` back for the duration."""
    if name not in BUGS:
        raise ValueError(f"unknown planted bug {name!r}; known: {', '.join(BUGS)}")
    saved = []
    for owner, attr, replacement in BUGS[name]:
        saved.append((owner, attr, owner.__dict__[attr]))
        setattr(owner, attr, replacement)
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
