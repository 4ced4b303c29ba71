"""workers.bank:Bank — ``workers.kv`` plus atomic transfers between
integer keys: registers, counters and money in one App (the chaos
harness's, ``docs/faults.md``).

Commands: every ``workers.kv`` command, and

    ("transfer", src, dst, amount)  -> OK, NOT_FOUND (an account is missing),
                                       INSUFFICIENT_FUNDS (src holds less than
                                       amount), BAD_AMOUNT (amount <= 0, src == dst),
                                       WRONG_TYPE (a balance is not an int),
                                       OUT_OF_RANGE (dst would leave the signed 64-bit range)

An account is an int under any key, created with ``set``.  A transfer
that cannot be made changes nothing, so - once the accounts are opened -
the sum of their balances never changes on any node.  Reads are KV's
(``get``, ``scan``; ``BankClient.total(prefix)`` sums the accounts under a
prefix from one snapshot).
"""

from __future__ import annotations

from typing import Any

from .kv import (INT_MAX, KV, KVClient, NOT_FOUND, OK, OUT_OF_RANGE, WRONG_TYPE, packb,
                 store_key, unpackb)
from .kv import check as kv_check
from ._tuples import tuple_codec

INSUFFICIENT_FUNDS = 6
BAD_AMOUNT = 7


def check(cmd: Any) -> None:
    if isinstance(cmd, (tuple, list)) and cmd and cmd[0] == "transfer":
        if len(cmd) == 4 and all(isinstance(k, (str, bytes)) for k in cmd[1:3]) and \
                type(cmd[3]) is int:
            kv_check(("incr", cmd[1], cmd[3]))  # the keys' limits, the amount's range
            kv_check(("incr", cmd[2], cmd[3]))
            return
        raise ValueError(f"bank transfer is ('transfer', src, dst, amount); got {cmd!r:.80}")
    kv_check(cmd)


def encode(cmd: tuple) -> bytes:
    check(cmd)
    return packb(cmd)


class Bank(KV):
    encode_cmd, decode_cmd, encode_cmds, decode_cmds = tuple_codec(check, "bank command")

    def apply(self, cmds: list) -> list[int]:
        codes: list[int] = []
        run: list = []  # consecutive KV commands, applied together
        for cmd in cmds:
            if cmd[0] != "transfer":
                run.append(cmd)
                continue
            if run:
                codes.extend(KV.apply(self, run))
                run = []
            codes.append(self._transfer(*cmd[1:]))
        if run:
            codes.extend(KV.apply(self, run))
        return codes

    def _transfer(self, src: Any, dst: Any, amount: int) -> int:
        if amount <= 0 or src == dst:
            return BAD_AMOUNT
        s, d = store_key(src), store_key(dst)
        raw_s, raw_d = self.store.get(s), self.store.get(d)
        if raw_s is None or raw_d is None:
            return NOT_FOUND
        bs, bd = unpackb(raw_s), unpackb(raw_d)
        if type(bs) is not int or type(bd) is not int:
            return WRONG_TYPE
        if bs < amount:
            return INSUFFICIENT_FUNDS
        if bd + amount > INT_MAX:
            return OUT_OF_RANGE
        self.store.put(s, packb(bs - amount))
        self.store.put(d, packb(bd + amount))
        return OK


class BankClient(KVClient):
    encode = staticmethod(encode)

    def transfer(self, src: Any, dst: Any, amount: int) -> int:
        return self._apply("transfer", src, dst, amount)

    def total(self, prefix: str, leader: bool = False) -> tuple[int, int]:
        """(accounts, sum of balances) under ``prefix``, from one snapshot."""
        pairs = self.scan(prefix, leader=leader)
        return len(pairs), sum(v for _, v in pairs if type(v) is int)
