"""Day-two operations on real processes: planned switchover, membership
changes, backup and restore."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from zrepl import NodeRole, ProtocolError, ReplicationError

from .helpers import wait_for
from .helpers.cluster import ROOT, Cluster, kv_incr, kv_set
from .helpers.load import SUPERVISED, Writer, chain_ok, leader_of, missing, supervised_chain

pytestmark = pytest.mark.timeout(240)


def zrepl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zrepl", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_switchover_under_writes_loses_nothing_and_applies_nothing_twice():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, chain = supervised_chain(c)
        sup.wait_synchronous(2)
        writer = Writer(c, nodes, timeout=2.0)  # (each write retried for 2 s)
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
        assert writer.failed == 0  # the clients' retries absorbed every pause
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


def test_members_join_and_leave_under_writes_and_survive_a_supervisor_restart():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, chain = supervised_chain(c)
        sup.wait_synchronous(2)
        writer = Writer(c, nodes, timeout=0.5)
        writer.start()
        d = c.node("D").start()
        try:
            out = zrepl("member", "add", "--supervisor", sup.address, d.address,
                        "--timeout", "60")
            assert out.returncode == 0, out.stderr + sup.log_tail()
            assert "joined: synchronous at WAL" in out.stdout, out.stdout
            wait_for(lambda: chain_ok(nodes + [d]), 30, "a chain of four")
            # refusals, changing nothing
            for who, why in [(leader_of(nodes).address, "switch over first"),
                             ("tcp://127.0.0.1:1", "not a member")]:
                out = zrepl("member", "remove", "--supervisor", sup.address, who)
                assert out.returncode == 1 and why in out.stderr, out.stderr
            # the leader's synchronous follower leaves: the others close up first
            first = chain_ok(nodes + [d])[1]
            n = len(writer.acked)
            out = zrepl("member", "remove", "--supervisor", sup.address, first.address,
                        "--timeout", "30")
            assert out.returncode == 0, out.stderr + sup.log_tail()
            rest = [x for x in nodes + [d] if x is not first]
            wait_for(lambda: chain_ok(rest), 30, "a chain of the three left")
            wait_for(lambda: len(writer.acked) > n + 50, 30, "writes after the removal")
            listed = zrepl("member", "list", "--supervisor", sup.address)
            assert listed.returncode == 0 and first.address not in listed.stdout
            assert all(x.address in listed.stdout for x in rest), listed.stdout
        finally:
            writer.stop()
        acked = list(writer.acked)
        for x in rest:
            wait_for(lambda: not missing(x, acked[-1:]), 30, "catch-up")
            assert missing(x, acked) == []
        # a restarted supervisor keeps the changed list, not its --node flags
        sup.kill()
        sup.start()
        view = wait_for(sup.view, 30, "the restarted supervisor")
        assert view["members"] == [x.address for x in nodes + [d] if x is not first]
        wait_for(lambda: chain_ok(rest), 30, "the same chain")
        assert c.client(*rest, timeout=0.5).apply(kv_incr("after")) == 0


def test_the_last_synchronous_copy_cannot_be_removed_and_a_silent_node_cannot_join():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, chain = supervised_chain(c, names="AB")
        sup.wait_synchronous(1)
        out = zrepl("member", "remove", "--supervisor", sup.address, chain[1].address)
        assert out.returncode == 1 and "last synchronous copy" in out.stderr, out.stderr
        ghost = f"ipc://{c.root}/ghost.sock"
        out = zrepl("member", "add", "--supervisor", sup.address, ghost)
        assert out.returncode == 1 and "does not answer" in out.stderr, out.stderr
        stranger = c.node("E").start()
        stranger.client.set_role(NodeRole.FOLLOWER, 99)  # an epoch this supervisor never issued
        out = zrepl("member", "add", "--supervisor", sup.address, stranger.address)
        assert out.returncode == 1 and "never issued" in out.stderr, out.stderr
        assert sup.view()["members"] == [n.address for n in nodes]
        out = zrepl("member", "list", "--supervisor", sup.address, "--json")
        assert out.returncode == 0
        listed = json.loads(out.stdout)
        assert [m["address"] for m in listed] == [n.address for n in nodes]
        assert [m["synchronous"] for m in listed] == [False, True]


class WalWriter(threading.Thread):
    """Unique keys, each acknowledged one with the WAL id it got."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client = client
        self.acked: list[tuple[str, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            i += 1
            try:
                if self.client.apply(kv_set(f"k{i}", i)) == 0:
                    self.acked.append((f"k{i}", self.client.last_wal_id))
            except ReplicationError:
                pass


def test_online_backup_verify_and_point_in_time_restore_match_the_cluster():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, chain = supervised_chain(c)
        sup.wait_synchronous(2)
        writer = WalWriter(c.client(*nodes, timeout=0.5, retry_for=5.0))
        writer.start()
        try:
            wait_for(lambda: len(writer.acked) > 300, 60, "writes")
            b1 = c.root / "b1"
            out = zrepl("backup", "--node", chain[2].address, "--out", str(b1))
            assert out.returncode == 0, out.stderr
            assert "backed up" in out.stdout
            n = len(writer.acked)
            wait_for(lambda: len(writer.acked) > n + 100, 60, "writes after the backup")
        finally:
            writer.halt.set()
            writer.join(timeout=30)
        out = zrepl("backup", "--verify", str(b1))
        assert out.returncode == 0 and "whole" in out.stdout, out.stderr
        m = json.loads((b1 / "manifest.json").read_text())
        start, last = m["checkpoint"]["wal_id"], m["wal"]["last"]
        assert m["app"] == "workers.kv:KV" and start < last

        def keys_at(wal: int) -> tuple[set, set]:
            return ({k for k, w in writer.acked if w <= wal},
                    {k for k, w in writer.acked if w > wal})

        # the whole backup, then a point in time between its checkpoint and its end
        mid = (start + last) // 2
        for name, to_wal in [("R1", None), ("R2", mid)]:
            args = ["restore", str(b1), "--data", str(c.root / name)]
            out = zrepl(*args + (["--to-wal", str(to_wal)] if to_wal else []))
            assert out.returncode == 0, out.stderr
            r = c.node(name).start()
            assert r.status().max_applied_wal == (to_wal or last)
            state = r.state()
            held, later = keys_at(to_wal or last)
            assert held <= set(state) and not (later & set(state))
        # R1 joins the cluster as a follower and catches up: same digest at the same WAL id
        r1 = c.nodes["R1"]
        out = zrepl("member", "add", "--supervisor", sup.address, r1.address, "--timeout", "60")
        assert out.returncode == 0, out.stderr + sup.log_tail()
        leader = leader_of(nodes)
        top = leader.status().max_applied_wal
        wait_for(lambda: r1.status().max_applied_wal == top, 30, "R1 to catch up")
        assert r1.digest() == leader.digest()
        # the point-in-time copy starts a new cluster: a new epoch above its history
        r2 = c.nodes["R2"]
        r3 = c.node("R3")
        out = zrepl("restore", str(b1), "--data", str(r3.data), "--to-wal", str(mid))
        assert out.returncode == 0, out.stderr
        r3.start()
        (c.root / "new.toml").write_text("\n".join(f"{k} = {json.dumps(v)}"
                                                   for k, v in SUPERVISED.items()) + "\n")
        new_sup = subprocess.Popen(
            [sys.executable, "-m", "zrepl", "supervisor", "--node", r2.address, "--node",
             r3.address, "--state", str(c.root / "new.state"), "--config",
             str(c.root / "new.toml")], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: chain_ok([r2, r3]), 30, "the new cluster's chain")
            epochs = [e for e, _ in m["epoch_history"]]
            assert r2.status().leader_id == max(epochs) + 1
            assert c.client(r2, r3, timeout=0.5).apply(kv_set("new", 1)) == 0
            held, later = keys_at(mid)
            assert held <= set(r3.state()) and not (later & set(r3.state()))
        finally:
            new_sup.kill()
            new_sup.wait(timeout=30)
        # damage is found, and nothing is restored from it
        (b1 / "wal.zwal").write_bytes(b"\0" + (b1 / "wal.zwal").read_bytes()[1:])
        out = zrepl("backup", "--verify", str(b1))
        assert out.returncode == 1 and "damaged" in out.stderr, out.stderr
        out = zrepl("restore", str(b1), "--data", str(c.root / "R4"))
        assert out.returncode == 1 and "damaged" in out.stderr and not (c.root / "R4").exists()
        out = zrepl("restore", str(b1), "--data", str(c.root / "R1"))
        assert out.returncode == 1, out.stdout
        out = zrepl("backup", "--node", chain[2].address, "--out", str(b1))
        assert out.returncode == 1 and "not an empty directory" in out.stderr, out.stderr


def test_a_returning_old_leader_rejoins_quietly_and_leaves_no_failure_behind():
    with Cluster(**SUPERVISED) as c:
        nodes, sup, chain = supervised_chain(c)
        sup.wait_synchronous(2)
        client = c.client(*nodes, timeout=0.5)
        for i in range(50):
            assert client.apply(kv_set(f"k{i}", i)) == 0
        old = chain[0]
        old.kill()
        wait_for(lambda: leader_of(nodes) not in (None, old), 30, "a new leader")
        assert client.apply(kv_set("after", 1)) == 0
        old.start()
        wait_for(lambda: chain_ok(nodes), 30, "the old leader back at the tail")
        st = old.status()
        assert st.extra.get("failures", 0) == 0 and not st.extra.get("last_failure"), st.extra
        log = old.log_tail(400)
        assert "ERROR" not in log and "WARNING" not in log.split("serving: role LEADER")[-1], log
        assert "serving: role LEADER" in log and "waits for the supervisor" in log
        assert "INFO zrepl.replica" in log.split("stepped down to FOLLOWER")[0].splitlines()[-1]


def test_the_supervisor_answers_bad_operator_calls_with_errors_and_keeps_going():
    from zrepl.core import protocol as p
    from zrepl.engine.rpc import RpcClient
    with Cluster(**SUPERVISED) as c:
        nodes, sup, chain = supervised_chain(c, names="AB")
        sup.wait_synchronous(1)
        with RpcClient(sup.address, 5.0) as rpc:
            for op, args, why in [("switchover", {"timeout": "soon"}, "timeout must be"),
                                  ("switchover", {"to": 5}, "not a member"),
                                  ("member_add", {"address": "udp://x"}, "refused"),
                                  ("member_remove", {"address": chain[1].address,
                                                     "timeout": -1}, "timeout must be"),
                                  ("no_such", {}, "unknown supervisor operation")]:
                with pytest.raises(ReplicationError, match=why):
                    p.parse_control_reply(rpc.request(p.control_request(op, args), what=op))
            reply = rpc.request(b"\x93garbage", what="garbage")
            with pytest.raises(ProtocolError):
                p.parse_control_reply(reply)
        assert sup.view()["members"] == [n.address for n in nodes]
        assert c.client(*nodes, timeout=0.5).apply(kv_set("still", 1)) == 0
