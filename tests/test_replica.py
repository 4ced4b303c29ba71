"""The engine's commit rules, with two Replicas in this process (fast; the
multi-process behaviour is in test_replication.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from workers.kv import KV
from zrepl import (Config, FileStorage, FollowerMismatch, FollowerState, NodeRole, NotLeader,
                   ProtocolError, RemoteFollower, StaleLeader, Timeout, WALEntry, WALGap)
from zrepl.storage.snapshot import list_checkpoints

from .helpers import wait_for
from .helpers.inproc import Nodes


@pytest.fixture
def tmp():
    d = Path(tempfile.mkdtemp(prefix="zr-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nodes(tmp):
    n = Nodes(tmp)
    yield n
    n.close()


def pair(nodes, leader_settings=None, follower_app=None):
    leader = nodes.make("L", **(leader_settings or {}))
    follower = nodes.make("F", app=follower_app)
    follower.set_role(NodeRole.FOLLOWER, 1)
    leader.set_role(NodeRole.LEADER, 1)
    leader.set_follower(follower.address)
    wait_for(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 10,
             "synchronous follower")
    return leader, follower


def test_leader_alone_commits_locally(nodes):
    r = nodes.make("L")
    r.set_role(NodeRole.LEADER, 1)
    assert r.manager.apply(("set", "a", 1)) == 0
    assert r.manager.apply(("delete", "zz")) == 1
    st = r.status()
    assert (st.role, st.leader_id, st.max_wal, st.max_applied_wal) == (NodeRole.LEADER, 1, 2, 2)
    assert st.epoch_history == [(1, 1)]
    assert st.follower_state == FollowerState.NONE


def test_non_leader_refuses_writes_with_the_leader_address(nodes):
    leader, follower = pair(nodes)
    with pytest.raises(NotLeader) as info:
        follower.manager.apply(("set", "a", 1))
    assert info.value.leader_address == leader.address
    fut = follower.manager.apply_async(("set", "a", 1))
    assert isinstance(fut.exception(timeout=5), NotLeader)


def test_synchronous_commit_is_on_the_follower_when_apply_returns(nodes):
    leader, follower = pair(nodes)
    for i in range(200):
        leader.manager.apply(("set", f"k{i}", i))
        # acknowledged means applied by the follower already
        assert follower.status().max_applied_wal >= leader.status().max_wal
    assert follower.app.data == leader.app.data


def test_apply_many_and_apply_async(nodes):
    leader, follower = pair(nodes)
    codes = leader.manager.apply_many([("incr", "c", 1)] * 3000 + [("delete", "nope")])
    assert codes == [0] * 3000 + [1]
    futs = [leader.manager.apply_async(("incr", "c", 1)) for _ in range(500)]
    assert [f.result(timeout=10) for f in futs] == [0] * 500
    wait_for(lambda: follower.app.data.get("c") == 3500, 10, "follower to apply all")
    assert leader.app.data["c"] == 3500
    assert leader.manager.apply_many([]) == []


def test_a_command_the_app_cannot_encode_is_refused_and_not_logged(nodes):
    leader, _ = pair(nodes)
    before = leader.status().max_wal
    with pytest.raises(ValueError, match="KV command"):
        leader.manager.apply(("frobnicate", 1))
    with pytest.raises(ValueError):
        leader.manager.apply_many([("set", "ok", 1), ("set", 5, 1)])  # int key
    assert leader.status().max_wal == before
    assert leader.manager.apply(("set", "after", 1)) == 0


def test_require_sync_without_follower_times_out_and_writes_nothing(nodes):
    r = nodes.make("L", require_sync=True)
    r.set_role(NodeRole.LEADER, 1)
    with pytest.raises(Timeout, match="no synchronous follower.*nothing was written"):
        r.manager.apply(("set", "a", 1))
    fut = r.manager.apply_async(("set", "b", 1))
    assert isinstance(fut.exception(timeout=5), Timeout)
    assert r.status().max_wal == 0 and r.app.data == {}


def test_require_sync_commits_once_the_follower_is_synchronous(nodes):
    leader, follower = pair(nodes, {"require_sync": True})
    assert leader.manager.apply(("set", "a", 1)) == 0
    assert follower.app.data == {"a": 1}


class Liar(KV):
    """A non-deterministic App: answers differently for one key."""

    def apply(self, cmds):
        codes = super().apply(cmds)
        return [9 if c[0] == "set" and c[1] == "poison" else code for c, code in zip(cmds, codes)]


def test_follower_with_different_codes_is_a_mismatch(nodes):
    leader, follower = pair(nodes, follower_app=Liar())
    assert leader.manager.apply(("set", "fine", 1)) == 0
    with pytest.raises(FollowerMismatch, match="not deterministic"):
        leader.manager.apply(("set", "poison", 1))
    wait_for(lambda: leader.status().follower_state == FollowerState.ERROR, 10, "ERROR state")
    st = leader.status()
    assert st.extra["failures"] >= 1 and "FollowerMismatch" in st.extra["follower_error"]
    # the leader keeps serving (locally) and says so
    assert leader.manager.apply(("set", "later", 1)) == 0


def test_stale_set_role_is_refused(nodes):
    r = nodes.make("L")
    r.set_role(NodeRole.LEADER, 5)
    with pytest.raises(StaleLeader):
        r.set_role(NodeRole.LEADER, 4)
    with pytest.raises(StaleLeader, match="above 5"):
        r.set_role(NodeRole.FOLLOWER, 5) or r.set_role(NodeRole.LEADER, 5)
    assert r.status().leader_id == 5


def test_remote_follower_refuses_a_stale_leader(nodes):
    f = nodes.make("F")
    f.set_role(NodeRole.FOLLOWER, 3)
    handle = RemoteFollower(f.address, timeout=2)
    try:
        with pytest.raises(StaleLeader):
            handle.connect(2, "ipc:///nowhere")
        with pytest.raises(StaleLeader):
            handle.apply_wal(2, [WALEntry(1, b"x")])
        with pytest.raises(StaleLeader):
            handle.clear_state(2)
        info = handle.handshake(3, "ipc:///somewhere")
        assert info.leader_id == 3 and info.position == 0
        from workers.kv import encode
        from zrepl.core.session import wrap_plain
        assert handle.apply_wal(3, [WALEntry(1, wrap_plain(encode(("set", "a", 1))))]) == [0]
        assert handle.max_applied_wal() == 1
        with pytest.raises(WALGap, match="expects 2"):
            handle.apply_wal(3, [WALEntry(5, wrap_plain(encode(("set", "b", 1))))])
        with pytest.raises(ProtocolError, match="envelope"):
            handle.apply_wal(3, [WALEntry(2, encode(("set", "b", 1)))])  # not a WAL entry
    finally:
        handle.close()
    assert f.app.data == {"a": 1}


def test_restart_restores_from_checkpoint_and_wal(nodes, tmp):
    storage = FileStorage(tmp / "L", fsync="off", config=Config(segment_bytes=4096))
    r = nodes.make("L", storage=storage)
    r.set_role(NodeRole.LEADER, 1)
    r.manager.apply_many([("set", f"k{i}", i) for i in range(3000)])
    r.checkpointer.request()
    wait_for(lambda: list_checkpoints(tmp / "L" / "checkpoints") and r.status().min_wal > 1,
             20, "checkpoint written and WAL truncated")
    r.manager.apply_many([("incr", f"k{i}", 1) for i in range(500)])
    expected = dict(r.app.data)
    r.stop()
    nodes.started.remove(r)
    storage.close()
    storage = FileStorage(tmp / "L", fsync="off", config=Config(segment_bytes=4096))
    assert storage.min_wal() > 1  # the checkpoint let the WAL be truncated
    r2 = nodes.make("L", storage=storage)
    assert r2.app.data == expected
    assert r2.status().max_applied_wal == 3500
    assert r2.status().role == NodeRole.LEADER


def test_queue_is_bounded_apply_async_blocks_when_full(nodes):
    leader, follower = pair(nodes, {"max_pending": 4, "window": 1})
    futs = []
    high = 0
    for i in range(300):
        futs.append(leader.manager.apply_async(("incr", "n", 1)))
        high = max(high, len(leader.pipeline.pending))
    assert [f.result(timeout=10) for f in futs] == [0] * 300
    assert high <= 4
    wait_for(lambda: follower.app.data.get("n") == 300, 10, "follower to apply all")


def test_epoch_history_reaches_a_follower_whose_first_catch_up_send_fails(nodes):
    """The first batch of a stream carries the epoch history.  When its send
    finds the follower's socket not connected yet, the retry must carry it
    too (it once went without: the follower kept a stale history, which a
    later failover needs to find where logs diverge)."""
    leader = nodes.make("L")
    leader.set_role(NodeRole.LEADER, 1)
    leader.manager.apply_many([("set", f"a{i}", i) for i in range(10)])
    leader.set_role(NodeRole.LEADER, 2)  # a new epoch from WAL 11
    leader.manager.apply_many([("set", f"b{i}", i) for i in range(10)])
    real_send, failed = leader.downstream._send, []

    def first_send_fails(msg: bytes) -> bool:
        if not failed:
            failed.append(msg)
            return False
        return real_send(msg)

    leader.downstream._send = first_send_fails
    follower = nodes.make("F")
    follower.set_role(NodeRole.FOLLOWER, 2)
    leader.set_follower(follower.address)
    wait_for(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 10,
             "synchronous follower")
    assert failed, "the catch-up never tried to send"
    assert follower.status().epoch_history == leader.status().epoch_history == [(1, 1), (2, 11)]
    assert follower.app.data == leader.app.data


def test_follower_refuses_wal_before_any_epoch_history(nodes):
    """Defence in depth behind the test above: a stream whose batches never
    carry the epoch history is refused, so nothing is logged by a node that
    has no record of any epoch; the leader reports the link as failed."""
    leader = nodes.make("L")
    leader.set_role(NodeRole.LEADER, 1)
    leader.manager.apply_many([("set", f"a{i}", i) for i in range(10)])
    real_forward = leader.core._forward
    leader.core._forward = lambda batch: real_forward(batch)[:2] + (None,)  # a broken upstream
    follower = nodes.make("F")
    follower.set_role(NodeRole.FOLLOWER, 1)
    leader.set_follower(follower.address)
    wait_for(lambda: leader.status().follower_state == FollowerState.ERROR, 10,
             "the leader to see its stream refused")
    assert "no epoch history" in leader.status().extra["follower_error"]
    st = follower.status()
    assert st.extra["refused_batches"] >= 1
    assert st.max_wal == 0 and st.epoch_history == [] and follower.app.data == {}
    del leader.core._forward  # mended: setting the follower again restarts the link
    leader.set_follower(follower.address)
    wait_for(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 10,
             "synchronous follower once the history arrives")
    assert follower.status().epoch_history == [(1, 1)]
    assert follower.app.data == leader.app.data
