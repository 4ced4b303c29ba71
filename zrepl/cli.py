"""The ``python3 -m zrepl`` command line.

Exit status 0 on success; otherwise non-zero with a one-line reason on
stderr (argparse's own usage errors exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import tomllib

from . import __version__
from . import logs
from .core.config import Config
from .core.errors import ReplicationError, Timeout
from .core.protocol import endpoints as protocol_endpoints
from .storage.wal import iter_wal


class CommandError(Exception):
    """A one-line reason for a non-zero exit."""


# --- settings: flags over a TOML file over defaults -----------------------------------
#
# Every flag of a command has a key (its long name with "_" for "-"; the
# repeatable --node is "nodes").  ``--config FILE.toml`` may set any key, and
# for node and supervisor also any zrepl.Config field; a flag given on the
# command line wins over the file.


@dataclasses.dataclass
class Key:
    name: str
    flag: str
    kind: type | tuple = str
    default: Any = None
    required: bool = False
    config: bool = False  # a zrepl.Config field
    choices: tuple = ()  # compared case-insensitively

    def check(self, value: Any, where: str) -> Any:
        if self.kind is list:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise CommandError(f"{where}: {self.name} must be a list of strings; "
                                   f"got {value!r}")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CommandError(f"{where}: {self.name} must be a number; got {value!r}")
            value = float(value)
        elif not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            kind = {str: "a string", int: "an integer", bool: "true or false"}[self.kind]
            raise CommandError(f"{where}: {self.name} must be {kind}; got {value!r}")
        if self.choices:
            match = [c for c in self.choices if c.lower() == value.lower()]
            if not match:
                raise CommandError(f"{where}: {self.name} must be one of "
                                   f"{', '.join(self.choices)}; got {value!r}")
            value = match[0]
        return value


CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


def _read_toml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CommandError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"config {path} is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CommandError(f"config {path} is not valid TOML: {exc}") from None


def settings(args: argparse.Namespace, keys: list[Key], with_config: bool
             ) -> tuple[dict[str, Any], Config | None]:
    """The command's settings and (if ``with_config``) its zrepl.Config."""
    path = getattr(args, "config", None)
    doc = _read_toml(path) if path else {}
    where = f"config {path}"
    if with_config:
        try:
            doc = Config.flatten(doc)  # [storage], [replication]... tables
        except ValueError as exc:
            raise CommandError(f"{where}: {exc}") from None
    by_name = {k.name: k for k in keys}
    for name in doc:
        if name not in by_name and not (with_config and name in CONFIG_FIELDS):
            raise CommandError(f"{where}: unknown setting {name!r} "
                               f"(see 'zrepl {args.command} --help')")
    checked = {name: by_name[name].check(value, where) if name in by_name else value
               for name, value in doc.items()}
    values: dict[str, Any] = {}
    config_values = {n: v for n, v in checked.items() if n not in by_name}
    for key in keys:
        value = getattr(args, key.name, None)
        if value is None:
            value = checked.get(key.name)
        if value is None:
            if key.required:
                raise CommandError(f"{args.command} needs {key.flag} (or {key.name} = ... "
                                   "in the --config file)")
            value = key.default
        if key.config:
            if value is not None:
                config_values[key.name] = value
        else:
            values[key.name] = value
    config = None
    if with_config:
        try:
            config = Config(**config_values)
        except (ValueError, TypeError) as exc:
            raise CommandError(f"bad setting{' in ' + path if path else ''}: {exc}") from None
    return values, config


def _logging(values: dict[str, Any]) -> None:
    try:
        logs.setup(values["log_level"], values["log_format"])
    except ValueError as exc:
        raise CommandError(str(exc)) from None


NODE_KEYS = [
    Key("app", "--app MODULE:CLASS", required=True),
    Key("data", "--data DIR", required=True),
    Key("listen", "--listen ENDPOINT", required=True),
    Key("metrics", "--metrics HOST:PORT"),
    Key("fsync", "--fsync", config=True),
    Key("require_sync", "--require-sync", bool, config=True),
    Key("checkpoint_entries", "--checkpoint-entries", int, config=True),
    Key("readers", "--readers", int, config=True),
    Key("key", "--key FILE", config=True),
    Key("trust", "--trust DIR", config=True),
    Key("log_level", "--log-level", default="INFO", choices=logs.LEVELS),
    Key("log_format", "--log-format", default="text", choices=logs.FORMATS),
]

SUPERVISOR_KEYS = [
    Key("nodes", "--node ENDPOINT", list, required=True),
    Key("state", "--state FILE"),
    Key("listen", "--listen ENDPOINT"),
    Key("metrics", "--metrics HOST:PORT"),
    Key("key", "--key FILE", config=True),
    Key("trust", "--trust DIR", config=True),
    Key("log_level", "--log-level", default="INFO", choices=logs.LEVELS),
    Key("log_format", "--log-format", default="text", choices=logs.FORMATS),
]

