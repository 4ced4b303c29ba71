"""workers.kv:KV — a replicated key-value store, the reference App.

Commands (tuples, msgpack-encoded on the wire and in the WAL):

    ("set", key, value)            -> OK, TOO_LARGE (the value packs to over 16 MiB)
    ("delete", key)                -> OK, NOT_FOUND
    ("incr", key, n)               -> OK (a missing key counts as 0), WRONG_TYPE,
                                      OUT_OF_RANGE (the sum would leave the signed 64-bit
                                      range; nothing changes)
    ("cas", key, expected, new)    -> OK, NOT_FOUND, COMPARE_FAILED, TOO_LARGE
                                      (expected None means "the key is absent")

Keys are str or bytes of at most 510 bytes (UTF-8 for str: a longer key is
refused when the command is encoded); values anything msgpack encodes.  The
state lives in a ``zrepl.SharedStore`` (``docs/shared.md``).

Reads: ``KV.get`` in the node's process; ``LocalReader(data_dir)`` in any
process on the node's host, from shared memory; remotely ``KVClient.get``
and ``KVClient.scan`` (``App.query``): from any node - answered by its reader
processes when it runs some (``--readers N``) - where a follower's answer
may be stale, or, with ``leader=True``, from the leader holding a valid
lease, answered once it holds exactly the acknowledged writes
(``docs/reads.md``).

    kv = KVClient(["tcp://127.0.0.1:7400", "tcp://127.0.0.1:7410"])
    kv.set("k", "v"); kv.incr("n", 2); kv.get("k"); kv.get("n", leader=True)
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Iterator

import msgpack

from zrepl import App, SharedStore
from zrepl.storage.shared import MAX_KEY_BYTES, MAX_VALUE_BYTES

from ._tuples import Closing, ServiceClient, packb, tuple_codec, unpack

OK = 0
NOT_FOUND = 1
COMPARE_FAILED = 2
WRONG_TYPE = 3
OUT_OF_RANGE = 4
TOO_LARGE = 5

# Integers msgpack - the WAL, checkpoints and state syncs - can carry both
# ways: a counter that left this range could be stored but never written
# out again (every checkpoint and state sync after it would fail).
INT_MIN, INT_MAX = -2**63, 2**63 - 1

_ARITY = {"set": 3, "delete": 2, "incr": 3, "cas": 4}
_op, _key, _value = itemgetter(0), itemgetter(1), itemgetter(2)
_ONLY_SET = {"set"}
def encode(cmd: tuple) -> bytes:
    """A command's wire form (what remote clients submit)."""
    check(cmd)
    return packb(cmd)


_PLAIN_KEY = MAX_KEY_BYTES // 4  # a str key shorter than this fits whatever its characters


def check_all(cmds: list) -> None:
    """:func:`check` of a batch; the commonest command, a set with a short
    str key, plainly well-formed (what check finds too), without a call."""
    for cmd in cmds:
        if type(cmd) is not tuple or len(cmd) != 3 or cmd[0] != "set" or \
                type(cmd[1]) is not str or len(cmd[1]) >= _PLAIN_KEY:
            check(cmd)


def check(cmd: Any) -> None:
    if type(cmd) is tuple and len(cmd) == 3 and cmd[0] == "set" and type(cmd[1]) is str and \
            len(cmd[1]) < _PLAIN_KEY:
        return  # the commonest command, plainly well-formed (what the checks below find too)
    if not isinstance(cmd, (tuple, list)) or not cmd or cmd[0] not in _ARITY:
        raise ValueError(f"KV command must be (op, ...) with op in {sorted(_ARITY)}; got {cmd!r:.80}")
    if len(cmd) != _ARITY[cmd[0]]:
        raise ValueError(f"KV {cmd[0]!r} takes {_ARITY[cmd[0]] - 1} arguments; got {cmd!r:.80}")
    if not isinstance(cmd[1], (str, bytes)):
        raise ValueError(f"KV keys are str or bytes; got {type(cmd[1]).__name__}")
    if len(cmd[1]) >= MAX_KEY_BYTES // 4 and len(store_key(cmd[1])) > MAX_KEY_BYTES:
        raise ValueError(f"KV keys are at most {MAX_KEY_BYTES - 1} bytes (UTF-8 for str); got "
                         f"{len(store_key(cmd[1])) - 1}")
    if cmd[0] == "incr" and (type(cmd[2]) is not int or not INT_MIN <= cmd[2] <= INT_MAX):
        raise ValueError("KV incr takes an int in the signed 64-bit range")


