"""The control endpoint: the ``Node`` calls of the supervisor and operators,
the handshake calls of the seed's ``Follower`` interface, and diagnostics.

Every call runs on the engine's thread; a malformed request, an unknown
operation or bad arguments get an error reply and the node keeps serving.

Dependencies (``node``): the Replica's ``Node`` methods and diagnostics,
the core and its lock, the Applier, the checkpointer, the control endpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core import protocol
from ..core.errors import PermissionDenied, ProtocolError, ReplicationError
from ..core.types import NodeRole, WALEntry
from ..storage.snapshot import FileCheckpoints
from .applier import state_digest

if TYPE_CHECKING:
    from .replica import Replica


def check_datas(datas: Any) -> list[bytes]:
    if not isinstance(datas, list) or any(type(d) is not bytes for d in datas):
        raise ProtocolError("entries must be a list of bytes")
    return datas


def _int_args(op: str, minimum: int, **args: Any) -> None:
    """ProtocolError unless every argument is an int >= ``minimum``."""
    for name, v in args.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ProtocolError(f"{op}: {name} must be an int >= {minimum}, got {v!r}")


# On a secured node (CURVE keys, see zrepl.engine.security): the calls each
# role's key may make.  Roles, links, epochs, leases, stop, checkpoints and
# the state itself are the supervisor's and operators'; the handshake and
# the follower's calls are another node's; clients make none.
_ADMIN = frozenset({"status", "set_role", "set_leader", "set_follower", "step_down", "stop",
                    "ping", "max_applied_wal", "dump_state", "state_digest", "checkpoint",
                    "backup_info", "backup_read", "backup_wal"})
ALLOWED = {"supervisor": _ADMIN, "operator": _ADMIN,
           "node": frozenset({"connect", "clear_state", "apply_state", "apply_wal",
                              "max_applied_wal", "ping"}),
           "client": frozenset()}


class ControlServer:
    OPS = ("status", "set_role", "set_leader", "set_follower", "step_down", "stop", "ping",
           "connect", "max_applied_wal", "clear_state", "apply_state", "apply_wal", "dump_state",
           "state_digest", "checkpoint", "backup_info", "backup_read", "backup_wal")

    def __init__(self, node: "Replica"):
        self.node = node
        self._caller: str | None = None  # the key (ROLE:NAME) of the call being served
        # The last time the endpoint was seen empty: every request served
        # after it arrived later.  A lease starts then, not when the engine
        # got round to the request (it may have been busy): the supervisor
        # counts from when it sent the renewal.
        self.empty_at = node.clock.now()
        self._arrived_after = self.empty_at

    def serve(self) -> int:
        """Answer the waiting calls; how many there were."""
        node = self.node
        control = node.endpoints_bound.control
        served = 0
        self._arrived_after = self.empty_at
        limit = node.config.messages_per_turn
        for handle, payload in control.drain(limit):
            served += 1
            stop_after = False
            try:
                op, args = protocol.parse_control_request(payload)
                if op not in self.OPS:
                    raise ProtocolError(f"unknown control operation {op!r}")
                role = getattr(handle, "role", None)
                if role is not None and op not in ALLOWED.get(role, ()):
                    node.core.counters["denied_calls"] += 1
                    raise PermissionDenied(f"a {role} key may not call {op}")
                self._caller = getattr(handle, "user", None)  # (None: unsecured)
                try:
                    result = getattr(self, "op_" + op)(**args)
                except TypeError as exc:
                    raise ProtocolError(f"bad arguments for {op}: {exc}") from None
                reply = protocol.control_ok(result)
                stop_after = op == "stop"
            except ReplicationError as exc:
                reply = protocol.control_err(exc)
            except Exception as exc:  # a bug or a bad value: report, keep serving
                node.log.warning("control call failed: %r", exc)
                reply = protocol.control_err(ReplicationError(f"{type(exc).__name__}: {exc}"))
            control.reply(handle, reply)
            if stop_after:
                node.request_stop()
        node.core.counters["dropped_messages"] += control.dropped
        node.core.counters["denied_calls"] += control.denied
        control.dropped = control.denied = 0
        if served < limit:
            self.empty_at = node.clock.now()
        return served

    # --- the supervisor's Node ---------------------------------------------------------

    def op_status(self, renew_lease_for: Any = 0, lease: Any = 0.0, since: Any = None
                  ) -> dict:
        """Status; the supervisor's poll of the leader also renews its lease
        (``renew_lease_for`` must be this node's epoch and role LEADER).

        The lease runs from ``since``: this node's clock (``extra.clock``) in
        the last status the supervisor had received from it when it sent
        the renewal - a time this node knows came before the sending, however
        long the renewal then took to arrive.  (Without it, from when the
        renewal arrived: safe only while transit stays within the lease
        margin.)"""
        node = self.node
        refused = ""
        if renew_lease_for:
            try:
                node.renew_lease(renew_lease_for, lease, start=self._lease_start(since))
            except ReplicationError as exc:  # report it in the status, do not fail the poll
                refused = str(exc)
        d = node.status().to_dict()
        if refused:
            d["extra"]["lease_refused"] = refused
        return d

    def _lease_start(self, since: Any) -> float:
        if since is None:
            return self._arrived_after
        if isinstance(since, bool) or not isinstance(since, (int, float)) or since != since:
            raise ProtocolError(f"since must be a number (this node's clock), got {since!r}")
        return min(float(since), self._arrived_after)  # never a start in the future

    def op_set_role(self, role: Any, leader_id: Any) -> None:
        self.node.set_role(role, leader_id)

    def op_step_down(self, leader_id: Any, successor: Any) -> None:
        self.node.step_down(leader_id, successor)

    def op_set_leader(self, address: Any) -> None:
        self.node.set_leader(address)

    def op_set_follower(self, address: Any) -> None:
        self.node.set_follower(address)

    def op_stop(self) -> None:
        return None

    def op_ping(self) -> str:
        return "pong"

    # --- the seed's Follower (this node as the follower) -------------------------------

    def op_connect(self, leader_id: Any, address: Any, stream: Any = 0,
                   epoch_history: Any = None, depth: Any = 1, position: Any = None,
                   role: Any = None, head: Any = "") -> dict:
        node = self.node
        with node.applier.lock:
            with node.core_lock:
                info, effects = node.core.on_connect(leader_id, address, stream, epoch_history,
                                                     depth, node.clock.now(), position, role,
                                                     head)
            node.run(effects)
            info["max_wal"] = node.storage.max_wal()
            info["min_wal"] = node.storage.min_wal()
        if self._caller is not None:
            # with keys, only this one may now send data and state
            node.endpoints_bound.data.only_from = self._caller
        return info

    def _from_upstream(self, op: str) -> None:
        """With keys, only the key of the last accepted handshake may change
        the state."""
        upstream = self.node.endpoints_bound.data.only_from
        if self._caller is not None and self._caller != upstream:
            self.node.core.counters["denied_calls"] += 1
            raise PermissionDenied(f"{op} only from this node's upstream (the key of its "
                                   f"handshake), not {self._caller}")

    def op_max_applied_wal(self) -> int:
        return self.node.core.position

    def op_clear_state(self, leader_id: Any, stream: Any = None) -> None:
        self._from_upstream("clear_state")
        node = self.node
        with node.applier.lock:
            with node.core_lock:
                effects = node.core.on_clear_state(leader_id, node.clock.now(), stream)
            node.run(effects)

    def op_apply_state(self, leader_id: Any, datas: Any) -> None:
        node = self.node
        if node.core.role == NodeRole.LEADER:
            # (a leader's state is its log's: only a follower takes a state)
            raise PermissionDenied(f"{node.address} leads: apply_state is refused")
        self._from_upstream("apply_state")
        with node.applier.lock:
            node.core.control_apply_state(leader_id)
            node.applier.apply_state(check_datas(datas))

    def op_apply_wal(self, leader_id: Any, first_id: Any, datas: Any) -> list[int]:
        self._from_upstream("apply_wal")
        node = self.node
        datas = check_datas(datas)
        with node.applier.lock:
            with node.core_lock:
                node.core.control_apply_wal(leader_id, first_id, len(datas))
            codes, _, sessions = node.applier.log_and_apply(first_id, datas)
            with node.core_lock:
                node.core.control_applied(first_id, first_id + len(datas) - 1, codes, sessions)
        node.checkpointer.after_apply(first_id + len(datas) - 1)
        return codes

    # --- diagnostics ------------------------------------------------------------------------

    def op_dump_state(self, limit: Any = 1_000_000) -> list[bytes]:
        """The App's state as encoded commands (in the engine, under the App
        lock: for tests and small states)."""
        node = self.node
        with node.applier.lock:
            app = node.applier.app
            out = []
            for cmd in app.iter_state():
                if len(out) >= limit:
                    break
                out.append(app.encode_cmd(cmd, WALEntry(0)).data)
            return out

    def op_state_digest(self) -> dict:
        """An order-independent digest of the App's state."""
        node = self.node
        with node.applier.lock:
            return {"wal_id": node.core.position, **state_digest(node.applier.app)}

    # --- online backup (zrepl.backup drives these) --------------------------------------

    def op_backup_info(self) -> dict:
        """What a backup needs to know: the App, the epochs, the WAL's range,
        the checkpoints on disk and whether the last one failed."""
        node = self.node
        store = node.checkpointer.store
        if not isinstance(store, FileCheckpoints):
            raise ReplicationError(f"{node.address} keeps no checkpoint files (MemoryStorage): "
                                   "nothing to back up from")
        cls = type(node.applier.app)
        with node.core_lock:
            core = node.core
            info = {"app": f"{cls.__module__}:{cls.__qualname__}", "role": core.role.name,
                    "leader_id": core.leader_id, "position": core.position,
                    "commit_index": core.commit_index,
                    "epoch_history": [list(x) for x in core.history]}
        info.update(min_wal=node.storage.min_wal(), max_wal=node.storage.max_wal(),
                    checkpoints=[[wal_id, path.stat().st_size] for wal_id, path in store.list()
                                 if path.exists()],
                    checkpoint_error=node.checkpointer.last_error,
                    checkpoint_running=node.checkpointer.child is not None or
                    node.checkpointer.requested)
        return info

    def op_backup_read(self, wal_id: Any, offset: Any, length: Any) -> bytes:
        """Up to ``length`` bytes (at most 4 MiB) of the checkpoint at
        ``wal_id`` from ``offset`` (b"" at its end)."""
        _int_args("backup_read", 0, wal_id=wal_id, offset=offset, length=length)
        store = self.node.checkpointer.store
        path = dict(store.list()).get(wal_id) if isinstance(store, FileCheckpoints) else None
        try:
            if path is None:
                raise FileNotFoundError
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(min(length, 4 << 20))
        except FileNotFoundError:
            raise ReplicationError(f"no checkpoint at WAL id {wal_id} any more (a newer one "
                                   "replaced it): start the backup again") from None

    def op_backup_wal(self, start: Any, count: Any) -> list[bytes]:
        """Up to ``count`` (at most 10,000) raw WAL entries from ``start``."""
        _int_args("backup_wal", 1, start=start, count=count)
        st = self.node.storage
        if start < st.min_wal():
            raise ReplicationError(f"WAL entries from {start} are gone (the WAL starts at "
                                   f"{st.min_wal()}): start the backup again")
        return st.read_wal_data(start, min(count, 10_000))

    def op_checkpoint(self) -> int:
        """Start a checkpoint now; the WAL id it will capture (0 when this
        storage keeps no checkpoints)."""
        return self.node.checkpointer.request()
