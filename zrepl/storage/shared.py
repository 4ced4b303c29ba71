"""Shared state: an LMDB environment written by the node, read by any
process on the host (``docs/shared.md``).

Layout of a shared directory (``DIR/shared`` by default)::

    LOCK        flock held by the one writer (the node)
    CURRENT     the name of the published generation, replaced atomically
    g000007/    one generation: an LMDB environment (data.mdb, lock.mdb)

Each generation holds two LMDB databases: ``state`` (the App's keys and
values) and ``zrepl`` (the WAL id the state reflects, and whether the
generation was superseded).  Every applied batch is one write transaction
that also records its last WAL id, so every read snapshot knows exactly
which WAL id it reflects.

The store is *derived* state.  What is durable is the WAL and the
checkpoints; the store is rebuilt from them at every start into a new
generation, and a state sync arriving on a follower is built into a new
generation too.  Readers keep reading the published generation until the
new one is complete (``publish``): they never see a half-built state.  A
superseded generation is marked so in its own ``zrepl`` database before it
is removed, so a reader still holding it open moves to the new one at its
next read.  So LMDB runs without fsync (``sync=False``): a power loss can
cost nothing that the WAL does not hold.

A ``SharedStore`` that nobody opened on a directory keeps its state in
memory (a dict with the same interface): Apps used on their own, and the
deterministic simulation, which runs whole clusters in one process.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import lmdb

get_ident = threading.get_ident

from ..core.errors import StorageError, StorageLocked, Timeout
from .fsutil import FILE_MODE, atomic_write, create, make_dir

MAX_KEY_BYTES = 511
"""LMDB's key limit (its compiled default, ``Environment.max_key_size()``)."""

MAX_VALUE_BYTES = 16 * 1024 * 1024
"""Largest value ``put`` accepts by default.  LMDB itself allows values up
to the map size; one bound keeps a runaway value from filling it."""

DEFAULT_MAP_BYTES = 1 << 30
"""The initial LMDB map (address space, not memory or disk: the file grows
as pages are used).  The writer doubles it when a batch fills it."""

_POS = b"pos"
_POS_FMT = struct.Struct("<QB")  # wal_id, superseded
_GEN = "g%06d"

# LMDB allows one Environment per file per process: the writer's and the
# readers' in one process (an embedded node with a LocalReader, two
# LocalReaders) share it, and the last to close it closes it.
_ENVS: dict[str, "_Gen"] = {}
_ENVS_LOCK = threading.Lock()


class _Gen:
    """One generation: an LMDB environment and its two databases."""

    def __init__(self, path: Path, env: lmdb.Environment, writer: bool):
        self.path = path
        self.env = env
        self.writer = writer
        self.state = env.open_db(b"state", create=writer)
        self.meta = env.open_db(b"zrepl", create=writer)
        self.refs = 1  # openers in this process

    @classmethod
    def open(cls, path: Path, writer: bool, map_size: int = DEFAULT_MAP_BYTES) -> "_Gen":
        key = str(path)
        with _ENVS_LOCK:
            gen = _ENVS.get(key)
            if gen is not None:
                gen.refs += 1
                return gen
            if writer:
                make_dir(path)
                env = lmdb.open(key, map_size=map_size, max_dbs=2, sync=False, metasync=False,
                                readahead=False, max_readers=1024, subdir=True, create=True,
                                mode=FILE_MODE)
                env.reader_check()  # slots of readers that died
            else:
                env = lmdb.open(key, readonly=True, max_dbs=2, lock=True, readahead=False,
                                max_readers=1024, subdir=True, create=False)
            try:
                gen = cls(path, env, writer)
            except BaseException:
                env.close()
                raise
            _ENVS[key] = gen
            return gen

    def close(self) -> None:
        with _ENVS_LOCK:
            self.refs -= 1
            if self.refs > 0:
                return
            if _ENVS.get(str(self.path)) is self:
                del _ENVS[str(self.path)]
        self.env.close()

    def position(self, txn: lmdb.Transaction) -> tuple[int, bool]:
        raw = txn.get(_POS, db=self.meta)
        if raw is None:
            return 0, False
        wal_id, superseded = _POS_FMT.unpack(raw)
        return wal_id, bool(superseded)


