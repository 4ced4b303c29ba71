"""Day-two operations on real processes: planned switchover, membership
changes, backup and restore."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from .helpers import wait_for
from .helpers.cluster import ROOT, Cluster, kv_incr
from .helpers.load import SUPERVISED, Writer, chain_ok, leader_of, missing, supervised_chain

pytestmark = pytest.mark.timeout(240)


def zrepl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zrepl", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_switchover_under_writes_loses_nothing_and_applies_nothing_twice():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, chain = supervised_chain(c)
        sup.wait_synchronous(2)
        writer = Writer(c, nodes, timeout=0.5)
        writer.start()
        try:
            counter = c.client(*nodes, timeout=0.5, retry_for=5.0)
            for round_ in range(3):
                wait_for(lambda: chain_ok(nodes), 30, "a healthy chain")
                sup.wait_synchronous(2)
                old = leader_of(nodes)
                n = len(writer.acked)
                wait_for(lambda: len(writer.acked) > n + 20, 30, "writes before")
                out = zrepl("switchover", "--supervisor", sup.address)
                assert out.returncode == 0, out.stderr + sup.log_tail()
                assert f"switched over from {old.address} to " in out.stdout, out.stdout
                new = leader_of(nodes)
                assert new is not old and new.address in out.stdout
                assert new.status().leader_id == old.status().leader_id
                t = time.monotonic()
                wait_for(lambda: writer.first_ack_after(t), 30, "writes after")
                assert counter.apply(kv_incr("switches")) == 0
        finally:
            writer.stop()
        acked = list(writer.acked)
        final = wait_for(lambda: chain_ok(nodes), 30, "the final chain")
        for n in final:
            wait_for(lambda: not missing(n, acked[-1:]), 30, "catch-up")
            assert missing(n, acked) == []
            assert n.state()["switches"] == 3  # each increment applied once
        logs = "\n".join(n.log_tail(400) for n in nodes)
        assert "ERROR" not in logs, logs


def test_switchover_to_a_named_node_and_refusals():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, chain = supervised_chain(c)
        sup.wait_synchronous(2)
        tail = chain[2]
        out = zrepl("switchover", "--supervisor", sup.address, "--to", tail.address)
        assert out.returncode == 0, out.stderr + sup.log_tail()
        assert leader_of(nodes) is tail
        # refused at once: the leader itself, a stranger
        out = zrepl("switchover", "--supervisor", sup.address, "--to", tail.address)
        assert out.returncode == 1 and "leads already" in out.stderr, out.stderr
        out = zrepl("switchover", "--supervisor", sup.address, "--to", "tcp://127.0.0.1:1")
        assert out.returncode == 1 and "not a member" in out.stderr, out.stderr
        # a target that is not synchronous within the timeout: nothing changes
        wait_for(lambda: chain_ok(nodes), 30, "a healthy chain")
        victim = chain[0]  # now at the tail
        victim.kill(signal.SIGSTOP)
        try:
            out = zrepl("switchover", "--supervisor", sup.address, "--to", victim.address,
                        "--timeout", "0.5")
        finally:
            victim.kill(signal.SIGCONT)
        assert out.returncode == 1 and "switchover refused" in out.stderr, out.stderr
        assert leader_of(nodes) is tail