STATUS_KEYS = [
    Key("nodes", "--node ENDPOINT", list, default=[]),
    Key("supervisor", "--supervisor ENDPOINT"),
    Key("json", "--json", bool, default=False),
    Key("timeout", "--timeout", float, default=1.0),
    Key("key", "--key FILE", default=""),
    Key("trust", "--trust DIR", default=""),
]

SWITCHOVER_KEYS = [
    Key("supervisor", "--supervisor ENDPOINT", required=True),
    Key("to", "--to NODE", default=""),
    Key("timeout", "--timeout", float, default=5.0),
    Key("json", "--json", bool, default=False),
    Key("key", "--key FILE", default=""),
    Key("trust", "--trust DIR", default=""),
]

MEMBER_KEYS = [
    Key("action", "ACTION", required=True),
    Key("node", "NODE", default=""),
    Key("supervisor", "--supervisor ENDPOINT", required=True),
    Key("timeout", "--timeout", float, default=120.0),
    Key("json", "--json", bool, default=False),
    Key("key", "--key FILE", default=""),
    Key("trust", "--trust DIR", default=""),
]

BACKUP_KEYS = [
    Key("node", "--node ENDPOINT", default=""),
    Key("out", "--out DIR", default=""),
    Key("verify", "--verify DIR", default=""),
    Key("key", "--key FILE", default=""),
    Key("trust", "--trust DIR", default=""),
]

RESTORE_KEYS = [
    Key("dir", "DIR", required=True),
    Key("data", "--data NEWDIR", required=True),
    Key("to_wal", "--to-wal", int),
]

DEMO_KEYS = [
    Key("seconds", "--seconds", float, default=4.0),
    Key("clients", "--clients", int, default=4),
    Key("transport", "--transport", default="ipc", choices=("ipc", "tcp")),
    Key("keep", "--keep DIR"),
    Key("log_level", "--log-level", default="WARNING", choices=logs.LEVELS),
    Key("log_format", "--log-format", default="text", choices=logs.FORMATS),
]

WAL_DUMP_KEYS = [
    Key("dir", "DIR", required=True),
    Key("start", "--from", int, default=1),
    Key("limit", "--limit", int),
    Key("full", "--full", bool, default=False),
]


def _fmt_time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat(timespec="microseconds")


def cmd_wal_dump(args: argparse.Namespace) -> int:
    values, _ = settings(args, WAL_DUMP_KEYS, with_config=False)
    args = argparse.Namespace(**values)
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
    from .node_main import SetupError, run_node
    values, config = settings(args, NODE_KEYS, with_config=True)
    _logging(values)
    try:
        return run_node(values["app"], values["data"], values["listen"], config,
                        values["metrics"])
    except SetupError as exc:
        raise CommandError(str(exc)) from None


def cmd_reader(args: argparse.Namespace) -> int:
    from .node_main import SetupError, run_reader
    _logging({"log_level": args.log_level, "log_format": "text"})
    try:
        config = Config(**json.loads(sys.stdin.read() or "{}"))  # the node's, on stdin
        return run_reader(args.app, args.shared, args.endpoint, args.parent, config)
    except SetupError as exc:
        raise CommandError(str(exc)) from None


