"""Client sessions: a retried command is answered, never applied twice -
on the same leader, after a failover, after a state sync, after a restart,
and through a client that retries across repeated failovers."""

from __future__ import annotations

import threading

import msgpack
import pytest
import zmq

from zrepl import NodeRole, ReplicationError, SessionExpired, Timeout
from zrepl.core import protocol as p
from zrepl.core.session import SessionTable, describe, unwrap, wrap_client, wrap_plain

from .helpers.cluster import Cluster, kv_incr, wait_applied, wait_synchronous
from .helpers.load import SUPERVISED, kill_leaders_under_load, supervised_chain

pytestmark = pytest.mark.timeout(240)

CID = b"0123456789abcdef"


def test_envelopes_round_trip():
    datas = [wrap_plain(b"a"), wrap_client(CID, 7, b"b"), wrap_plain(b"")]
    app, sessions = unwrap(datas)
    assert app == [b"a", b"b", b""] and sessions == [(1, CID, 7)]
    assert describe(datas[1]) == (f"client {CID.hex()[:8]} #7", b"b")
    for bad in (b"", b"\x07xyz", b"\x01short"):
        with pytest.raises(ValueError):
            unwrap([bad])


def test_session_table_window_expiry_and_bounds():
    t = SessionTable(window=3, max_clients=2)
    for seq in range(1, 6):
        t.record(CID, seq, seq * 10, 100 + seq)
    assert t.lookup(CID, 5) == (50, 105)
    assert t.lookup(CID, 6) is None  # not applied yet
    with pytest.raises(SessionExpired):
        t.lookup(CID, 1)  # too old to tell: never re-applied
    t.record(b"b" * 16, 1, 0, 200)
    t.record(b"c" * 16, 1, 0, 201)  # a third client: the least recently active goes
    assert len(t) == 2
    with pytest.raises(SessionExpired, match="not remembered"):
        t.lookup(CID, 5)  # forgotten: its retry is refused, never re-applied
    assert t.lookup(b"d" * 16, 1) is None  # a new client's first command
    assert t.lookup(CID, 6, active=lambda cid: True) is None  # commands of it in flight here
    copy = SessionTable(window=3, max_clients=2)
    copy.load_section(msgpack.unpackb(msgpack.packb(t.to_section()), raw=False))
    assert copy.lookup(b"c" * 16, 1) == (0, 201)


def submit(node, cid: bytes, seq: int, data: bytes, timeout_ms: int = 5000):
    ctx = zmq.Context()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(p.endpoints(node.address).client)
    try:
        s.send(p.submit_request(1, data, cid, seq))
        assert s.poll(timeout_ms), "no answer"
        _, code, err = p.parse_submit_reply(s.recv())
        if err is not None:
            raise err
        return code
    finally:
        s.close()
        ctx.destroy(linger=0)  # (closes what a failed assertion left open)


def counter(node) -> int:
    return node.state().get("n", 0)


def test_a_retried_command_is_answered_not_reapplied_across_failover_sync_and_restart():
    with Cluster(require_sync=True, ack_timeout=0.3, checkpoint_entries=0) as c:
        a, b = c.node("A").start(), c.node("B").start()
        c.leader_with_follower(a, b)
        assert submit(a, CID, 1, kv_incr("n")) == 0
        assert submit(a, CID, 1, kv_incr("n")) == 0  # a retry: answered
        assert counter(a) == 1 and a.status().extra["duplicates_answered"] == 1
        assert submit(a, CID, 2, kv_incr("n")) == 0
        wait_applied(b, 2)
        # failover: the new leader answers the retry from its replicated table
        a.kill()
        b.client.set_role(NodeRole.LEADER, 2)
        cc = c.node("C").start()
        cc.client.set_role(NodeRole.FOLLOWER, 2)
        b.client.set_follower(cc.address)
        wait_synchronous(b)
        assert submit(b, CID, 2, kv_incr("n")) == 0
        assert counter(b) == 2 and b.status().extra["duplicates_answered"] == 1
        # C got the table through its state sync: promote it and retry again
        b.client.checkpoint()
        b.kill()
        cc.client.set_role(NodeRole.LEADER, 3)
        a.start()
        a.client.set_role(NodeRole.FOLLOWER, 3)
        cc.client.set_follower(a.address)
        wait_synchronous(cc)
        assert submit(cc, CID, 1, kv_incr("n")) == 0
        assert submit(cc, CID, 3, kv_incr("n")) == 0  # a new command
        assert counter(cc) == 3
        # a restart rebuilds the table from checkpoint + WAL
        cc.stop()
        cc.start()
        cc.client.set_role(NodeRole.LEADER, 4)  # a restarted leader needs a new epoch
        wait_synchronous(cc)
        assert submit(cc, CID, 3, kv_incr("n")) == 0
        assert counter(cc) == 3
        wait_applied(a, cc.status().max_wal)
        assert counter(a) == 3


