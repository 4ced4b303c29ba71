"""CURVE keys, the trust directory, and who may connect.

Every member of a secured cluster has a key pair: a node, the supervisor,
an operator (``zrepl status``, a person with ``NodeClient``) or a client.
``python3 -m zrepl keygen`` writes ``NAME.key`` (public) and
``NAME.key_secret`` (mode 0600), in ZeroMQ's certificate format, with the
member's *role* - and, for a node or a supervisor, its *endpoint* - in the
public file's metadata.

The **trust directory** holds the public files of every member.  From it a
process learns

- which client keys may connect to its endpoints, and with which role (a
  ZAP handler - pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator` - gives
  every connection the User-Id ``ROLE:NAME``), and
- the server key of each endpoint it connects to (the node or supervisor
  whose metadata names that endpoint).

A process is secured when it is given a key (``key = "PATH.key_secret"``)
and a trust directory (``trust = "DIR"``); then every socket it binds is a
CURVE server and every socket it connects is a CURVE client.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from ..core import protocol
from ..core.errors import ReplicationError
from ..storage.fsutil import create, make_dir

ROLES = ("node", "supervisor", "operator", "client")
# roles whose key files name the endpoint they serve
SERVING_ROLES = ("node", "supervisor")
ZAP_DOMAIN = "zrepl"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeyFileError(ReplicationError):
    """A key file or trust directory that cannot be used (one line why)."""


@dataclass(frozen=True)
class Member:
    """One public key of the trust directory."""

    name: str
    role: str
    public: bytes  # z85
    endpoint: str = ""


def _write_cert(path: Path, public: bytes, secret: bytes | None, metadata: dict[str, str]
                ) -> None:
    """A certificate in ZeroMQ's (zcert) format, created with mode 0600 for
    a secret and 0644 for a public file, whatever the umask; never over an
    existing file."""
    lines = ["#   ZeroMQ CURVE " + ("**Secret** Certificate: keep it to this member" if secret
                                    else "Public Certificate (zrepl)"), "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in metadata.items()]
    lines += ["curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    fd = create(path, os.O_WRONLY | os.O_EXCL, 0o600 if secret is not None else 0o644)
    try:
        os.write(fd, ("\n".join(lines) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def keygen(out: str | os.PathLike, name: str, role: str, endpoint: str = ""
           ) -> tuple[Path, Path]:
    """Make a key pair for member ``name``; returns (public file, secret file)."""
    if role not in ROLES:
        raise KeyFileError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not _NAME.match(name):
        raise KeyFileError(f"name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    if role in SERVING_ROLES:
        if not endpoint:
            raise KeyFileError(f"a {role} key needs --endpoint (the address it serves on)")
        try:
            protocol.endpoints(endpoint)
        except ValueError as exc:
            raise KeyFileError(str(exc)) from None
    elif endpoint:
        raise KeyFileError(f"a {role} serves nothing: no --endpoint")
    out = Path(out)
    make_dir(out)
    public_path, secret_path = out / f"{name}.key", out / f"{name}.key_secret"
    for p in (public_path, secret_path):
        if p.exists():
            raise KeyFileError(f"{p} exists: not overwriting a key")
    public, secret = zmq.curve_keypair()
    meta = {"name": name, "role": role}
    if endpoint:
        meta["endpoint"] = endpoint
    _write_cert(secret_path, public, secret, meta)
    _write_cert(public_path, public, None, meta)
    return public_path, secret_path


def _metadata(path: Path) -> dict[str, str]:
    meta: dict[str, str] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            section = raw.strip()
            continue
        if section == "metadata" and "=" in raw:
            k, _, v = raw.partition("=")
            meta[k.strip()] = v.strip().strip('"\'')
    return meta


def load_member(path: str | os.PathLike) -> Member:
    path = Path(path)
    try:
        public, _ = zmq.auth.load_certificate(path)
        meta = _metadata(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key {path}: {exc}") from None
    role = meta.get("role", "")
    if role not in ROLES:
        raise KeyFileError(f"{path}: no zrepl role in its metadata (make keys with "
                           "'python3 -m zrepl keygen')")
    return Member(meta.get("name", path.stem), role, public, meta.get("endpoint", ""))


@dataclass
class Security:
    """A secured process's own key pair and its trust directory."""

    me: Member
    secret: bytes
    members: dict[bytes, Member] = field(default_factory=dict)  # public key -> member
    servers: dict[str, bytes] = field(default_factory=dict)  # endpoint -> server key

    @classmethod
    def load(cls, key: str | os.PathLike, trust: str | os.PathLike) -> "Security":
        key = Path(key)
        me = load_member(key)
        try:
            _, secret = zmq.auth.load_certificate(key)
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"cannot read key {key}: {exc}") from None
        if not secret:
            raise KeyFileError(f"{key} holds no secret key (give the .key_secret file)")
        mode = key.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyFileError(f"{key} is readable by others (mode {mode:o}): chmod 600 it")
        trust = Path(trust)
        if not trust.is_dir():
            raise KeyFileError(f"trust directory {trust} does not exist")
        sec = cls(me, secret)
        for path in sorted(trust.glob("*.key")):
            m = load_member(path)
            sec.members[m.public] = m
            if m.endpoint:
                eps = protocol.endpoints(m.endpoint)
                if m.role == "node":  # its reader processes serve with its key
                    for ep in _reads(m.endpoint):  # (first: a node's own ports win)
                        sec.servers.setdefault(ep, m.public)
                for ep in (eps.control, eps.data, eps.ack, eps.client) \
                        if m.role == "node" else (m.endpoint,):
                    sec.servers[ep] = m.public
        if me.public not in sec.members:
            raise KeyFileError(f"{trust} does not hold this member's own public key "
                               f"({me.name}.key)")
        return sec

    def server_key(self, endpoint: str) -> bytes:
        try:
            return self.servers[endpoint]
        except KeyError:
            raise KeyFileError(f"no key in the trust directory serves {endpoint} (make one "
                               "with 'zrepl keygen --endpoint ...')") from None

    def serve(self, sock: zmq.Socket, domain: str = ZAP_DOMAIN) -> None:
        """Make ``sock`` (before it binds) a CURVE server of this member;
        its handshakes go to the ZAP handler under ``domain``."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.me.public
        sock.curve_server = True
        sock.zap_domain = domain.encode()

    def connect_to(self, sock: zmq.Socket, endpoint: str) -> None:
        """Make ``sock`` (before it connects) a CURVE client of ``endpoint``."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.me.public
        sock.curve_serverkey = self.server_key(endpoint)


