"""The seed's value types: roles, follower states, WAL entries, node status.

Numeric values are the seed's (``seed/replication-interfaces.go.txt``) and go
over the wire as plain integers, so they must never change.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class NodeRole(enum.IntEnum):
    """What a node does in the chain."""

    UNKNOWN = 0
    LEADER = 1
    FOLLOWER = 2
    FORWARDER = 3  # follows its upstream and serves a follower of its own


class FollowerState(enum.IntEnum):
    """A follower's life as its upstream (leader or forwarder) sees it."""

    ERROR = -1  # the follower refused (stale epoch, mismatched codes, protocol)
    NONE = 0  # no follower address configured
    NOT_CONNECTED = 1  # configured, not reachable yet; retried with backoff
    SYNCING_STATE = 2  # full state transfer (clear_state + apply_state)
    SYNCING_LOG = 3  # streaming the WAL from the follower's position
    SYNCHRONOUS = 4  # caught up: every batch waits for its acknowledgement


@dataclass(slots=True)
class WALEntry:
    """One command in the write-ahead log.

    ``wal_id`` counts from 1; 0 means "no entry" everywhere in zrepl
    (``max_wal() == 0`` is an empty log).  ``data`` is the App's encoding of
    the command and is opaque to zrepl.
    """

    wal_id: int
    data: bytes = b""


@dataclass
class NodeStatus:
    """A node's state as reported to the supervisor and to ``zrepl status``.

    The first eight fields are the seed's.  The rest are extensions; every one
    has a default so that a status from an older node still decodes.
    """

    address: str
    role: NodeRole
    leader_id: int
    max_wal: int
    min_wal: int
    max_applied_wal: int
    follower: str
    follower_state: FollowerState
    # --- extensions -------------------------------------------------------
    leader: str = ""  # upstream address this node follows ("" for a leader)
    epoch_history: list[tuple[int, int]] = field(default_factory=list)
    follower_acked_wal: int = 0  # highest WAL id the follower acknowledged
    follower_lag: int = 0  # max_applied_wal - follower_acked_wal while a follower is set
    follower_lag_seconds: float = 0.0  # since the follower last held everything (0: it does)
    follower_sync: bool = False  # is the link to the follower synchronous
    pid: int = 0
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def position(self) -> int:
        """Last WAL id this node holds (after a state sync its WAL may be
        empty while it has applied up to the snapshot's id)."""
        return max(self.max_wal, self.max_applied_wal)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (ints, strs, lists), ready for msgpack or JSON."""
        d = dataclasses.asdict(self)
        d["role"] = int(self.role)
        d["follower_state"] = int(self.follower_state)
        d["epoch_history"] = [[int(a), int(b)] for a, b in self.epoch_history]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NodeStatus":
        """Inverse of :meth:`to_dict`; unknown keys are ignored (newer peers).

        Raises ``ValueError``/``TypeError`` on missing or ill-typed fields, so
        a caller can treat a hostile status as an unhealthy node.
        """
        if not isinstance(d, dict):
            raise TypeError(f"status must be a map, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["role"] = NodeRole(kw["role"])
        kw["follower_state"] = FollowerState(kw["follower_state"])
        kw["epoch_history"] = [(int(a), int(b)) for a, b in kw.get("epoch_history", [])]
        for name in ("leader_id", "max_wal", "min_wal", "max_applied_wal"):
            if type(kw[name]) is not int or kw[name] < 0:
                raise ValueError(f"status field {name} must be a non-negative int")
        for name in ("address", "follower"):
            if not isinstance(kw[name], str):
                raise ValueError(f"status field {name} must be a string")
        return cls(**kw)
