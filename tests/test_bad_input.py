"""Garbage, truncated, oversized and wrong-version frames sent to every
endpoint of a running leader and follower: each gets an error reply or is
dropped, the node keeps serving and its state does not change."""

from __future__ import annotations

from contextlib import contextmanager

import msgpack
import pytest
import zmq

from zrepl import FollowerState, ProtocolError
from zrepl.core import protocol as p

from .helpers import wait_for
from .helpers.cluster import Cluster, kv_set

pytestmark = pytest.mark.timeout(120)

MAX = 1 << 20

GARBAGE = [
    b"",
    b"\xc1",  # never valid msgpack
    b"\x92\x01",  # truncated array
    msgpack.packb("just a string"),
    msgpack.packb({"v": 2, "op": "status", "args": {}}),  # wrong version (map)
    msgpack.packb([9, p.WAL, 1, 1, 1, [b"x"], None]),  # wrong version (array)
    msgpack.packb([1, p.WAL, 1, 1, 1]),  # wrong shape
    msgpack.packb([1, p.WAL, 1, 1, 1, [b"x", "not bytes"], None]),
    msgpack.packb([1, p.WAL, 1, 1, 1, [b"x"], "not a history"]),
    msgpack.packb([1, p.ACK, 1, p.WAL, 1, b"\x00", None]),
    bytes(range(256)) * 4,
]


@pytest.fixture
def pair():
    with Cluster(max_message_bytes=MAX, max_batch_data=MAX // 2) as c:
        L = c.node("L").start()
        F = c.node("F").start()
        c.leader_with_follower(L, F)
        c.client(L).apply_many([kv_set(f"k{i}", i) for i in range(100)])
        wait_for(lambda: F.status().max_applied_wal == 100, 10, "follower at 100")
        yield c, L, F


def req(ctx, endpoint: str, payload: bytes, timeout_ms: int = 3000) -> bytes | None:
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send(payload)
        if s.poll(timeout_ms):
            return s.recv()
        return None
    finally:
        s.close()


def push(ctx, endpoint: str, payloads: list[bytes]) -> None:
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 2000)
    s.connect(endpoint)
    for payload in payloads:
        s.send(payload)
    s.close()  # linger: delivered before we go on


@contextmanager
def attacking(c, L, F):
    """A ZeroMQ context to send bad frames with; once the block is done,
    both nodes must be unharmed."""
    before_l, before_f = L.digest(), F.digest()
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)
    assert L.client.ping() and F.client.ping()
    assert L.digest() == before_l and F.digest() == before_f
    # and replication still works end to end
    assert c.client(L).apply(kv_set("after", 1)) == 0
    wait_for(lambda: F.status().max_applied_wal == before_l["wal_id"] + 1, 10, "replication")
    assert L.status().follower_state == FollowerState.SYNCHRONOUS


def test_control_endpoints_answer_bad_frames_with_errors(pair):
    c, L, F = pair
    with attacking(c, L, F) as ctx:
        for node in (L, F):
            ep = p.endpoints(node.address).control
            for payload in GARBAGE:
                reply = req(ctx, ep, payload)
                assert reply is not None, payload
                with pytest.raises(ProtocolError):
                    p.parse_control_reply(reply)
            bad_calls = [
                p.control_request("no_such_op", {}),
                p.control_request("set_role", {"role": "boss", "leader_id": 1}),
                p.control_request("set_role", {"role": 1, "leader_id": -1}),
                p.control_request("set_role", {"wrong": 1}),
                p.control_request("set_follower", {"address": "udp://x"}),
                p.control_request("apply_wal", {"leader_id": 1, "first_id": 1, "datas": [1]}),
                p.control_request("step_down", {"leader_id": "one", "successor": F.address}),
                p.control_request("step_down", {"leader_id": 1, "successor": 7}),
                p.control_request("backup_read", {"wal_id": -1, "offset": 0, "length": 1}),
                p.control_request("backup_wal", {"start": True, "count": 5}),
            ]
            for payload in bad_calls:
                with pytest.raises(ProtocolError):
                    p.parse_control_reply(req(ctx, ep, payload))
            # oversized: the node drops the connection, no reply, still serving
            assert req(ctx, ep, b"\x00" * (MAX + 1), timeout_ms=500) is None


def test_client_endpoint_answers_bad_frames_with_errors(pair):
    c, L, F = pair
    with attacking(c, L, F) as ctx:
        ep = p.endpoints(L.address).client
        bad = GARBAGE + [msgpack.packb([1, "drop", 1, b"x"]),
                         msgpack.packb([1, "submit", 1, "text not bytes"]),
                         p.submit_request(7, b"\xc1 not a KV command")]
        for payload in bad:
            reply = req(ctx, ep, payload)
            assert reply is not None, payload
            _, code, err = p.parse_submit_reply(reply)
            assert code is None and err is not None, payload
        assert req(ctx, ep, b"\x00" * (MAX + 1), timeout_ms=500) is None


def test_data_and_ack_endpoints_drop_bad_frames(pair):
    c, L, F = pair
    dropped = {n.name: n.status().extra["dropped_messages"] for n in (L, F)}
    leader_id = F.status().leader_id
    forged = [
        p.wal_message(leader_id, 12345, 101, [kv_set("forged", 1)]),  # unknown stream
        p.wal_message(leader_id - 1 if leader_id > 1 else 0, 0, 101, [kv_set("forged", 1)]),
        p.ack_message(999, p.WAL, 5, b""),
    ]
    with attacking(c, L, F) as ctx:
        for node in (L, F):
            eps = p.endpoints(node.address)
            push(ctx, eps.data, GARBAGE + forged)
            push(ctx, eps.ack, GARBAGE + forged)
            push(ctx, eps.data, [b"\x00" * (MAX + 1)])
        wait_for(lambda: all(n.status().extra["dropped_messages"] > dropped[n.name] + 10
                             for n in (L, F)), 10, "bad frames counted as dropped")
        assert "forged" not in F.state()
