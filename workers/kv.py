"""workers.kv:KV — a replicated key-value store, the reference App.

Commands (tuples, msgpack-encoded on the wire and in the WAL):

    ("set", key, value)            -> OK
    ("delete", key)                -> OK, NOT_FOUND
    ("incr", key, n)               -> OK (a missing key counts as 0), WRONG_TYPE,
                                      OUT_OF_RANGE (the sum would leave the signed 64-bit
                                      range; nothing changes)
    ("cas", key, expected, new)    -> OK, NOT_FOUND, COMPARE_FAILED
                                      (expected None means "the key is absent")

Keys are str or bytes; values anything msgpack encodes.

Reads: ``KV.get`` in the node's process, or remotely ``KVClient.get``
(``App.query``): from any node (a follower's answer may be stale) or, with
``leader=True``, from the leader holding a valid lease, answered once it
holds exactly the acknowledged writes (``docs/reads.md``).

    kv = KVClient(["tcp://127.0.0.1:7400", "tcp://127.0.0.1:7410"])
    kv.set("k", "v"); kv.incr("n", 2); kv.get("k"); kv.get("n", leader=True)
"""

from __future__ import annotations

from typing import Any, Iterator

from zrepl import App

from ._tuples import ServiceClient, packb, tuple_codec, unpack

OK = 0
NOT_FOUND = 1
COMPARE_FAILED = 2
WRONG_TYPE = 3
OUT_OF_RANGE = 4

# Integers msgpack - the WAL, checkpoints and state syncs - can carry both
# ways: a counter that left this range could be stored but never written
# out again (every checkpoint and state sync after it would fail).
INT_MIN, INT_MAX = -2**63, 2**63 - 1

_ARITY = {"set": 3, "delete": 2, "incr": 3, "cas": 4}
def encode(cmd: tuple) -> bytes:
    """A command's wire form (what remote clients submit)."""
    check(cmd)
    return packb(cmd)


def check(cmd: Any) -> None:
    if not isinstance(cmd, (tuple, list)) or not cmd or cmd[0] not in _ARITY:
        raise ValueError(f"KV command must be (op, ...) with op in {sorted(_ARITY)}; got {cmd!r:.80}")
    if len(cmd) != _ARITY[cmd[0]]:
        raise ValueError(f"KV {cmd[0]!r} takes {_ARITY[cmd[0]] - 1} arguments; got {cmd!r:.80}")
    if not isinstance(cmd[1], (str, bytes)):
        raise ValueError(f"KV keys are str or bytes; got {type(cmd[1]).__name__}")
    if cmd[0] == "incr" and (type(cmd[2]) is not int or not INT_MIN <= cmd[2] <= INT_MAX):
        raise ValueError("KV incr takes an int in the signed 64-bit range")


class KV(App):
    encode_cmd, decode_cmd = tuple_codec(check, "KV command")

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}

    # --- App -------------------------------------------------------------------

    def apply(self, cmds: list) -> list[int]:
        data = self.data
        codes = []
        for cmd in cmds:
            op = cmd[0]
            if op == "set":
                data[cmd[1]] = cmd[2]
                codes.append(OK)
            elif op == "delete":
                codes.append(OK if data.pop(cmd[1], _MISSING) is not _MISSING else NOT_FOUND)
            elif op == "incr":
                cur = data.get(cmd[1], 0)
                if type(cur) is not int:
                    codes.append(WRONG_TYPE)
                elif not INT_MIN <= cur + cmd[2] <= INT_MAX:
                    codes.append(OUT_OF_RANGE)
                else:
                    data[cmd[1]] = cur + cmd[2]
                    codes.append(OK)
            else:  # cas
                key, expected, new = cmd[1], cmd[2], cmd[3]
                cur = data.get(key, _MISSING)
                if cur is _MISSING and expected is not None:
                    codes.append(NOT_FOUND)
                elif (cur is _MISSING and expected is None) or cur == expected:
                    data[key] = new
                    codes.append(OK)
                else:
                    codes.append(COMPARE_FAILED)
        return codes

    def clear_state(self) -> None:
        self.data.clear()

    def iter_state(self) -> Iterator[Any]:
        for key, value in self.data.items():
            yield ("set", key, value)

    # --- reads -------------------------------------------------------------------
    def get(self, key: Any, default: Any = None) -> Any:
        return self.data.get(key, default)

    def query(self, request: bytes) -> bytes:
        """("get", key) -> msgpack [found, value]."""
        try:
            op, key = unpack(request, "KV query")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"KV query must be ('get', key): {exc}") from None
        if op != "get":
            raise ValueError(f"unknown KV query {op!r}")
        value = self.data.get(key, _MISSING)
        return packb([value is not _MISSING, None if value is _MISSING else value])


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

    def get(self, key: Any, default: Any = None, leader: bool = False) -> Any:
        found, value = self._query(leader, "get", key)
        return value if found else default


_MISSING = object()
