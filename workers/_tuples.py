"""What the ready-made services share: commands and queries are tuples,
msgpack-encoded, and a client is a thin layer on ``zrepl.Client``."""

from __future__ import annotations

from typing import Any, Callable

import msgpack

from zrepl import App, Client, WALEntry

packb = msgpack.Packer(use_bin_type=True).pack


def unpack(raw: bytes, what: str) -> Any:
    """Decode a command or query (tuples stay tuples); ValueError naming
    ``what`` if it is not msgpack."""
    try:
        return msgpack.unpackb(raw, use_list=False)
    except Exception as exc:
        raise ValueError(f"not a {what}: {exc}") from None


def tuple_codec(check: Callable[[Any], None], what: str,
                check_all: Callable[[list], None] | None = None
                ) -> tuple[Callable[..., Any], ...]:
    """``App.encode_cmd``, ``App.decode_cmd`` and their batch forms
    ``encode_cmds`` and ``decode_cmds`` for tuple commands checked by
    ``check`` (ValueError for a malformed one).  Closures rather than a
    base class: decode runs once per entry on every replica, and ``check``
    and msgpack are reached without an attribute lookup.  ``check_all``:
    ``check`` of a whole batch, if the App has a faster one.  (msgpack's
    ``raw=False`` is its default: passing it costs ~80 ns a call.)"""
    unpackb = msgpack.unpackb
    if check_all is None:
        def check_all(cmds: list) -> None:
            for cmd in cmds:
                check(cmd)

    def encode_cmd(self: App, cmd: Any, entry: WALEntry) -> WALEntry:
        check(cmd)
        entry.data = packb(cmd)
        return entry

    def decode(data: bytes) -> Any:
        try:
            cmd = unpackb(data, use_list=False)
        except Exception as exc:
            raise ValueError(f"not a {what}: {exc}") from None
        check(cmd)
        return cmd

    def decode_cmd(self: App, entry: WALEntry) -> Any:
        return decode(entry.data)

    def encode_cmds(self: App, cmds: list, first_id: int) -> list[bytes]:
        check_all(cmds)
        return list(map(packb, cmds))

    def decode_cmds(self: App, datas: list[bytes], first_id: int) -> list:
        try:
            cmds = [unpackb(d, use_list=False) for d in datas]
        except Exception:
            for d in datas:
                decode(d)  # (raises, naming what is wrong)
            raise
        check_all(cmds)
        return cmds

    return encode_cmd, decode_cmd, encode_cmds, decode_cmds


class Closing:
    """``with`` closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ServiceClient(Closing):
    """A service's remote handle: commands through the leader (retried,
    never applied twice), queries from any node or the leader."""

    encode: Callable[[tuple], bytes]

    def __init__(self, addresses: list[str] | str, **client_options: Any):
        self.client = Client(addresses, **client_options)

    def _apply(self, *cmd: Any) -> int:
        return self.client.apply(self.encode(cmd))

    def _query(self, leader: bool, *request: Any, min_wal_id: int = 0) -> Any:
        return msgpack.unpackb(self.client.query(packb(request), leader_only=leader,
                                                 min_wal_id=min_wal_id), raw=False)

    def close(self) -> None:
        self.client.close()