def test_client_retries_across_repeated_failovers_without_applying_twice():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, _ = supervised_chain(c)
        client = c.client(*nodes, timeout=0.5, retry_for=30)
        acked = [0]
        unknown = [0]

        def incr() -> None:
            try:
                if client.apply(kv_incr("n")) == 0:
                    acked[0] += 1
            except Timeout:
                unknown[0] += 1  # outcome unknown (should not happen within 30 s)

        kill_leaders_under_load(incr, nodes, sup, 5, lambda: acked[0], 30)
        assert unknown[0] == 0
        values = {x.name: counter(x) for x in nodes}
        assert set(values.values()) == {acked[0]}, (values, acked[0])
        retried = sum(x.status().extra.get("duplicates_answered", 0) for x in nodes)
        print(f"{acked[0]} increments, {retried} retries answered from the session table")


def test_retry_of_a_command_too_old_is_refused_not_reapplied():
    with Cluster(session_window=4) as c:
        a = c.node("A").start()
        a.client.set_role(NodeRole.LEADER, 1)
        for seq in range(1, 10):
            assert submit(a, CID, seq, kv_incr("n")) == 0
        with pytest.raises(SessionExpired):
            submit(a, CID, 2, kv_incr("n"))
        assert counter(a) == 9
        with pytest.raises(ReplicationError):
            submit(a, b"short", 1, kv_incr("n"))  # a malformed session


def test_apply_many_reuses_one_connection_per_node(tmp_path):
    """Each apply_many call once opened a new connection to the leader:
    a handshake per call, and a TIME_WAIT socket left per call, which under
    sustained use ran the machine out of ports.  One connection now serves
    every call; a reply to a call that gave up is skipped by request id."""
    from zmq.utils.monitor import recv_monitor_message
    from zrepl.engine.remote import Client
    address = f"ipc://{tmp_path}/fake.sock"
    ctx = zmq.Context.instance()
    server = ctx.socket(zmq.ROUTER)
    server.bind(p.endpoints(address).client)
    monitor = server.get_monitor_socket(zmq.EVENT_ACCEPTED)
    stop = threading.Event()
    accepted = []

    def serve() -> None:  # a leader that answers every submission with code 0
        poller = zmq.Poller()
        poller.register(server, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        while not stop.is_set():
            for sock, _ in poller.poll(50):
                if sock is monitor:
                    accepted.append(recv_monitor_message(monitor)["event"])
                    continue
                *envelope, payload = server.recv_multipart()
                _, fields = p.parse_client_request(payload)
                server.send_multipart(envelope + [p.submit_reply(fields[0], 0)])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with Client([address], timeout=5.0) as c:
            for i in range(20):
                assert c.apply_many([b"cmd"] * 8) == [0] * 8
    finally:
        stop.set()
        t.join(timeout=10)
        server.disable_monitor()
        monitor.close(linger=0)
        server.close(linger=0)
    assert accepted == [zmq.EVENT_ACCEPTED], accepted


def test_fresh_client_ids_cannot_push_out_a_session_to_reapply_its_command():
    """Issue 12: 10,000 fresh client ids, then a retry of the first client's
    command: it was applied twice.  A new client may push a session out
    of a full table only once that session was idle for session_expiry;
    until then the newcomer is refused (retryable), and a retry of a
    forgotten session's command would get SessionExpired - never a second
    application."""
    with Cluster(max_sessions=8) as c:
        a = c.node("A").start()
        a.client.set_role(NodeRole.LEADER, 1)
        for seq in range(1, 4):
            assert submit(a, CID, seq, kv_incr("n")) == 0
        admitted = refused = 0
        for i in range(200):
            try:
                submit(a, i.to_bytes(16, "big"), 1, kv_incr("other"), timeout_ms=2000)
                admitted += 1
            except ReplicationError:
                refused += 1
        assert admitted == 7 and refused == 193  # the table is full, and nobody idles long
        assert submit(a, CID, 3, kv_incr("n")) == 0  # answered from the table
        assert counter(a) == 3  # not applied again
