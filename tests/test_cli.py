"""The command line as an operator uses it: real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

from .helpers import reap, stop_process, wait_for

from zrepl import FileStorage, WALEntry
from zrepl.storage.wal import list_segments


def run(*args: str, env_path: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env_path, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "zrepl", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    assert "wal" in proc.stdout and "usage: zrepl" in proc.stdout


def test_no_command_is_a_usage_error():
    proc = run()
    assert proc.returncode == 2
    assert "a command is required" in proc.stderr


def test_wal_dump_prints_every_entry(data_dir):
    with FileStorage(data_dir, fsync="off") as s:
        s.set_leader_id(2)
        s.write_wal([WALEntry(i, f"cmd-{i}".encode()) for i in range(1, 6)])
        s.write_wal([WALEntry(6, b"x" * 100)])
    proc = run("wal", "dump", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# role=0 leader_id=2")
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2][3] == "b'cmd-3'" and rows[2][2] == "5"
    assert rows[5][3].endswith("...")  # long data shortened
    proc = run("wal", "dump", str(data_dir), "--from", "3", "--limit", "2", "--full")
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()[1:]] == ["3", "4"]


def test_wal_dump_reports_a_torn_tail_and_does_not_repair_it(data_dir):
    with FileStorage(data_dir, fsync="off") as s:
        s.write_wal([WALEntry(1, b"a")])
        s.write_wal([WALEntry(2, b"b")])
    (_, seg), = list_segments(data_dir / "wal")
    raw = seg.read_bytes()
    seg.write_bytes(raw[:-2])
    proc = run("wal", "dump", str(data_dir))
    assert proc.returncode == 0
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["1"]
    assert "warning: the log ends at a bad record" in proc.stderr
    assert seg.read_bytes() == raw[:-2]  # read-only


def test_wal_dump_of_a_non_data_dir_fails_with_one_line(data_dir):
    proc = run("wal", "dump", str(data_dir / "nope"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "is not a zrepl data directory" in proc.stderr


def test_wal_without_subcommand_fails():
    proc = run("wal")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "zrepl: wal: a subcommand is required (see 'zrepl wal --help')"


def test_a_usage_error_points_at_the_commands_own_help():
    proc = run("node", "--bogus-flag")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("zrepl node: unrecognized arguments: --bogus-flag "
                                   "(see 'zrepl node --help')")
    proc = run("wal", "dump", "x", "--bogus")
    assert proc.returncode == 2 and "(see 'zrepl wal dump --help')" in proc.stderr
    proc = run("--bogus")
    assert proc.returncode == 2 and "(see 'zrepl --help')" in proc.stderr


def test_status_refuses_a_timeout_that_is_not_positive():
    for bad in ("-1", "0"):
        proc = run("status", "--node", "tcp://127.0.0.1:1", "--timeout", bad)
        assert proc.returncode == 1 and proc.stdout == ""
        assert "--timeout must be a number of seconds above 0" in proc.stderr


def test_bad_flag_fails():
    proc = run("wal", "dump", "--limit", "many", "x")
    assert proc.returncode == 2
    assert "invalid int value" in proc.stderr


def test_node_refuses_bad_setup_with_one_line(data_dir):
    cases = [
        (["--app", "nosuchmodule:X"], "cannot import nosuchmodule"),
        (["--app", "workers.kv"], "MODULE:CLASS"),
        (["--app", "workers.kv:encode"], "not a zrepl.App subclass"),
        (["--app", "workers.kv:KV", "--listen", "udp://x"], "tcp:// or ipc://"),
    ]
    apps = data_dir / "apps"
    apps.mkdir()
    (apps / "broken_syntax.py").write_text("def x(:\n")
    (apps / "broken_import.py").write_text("raise RuntimeError('boom')\n")
    (apps / "broken_init.py").write_text(
        "from workers.kv import KV\nclass App(KV):\n    def __init__(self):\n"
        "        raise ValueError('no config')\n")
    cases += [
        (["--app", "broken_syntax:X"], f"SyntaxError: invalid syntax ({apps}/broken_syntax.py:1)"),
        (["--app", "broken_import:X"], f"RuntimeError: boom ({apps}/broken_import.py:1)"),
        (["--app", "broken_init:App"], f"broken_init:App() failed: ValueError: no config "
                                      f"({apps}/broken_init.py:4)"),
    ]
    for extra, message in cases:
        args = ["node", "--data", str(data_dir / "d"), "--listen", f"ipc://{data_dir}/n.sock"]
        args += extra
        proc = run(*args, env_path=str(apps))
        one_line_error(proc, message)


def test_node_config_file_errors_name_the_problem(data_dir):
    cfg = data_dir / "n.toml"
    base = ["node", "--app", "workers.kv:KV", "--data", str(data_dir / "d"),
            "--listen", f"ipc://{data_dir}/n.sock", "--config", str(cfg)]
    cfg.write_text("no_such_setting = 1\n")
    proc = run(*base)
    assert proc.returncode == 1 and "unknown setting 'no_such_setting'" in proc.stderr
    cfg.write_text("fsync = [\n")
    proc = run(*base)
    assert proc.returncode == 1 and "not valid TOML" in proc.stderr
    cfg.write_text('fsync = "sometimes"\n')
    proc = run(*base)
    assert proc.returncode == 1 and "fsync must be one of" in proc.stderr
    proc = run(*base[:-1], str(data_dir / "missing.toml"))
    assert proc.returncode == 1 and "cannot read config" in proc.stderr
    cfg.write_text("[supervisor]\nwindow = 4\n")  # a setting under another group's table
    proc = run(*base)
    assert proc.returncode == 1 and "[supervisor] has no setting 'window'" in proc.stderr
    cfg.write_text("[replication]\nack_timeout = 3.0\n")  # fine alone, not with the rest
    proc = run(*base)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "ack_timeout (3.0) must not exceed state_sync_stall_timeout" in proc.stderr


def test_node_runs_and_stops_on_sigterm(data_dir):
    import time
    from zrepl import NodeClient, ReplicationError
    address = f"ipc://{data_dir}/n.sock"
    proc = subprocess.Popen([sys.executable, "-m", "zrepl", "node", "--app", "workers.kv:KV",
                             "--data", str(data_dir / "d"), "--listen", address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with NodeClient(address, timeout=0.5) as c:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if c.ping():
                        break
                except ReplicationError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "node did not start"
            assert c.status().address == address
        assert stop_process(proc) == 0
        assert "stopping" in proc.stderr.read()
    finally:
        reap(proc)


# --- settings from TOML, one-line errors ----------------------------------------------

def one_line_error(proc: subprocess.CompletedProcess, message: str, code: int = 1) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0], proc.stderr


def test_each_command_has_help():
    for command in (["node"], ["supervisor"], ["status"], ["demo"], ["wal", "dump"]):
        proc = run(*command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert f"usage: zrepl {' '.join(command)}" in proc.stdout
        assert "--config FILE.toml" in proc.stdout


def test_bad_flags_and_missing_settings_are_one_line(data_dir):
    one_line_error(run("node", "--frobnicate"), "unrecognized arguments: --frobnicate", 2)
    one_line_error(run("node", "--fsync", "sometimes"), "invalid choice: 'sometimes'", 2)
    one_line_error(run("node", "--log-level", "chatty"), "invalid choice: 'CHATTY'", 2)
    one_line_error(run("status", "--timeout", "soon"), "invalid float value: 'soon'", 2)
    one_line_error(run("demo", "--seconds", "x"), "invalid float value: 'x'", 2)
    one_line_error(run("node", "--data", str(data_dir)), "node needs --app MODULE:CLASS")
    one_line_error(run("node", "--app", "workers.kv:KV", "--data", str(data_dir)),
                   "node needs --listen ENDPOINT")
    one_line_error(run("supervisor"), "supervisor needs --node ENDPOINT")
    one_line_error(run("supervisor", "--node", "ipc:///x", "--state", "/proc/no/state.json"),
                   "cannot write to /proc/no")
    one_line_error(run("status"), "status needs --node ENDPOINT")
    one_line_error(run("wal", "dump"), "wal dump needs DIR")
    one_line_error(run("demo", "--clients", "0"), "must be positive")


def test_config_file_errors_name_the_file_and_key(data_dir):
    cfg = data_dir / "c.toml"
    cases = [
        ("node", 'app = "workers.kv:KV"\nbogus = 1\n', "unknown setting 'bogus'"),
        ("node", "listen = 7400\n", "listen must be a string; got 7400"),
        ("node", "window = -1\n", "window must be a positive number"),
        ("node", 'log_level = "LOUD"\n', "log_level must be one of DEBUG"),
        ("supervisor", 'nodes = "tcp://127.0.0.1:1"\n', "nodes must be a list of strings"),
        ("supervisor", 'nodes = ["udp://x"]\n', "tcp:// or ipc://"),
        ("status", "nodes = []\nfsync = \"off\"\n", "unknown setting 'fsync'"),
        ("status", "timeout = \"long\"\n", "timeout must be a number"),
        ("demo", "clients = 2.5\n", "clients must be an integer"),
        ("demo", "[section]\nx = 1\n", "unknown setting 'section'"),
        ("demo", 'transport = "udp"\n', "transport must be one of ipc, tcp"),
    ]
    for command, text, message in cases:
        cfg.write_text(text)
        extra = ["--app", "workers.kv:KV", "--data", str(data_dir / "d"), "--listen",
                 f"ipc://{data_dir}/n.sock"] if command == "node" and "listen" not in text \
            else []
        proc = run(command, *extra, "--config", str(cfg))
        one_line_error(proc, message)
        if "unknown" in message or "must be" in message and "positive" not in message:
            assert str(cfg) in proc.stderr
    cfg.write_bytes(b"\xff\xfe")
    one_line_error(run("status", "--config", str(cfg)), "is not UTF-8 text")
    one_line_error(run("wal", "dump", "--config", str(data_dir / "nope.toml")),
                   "cannot read config")


def test_wal_dump_reads_its_flags_from_toml(data_dir):
    with FileStorage(data_dir / "d", fsync="off") as s:
        s.write_wal([WALEntry(i, b"x") for i in range(1, 10)])
    cfg = data_dir / "c.toml"
    cfg.write_text(f'dir = "{data_dir / "d"}"\nstart = 4\nlimit = 3\n')
    proc = run("wal", "dump", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["4", "5", "6"]
    proc = run("wal", "dump", "--config", str(cfg), "--limit", "1")  # the flag wins
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["4"]


def test_node_from_toml_only_logs_json_lines_with_its_address(data_dir):
    import json
    address = f"ipc://{data_dir}/n.sock"
    cfg = data_dir / "n.toml"
    cfg.write_text(f'app = "workers.kv:KV"\ndata = "{data_dir / "d"}"\nlisten = "{address}"\n'
                   'fsync = "off"\nlog_format = "json"\nlog_level = "DEBUG"\n')
    proc = subprocess.Popen([sys.executable, "-m", "zrepl", "node", "--config", str(cfg),
                             "--log-level", "INFO"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: pings(address, proc), 20, "the node to answer")
        assert stop_process(proc) == 0
        err = proc.stderr.read()
    finally:
        reap(proc)
    events = [json.loads(line) for line in err.splitlines()]
    assert events and all(e["node"] == address for e in events), err
    assert {e["level"] for e in events} <= {"INFO", "WARNING"}  # the flag beat the file
    assert any(e["msg"].startswith("serving: role UNKNOWN") for e in events)
    assert any("stopping" in e["msg"] for e in events)
    assert not any(e["msg"].startswith("[") for e in events)  # no address twice


def pings(address: str, proc: subprocess.Popen) -> bool:
    from zrepl.local import pings as node_pings
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
    return node_pings(address)


def test_status_and_supervisor_from_the_command_line(data_dir):
    import json
    from .helpers.cluster import Cluster
    with Cluster(fsync="off") as cluster:
        a, b = cluster.node("a").start(), cluster.node("b").start()
        sup = cluster.supervisor([a, b])
        sup.wait_synchronous(1)
        proc = run("status", "--node", a.address, "--node", b.address)
        assert proc.returncode == 0, proc.stderr
        table = proc.stdout.splitlines()
        assert table[0].split()[:3] == ["NODE", "ROLE", "EPOCH"]
        roles = {line.split()[0]: line.split()[1] for line in table[1:]}
        assert roles == {a.address: "LEADER", b.address: "FOLLOWER"}
        assert "SYNCHRONOUS" in table[1]
        cfg = data_dir / "st.toml"
        cfg.write_text(f'supervisor = "{sup.address}"\njson = true\ntimeout = 2\n')
        proc = run("status", "--config", str(cfg))
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["supervisor"]["leader"] == a.address
        assert [n["address"] for n in doc["nodes"]] == [a.address, b.address]
        assert doc["nodes"][0]["status"]["role"] == "LEADER"
        assert doc["nodes"][0]["status"]["follower_state"] == "SYNCHRONOUS"
        # the same shape when only nodes are asked (no supervisor: null)
        proc = run("status", "--node", a.address, "--json")
        only = json.loads(proc.stdout)
        assert only["supervisor"] is None and only["nodes"][0]["status"]["role"] == "LEADER"
        # (issue "day-two operations") a node's address given as the supervisor's
        proc = run("status", "--supervisor", a.address)
        assert proc.returncode == 1 and proc.stdout == ""
        assert "answered, but not as a supervisor: it looks like a node" in proc.stderr
        a.kill()
        proc = run("status", "--node", a.address, "--node", b.address, "--timeout", "0.3")
        assert proc.returncode == 1
        assert "DOWN" in proc.stdout and f"did not answer: {a.address}" in proc.stderr
        # the reason whole, under the table, not cut to stretch a column
        table, _, below = proc.stdout.partition("\nDOWN:\n")
        head = table.splitlines()[0]
        assert head.index("LAG s") - head.index("FOLLOWER STATE") < 40
        assert table.splitlines()[1].split() == [a.address, "DOWN"]
        assert below.strip().startswith(f"{a.address}: Timeout: ") and \
            below.strip().endswith("deadline")


def test_status_asks_every_node_at_once(data_dir):
    """Down nodes cost one deadline in all, not one each."""
    import time
    from zrepl import NodeStatus, Timeout
    from zrepl.core.errors import ProtocolError
    from zrepl.engine.remote import poll_statuses
    from .helpers.cluster import Cluster
    with Cluster(fsync="off") as cluster:
        a = cluster.node("a").start()
        dead = [f"ipc://{data_dir}/dead{i}" for i in range(4)]
        t0 = time.monotonic()
        res = poll_statuses(dead + ["nonsense", a.address], timeout=2.0)
        elapsed = time.monotonic() - t0
        assert list(res) == dead + ["nonsense", a.address]
        assert all(isinstance(res[d], Timeout) for d in dead), res
        assert isinstance(res["nonsense"], ProtocolError)
        assert isinstance(res[a.address], NodeStatus) and res[a.address].address == a.address
        assert elapsed < 4.0, f"{elapsed:.1f}s: asked one node after another (4 x 2 s)"


def test_demo_keep_refuses_a_directory_in_use(data_dir):
    """(issue 'day-two operations') --keep into a node's data directory
    would have the demo's nodes take it over."""
    used = data_dir / "used"
    used.mkdir()
    (used / "meta.json").write_text("{}")
    proc = run("demo", "--keep", str(used))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == (f"zrepl: --keep {used}: give a new or empty directory; "
                                   "this one is not empty")
    assert [p.name for p in used.iterdir()] == ["meta.json"]  # untouched
    afile = data_dir / "afile"
    afile.write_text("x")
    proc = run("demo", "--keep", str(afile))
    assert proc.returncode == 1 and "not a directory" in proc.stderr


