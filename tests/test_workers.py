"""The ready-to-run services: workers.kv and workers.ledger, locally and
served by real nodes (reads from any node or the leader), and the ledger's
invariant under repeated failovers."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.kv import KV, KVClient
from workers.ledger import (BAD_AMOUNT, EXISTS, INSUFFICIENT_FUNDS, NO_ACCOUNT, OK, Ledger,
                            LedgerClient)
from workers.ledger import encode as ledger_encode
from zrepl import NotLeader, ProtocolError, ReplicationError, WALEntry

from .helpers.cluster import Cluster, wait_applied
from .helpers.load import SUPERVISED, kill_leaders_under_load, supervised_chain

pytestmark = pytest.mark.timeout(240)


def test_kv_commands_and_codes():
    kv = KV()
    assert kv.apply([("set", "a", 1), ("incr", "a", 2), ("incr", "new", 5), ("delete", "zz"),
                     ("cas", "a", 3, "x"), ("cas", "a", 3, "y"), ("cas", "b", None, 1),
                     ("incr", "a", 1)]) == [0, 0, 0, 1, 0, 2, 0, 3]
    assert kv.data == {"a": "x", "new": 5, "b": 1}
    rebuilt = KV()
    rebuilt.apply(list(kv.iter_state()))
    assert rebuilt.data == kv.data
    for bad in [("set", "k"), ("frob", 1), ("incr", "k", "x"), ("set", 5, 1), "x"]:
        with pytest.raises(ValueError):
            kv.encode_cmd(bad, WALEntry(1))


_KEYS = st.sampled_from(["a", "b", "c", b"a"])
_KV_CMDS = st.one_of(
    st.tuples(st.just("set"), _KEYS, st.integers(-3, 3) | st.text(max_size=3)),
    st.tuples(st.just("delete"), _KEYS),
    st.tuples(st.just("incr"), _KEYS, st.integers(-3, 3)),
    st.tuples(st.just("cas"), _KEYS, st.none() | st.integers(-3, 3), st.integers(-3, 3)))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_KV_CMDS, max_size=12), max_size=6), st.booleans())
def test_kv_batches_answer_and_end_as_a_dict_model_does(batches, lmdb_store):
    """KV.apply writes runs of sets in one store call (put_many): batches
    of any mix give the codes and the state one command at a time on a
    dict does."""
    import tempfile

    from zrepl import SharedStore
    model: dict = {}

    def step(cmd: tuple) -> int:
        op, key = cmd[0], cmd[1]
        if op == "set":
            model[key] = cmd[2]
            return 0
        if op == "delete":
            if key not in model:
                return 1
            del model[key]
            return 0
        if op == "incr":
            cur = model.get(key, 0)
            if type(cur) is not int:
                return 3
            model[key] = cur + cmd[2]
            return 0
        if key not in model:
            if cmd[2] is not None:
                return 1
            model[key] = cmd[3]
            return 0
        if model[key] != cmd[2]:
            return 2
        model[key] = cmd[3]
        return 0

    with tempfile.TemporaryDirectory() as d:
        store = SharedStore()
        store.open(d) if lmdb_store else store.open_memory()
        kv = KV(store)
        try:
            for cmds in batches:
                want = [step(c) for c in cmds]
                assert store.run_batch(lambda: kv.apply(cmds), None) == want
            assert kv.data == model
        finally:
            store.close()


def test_a_batch_of_sets_only_answers_and_ends_as_one_command_at_a_time():
    """(KV.apply writes a batch of nothing but sets in one pass: str and
    bytes keys, a later duplicate winning, a value over the limit answered
    TOO_LARGE - as the one-by-one loop does.)"""
    from workers.kv import TOO_LARGE
    from zrepl.storage.shared import MAX_VALUE_BYTES
    big = b"x" * (MAX_VALUE_BYTES + 1)
    cmds = [("set", f"k{i % 20}", i) for i in range(40)] + [("set", b"k1", "b")]
    one_by_one = KV()
    want = [code for c in cmds for code in one_by_one.apply([c])]
    kv = KV()
    assert kv.apply(cmds) == want == [0] * len(cmds)
    assert kv.data == one_by_one.data and kv.get("k1") == 21 and kv.get(b"k1") == "b"
    assert kv.apply(cmds[:20] + [("set", "big", big)]) == [0] * 20 + [TOO_LARGE]
    assert kv.get("big") is None


def test_kv_counters_stay_within_what_msgpack_carries():
    # (issue 12: incr by 2**63-1 three times made every later checkpoint
    # and state sync fail, and the WAL was never truncated again)
    kv = KV()
    big = 2**63 - 1
    assert kv.apply([("incr", "n", big), ("incr", "n", big), ("incr", "n", -big),
                     ("incr", "n", -big), ("incr", "n", -big)]) == [0, 4, 0, 0, 4]
    assert kv.data["n"] == -big
    for cmd in kv.iter_state():  # the state can always be written out
        assert kv.decode_cmd(kv.encode_cmd(cmd, WALEntry(1))) == cmd
    with pytest.raises(ValueError, match="64-bit"):
        kv.encode_cmd(("incr", "n", 2**63), WALEntry(1))


def test_ledger_rules():
    led = Ledger()
    assert led.apply([("open", "a", 100), ("open", "b", 0), ("open", "a", 1),
                      ("open", "c", -1), ("transfer", "a", "b", 30),
                      ("transfer", "b", "a", 50), ("transfer", "a", "zz", 1),
                      ("transfer", "a", "a", 1), ("transfer", "a", "b", 0)]) == \
        [OK, OK, EXISTS, BAD_AMOUNT, OK, INSUFFICIENT_FUNDS, NO_ACCOUNT, BAD_AMOUNT, BAD_AMOUNT]
    assert led.balances == {"a": 70, "b": 30}
    for bad in [("transfer", "a", "b"), ("open", "a", 1.5), ("steal", "a")]:
        with pytest.raises(ValueError):
            led.encode_cmd(bad, WALEntry(1))


def test_bank_transfers_are_atomic_and_refused_cleanly():
    from workers import bank
    app = bank.Bank()
    enc = lambda *c: app.decode_cmd(WALEntry(0, bank.encode(c)))  # noqa: E731
    codes = app.apply([enc("set", "a", 100), enc("set", "b", 0), enc("set", "s", "x"),
                       enc("transfer", "a", "b", 30), enc("transfer", "a", "b", 71),
                       enc("transfer", "a", "zz", 1), enc("transfer", "a", "a", 1),
                       enc("transfer", "a", "b", 0), enc("transfer", "a", "s", 1),
                       enc("incr", "a", 1), enc("set", "big", 2**63 - 1),
                       enc("transfer", "a", "big", 1)])
    assert codes == [bank.OK, bank.OK, bank.OK, bank.OK, bank.INSUFFICIENT_FUNDS,
                     bank.NOT_FOUND, bank.BAD_AMOUNT, bank.BAD_AMOUNT, bank.WRONG_TYPE,
                     bank.OK, bank.OK, bank.OUT_OF_RANGE]
    assert app.data == {"a": 71, "b": 30, "s": "x", "big": 2**63 - 1}  # nothing half-done
    for bad in [("transfer", "a", "b"), ("transfer", "a", 1, 2), ("transfer", "a", "b", 1.5),
                ("transfer", "a", "b", 2**64), ("transfer", "k" * 600, "b", 1), ("move",)]:
        with pytest.raises(ValueError):
            bank.encode(bad)


def test_kv_served_by_a_leader_and_follower():
    with Cluster(require_sync=True) as c:
        a, b = c.node("A").start(), c.node("B").start()
        c.leader_with_follower(a, b)
        kv = KVClient([a.address, b.address], timeout=2)
        try:
            assert kv.set("k", "v") == 0
            assert kv.incr("n", 2) == 0 and kv.incr("n") == 0
            assert kv.cas("k", "v", "w") == 0 and kv.cas("k", "v", "z") == 2
            assert kv.delete("gone") == 1
            assert kv.get("k", leader=True) == "w" and kv.get("n", leader=True) == 3
            assert kv.get("missing", default="d") == "d"
            wait_applied(b, a.status().max_wal)
            follower_only = KVClient([b.address], timeout=2, retry_for=0.2)
            assert follower_only.get("n") == 3  # any node serves reads
            with pytest.raises(NotLeader):
                follower_only.get("n", leader=True)  # but only the leader the leader's
            follower_only.close()
            with pytest.raises(ReplicationError):
                kv.client.query(b"\xc1 not msgpack")
        finally:
            kv.close()


def test_ledger_total_never_changes_across_failovers():
    accounts = [f"acct{i}" for i in range(8)]
    with Cluster(**SUPERVISED) as c:
        nodes, sup, _ = supervised_chain(c, app="workers.ledger:Ledger")
        ledger = LedgerClient([n.address for n in nodes], timeout=0.5, retry_for=30)
        for acct in accounts:
            assert ledger.open(acct, 1000) == OK
        moved = [0]
        rng = random.Random(1)

        def transfer() -> None:
            src, dst = rng.sample(accounts, 2)
            if ledger.transfer(src, dst, rng.randint(1, 400)) == OK:
                moved[0] += 1

        kill_leaders_under_load(transfer, nodes, sup, 3, lambda: moved[0], 50)
        totals = {n.name: LedgerClient([n.address], retry_for=1).total() for n in nodes}
        assert set(totals.values()) == {(len(accounts), 1000 * len(accounts))}, totals
        balances = {n.name: sorted(n.client.dump_state()) for n in nodes}
        assert len({tuple(v) for v in balances.values()}) == 1
        assert moved[0] > 300
        ledger.close()


def test_a_query_an_app_does_not_serve_is_refused_cleanly(data_dir):
    from zrepl import App, Client, MemoryStorage, NodeRole, Replica, SharedStore

    class NoReads(App):  # the App interface's default query()
        encode_cmd = KV.encode_cmd
        decode_cmd = KV.decode_cmd
        apply = KV.apply
        clear_state = KV.clear_state
        iter_state = KV.iter_state

        def __init__(self):
            self.store = SharedStore()

    node = Replica(NoReads(), MemoryStorage(), f"ipc://{data_dir}/n.sock").start()
    try:
        node.set_role(NodeRole.LEADER, 1)
        with Client(node.address, retry_for=0.5) as client:
            with pytest.raises(ProtocolError, match="serves no queries"):
                client.query(b"anything")
            assert node.status().max_wal == 0  # and nothing was written
    finally:
        node.stop()


def test_a_query_that_breaks_the_app_is_an_error_reply_not_a_crash(data_dir):
    """App.query is user code: whatever it raises (here the ledger indexing
    an empty request) comes back as an error; the node keeps serving."""
    from zrepl import Client, MemoryStorage, NodeRole, Replica
    node = Replica(Ledger(), MemoryStorage(), f"ipc://{data_dir}/n.sock").start()
    try:
        node.set_role(NodeRole.LEADER, 1)
        with Client(node.address, retry_for=0.5) as client:
            for bad in (msgpack.packb([]), msgpack.packb(5), b"\xc1"):
                with pytest.raises(ProtocolError, match="bad query"):
                    client.query(bad)
            assert client.apply(ledger_encode(("open", "x", 5))) == 0
            assert msgpack.unpackb(client.query(msgpack.packb(["total"]))) == [1, 5]
        assert node.crashed is None
    finally:
        node.stop()
