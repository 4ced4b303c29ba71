"""Transports: how nodes, the supervisor and clients reach each other.

The engine never touches a socket library directly; it uses these small
interfaces (hashicorp/raft's ``transport.go``):

* :class:`Router` - a bound request endpoint (a node's control and client
  endpoints): requests come with a handle to reply to;
* :class:`Receiver` - a bound one-way endpoint (a node's data and ack
  endpoints);
* :class:`Pusher` - one-way messages to a peer's endpoint (WAL batches
  downstream, acknowledgements upstream);
* :class:`Requester` - request/reply to a peer's endpoint that never wedges:
  one request at a time, ``close`` after a lost reply.

:class:`ZmqTransport` implements them with ZeroMQ (ROUTER, PULL, PUSH,
REQ).  ``zrepl.engine.inmem.InmemTransport`` is the in-memory twin that
runs a whole cluster in one process, deterministically, in virtual time.
A transport is *threaded* when the engine may block in :meth:`Transport.
poller` waits (ZeroMQ); the in-memory one is driven step by step by its
simulation instead.
"""

from __future__ import annotations

import abc
import os
import select
from functools import partial
from typing import Any, Iterator

import zmq

from ..core import protocol
from ..core.config import Config
from ..core.errors import PermissionDenied, ReplicationError
from .security import ROLES, Gatekeeper, KeyFileError, Security, role_of

# Plain ints: pyzmq's constants are enums whose operators run Python code.
NOBLOCK = int(zmq.NOBLOCK)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)

# pyzmq's own send and poll, without the Python layers of zmq.Socket.send
# (routing ids and groups, which zrepl never uses) and zmq.Poller (0.7 and
# 0.3 µs a call): both sit on the commit path of every node.
_send = zmq.backend.Socket.send
_set = zmq.backend.Socket.set
_get = zmq.backend.Socket.get
_zmq_poll = zmq.backend.zmq_poll
RCVTIMEO = int(zmq.RCVTIMEO)
ZMQ_FD = int(zmq.FD)


class Router(abc.ABC):
    dropped = 0  # malformed requests dropped (no envelope)
    denied = 0  # requests from a key whose role may not use this endpoint

    @abc.abstractmethod
    def drain(self, limit: int) -> Iterator[tuple[Any, bytes]]:
        """(handle, request) pairs waiting, at most ``limit``, without
        blocking."""

    def pending(self) -> bool:
        """More requests are waiting (stepped transports)."""
        return False

    @abc.abstractmethod
    def reply(self, handle: Any, payload: bytes) -> bool:
        """Answer a request; False if the requester is gone or its queue
        is full."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Receiver(abc.ABC):
    denied = 0  # messages from a key that is not a node's (dropped)
    # with keys: the one key (ROLE:NAME) whose messages are taken (None: any node's)
    only_from: str | None = None

    @abc.abstractmethod
    def drain(self, limit: int) -> Iterator[bytes]:
        """Messages waiting, at most ``limit``, without blocking."""

    @abc.abstractmethod
    def recv(self) -> bytes | None:
        """One message, or None if none is waiting."""

    def pending(self) -> bool:
        """More messages are waiting (stepped transports)."""
        return False

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a message (threaded
        transports only)."""
        raise NotImplementedError

    def recv_wait(self, timeout: float) -> bytes | None:
        """A message, waiting up to ``timeout`` seconds for one (threaded
        transports only)."""
        return self.recv() if self.wait(timeout) else None

    @abc.abstractmethod
    def close(self) -> None: ...


class Pusher(abc.ABC):
    @abc.abstractmethod
    def send(self, payload: bytes) -> bool:
        """Queue a message; False (nothing queued) when the peer is not
        connected or the queue is full."""

    def send_wait(self, payload: bytes, timeout: float) -> bool:
        """Like :meth:`send`, but wait up to ``timeout`` for room."""
        return self.send(payload)

    @abc.abstractmethod
    def close(self) -> None: ...


class Requester(abc.ABC):
    @abc.abstractmethod
    def send(self, payload: bytes) -> bool:
        """Send a request (one at a time); False if it could not be sent."""

    @abc.abstractmethod
    def recv(self) -> bytes | None:
        """The reply, or None while none has arrived."""

    def wait(self, timeout: float) -> bool:
        raise NotImplementedError

    @abc.abstractmethod
    def close(self) -> None: ...