def test_the_console_script_imports_an_app_from_the_working_directory(tmp_path):
    """(issue "day-two operations") 'zrepl node --app mymodule:Counter' as the
    installed console script: sys.path[0] is the script's directory, not
    the working directory, unlike 'python3 -m zrepl'.  Both import from the
    working directory."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    script = bin_dir / "zrepl"  # what pip writes for [project.scripts]
    script.write_text("import sys\nfrom zrepl.cli import main\nsys.exit(main())\n")
    (work / "mymodule.py").write_text("Counter = 42\n")  # found, and refused by name
    from .helpers.cluster import ROOT
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cmd in ([sys.executable, str(script)], [sys.executable, "-m", "zrepl"]):
        proc = subprocess.run(cmd + ["node", "--app", "mymodule:Counter", "--data",
                                     str(work / "d"), "--listen", f"ipc://{work}/n.sock"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert "mymodule:Counter is not a zrepl.App subclass" in proc.stderr, (cmd, proc.stderr)


def test_a_node_that_cannot_bind_leaves_no_data_directory_and_no_address_behind(tmp_path):
    import json
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        bad = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        fresh = tmp_path / "fresh"
        one_line_error(run("node", "--app", "workers.kv:KV", "--data", str(fresh),
                           "--listen", bad), "127.0.0.1")
        assert not fresh.exists()
        # a directory that held a node keeps its own address
        used = tmp_path / "used"
        good = f"ipc://{tmp_path}/n.sock"
        FileStorage(used).close()
        st = FileStorage(used)
        st.set_address(good)
        st.close()
        one_line_error(run("node", "--app", "workers.kv:KV", "--data", str(used),
                           "--listen", bad), "127.0.0.1")
        assert json.loads((used / "meta.json").read_text())["address"] == good


def test_the_embedded_engine_logs_through_logging_only(tmp_path):
    """(issue "day-two operations") no bare lines on stderr from a library:
    silent until the application configures logging, then in its format."""
    from .helpers.cluster import ROOT
    script = (
        "import logging, sys, zrepl\n"
        "from workers.kv import KV\n"
        "if sys.argv[1] == 'configured':\n"
        "    logging.basicConfig(format='APP %(levelname)s %(name)s %(message)s')\n"
        f"r = zrepl.Replica(KV(), zrepl.FileStorage({str(tmp_path)!r} + '/' + sys.argv[1]), "
        f"address='ipc://{tmp_path}/n.sock')\n"
        "r.start()\n"
        "r.set_role(zrepl.NodeRole.LEADER, 1)\n"
        "r.stop()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    quiet = subprocess.run([sys.executable, "-c", script, "quiet"], capture_output=True,
                           text=True, timeout=60, env=env)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = subprocess.run([sys.executable, "-c", script, "configured"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert loud.returncode == 0
    assert [line for line in loud.stderr.splitlines() if "now LEADER" in line][0].startswith(
        "APP WARNING zrepl.replica"), loud.stderr
