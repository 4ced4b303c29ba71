"""The seed's types and interfaces exist with the seed's names and values."""

from __future__ import annotations

import inspect

import pytest

import zrepl
from zrepl import (App, Config, Follower, FollowerState, Manager, Node, NodeRole, NodeStatus,
                   Storage, WALEntry)


def test_node_role_values_are_the_seeds():
    assert {r.name: r.value for r in NodeRole} == {
        "UNKNOWN": 0, "LEADER": 1, "FOLLOWER": 2, "FORWARDER": 3}


def test_follower_state_values_are_the_seeds():
    assert {s.name: s.value for s in FollowerState} == {
        "ERROR": -1, "NONE": 0, "NOT_CONNECTED": 1, "SYNCING_STATE": 2,
        "SYNCING_LOG": 3, "SYNCHRONOUS": 4}


def _abstract(cls):
    return set(cls.__abstractmethods__)


def test_interfaces_carry_every_seed_method():
    assert _abstract(App) == {"encode_cmd", "decode_cmd", "apply", "clear_state", "iter_state"}
    assert {"apply", "report_failed"} <= _abstract(Manager)
    assert callable(Manager.apply_async) and callable(Manager.apply_many)
    assert {"address", "set_address", "role", "set_role", "leader_id", "set_leader_id",
            "follower_address", "set_follower_address", "write_wal", "set_max_applied_wal",
            "max_applied_wal", "max_wal", "min_wal", "clear_wal", "truncate_wal_before_id",
            "truncate_wal_before_time", "read_wal", "epoch_history",
            "set_epoch_history"} == _abstract(Storage)
    assert _abstract(Follower) == {"connect", "max_applied_wal", "clear_state",
                                   "apply_state", "apply_wal"}
    assert _abstract(Node) == {"status", "set_role", "set_leader", "set_follower", "stop"}


def test_public_names_importable():
    for name in zrepl.__all__:
        assert hasattr(zrepl, name), name
    for name in ("NotLeader", "StaleLeader", "Timeout", "ProtocolError", "StorageError",
                 "FollowerMismatch"):
        assert issubclass(getattr(zrepl, name), zrepl.ReplicationError)


def test_not_leader_carries_the_leader_address():
    err = zrepl.NotLeader("not the leader", "tcp://127.0.0.1:7400")
    assert err.leader_address == "tcp://127.0.0.1:7400"
    assert "not the leader" in str(err)


def test_walentry_fields():
    e = WALEntry(7, b"x")
    assert (e.wal_id, e.data) == (7, b"x")
    assert [f for f in inspect.signature(WALEntry).parameters] == ["wal_id", "data"]


def test_node_status_round_trip():
    st = NodeStatus("tcp://a", NodeRole.LEADER, 3, 10, 1, 9, "tcp://b",
                    FollowerState.SYNCHRONOUS, epoch_history=[(1, 1), (3, 5)])
    d = st.to_dict()
    assert d["role"] == 1 and d["follower_state"] == 4
    assert NodeStatus.from_dict(d) == st
    d["something_newer"] = 1  # a newer peer's field is ignored
    assert NodeStatus.from_dict(d) == st


@pytest.mark.parametrize("broken", [
    {"role": 9}, {"follower_state": "x"}, {"leader_id": -1}, {"max_wal": "1"},
    {"address": 5}, {"epoch_history": [[1]]},
])
def test_node_status_rejects_hostile_fields(broken):
    d = NodeStatus("tcp://a", NodeRole.LEADER, 3, 10, 1, 9, "", FollowerState.NONE).to_dict()
    d.update(broken)
    with pytest.raises((ValueError, TypeError)):
        NodeStatus.from_dict(d)


def test_node_status_rejects_missing_fields():
    with pytest.raises((ValueError, TypeError, KeyError)):
        NodeStatus.from_dict({"address": "x"})
    with pytest.raises(TypeError):
        NodeStatus.from_dict(["not", "a", "map"])


def test_config_defaults_are_valid_and_bad_values_named():
    cfg = Config()
    assert cfg.fsync == "batch"
    with pytest.raises(ValueError, match="fsync"):
        Config(fsync="sometimes")
    with pytest.raises(ValueError, match="segment_bytes"):
        Config(segment_bytes=0)
    with pytest.raises(ValueError, match="unknown setting"):
        cfg.replace(no_such_knob=1)
    assert cfg.replace(fsync="off").fsync == "off"


@pytest.mark.parametrize("settings, both", [
    (dict(connect_backoff_min=2.0), ("connect_backoff_min", "connect_backoff_max")),
    (dict(lease=0.15), ("lease", "heartbeat_interval")),
    (dict(lease_margin=0.9), ("lease_margin", "lease")),
    (dict(ack_timeout=20.0), ("ack_timeout", "commit_timeout")),
    (dict(ack_timeout=3.0, commit_timeout=30.0), ("ack_timeout", "state_sync_stall_timeout")),
    (dict(window=64), ("window", "send_queue_batches")),
    (dict(max_message_bytes=1 << 20), ("max_batch_data", "max_message_bytes")),
    (dict(rpc_timeout=6.0), ("rpc_timeout", "sync_wait_timeout")),
])
def test_settings_are_checked_against_each_other_in_one_line(settings, both):
    with pytest.raises(ValueError) as info:
        Config(**settings)
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in both), message


def test_every_setting_belongs_to_exactly_one_group():
    from zrepl.core.config import GROUPS
    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(Config.__dataclass_fields__)
    assert Config.flatten({"replication": {"window": 4}, "lease": 1.0}) == \
        {"window": 4, "lease": 1.0}
    with pytest.raises(ValueError, match=r"\[supervisor\] has no setting 'window'.*\[replication\]"):
        Config.flatten({"supervisor": {"window": 4}})
    with pytest.raises(ValueError, match="set twice"):
        Config.flatten({"window": 2, "replication": {"window": 4}})


def test_every_config_setting_is_documented():
    source = inspect.getsource(Config)
    for name in Config.__dataclass_fields__:
        # each field is followed by its docstring in the class body
        idx = source.index(f"    {name}:")
        after = source[idx:].split("\n", 2)[1].strip()
        assert after.startswith('"""'), f"setting {name} has no documentation"
