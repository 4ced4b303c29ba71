"""Every error zrepl raises on purpose is a :class:`ReplicationError`.

Callers can catch the base class; the subclasses say what went wrong and
carry what is needed to react (``NotLeader.leader_address`` for a redirect).
"""

from __future__ import annotations


class ReplicationError(Exception):
    """Base class of zrepl's errors."""


class NotLeader(ReplicationError):
    """This node does not accept writes; ``leader_address`` may say who does
    ("" when this node does not know a leader)."""

    def __init__(self, message: str, leader_address: str = ""):
        super().__init__(message)
        self.leader_address = leader_address


class StaleLeader(ReplicationError):
    """A call carried a ``leader_id`` smaller than the one the node obeys: it
    comes from a deposed leader and was refused."""

    def __init__(self, message: str, leader_id: int = 0, current_leader_id: int = 0):
        super().__init__(message)
        self.leader_id = leader_id
        self.current_leader_id = current_leader_id


class Timeout(ReplicationError):
    """An operation did not complete within its deadline.  For a write this
    means *unknown outcome*: it may or may not have been committed."""


class ProtocolError(ReplicationError):
    """A peer sent a malformed frame, an unknown call, a wrong protocol
    version or an oversized message."""


class StorageError(ReplicationError):
    """A Storage call was refused (bad argument) or failed (I/O, corruption)."""


class WALTruncated(StorageError):
    """The requested WAL entries are no longer held (truncated or cleared)."""

    def __init__(self, message: str, wal_id: int = 0, min_wal: int = 0):
        super().__init__(message)
        self.wal_id = wal_id
        self.min_wal = min_wal


class StorageLocked(StorageError):
    """The data directory is already opened by another process or object."""


class CorruptStorage(StorageError):
    """Stored bytes failed their checksum or framing where that cannot be
    repaired by cutting a torn tail (e.g. unreadable metadata)."""


class WALGap(ReplicationError):
    """A WAL batch does not continue the receiver's log (a message was lost
    or the sender's view is out of date): the sender re-handshakes."""


class SessionExpired(ReplicationError):
    """A retried command is older than the session window the nodes keep:
    whether it was applied cannot be told any more."""


class WrongUpstream(ReplicationError):
    """A node was asked to follow an upstream of its epoch other than the
    one it was told to follow (``set_leader``): refused, and retried by
    that upstream, so a follower is never taken over by a stale node."""


class StaleUpstream(ReplicationError):
    """A would-be upstream that does not lead holds less of its own epoch
    than the follower: it is behind, and syncing from it would discard
    entries that may be acknowledged.  Refused (and retried: it may catch
    up)."""


class FollowerMismatch(ReplicationError):
    """The follower's response codes differ from the leader's for the same
    batch: the App is not deterministic, the replicas diverged."""


class PermissionDenied(ReplicationError):
    """The caller's key (its role in the trust directory) may not make this
    call; nothing was changed."""
