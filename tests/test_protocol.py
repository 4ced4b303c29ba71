"""Wire format: endpoints, frames, error mapping (no sockets)."""

from __future__ import annotations

import msgpack
import pytest

from zrepl import NotLeader, ProtocolError, StaleLeader, Timeout
from zrepl.core import protocol as p


def test_tcp_endpoints_use_four_ports():
    ep = p.endpoints("tcp://127.0.0.1:7400")
    assert (ep.control, ep.data, ep.ack, ep.client) == (
        "tcp://127.0.0.1:7400", "tcp://127.0.0.1:7401", "tcp://127.0.0.1:7402",
        "tcp://127.0.0.1:7403")
    assert p.endpoints("tcp://[::1]:9000").data == "tcp://[::1]:9001"


def test_ipc_endpoints():
    ep = p.endpoints("ipc:///run/zrepl/n1")
    assert ep.data == "ipc:///run/zrepl/n1.data" and ep.client == "ipc:///run/zrepl/n1.client"


@pytest.mark.parametrize("bad", ["", "tcp://host", "tcp://:80", "tcp://h:65534", "udp://h:1",
                                 "ipc://", "7400", None])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(ValueError):
        p.endpoints(bad)


def test_codes_round_trip_and_bad_codes():
    assert p.codes_from_bytes(p.codes_to_bytes([0, 1, 65535])) == [0, 1, 65535]
    for bad in ([-1], [65536], ["x"], [1.5]):
        with pytest.raises(ValueError, match="0..65535"):
            p.codes_to_bytes(bad)


