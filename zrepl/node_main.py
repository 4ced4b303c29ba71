"""``zrepl node``: run one node (a Replica over a FileStorage) until it is
stopped by a control call, SIGTERM or SIGINT."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ReplicationError
from .filestorage import FileStorage
from .interfaces import App
from .replica import Replica


class SetupError(Exception):
    """A one-line reason why the node cannot start."""


def load_app(spec: str) -> App:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise SetupError(f"--app must be MODULE:CLASS, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SetupError(f"cannot import {module_name}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise SetupError(f"{module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, App)):
        raise SetupError(f"{spec} is not a zrepl.App subclass")
    return cls()


def config_from(path: str | None, overrides: dict[str, Any]) -> Config:
    """Config defaults <- TOML file <- command-line overrides."""
    values: dict[str, Any] = {}
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise SetupError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SetupError(f"config {path} is not valid TOML: {exc}") from None
        values.update(doc)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SetupError(f"unknown setting {unknown[0]!r}" + (f" in {path}" if path else ""))
    try:
        return Config(**values)
    except (ValueError, TypeError) as exc:
        raise SetupError(f"bad setting: {exc}") from None


def run_node(app_spec: str, data: str, listen: str, config: Config,
             log_level: str = "INFO") -> int:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    app = load_app(app_spec)
    try:
        storage = FileStorage(data, config=config)
    except ReplicationError as exc:
        raise SetupError(str(exc)) from None
    try:
        replica = Replica(app, storage, listen, config)
        try:
            replica.start()
        except (ReplicationError, ValueError) as exc:
            raise SetupError(str(exc)) from None

        def on_signal(signum: int, _frame: Any) -> None:
            logging.getLogger("zrepl.node").info("signal %d: stopping", signum)
            replica._stopping = True
            replica._poke()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not replica.stopped.wait(0.5):
            pass
        replica.stop()
        return 1 if replica.crashed else 0
    finally:
        storage.close()
