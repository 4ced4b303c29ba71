"""Client sessions: how a retried command is recognised and not run twice.

Every WAL entry the engine writes is an *envelope*: one tag byte, then::

    tag 0  (PLAIN)   the App's command bytes
    tag 1  (CLIENT)  16-byte client id | u64 sequence | the App's command bytes

A remote client gives each command a (client id, sequence).  When the
command is applied - on the leader, on every follower, during a restart's
replay - its response code is recorded in the :class:`SessionTable`, which
is therefore replicated state: it travels in snapshots and checkpoints
(zrepl's own section) and is rebuilt from the WAL.  A submission whose
(client id, sequence) is already in the table is answered with the recorded
code instead of being logged again, so a client may retry a command whose
answer it lost - across a failover too - without applying it twice.

The table is bounded: ``window`` recent sequences per client and
``max_clients`` clients (the least recently active is forgotten).  A retry
older than what is kept is refused (:class:`SessionExpired`) rather than
risking a second application.  A client's sequence starts at 1, so a
command numbered above 1 from a client the table does not know comes from
a forgotten client and is refused too; ``zrepl.Client`` then starts a new
session if that was the command's first request (nothing can have been
applied), and raises ``SessionExpired`` otherwise.  One case cannot be told
apart: the retry of a client's very first command after it was forgotten
(``max_clients`` other clients active within one retry) is taken as new.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any, Callable

from .errors import SessionExpired

PLAIN = 0
CLIENT = 1
CLIENT_ID_BYTES = 16
_CLIENT_HEAD = struct.Struct("<B16sQ")  # tag, client id, sequence
_PLAIN_TAG = bytes([PLAIN])


def wrap_plain(data: bytes) -> bytes:
    return _PLAIN_TAG + data


def wrap_plain_all(datas: list[bytes]) -> list[bytes]:
    """:func:`wrap_plain` of a batch (TypeError if an item is not bytes)."""
    tag = _PLAIN_TAG
    return [tag + d for d in datas]


def wrap_client(client_id: bytes, seq: int, data: bytes) -> bytes:
    return _CLIENT_HEAD.pack(CLIENT, client_id, seq) + data


def unwrap(datas: list[bytes]) -> tuple[list[bytes], list[tuple[int, bytes, int]]]:
    """Split envelopes into the App's bytes and the client sessions they
    carry, as (index in the batch, client id, sequence).  Raises ValueError
    on an unknown tag or a short envelope."""
    app: list[bytes] = []
    sessions: list[tuple[int, bytes, int]] = []
    append = app.append
    for i, d in enumerate(datas):
        tag = d[0] if d else -1
        if tag == PLAIN:
            append(d[1:])
        elif tag == CLIENT and len(d) >= _CLIENT_HEAD.size:
            _, cid, seq = _CLIENT_HEAD.unpack_from(d)
            sessions.append((i, cid, seq))
            append(d[_CLIENT_HEAD.size:])
        else:
            raise ValueError(f"WAL entry with unknown envelope tag {tag!r}")
    return app, sessions


def describe(data: bytes) -> tuple[str, bytes]:
    """For ``zrepl wal dump``: a label and the App's bytes."""
    if data[:1] == _PLAIN_TAG:
        return "", data[1:]
    if data[:1] == bytes([CLIENT]) and len(data) >= _CLIENT_HEAD.size:
        _, cid, seq = _CLIENT_HEAD.unpack_from(data)
        return f"client {cid.hex()[:8]} #{seq}", data[_CLIENT_HEAD.size:]
    return "?", data


class SessionTable:
    """Per client: the highest sequence seen and the (code, WAL id) of the
    last ``window`` sequences."""

    def __init__(self, window: int, max_clients: int):
        """``window`` and ``max_clients``: Config.session_window and
        Config.max_sessions."""
        self.window = window
        self.max_clients = max_clients
        # client id -> (highest sequence, sequence -> (code, WAL id) in the
        # order recorded); clients in the order last active
        self._clients: OrderedDict[bytes, tuple[int, OrderedDict[int, tuple[int, int]]]] = \
            OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def record(self, client_id: bytes, seq: int, code: int, wal_id: int) -> None:
        entry = self._clients.get(client_id)
        if entry is None:
            entry = (0, OrderedDict())
            if len(self._clients) >= self.max_clients:
                self._clients.popitem(last=False)  # the least recently active
        else:
            self._clients.move_to_end(client_id)
        top, seqs = entry
        seqs[seq] = (code, wal_id)
        top = max(top, seq)
        if len(seqs) > self.window:
            # Drop from the oldest recorded while it is out of the window:
            # O(1) per record (this runs once per remote command).  A
            # sequence recorded out of order may outlive the window a while;
            # lookup answers it correctly all the same.
            floor = top - self.window
            while seqs:
                oldest = next(iter(seqs))
                if oldest > floor:
                    break
                del seqs[oldest]
        self._clients[client_id] = (top, seqs)

    def record_batch(self, first: int, codes: list[int],
                     sessions: list[tuple[int, bytes, int]]) -> None:
        """Record the client commands of a batch applied from WAL id
        ``first``: ``sessions`` as :func:`unwrap` returns them."""
        record = self.record
        for i, cid, seq in sessions:
            record(cid, seq, codes[i], first + i)

    def lookup(self, client_id: bytes, seq: int,
               active: Callable[[bytes], bool] = lambda cid: False) -> tuple[int, int] | None:
        """(code, WAL id) if this command was applied; None if it was not;
        SessionExpired if it is too old to tell.  ``active(client_id)``: the
        client has commands in flight on this node (a pipelining client's
        first ones are not applied yet), so an unknown client is a new one
        (asked only then)."""
        entry = self._clients.get(client_id)
        if entry is None:
            if seq > 1 and not active(client_id):
                # A client's sequence starts at 1: an unknown client past it
                # was forgotten (least recently active of max_clients), and
                # this may be the retry of a command that was applied.
                raise SessionExpired(f"client session {client_id.hex()[:8]} is not remembered "
                                     f"(more than {self.max_clients} clients since its last "
                                     f"command): command #{seq} may have been applied; a new "
                                     "command needs a new session")
            return None
        top, seqs = entry
        hit = seqs.get(seq)
        if hit is not None:
            return hit
        if seq <= top - self.window:
            raise SessionExpired(f"command #{seq} of this client is older than the "
                                 f"{self.window} the nodes remember")
        return None

    def __contains__(self, client_id: bytes) -> bool:
        return client_id in self._clients

    def victims(self, new_clients: int) -> list[bytes]:
        """The clients that ``new_clients`` more would push out, least
        recently active first."""
        n = len(self._clients) + new_clients - self.max_clients
        if n <= 0:
            return []
        return [cid for cid, _ in zip(self._clients, range(n))]

    def clear(self) -> None:
        self._clients.clear()

    # --- in snapshots and checkpoints (zrepl's own section) -----------------------
    def to_section(self) -> list:
        return [[cid, top, [[s, c, w] for s, (c, w) in seqs.items()]]
                for cid, (top, seqs) in self._clients.items()]

    def load_section(self, section: Any) -> None:
        self._clients.clear()
        for cid, top, seqs in section or []:
            self._clients[bytes(cid)] = (int(top), OrderedDict(
                (int(s), (int(c), int(w))) for s, c, w in seqs))
