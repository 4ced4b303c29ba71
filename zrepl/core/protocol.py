"""Wire protocol: endpoints, frames, error mapping.  No sockets here.

Every message is msgpack and starts with the protocol version.  Three
kinds of traffic:

* **control** (REQ -> ROUTER): a map ``{"v": 1, "op": NAME, "args": {...}}``;
  the reply is ``{"v": 1, "ok": RESULT}`` or ``{"v": 1, "err": [TYPE, MESSAGE,
  EXTRA]}``.  Not on the hot path, so readable maps.
* **data** (PUSH -> PULL, downstream): arrays, one msgpack call per batch::

      [1, WAL,         leader_id, stream, first_wal_id, [data, ...], history]
      [1, STATE_BEGIN, leader_id, stream, snapshot_wal_id, zrepl_section]
      [1, STATE,       leader_id, stream, seq, [data, ...]]
      [1, STATE_ZREPL, leader_id, stream, seq, {"sessions": ...}]
      [1, STATE_END,   leader_id, stream, snapshot_wal_id, entry_count]

* **acks** (PUSH -> PULL, upstream)::

      [1, ACK, stream, kind, position, codes, error(, downstream)]

  and, straight to the head of a chain from its deeper members (see
  ``NodeCore``, "Acknowledgement topology")::

      [1, MEMBER_ACK,  leader_id, first, last, codes, member, downstream]
      [1, MEMBER_DROP, leader_id, first, last, member, dropped, error]

  ``kind`` is WAL or STATE; ``position`` the batch's last WAL id (WAL) or
  its sequence number (STATE); ``codes`` the response codes as little-endian
  uint16 bytes, so the leader compares a whole batch with one ``==``;
  ``error`` is None or ``[TYPE, MESSAGE]``.  ``downstream``, when present
(sent to the chain's head only), is the follower this node forwarded the
batch to: the head waits for that member's MEMBER_ACK of the same batch
too.  A MEMBER_ACK says ``member`` logged and applied WAL ``first..last``
of epoch ``leader_id`` with ``codes`` (and forwarded it to ``downstream``,
if not ""); a MEMBER_DROP says ``member``'s link to ``dropped`` failed
with those entries in flight: the head stops waiting for ``dropped`` (and
whatever it announced), or, with an ``error``, fails them.

``history`` is the sender's epoch history when it changed since the last
batch of the stream (always in the first), else None: it travels down a
chain with the entries it describes.

``stream`` is a random token the upstream picks at each handshake: a
follower accepts data only from the stream it last agreed to, and an
upstream ignores acks of any other stream, so a deposed leader's leftovers
can never be confused with the current conversation.

Client submissions (REQ/DEALER -> ROUTER on the client endpoint)::

      request: [1, "submit", request_id, data, client_id, seq]
      reply:   [1, request_id, code, error]      (error None on success)

``client_id`` (16 bytes) and ``seq`` identify the command across retries
(see ``session.py``); both may be None (no de-duplication).

Reads (``App.query``) on the same endpoint::

      request: [1, "query", request_id, request, leader_only]
      reply:   [1, request_id, answer, error]
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgpack

from . import errors

PROTOCOL_VERSION = 1

# data message kinds
WAL = 1
STATE_BEGIN = 2
STATE = 3
STATE_END = 4
ACK = 5
STATE_ZREPL = 6  # zrepl's own state in a state sync (client sessions), before the App's
MEMBER_ACK = 7  # a chain member's ack, straight to the head
MEMBER_DROP = 8  # a chain member's follower will not ack these (its link failed)

# one Packer for every message (msgpack.packb would make one per call);
# pack() runs holding the GIL, so threads may share it
packb = msgpack.Packer(use_bin_type=True).pack


_unpackb = msgpack.unpackb


def unpackb(raw: bytes) -> Any:
    return _unpackb(raw, strict_map_key=False)


def _decode(raw: bytes, what: str) -> Any:
    """``raw`` unpacked, or ProtocolError("malformed WHAT: ...")."""
    try:
        return unpackb(raw)
    except Exception as exc:  # msgpack raises several types
        raise errors.ProtocolError(f"malformed {what}: {exc}") from None


def _check_version(version: Any) -> None:
    if version != PROTOCOL_VERSION:
        raise errors.ProtocolError(
            f"protocol version {version!r} not supported (this node speaks {PROTOCOL_VERSION})")


# --- endpoints ------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    control: str
    data: str
    ack: str
    client: str


MAX_READERS = 16
"""Reader processes a node may run (each binds an endpoint of its own)."""


def read_endpoints(address: str, count: int) -> list[str]:
    """Where a node's ``count`` reader processes answer reads, one endpoint
    each: ``PORT+4``, ``PORT+5``... for ``tcp://HOST:PORT``; ``PATH.read0``,
    ``PATH.read1``... for ``ipc://PATH``."""
    eps = endpoints(address)
    if not 0 <= count <= MAX_READERS:
        raise ValueError(f"readers must be 0..{MAX_READERS}; got {count}")
    if address.startswith("ipc://"):
        return [f"{address}.read{i}" for i in range(count)]
    host, _, port = eps.client.rpartition(":")
    last = int(port) + count
    if last > 65535:
        raise ValueError(f"{count} reader processes need ports up to {last}: {address!r} is "
                         "too high")
    return [f"{host}:{int(port) + 1 + i}" for i in range(count)]