class KV(App):
    """The state lives in a ``zrepl.SharedStore`` (``self.store``): in the
    node's data directory when a node runs it, readable by reader processes
    and ``LocalReader``; in memory when the App is used on its own."""

    encode_cmd, decode_cmd, encode_cmds, decode_cmds = tuple_codec(check, "KV command",
                                                                    check_all)

    def __init__(self, store: SharedStore | None = None) -> None:
        self.store = store if store is not None else SharedStore()

    # --- App -------------------------------------------------------------------

    def apply(self, cmds: list) -> list[int]:
        store = self.store
        if len(cmds) > 16 and set(map(_op, cmds)) == _ONLY_SET:
            # a batch of sets only (a catch-up, a bulk load): one pass per
            # step, in C where it can be, and one store call
            keys = [b"s" + k.encode() if type(k) is str else b"b" + k for k in map(_key, cmds)]
            values = list(map(packb, map(_value, cmds)))
            if max(map(len, values)) <= MAX_VALUE_BYTES:
                store.put_many(keys, values)
                return [OK] * len(cmds)
        get, put = store.get, store.put
        codes = []
        # runs of sets go to the store in one call (put_many) where no
        # other command in between reads or changes the store
        set_keys: list[bytes] = []
        set_values: list[bytes] = []
        for cmd in cmds:
            op = cmd[0]
            key = cmd[1]
            key = b"s" + key.encode() if type(key) is str else b"b" + key  # store_key, inline
            if op == "set":  # (_put_value, inline: the commonest command)
                raw = packb(cmd[2])
                if len(raw) > MAX_VALUE_BYTES:
                    codes.append(TOO_LARGE)
                else:
                    set_keys.append(key)
                    set_values.append(raw)
                    codes.append(OK)
                continue
            if set_keys:
                _put_all(store, set_keys, set_values)
                set_keys, set_values = [], []
            if op == "delete":
                codes.append(OK if store.delete(key) else NOT_FOUND)
            elif op == "incr":
                raw = get(key)
                cur = 0 if raw is None else unpackb(raw)
                if type(cur) is not int:
                    codes.append(WRONG_TYPE)
                elif not INT_MIN <= cur + cmd[2] <= INT_MAX:
                    codes.append(OUT_OF_RANGE)
                else:
                    put(key, packb(cur + cmd[2]))
                    codes.append(OK)
            else:  # cas
                expected, new = cmd[2], cmd[3]
                raw = get(key)
                if raw is None and expected is not None:
                    codes.append(NOT_FOUND)
                elif raw is None or unpackb(raw) == expected:
                    codes.append(_put_value(put, key, new))
                else:
                    codes.append(COMPARE_FAILED)
        if set_keys:
            _put_all(store, set_keys, set_values)
        return codes

    def clear_state(self) -> None:
        self.store.clear()

    def iter_state(self) -> Iterator[Any]:
        # a generator expression: store.items() (the snapshot) is taken now
        return (("set", user_key(k), unpackb(v)) for k, v in self.store.items())

    # --- reads -------------------------------------------------------------------
    def get(self, key: Any, default: Any = None) -> Any:
        raw = self.store.get(store_key(key))
        return default if raw is None else unpackb(raw)

    @property
    def data(self) -> dict[Any, Any]:
        """The whole state as a dict (a copy: for tests and small states)."""
        return {user_key(k): unpackb(v) for k, v in self.store.items()}

    def query(self, request: bytes) -> bytes:
        """("get", key) -> msgpack [found, value];
        ("scan", prefix, limit) -> msgpack [[key, value], ...] in key order
        (str keys first, then bytes keys; ``limit`` None for all)."""
        return answer_query(request, self.store.get, self.store.scan)


def _put_all(store: SharedStore, keys: list[bytes], values: list[bytes]) -> None:
    if len(keys) == 1:
        store.put(keys[0], values[0])
    else:
        store.put_many(keys, values)


def _put_value(put: Any, key: bytes, value: Any) -> int:
    """Store ``value`` under ``key``: OK, or TOO_LARGE (nothing stored) -
    the same answer on every node, where the store's own check would fail
    the whole batch."""
    raw = packb(value)
    if len(raw) > MAX_VALUE_BYTES:
        return TOO_LARGE
    put(key, raw)
    return OK


