"""zrepl: hot-standby replication for Python state machines.

The public surface is documented in the README and ``docs/``; everything
listed in ``__all__`` is stable.
"""

import logging as _logging

from .core.config import Config
from .core.errors import (CorruptStorage, FollowerMismatch, NotLeader, PermissionDenied,
                          ProtocolError, ReplicationError, SessionExpired, StaleLeader,
                          StaleUpstream, StorageError, StorageLocked, Timeout, WALGap,
                          WALTruncated, WrongUpstream)
from .storage.file import FileStorage
from .core.interfaces import App, Follower, Manager, Node, Storage
from .engine.remote import Client, NodeClient, RemoteFollower
from .engine.replica import Replica
from .storage.base import MemoryStorage
from .storage.shared import SharedReader, SharedStore
from .engine.supervisor import Supervisor
from .core.types import FollowerState, NodeRole, NodeStatus, WALEntry

__version__ = "0.1.0"

# A library logs through ``logging`` only: without a handler configured by
# the application, Python's last-resort handler would print bare WARNING
# lines on stderr.  The zrepl processes (node, supervisor) configure their
# own; an embedding application sees zrepl's events once it configures
# logging (``logging.basicConfig()``, say).
_logging.getLogger("zrepl").addHandler(_logging.NullHandler())

__all__ = [
    "App", "Client", "Config", "CorruptStorage", "FileStorage", "Follower", "FollowerMismatch",
    "FollowerState", "Manager", "MemoryStorage", "Node", "NodeClient", "NodeRole", "NodeStatus",
    "NotLeader", "PermissionDenied", "ProtocolError", "RemoteFollower", "Replica",
    "ReplicationError", "SessionExpired", "SharedReader", "SharedStore", "StaleLeader", "StaleUpstream", "Storage",
    "StorageError", "StorageLocked", "Supervisor",
    "Timeout", "WALEntry", "WALGap", "WALTruncated", "WrongUpstream", "__version__",
]
