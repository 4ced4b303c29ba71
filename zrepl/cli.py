"""The ``python3 -m zrepl`` command line.

Exit status 0 on success; otherwise non-zero with a one-line reason on
stderr (argparse's own usage errors exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import ReplicationError
from .wal import iter_wal


class CommandError(Exception):
    """A one-line reason for a non-zero exit."""


def _fmt_time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat(timespec="microseconds")


def cmd_wal_dump(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir)
    wal_dir = data_dir / "wal"
    if not wal_dir.is_dir():
        raise CommandError(f"{data_dir} is not a zrepl data directory (no wal/ inside)")
    meta_path = data_dir / "meta.json"
    out = sys.stdout
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            out.write(f"# role={meta.get('role')} leader_id={meta.get('leader_id')} "
                      f"epoch_history={meta.get('epoch_history')} "
                      f"max_applied_wal={meta.get('max_applied_wal')}\n")
        except ValueError as exc:
            print(f"warning: {meta_path} is unreadable: {exc}", file=sys.stderr)
    shown = 0
    for kind, first, count, time_ns, payload in iter_wal(wal_dir):
        if kind == "problem":
            print(f"warning: the log ends at a bad record (cut on next open): {payload}",
                  file=sys.stderr)
            break
        if first + count - 1 < args.start:
            continue
        stamp = _fmt_time(time_ns)
        for i, data in enumerate(payload):
            wal_id = first + i
            if wal_id < args.start:
                continue
            if args.limit is not None and shown >= args.limit:
                return 0
            text = repr(data) if args.full or len(data) <= 48 else repr(data[:48]) + "..."
            out.write(f"{wal_id}\t{stamp}\t{len(data)}\t{text}\n")
            shown += 1
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from .node_main import SetupError, config_from, run_node
    overrides = {"fsync": args.fsync, "require_sync": True if args.require_sync else None,
                 "checkpoint_entries": args.checkpoint_entries}
    try:
        config = config_from(args.config, overrides)
        return run_node(args.app, args.data, args.listen, config, args.log_level)
    except SetupError as exc:
        raise CommandError(str(exc)) from None


def cmd_supervisor(args: argparse.Namespace) -> int:
    import logging
    import signal

    from .node_main import SetupError, config_from
    from .supervisor import Supervisor
    try:
        config = config_from(args.config, {})
    except SetupError as exc:
        raise CommandError(str(exc)) from None
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        sup = Supervisor(args.node, state_path=args.state, config=config,
                         listen=args.listen or "")
    except (ValueError, ReplicationError) as exc:
        raise CommandError(str(exc)) from None

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("zrepl.supervisor").info("signal %d: stopping", signum)
        sup._stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sup.run()
    return 0


def _fmt_status_table(results: dict) -> str:
    head = ["NODE", "ROLE", "EPOCH", "WAL", "APPLIED", "FOLLOWER", "FOLLOWER STATE", "LAG",
            "LAG s", "SYNC"]
    rows = []
    for address, st in results.items():
        if isinstance(st, Exception):
            rows.append([address, "DOWN", "", "", "", "", f"{type(st).__name__}: {st}"[:60],
                         "", "", ""])
            continue
        rows.append([
            address, st.role.name, str(st.leader_id),
            f"{st.min_wal}..{st.max_wal}" if st.max_wal else "empty", str(st.max_applied_wal),
            st.follower or "-", st.follower_state.name if st.follower else "-",
            str(st.follower_lag) if st.follower else "-",
            f"{st.follower_lag_seconds:.3f}" if st.follower else "-",
            ("yes" if st.follower_sync else "no") if st.follower else "-"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    return "\n".join(lines) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    from .rpc import RpcClient
    from .supervisor import poll_statuses
    if not args.node and not args.supervisor:
        raise CommandError("status needs --node ENDPOINT (repeatable) or --supervisor ENDPOINT")
    sup_view = None
    if args.supervisor:
        try:
            with RpcClient(args.supervisor, args.timeout) as rpc:
                sup_view = rpc.call("status")
        except ReplicationError as exc:
            raise CommandError(f"supervisor {args.supervisor}: {exc}") from None
        if not args.node:
            args.node = list(dict.fromkeys(sup_view.get("chain", []) + sup_view.get("dead", [])))
    for a in args.node:
        try:
            from .protocol import endpoints
            endpoints(a)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    results = poll_statuses(args.node, timeout=args.timeout)
    if args.json:
        doc = [{"address": a, "ok": not isinstance(st, Exception),
                **({"status": st.to_dict()} if not isinstance(st, Exception)
                   else {"error": f"{type(st).__name__}: {st}"})} for a, st in results.items()]
        if sup_view is not None:
            doc = {"supervisor": sup_view, "nodes": doc}  # type: ignore[assignment]
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    else:
        if sup_view is not None:
            sys.stdout.write(f"supervisor: {sup_view.get('note', '')}\n"
                             f"epoch {sup_view.get('leader_id')} (largest issued "
                             f"{sup_view.get('max_leader_id')}); dead: "
                             f"{', '.join(sup_view.get('dead') or []) or 'none'}\n\n")
        sys.stdout.write(_fmt_status_table(results))
    down = [a for a, st in results.items() if isinstance(st, Exception)]
    if down:
        raise CommandError(f"{len(down)} of {len(results)} node(s) did not answer: "
                           + ", ".join(down))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zrepl", description="Hot-standby replication for Python state machines.")
    parser.add_argument("--version", action="version", version=f"zrepl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    node = sub.add_parser(
        "node", help="run a node",
        description="Run one zrepl node: the App, its WAL and checkpoints in DIR, serving on "
                    "ENDPOINT (tcp://HOST:PORT uses PORT..PORT+3; ipc://PATH uses PATH and "
                    "PATH.data/.ack/.client).  Stops on SIGTERM, SIGINT or a stop call.")
    node.add_argument("--app", required=True, metavar="MODULE:CLASS",
                      help="the App class, e.g. workers.kv:KV")
    node.add_argument("--data", required=True, metavar="DIR", help="data directory")
    node.add_argument("--listen", required=True, metavar="ENDPOINT",
                      help="this node's address, e.g. tcp://127.0.0.1:7400")
    node.add_argument("--config", metavar="FILE.toml",
                      help="settings (zrepl.Config field names) in a TOML file")
    node.add_argument("--fsync", choices=["always", "batch", "off"], help="WAL fsync policy")
    node.add_argument("--require-sync", action="store_true",
                      help="refuse to commit without a synchronous follower")
    node.add_argument("--checkpoint-entries", type=int, metavar="N",
                      help="checkpoint every N applied entries (0: never by count)")
    node.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    node.set_defaults(func=cmd_node)

    sup = sub.add_parser(
        "supervisor", help="run the supervisor",
        description="Keep one leader and a chain of followers among the given nodes: poll "
                    "them every heartbeat, renew the leader's lease, replace a dead leader "
                    "with a node that holds every acknowledged write, re-chain around dead "
                    "nodes.  Stops on SIGTERM or SIGINT.")
    sup.add_argument("--node", action="append", required=True, metavar="ENDPOINT",
                     help="a node's address; repeat for each node, in chain order")
    sup.add_argument("--state", metavar="FILE",
                     help="where to keep the largest epoch issued and the synchronous chain")
    sup.add_argument("--config", metavar="FILE.toml",
                     help="settings (heartbeat_interval, missed_heartbeats, lease, ...)")
    sup.add_argument("--listen", metavar="ENDPOINT",
                     help="answer 'zrepl status --supervisor ENDPOINT' here")
    sup.add_argument("--log-level", default="INFO")
    sup.set_defaults(func=cmd_supervisor)

    st = sub.add_parser("status", help="show every node's state",
                        description="One line per node: role, epoch, WAL, follower, its "
                                    "state and lag.  Exit status 1 if a node did not answer.")
    st.add_argument("--node", action="append", default=[], metavar="ENDPOINT")
    st.add_argument("--supervisor", metavar="ENDPOINT",
                    help="also show the supervisor's view (its --listen endpoint)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--timeout", type=float, default=1.0, help="seconds to wait per node")
    st.set_defaults(func=cmd_status)

    wal = sub.add_parser("wal", help="inspect a node's WAL offline")
    wal_sub = wal.add_subparsers(dest="wal_command", metavar="WAL_COMMAND")
    dump = wal_sub.add_parser(
        "dump", help="print every entry of a data directory's WAL",
        description="Print the WAL of a data directory, one entry per line: "
                    "wal_id, write time (UTC), size, data.  Read-only; a torn or corrupt "
                    "tail is reported on stderr and not printed.")
    dump.add_argument("dir", metavar="DIR", help="the node's data directory")
    dump.add_argument("--from", dest="start", type=int, default=1, metavar="ID",
                      help="first WAL id to print (default: the oldest)")
    dump.add_argument("--limit", type=int, default=None, metavar="N",
                      help="print at most N entries")
    dump.add_argument("--full", action="store_true", help="do not shorten long data")
    dump.set_defaults(func=cmd_wal_dump)
    wal.set_defaults(func=lambda a: _need_sub(wal))
    return parser


def _need_sub(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    raise CommandError(f"{parser.prog}: a subcommand is required")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        print("zrepl: a command is required", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"zrepl: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``| head``): not an error, and keep Python
        # from complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("zrepl: interrupted", file=sys.stderr)
        return 130
