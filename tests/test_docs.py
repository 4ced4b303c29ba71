"""The README's promises: its first two commands, and its App example runs
under a real Replica."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from zrepl import MemoryStorage, NodeRole, Replica

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_starts_with_the_install_and_test_commands():
    text = README.read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert block == ["python3 -m pip install -e . && python3 -m zrepl demo",
                     "python3 -m pip install -e '.[test]' && python3 -m pytest"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "README.md" in ci and "sed -n 2p" in ci  # CI runs the README's own test command


def test_readme_app_example_runs_under_a_replica():
    text = README.read_text()
    code = text[text.index("import msgpack, zrepl\n\nclass Counter"):]
    code = code[:code.index("```")]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    root = Path(tempfile.mkdtemp(prefix="zr-"))
    node = Replica(ns["Counter"](), MemoryStorage(), f"ipc://{root}/n.sock").start()
    try:
        node.set_role(NodeRole.LEADER, 1)
        assert node.manager.apply(("add", "x", 2)) == 0
        assert node.manager.apply_many([("add", "x", 1), ("add", "y", 5)]) == [0, 0]
        assert node.app.counts == {"x": 3, "y": 5}
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_readme_documents_every_setting():
    """The configuration reference names every zrepl.Config field and every
    key each command reads from its TOML file."""
    import dataclasses

    from zrepl import Config, cli
    text = README.read_text()
    missing = [f.name for f in dataclasses.fields(Config) if f"`{f.name}`" not in text]
    assert not missing, f"README does not document: {missing}"
    for keys in (cli.NODE_KEYS, cli.SUPERVISOR_KEYS, cli.STATUS_KEYS, cli.DEMO_KEYS,
                 cli.WAL_DUMP_KEYS, cli.SWITCHOVER_KEYS, cli.MEMBER_KEYS, cli.BACKUP_KEYS,
                 cli.RESTORE_KEYS):
        missing = [k.name for k in keys if f"`{k.name}`" not in text and
                   f"`{k.name.upper()}`" not in text and k.name != "action"]
        assert not missing, f"README does not document command keys: {missing}"


def test_systemd_readme_install_steps_name_the_shipped_files():
    doc = (README.parent / "systemd" / "README.md").read_text()
    for path in (README.parent / "systemd").iterdir():
        if path.name != "README.md":
            assert path.name in doc, path.name