def endpoints(address: str) -> Endpoints:
    """Derive a node's four endpoints from its address.

    ``tcp://HOST:PORT`` uses PORT (control), PORT+1 (data), PORT+2 (acks)
    and PORT+3 (clients); ``ipc://PATH`` uses PATH, PATH.data, PATH.ack and
    PATH.client.  Raises ``ValueError`` for anything else.
    """
    if not isinstance(address, str) or not address:
        raise ValueError(f"node address must be a non-empty string, got {address!r}")
    if address.startswith("ipc://"):
        path = address[len("ipc://"):]
        if not path:
            raise ValueError(f"ipc address needs a path: {address!r}")
        return Endpoints(address, f"{address}.data", f"{address}.ack", f"{address}.client")
    if address.startswith("tcp://"):
        parts = urlsplit(address)
        try:
            port = parts.port
        except ValueError:
            port = None
        host = parts.hostname
        if not host or port is None or not 0 < port <= 65532:
            raise ValueError(f"tcp address must be tcp://HOST:PORT with PORT <= 65532 "
                             f"(four consecutive ports are used), got {address!r}")
        h = f"[{host}]" if ":" in host else host
        return Endpoints(*(f"tcp://{h}:{port + i}" for i in range(4)))
    raise ValueError(f"node address must start with tcp:// or ipc://, got {address!r}")


# --- codes ----------------------------------------------------------------------------


def codes_to_bytes(codes: Any) -> bytes:
    """Response codes as compact uint16 bytes; raises ValueError on codes
    that are not ints in 0..65535 (an App bug)."""
    try:
        a = array("H", codes)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"App.apply must return ints in 0..65535: {exc}") from None
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def codes_from_bytes(raw: bytes) -> list[int]:
    a = array("H")
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


# --- errors on the wire ----------------------------------------------------------------

_ERROR_TYPES = {cls.__name__: cls for cls in (
    errors.ReplicationError, errors.NotLeader, errors.StaleLeader, errors.Timeout,
    errors.ProtocolError, errors.StorageError, errors.WALTruncated, errors.StorageLocked,
    errors.CorruptStorage, errors.FollowerMismatch, errors.WALGap, errors.SessionExpired,
    errors.WrongUpstream, errors.StaleUpstream, errors.PermissionDenied)}


def error_to_wire(exc: BaseException) -> list:
    extra: dict[str, Any] = {}
    if isinstance(exc, errors.NotLeader):
        extra["leader_address"] = exc.leader_address
    elif isinstance(exc, errors.StaleLeader):
        extra["leader_id"] = exc.leader_id
        extra["current_leader_id"] = exc.current_leader_id
    name = type(exc).__name__ if type(exc).__name__ in _ERROR_TYPES else "ReplicationError"
    return [name, str(exc), extra]