def _gen_number(name: str) -> int:
    if len(name) == 7 and name[0] == "g" and name[1:].isdigit():
        return int(name[1:])
    return -1


def read_current(root: Path) -> str:
    try:
        return (root / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return ""


def check_kv(key: Any, value: Any, max_value: int = MAX_VALUE_BYTES) -> None:
    """ValueError unless ``key``/``value`` fit the store (bytes, a key of 1
    to 511 bytes, a value of at most ``max_value`` bytes)."""
    if type(key) is not bytes or type(value) is not bytes:
        raise ValueError(f"shared store keys and values are bytes; got "
                         f"{type(key).__name__}, {type(value).__name__}")
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"shared store keys are 1..{MAX_KEY_BYTES} bytes; got {len(key)}")
    if len(value) > max_value:
        raise ValueError(f"shared store value of {len(value)} bytes is over the limit of "
                         f"{max_value}")


class SharedStore:
    """An App's state in shared memory: one writer (the node's App, inside
    ``apply``), many readers (``open_reader``, reader processes).

    The App calls :meth:`get`, :meth:`put`, :meth:`delete`, :meth:`scan`
    from ``apply``/``query``, :meth:`clear` from ``clear_state`` and
    iterates :meth:`items` (one read snapshot, taken when called) in
    ``iter_state``; it keeps *all* its state here (a batch whose write
    fails is retried from the start).  The engine opens the store in the
    node's data directory (``Config.shared_dir``) before it restores the
    App, and wraps every applied batch in one write transaction
    (:meth:`run_batch`).  Unopened, the store keeps its state in memory.
    """

    def __init__(self, max_value_bytes: int = MAX_VALUE_BYTES):
        self.max_value_bytes = max_value_bytes
        self.root: Path | None = None
        self._mem: dict[bytes, bytes] | None = None
        self._gen: _Gen | None = None  # the generation being written
        self._published: _Gen | None = None  # what readers see (None: pending is new)
        self._lock_fd = -1
        self._txn: lmdb.Transaction | None = None
        self._txn_thread = 0
        # batches applied in the open transaction: (fn, wal_id, result);
        # None outside a group (see begin_group)
        self._group: list[tuple[Callable[[], Any], int | None, Any]] | None = None
        self.held = False  # a rebuild is under way (hold() .. publish()): readers wait
        self._wal_id = 0  # of the last committed batch that carried one
        self._snapshots = 0  # open read snapshots (the map cannot grow under them)
        self._snapshots_lock = threading.Lock()  # they end on other threads
        self.map_size = DEFAULT_MAP_BYTES
        self.broken = ""  # why a batch could not be written (then no later one is)
        self._rtxn: lmdb.Transaction | None = None  # a reader's snapshot (serve_from)
        self._rdb: Any = None

    @staticmethod
    def open_reader(data_dir: str | os.PathLike, wait_timeout: float = 1.0) -> "SharedReader":
        """A reader of the shared state of the node whose data directory is
        ``data_dir``, for any process on the host (no message to the node)."""
        return SharedReader.for_data_dir(data_dir, wait_timeout=wait_timeout)

    # --- opening and closing -------------------------------------------------------

    @property
    def opened(self) -> bool:
        return self._mem is not None or self._gen is not None

    def open(self, root: str | os.PathLike, map_size: int = DEFAULT_MAP_BYTES) -> "SharedStore":
        """Open (creating it) the shared directory ``root`` as its one
        writer: the published generation, or a new empty one."""
        if self.opened:
            raise StorageError("shared store already open")
        root = Path(root)
        make_dir(root)
        fd = create(root / "LOCK", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageLocked(f"shared store {root} is written by another process") from None
        self._lock_fd, self.root, self.map_size = fd, root, map_size
        try:
            current = read_current(root)
            gen = None
            if current and (root / current).is_dir():
                try:
                    gen = _Gen.open(root / current, True, map_size)
                except lmdb.Error:
                    gen = None  # unreadable (a power loss under sync=False): start anew
            if gen is None:
                gen = self._new_gen()
                self._gen = gen
                self._publish(0)
            else:
                self._gen = self._published = gen
                with gen.env.begin() as txn:
                    self._wal_id = gen.position(txn)[0]
            self._remove_others()
        except BaseException:
            self.close()
            raise
        return self

    def open_memory(self) -> "SharedStore":
        if self.opened:
            raise StorageError("shared store already open")
        self._mem = {}
        return self

    def _need(self) -> None:
        if not self.opened:
            self.open_memory()

    def close(self) -> None:
        """Release the environment and the writer's lock (the published
        generation stays for readers and the next writer).  Idempotent."""
        try:
            self.end_group()  # (the engine ends its groups itself; this is a safety net)
        except (StorageError, lmdb.Error):
            pass
        self._group = None
        self._abort()
        for gen in {id(g): g for g in (self._gen, self._published) if g is not None}.values():
            gen.close()
        self._gen = self._published = None
        self._mem = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # --- generations -------------------------------------------------------------

    def _new_gen(self) -> _Gen:
        assert self.root is not None
        numbers = [_gen_number(p.name) for p in self.root.iterdir()]
        path = self.root / (_GEN % (max([0, *numbers]) + 1))
        return _Gen.open(path, True, self.map_size)

    def hold(self) -> None:
        """The state is about to be rebuilt (a restart's restore, a state
        sync): the next :meth:`clear` starts a new generation that readers
        see only once :meth:`publish` is called."""
        self.held = True

    def publish(self, wal_id: int) -> None:
        """The state being built is complete at ``wal_id``: readers move to
        it; the generation they read before is marked superseded and
        removed."""
        self.end_group()
        self.held = False
        if self._gen is None:
            self._wal_id = wal_id
            return
        if self._gen is not self._published:
            self._publish(wal_id)
        elif wal_id != self._wal_id:
            with self._gen.env.begin(write=True) as txn:
                txn.put(_POS, _POS_FMT.pack(wal_id, 0), db=self._gen.meta)
            self._wal_id = wal_id

    def _publish(self, wal_id: int) -> None:
        gen, old = self._gen, self._published
        assert gen is not None and self.root is not None
        with gen.env.begin(write=True) as txn:
            txn.put(_POS, _POS_FMT.pack(wal_id, 0), db=gen.meta)
        gen.env.sync(True)  # the new generation is on disk before CURRENT names it
        atomic_write(self.root / "CURRENT", (gen.path.name + "\n").encode())
        self._published = gen
        self._wal_id = wal_id
        if old is not None and old is not gen:
            self._retire(old)

    @staticmethod
    def _retire(gen: _Gen) -> None:
        """Tell readers still holding ``gen`` to move on, then remove it."""
        try:
            with gen.env.begin(write=True) as txn:
                wal_id = gen.position(txn)[0]
                txn.put(_POS, _POS_FMT.pack(wal_id, 1), db=gen.meta)
        except lmdb.Error:
            pass
        gen.close()
        shutil.rmtree(gen.path, ignore_errors=True)

    def _remove_others(self) -> None:
        """Generations left by an earlier writer (a rebuild it never
        published, or one superseded before it could remove it)."""
        assert self.root is not None
        keep = {g.path.name for g in (self._gen, self._published) if g is not None}
        for p in self.root.iterdir():
            if _gen_number(p.name) < 0 or p.name in keep:
                continue
            try:
                self._retire(_Gen.open(p, True, self.map_size))
            except lmdb.Error:
                shutil.rmtree(p, ignore_errors=True)

    # --- the writer's batches ------------------------------------------------------

    @property
    def wal_id(self) -> int:
        """The WAL id of the last batch written (of the generation being
        written)."""
        return self._wal_id

    def run_batch(self, fn: Callable[[], Any], wal_id: int | None) -> Any:
        """``fn()`` (the App's ``apply``) inside one write transaction that
        also records ``wal_id`` (None: a state sync or checkpoint batch,
        which has none).  A full map is grown and ``fn`` run again; any
        other failure aborts the transaction (the store is unchanged) and
        raises.  Between :meth:`begin_group` and :meth:`end_group` the
        transaction stays open for the next batch instead."""
        if self.broken:
            raise StorageError(f"{self.broken} (no batch is applied after a failed one; a "
                               "restart rebuilds the store from the WAL)")
        gen = self._gen
        if gen is None:
            self._need()
            result = fn()
            if wal_id is not None:
                self._wal_id = wal_id
            return result
        group = self._group
        if group is None:
            return self._apply_all([(fn, wal_id)])[0]
        if self._txn is None:
            self._txn = gen.env.begin(write=True)
            self._txn_thread = get_ident()
        try:
            result = fn()
        except BaseException:
            # The batches before this one were answered already: they are
            # committed on their own, then this one runs as run_batch would
            # alone (a full map grown, anything else raised).
            self._abort()
            self._group = []
            if group:
                self._apply_all([(f, w) for f, w, _ in group], [r for _, _, r in group])
            return self._apply_all([(fn, wal_id)])[0]
        group.append((fn, wal_id, result))
        return result

    def begin_group(self) -> None:
        """Batches applied from now until :meth:`end_group` share one write
        transaction, committed by ``end_group`` (readers see none of them
        until then, and then all).  The engine groups the batches it
        applies in one turn under the App lock, and ends the group before
        it lets go of the lock: no reader, snapshot or other writer can tell
        the batches were not committed one by one.  The WAL holds them
        before they are acknowledged, so a crash inside a group loses
        nothing a restart does not rebuild."""
        if self._group is None:
            self._group = []

    def end_group(self) -> None:
        """Commit the group's transaction (a full map: the group is grown
        and redone, and each batch must give what it gave the first time)."""
        group, self._group = self._group, None
        if not group:
            return
        txn = self._txn  # open since the group's first batch
        assert txn is not None
        wal_id = None
        for _, w, _ in group:
            if w is not None:
                wal_id = w
        try:
            if wal_id is not None:
                txn.put(_POS, _POS_FMT.pack(wal_id, 0), db=self._gen.meta)  # type: ignore
            txn.commit()
        except lmdb.Error:
            self._abort()
            self._apply_all([(f, w) for f, w, _ in group], [r for _, _, r in group])
            return
        self._txn = None
        if wal_id is not None:
            self._wal_id = wal_id

    def _apply_all(self, batches: list[tuple[Callable[[], Any], int | None]],
                   expect: list[Any] | None = None) -> list[Any]:
        """Run every batch in one write transaction that records the last
        WAL id among them, and commit it; their results.  ``expect``: what
        they gave before (a group redone) - different results are a
        non-deterministic App, and the store is broken."""
        wal_id = None
        for _, w in batches:
            if w is not None:
                wal_id = w
        while True:
            gen = self._gen
            assert gen is not None
            self._txn = gen.env.begin(write=True)
            self._txn_thread = get_ident()
            try:
                results = [fn() for fn, _ in batches] if len(batches) > 1 else [batches[0][0]()]
                if wal_id is not None:
                    self._txn.put(_POS, _POS_FMT.pack(wal_id, 0), db=gen.meta)
                self._txn.commit()
            except lmdb.MapFullError:
                self._abort()
                self._grow()
                continue
            except lmdb.BadValsizeError as exc:  # a bad pair from a peer: refused, not broken
                self._abort()
                raise ValueError(f"shared store: {exc}") from None
            except lmdb.Error as exc:
                self._abort()
                # (disk full, I/O error): the store is as the last batch left
                # it, and stays so - no later batch may be applied on a hole
                self.broken = f"shared store {gen.path}: {exc}"
                raise StorageError(self.broken) from exc
            except BaseException:
                self._abort()
                raise
            self._txn = None
            if wal_id is not None:
                self._wal_id = wal_id
            if expect is not None and results != expect:
                self.broken = (f"shared store {gen.path}: the App answered a batch differently "
                               "when it was applied again (it is not deterministic)")
                raise StorageError(self.broken)
            return results

    def _abort(self) -> None:
        txn, self._txn = self._txn, None
        if txn is not None:
            txn.abort()

    def _grow(self) -> None:
        gen = self._gen
        assert gen is not None
        with self._snapshots_lock:
            busy = self._snapshots
        if busy:
            raise StorageError(
                f"shared store {gen.path} is full at {self.map_size} bytes and cannot grow while "
                "a snapshot is being read; set shared_map_bytes higher")
        self.map_size *= 2
        gen.env.set_mapsize(self.map_size)

    def serve_from(self, txn: lmdb.Transaction, db: Any, fn: Callable[..., Any], *args: Any
                   ) -> Any:
        """``fn(*args)`` (the App's ``query``) with :meth:`get` and
        :meth:`scan` reading ``txn`` - a reader process's snapshot (its App
        never opens the store itself)."""
        self._rtxn, self._rdb = txn, db
        try:
            return fn(*args)
        finally:
            self._rtxn = self._rdb = None

    # --- what the App calls ----------------------------------------------------------

    def _batch_txn(self) -> lmdb.Transaction | None:
        """The write transaction of the batch this thread is applying."""
        txn = self._txn
        return txn if txn is not None and self._txn_thread == get_ident() else None

    def _write_txn(self) -> lmdb.Transaction:
        txn = self._batch_txn()
        if txn is None:
            raise StorageError("SharedStore.put/delete/clear are for App.apply and "
                               "App.clear_state, inside the engine's write transaction")
        return txn

    def get(self, key: bytes, default: Any = None) -> Any:
        """The value of ``key`` (inside a batch: as this batch left it)."""
        if self._rtxn is not None:
            value = self._rtxn.get(key, db=self._rdb)
            return default if value is None else value
        if self._gen is None:
            self._need()
            return self._mem.get(key, default)  # type: ignore[union-attr]
        txn = self._txn
        if txn is not None and self._txn_thread == get_ident():
            value = txn.get(key, db=self._gen.state)
        else:
            gen = self._gen
            assert gen is not None
            with gen.env.begin(db=gen.state) as rtxn:
                value = rtxn.get(key)
        return default if value is None else value

    def put(self, key: bytes, value: bytes) -> None:
        if type(key) is not bytes or type(value) is not bytes or \
                not 0 < len(key) <= MAX_KEY_BYTES or len(value) > self.max_value_bytes:
            check_kv(key, value, self.max_value_bytes)  # (raises, saying which)
        gen = self._gen
        if gen is None:
            self._need()
            self._mem[key] = value  # type: ignore[index]
            return
        txn = self._txn
        if txn is None or self._txn_thread != get_ident():
            txn = self._write_txn()  # (raises)
        txn.put(key, value, db=gen.state)

    def put_many(self, keys: list[bytes], values: list[bytes]) -> None:
        """``put(keys[i], values[i])`` for every i, in order (a later
        duplicate wins), in one C-level pass: the same limits as
        :meth:`put`, checked over the whole lists at once (items may be
        any bytes-like object)."""
        if len(keys) != len(values):
            raise ValueError(f"put_many takes as many keys as values; got {len(keys)} and "
                             f"{len(values)}")
        if not keys:
            return
        try:  # (bytes.join: every item bytes-like, in C)
            ok = b"".join(keys) is not None and b"".join(values) is not None and \
                min(map(len, keys)) > 0 and max(map(len, keys)) <= MAX_KEY_BYTES and \
                max(map(len, values)) <= self.max_value_bytes
        except TypeError:
            ok = False
        if not ok:
            for key, value in zip(keys, values):
                check_kv(key, value, self.max_value_bytes)  # (raises, saying which)
        gen = self._gen
        if gen is None:
            self._need()
            self._mem.update(zip(keys, values))  # type: ignore[union-attr]
            return
        txn = self._txn
        if txn is None or self._txn_thread != get_ident():
            txn = self._write_txn()  # (raises)
        with txn.cursor(db=gen.state) as cur:
            cur.putmulti(zip(keys, values))

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; whether it was there."""
        if self._gen is None:
            self._need()
            return self._mem.pop(key, None) is not None  # type: ignore[union-attr]
        return self._write_txn().delete(key, db=self._gen.state)  # type: ignore[union-attr]

    def scan(self, prefix: bytes = b"", limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (key, value) pairs whose key starts with
        ``prefix``, in key order, from one snapshot."""
        if self._rtxn is not None:
            return scan_txn(self._rtxn, self._rdb, prefix, limit)
        self._need()
        if self._mem is not None:
            keys = sorted(k for k in self._mem if k.startswith(prefix))
            return [(k, self._mem[k]) for k in keys[:limit]]
        gen = self._gen
        assert gen is not None
        txn = self._batch_txn()
        if txn is not None:
            return scan_txn(txn, gen.state, prefix, limit)
        with gen.env.begin(db=gen.state) as rtxn:
            return scan_txn(rtxn, gen.state, prefix, limit)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) in key order, from one read snapshot taken
        *now* (not at the first ``next``): the engine calls it with the App
        lock held and reads it while later batches are applied."""
        self.end_group()
        self._need()
        if self._mem is not None:
            return iter(sorted(self._mem.items()))
        gen = self._gen
        assert gen is not None
        txn = gen.env.begin(db=gen.state)
        with self._snapshots_lock:
            self._snapshots += 1
        return _Snapshot(txn, self._snapshot_done)

    def raw_datas(self) -> Iterator[bytes]:
        """The whole store as ``key, value, key, value, ...`` from one read
        snapshot taken now: what a state sync or checkpoint of a
        store-backed App carries (no App encoding on either side; the
        receiver writes the pairs with :meth:`put_pairs`)."""
        return itertools.chain.from_iterable(self.items())

    def put_pairs(self, datas: list[bytes]) -> None:
        """Write ``key, value, ...`` as they are (a state sync's batch,
        inside :meth:`run_batch`)."""
        if len(datas) % 2:
            raise ValueError(f"a shared store's state batch holds key/value pairs; got "
                             f"{len(datas)} items")
        it = iter(datas)
        if self._gen is None:
            self._need()
            self._mem.update(zip(it, it))  # type: ignore[union-attr]
            return
        with self._write_txn().cursor(db=self._gen.state) as cur:
            cur.putmulti(zip(it, it))  # (a key out of LMDB's bounds: BadValsizeError)

    def _snapshot_done(self) -> None:
        with self._snapshots_lock:
            self._snapshots -= 1

    def clear(self) -> None:
        """Drop every key.  During a rebuild (:meth:`hold`) this starts the
        new generation instead, and readers keep the old one until
        :meth:`publish`."""
        self._need()
        if self._mem is not None:
            self._mem.clear()
            return
        if self.held:
            self.end_group()
            self._abort()
            if self._gen is not self._published and self._gen is not None:
                self._retire(self._gen)  # an earlier rebuild that never completed
            self._gen = self._new_gen()
            self._wal_id = 0
            return
        txn = self._batch_txn()
        if txn is not None:
            txn.drop(self._gen.state, delete=False)  # type: ignore[union-attr]
            return
        gen = self._gen
        assert gen is not None
        with gen.env.begin(write=True) as wtxn:
            wtxn.drop(gen.state, delete=False)
            wtxn.put(_POS, _POS_FMT.pack(0, 0), db=gen.meta)
        self._wal_id = 0


class _Snapshot:
    """(key, value) pairs of one read transaction; the transaction ends
    when they run out, on close(), or when the object is dropped."""

    def __init__(self, txn: lmdb.Transaction, done: Callable[[], None]):
        self._txn: lmdb.Transaction | None = txn
        self._cursor = txn.cursor()
        self._it = self._cursor.iternext(keys=True, values=True)
        self._done = done

    def __iter__(self) -> "_Snapshot":
        return self

    def __next__(self) -> tuple[bytes, bytes]:
        if self._txn is None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self.close()
            raise

    def close(self) -> None:
        txn, self._txn = self._txn, None
        if txn is not None:
            self._cursor.close()
            txn.abort()
            self._done()

    def __del__(self) -> None:
        self.close()


def scan_txn(txn: lmdb.Transaction, db: Any, prefix: bytes, limit: int | None
             ) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if limit is not None and limit <= 0:
        return out
    with txn.cursor(db=db) as cur:
        if not cur.set_range(prefix):
            return out
        for key, value in cur.iternext(keys=True, values=True):
            if not key.startswith(prefix):
                break
            out.append((key, value))
            if limit is not None and len(out) >= limit:
                break
    return out


class SharedReader:
    """Reads a shared directory from any process on the host, in-process,
    with no message to the node: every read is one LMDB read transaction
    and knows the WAL id it reflects.  The WAL id a reader returns never
    goes backwards while the node keeps its history (a node whose
    unacknowledged tail is discarded by a state sync is the exception)."""

    def __init__(self, root: str | os.PathLike, wait_timeout: float = 1.0):
        self.root = Path(root)
        self.wait_timeout = wait_timeout
        self._gen: _Gen | None = None
        self.wal_id = 0  # of the last read

    @classmethod
    def for_data_dir(cls, data_dir: str | os.PathLike, **kw: Any) -> "SharedReader":
        """The reader of a node's data directory (its ``shared`` directory,
        or the one its ``shared.path`` file names when ``shared_dir`` is
        set)."""
        return cls(shared_root(data_dir), **kw)

    def _open(self) -> _Gen:
        for _ in range(50):
            current = read_current(self.root)
            if not current:
                raise StorageError(f"no shared state in {self.root} (is a node with a "
                                   "store-backed App running there?)")
            try:
                self._gen = _Gen.open(self.root / current, False)
                return self._gen
            except lmdb.Error:
                if read_current(self.root) == current:
                    raise StorageError(f"cannot open shared state {self.root / current}") \
                        from None
                # replaced while we opened it: read CURRENT again
        raise StorageError(f"shared state in {self.root} keeps changing under the reader")

    def close(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()

    def __enter__(self) -> "SharedReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def read_at(self, fn: Callable[[lmdb.Transaction, Any, int], Any]) -> Any:
        """``fn(txn, db, wal_id)`` in one read snapshot of the published
        state (no waiting); ``wal_id`` is set before ``fn`` runs.  Errors
        of ``fn`` are its own: only opening the snapshot is retried (a
        generation closed or superseded under the reader)."""
        while True:
            gen = self._gen or self._open()
            try:
                txn = gen.env.begin()
            except lmdb.MapResizedError:
                gen.env.set_mapsize(0)  # the writer grew the map: adopt its size
                continue
            except lmdb.Error:
                txn = None  # closed under us (the writer in this process retired it)
            if txn is not None:
                with txn:
                    wal_id, superseded = gen.position(txn)
                    if not superseded:
                        self.wal_id = wal_id
                        return fn(txn, gen.state, wal_id)
            if self._gen is gen:
                self.close()

    def read(self, fn: Callable[[lmdb.Transaction, Any], Any], min_wal_id: int = 0,
             timeout: float | None = None) -> tuple[Any, int]:
        """``fn(txn, db)`` in one read snapshot; (its result, the WAL id the
        snapshot reflects).  With ``min_wal_id``: waits until the store has
        applied it (at most ``timeout``, default ``wait_timeout``; then
        ``zrepl.Timeout``)."""
        wait = self.wait_timeout if timeout is None else timeout
        deadline = 0.0
        pause = 0.0002
        behind = (False, None, 0)
        while True:
            done, result, wal_id = self.read_at(
                lambda txn, db, w: (True, fn(txn, db), w) if w >= min_wal_id else behind)
            if done:
                return result, wal_id
            # behind min_wal_id: wait for the writer (LMDB has no change
            # notification; a short backoff bounded by the deadline)
            now = time.monotonic()
            if not deadline:
                deadline = now + wait
            elif now >= deadline:
                raise Timeout(f"shared state is at WAL id {self.wal_id}, not yet {min_wal_id} "
                              f"(waited {wait:g}s)")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def get(self, key: bytes, min_wal_id: int = 0) -> tuple[bytes | None, int]:
        """(value or None, WAL id).  A key LMDB could never hold is absent."""
        if not 0 < len(key) <= MAX_KEY_BYTES:
            return self.read(lambda txn, db: None, min_wal_id)
        return self.read(lambda txn, db: txn.get(key, db=db), min_wal_id)

    def scan(self, prefix: bytes = b"", limit: int | None = None, min_wal_id: int = 0
             ) -> tuple[list[tuple[bytes, bytes]], int]:
        """(pairs, WAL id): one snapshot."""
        return self.read(lambda txn, db: scan_txn(txn, db, prefix, limit), min_wal_id)


def shared_root(data_dir: str | os.PathLike) -> Path:
    """Where a node with data in ``data_dir`` keeps its shared state."""
    data = Path(data_dir)
    try:
        return Path((data / "shared.path").read_text().strip())
    except FileNotFoundError:
        return data / "shared"


def shared_store_of(app: Any) -> SharedStore | None:
    """The App's SharedStore, if it keeps its state in one (its ``store``
    attribute)."""
    store = getattr(app, "store", None)
    return store if isinstance(store, SharedStore) else None
