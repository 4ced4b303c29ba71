"""Progress lines for long work: rate-limited, with count, total and rate."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path


from workers.kv import KV
from zrepl import Config, FileStorage, FollowerState, MemoryStorage, NodeRole, Replica
from zrepl.engine.progress import Progress

from .helpers import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, fmt: str, *args: object) -> None:
        self.lines.append(fmt % args)


def test_progress_logs_at_most_every_interval_with_total_and_rate():
    clock, log = FakeClock(), Lines()
    p = Progress(log, "replaying WAL 1..1000", total=1000, clock=clock, every=5.0)
    p.add(100)
    assert log.lines == []  # nothing before 5 seconds
    clock.now += 5.0
    p.add(400)
    clock.now += 1.0
    p.add(100)  # too soon after the last line
    assert log.lines == [f"replaying WAL 1..1000: 500 of 1,000 (50%) entries, "
                         f"{500 / 5.0:,.0f}/s"]
    assert p.line(clock.now).startswith("replaying WAL 1..1000: 600 of 1,000 (60%)")
    assert Progress(log, "state sync", clock=clock, every=5.0).line() == \
        "state sync: 0 entries, 0/s"



def test_restart_replay_reports_progress(caplog):
    d = Path(tempfile.mkdtemp(prefix="zr-"))
    cfg = Config(fsync="off", checkpoint_entries=0, checkpoint_interval=0,
                 stream_batch_entries=100, progress_interval=1e-9)  # a line per batch
    try:
        with FileStorage(d, config=cfg) as st:
            r = Replica(KV(), st, f"ipc://{d}/n.sock", cfg).start()
            r.set_role(NodeRole.LEADER, 1)
            r.manager.apply_many([("set", f"k{i}", i) for i in range(1000)])
            r.stop()
        caplog.set_level(logging.INFO, logger="zrepl.replica")
        with FileStorage(d, config=cfg) as st:
            r = Replica(KV(), st, f"ipc://{d}/n.sock", cfg).start()
            r.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    lines = [m for m in caplog.messages if "replaying WAL 1..1000:" in m]
    assert len(lines) == 10, caplog.messages
    assert "1,000 of 1,000 (100%) entries" in lines[-1]


def test_state_sync_reports_progress_on_both_sides(caplog):
    caplog.set_level(logging.INFO, logger="zrepl.replica")
    d = Path(tempfile.mkdtemp(prefix="zr-"))
    cfg = Config(fsync="off", checkpoint_entries=0, checkpoint_interval=0,
                 snapshot_batch_entries=100, progress_interval=1e-9)  # a line per batch
    started = []
    try:
        leader = Replica(KV(), MemoryStorage(), f"ipc://{d}/L.sock", cfg).start()
        started.append(leader)
        leader.set_role(NodeRole.LEADER, 1)
        leader.manager.apply_many([("set", f"k{i}", i) for i in range(1000)])
        leader.storage.truncate_wal_before_id(1000)  # the follower needs a state sync
        follower = Replica(KV(), MemoryStorage(), f"ipc://{d}/F.sock", cfg).start()
        started.append(follower)
        follower.set_role(NodeRole.FOLLOWER, 1)
        leader.set_follower(follower.address)
        wait_for(lambda: leader.status().follower_state == FollowerState.SYNCHRONOUS, 20,
                 "synchronous follower after a state sync")
        assert follower.status().extra["state_syncs_received"] == 1
        assert follower.app.data == leader.app.data
    finally:
        for r in started:
            r.stop()
        shutil.rmtree(d, ignore_errors=True)
    received = [m for m in caplog.messages if "receiving a state sync at WAL id 1000:" in m]
    sent = [m for m in caplog.messages if "(up to 100 entries per batch):" in m]
    assert received and "1,000 entries" in received[-1], caplog.messages
    assert sent and int(sent[-1].split(": ")[1].split()[0]) >= 10, sent  # + zrepl's section