class NodeEndpoints:
    """The four endpoints a node binds (see ``protocol.endpoints``)."""

    def __init__(self, control: Router, data: Receiver, ack: Receiver, client: Router):
        self.control, self.data, self.ack, self.client = control, data, ack, client

    def close(self) -> None:
        for e in (self.control, self.data, self.ack, self.client):
            e.close()


class Poller(abc.ABC):
    """Waits on several endpoints (and file descriptors) at once."""

    @abc.abstractmethod
    def poll(self, items: list, timeout: float) -> set:
        """The items of ``items`` (endpoints or ints) ready to read, after
        at most ``timeout`` seconds."""


class Transport(abc.ABC):
    threaded = True

    @abc.abstractmethod
    def bind(self, endpoints: Any, config: Config) -> NodeEndpoints:
        """Bind a node's endpoints (a ``protocol.Endpoints``); raises
        ReplicationError naming the one that could not be bound."""

    @abc.abstractmethod
    def router(self, endpoint: str, config: Config, max_message_bytes: int) -> Router:
        """Bind one request endpoint (the supervisor's ``--listen``)."""

    @abc.abstractmethod
    def pusher(self, endpoint: str, config: Config, hwm: int, immediate: bool = False
               ) -> Pusher: ...

    @abc.abstractmethod
    def requester(self, endpoint: str, config: Config) -> Requester: ...

    def poller(self) -> Poller:
        raise NotImplementedError(f"{type(self).__name__} is driven step by step")

    def refused_connections(self) -> int:
        """Handshakes refused because an endpoint held max_connections."""
        return 0

    def close(self) -> None:
        """Release what the transport holds (its endpoints are closed by
        their owners first)."""


# --- ZeroMQ ------------------------------------------------------------------------


def _drain(wrapper: "_ZmqSocket", multipart: bool, limit: int, frames: bool = False
           ) -> Iterator:
    """Messages waiting on ``wrapper``'s socket (at most ``limit``), without
    paying for a zmq.Again exception at the end of every burst; as
    zmq.Frames (which carry the sender's User-Id) with ``frames``.  A drain
    that saw the socket empty leaves it untouched (see :class:`_ZmqPoller`)."""
    sock = wrapper.socket
    recv = partial(sock.recv_multipart, copy=False) if frames else \
        sock.recv_multipart if multipart else sock.recv
    wrapper.touched = True
    for _ in range(limit):
        try:
            yield recv(NOBLOCK)
        except zmq.Again:
            wrapper.touched = False
            return
        if not _get(sock, EVENTS) & POLLIN:
            wrapper.touched = False
            return