def error_from_wire(err: Any) -> errors.ReplicationError:
    """Rebuild the exception a peer reported.  A malformed error report is
    itself a ProtocolError."""
    if not isinstance(err, (list, tuple)) or len(err) < 2 or not isinstance(err[1], str):
        return errors.ProtocolError(f"malformed error report from peer: {err!r:.200}")
    name, message = err[0], err[1]
    extra = err[2] if len(err) > 2 and isinstance(err[2], dict) else {}
    cls = _ERROR_TYPES.get(name, errors.ReplicationError)
    if cls is errors.NotLeader:
        return errors.NotLeader(message, str(extra.get("leader_address", "") or ""))
    if cls is errors.StaleLeader:
        return errors.StaleLeader(message, int(extra.get("leader_id", 0) or 0),
                                  int(extra.get("current_leader_id", 0) or 0))
    if cls is errors.WALTruncated:
        return errors.WALTruncated(message)
    return cls(message)


# --- control messages ------------------------------------------------------------------


def control_request(op: str, args: dict[str, Any]) -> bytes:
    return packb({"v": PROTOCOL_VERSION, "op": op, "args": args})


def control_ok(result: Any) -> bytes:
    return packb({"v": PROTOCOL_VERSION, "ok": result})


def control_err(exc: BaseException) -> bytes:
    return packb({"v": PROTOCOL_VERSION, "err": error_to_wire(exc)})


def parse_control_request(raw: bytes) -> tuple[str, dict[str, Any]]:
    """Decode a control request; raises ProtocolError naming what is wrong."""
    msg = _decode(raw, "control frame")
    if not isinstance(msg, dict):
        raise errors.ProtocolError("control frame must be a map")
    _check_version(msg.get("v"))
    op, args = msg.get("op"), msg.get("args", {})
    if not isinstance(op, str) or not isinstance(args, dict):
        raise errors.ProtocolError("control frame needs a string 'op' and a map 'args'")
    return op, args


def parse_control_reply(raw: bytes) -> Any:
    """Return the result of a control reply or raise the error it carries."""
    msg = _decode(raw, "control reply")
    if not isinstance(msg, dict) or msg.get("v") != PROTOCOL_VERSION:
        raise errors.ProtocolError(f"control reply of an unknown protocol version: {msg!r:.200}")
    if "err" in msg:
        raise error_from_wire(msg["err"])
    if "ok" not in msg:
        raise errors.ProtocolError("control reply carries neither 'ok' nor 'err'")
    return msg["ok"]


# --- data and ack messages ----------------------------------------------------------------


def wal_message(leader_id: int, stream: int, first_id: int, datas: list[bytes],
                history: list | None = None) -> bytes:
    return packb([PROTOCOL_VERSION, WAL, leader_id, stream, first_id, datas, history])


def wal_frame(leader_id: int, stream: int, first_id: int, payload: bytes,
              history: list | None = None) -> bytes:
    """:func:`wal_message` around ``payload``, the entries packed already
    (``packb(datas)``, which the WAL record stores too): the same bytes,
    without packing the entries a second time."""
    return b"\x97" + packb((PROTOCOL_VERSION, WAL, leader_id, stream, first_id))[1:] + \
        payload + packb(history)


def wal_payload(raw: bytes, msg: list) -> bytes | None:
    """The entries of a parsed WAL message (``parse_data``) as they are
    packed in ``raw``, for the WAL to store without packing them again;
    None unless the message is framed as :func:`wal_frame` frames it (the
    caller then packs them itself).  Exact: the bytes before the entries
    must be the canonical packing of the five values decoded from them, so
    the entries begin where those end, and a message without a history
    ends in the one byte of msgpack's nil."""
    if msg[6] is not None or raw[-1:] != b"\xc0":
        return None
    head = packb((PROTOCOL_VERSION, WAL, msg[2], msg[3], msg[4]))
    n = len(head)
    if raw[:1] != b"\x97" or raw[1:n] != head[1:]:
        return None
    return raw[n:-1]


def state_message(kind: int, leader_id: int, stream: int, position: int, payload: Any
                  ) -> bytes:
    """A state-sync data message: STATE_BEGIN (position: the snapshot's WAL
    id; payload: zrepl's section), STATE and STATE_ZREPL (position: batch
    sequence; payload: entries / zrepl's section), STATE_END (position: the
    WAL id; payload: the entry count)."""
    return packb([PROTOCOL_VERSION, kind, leader_id, stream, position, payload])


def ack_message(stream: int, kind: int, position: int, codes: bytes,
                error: BaseException | None = None, downstream: str = "") -> bytes:
    err = error_to_wire(error)[:2] if error is not None else None
    if downstream:
        return packb([PROTOCOL_VERSION, ACK, stream, kind, position, codes, err, downstream])
    return packb([PROTOCOL_VERSION, ACK, stream, kind, position, codes, err])


