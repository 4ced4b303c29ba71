"""Prometheus metrics: ``zrepl node --metrics HOST:PORT`` (and ``zrepl
supervisor --metrics``) serve ``GET /metrics`` in the Prometheus text
format (version 0.0.4), rendered from the process's own status at each
scrape.  Standard library only: one ``http.server`` thread, off by default.

Every series carries ``node="<address>"``.  Gauges: the node's role and
its follower's state (one series each, value 1, the state as a label),
the epoch, WAL positions, the follower's lag, RSS and CPU, queued and
in-flight submissions; counters (``_total``): client requests, replies,
queries, duplicates answered, dropped messages, refused batches,
replication failures, state syncs and log catch-ups.

The supervisor's series start with ``zrepl_supervisor_``: the epoch in
force and the largest issued, one ``node_up`` per configured node, the
lengths of the chain and of its synchronous part, and counters of polls
and of promotions this process made.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from .core.types import NodeStatus

log = logging.getLogger("zrepl.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return None


class _Text:
    """Prometheus text, one metric family after another."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, help_: str, kind: str,
               samples: list[tuple[str, Any]]) -> None:
        """``samples``: (labels, value); a None value is left out (no sample
        rather than a made-up one)."""
        shown = [(labels, text) for labels, value in samples
                 if (text := _number(value)) is not None]
        if shown:
            self.lines.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}")
            self.lines += [f"{name}{{{labels}}} {text}" if labels else f"{name} {text}"
                           for labels, text in shown]

    def __str__(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(st: NodeStatus) -> str:
    """One node's status in the Prometheus text format."""
    node = f'node="{_label(st.address)}"'
    text = _Text()

    def series(name: str, help_: str, kind: str, value: Any, labels: str = node) -> None:
        text.family(name, help_, kind, [(labels, value)])

    series("zrepl_role", "This node's role (the role is the label).", "gauge", 1,
           f'{node},role="{st.role.name}"')
    if st.follower:
        series("zrepl_follower_state", "The follower link's state (the state is the label).",
               "gauge", 1, f'{node},follower="{_label(st.follower)}",'
               f'state="{st.follower_state.name}"')
    for name, help_, attr in _GAUGES:
        series(name, help_, "gauge", getattr(st, attr))
    for name, help_, key in _EXTRA_COUNTERS:
        series(name, help_, "counter", st.extra.get(key, 0))
    for name, help_, key in _EXTRA_GAUGES:
        series(name, help_, "gauge", st.extra.get(key))
    return str(text)


def render_supervisor(view: dict[str, Any], nodes: list[str]) -> str:
    """The supervisor's view (``Supervisor.status()``) in the Prometheus
    text format."""
    text = _Text()
    leader = view.get("leader") or ""
    text.family("zrepl_supervisor_leader", "The node the supervisor made leader (the "
                "address is the label); absent while there is none.", "gauge",
                [(f'node="{_label(leader)}"', 1 if leader else None)])
    text.family("zrepl_supervisor_epoch", "The epoch (leader_id) in force.", "gauge",
                [("", view.get("leader_id"))])
    text.family("zrepl_supervisor_max_epoch", "The largest epoch ever issued (persisted).",
                "gauge", [("", view.get("max_leader_id"))])
    dead = set(view.get("dead", []))
    text.family("zrepl_supervisor_node_up", "1 while a configured node answers its polls "
                "(0 once it missed missed_heartbeats in a row).", "gauge",
                [(f'node="{_label(a)}"', 0 if a in dead else 1) for a in nodes])
    text.family("zrepl_supervisor_chain_nodes", "Nodes in the chain, the leader included.",
                "gauge", [("", len(view.get("chain", [])))])
    text.family("zrepl_supervisor_synchronous_nodes", "Nodes behind the leader known to "
                "hold every acknowledged write.", "gauge",
                [("", len(view.get("synchronous_chain", [])))])
    text.family("zrepl_supervisor_polls_total", "Rounds of status polls.", "counter",
                [("", view.get("ticks", 0))])
    fenced = view.get("fenced") or {}
    text.family("zrepl_supervisor_fenced", "1 while a node reports an epoch this supervisor "
                "never issued (it is left out of the cluster: an alarm).", "gauge",
                [(f'node="{_label(a)}"', 1 if a in fenced else 0) for a in nodes])
    text.family("zrepl_supervisor_promotions_total", "Leaders this supervisor process "
                "promoted (a fresh cluster's first leader included).", "counter",
                [("", view.get("promotions", 0))])
    return str(text)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` for every interface); ValueError otherwise."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics takes HOST:PORT (e.g. 127.0.0.1:9400), got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def open_metrics(listen: str, render_text: Callable[[], str]) -> "MetricsServer":
    """A server bound to ``listen`` (not started yet), or ValueError with a
    one-line reason: a malformed address or a port that is taken."""
    try:
        return MetricsServer(listen, render_text)
    except OSError as exc:
        raise ValueError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None


class MetricsServer:
    """``GET /metrics`` answered with ``render_text()`` from a daemon thread."""

    def __init__(self, listen: str, render_text: Callable[[], str]):
        host, port = parse_listen(listen)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render_text().encode()
                except Exception as exc:  # a scrape must never take the node down
                    log.warning("metrics scrape failed: %s", exc)
                    self.send_error(500, f"{type(exc).__name__}: {exc}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("metrics: " + fmt, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)  # OSError if taken
        self._server.daemon_threads = True
        self.address = self._server.server_address
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="zrepl-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever to notice
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