def cmd_supervisor(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from . import sdnotify
    from .metrics import open_metrics, supervisor_families
    from .engine.security import check_exposure
    from .engine.supervisor import Supervisor
    from .node_main import raise_fd_limit
    values, config = settings(args, SUPERVISOR_KEYS, with_config=True)
    _logging(values)
    log = logging.getLogger("zrepl.supervisor")
    raise_fd_limit()
    try:
        check_exposure(values["listen"] or "", config)
        sup = Supervisor(values["nodes"], state_path=values["state"], config=config,
                         listen=values["listen"] or "")
    except (ValueError, ReplicationError) as exc:
        raise CommandError(str(exc)) from None
    server = None
    if values["metrics"]:
        try:
            server = open_metrics(values["metrics"],
                                  lambda: supervisor_families(sup.status(), sup.nodes))
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sup.start()
    if server is not None:
        server.start()
    # The main thread waits for signals and speaks to systemd: READY once the
    # first round of polls is done, WATCHDOG=1 only while rounds keep coming.
    seen_ticks = 0

    def ticking(_interval: float) -> bool:
        nonlocal seen_ticks
        if not sup.running():
            raise CommandError("the supervisor loop stopped unexpectedly (see the log)")
        ticks = sup.ticks
        if ticks and not seen_ticks:
            sdnotify.notify(f"READY=1\nSTATUS=supervising {len(sup.nodes)} node(s)")
        advanced, seen_ticks = ticks != seen_ticks, ticks
        return advanced

    try:
        sdnotify.wait_with_watchdog(stop.wait, ticking, step=0.2)
    finally:
        sdnotify.notify("STOPPING=1")
        if server is not None:
            server.stop()
        sup.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    values, _ = settings(args, DEMO_KEYS, with_config=False)
    if values["seconds"] <= 0 or values["clients"] <= 0:
        raise CommandError("--seconds and --clients must be positive")
    keep = values["keep"]
    if keep is not None and Path(keep).exists() and \
            (not Path(keep).is_dir() or any(Path(keep).iterdir())):
        # (it may hold a node's data: the demo's nodes would take it over)
        raise CommandError(f"--keep {keep}: give a new or empty directory; this one is "
                           f"{'not a directory' if not Path(keep).is_dir() else 'not empty'}")
    _logging(values)
    return run_demo(seconds=values["seconds"], clients=values["clients"],
                    transport=values["transport"], keep=values["keep"])


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as lines of left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _fmt_status_table(results: dict) -> str:
    head = ["NODE", "ROLE", "EPOCH", "WAL", "APPLIED", "FOLLOWER", "FOLLOWER STATE", "LAG",
            "LAG s", "SYNC"]
    rows, errors = [], []
    for address, st in results.items():
        if isinstance(st, Exception):
            # (whole, under the table: cut to fit a column it was unreadable)
            rows.append([address, "DOWN"] + [""] * (len(head) - 2))
            errors.append(f"{address}: {type(st).__name__}: {st}")
            continue
        rows.append([
            address, st.role.name, str(st.leader_id),
            f"{st.min_wal}..{st.max_wal}" if st.max_wal else "empty", str(st.max_applied_wal),
            st.follower or "-", st.follower_state.name if st.follower else "-",
            str(st.follower_lag) if st.follower else "-",
            f"{st.follower_lag_seconds:.3f}" if st.follower else "-",
            ("yes" if st.follower_sync else "no") if st.follower else "-"])
    lines = _columns([head] + rows)
    if errors:
        lines += ["", "DOWN:"] + [f"  {e}" for e in errors]
    return "\n".join(lines) + "\n"


def cmd_sim(args: argparse.Namespace) -> int:
    from .sim.runner import main, parse_faults
    from .sim.world import Settings

    if args.seed is not None and (args.seeds is not None or args.first is not None):
        raise CommandError("give --seed S, or --seeds N (and --first S), not both")
    if args.replay and args.seed is None:
        raise CommandError("--replay prints one seed's trace: give --seed S")
    for name in ("seeds", "nodes", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name} must be at least 1; got {value}")
    if args.nodes is not None and args.nodes < 2:
        raise CommandError("--nodes must be at least 2 (a leader and a follower)")
    settings = Settings()
    try:
        if args.faults is not None:
            settings.faults = parse_faults(args.faults)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.nodes is not None:
        settings.nodes = args.nodes
    if args.steps is not None:
        settings.steps = args.steps
    if args.app is not None:
        settings.app = args.app
    first = args.first if args.first is not None else 1
    seeds = [args.seed] if args.seed is not None else \
        list(range(first, first + (args.seeds if args.seeds is not None else 20)))
    try:
        return main(seeds, settings, replay=bool(args.replay), shrink_it=bool(args.shrink),
                    json_path=args.json or "")
    except ValueError as exc:  # a bad --app
        raise CommandError(str(exc)) from None


def cmd_keygen(args: argparse.Namespace) -> int:
    from .engine.security import KeyFileError, keygen
    if not args.name or not args.role:
        raise CommandError("keygen needs NAME and --role")
    try:
        public, secret = keygen(args.out, args.name, args.role, args.endpoint or "")
    except (KeyFileError, OSError) as exc:
        raise CommandError(str(exc)) from None
    sys.stdout.write(f"{public}  (public: copy it into every member's trust directory)\n"
                     f"{secret}  (secret, mode 0600: this member's --key only)\n")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .engine.remote import poll_statuses
    from .engine.security import from_config
    values, _ = settings(args, STATUS_KEYS, with_config=False)
    nodes, supervisor, timeout = values["nodes"], values["supervisor"], values["timeout"]
    if not timeout > 0:
        raise CommandError(f"--timeout must be a number of seconds above 0; got {timeout}")
    if not nodes and not supervisor:
        raise CommandError("status needs --node ENDPOINT (repeatable) or --supervisor ENDPOINT")
    try:
        config = Config(key=values["key"], trust=values["trust"])
        from_config(config)  # (a bad key file or trust directory is reported now)
    except (ValueError, ReplicationError) as exc:
        raise CommandError(str(exc)) from None
    sup_view = None
    if supervisor:
        sup_view = _ask_supervisor(values, "status", timeout)
        if not isinstance(sup_view, dict) or not {"leader", "chain", "synchronous_chain"} \
                <= set(sup_view):
            what = (f"a node (role {sup_view['role']})" if isinstance(sup_view, dict) and
                    "role" in sup_view else "something else")
            raise CommandError(f"{supervisor} answered, but not as a supervisor: it looks "
                               f"like {what}; give a supervisor's --listen endpoint")
        if not nodes:  # every member (a fenced one too), the chain's order first
            nodes = list(dict.fromkeys(sup_view.get("chain", []) + sup_view.get("dead", []) +
                                       sup_view.get("members", [])))
    for a in nodes:
        try:
            protocol_endpoints(a)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    results = poll_statuses(nodes, timeout=timeout, config=config)
    if values["json"]:
        # One shape whatever was asked: the supervisor's view (null when not
        # asked) and the nodes, roles and states by name as in the table.
        nodes_doc = []
        for a, st in results.items():
            if isinstance(st, Exception):
                nodes_doc.append({"address": a, "ok": False,
                                  "error": f"{type(st).__name__}: {st}"})
                continue
            d = st.to_dict()
            d["role"], d["follower_state"] = st.role.name, st.follower_state.name
            nodes_doc.append({"address": a, "ok": True, "status": d})
        sys.stdout.write(json.dumps({"supervisor": sup_view, "nodes": nodes_doc}, indent=1)
                         + "\n")
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


def _ask_supervisor(values: dict[str, Any], op: str, wait: float, **args: Any) -> Any:
    """One call to the supervisor's --listen endpoint; CommandError with
    the supervisor's reason when it refuses or does not answer."""
    from .engine.rpc import RpcClient
    from .engine.security import from_config
    supervisor = values["supervisor"]
    try:
        security = from_config(Config(key=values["key"], trust=values["trust"]))
        with RpcClient(supervisor, wait, security=security) as rpc:
            return rpc.call(op, **args)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except ReplicationError as exc:
        hint = ""
        if isinstance(exc, Timeout):
            hint = " (is it the supervisor's --listen endpoint?" + (
                "" if values["key"] else " A secured cluster answers only with --key and --trust.") \
                + ")"
        raise CommandError(f"supervisor {supervisor}: {exc}{hint}") from None


def cmd_switchover(args: argparse.Namespace) -> int:
    values, _ = settings(args, SWITCHOVER_KEYS, with_config=False)
    timeout = values["timeout"]
    if not 0 < timeout <= 600:
        raise CommandError(f"--timeout must be a number of seconds in (0, 600]; got {timeout}")
    result = _ask_supervisor(values, "switchover", 2 * timeout + 2, to=values["to"],
                             timeout=timeout)
    if values["json"]:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        sys.stdout.write(f"switched over from {result['from']} to {result['leader']} "
                         f"(epoch {result['epoch']}): writes paused {result['pause_ms']:.1f} ms"
                         + ("" if result["writable"] else
                            "; the new leader has no synchronous follower yet") + "\n")
    return 0 if result["writable"] else 1


def _fmt_members(members: list[dict]) -> str:
    rows = [("NODE", "ROLE", "ANSWERS", "SYNCHRONOUS", "WAL")]
    for m in members:
        rows.append((m["address"], m["role"] + (" (leaving)" if m["leaving"] else ""),
                     "yes" if m["answering"] else "NO",
                     "-" if m["role"] == "LEADER" else "yes" if m["synchronous"] else "no",
                     "-" if m["wal"] is None else str(m["wal"])))
    return "".join(line + "\n" for line in _columns(rows))


def cmd_member(args: argparse.Namespace) -> int:
    import time
    from .engine.remote import NodeClient
    values, _ = settings(args, MEMBER_KEYS, with_config=False)
    action, node, timeout = values["action"], values["node"], values["timeout"]
    if not 0 < timeout <= 3600:
        raise CommandError(f"--timeout must be a number of seconds in (0, 3600]; got {timeout}")
    if action != "list" and not node:
        raise CommandError(f"member {action} needs the node's address (zrepl member {action} "
                           "--supervisor ENDPOINT NODE)")
    if action == "list":
        members = _ask_supervisor(values, "members", 5.0)
        sys.stdout.write(json.dumps(members, indent=1) + "\n" if values["json"]
                         else _fmt_members(members))
        return 0
    if action == "remove":
        result = _ask_supervisor(values, "member_remove", timeout + 5, address=node,
                                 timeout=timeout)
        sys.stdout.write(f"{node} removed; members: {', '.join(result['members'])}\n"
                         "(it still runs: stop it; its data directory is no longer needed)\n")
        return 0
    # add: the node must answer first (a typo would be a member that never does)
    try:
        protocol_endpoints(node)
        with NodeClient(node, timeout=2.0, config=Config(key=values["key"],
                                                         trust=values["trust"])) as c:
            st = c.status()
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except ReplicationError as exc:
        raise CommandError(f"{node} does not answer ({exc}): start it first "
                           "(zrepl node ... --listen NODE)") from None
    view = _ask_supervisor(values, "status", 5.0)
    if st.leader_id > view.get("max_leader_id", 0):
        raise CommandError(f"{node} obeys epoch {st.leader_id}, which this supervisor never "
                           f"issued (largest {view.get('max_leader_id', 0)}): it belongs to "
                           "another cluster or was given a role by hand; it would be fenced")
    start = time.monotonic()
    _ask_supervisor(values, "member_add", 5.0, address=node)
    sys.stderr.write(f"{node} is a member (it holds WAL {st.position}); joining at the tail\n")
    shown = start
    while True:
        members = {m["address"]: m for m in _ask_supervisor(values, "members", 5.0)}
        me = members.get(node)
        if me is None:
            raise CommandError(f"{node} is no longer a member (removed meanwhile?)")
        if me["synchronous"]:
            took = time.monotonic() - start
            sys.stdout.write(f"{node} joined: synchronous at WAL {me['wal']} after {took:.1f} s; "
                             "promotable from now on\n")
            return 0
        now = time.monotonic()
        if now - start > timeout:
            raise CommandError(f"{node} is a member but not yet synchronous after {timeout:g} s "
                               f"(it holds WAL {me['wal']}); it goes on catching up - see "
                               "'zrepl member list'")
        if now - shown >= 2.0:
            shown = now
            top = max((m["wal"] or 0) for m in members.values())
            sys.stderr.write(f"  catching up: WAL {me['wal'] if me['wal'] is not None else '-'}"
                             f" of {top}\n")
        time.sleep(0.2)  # polling the supervisor's view


def _progress_every(seconds: float = 2.0) -> Any:
    """A progress callback printing at most every ``seconds`` on stderr."""
    import time
    last = [0.0]

    def say(text: str) -> None:
        now = time.monotonic()
        if now - last[0] >= seconds:
            last[0] = now
            sys.stderr.write(f"  {text}\n")
    return say


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def cmd_backup(args: argparse.Namespace) -> int:
    from . import backup
    values, _ = settings(args, BACKUP_KEYS, with_config=False)
    try:
        if values["verify"]:
            if values["node"] or values["out"]:
                raise CommandError("backup --verify DIR takes no --node or --out")
            m = backup.verify(values["verify"])
            sys.stdout.write(f"{values['verify']}: whole - app {m['app']}, checkpoint at WAL id "
                             f"{m['checkpoint']['wal_id']} ({m['entries']} entries) and WAL "
                             f"{m['wal']['first']}..{m['wal']['last']}; taken from {m['node']} "
                             f"at {m['created']}\n")
            return 0
        if not values["node"] or not values["out"]:
            raise CommandError("backup needs --node ENDPOINT and --out DIR (or --verify DIR)")
        m = backup.backup(values["node"], values["out"],
                          Config(key=values["key"], trust=values["trust"]),
                          progress=_progress_every())
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except ReplicationError as exc:
        raise CommandError(f"backup failed: {exc}") from None
    sys.stdout.write(f"backed up {m['node']} into {values['out']}: checkpoint at WAL id "
                     f"{m['checkpoint']['wal_id']} + WAL {m['wal']['first']}..{m['wal']['last']} "
                     f"({_size(m['checkpoint']['bytes'] + m['wal']['bytes'])}), app "
                     f"{m['app']}\n")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from . import backup
    values, _ = settings(args, RESTORE_KEYS, with_config=False)
    try:
        r = backup.restore(values["dir"], values["data"], values["to_wal"],
                           progress=_progress_every())
    except ReplicationError as exc:
        raise CommandError(f"restore failed: {exc}") from None
    sys.stdout.write(
        f"restored {values['data']}: state at WAL id {r['wal_id']} (checkpoint {r['checkpoint']} "
        f"+ {r['replayed']} WAL entries), epoch {r['leader_id']}.\n"
        f"Start it with: python3 -m zrepl node --app {r['app']} --data {values['data']} "
        "--listen ENDPOINT\n"
        "then either run a new supervisor over it (the first node of a new cluster, with a new "
        "epoch) or join it to a running cluster: zrepl member add --supervisor ENDPOINT NODE\n")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line naming the problem (argparse prints usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _common(p: argparse.ArgumentParser, what: str, logging_flags: bool = True) -> None:
    p.add_argument("--config", metavar="FILE.toml",
                   help=f"read settings from a TOML file: {what}; flags given here win")
    if logging_flags:
        p.add_argument("--log-level", choices=logs.LEVELS, type=str.upper,
                       help="least severe event logged (default INFO)")
        p.add_argument("--log-format", choices=logs.FORMATS,
                       help="text (default) or json: one object per line")


def _key_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", metavar="FILE",
                   help="this member's secret key (NAME.key_secret from 'zrepl keygen'); with "
                        "--trust, every connection is CURVE-encrypted and authenticated")
    p.add_argument("--trust", metavar="DIR",
                   help="directory of the cluster's public keys (every member's NAME.key)")


METRICS_HELP = ("serve Prometheus metrics at http://HOST:PORT/metrics (off by default; :PORT "
                "for every interface)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zrepl", description="Hot-standby replication for Python state machines.",
        epilog="Each command's --help lists its flags.  Every flag can also be set in the "
               "--config TOML file under its long name with '_' for '-' (nodes = [...] for "
               "repeated --node).")
    parser.add_argument("--version", action="version", version=f"zrepl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    flag = dict(action="store_const", const=True, default=None)

    node = sub.add_parser(
        "node", help="run a node",
        description="Run one zrepl node: the App, its WAL and checkpoints in DIR, serving on "
                    "ENDPOINT (tcp://HOST:PORT uses PORT..PORT+3; ipc://PATH uses PATH and "
                    "PATH.data/.ack/.client).  Tells systemd READY=1 once it serves and "
                    "WATCHDOG=1 while its engine loop runs.  Stops on SIGTERM, SIGINT or a "
                    "stop call.")
    node.add_argument("--app", metavar="MODULE:CLASS",
                      help="the App class, e.g. workers.kv:KV (required)")
    node.add_argument("--data", metavar="DIR", help="data directory (required)")
    node.add_argument("--listen", metavar="ENDPOINT",
                      help="this node's address, e.g. tcp://127.0.0.1:7400 (required)")
    node.add_argument("--metrics", metavar="HOST:PORT", help=METRICS_HELP)
    node.add_argument("--fsync", choices=["always", "batch", "off"], help="WAL fsync policy")
    node.add_argument("--require-sync", help="refuse to commit without a synchronous follower",
                      **flag)
    node.add_argument("--checkpoint-entries", type=int, metavar="N",
                      help="checkpoint every N applied entries (0: never by count)")
    node.add_argument("--readers", type=int, metavar="N",
                      help="N reader processes answering reads from the shared store, at "
                           "PORT+4.. or PATH.read0.. (the App must keep its state in "
                           "zrepl.SharedStore; docs/shared.md)")
    _key_flags(node)
    _common(node, "these keys and any zrepl.Config field (fsync, window, lease, ...)")
    node.set_defaults(func=cmd_node)

    rd = sub.add_parser("reader", help=argparse.SUPPRESS)  # started by a node (--readers)
    rd.add_argument("--app", required=True)
    rd.add_argument("--shared", required=True)
    rd.add_argument("--endpoint", required=True)
    rd.add_argument("--parent", type=int, required=True)
    rd.add_argument("--log-level", default="INFO", choices=logs.LEVELS)
    rd.set_defaults(func=cmd_reader)

    sup = sub.add_parser(
        "supervisor", help="run the supervisor",
        description="Keep one leader and a chain of followers among the given nodes: poll "
                    "them every heartbeat, renew the leader's lease, replace a dead leader "
                    "with a node that holds every acknowledged write, re-chain around dead "
                    "nodes.  Stops on SIGTERM or SIGINT.")
    sup.add_argument("--node", dest="nodes", action="append", metavar="ENDPOINT",
                     help="a node's address; repeat for each node, in chain order (required)")
    sup.add_argument("--state", metavar="FILE",
                     help="where to keep the largest epoch issued and the synchronous chain")
    sup.add_argument("--listen", metavar="ENDPOINT",
                     help="answer 'zrepl status --supervisor ENDPOINT' here")
    sup.add_argument("--metrics", metavar="HOST:PORT", help=METRICS_HELP)
    _key_flags(sup)
    _common(sup, "these keys and any zrepl.Config field (heartbeat_interval, lease, ...)")
    sup.set_defaults(func=cmd_supervisor)

    st = sub.add_parser("status", help="show every node's state",
                        description="One line per node: role, epoch, WAL, follower, its "
                                    "state and lag.  Exit status 1 if a node did not answer.")
    st.add_argument("--node", dest="nodes", action="append", metavar="ENDPOINT",
                    help="a node to ask; repeatable")
    st.add_argument("--supervisor", metavar="ENDPOINT",
                    help="also show the supervisor's view (its --listen endpoint); without "
                         "--node, ask the nodes it supervises")
    st.add_argument("--json", help="machine-readable output", **flag)
    st.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="seconds to wait for the answers; all nodes are asked "
                         "at once (default 1)")
    _key_flags(st)
    _common(st, "nodes, supervisor, json, timeout, key, trust", logging_flags=False)
    st.set_defaults(func=cmd_status)

    so = sub.add_parser(
        "switchover", help="hand the leadership over to another node, losing nothing",
        description="Ask the supervisor for a planned switchover: the leader stops taking "
                    "writes, the target (default: the leader's synchronous follower) is "
                    "promoted with a new epoch once it holds everything the leader logged, "
                    "and the old leader follows at the tail.  Prints how long writes were "
                    "paused.  Refused, changing nothing, when the target is not synchronous "
                    "within --timeout.  Exit status 1 if refused.")
    so.add_argument("--supervisor", metavar="ENDPOINT",
                    help="the supervisor's --listen endpoint (required)")
    so.add_argument("--to", metavar="NODE", help="the node to hand over to")
    so.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="how long the target may take to be synchronous and catch up "
                         "(default 5)")
    so.add_argument("--json", help="machine-readable output", **flag)
    _key_flags(so)
    _common(so, "supervisor, to, timeout, json, key, trust", logging_flags=False)
    so.set_defaults(func=cmd_switchover)

    mb = sub.add_parser(
        "member", help="add, remove or list the supervised nodes at run time",
        description="The supervisor keeps the member list in its --state file; its --node "
                    "flags are only the initial list.")
    mb_sub = mb.add_subparsers(dest="action", metavar="ACTION")
    mb.set_defaults(func=lambda _a: _need_sub(mb))
    for action, text in [
            ("add", "a running node joins at the tail of the chain (a state sync or a "
                    "catch-up) and is promotable once synchronous; waits until then"),
            ("remove", "the node moves to the tail and leaves once the others are "
                       "synchronous ahead of it; refused for the leader and for the last "
                       "synchronous copy of the acknowledged writes"),
            ("list", "each member's role, whether it answers and is synchronous, its WAL")]:
        p = mb_sub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        if action != "list":
            p.add_argument("node", metavar="NODE", help="the node's address")
        p.add_argument("--supervisor", metavar="ENDPOINT",
                       help="the supervisor's --listen endpoint (required)")
        if action != "list":
            p.add_argument("--timeout", type=float, metavar="SECONDS",
                           help="how long to wait for the join or the removal (default 120)")
        else:
            p.add_argument("--json", help="machine-readable output", **flag)
        _key_flags(p)
        _common(p, "supervisor, timeout, json, key, trust", logging_flags=False)
        p.set_defaults(func=cmd_member)

    bk = sub.add_parser(
        "backup", help="back a running node up, or check a backup",
        description="Online: the node writes a checkpoint at its current WAL id; it and the "
                    "WAL after it are copied into --out (a new or empty directory) with a "
                    "manifest (App, epoch history, WAL range, SHA-256 of each file), checked "
                    "before the manifest is written.  Back up a follower: it holds what was "
                    "acknowledged, and the leader is spared the work.  "
                    "--verify DIR checks a backup without restoring it.")
    bk.add_argument("--node", metavar="ENDPOINT", help="the node to back up")
    bk.add_argument("--out", metavar="DIR", help="where to write the backup")
    bk.add_argument("--verify", metavar="DIR", help="check the backup in DIR")
    _key_flags(bk)
    _common(bk, "node, out, verify, key, trust", logging_flags=False)
    bk.set_defaults(func=cmd_backup)

    rs = sub.add_parser(
        "restore", help="a data directory from a backup, up to any WAL id it covers",
        description="Verify the backup in DIR, then build the data directory NEWDIR (new or "
                    "empty) holding the state at --to-wal (default: all of it).  A node started "
                    "on it has no role: a new supervisor makes it the first node of a new "
                    "cluster, or 'zrepl member add' joins it to a running one as a follower.")
    rs.add_argument("dir", metavar="DIR", help="the backup")
    rs.add_argument("--data", metavar="NEWDIR", help="the data directory to create (required)")
    rs.add_argument("--to-wal", type=int, metavar="ID",
                    help="restore the state at this WAL id (point in time)")
    _common(rs, "data, to_wal", logging_flags=False)
    rs.set_defaults(func=cmd_restore)

    kg = sub.add_parser(
        "keygen", help="make a CURVE key pair for a node, supervisor, operator or client",
        description="Write NAME.key (public) and NAME.key_secret (mode 0600) into DIR.  The "
                    "public file names the member's role - and for a node or a supervisor "
                    "its endpoint - for every other member's trust directory.")
    kg.add_argument("name", metavar="NAME", help="the member's name, e.g. n1")
    kg.add_argument("--role", choices=["node", "supervisor", "operator", "client"],
                    help="what the key may do (required)")
    kg.add_argument("--endpoint", metavar="ENDPOINT",
                    help="the address a node (--listen) or a supervisor (--listen) serves on")
    kg.add_argument("--out", metavar="DIR", default=".",
                    help="where to write the two files (default: here)")
    kg.set_defaults(func=cmd_keygen)

    demo = sub.add_parser(
        "demo", help="watch a local cluster replicate, fail over and lose nothing",
        description="Start a leader, a forwarder, a follower and a supervisor as local "
                    "processes running workers.kv in a temporary directory; write through "
                    "zrepl.Client with a live progress line; kill the leader; show the "
                    "failover; check every acknowledged write on every node; print a "
                    "summary.  Exit status 0 only if nothing was lost.  Removes every "
                    "process and file, also on Ctrl-C.")
    demo.add_argument("--seconds", type=float, metavar="S",
                      help="write for S seconds before and after the failover (default 4)")
    demo.add_argument("--clients", type=int, metavar="N",
                      help="concurrent writing clients (default 4)")
    demo.add_argument("--transport", choices=["ipc", "tcp"],
                      help="ipc (default: socket files in the temporary directory) or tcp "
                           "(free ports on 127.0.0.1)")
    demo.add_argument("--keep", metavar="DIR",
                      help="put the data directories and logs in DIR and keep them")
    _common(demo, "seconds, clients, transport, keep, log_level, log_format")
    demo.set_defaults(func=cmd_demo)

    sim = sub.add_parser(
        "sim", help="run the cluster in a deterministic simulator under seeded faults",
        description="Run N nodes (the real engine), the supervisor's real decisions and "
                    "clients with sessions in one process, in virtual time, under faults "
                    "drawn from a seed (delays, drops, duplicates, partitions, crashes, power "
                    "loss, pauses, clock skew, disk errors, slow disks); check the "
                    "invariants after every step and once the healed cluster converged.  A "
                    "failing seed replays exactly (--seed S --replay).  Exit status 1 if "
                    "any invariant broke.  See docs/simulation.md.")
    sim.add_argument("--seeds", type=int, metavar="N",
                     help="run seeds FIRST..FIRST+N-1 (default 20)")
    sim.add_argument("--first", type=int, metavar="S", help="first seed of --seeds (default 1)")
    sim.add_argument("--seed", type=int, metavar="S", help="run this one seed")
    sim.add_argument("--nodes", type=int, metavar="N", help="nodes in the cluster (default 3)")
    sim.add_argument("--app", metavar="MODULE:CLASS",
                     help="the App (default workers.kv:KV; workers.ledger:Ledger; your own "
                          "App class with sim_command(rng) -> bytes)")
    sim.add_argument("--faults", metavar="KIND,...",
                     help="fault kinds to inject (default all: delay, drop, dup, partition, "
                          "crash, power, pause, skew, disk, slow; 'none' for none)")
    sim.add_argument("--steps", type=int, metavar="N",
                     help="scheduler steps under faults per seed (default 20000, about 30 "
                          "simulated seconds)")
    sim.add_argument("--replay", help="print the whole trace of the seed (with --seed)",
                     **flag)
    sim.add_argument("--shrink", help="shrink the first failing seed's faults to the fewest "
                                      "that still break the same invariant", **flag)
    sim.add_argument("--json", metavar="FILE", help="write the summary and every seed's "
                                                    "result to FILE")
    sim.set_defaults(func=cmd_sim)

    wal = sub.add_parser("wal", help="inspect a node's WAL offline")
    wal_sub = wal.add_subparsers(dest="wal_command", metavar="WAL_COMMAND")
    dump = wal_sub.add_parser(
        "dump", help="print every entry of a data directory's WAL",
        description="Print the WAL of a data directory, one entry per line: "
                    "wal_id, write time (UTC), size, data.  Read-only; a torn or corrupt "
                    "tail is reported on stderr and not printed.")
    dump.add_argument("dir", metavar="DIR", nargs="?",
                      help="the node's data directory (or dir = ... in --config)")
    dump.add_argument("--from", dest="start", type=int, metavar="ID",
                      help="first WAL id to print (default: the oldest)")
    dump.add_argument("--limit", type=int, metavar="N", help="print at most N entries")
    dump.add_argument("--full", help="do not shorten long data", **flag)
    _common(dump, "dir, start, limit, full", logging_flags=False)
    dump.set_defaults(func=cmd_wal_dump, command="wal dump")
    wal.set_defaults(func=lambda a: _need_sub(wal))
    _own_parsers(parser)
    return parser


def _need_sub(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    name = parser.prog.split(" ", 1)[-1]  # ("zrepl: " comes with every error)
    raise CommandError(f"{name}: a subcommand is required (see '{parser.prog} --help')")


def _own_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command knows its parser: a usage error names the
    command's own --help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_parser=sub)
                _own_parsers(sub)


def main(argv: Sequence[str] | None = None) -> int:
    # --app MODULE:CLASS is imported from the working directory first, as
    # 'python3 -m zrepl' does: the installed console script would otherwise
    # see only its own bin directory and the installed packages.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
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
