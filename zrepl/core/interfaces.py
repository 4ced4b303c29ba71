"""The seed's interfaces: App, Manager, Storage, Follower, Node.

Conventions shared by all of them:

* WAL ids count from 1 and are contiguous; **0 means "none"** (an empty log
  has ``max_wal() == min_wal() == 0``; a node that applied nothing has
  ``max_applied_wal() == 0``).
* ``leader_id`` is an *epoch*: it only grows, is never reused, and 0 means
  "no leader known yet".
* Errors raised on purpose are :class:`zrepl.ReplicationError` subclasses.
"""

from __future__ import annotations

import abc
import concurrent.futures
from datetime import datetime
from typing import Any, Iterator

from .types import NodeRole, NodeStatus, WALEntry


class App(abc.ABC):
    """A deterministic state machine, written by the user.

    Threading: the engine never calls two of these methods at once - every
    call is made holding the engine's App lock - but not always from the
    same thread: a caller of ``Manager.apply`` that finds the lock free
    encodes, applies and answers the batch it leads itself (group commit),
    and the engine's own thread applies what arrives from the upstream.
    So the App needs no lock of its own, and must not keep thread-local
    state between calls.  ``iter_state`` runs in a forked child process
    (copy-on-write snapshot) where fork exists, or in the engine's thread
    over an in-process copy (the in-memory simulation): it must not rely on
    threads, locks held by other threads, or open sockets.

    Determinism: given the same commands in the same order, ``apply`` must
    return the same response codes and reach the same state on every node.
    A difference is detected and reported as ``FollowerMismatch``.
    """

    @abc.abstractmethod
    def encode_cmd(self, cmd: Any, entry: WALEntry) -> WALEntry:
        """Serialise ``cmd`` into ``entry.data`` and return the entry.

        ``entry.wal_id`` is already assigned.  Raise ``ValueError`` or
        ``TypeError`` for a command that cannot be encoded; the submitter
        gets the error and nothing is logged.
        """

    @abc.abstractmethod
    def decode_cmd(self, entry: WALEntry) -> Any:
        """Inverse of :meth:`encode_cmd`."""

    def encode_cmds(self, cmds: list, first_id: int) -> list[bytes]:
        """Optional: the data of a whole batch, ``cmds[i]`` at WAL id
        ``first_id + i`` - what :meth:`encode_cmd` gives each, which is
        what this default calls.  The engine encodes through this method;
        an App may override it to skip a call and a WALEntry per command
        (it must give exactly what ``encode_cmd`` would)."""
        return [self.encode_cmd(c, WALEntry(i)).data for i, c in enumerate(cmds, first_id)]

    def decode_cmds(self, datas: list[bytes], first_id: int) -> list:
        """Optional: :meth:`decode_cmd` of a whole batch (``datas[i]`` at
        WAL id ``first_id + i``); overriding it follows the same rule as
        :meth:`encode_cmds`."""
        return list(map(self.decode_cmd, map(WALEntry, range(first_id, first_id + len(datas)),
                                             datas)))

    @abc.abstractmethod
    def apply(self, cmds: list) -> list[int]:
        """Apply a batch of decoded commands in order.

        Returns one response code per command, each in ``0..65535``.  A
        command that fails (key not found, insufficient funds) returns a
        non-zero code; it must not raise, since the command is already in
        the log and every replica will apply it too.
        """

    @abc.abstractmethod
    def clear_state(self) -> None:
        """Drop all state (before a full state sync or a rebuild)."""

    @abc.abstractmethod
    def iter_state(self) -> Iterator[Any]:
        """Yield commands that rebuild the current state when applied, in
        order, to an empty App.  Runs in a forked child: the state seen is
        frozen at one WAL id while the parent keeps applying."""

    def query(self, request: bytes) -> bytes:
        """Optional (an extension of the seed): answer a read from remote
        clients (``Client.query``) without changing the state.  Called with
        the App lock held, between applies.  What the answer may see depends
        on the kind of read (``docs/reads.md``): a ``leader_only`` read is
        answered only while the App holds exactly the acknowledged writes;
        any other read sees the node's state as it is.  Raise
        ``ValueError`` for a request it does not understand."""
        raise ValueError(f"{type(self).__name__} serves no queries")


