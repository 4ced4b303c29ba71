"""The App and the WAL of one node, and the lock that owns them.

Whoever holds the App lock may write the WAL and call the App; the App is
never called by two threads at once (but not always by the same thread:
callers that commit a batch apply it themselves).  A snapshot forks while
holding it, so the child sees the state between two applies.
"""

from __future__ import annotations

import hashlib
import threading
from functools import partial
from typing import Any, Callable

from ..core.errors import ProtocolError, StorageError
from ..core.interfaces import App, Storage
from ..core.protocol import codes_to_bytes
from ..core.types import WALEntry
from ..core.session import unwrap
from ..storage.shared import shared_store_of


class LoggedDespiteError(StorageError):
    """A WAL write reported failure but the log holds the batch (an fsync
    that failed after the write): it was applied, and ``codes`` and
    ``sessions`` are what applying it gave."""

    def __init__(self, message: str, codes: list[int], sessions: list[tuple[int, bytes, int]]):
        super().__init__(message)
        self.codes = codes
        self.sessions = sessions


class Applier:
    """Writes and applies batches (App lock held by the caller)."""

    def __init__(self, app: App, storage: Storage):
        self.app = app
        self.storage = storage
        self.lock = threading.Lock()
        # the App's batch codecs, or the defaults over encode_cmd/decode_cmd
        # (an App need not subclass zrepl.App)
        self.encode_cmds = getattr(app, "encode_cmds", None) or partial(App.encode_cmds, app)
        self.decode_cmds = getattr(app, "decode_cmds", None) or partial(App.decode_cmds, app)
        # an App keeping its state in a SharedStore: each batch is one write
        # transaction recording its last WAL id (docs/shared.md)
        self.store = shared_store_of(app)

    def apply(self, cmds: list, last: int | None) -> list[int]:
        """``App.apply(cmds)``; ``last``: the WAL id of the last command
        (None for state entries)."""
        store = self.store
        if store is None:
            return self.app.apply(cmds)
        if last is not None and store.held and not self.rebuilding:
            store.publish(last - len(cmds))  # the cleared state is complete: a live batch follows
        try:
            return store.run_batch(partial(self.app.apply, cmds), last)
        except StorageError as exc:
            if store.broken:
                self.on_broken(exc)
            raise

    def begin_group(self) -> None:
        """The batches applied until :meth:`end_group` share one store
        transaction (``SharedStore.begin_group``).  App lock held, and
        ended before it is released."""
        if self.store is not None:
            self.store.begin_group()

    def end_group(self) -> None:
        """Commit the group.  A store that cannot take it is broken (the
        node stops; its WAL holds every batch), so this never raises."""
        store = self.store
        if store is None:
            return
        try:
            store.end_group()
        except Exception as exc:  # noqa: BLE001 - the store is broken: the node stops
            if not store.broken:
                store.broken = f"shared store: {exc}"
            self.on_broken(exc)

    # the shared store could not be written (disk full, I/O error): the
    # Replica stops (its WAL holds every entry; a restart rebuilds the store)
    on_broken: Callable[[BaseException], None] = staticmethod(lambda exc: None)

    rebuilding = False  # a restart's restore is running: publish at its end only

    def begin_rebuild(self) -> None:
        """The App's state is about to be rebuilt (restore, state sync):
        readers of a shared store keep the state they have until
        :meth:`publish`."""
        if self.store is not None:
            self.store.hold()
        self.app.clear_state()

    def publish(self, wal_id: int) -> None:
        """The rebuilt state is complete at ``wal_id``."""
        if self.store is not None:
            self.store.publish(wal_id)

    def apply_state(self, datas: list[bytes], pairs: bool = False) -> None:
        """App commands of a checkpoint or a state sync (the App's
        encodings, not WAL envelopes; their codes mean nothing) - or, with
        ``pairs``, a shared store's keys and values, written as they are."""
        store = self.store
        if pairs:
            if store is None:
                raise ProtocolError("this state is a shared store's key/value pairs, and this "
                                    "App keeps no zrepl.SharedStore (the same App on every node?)")
            store.run_batch(lambda: store.put_pairs(datas), None)
            return
        self.apply(self.decode_cmds(datas, 1), None)

    def apply_app_datas(self, first: int, app_datas: list[bytes]) -> list[int]:
        """Decode and apply unwrapped WAL entries ``first..``."""
        codes = self.apply(self.decode_cmds(app_datas, first), first + len(app_datas) - 1)
        if len(codes) != len(app_datas):
            raise ValueError(f"App.apply returned {len(codes)} codes for {len(app_datas)} "
                             "commands")
        return codes

    def log_and_apply(self, first: int, datas: list[bytes], payload: bytes | None = None
                      ) -> tuple[list[int], bytes, list[tuple[int, bytes, int]]]:
        """A batch from the upstream: checked, logged, applied.  Returns the
        codes, as bytes, and the client sessions the batch carries.
        ``payload``: ``datas`` as the wire packed them (written as it is)."""
        try:
            app_datas, sessions = unwrap(datas)  # checked before anything is written
        except (ValueError, TypeError) as exc:
            raise ProtocolError(str(exc)) from None
        try:
            self.storage.write_wal_data(first, datas, payload)
        except StorageError as exc:
            self.follow_the_log(exc, first, len(datas),
                                lambda: self.apply_app_datas(first, app_datas), sessions)
            raise
        codes = self.apply_app_datas(first, app_datas)
        self.storage.set_max_applied_wal(first + len(datas) - 1)
        return codes, codes_to_bytes(codes), sessions

    def follow_the_log(self, exc: StorageError, first: int, n: int,
                       apply: Callable[[], list[int]],
                       sessions: list[tuple[int, bytes, int]]) -> None:
        """A WAL write of ``n`` entries from ``first`` failed: if the log
        holds them all the same (written, then the fsync failed), ``apply()``
        them, so that the App equals the log as a restart would make it,
        and raise :class:`LoggedDespiteError`; otherwise return (nothing
        changed)."""
        last = first + n - 1
        if self.storage.max_wal() < last:
            return
        codes = apply()
        self.storage.set_max_applied_wal(last)
        raise LoggedDespiteError(f"{exc} (WAL {first}..{last} is in the log all the same: "
                                 "applied)", codes, sessions) from exc

    def clear(self) -> None:
        self.begin_rebuild()
        self.storage.clear_wal()
        self.storage.set_max_applied_wal(0)


def state_digest(app: App) -> dict[str, Any]:
    """An order-independent digest of an App's state: its entries (the
    App's own encoding of ``iter_state``), sorted, hashed.  Caller holds
    the App lock."""
    datas = sorted(app.encode_cmd(c, WALEntry(0)).data for c in app.iter_state())
    h = hashlib.sha256()
    for d in datas:
        h.update(len(d).to_bytes(8, "little"))
        h.update(d)
    return {"entries": len(datas), "sha256": h.hexdigest()}
