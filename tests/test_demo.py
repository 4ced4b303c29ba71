"""``python3 -m zrepl demo``: runs to the end and cleans up; its check fails
when a write is missing; Ctrl-C stops it cleanly."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
from pathlib import Path

from zrepl import demo

from .helpers import reap, stop_process, wait_for
from .helpers.cluster import ROOT


def _root(output: str) -> Path:
    m = re.search(r"a supervisor in (\S+)", output)
    assert m, output
    return Path(m.group(1))


def test_demo_runs_to_completion_and_removes_everything():
    proc = subprocess.run([sys.executable, "-m", "zrepl", "demo", "--seconds", "1",
                           "--clients", "2"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "SIGKILL leader a" in out and "failover took" in out
    assert re.search(r"lost / applied twice\s+0 / 0", out), out
    assert re.search(r"replicas identical\s+yes", out), out
    assert "result                OK" in out
    acked = int(re.search(r"acknowledged writes\s+([\d,]+)", out).group(1).replace(",", ""))
    assert acked > 0
    rows = [line.split() for line in out.splitlines() if re.match(r"^[abc] ", line)]
    assert len(rows) == 3 and all(r[-2:-1] == ["0"] for r in rows), rows  # TWICE column
    # (issue "day-two operations") the timeline in order, no "0 writes" line,
    # and no stale lag of the killed leader's old link once it is back
    times = [float(m.group(1)) for m in re.finditer(r"^\s+(\d+\.\d)s  ", out, re.M)]
    assert len(times) > 4 and times == sorted(times), out
    assert not re.search(r"^\s+[\d.]+s\s+0 writes", out, re.M), out
    after = out[out.index("restarted a;"):out.index("stopped writing")]
    assert "lag a->" not in after, after
    assert not _root(out).exists()


def test_demo_reports_a_missing_write(monkeypatch):
    """The check can fail: a writer that claims one acknowledgement more
    than it received makes the demo report a lost write and exit 1."""
    real_run = demo.Writer.run

    def run_and_overclaim(self: demo.Writer) -> None:
        real_run(self)
        if self.key == "client-0":
            self.tally.acked += 1

    monkeypatch.setattr(demo.Writer, "run", run_and_overclaim)
    out = io.StringIO()
    assert demo.run_demo(seconds=0.5, clients=1, out=out) == 1
    text = out.getvalue()
    assert re.search(r"lost / applied twice\s+1 / 0", text), text
    assert "FAILED" in text
    assert not _root(text).exists()


def test_demo_stops_cleanly_on_ctrl_c(tmp_path):
    log = tmp_path / "out"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zrepl", "demo", "--seconds", "30"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for(lambda: "writes" in log.read_text() or proc.poll() is not None, 60,
                 "the demo to start writing", interval=0.05)
        assert stop_process(proc, signal.SIGINT, timeout=60) == 130
    finally:
        reap(proc)
    text = log.read_text()
    assert "interrupted: stopping every process" in text
    assert not _root(text).exists()


def test_latency_histogram_is_close_and_bounded():
    """The demo's percentiles come from a histogram, not from every sample:
    within 1 % of the exact figure, in a bounded number of buckets."""
    import random
    rng = random.Random(7)
    values = [rng.lognormvariate(-8, 1.5) for _ in range(100_000)]  # ~0.3 ms, long tail
    h = demo.Histogram()
    for v in values:
        h.add(v)
    assert demo.Histogram().quantile(0.5) == 0.0
    exact = sorted(values)
    for q in (0.01, 0.5, 0.9, 0.99, 0.999):
        want = exact[int(len(exact) * q)]
        assert abs(h.quantile(q) - want) <= 0.01 * want, (q, h.quantile(q), want)
    assert h.max == max(values) and h.n == len(values)
    assert len(h.counts) < 2000
    merged = demo.Histogram()
    merged.merge(h)
    merged.merge(h)
    assert merged.n == 2 * h.n and merged.quantile(0.5) == h.quantile(0.5)
