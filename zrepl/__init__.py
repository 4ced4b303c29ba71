"""zrepl: hot-standby replication for Python state machines.

The public surface is documented in the README and ``docs/``; everything
listed in ``__all__`` is stable.
"""

from .config import Config
from .errors import (CorruptStorage, FollowerMismatch, NotLeader, ProtocolError,
                     ReplicationError, SessionExpired, StaleLeader, StorageError, StorageLocked,
                     Timeout, WALGap, WALTruncated)
from .filestorage import FileStorage
from .interfaces import App, Follower, Manager, Node, Storage
from .remote import Client, NodeClient, RemoteFollower
from .replica import Replica
from .storage import MemoryStorage
from .supervisor import Supervisor
from .types import FollowerState, NodeRole, NodeStatus, WALEntry

__version__ = "0.1.0"

__all__ = [
    "App", "Client", "Config", "CorruptStorage", "FileStorage", "Follower", "FollowerMismatch",
    "FollowerState", "Manager", "MemoryStorage", "Node", "NodeClient", "NodeRole", "NodeStatus",
    "NotLeader", "ProtocolError", "RemoteFollower", "Replica", "ReplicationError",
    "SessionExpired", "StaleLeader", "Storage", "StorageError", "StorageLocked", "Supervisor",
    "Timeout", "WALEntry", "WALGap", "WALTruncated", "__version__",
]
