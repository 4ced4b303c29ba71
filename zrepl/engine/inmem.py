"""The in-memory twin of :class:`~.transport.ZmqTransport`
(hashicorp/raft's ``inmem_transport.go``): every host of a cluster in one
process, messages carried by an :class:`InmemNetwork` in virtual time.

Semantics follow ZeroMQ where zrepl relies on them: messages of one
connection arrive in order (different connections may interleave); a
pusher with ``immediate`` refuses to queue while nobody is bound at the
other end; a queue beyond its high-water mark refuses more; a request whose
reply is lost leaves the requester waiting until its owner gives up and
closes it.  Messages to an endpoint nobody binds any more are lost, as are
messages that cross a cut link (:meth:`InmemNetwork.cut`) - a partition
looks like a silent peer, as it does on TCP.

Nothing here has a thread: a :class:`~.simulation.Simulation` delivers
messages as virtual time passes and steps each host.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
from typing import Any, Callable, Iterator

from ..core.config import Config
from ..core.errors import ReplicationError
from .clock import FakeClock
from .transport import NodeEndpoints, Pusher, Receiver, Requester, Router, Transport


class InmemNetwork:
    """Hosts, their bound endpoints, and the messages between them."""

    def __init__(self, clock: FakeClock, rng: random.Random | None = None,
                 latency: float = 100e-6, jitter: float = 0.0):
        self.clock = clock
        self.rng = rng or random.Random(0)
        self.latency = latency
        self.jitter = jitter
        self._heap: list[tuple[float, int, str, str, int, Any]] = []
        self._seq = itertools.count()
        self._conn_ids = itertools.count(1)
        self._last: dict[tuple[int, str], float] = {}  # FIFO per connection
        self.inboxes: dict[str, collections.deque] = {}  # endpoint -> messages
        self.owner: dict[str, str] = {}  # endpoint -> host
        self.in_transit: collections.Counter[int] = collections.Counter()  # per connection
        self._cut: set[tuple[str, str]] = set()
        self.busy_until: dict[str, float] = {}
        self.woken: set[str] = set()
        self.stats: collections.Counter[str] = collections.Counter()
        # Fault injection (``zrepl sim``): called for every message sent as
        # ``faults(src host, dst host, endpoint, item)``; returns the extra
        # delays of the copies to deliver (``[0.0]``: as usual, ``[]``: the
        # message is lost, two delays: it arrives twice).
        self.faults: Callable[[str, str, str, Any], list[float]] | None = None

    # --- hosts and endpoints -------------------------------------------------------

    def new_connection(self) -> int:
        return next(self._conn_ids)

    def bind(self, host: str, endpoint: str) -> collections.deque:
        if endpoint in self.owner:
            raise ReplicationError(f"cannot bind {endpoint}: Address already in use")
        self.owner[endpoint] = host
        inbox: collections.deque = collections.deque()
        self.inboxes[endpoint] = inbox
        return inbox

    def unbind(self, endpoint: str) -> None:
        self.owner.pop(endpoint, None)
        self.inboxes.pop(endpoint, None)

    def bound(self, endpoint: str) -> bool:
        return endpoint in self.owner

    # --- faults -----------------------------------------------------------------------

    def cut(self, a: str, b: str, both: bool = True) -> None:
        """Messages from host ``a`` to host ``b`` (and back, if ``both``)
        are lost from now on, those already in transit included."""
        self._cut.add((a, b))
        if both:
            self._cut.add((b, a))

    def heal(self, a: str | None = None, b: str | None = None) -> None:
        """Mend one cut (both directions), or every cut."""
        if a is None:
            self._cut.clear()
        else:
            self._cut.discard((a, b))  # type: ignore[arg-type]
            self._cut.discard((b, a))  # type: ignore[arg-type]

    def is_cut(self, a: str, b: str) -> bool:
        return (a, b) in self._cut

    def charge(self, host: str, seconds: float) -> None:
        """``host`` is busy (computing) for ``seconds`` more: it is not
        stepped and sends nothing until then."""
        now = self.clock.now()
        self.busy_until[host] = max(self.busy_until.get(host, now), now) + seconds

    # --- carrying messages ------------------------------------------------------------

    def send(self, src: str, conn: int, endpoint: str, item: Any) -> None:
        now = self.clock.now()
        t = max(now, self.busy_until.get(src, now)) + self.latency
        if self.jitter:
            t += self.jitter * self.rng.random()
        self.stats["sent"] += 1
        extra = [0.0] if self.faults is None else \
            self.faults(src, self.owner.get(endpoint, ""), endpoint, item)
        key = (conn, endpoint)
        for delay in extra:  # in order per connection, as ZeroMQ keeps them
            at = max(t + delay, self._last.get(key, 0.0))
            self._last[key] = at
            self.in_transit[conn] += 1
            heapq.heappush(self._heap, (at, next(self._seq), endpoint, src, conn, item))
        if not extra:
            self.stats["lost"] += 1

    def next_delivery(self) -> float:
        return self._heap[0][0] if self._heap else float("inf")

    def deliver(self, now: float) -> None:
        """Every message due by ``now`` into its endpoint's inbox."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, endpoint, src, conn, item = heapq.heappop(heap)
            self.in_transit[conn] -= 1
            dst = self.owner.get(endpoint)
            if dst is None or (src, dst) in self._cut:
                self.stats["lost"] += 1
                continue
            self.inboxes[endpoint].append(item)
            self.stats["delivered"] += 1
            self.woken.add(dst)

    def queued(self, endpoint: str) -> int:
        inbox = self.inboxes.get(endpoint)
        return len(inbox) if inbox is not None else 0


