"""The measuring scripts that changes of the commit path are judged by
still run against the engine as it is (no figure is asserted: the
machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .helpers.cluster import ROOT


@pytest.mark.timeout(180)
def test_the_anatomy_of_a_commit_stamps_every_step_on_both_sides(tmp_path):
    out = tmp_path / "anatomy.json"
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "anatomy.py"), "--commits", "300",
                           "--rounds", "3", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    steps = [row["step"] for row in doc["critical_path"]]
    assert steps[0].startswith("leader: submit") and steps[-1].startswith("leader: handle the ack")
    assert any(s.startswith("follower: App.apply") for s in steps)
    assert all(row["p50_us"] > 0 for row in doc["critical_path"])  # every stage was stamped
    for side in ("untraced", "traced"):
        cpu = doc["cpu_us"][side]
        assert cpu["leader_total"] > 0 and cpu["follower_total"] > 0 and cpu["bare_echo"] > 0


def test_the_regression_check_refuses_what_it_cannot_compare():
    script = str(ROOT / "perf" / "regress.py")
    bad_ref = subprocess.run([sys.executable, script, "no-such-ref-here"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert bad_ref.returncode == 2 and "not a commit" in bad_ref.stderr
    bad_fig = subprocess.run([sys.executable, script, "HEAD", "--figures", "speed"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert bad_fig.returncode == 2 and "unknown figure" in bad_fig.stderr