def _reads(address: str) -> list[str]:
    """The endpoints a node's reader processes may bind (with its key)."""
    for n in range(protocol.MAX_READERS, -1, -1):
        try:
            return protocol.read_endpoints(address, n)
        except ValueError:
            continue
    return []


def from_config(config: Any | None) -> Security | None:
    """The Security of a process configured with ``key`` and ``trust``
    (``zrepl.Config``), or None when it runs without keys (or without a
    config).  A key that cannot be used is a KeyFileError naming why."""
    if config is None or not config.key:
        return None
    return Security.load(config.key, config.trust)


def check_exposure(listen: str, config: Any) -> None:
    """Secure by default: a process that listens on TCP beyond loopback
    must have keys, unless ``insecure`` says otherwise on purpose."""
    if not listen.startswith("tcp://") or config.key or config.insecure:
        return
    host = urlsplit(listen).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ReplicationError(
            f"refusing to listen on {listen} without keys: anyone who reaches it could read "
            "and rewrite the cluster (give key and trust - see README, Security - or set "
            "insecure = true on purpose)")


class Gatekeeper(ThreadAuthenticator):
    """The ZAP handler of one context: admits keys of the trust directory
    and labels each connection ``ROLE:NAME`` (its User-Id).

    Each watched endpoint has its own ZAP domain and a cap on the
    connections it holds: a socket monitor reports each connection
    accepted (with its descriptor) and each one closed, and beyond the cap
    a handshake is refused, so the node keeps descriptors for its own work.
    The monitors are read by the ZAP handler itself, just before it judges
    a handshake: libzmq reports a connection accepted before its handshake
    asks, so the count then includes the connection asking.  (A connection
    that never handshakes is closed after handshake_timeout.)"""

    def __init__(self, context: zmq.Context, security: Security):
        super().__init__(context)
        self.security = security
        self._caps: dict[str, int] = {}
        self._live: dict[str, set[int]] = {}
        self.refused: dict[str, int] = {}  # domain -> handshakes refused at the cap
        self._monitors: dict[zmq.Socket, str] = {}
        self._roles: dict[str, tuple[str, ...]] = {}  # domain -> the roles it admits (all if absent)
        self._lock = threading.Lock()  # the monitor sockets: watch(), the ZAP thread, live()

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(ZAP_DOMAIN, self)

    def watch(self, sock: zmq.Socket, domain: str, cap: int,
              roles: tuple[str, ...] | None = None) -> None:
        """Admit at most ``cap`` open connections to ``sock`` (served under
        ``domain``), and with ``roles``, only keys of those roles (a socket
        whose messages are not checked per role, like a reader process's); call once it
        is bound."""
        if roles is not None:
            self._roles[domain] = roles
        mon = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        with self._lock:
            self._caps[domain] = cap
            self._live[domain] = set()
            self.refused[domain] = 0
            self._monitors[mon] = domain
        self.configure_curve_callback(domain, self)

    def _catch_up(self) -> None:
        """Apply the monitors' waiting events (the lock held)."""
        for mon, domain in self._monitors.items():
            live = self._live[domain]
            while True:
                try:
                    event = recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_ACCEPTED:  # (its value is the descriptor)
                    live.add(event["value"])
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    live.discard(event["value"])

    def live(self, domain: str) -> int:
        with self._lock:
            self._catch_up()
            return len(self._live.get(domain, ()))

    def stop(self) -> None:
        super().stop()
        with self._lock:
            for mon in self._monitors:
                mon.close(linger=0)
            self._monitors.clear()

    def callback(self, domain: str, key: bytes) -> bool:
        member = self.security.members.get(key)
        if member is None:
            return False
        roles = self._roles.get(domain)
        if roles is not None and member.role not in roles:
            return False
        cap = self._caps.get(domain)
        if cap is None:
            return True
        with self._lock:
            self._catch_up()
            if len(self._live[domain]) > cap:  # (the connection asking is counted)
                self.refused[domain] += 1
                return False
        return True

    def curve_user_id(self, client_public_key: bytes) -> str:
        m = self.security.members.get(zmq.utils.z85.encode(client_public_key))
        return f"{m.role}:{m.name}" if m is not None else ""


def role_of(user_id: Any) -> str:
    """The role part of a connection's User-Id ("" when unsecured)."""
    if not user_id:
        return ""
    return str(user_id).partition(":")[0]


__all__ = ["ROLES", "KeyFileError", "Member", "Security", "Gatekeeper", "check_exposure",
           "from_config", "keygen", "load_member", "role_of"]
