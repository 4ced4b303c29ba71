"""Prometheus metrics: ``zrepl node --metrics HOST:PORT`` (and ``zrepl
supervisor --metrics``) serve ``GET /metrics``, through prometheus-client:
its exposition (text format, or OpenMetrics when a scraper asks for it),
its escaping, its standard ``process_*`` and ``python_*`` collectors, and
its WSGI server on one daemon thread.  Off by default.

zrepl's own series are rendered from the process's status at each scrape
(a custom collector: nothing is counted twice).  Every node series carries
``node="<address>"``.  Gauges: the node's role and its follower's state
(one series each, value 1, the state as a label), the epoch, WAL
positions, the follower's lag, RSS and CPU, queued and in-flight
submissions; counters (``_total``): client requests, replies, queries,
duplicates answered, dropped messages, refused batches, replication
failures, state syncs and log catch-ups.

Reader processes (``--readers``) count the reads they answer in
prometheus-client's multiprocess mode: each writes its counters into a
directory the node made for them (``PROMETHEUS_MULTIPROC_DIR`` in their
environment) and the node's scrape sums them (``zrepl_reader_queries_total``).

The supervisor's series start with ``zrepl_supervisor_``: the epoch in
force and the largest issued, one ``node_up`` per member, the lengths of
the chain and of its synchronous part, and counters of polls and of
promotions this process made.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (CollectorRegistry, GCCollector, PlatformCollector,
                               ProcessCollector, generate_latest, make_wsgi_app)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from .core.types import NodeStatus

log = logging.getLogger("zrepl.metrics")

# (name, help, status attribute) for plain gauges
_GAUGES = [
    ("zrepl_leader_id", "The epoch this node obeys (or leads).", "leader_id"),
    ("zrepl_wal_max_id", "Newest WAL id in this node's log (0: empty).", "max_wal"),
    ("zrepl_wal_min_id", "Oldest WAL id still in this node's log (0: empty).", "min_wal"),
    ("zrepl_applied_wal_id", "Newest WAL id applied to the App.", "max_applied_wal"),
    ("zrepl_follower_acked_wal_id", "Newest WAL id this node's follower acknowledged.",
     "follower_acked_wal"),
    ("zrepl_follower_lag_entries", "Entries applied here that the follower has not "
     "acknowledged.", "follower_lag"),
    ("zrepl_follower_lag_seconds", "Seconds since the follower last held everything "
     "(0: it does).", "follower_lag_seconds"),
    ("zrepl_follower_synchronous", "1 while the link to the follower is synchronous.",
     "follower_sync"),
    ("zrepl_process_resident_memory_bytes", "The node process's RSS.", "rss_bytes"),
    ("zrepl_process_cpu_percent", "The node process's CPU use.", "cpu_percent"),
]

# (name, help, key in status.extra) for counters and gauges kept in extra
_EXTRA_COUNTERS = [
    ("zrepl_client_requests_total", "Commands submitted by remote clients.", "client_requests"),
    ("zrepl_client_replies_total", "Replies sent to remote clients.", "client_replies"),
    ("zrepl_client_replies_dropped_total", "Replies dropped (the client was gone).",
     "client_replies_dropped"),
    ("zrepl_queries_total", "Reads answered.", "queries"),
    ("zrepl_duplicates_answered_total", "Retried commands answered from the session table "
     "instead of being applied again.", "duplicates_answered"),
    ("zrepl_dropped_messages_total", "Malformed or unexpected messages dropped.",
     "dropped_messages"),
    ("zrepl_refused_batches_total", "Well-formed batches this node refused to log.",
     "refused_batches"),
    ("zrepl_checkpoint_failures_total", "Checkpoints that failed (the App's iter_state, the "
     "disk); the WAL is not truncated until one succeeds.", "checkpoint_failures"),
    ("zrepl_denied_calls_total", "Calls and messages refused because the caller's key "
     "(its role) may not make them.", "denied_calls"),
    ("zrepl_failures_total", "Replication failures reported (see the log).", "failures"),
    ("zrepl_state_syncs_sent_total", "Full state syncs sent to the follower.",
     "state_syncs_sent"),
    ("zrepl_state_syncs_received_total", "Full state syncs received from the upstream.",
     "state_syncs_received"),
    ("zrepl_log_catchups_total", "Log catch-ups started toward the follower.", "log_catchups"),
]
_EXTRA_GAUGES = [
    ("zrepl_pending_submissions", "Submissions queued, not yet committed.", "pending"),
    ("zrepl_in_flight_batches", "Batches sent to the follower, not yet acknowledged.",
     "in_flight"),
    ("zrepl_lease_left_seconds", "Time left on the leader's lease (leaders under "
     "lease_required only).", "lease_left"),
    ("zrepl_readers", "Reader processes alive (--readers).", "readers"),
]



def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _family(kind: str, name: str, help_: str, labels: list[str],
            samples: list[tuple[list[str], Any]]) -> Iterator[Metric]:
    """One family; samples whose value is None are left out (no sample
    rather than a made-up one), and a family with none is not shown."""
    shown = [(values, v) for values, value in samples if (v := _number(value)) is not None]
    if not shown:
        return
    fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
        name, help_, labels=labels)
    for values, v in shown:
        fam.add_metric(values, v)
    yield fam


def node_families(st: NodeStatus) -> Iterator[Metric]:
    """One node's status as metric families."""
    node = [st.address]
    yield from _family("gauge", "zrepl_role", "This node's role (the role is the label).",
                       ["node", "role"], [([st.address, st.role.name], 1)])
    if st.follower:
        yield from _family("gauge", "zrepl_follower_state", "The follower link's state (the "
                           "state is the label).", ["node", "follower", "state"],
                           [([st.address, st.follower, st.follower_state.name], 1)])
    for name, help_, attr in _GAUGES:
        yield from _family("gauge", name, help_, ["node"], [(node, getattr(st, attr))])
    for name, help_, key in _EXTRA_COUNTERS:
        yield from _family("counter", name, help_, ["node"], [(node, st.extra.get(key, 0))])
    for name, help_, key in _EXTRA_GAUGES:
        yield from _family("gauge", name, help_, ["node"], [(node, st.extra.get(key))])


