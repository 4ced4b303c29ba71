"""Shared fixtures and the suite's hygiene rules.

Every test runs under a guard that fails it if it leaves a child process
behind (and kills the stragglers so the next test starts clean).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import psutil
import pytest


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh directory, removed after the test whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="zrepl-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    left = [p for p in me.children(recursive=True) if p.pid not in before]
    alive = []
    for p in left:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    assert not alive, f"test left processes running: {alive}"
