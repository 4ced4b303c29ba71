"""SIGKILL a real writer process at random moments; after each kill the
reopened log must hold every acknowledged batch, nothing torn, no garbage."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zrepl import Config, FileStorage

from .helpers.wal_writer import expected_data

WRITER = Path(__file__).parent / "helpers" / "wal_writer.py"
KILLS = 60
MAX_KILLS = 400


def _spin(seconds: float) -> None:
    """Busy-wait: moves the kill point by a random amount of the child's
    work.  Jitter, not synchronisation: nothing waits for a state here."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _run_until_killed(data_dir: Path, rng: random.Random) -> tuple[int, tuple[int, int] | None]:
    """Start a writer, SIGKILL it after a random number of acks plus jitter.
    Returns (highest acknowledged id, the batch in flight at the kill)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, str(WRITER), str(data_dir), str(rng.randrange(2**32))],
                            stdout=subprocess.PIPE, text=True, env=env)
    state = {"acked": 0, "in_flight": None, "acks": 0}

    def consume(line: str) -> None:
        kind, *ids = line.split()
        if kind == "begin":
            state["in_flight"] = (int(ids[0]), int(ids[1]))
        else:
            state.update(acked=int(ids[0]), in_flight=None, acks=state["acks"] + 1)

    target = rng.randint(1, 30)
    try:
        for line in proc.stdout:
            consume(line)
            if state["acks"] >= target:
                break
        else:
            pytest.fail(f"writer exited by itself with {proc.wait()}")
        _spin(rng.uniform(0, 0.004))
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:  # lines written before the kill still count
            consume(line)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return state["acked"], state["in_flight"]


@pytest.mark.timeout(300)
def test_sigkill_loses_no_acknowledged_batch(data_dir):
    rng = random.Random(int(os.environ.get("ZREPL_CRASH_SEED", time.time_ns())))
    kills_mid_batch = kills = 0
    # At least KILLS kills, and on until one lands inside a write (how often
    # one does depends on the machine's load: up to MAX_KILLS)
    while kills < KILLS or (kills_mid_batch == 0 and kills < MAX_KILLS):
        kills += 1
        acked, in_flight = _run_until_killed(data_dir, rng)
        with FileStorage(data_dir, config=Config(fsync="off", segment_bytes=2048)) as s:
            top = s.max_wal()
            # Every acknowledged batch is there; of the batch in flight,
            # either all of it or none (a batch is one record).
            allowed = {acked} | ({in_flight[1]} if in_flight else set())
            assert top in allowed, (top, acked, in_flight)
            if in_flight and top == acked:
                kills_mid_batch += 1
            lo = s.min_wal()
            entries = s.read_wal(lo, top - lo + 1)
            assert [e.wal_id for e in entries] == list(range(lo, top + 1))
            bad = [e.wal_id for e in entries if e.data != expected_data(e.wal_id)]
            assert not bad, f"garbage in entries {bad[:5]}"
    print(f"{kills} kills, {kills_mid_batch} with a batch in flight and not kept")
    assert kills_mid_batch > 0, "no kill landed inside a write: the test exercised nothing"