def test_errors_round_trip():
    for exc in (NotLeader("no", "tcp://l:1"), StaleLeader("old", 3, 5), Timeout("slow"),
                ProtocolError("bad")):
        back = p.error_from_wire(p.error_to_wire(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert p.error_from_wire(p.error_to_wire(NotLeader("no", "tcp://l:1"))).leader_address == \
        "tcp://l:1"
    back = p.error_from_wire(p.error_to_wire(StaleLeader("old", 3, 5)))
    assert (back.leader_id, back.current_leader_id) == (3, 5)
    assert isinstance(p.error_from_wire("garbage"), ProtocolError)
    assert isinstance(p.error_from_wire(["NoSuchError", "x"]), Exception)


def test_control_frames():
    op, args = p.parse_control_request(p.control_request("status", {"a": 1}))
    assert (op, args) == ("status", {"a": 1})
    assert p.parse_control_reply(p.control_ok([1, 2])) == [1, 2]
    with pytest.raises(StaleLeader):
        p.parse_control_reply(p.control_err(StaleLeader("old", 1, 2)))


@pytest.mark.parametrize("raw, message", [
    (b"\xc1\xc1garbage", "malformed"),
    (msgpack.packb([1, 2]), "must be a map"),
    (msgpack.packb({"v": 99, "op": "status"}), "version 99 not supported"),
    (msgpack.packb({"v": 1, "op": 5}), "string 'op'"),
])
def test_bad_control_requests(raw, message):
    with pytest.raises(ProtocolError, match=message):
        p.parse_control_request(raw)


def test_data_frames_parse():
    msg = p.parse_data(p.wal_message(3, 77, 10, [b"a", b"b"]))
    assert msg == [1, p.WAL, 3, 77, 10, [b"a", b"b"], None]
    msg = p.parse_data(p.wal_message(3, 77, 10, [b"a"], [[1, 1], [3, 9]]))
    assert msg[6] == [[1, 1], [3, 9]]
    ack = p.parse_data(p.ack_message(77, p.WAL, 11, p.codes_to_bytes([0, 0])))
    assert ack[:5] == [1, p.ACK, 77, p.WAL, 11]
    err = p.parse_data(p.ack_message(77, p.WAL, 0, b"", StaleLeader("old", 1, 2)))
    assert isinstance(p.error_from_wire(err[6]), StaleLeader)


@pytest.mark.parametrize("raw, message", [
    (b"\xff\xfe", "malformed|wrong shape|must be an array"),
    (msgpack.packb({"v": 1}), "must be an array"),
    (msgpack.packb([2, p.WAL, 1, 1, 1, []]), "version 2 not supported"),
    (msgpack.packb([1, p.WAL, 1, 1, -5, [], None]), "wrong shape"),
    (msgpack.packb([1, p.WAL, 1, 1, 1, "notalist", None]), "wrong shape"),
    (msgpack.packb([1, p.WAL, 1, 1, 1, [b"x"], [[1]]]), "wrong shape"),
    (msgpack.packb([1, p.WAL, 1, 1, 1, [b"x"]]), "wrong shape"),
    (msgpack.packb([1, 99, 1]), "wrong shape"),
    (msgpack.packb([1, p.ACK, 1, 1, 1, b"odd", None]), "wrong shape"),
])
def test_bad_data_frames(raw, message):
    with pytest.raises(ProtocolError, match=message):
        p.parse_data(raw)


def parse_submit(raw: bytes) -> tuple:
    """A submission's (request_id, data, client_id, seq), as the node reads it."""
    op, fields = p.parse_client_request(raw)
    assert op == "submit"
    return fields


def test_submit_frames():
    assert parse_submit(p.submit_request(5, b"cmd")) == (5, b"cmd", None, None)
    cid = b"c" * 16
    assert parse_submit(p.submit_request(6, b"cmd", cid, 9)) == (6, b"cmd", cid, 9)
    for bad in ((b"short", 1), (cid, 0), (cid, "1"), (None, 5)):
        with pytest.raises(ProtocolError, match="client_id"):
            parse_submit(p.submit_request(7, b"cmd", *bad))
    rid, code, err = p.parse_submit_reply(p.submit_reply(5, 2))
    assert (rid, code, err) == (5, 2, None)
    rid, code, err = p.parse_submit_reply(p.submit_reply(5, None, NotLeader("x", "tcp://l:1")))
    assert isinstance(err, NotLeader) and err.leader_address == "tcp://l:1"
    with pytest.raises(ProtocolError, match="version"):
        parse_submit(msgpack.packb([7, "submit", 1, b"x"]))
    with pytest.raises(ProtocolError, match="unknown client op"):
        parse_submit(msgpack.packb([1, "drop_tables", 1, b"x"]))


def test_ack_endpoint_messages_round_trip():
    assert p.parse_ack(p.ack_message(5, p.WAL, 9, b"\0\0")) == (p.ACK, 5, p.WAL, 9, b"\0\0", None, "")
    assert p.parse_ack(p.ack_message(5, p.WAL, 9, b"", None, "tcp://c:1"))[6] == "tcp://c:1"
    assert p.parse_ack(p.member_ack_message(3, 7, 9, b"\0\0\0\0", "tcp://b:1", "tcp://c:1")) == \
        (p.MEMBER_ACK, 3, 7, 9, b"\0\0\0\0", "tcp://b:1", "tcp://c:1")
    err = p.parse_ack(p.member_drop_message(3, 7, 9, "tcp://b:1", "tcp://c:1", Timeout("x")))
    assert err[:6] == (p.MEMBER_DROP, 3, 7, 9, "tcp://b:1", "tcp://c:1")
    assert err[6][0] == "Timeout"


@pytest.mark.parametrize("msg", [
    [1, p.MEMBER_ACK, 3, 9, 7, b"", "b", ""],  # first after last
    [1, p.MEMBER_ACK, 3, 0, 7, b"", "b", ""],  # WAL ids start at 1
    [1, p.MEMBER_ACK, 3, 1, 1, b"\0", "b", ""],  # odd codes
    [1, p.MEMBER_ACK, 3, 1, 1, b"", 5, ""],  # member not a string
    [1, p.MEMBER_DROP, -1, 1, 1, "b", "c", None],
    [1, p.MEMBER_DROP, 1, 1, 1, "b", "c", "err"],
    [1, p.ACK, 1, 1, 1, b"", None, 7],  # downstream not a string
    [1, p.WAL, 1, 1, 1, [], None],  # data on the ack endpoint
    [2, p.ACK, 1, 1, 1, b"", None],  # another version
])
def test_bad_ack_endpoint_messages_are_refused(msg):
    with pytest.raises(ProtocolError):
        p.parse_ack(p.packb(msg))