def member_ack_message(leader_id: int, first: int, last: int, codes: bytes, member: str,
                       downstream: str = "") -> bytes:
    return packb([PROTOCOL_VERSION, MEMBER_ACK, leader_id, first, last, codes, member,
                  downstream])


def member_drop_message(leader_id: int, first: int, last: int, member: str, dropped: str,
                        error: BaseException | None = None) -> bytes:
    err = error_to_wire(error)[:2] if error is not None else None
    return packb([PROTOCOL_VERSION, MEMBER_DROP, leader_id, first, last, member, dropped, err])


def _framed(raw: bytes, what: str) -> list:
    """``raw`` unpacked as ``[version, kind, ...]`` of this protocol's
    version, or ProtocolError("malformed WHAT frame: ...")."""
    try:
        msg = _unpackb(raw, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types
        raise errors.ProtocolError(f"malformed {what} frame: {exc}") from None
    if type(msg) is not list or len(msg) < 2:
        raise errors.ProtocolError(f"{what} frame must be an array [version, kind, ...]")
    if msg[0] != PROTOCOL_VERSION:
        _check_version(msg[0])
    return msg


def parse_data(raw: bytes) -> list:
    """Decode and shape-check a data or ack message; ProtocolError if bad."""
    msg = _framed(raw, "data")
    kind = msg[1]
    n = len(msg)
    if kind == WAL and n == 7:  # the hottest shape first
        # (item types are checked by Storage.write_wal_data, in one C-level pass)
        _, _, a, b, c, datas, history = msg
        ok = (type(a) is int and type(b) is int and type(c) is int and a >= 0 and b >= 0
              and c >= 0 and type(datas) is list and (history is None or _history_ok(history)))
    elif kind == ACK:
        ok = (n in (7, 8) and _uints(msg[2:5]) and type(msg[5]) is bytes
              and len(msg[5]) % 2 == 0 and (msg[6] is None or isinstance(msg[6], list)))
    elif kind == STATE:
        ok = n == 6 and _uints(msg[2:5]) and type(msg[5]) is list
    elif kind in (STATE_BEGIN, STATE_ZREPL):
        ok = n == 6 and _uints(msg[2:5]) and isinstance(msg[5], dict)
    elif kind == STATE_END:
        ok = n == 6 and _uints(msg[2:6])
    elif kind in (MEMBER_ACK, MEMBER_DROP):
        ok = n == 8  # (not data: dropped as an ack would be)
    else:
        ok = False
    if not ok:
        raise errors.ProtocolError(f"data frame of kind {kind!r} has the wrong shape")
    return msg


def parse_ack(raw: bytes) -> tuple:
    """A message of the ack endpoint, checked, in one pass (acks are read
    on every commit); ProtocolError if it is none of:

    * ``(ACK, stream, kind, position, codes, error, downstream)``
    * ``(MEMBER_ACK, leader_id, first, last, codes, member, downstream)``
    * ``(MEMBER_DROP, leader_id, first, last, member, dropped, error)``"""
    msg = _framed(raw, "ack")
    what, n = msg[1], len(msg)
    if what == ACK and (n == 7 or n == 8):
        stream, kind, position, codes, err = msg[2:7]
        down = msg[7] if n == 8 else ""
        if type(stream) is int and type(kind) is int and type(position) is int and \
                stream >= 0 and kind >= 0 and position >= 0 and type(codes) is bytes and \
                not len(codes) % 2 and (err is None or type(err) is list) and type(down) is str:
            return ACK, stream, kind, position, codes, err, down
    elif what == MEMBER_ACK and n == 8:
        _, _, leader_id, first, last, codes, member, down = msg
        if _uints((leader_id, first, last)) and 0 < first <= last and type(codes) is bytes \
                and not len(codes) % 2 and type(member) is str and type(down) is str:
            return MEMBER_ACK, leader_id, first, last, codes, member, down
    elif what == MEMBER_DROP and n == 8:
        _, _, leader_id, first, last, member, dropped, err = msg
        if _uints((leader_id, first, last)) and 0 < first <= last and type(member) is str \
                and type(dropped) is str and (err is None or type(err) is list):
            return MEMBER_DROP, leader_id, first, last, member, dropped, err
    elif what not in (ACK, MEMBER_ACK, MEMBER_DROP):
        raise errors.ProtocolError("expected an ack on the ack endpoint")
    raise errors.ProtocolError(f"ack frame of kind {what!r} has the wrong shape")


def _history_ok(h: Any) -> bool:
    return type(h) is list and all(type(x) is list and len(x) == 2 and _uints(x) for x in h)


def _uints(values: list) -> bool:
    for v in values:
        if type(v) is not int or v < 0:
            return False
    return True


# --- client submissions -------------------------------------------------------------------


def submit_request(request_id: int, data: bytes, client_id: bytes | None = None,
                   seq: int | None = None) -> bytes:
    return packb([PROTOCOL_VERSION, "submit", request_id, data, client_id, seq])


def submit_reply(request_id: Any, code: Any, error: BaseException | None = None,
                 wal_id: int | None = None, readers: str = "") -> bytes:
    """A client reply: ``code`` (a response code, or a query's answer) or
    ``error``; with ``wal_id``, the WAL id the node had applied when it
    answered (a query's answer reflects exactly it) and the endpoint of its
    reader processes ("" if none)."""
    msg = [PROTOCOL_VERSION, request_id, code, error_to_wire(error) if error is not None else None]
    if wal_id is not None:
        msg += [wal_id, readers]
    return packb(msg)


def query_request(request_id: int, request: bytes, leader_only: bool = False,
                  min_wal_id: int = 0) -> bytes:
    msg = [PROTOCOL_VERSION, "query", request_id, request, leader_only]
    if min_wal_id:
        msg.append(min_wal_id)
    return packb(msg)


def parse_client_request(raw: bytes) -> tuple[str, Any]:
    """("submit", (request_id, data, client_id, seq)) or ("query",
    (request_id, request, leader_only, min_wal_id)); ProtocolError if
    malformed."""
    msg = _decode(raw, "client frame")
    if type(msg) is list and len(msg) in (5, 6) and msg[:2] == [PROTOCOL_VERSION, "query"]:
        min_wal_id = msg[5] if len(msg) == 6 else 0
        if type(msg[3]) is not bytes or type(msg[4]) is not bool or \
                type(min_wal_id) is not int or not 0 <= min_wal_id < 2**63:
            raise errors.ProtocolError(
                "query frame is [version, 'query', id, bytes, bool(, min_wal_id >= 0)]")
        return "query", (msg[2], msg[3], msg[4], min_wal_id)
    return "submit", _parse_submit_msg(msg)


def _parse_submit_msg(msg: Any) -> tuple[Any, bytes, bytes | None, int | None]:
    if type(msg) is not list or len(msg) not in (4, 6):
        raise errors.ProtocolError(
            "client frame must be [version, op, request_id, data, client_id, seq]")
    _check_version(msg[0])
    if msg[1] != "submit" or type(msg[3]) is not bytes:
        raise errors.ProtocolError(f"unknown client op {msg[1]!r} or data not bytes")
    cid, seq = (msg[4], msg[5]) if len(msg) == 6 else (None, None)
    if cid is not None or seq is not None:
        if type(cid) is not bytes or len(cid) != 16 or type(seq) is not int or not 0 < seq < 2**63:
            raise errors.ProtocolError("client_id must be 16 bytes and seq an int > 0")
    return msg[2], msg[3], cid, seq


def parse_submit_reply(raw: bytes) -> tuple[Any, Any, errors.ReplicationError | None]:
    return parse_reply(raw)[:3]


def parse_reply(raw: bytes) -> tuple[Any, Any, errors.ReplicationError | None, int, str]:
    """(request_id, code or answer, error, WAL id (0: not said), readers'
    endpoint)."""
    msg = _decode(raw, "client reply")
    if type(msg) is not list or len(msg) not in (4, 6) or msg[0] != PROTOCOL_VERSION or \
            (len(msg) == 6 and (type(msg[4]) is not int or type(msg[5]) is not str)):
        raise errors.ProtocolError(f"unexpected client reply {msg!r:.200}")
    err = error_from_wire(msg[3]) if msg[3] is not None else None
    if len(msg) == 6:
        return msg[1], msg[2], err, msg[4], msg[5]
    return msg[1], msg[2], err, 0, ""
