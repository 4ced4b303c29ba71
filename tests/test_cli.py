"""The command line as an operator uses it: real subprocesses."""

from __future__ import annotations

import subprocess
import sys

from zrepl import FileStorage, WALEntry
from zrepl.wal import list_segments


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zrepl", *args], capture_output=True,
                          text=True, timeout=60)


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
    assert "subcommand is required" in proc.stderr


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
    for extra, message in cases:
        args = ["node", "--data", str(data_dir / "d"), "--listen", f"ipc://{data_dir}/n.sock"]
        args += extra
        proc = run(*args)
        assert proc.returncode == 1, proc.stderr
        assert message in proc.stderr.strip().splitlines()[-1], proc.stderr


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


def test_node_runs_and_stops_on_sigterm(data_dir):
    import signal
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        _, err = proc.communicate()
        assert "stopping" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