class _Router(Router):
    def __init__(self, transport: "InmemTransport", endpoint: str):
        self._t = transport
        self.endpoint = endpoint
        self._inbox = transport.network.bind(transport.host, endpoint)
        self._conn = transport.network.new_connection()

    def drain(self, limit: int) -> Iterator[tuple[Any, bytes]]:
        inbox = self._inbox
        for _ in range(limit):
            if not inbox:
                return
            _, reply_to, seq, payload = inbox.popleft()
            yield (reply_to, seq), payload

    def pending(self) -> bool:
        return bool(self._inbox)

    def reply(self, handle: Any, payload: bytes) -> bool:
        reply_to, seq = handle
        net = self._t.network
        if not net.bound(reply_to):
            return False
        net.send(self._t.host, self._conn, reply_to, (seq, payload))
        return True

    def close(self) -> None:
        self._t.network.unbind(self.endpoint)


class _Receiver(Receiver):
    def __init__(self, transport: "InmemTransport", endpoint: str):
        self._t = transport
        self.endpoint = endpoint
        self._inbox = transport.network.bind(transport.host, endpoint)

    def drain(self, limit: int) -> Iterator[bytes]:
        inbox = self._inbox
        for _ in range(limit):
            if not inbox:
                return
            yield inbox.popleft()

    def recv(self) -> bytes | None:
        return self._inbox.popleft() if self._inbox else None

    def pending(self) -> bool:
        return bool(self._inbox)

    def close(self) -> None:
        self._t.network.unbind(self.endpoint)


class _Pusher(Pusher):
    def __init__(self, transport: "InmemTransport", endpoint: str, hwm: int, immediate: bool):
        self._t = transport
        self.endpoint = endpoint
        self.hwm = hwm
        self.immediate = immediate
        self._conn = transport.network.new_connection()
        self.closed = False

    def send(self, payload: bytes) -> bool:
        net = self._t.network
        if self.closed or (self.immediate and not net.bound(self.endpoint)):
            return False
        if net.in_transit[self._conn] + net.queued(self.endpoint) >= self.hwm:
            return False
        net.send(self._t.host, self._conn, self.endpoint, payload)
        return True

    def close(self) -> None:
        self.closed = True


class _Requester(Requester):
    def __init__(self, transport: "InmemTransport", endpoint: str):
        self._t = transport
        self.endpoint = endpoint
        self._conn = transport.network.new_connection()
        self._reply_to = f"inmem-reply://{transport.host}/{self._conn}"
        self._inbox = transport.network.bind(transport.host, self._reply_to)
        self._seq = 0
        self._waiting = False

    def send(self, payload: bytes) -> bool:
        if self._waiting:
            return False  # one request at a time (REQ)
        self._seq += 1
        self._waiting = True
        self._t.network.send(self._t.host, self._conn, self.endpoint,
                             ("req", self._reply_to, self._seq, payload))
        return True

    def recv(self) -> bytes | None:
        inbox = self._inbox
        while inbox:
            seq, payload = inbox.popleft()
            if seq == self._seq and self._waiting:
                self._waiting = False
                return payload
        return None

    def pending(self) -> bool:
        return bool(self._inbox)

    def close(self) -> None:
        self._t.network.unbind(self._reply_to)


class InmemTransport(Transport):
    """The transport of one host of an :class:`InmemNetwork`."""

    threaded = False

    def __init__(self, network: InmemNetwork, host: str):
        self.network = network
        self.host = host

    def bind(self, endpoints: Any, config: Config) -> NodeEndpoints:
        return NodeEndpoints(_Router(self, endpoints.control), _Receiver(self, endpoints.data),
                             _Receiver(self, endpoints.ack), _Router(self, endpoints.client))

    def router(self, endpoint: str, config: Config, max_message_bytes: int) -> Router:
        return _Router(self, endpoint)

    def pusher(self, endpoint: str, config: Config, hwm: int, immediate: bool = False
               ) -> Pusher:
        return _Pusher(self, endpoint, hwm, immediate)

    def requester(self, endpoint: str, config: Config) -> Requester:
        return _Requester(self, endpoint)

    def close(self) -> None:
        """A crash: every endpoint of this host is gone at once."""
        net = self.network
        for endpoint, host in list(net.owner.items()):
            if host == self.host:
                net.unbind(endpoint)