def supervisor_families(view: dict[str, Any], nodes: list[str]) -> Iterator[Metric]:
    """The supervisor's view (``Supervisor.status()``) as metric families."""
    leader = view.get("leader") or ""
    yield from _family("gauge", "zrepl_supervisor_leader", "The node the supervisor made "
                       "leader (the address is the label); absent while there is none.",
                       ["node"], [([leader], 1 if leader else None)])
    yield from _family("gauge", "zrepl_supervisor_epoch", "The epoch (leader_id) in force.",
                       [], [([], view.get("leader_id"))])
    yield from _family("gauge", "zrepl_supervisor_max_epoch", "The largest epoch ever issued "
                       "(persisted).", [], [([], view.get("max_leader_id"))])
    dead = set(view.get("dead", []))
    yield from _family("gauge", "zrepl_supervisor_node_up", "1 while a member answers its "
                       "polls (0 once it missed missed_heartbeats in a row).", ["node"],
                       [([a], 0 if a in dead else 1) for a in nodes])
    yield from _family("gauge", "zrepl_supervisor_chain_nodes", "Nodes in the chain, the "
                       "leader included.", [], [([], len(view.get("chain", [])))])
    yield from _family("gauge", "zrepl_supervisor_synchronous_nodes", "Nodes behind the leader "
                       "known to hold every acknowledged write.", [],
                       [([], len(view.get("synchronous_chain", [])))])
    yield from _family("counter", "zrepl_supervisor_polls_total", "Rounds of status polls.",
                       [], [([], view.get("ticks", 0))])
    fenced = view.get("fenced") or {}
    yield from _family("gauge", "zrepl_supervisor_fenced", "1 while a node reports an epoch "
                       "this supervisor never issued (it is left out of the cluster: an "
                       "alarm).", ["node"], [([a], 1 if a in fenced else 0) for a in nodes])
    yield from _family("counter", "zrepl_supervisor_promotions_total", "Leaders this "
                       "supervisor process promoted (a fresh cluster's first leader "
                       "included).", [], [([], view.get("promotions", 0))])


class _Families:
    """A collector calling ``families()`` at each scrape."""

    def __init__(self, families: Callable[[], Iterable[Metric]]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return list(self._families())


def registry_for(families: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry of zrepl's families plus prometheus-client's standard
    process, platform and garbage-collector collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(st: NodeStatus) -> str:
    """One node's status in the Prometheus text format (what a scrape of
    its --metrics gets, without the process collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(lambda: node_families(st)))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


# --- reader processes (multiprocess mode) ---------------------------------------------------

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def reader_queries_counter() -> Any:
    """In a reader process started with ``PROMETHEUS_MULTIPROC_DIR``: the
    counter of reads it answers (None without that directory)."""
    if not os.environ.get(MULTIPROC_ENV):
        return None
    from prometheus_client import Counter
    return Counter("zrepl_reader_queries", "Reads answered by this node's reader processes "
                   "(--readers), all of them together.")


def add_reader_metrics(registry: CollectorRegistry, directory: str) -> None:
    """Sum the reader processes' counters (written into ``directory``) into
    the node's scrape."""
    from prometheus_client import multiprocess
    multiprocess.MultiProcessCollector(registry, path=directory)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` for every interface); ValueError otherwise."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics takes HOST:PORT (e.g. 127.0.0.1:9400), got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def open_metrics(listen: str, families: Callable[[], Iterable[Metric]]) -> "MetricsServer":
    """A server bound to ``listen`` (not started yet), or ValueError with a
    one-line reason: a malformed address or a port that is taken."""
    try:
        return MetricsServer(listen, registry_for(families))
    except OSError as exc:
        raise ValueError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None


class MetricsServer:
    """``GET /metrics`` answered by prometheus-client's WSGI app from a
    daemon thread (any other path: 404)."""

    def __init__(self, listen: str, registry: CollectorRegistry):
        host, port = parse_listen(listen)
        self.registry = registry
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
            if environ.get("PATH_INFO", "/") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"only /metrics is served here\n"]
            try:
                return metrics_app(environ, start_response)
            except Exception as exc:  # a scrape must never take the process down
                log.warning("metrics scrape failed: %s", exc)
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
                return [f"{type(exc).__name__}: {exc}\n".encode()]

        class Quiet(WSGIRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("metrics: " + fmt, *args)

        self._server = make_server(host, port, app, ThreadingWSGIServer,
                                   handler_class=Quiet)  # OSError if taken
        self.address = self._server.server_address
        # (polled every 0.05 s: a stopping node does not wait half a second)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="zrepl-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever to notice
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
