"""Writing through a cluster while its nodes fail, and reading what the
cluster looks like: shared by the replication, chain, supervisor,
session and worker tests."""

from __future__ import annotations

import threading
import time
from typing import Callable

from zrepl import FollowerState, NodeRole, ReplicationError

from . import wait_for
from .cluster import Cluster, NodeProc, SupervisorProc, kv_set, wait_applied

SUPERVISED = dict(require_sync=True, lease_required=True, ack_timeout=0.3,
                  sync_wait_timeout=2.0, rpc_timeout=0.3)


class Writer(threading.Thread):
    """Writes unique keys through ``zrepl.Client`` to whichever of ``nodes``
    leads until stopped; records each acknowledged key, and when and by
    which node it was acknowledged.  A write that raised has an unknown
    outcome: counted in ``failed``, never as acknowledged."""

    def __init__(self, cluster: Cluster, nodes: list[NodeProc], prefix: str = "w",
                 timeout: float = 2.0):
        super().__init__(daemon=True)
        self.client = cluster.client(*nodes, timeout=timeout, retry_for=timeout)
        self.prefix = prefix
        self.acked: list[str] = []
        self.ack_times: list[tuple[float, str]] = []  # (when, which node answered)
        self.failed = 0
        self._halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._halt.is_set():
            key = f"{self.prefix}{i}"
            i += 1
            try:
                if self.client.apply(kv_set(key, i)) == 0:
                    self.acked.append(key)
                    self.ack_times.append((time.monotonic(), self.client.leader or ""))
            except ReplicationError:
                self.failed += 1

    def first_ack_after(self, t: float, not_from: str = "") -> float | None:
        """When the first write acknowledged after ``t`` by a node other
        than ``not_from`` came back."""
        return next((x for x, node in self.ack_times if x > t and node != not_from), None)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def missing(node: NodeProc, keys: list[str]) -> list[str]:
    state = node.state()
    return [k for k in keys if k not in state]


def leader_of(nodes: list[NodeProc]) -> NodeProc | None:
    """The node that leads the highest epoch among those answering."""
    best = None
    for n in nodes:
        try:
            st = n.status()
        except ReplicationError:
            continue
        if st.role == NodeRole.LEADER and (best is None or st.leader_id > best[0]):
            best = (st.leader_id, n)
    return best[1] if best else None


def chain_ok(nodes: list[NodeProc]) -> list[NodeProc] | None:
    """[leader, forwarder..., follower] if the nodes form one synchronous chain."""
    leader = leader_of(nodes)
    if leader is None:
        return None
    by_addr = {n.address: n for n in nodes}
    chain, node = [leader], leader
    while True:
        st = node.status()
        if not st.follower:
            break
        if st.follower_state != FollowerState.SYNCHRONOUS or st.follower not in by_addr:
            return None
        node = by_addr[st.follower]
        chain.append(node)
    if len(chain) != len(nodes):
        return None
    roles = [n.status().role for n in chain]
    want = [NodeRole.LEADER] + [NodeRole.FORWARDER] * (len(nodes) - 2) + [NodeRole.FOLLOWER]
    return chain if roles == want else None


def supervised_chain(cluster: Cluster, names: str = "ABC", app: str = "workers.kv:KV"
                     ) -> tuple[list[NodeProc], SupervisorProc, list[NodeProc]]:
    """Nodes ``names`` started empty and a supervisor over them; returns
    (nodes, supervisor, the chain it built) once that chain is healthy."""
    nodes = [cluster.node(n, app=app).start() for n in names]
    sup = cluster.supervisor(nodes)
    chain = wait_for(lambda: chain_ok(nodes), 30, "initial chain")
    return nodes, sup, chain


def kill_leaders(nodes: list[NodeProc], sup: SupervisorProc, rounds: int,
                 progress: Callable[[], int], step: int,
                 after_kill: Callable[[NodeProc, float], None] | None = None) -> None:
    """``rounds`` times: once the supervisor sees a healthy synchronous
    chain and ``progress()`` (the load's count of acknowledgements) grew by
    ``step``, SIGKILL the leader; ``after_kill(leader, when)``; wait for
    ``step`` more through the new leader; restart the killed node (it
    rejoins at the tail)."""
    for _ in range(rounds):
        wait_for(lambda: chain_ok(nodes), 30, "a healthy chain")
        sup.wait_synchronous(len(nodes) - 1)
        n = progress()
        wait_for(lambda: progress() > n + step, 30, "progress")
        leader = leader_of(nodes)
        assert leader is not None
        t_kill = time.monotonic()
        leader.kill()
        if after_kill is not None:
            after_kill(leader, t_kill)
        wait_for(lambda: progress() > n + 2 * step, 30, "progress after the failover")
        leader.start()


def kill_leaders_under_load(work: Callable[[], None], nodes: list[NodeProc],
                            sup: SupervisorProc, rounds: int, progress: Callable[[], int],
                            step: int) -> list[NodeProc]:
    """Run ``work()`` again and again in a thread while :func:`kill_leaders`
    kills ``rounds`` leaders; then stop it and return the settled chain."""
    halt = threading.Event()

    def loop() -> None:
        while not halt.is_set():
            work()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        kill_leaders(nodes, sup, rounds, progress, step)
    finally:
        halt.set()
        t.join(timeout=60)
    return settled_chain(nodes)


def settled_chain(nodes: list[NodeProc]) -> list[NodeProc]:
    """The healthy chain, once every follower applied the leader's WAL."""
    chain = wait_for(lambda: chain_ok(nodes), 30, "final chain")
    top = chain[0].status().max_wal
    for n in chain[1:]:
        wait_applied(n, top)
    return chain
