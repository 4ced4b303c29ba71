"""workers.ledger:Ledger — accounts and transfers whose total never changes.

Commands (msgpack-encoded tuples):

    ("open", account, amount)          -> OK, EXISTS, BAD_AMOUNT
    ("transfer", src, dst, amount)     -> OK, NO_ACCOUNT, INSUFFICIENT_FUNDS, BAD_AMOUNT

Only ``open`` creates money; a transfer moves it, and fails cleanly (a code,
no change) when the source lacks the funds or an account is unknown.  So
the sum of all balances equals the sum of all opening amounts on every
node, whatever failed over: the invariant the fault-injection tests check.

Queries (``App.query``): ("balance", account) -> msgpack [found, balance];
("total",) -> msgpack [accounts, sum of balances].
"""

from __future__ import annotations

from typing import Any, Iterator

from zrepl import App

from ._tuples import ServiceClient, packb, tuple_codec, unpack

OK = 0
NO_ACCOUNT = 1
INSUFFICIENT_FUNDS = 2
BAD_AMOUNT = 3
EXISTS = 4

def encode(cmd: tuple) -> bytes:
    check(cmd)
    return packb(cmd)


def check(cmd: Any) -> None:
    if not isinstance(cmd, (tuple, list)) or not cmd:
        raise ValueError(f"ledger command must be a tuple; got {cmd!r:.80}")
    if cmd[0] == "open" and len(cmd) == 3 and isinstance(cmd[1], str) and type(cmd[2]) is int:
        return
    if cmd[0] == "transfer" and len(cmd) == 4 and isinstance(cmd[1], str) \
            and isinstance(cmd[2], str) and type(cmd[3]) is int:
        return
    raise ValueError(f"ledger commands are ('open', account, amount) and "
                     f"('transfer', src, dst, amount); got {cmd!r:.80}")


class Ledger(App):
    encode_cmd, decode_cmd, encode_cmds, decode_cmds = tuple_codec(check, "ledger command")

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}

    def apply(self, cmds: list) -> list[int]:
        b = self.balances
        codes = []
        for cmd in cmds:
            if cmd[0] == "open":
                _, acct, amount = cmd
                if amount < 0:
                    codes.append(BAD_AMOUNT)
                elif acct in b:
                    codes.append(EXISTS)
                else:
                    b[acct] = amount
                    codes.append(OK)
            else:
                _, src, dst, amount = cmd
                if amount <= 0 or src == dst:
                    codes.append(BAD_AMOUNT)
                elif src not in b or dst not in b:
                    codes.append(NO_ACCOUNT)
                elif b[src] < amount:
                    codes.append(INSUFFICIENT_FUNDS)
                else:
                    b[src] -= amount
                    b[dst] += amount
                    codes.append(OK)
        return codes

    def clear_state(self) -> None:
        self.balances.clear()

    def iter_state(self) -> Iterator[Any]:
        for acct, balance in self.balances.items():
            yield ("open", acct, balance)

    def query(self, request: bytes) -> bytes:
        q = unpack(request, "ledger query")
        if q[0] == "balance" and len(q) == 2:
            return packb([q[1] in self.balances, self.balances.get(q[1], 0)])
        if q[0] == "total":
            return packb([len(self.balances), sum(self.balances.values())])
        raise ValueError(f"unknown ledger query {q!r:.80}")


class LedgerClient(ServiceClient):
    """The ledger service for remote callers (on ``zrepl.Client``)."""

    encode = staticmethod(encode)

    def open(self, account: str, amount: int) -> int:
        return self._apply("open", account, amount)

    def transfer(self, src: str, dst: str, amount: int) -> int:
        return self._apply("transfer", src, dst, amount)

    def balance(self, account: str, leader: bool = False) -> int | None:
        found, balance = self._query(leader, "balance", account)
        return balance if found else None

    def total(self, leader: bool = False) -> tuple[int, int]:
        n, total = self._query(leader, "total")
        return n, total
