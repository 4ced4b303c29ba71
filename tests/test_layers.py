"""The layers of DESIGN.md ("Engine core"), enforced by import-linter's
contracts in pyproject.toml: the core imports nothing that does I/O."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    """Run lint-imports with the project's contracts on the ``zrepl``
    package found in ``package_parent``."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, "
            "no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=package_parent, env={"PYTHONPATH": str(package_parent),
                                                   "PATH": "/usr/bin:/bin"}, timeout=120)


def test_import_contracts_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_the_contracts_catch_a_core_module_that_does_io():
    """The check can fail: a copy of the package whose core imports
    threading breaks the contract."""
    tmp = Path(tempfile.mkdtemp(prefix="zr-layers-"))
    try:
        shutil.copytree(ROOT / "zrepl", tmp / "zrepl",
                        ignore=shutil.ignore_patterns("__pycache__"))
        types = tmp / "zrepl" / "core" / "types.py"
        types.write_text(types.read_text() + "\nimport threading  # a violation\n")
        result = lint(tmp)
        assert result.returncode != 0
        assert "zrepl.core.types -> threading" in result.stdout, result.stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
