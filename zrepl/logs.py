"""Logging for the command line: one line per event, with the node's
address, as text for people or JSON for machines."""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")


class _NodeDefault(logging.Filter):
    """Records from code that does not know a node get node = ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node"):
            record.node = ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        node = getattr(record, "node", "")
        msg = record.getMessage()
        if node and msg.startswith(f"[{node}] "):
            msg = msg[len(node) + 3:]  # the node has its own field
        doc = {"ts": round(record.created, 6),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name,
               "node": node, "msg": msg}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        node = getattr(record, "node", "")
        if node and not record.getMessage().startswith(f"[{node}] "):
            head, _, rest = line.partition(f" {record.name} ")
            line = f"{head} {record.name} [{node}] {rest}"
        return line


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger for a zrepl process (stderr)."""
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}; got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NodeDefault())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
