"""Prometheus metrics: the text a scrape gets, and a real node serving it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from workers.kv import encode
from zrepl import FollowerState, NodeClient, NodeRole, NodeStatus
from zrepl.local import free_tcp_base, pings
from zrepl.metrics import parse_listen, render
from zrepl.engine.remote import Client

from .helpers import reap, stop_process, wait_for
from .test_cli import one_line_error, run

SAMPLE = re.compile(r'^([a-z_]+)(?:\{([^}]*)\})? (\S+)$')


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by metric name; checks each has its HELP and TYPE first."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            typed[name] = kind
            continue
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        assert name in typed, f"{name} has no TYPE line"
        assert (typed[name] == "counter") == name.endswith("_total"), name
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.setdefault(name, []).append((labels, float(m.group(3))))
    return out


def test_render_states_every_field_once_with_its_node():
    st = NodeStatus("tcp://a:1", NodeRole.LEADER, 3, 120, 5, 119, "tcp://b:1",
                    FollowerState.SYNCHRONOUS, follower_acked_wal=118, follower_lag=1,
                    follower_sync=True, rss_bytes=1 << 25, cpu_percent=12.5,
                    extra={"client_requests": 7, "dropped_messages": 2, "pending": 0,
                           "in_flight": 1, "lease_left": None})
    m = parse(render(st))
    assert m["zrepl_role"] == [({"node": "tcp://a:1", "role": "LEADER"}, 1.0)]
    assert m["zrepl_follower_state"] == [({"node": "tcp://a:1", "follower": "tcp://b:1",
                                           "state": "SYNCHRONOUS"}, 1.0)]
    assert m["zrepl_wal_max_id"][0][1] == 120 and m["zrepl_applied_wal_id"][0][1] == 119
    assert m["zrepl_follower_synchronous"][0][1] == 1 and m["zrepl_leader_id"][0][1] == 3
    assert m["zrepl_client_requests_total"][0][1] == 7
    assert m["zrepl_refused_batches_total"][0][1] == 0  # a counter not bumped yet is 0
    assert "zrepl_lease_left_seconds" not in m  # no lease: no made-up sample
    assert all(len(v) == 1 for k, v in m.items()), "one series per metric"


def test_render_escapes_label_values():
    st = NodeStatus('ipc:///tmp/we"ird\\path', NodeRole.FOLLOWER, 1, 0, 0, 0, "",
                    FollowerState.NONE)
    m = parse(render(st))
    assert m["zrepl_role"][0][0]["node"] == 'ipc:///tmp/we\\"ird\\\\path'
    assert "zrepl_follower_state" not in m  # no follower configured


@pytest.mark.parametrize("bad", ["9400", "host:", "host:port", ":0", ":70000", ""])
def test_metrics_listen_is_checked(bad):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(bad)


def test_node_serves_its_metrics(data_dir):
    address = f"ipc://{data_dir}/n.sock"
    port = free_tcp_base(1)
    proc = subprocess.Popen([sys.executable, "-m", "zrepl", "node", "--app", "workers.kv:KV",
                             "--data", str(data_dir / "d"), "--listen", address,
                             "--metrics", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: pings(address) or proc.poll() is not None, 20, "the node to start")
        assert proc.poll() is None
        with NodeClient(address, timeout=5) as nc:
            nc.set_role(NodeRole.LEADER, 1)
            with Client([address]) as c:
                for i in range(5):
                    assert c.apply(encode(("set", f"k{i}", b"v"))) == 0
            st = nc.status()
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            m = parse(resp.read().decode())
        assert m["zrepl_role"] == [({"node": address, "role": "LEADER"}, 1.0)]
        assert m["zrepl_wal_max_id"][0][1] == st.max_wal == 5
        assert m["zrepl_client_requests_total"][0][1] == 5
        assert m["zrepl_process_resident_memory_bytes"][0][1] > 0
        assert m["process_resident_memory_bytes"][0][1] > 0  # prometheus-client's collectors
        assert m["process_cpu_seconds_total"][0][1] > 0
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert err.value.code == 404
        err.value.close()
        assert stop_process(proc) == 0
    finally:
        reap(proc)


def test_node_refuses_bad_or_taken_metrics_address(data_dir):
    base = ["node", "--app", "workers.kv:KV", "--data", str(data_dir / "d"),
            "--listen", f"ipc://{data_dir}/n.sock"]
    one_line_error(run(*base, "--metrics", "9400"), "--metrics takes HOST:PORT")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line_error(run(*base, "--metrics", f"127.0.0.1:{port}"),
                       f"cannot serve metrics on 127.0.0.1:{port}")
        sup = ["supervisor", "--node", f"ipc://{data_dir}/n.sock"]
        one_line_error(run(*sup, "--metrics", f"127.0.0.1:{port}"),
                       f"cannot serve metrics on 127.0.0.1:{port}")
    one_line_error(run(*sup, "--metrics", "nonsense"), "--metrics takes HOST:PORT")


def scrape(port: int) -> dict | None:
    """The parsed metrics at 127.0.0.1:port (None while nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return parse(resp.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


def test_supervisor_serves_its_metrics():
    from .helpers.cluster import Cluster
    port = free_tcp_base(1)
    with Cluster(fsync="off") as c:
        a, b = c.node("a").start(), c.node("b").start()
        sup = c.supervisor([a, b], metrics=f"127.0.0.1:{port}")
        sup.wait_synchronous(1)
        m = wait_for(lambda: scrape(port), 20, "the supervisor's metrics")
        assert m["zrepl_supervisor_leader"] == [({"node": a.address}, 1.0)]
        assert m["zrepl_supervisor_epoch"] == [({}, 1.0)]
        assert m["zrepl_supervisor_promotions_total"] == [({}, 1.0)]
        assert m["zrepl_supervisor_synchronous_nodes"] == [({}, 1.0)]
        assert sorted(m["zrepl_supervisor_node_up"], key=lambda s: s[0]["node"]) == \
            [({"node": a.address}, 1.0), ({"node": b.address}, 1.0)]
        b.kill()
        wait_for(lambda: ({"node": b.address}, 0.0) in (scrape(port) or {}).get(
            "zrepl_supervisor_node_up", []), 30, "the dead follower to show as down")


def test_reader_processes_count_their_reads_in_the_nodes_metrics():
    """prometheus-client's multiprocess mode: each reader process writes its
    counter into the node's directory for them; a scrape of the node sums
    them, and the directory goes with the node."""
    import msgpack

    from .helpers.cluster import Cluster, kv_set
    port = free_tcp_base(1)
    with Cluster() as c:
        node = c.node("A", readers=2, metrics=f"127.0.0.1:{port}").start()
        node.client.set_role(NodeRole.LEADER, 1)
        wait_for(lambda: node.status().extra["readers"] == 2, 20, "2 readers")
        client = c.client(node)
        assert client.apply(kv_set("k", 1)) == 0
        for _ in range(40):
            client.query(msgpack.packb(("get", "k")))
        # (the first read went to the node, whose reply named its readers)
        m = wait_for(lambda: (s := scrape(port)) and s.get("zrepl_reader_queries_total", [])
                     and s["zrepl_reader_queries_total"][0][1] >= 39 and s, 20,
                     "the readers' reads in the node's metrics")
        assert m["zrepl_reader_queries_total"][0][1] + m["zrepl_queries_total"][0][1] == 40
        counters = node.data / "reader-metrics"
        assert len(list(counters.iterdir())) == 2  # one file per reader process
        node.stop()
        assert not counters.exists()


def test_a_node_with_readers_and_metrics_exits_promptly_on_sigterm():
    """(issue "day-two operations": it took 2-5 s after logging "stopped")
    The readers and the metrics server each notice within a tenth of a
    second; the bound here is generous (the figure is ~0.2 s)."""
    import signal
    import time

    from .helpers.cluster import Cluster
    with Cluster() as c:
        node = c.node("A", readers=2, metrics=f"127.0.0.1:{free_tcp_base(1)}").start()
        wait_for(lambda: node.status().extra["readers"] == 2, 20, "2 readers")
        t = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=30) == 0
        took = time.monotonic() - t
        assert took < 2.0, f"{took:.2f} s from SIGTERM to exit"