class _ZmqSocket:
    """What every zrepl socket does alike: non-blocking, closed at once.

    ``touched``: the socket was used since the engine's poller last asked
    it whether a message waits - and any use may consume the wake-up of its
    notification descriptor, so the poller must ask again before it sleeps
    on that descriptor (:class:`_ZmqPoller`)."""

    touched = True

    def __init__(self, sock: zmq.Socket):
        self.socket = sock
        self._fd = -1

    @property
    def fd(self) -> int:
        """The socket's notification descriptor (ZMQ_FD)."""
        if self._fd < 0:
            self._fd = _get(self.socket, ZMQ_FD)
        return self._fd

    def send(self, payload: bytes) -> bool:
        self.touched = True
        try:
            _send(self.socket, payload, NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def recv(self) -> bytes | None:
        self.touched = True
        try:
            return self.socket.recv(NOBLOCK)
        except zmq.ZMQError:
            return None

    def close(self) -> None:
        self.socket.close(linger=0)


class _ZmqRouter(_ZmqSocket, Router):
    def drain(self, limit: int) -> Iterator[tuple[Any, bytes]]:
        for frames in _drain(self, True, limit):
            if len(frames) < 2:
                self.dropped += 1
                continue
            yield frames[:-1], frames[-1]

    def reply(self, handle: Any, payload: bytes) -> bool:
        self.touched = True
        try:
            self.socket.send_multipart(handle + [payload], NOBLOCK)
            return True
        except zmq.ZMQError:
            return False


class Handle(list):
    """A request's routing frames, and the key that sent it: ``user`` is
    its ROLE:NAME, ``role`` the ROLE (see :mod:`zrepl.engine.security`)."""

    role = ""
    user = ""


class _SecureRouter(_ZmqRouter):
    """A CURVE router: each request's handle carries its sender's role;
    requests from a role not in ``roles`` are refused here and counted, and
    answered with ``denied(role)`` when that is given (a reply, so the
    caller hears why; without it they are dropped)."""

    def __init__(self, sock: zmq.Socket, roles: tuple[str, ...], denied: Any):
        super().__init__(sock)
        self.roles = roles
        self.denied_reply = denied

    def drain(self, limit: int) -> Iterator[tuple[Any, bytes]]:
        for frames in _drain(self, True, limit, frames=True):
            if len(frames) < 2:
                self.dropped += 1
                continue
            handle = Handle(frames[:-1])
            handle.user = frames[-1].get("User-Id") or ""
            handle.role = role_of(handle.user)
            if handle.role not in self.roles:
                self.denied += 1
                if self.denied_reply is not None:
                    self.reply(handle, self.denied_reply(handle.role))
                continue
            yield handle, frames[-1].bytes


class _ZmqReceiver(_ZmqSocket, Receiver):
    def __init__(self, sock: zmq.Socket):
        super().__init__(sock)
        self._items = [(sock, POLLIN)]
        self._rcvtimeo = -1

    def drain(self, limit: int) -> Iterator[bytes]:
        return _drain(self, False, limit)

    def wait(self, timeout: float) -> bool:
        self.touched = True
        return bool(_zmq_poll(self._items, max(1, int(timeout * 1000 + 0.999))))

    def recv_wait(self, timeout: float) -> bytes | None:
        # The caller reading its ack, on the commit path: a receive that
        # blocks up to ``timeout`` makes half the system calls of a
        # zmq_poll and a receive (libzmq polls its mailbox twice in each).
        ms = max(1, int(timeout * 1000 + 0.999))
        sock = self.socket
        self.touched = True
        if ms != self._rcvtimeo:
            _set(sock, RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            return sock.recv()
        except zmq.ZMQError:  # (Again: nothing within the timeout)
            return None


class _SecureReceiver(_ZmqReceiver):
    """A CURVE pull socket that takes messages from node keys only, and
    with ``only_from`` set, from that one key (ROLE:NAME) only; the others
    are dropped and counted."""

    def __init__(self, sock: zmq.Socket, only_from: str | None = None):
        super().__init__(sock)
        self.only_from = only_from

    def drain(self, limit: int) -> Iterator[bytes]:
        for frames in _drain(self, True, limit, frames=True):
            frame = frames[-1]
            user = frame.get("User-Id") or ""
            if role_of(user) != "node" or self.only_from is not None and user != self.only_from:
                self.denied += 1
                continue
            yield frame.bytes

    def recv(self) -> bytes | None:
        for payload in self.drain(1):
            return payload
        return None

    def recv_wait(self, timeout: float) -> bytes | None:
        self.touched = True
        if _zmq_poll(self._items, max(1, int(timeout * 1000 + 0.999))):
            return self.recv()
        return None


class _ZmqPusher(_ZmqSocket, Pusher):
    def send_wait(self, payload: bytes, timeout: float) -> bool:
        sock = self.socket
        self.touched = True
        try:
            _send(sock, payload, NOBLOCK)
            return True
        except zmq.Again:
            if not sock.poll(int(timeout * 1000), POLLOUT):
                return False
            return self.send(payload)
        except zmq.ZMQError:
            return False


class _ZmqRequester(_ZmqSocket, Requester):
    def wait(self, timeout: float) -> bool:
        self.touched = True
        return bool(self.socket.poll(max(0, int(timeout * 1000)), zmq.POLLIN))


class _ZmqPoller(Poller):
    """Waits on ZeroMQ sockets through their notification descriptors
    (ZMQ_FD), and on plain descriptors, with one ``poll(2)``.

    libzmq's own zmq_poll asks every socket for its events (a ``poll`` and
    a ``getpid`` system call each) before it sleeps and again after: ~20
    system calls a turn for a node's five sockets.  A notification
    descriptor, though, only turns readable when something happens on the
    socket, and any use of the socket may consume that; so this poller
    asks (ZMQ_EVENTS) only the sockets used since it last asked
    (``touched``, set by every wrapper method) and those whose descriptor
    turned readable, and otherwise sleeps on the descriptors."""

    def __init__(self) -> None:
        self._items: list = []
        self._sockets: list = []  # the ZeroMQ items of _items
        self._by_fd: dict[int, Any] = {}
        self._poll = select.poll()

    def poll(self, items: list, timeout: float) -> set:
        if items != self._items:  # registrations change only when the set does
            self._update(items)
        ready = set()
        for item in self._sockets:
            if item.touched:
                if _get(item.socket, EVENTS) & POLLIN:
                    ready.add(item)  # (stays touched: the caller reads it)
                else:
                    item.touched = False
        by_fd = self._by_fd
        for fd, _ in self._poll.poll(0 if ready else max(0, int(timeout * 1000))):
            item = by_fd[fd]
            if type(item) is int:
                ready.add(item)
            elif item not in ready and _get(item.socket, EVENTS) & POLLIN:
                ready.add(item)
                item.touched = True
        return ready

    def _update(self, items: list) -> None:
        """Register what is new in ``items``, unregister what left (the
        engine adds and drops its ack and follower sockets as links come
        and go and batches fly)."""
        by_fd = self._by_fd
        want = {}
        for item in items:
            want[item if isinstance(item, int) else item.fd] = item
        for fd in [fd for fd, item in by_fd.items() if want.get(fd) is not item]:
            self._poll.unregister(fd)
            del by_fd[fd]
        for fd, item in want.items():
            if fd not in by_fd:
                if not isinstance(item, int):
                    item.touched = True  # (new to the set: ask it)
                self._poll.register(fd, select.POLLIN)
                by_fd[fd] = item
        self._sockets = [item for item in items if not isinstance(item, int)]
        self._items = list(items)


class ZmqTransport(Transport):
    """ZeroMQ sockets in one context (``tcp://`` and ``ipc://``).  With a
    :class:`~zrepl.security.Security`, every socket it binds is a CURVE
    server behind a ZAP handler admitting the trust directory's keys, and
    every socket it connects a CURVE client of its endpoint's key."""

    threaded = True

    def __init__(self, context: zmq.Context | None = None, security: Security | None = None):
        self._own = context is None
        self.context = context or zmq.Context()
        self.security = security
        self._gate: Gatekeeper | None = None
        if security is not None:
            self._gate = Gatekeeper(self.context, security)
            self._gate.start()

    def _sock(self, kind: int, endpoint: str, bind: bool, config: Config,
              options: dict[int, int] | None = None,
              roles: tuple[str, ...] | None = None) -> zmq.Socket:
        """A socket with zrepl's limits; ``options`` are set before it binds
        or connects (high-water marks only apply to pipes made after)."""
        s = self.context.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        if bind:  # a connection that never completes its handshake is closed soon
            s.setsockopt(zmq.HANDSHAKE_IVL, int(config.handshake_timeout * 1000))
        for opt, value in (options or {}).items():
            s.setsockopt(opt, value)
        try:
            domain = f"zrepl {endpoint}"  # (each endpoint its own ZAP domain and cap)
            if self.security is not None:
                if bind:
                    self.security.serve(s, domain)
                else:
                    self.security.connect_to(s, endpoint)
            if bind:
                s.bind(endpoint)
                if endpoint.startswith("ipc://"):
                    # only this user's processes may connect, whatever the umask
                    os.chmod(endpoint[len("ipc://"):], 0o600)
                if self._gate is not None:
                    self._gate.watch(s, domain, config.max_connections, roles)
            else:
                s.connect(endpoint)
        except (zmq.ZMQError, KeyFileError, OSError) as exc:
            s.close(linger=0)
            raise ReplicationError(f"cannot {'bind' if bind else 'connect'} {endpoint}: "
                                   f"{exc}") from None
        return s

    def _router(self, sock: zmq.Socket, roles: tuple[str, ...], denied: Any = None
                ) -> _ZmqRouter:
        if self.security is None:
            return _ZmqRouter(sock)
        return _SecureRouter(sock, roles, denied)

    def bind(self, endpoints: Any, config: Config) -> NodeEndpoints:
        socks: list[zmq.Socket] = []
        try:
            # A ROUTER drops replies past its high-water mark; clients bound
            # what they have outstanding, so a deep queue costs little, and
            # ROUTER_MANDATORY makes a full queue visible instead of silent.
            client_opts = {zmq.SNDHWM: config.client_reply_queue, zmq.ROUTER_MANDATORY: 1}
            # Each endpoint takes messages only as large as what it carries:
            # a larger one drops its sender's connection (ZMQ_MAXMSGSIZE),
            # and queues are bounded (receive high-water marks).
            hwm = config.ack_queue_messages
            cap = config.max_message_bytes  # (no endpoint takes more than this)
            client_opts.update({zmq.MAXMSGSIZE: min(cap, config.max_client_bytes),
                                zmq.RCVHWM: hwm})
            for kind, endpoint, opts in (
                    (zmq.ROUTER, endpoints.control,
                     {zmq.MAXMSGSIZE: min(cap, config.max_control_bytes), zmq.RCVHWM: 1000}),
                    (zmq.PULL, endpoints.data, {zmq.RCVHWM: config.data_queue_messages}),
                    (zmq.PULL, endpoints.ack, {zmq.MAXMSGSIZE: min(cap, config.max_ack_bytes),
                                               zmq.RCVHWM: hwm}),
                    (zmq.ROUTER, endpoints.client, client_opts)):
                socks.append(self._sock(kind, endpoint, True, config, opts))
        except BaseException:
            for s in socks:
                s.close(linger=0)
            raise
        control, data, ack, client = socks
        # (which control calls each role may make is the control server's
        # to say; the client endpoint takes clients and operators only; data
        # only from the key of the upstream's handshake, none before one)
        if self.security is None:
            data_in, ack_in = _ZmqReceiver(data), _ZmqReceiver(ack)
        else:
            data_in, ack_in = _SecureReceiver(data, only_from=""), _SecureReceiver(ack)
        return NodeEndpoints(self._router(control, ROLES, denied_control), data_in, ack_in,
                             self._router(client, ("client", "operator")))

    def reads_frontend(self, endpoint: str, config: Config) -> zmq.Socket:
        """The ROUTER of a reader process (its messages are not checked per
        role in Python, so with keys only clients' and operators' keys are
        admitted at all)."""
        return self._sock(zmq.ROUTER, endpoint, True, config,
                          {zmq.MAXMSGSIZE: min(config.max_message_bytes, config.max_client_bytes),
                           zmq.RCVHWM: config.ack_queue_messages,
                           zmq.SNDHWM: config.client_reply_queue},
                          roles=("client", "operator"))

    def router(self, endpoint: str, config: Config, max_message_bytes: int) -> Router:
        return self._router(self._sock(zmq.ROUTER, endpoint, True, config,
                                       {zmq.MAXMSGSIZE: max_message_bytes}), ROLES)

    def pusher(self, endpoint: str, config: Config, hwm: int, immediate: bool = False
               ) -> Pusher:
        opts = {zmq.SNDHWM: hwm}
        if immediate:
            # a send fails at once while the peer is not connected, instead
            # of queueing for a peer that may be gone
            opts[zmq.IMMEDIATE] = 1
        return _ZmqPusher(self._sock(zmq.PUSH, endpoint, False, config, opts))

    def requester(self, endpoint: str, config: Config) -> Requester:
        return _ZmqRequester(self._sock(zmq.REQ, endpoint, False, config))

    def poller(self) -> Poller:
        return _ZmqPoller()

    def refused_connections(self) -> int:
        return sum(self._gate.refused.values()) if self._gate is not None else 0

    def close(self) -> None:
        if self._gate is not None:
            self._gate.stop()
            self._gate = None
        if self._own:
            self.context.destroy(linger=0)


def denied_control(role: str) -> bytes:
    """The reply to a control call the caller's role may not make."""
    return protocol.control_err(PermissionDenied(f"a {role or 'unknown'} key may not make "
                                                 "this call"))