class Manager(abc.ABC):
    """What the App's host code calls on the leader.

    Threading: every method may be called from any thread.
    """

    @abc.abstractmethod
    def apply(self, cmd: Any) -> int:
        """Log, replicate and apply one command; return its response code.

        Returns only once the command is committed: written to the WAL and,
        when a follower is synchronous, acknowledged by it.  Raises
        ``NotLeader`` on a non-leader, ``Timeout`` when the commit could not
        be confirmed in time (outcome unknown), ``FollowerMismatch`` when the
        follower's code differs.
        """

    @abc.abstractmethod
    def report_failed(self, fmt: str, *args: Any) -> None:
        """Record a replication failure (``fmt % args``): logged, counted,
        and visible in the node's status."""

    def apply_async(self, cmd: Any) -> concurrent.futures.Future:
        """Submit without blocking; the future's ``result()`` is the
        response code or raises what :meth:`apply` would raise."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(self.apply(cmd))
        except BaseException as exc:  # noqa: BLE001 - the future carries it
            fut.set_exception(exc)
        return fut

    def apply_many(self, cmds: list) -> list[int]:
        """Submit a list of commands, committed in order; same guarantees
        as :meth:`apply` for each.  Returns their response codes."""
        return [self.apply(c) for c in cmds]


class Storage(abc.ABC):
    """Durable state of one node: its metadata and its WAL.

    Threading: implementations are safe to call from several threads.

    Metadata setters are durable when they return (atomic replace), except
    ``set_max_applied_wal``, which is a hint persisted lazily: after a crash
    the engine recomputes what it applied from checkpoint + WAL replay.

    WAL ids written must be contiguous: the first entry of a batch is
    ``max_wal() + 1`` (any id >= 1 when the log is empty), and each next
    entry's id is one more.  Anything else raises ``StorageError`` and writes
    nothing.  Truncation never removes the newest entry, so ``max_wal()``
    only moves back through :meth:`clear_wal`.
    """

    @abc.abstractmethod
    def address(self) -> str:
        """This node's own address ("" if never set)."""

    @abc.abstractmethod
    def set_address(self, addr: str) -> None: ...

    @abc.abstractmethod
    def role(self) -> NodeRole:
        """The persisted role (``NodeRole.UNKNOWN`` if never set)."""

    @abc.abstractmethod
    def set_role(self, role: NodeRole) -> None: ...

    @abc.abstractmethod
    def leader_id(self) -> int:
        """The epoch this node obeys (0 if none yet)."""

    @abc.abstractmethod
    def set_leader_id(self, leader_id: int) -> None:
        """Persist a new epoch.  Raises ``StorageError`` if it is smaller
        than the stored one: epochs never go back."""

    @abc.abstractmethod
    def follower_address(self) -> str:
        """The follower this node streams to ("" if none)."""

    @abc.abstractmethod
    def set_follower_address(self, addr: str) -> None: ...

    @abc.abstractmethod
    def write_wal(self, entries: list[WALEntry]) -> None:
        """Append a batch atomically: after a crash either the whole batch
        or none of it is found.  Durability on return depends on the fsync
        policy of the implementation."""

    @abc.abstractmethod
    def set_max_applied_wal(self, wal_id: int) -> None: ...

    @abc.abstractmethod
    def max_applied_wal(self) -> int: ...

    @abc.abstractmethod
    def max_wal(self) -> int:
        """Largest stored WAL id, 0 when the log is empty."""

    @abc.abstractmethod
    def min_wal(self) -> int:
        """Smallest readable WAL id, 0 when the log is empty."""

    @abc.abstractmethod
    def clear_wal(self) -> None:
        """Remove every entry; the next batch may start at any id."""

    @abc.abstractmethod
    def truncate_wal_before_id(self, wal_id: int) -> None:
        """Drop entries with ids below ``wal_id``.  An implementation may
        keep some of them (it drops whole files); ``min_wal()`` tells what
        is really readable.  Never drops the newest entry."""

    @abc.abstractmethod
    def truncate_wal_before_time(self, t: datetime) -> None:
        """Drop entries written before ``t`` (same rules as by id).  A naive
        datetime is taken as local time."""

    @abc.abstractmethod
    def read_wal(self, start_id: int, max_count: int) -> list[WALEntry]:
        """Return up to ``max_count`` entries from ``start_id`` on.

        Returns ``[]`` when ``start_id > max_wal()`` or the log is empty;
        raises ``WALTruncated`` when ``start_id < min_wal()`` (those entries
        are gone) and ``StorageError`` for ``start_id < 1`` or
        ``max_count < 0``.
        """

    # --- extensions needed by the engine (epoch history, lifecycle) --------

    def write_wal_data(self, first_id: int, datas: list[bytes], payload: bytes | None = None
                       ) -> None:
        """Like :meth:`write_wal` for entries ``first_id, first_id+1, ...``
        given by their data only (same checks, same atomicity).  The engine
        uses it on the commit path; implementations may override it to skip
        building WALEntry objects.  ``payload``, when given, is ``datas``
        msgpack-packed (the engine has it from the wire, or packed it once
        for the wire and the log): a log that stores that encoding may
        write it as it is."""
        self.write_wal([WALEntry(first_id + i, d) for i, d in enumerate(datas)])

    def read_wal_data(self, start_id: int, max_count: int) -> list[bytes]:
        """Like :meth:`read_wal` but only the entries' data (ids follow from
        ``start_id``).  Streaming uses it; implementations may override it
        to skip building WALEntry objects."""
        return [e.data for e in self.read_wal(start_id, max_count)]

    @abc.abstractmethod
    def epoch_history(self) -> list[tuple[int, int]]:
        """The (leader_id, first WAL id of that leadership) list, oldest
        first.  Compared at ``connect`` to find where two WALs diverge."""

    @abc.abstractmethod
    def set_epoch_history(self, history: list[tuple[int, int]]) -> None:
        """Replace the epoch history (durable on return).  leader_ids must be
        strictly increasing and first WAL ids non-decreasing."""

    def close(self) -> None:
        """Flush and release resources.  Idempotent."""

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Follower(abc.ABC):
    """The seed's handle on a follower, as remote control calls
    (``zrepl.RemoteFollower``): what an operator's tool or a test uses to
    drive a node as its upstream would, one call at a time.  The engine
    itself speaks the same operations to its follower - ``connect`` and
    ``clear_state`` as control calls, ``apply_wal`` and ``apply_state`` as
    pipelined messages on the data path (many in flight, acknowledged on
    the ack path) - decided by ``zrepl.core.node.NodeCore`` and carried out
    by ``zrepl.engine.downstream``.

    Every call carrying a ``leader_id`` smaller than the one the follower
    stores raises ``StaleLeader`` and changes nothing.  Transport failures
    raise ``Timeout`` or ``ProtocolError``.
    """

    @abc.abstractmethod
    def connect(self, leader_id: int, address: str) -> None:
        """Start following ``address`` under epoch ``leader_id``."""

    @abc.abstractmethod
    def max_applied_wal(self) -> int:
        """The follower's last applied WAL id (0 if none)."""

    @abc.abstractmethod
    def clear_state(self, leader_id: int) -> None:
        """Clear the follower's App state and WAL before a full state sync."""

    @abc.abstractmethod
    def apply_state(self, leader_id: int, entries: list[WALEntry]) -> None:
        """Apply one batch of snapshot commands (from ``iter_state``)."""

    @abc.abstractmethod
    def apply_wal(self, leader_id: int, entries: list[WALEntry]) -> list[int]:
        """Log and apply a batch of WAL entries; return their response
        codes, to be compared with the leader's."""


class Node(abc.ABC):
    """A node as the supervisor sees it: a remote call."""

    @abc.abstractmethod
    def status(self) -> NodeStatus: ...

    @abc.abstractmethod
    def set_role(self, role: NodeRole, leader_id: int) -> None:
        """Change role under epoch ``leader_id`` (persisted before acting).
        A smaller ``leader_id`` than the stored one raises ``StaleLeader``."""

    @abc.abstractmethod
    def set_leader(self, address: str) -> None:
        """Follow ``address``; "" means no leader."""

    @abc.abstractmethod
    def set_follower(self, address: str) -> None:
        """Stream to ``address``; "" means no follower."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the node process cleanly."""