def answer_query(request: bytes, get: Any, scan: Any) -> bytes:
    """A KV query answered with ``get(store_key)`` and ``scan(prefix,
    limit)`` (the App's store, or a reader's snapshot)."""
    try:
        req = unpack(request, "KV query")
        op = req[0]
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"KV query must be ('get', key) or ('scan', prefix, limit): {exc}") \
            from None
    if op == "get" and len(req) == 2 and isinstance(req[1], (str, bytes)):
        raw = get(store_key(req[1]))
        return packb([raw is not None, None if raw is None else unpackb(raw)])
    if op == "scan" and len(req) == 3 and isinstance(req[1], (str, bytes)) and \
            (req[2] is None or (type(req[2]) is int and req[2] >= 0)):
        pairs = scan(store_key(req[1]), req[2])
        return packb([[user_key(k), unpackb(v)] for k, v in pairs])
    raise ValueError(f"unknown KV query {req!r:.80} (('get', key) or ('scan', prefix, limit))")


def store_key(key: str | bytes) -> bytes:
    """A KV key in the store: str and bytes keys stay distinct."""
    return b"s" + key.encode() if type(key) is str else b"b" + key  # type: ignore[operator]


def user_key(raw: bytes) -> str | bytes:
    return raw[1:].decode() if raw[:1] == b"s" else raw[1:]


def unpackb(raw: bytes) -> Any:
    return _unpackb(raw, use_list=False)  # (raw=False: msgpack's default)


class LocalReader(Closing):
    """Reads a local node's KV state in this process, from shared memory,
    with no message at all: ``get(key)`` returns the value, and
    ``wal_id`` the WAL id the last read reflects.  ``min_wal_id`` waits
    (at most ``wait_timeout`` s) until the node has applied that WAL id:
    read-your-writes across processes.

        reader = LocalReader("/var/lib/zrepl/n1")
        reader.get("k"); reader.wal_id
    """

    def __init__(self, data_dir: str, wait_timeout: float = 1.0):
        self.reader = SharedStore.open_reader(data_dir, wait_timeout=wait_timeout)

    @property
    def wal_id(self) -> int:
        return self.reader.wal_id

    def get(self, key: Any, default: Any = None, min_wal_id: int = 0) -> Any:
        raw, _ = self.reader.get(store_key(key), min_wal_id)
        return default if raw is None else unpackb(raw)

    def scan(self, prefix: str | bytes = "", limit: int | None = None, min_wal_id: int = 0
             ) -> list[tuple[Any, Any]]:
        """(key, value) pairs whose key starts with ``prefix``, from one
        snapshot."""
        pairs, _ = self.reader.scan(store_key(prefix), limit, min_wal_id)
        return [(user_key(k), unpackb(v)) for k, v in pairs]

    def close(self) -> None:
        self.reader.close()


class KVClient(ServiceClient):
    """The KV service for remote callers (a thin layer on ``zrepl.Client``,
    which finds the leader, retries and never applies a command twice)."""

    encode = staticmethod(encode)

    def set(self, key: Any, value: Any) -> int:
        return self._apply("set", key, value)

    def delete(self, key: Any) -> int:
        return self._apply("delete", key)

    def incr(self, key: Any, n: int = 1) -> int:
        return self._apply("incr", key, n)

    def cas(self, key: Any, expected: Any, new: Any) -> int:
        return self._apply("cas", key, expected, new)

    def get(self, key: Any, default: Any = None, leader: bool = False,
            min_wal_id: int = 0) -> Any:
        """``min_wal_id``: from a state that applied at least that WAL id
        (``self.client.last_wal_id`` after a write: read your own write
        from any node)."""
        found, value = self._query(leader, "get", key, min_wal_id=min_wal_id)
        return value if found else default

    def scan(self, prefix: str | bytes = "", limit: int | None = None, leader: bool = False,
             min_wal_id: int = 0) -> list[tuple[Any, Any]]:
        """(key, value) pairs whose key starts with ``prefix`` (str keys for
        a str prefix), in key order, from one snapshot."""
        pairs = self._query(leader, "scan", prefix, limit, min_wal_id=min_wal_id)
        return [(k, v) for k, v in pairs]


_unpackb = msgpack.unpackb
