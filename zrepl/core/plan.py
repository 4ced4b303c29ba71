"""The supervisor's decisions: observed statuses in, calls out (no I/O).

Theory of operation
-------------------

The supervisor is *level-triggered*.  Every ``heartbeat_interval`` it polls
every node's status (the poll of the leader also renews the leader's
lease), hands the observations to :func:`plan`, and performs only the calls
the plan returns.  :func:`plan` does no I/O: observed statuses and the
supervisor's memory in, calls and the new memory out.  Tests drive it with
made-up statuses, failures included.

What :func:`plan` decides, in order:

1. **Liveness.**  A node that answered is alive; one that missed
   ``missed_heartbeats`` polls in a row is dead.  In between it is
   *suspect*: nothing is changed around it yet.
2. **Who leads.**  The remembered leader while it lives.  With no memory (a
   first start, or a lost state file) the supervisor adopts a live node
   that already leads the highest epoch, or, on a fresh cluster once every
   node answered or was declared dead, makes the most advanced node
   (latest epoch, then longest WAL, then configured order) the leader.
3. **Failover.**  When the leader is dead the supervisor waits until its
   lease has surely run out (:func:`renewal_at`: the later of the last
   renewal sent and the last one confirmed, plus
   ``lease * lease_margin``): from then on the old leader accepts no write
   and answers no leader read, even if it is only cut off.  A leader that
   missed a poll gets no renewal in the next one (:func:`renews`), so a
   dead leader's lease is not pushed forward by polls it never sees.  It
   then promotes a node that holds every acknowledged write
   (:func:`promotable`): the leader's follower in the *synchronous chain*
   it last observed (the nodes linked to the leader through synchronous
   links), still obeying the leader's epoch and holding at least the WAL
   it held then, or a node deeper in that chain that holds at least as
   much as that follower does now.  Among those, the longest WAL.  If
   there is none it promotes nobody, says so, and waits.  A leader that
   answers but *writes nothing more in its epoch* (it restarted, or could
   not log a batch it had sent: ``epoch_spent``) is replaced at once, by
   itself or a synchronous node holding more, with a new epoch: no
   incarnation of it can write in the old one.  The new epoch is larger than any issued or seen and is
   persisted before it is used.
4. **The chain.**  The leader, then the live followers in their current
   order; a node that comes back joins at the tail.  FORWARDER in the
   middle, FOLLOWER at the tail, each linked to the next.  Only calls that
   change something are issued: a node with the wrong role or an older
   epoch gets ``set_role``, a node pointing at the wrong follower gets
   ``set_follower``, and so on.  A deposed leader that returns is just a
   node with the wrong role: it becomes a follower at the tail, its
   upstream's handshake finds its divergent tail and rebuilds it.
5. **Around a broken link** (:func:`reroute`).  A node that cannot reach
   its follower while both answer the supervisor has the follower moved
   where the chain uses no link seen broken lately, so a cut between the
   leader and its synchronous follower stalls writes for a moment, not
   for the whole cut.  A leader that reaches no follower at all while
   the others answer is deposed (:func:`isolated`): treated as dead, so it
   gets no more renewals, and replaced once its lease has run out.

6. **A planned switchover** (:func:`handover_step`, ``zrepl switchover``):
   the leader steps down (its epoch spent) while the target is
   synchronous, and the target is promoted once it holds everything the
   leader logged - no lease to wait out, the old leader being alive and
   spent.  Given up when either stops answering or the time runs out.
7. **Membership** (:func:`removable`, ``zrepl member``): a new member joins
   at the tail; a leaving one goes to the tail and leaves once another
   node is synchronous ahead of it.

The synchronous chain is the safety record.  With ``require_sync`` a
leader cannot acknowledge anything while its chain is broken, so the last
non-empty synchronous chain still holds every acknowledged write and is
kept until a new one is seen.  Without ``require_sync`` the leader keeps
committing alone, so only the chain seen at the very last poll counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from .config import Config
from .effects import ERROR, INFO, WARNING
from .epochs import epoch_at
from .types import FollowerState, NodeRole, NodeStatus

STATE_FORMAT = 1


@dataclass
class Call:
    """One call the supervisor makes to a node."""

    op: str  # set_role | set_leader | set_follower | renew | step_down
    address: str
    role: NodeRole | None = None
    leader_id: int = 0
    target: str = ""  # set_leader / set_follower argument

    def __str__(self) -> str:
        if self.op == "set_role":
            return f"{self.address}: set_role({self.role.name}, {self.leader_id})"  # type: ignore[union-attr]
        if self.op == "renew":
            return f"{self.address}: renew lease (epoch {self.leader_id})"
        if self.op == "step_down":
            return f"{self.address}: step_down(epoch {self.leader_id}, for {self.target})"
        return f"{self.address}: {self.op}({self.target!r})"


@dataclass
class Memory:
    """What the supervisor knows between ticks.  The first five fields are
    persisted in the state file; the rest are rebuilt after a restart."""

    max_leader_id: int = 0
    leader: str = ""
    leader_id: int = 0
    sync_chain: list[tuple[str, int]] = field(default_factory=list)  # (address, WAL id applied then)
    chain: list[str] = field(default_factory=list)  # followers in order, leader excluded
    # address -> the machine boot of the leader and of each sync_chain member
    # when recorded, for nodes whose acknowledgements are not all fsynced
    sync_boot: dict[str, str] = field(default_factory=dict)
    # followers given to the leader since sync_chain was seen (see promotable)
    unconfirmed: list[str] = field(default_factory=list)
    misses: dict[str, int] = field(default_factory=dict)
    lease_safe_at: float = 0.0  # monotonic time the leader's lease has surely run out
    # nodes seen with an epoch this supervisor never issued: left alone
    # (never adopted, promoted or chained) until an operator acts
    fenced: dict[str, int] = field(default_factory=dict)
    error_retry: dict[str, float] = field(default_factory=dict)
    # (upstream, follower) -> when the upstream was first seen unable to
    # reach that follower while both answered the supervisor
    link_down: dict[tuple[str, str], float] = field(default_factory=dict)
    # (upstream, follower) -> until when that link is avoided (it broke)
    cut: dict[tuple[str, str], float] = field(default_factory=dict)
    # a planned switchover under way (see handover): its target, and when
    # it is given up unless done
    handover: str = ""
    handover_until: float = 0.0
    # members being removed (see removable) -> when that is given up unless done
    leaving: dict[str, float] = field(default_factory=dict)
    # the member list as changed at run time (persisted; empty: the
    # configured nodes)
    members: list[str] = field(default_factory=list)
    note: str = ""

    def key(self) -> tuple:
        """What must be durable: the state file is rewritten when this
        changes (positions in the synchronous chain ride along, they are
        not worth a write per tick)."""
        return (self.max_leader_id, self.leader, self.leader_id,
                tuple(a for a, _ in self.sync_chain), tuple(self.chain),
                tuple(sorted(self.sync_boot.items())), tuple(self.unconfirmed),
                tuple(self.members))

    def persisted(self) -> dict:
        return {"format": STATE_FORMAT, "max_leader_id": self.max_leader_id,
                "leader": self.leader, "leader_id": self.leader_id,
                "sync_chain": [list(x) for x in self.sync_chain], "chain": list(self.chain),
                "sync_boot": dict(self.sync_boot), "unconfirmed": list(self.unconfirmed),
                "members": list(self.members)}

    @classmethod
    def from_persisted(cls, d: dict) -> "Memory":
        if d.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported supervisor state format {d.get('format')!r}")
        return cls(max_leader_id=int(d["max_leader_id"]), leader=str(d.get("leader", "")),
                   leader_id=int(d.get("leader_id", 0)),
                   sync_chain=[(str(a), int(p)) for a, p in d.get("sync_chain", [])],
                   chain=[str(a) for a in d.get("chain", [])],
                   sync_boot={str(a): str(b) for a, b in d.get("sync_boot", {}).items()},
                   unconfirmed=[str(a) for a in d.get("unconfirmed", [])],
                   members=[str(a) for a in d.get("members", [])])


@dataclass
class Plan:
    calls: list[Call]
    memory: Memory
    new_epoch: int = 0  # persist this before making the calls (0: none)
    persist: bool = False  # the persisted part of the memory changed
    events: list[tuple[int, str]] = field(default_factory=list)  # (logging level, text) to log
    # a switchover ended this tick: (promoted, why) - True with the target
    # promoted, False with the reason it was given up
    handover: tuple[bool, str] | None = None
    # removals that ended this tick: (address, removed, why); a removed
    # node is out of ``memory.members`` already
    removals: list[tuple[str, bool, str]] = field(default_factory=list)
    # the note is a passing state (a poll missed now and then), not news
    quiet: bool = False


def synchronous_chain(leader: str, observed: dict[str, NodeStatus | None]
                      ) -> list[tuple[str, int]]:
    """The nodes linked to ``leader`` through synchronous links, in order,
    with the WAL each held, as observed now."""
    out: list[tuple[str, int]] = []
    seen = {leader}
    st = observed.get(leader)
    while st is not None and st.follower and st.follower_sync and st.follower not in seen:
        nxt = observed.get(st.follower)
        if nxt is None:
            break
        out.append((st.follower, nxt.position))
        seen.add(st.follower)
        st = nxt
    return out


def log_rank(st: NodeStatus) -> tuple[int, int]:
    """How advanced a node's log is: the epoch of its last entry, then its
    length."""
    return epoch_at(st.epoch_history, st.position), st.position


def rebooted_since(mem: Memory, address: str, st: NodeStatus) -> bool:
    """Did the machine of ``address`` reboot since its boot was recorded?
    (Only what a node fsynced before acknowledging survives a power loss,
    so a node that fsyncs every write never counts as rebooted.)"""
    was = mem.sync_boot.get(address, "")
    return bool(was) and not st.extra.get("acks_durable") and was != st.extra.get("boot", "")


def promotable(mem: Memory, alive: dict[str, NodeStatus], dead: set[str]
               ) -> list[tuple[int, int, str]]:
    """The nodes that surely hold every acknowledged write, as (WAL id
    applied, -place in the chain, address).  (Applied, not logged: a state
    sync leaves a node's state at its WAL id with nothing in its log.)

    Only the leader's own follower surely does: with ``require_sync`` the
    leader commits nothing its follower has not acknowledged.  A node
    deeper in the chain held everything when it was last seen synchronous,
    but a forwarder whose own link breaks goes on acknowledging alone (see
    ``NodeCore._acks_wait_for_follower``), so a deeper node counts only
    when it holds at least as much as that follower does now.  Each must
    still obey the leader's epoch and hold the WAL it held when recorded,
    and its machine must not have rebooted since (its ``boot`` changed),
    unless it fsyncs every write before acknowledging it
    (``fsync="always"``): after a power loss a node keeps only what was
    fsynced, and it may have acknowledged more.  (A process that merely
    restarted lost nothing: the kernel still held what it wrote.)"""
    def valid(i: int) -> bool:
        a, pos = mem.sync_chain[i]
        return a in alive and a not in dead and alive[a].leader_id == mem.leader_id and \
            alive[a].position >= pos and not rebooted_since(mem, a, alive[a])
    if not mem.sync_chain or not valid(0):
        return []
    first = alive[mem.sync_chain[0][0]].position
    out = [(alive[a].position, -i, a) for i, (a, _) in enumerate(mem.sync_chain)
           if valid(i) and alive[a].position >= first]
    # A follower given to the leader since that chain was seen may have
    # become synchronous unseen, and acknowledged writes the first lacks:
    # it must answer, and counts as holding the most if it does.
    for a in mem.unconfirmed:
        if a in alive and a not in dead and alive[a].leader_id < mem.leader_id:
            continue  # never joined this epoch: it acknowledged nothing in it
        if a not in alive or a in dead or alive[a].leader_id != mem.leader_id:
            return []
        if rebooted_since(mem, a, alive[a]):
            return []  # rebooted since: it may have lost what it acknowledged
        if alive[a].position >= first:
            out.append((alive[a].position, -len(mem.sync_chain), a))
    return out


def plan(order: list[str], observed: dict[str, NodeStatus | None], memory: Memory,
         cfg: Config, now: float) -> Plan:
    """Decide this tick's calls.  ``observed`` maps every configured address
    to its status, or None if it did not answer this poll.  Pure: the given
    memory is not modified and nothing is logged (what is worth logging
    comes back in ``Plan.events``)."""
    mem = dataclasses.replace(memory, sync_chain=list(memory.sync_chain),
                              leaving=dict(memory.leaving), members=list(memory.members),
                              sync_boot=dict(memory.sync_boot),
                              unconfirmed=list(memory.unconfirmed),
                              chain=list(memory.chain), misses=dict(memory.misses),
                              error_retry=dict(memory.error_retry), fenced=dict(memory.fenced),
                              link_down=dict(memory.link_down),
                              cut={k: t for k, t in memory.cut.items() if t > now})
    persisted_before = mem.key()
    calls: list[Call] = []
    events: list[tuple[int, str]] = []
    new_epoch = 0
    alive = {a: st for a, st in observed.items() if st is not None}
    # An epoch above every one this supervisor issued (its state file says
    # which) came from elsewhere - a hand-made set_role, a stranger: never
    # adopt it (the cluster would follow whoever made it).  The node is
    # fenced: treated as not answering, and reported.
    if mem.max_leader_id:
        for a, st in list(alive.items()):
            if st.leader_id > mem.max_leader_id:
                if mem.fenced.get(a) != st.leader_id:
                    events.append((ERROR, f"{a} reports epoch {st.leader_id}, which this "
                                          f"supervisor never issued (largest {mem.max_leader_id}):"
                                          " fenced - it is left out until an operator clears it"))
                mem.fenced[a] = st.leader_id
                del alive[a]
            else:
                mem.fenced.pop(a, None)
        observed = {a: st if a in alive else None for a, st in observed.items()}
    deposed = mem.leader in alive and isolated(mem.leader, alive, mem, cfg, now)
    if deposed:
        # It reaches no follower, every way round was tried, and other
        # nodes answer: it is deposed like a dead leader - no more renewals,
        # and a promotion once its lease has surely run out.
        if "deposed" not in memory.note:
            events.append((WARNING, f"leader {mem.leader} reaches no follower, though they "
                                    "answer: deposed, as if it were dead"))
        del alive[mem.leader]
        observed = {a: st if a in alive else None for a, st in observed.items()}
    for a in order:
        mem.misses[a] = 0 if a in alive else mem.misses.get(a, 0) + 1
    dead = {a for a in order if mem.misses[a] >= cfg.missed_heartbeats}
    seen_max = max([st.leader_id for st in alive.values()] + [0])
    mem.max_leader_id = max(mem.max_leader_id, seen_max)

    handover: list[tuple[bool, str]] = []
    removals: list[tuple[str, bool, str]] = []

    def done(note: str, quiet: bool = False) -> Plan:
        mem.note = note
        # (removals are judged at every tick, whichever way it ends)
        for a, until in list(mem.leaving.items()):
            why = removable(a, mem)
            if why == "":
                del mem.leaving[a]
                mem.members = [m for m in (mem.members or order) if m != a]
                mem.chain = [m for m in mem.chain if m != a]
                mem.sync_chain = [(m, p) for m, p in mem.sync_chain if m != a]
                mem.sync_boot.pop(a, None)
                mem.misses.pop(a, None)
                removals.append((a, True, "removed"))
                events.append((INFO, f"{a} is no longer a member"))
            elif now >= until:
                del mem.leaving[a]
                removals.append((a, False, why))
                events.append((WARNING, f"removal of {a} given up: {why}"))
        return Plan(calls, mem, new_epoch, mem.key() != persisted_before, events,
                    handover[0] if handover else None, removals, quiet)

    def give_up(why: str) -> None:
        events.append((WARNING, f"switchover to {mem.handover} given up: {why}"))
        handover.append((False, why))
        mem.handover, mem.handover_until = "", 0.0

    def nobody(why: str) -> Plan:
        """No node surely holds every acknowledged write: say so (once, as
        an ERROR) and wait."""
        note = (f"{why} (synchronous chain was {[a for a, _ in mem.sync_chain] or 'empty'}): "
                "promoting nobody, waiting")
        if note != memory.note:
            events.append((ERROR, note))
        return done(note)

    def promote(address: str) -> int:
        """A new epoch led by ``address``: its calls, and the memory of it."""
        epoch = mem.max_leader_id + 1
        mem.max_leader_id = epoch
        mem.leader, mem.leader_id = address, epoch
        mem.chain = [a for a in mem.chain if a != address]
        mem.sync_chain = []
        st = alive.get(address)
        mem.sync_boot = {address: str(st.extra.get("boot", ""))} if st is not None else {}
        mem.unconfirmed = []
        calls.append(Call("set_role", address, NodeRole.LEADER, epoch))
        calls.append(Call("renew", address, leader_id=epoch))
        return epoch

    def intact(st: NodeStatus) -> bool:
        """The leader cannot have lost what it acknowledged: its machine
        did not reboot since it was recorded, or it fsyncs before
        acknowledging, or it runs without require_sync (then nobody else
        surely holds more)."""
        return bool(st.extra.get("acks_durable") or not st.extra.get("require_sync") or
                    mem.sync_boot.get(st.address, "") == st.extra.get("boot", ""))

    # --- 2. who leads -------------------------------------------------------------
    if not mem.leader:
        claimers = sorted((st.leader_id, a) for a, st in alive.items()
                          if st.role == NodeRole.LEADER)
        if claimers and claimers[-1][0] >= mem.max_leader_id:
            # (never one of an epoch below one issued: that epoch's leader
            # may have written, and a renewed older leader would undo it)
            mem.leader_id, mem.leader = claimers[-1]
            mem.chain = [a for a in mem.chain if a != mem.leader]
        elif len(alive) + len(dead - set(alive)) < len(order):
            return done("starting: waiting for every node to answer or be declared dead")
        elif mem.max_leader_id and len(alive) < len(order):
            # Epochs were issued, so writes may have been acknowledged, and
            # with no leader to follow nobody is known to hold them all: any
            # node may, a dead one included.
            return done("no leader, and writes may have been acknowledged: waiting for every "
                        "node to answer")
        elif not alive:
            return done("no node answers")
        elif now < mem.lease_safe_at:
            return done(f"no leader: waiting {mem.lease_safe_at - now:.2f}s for any old "
                        "leader's lease to run out")
        else:
            best = max(alive, key=lambda a: log_rank(alive[a]) + (-order.index(a),))
            new_epoch = promote(best)
            events.append((WARNING,
                           f"no leader: making {best} the leader of epoch {new_epoch}"))

    leader = mem.leader
    lst = alive.get(leader)
    if lst is not None and (lst.role != NodeRole.LEADER or lst.leader_id != mem.leader_id) \
            and not new_epoch:
        # The remembered leader does not lead this epoch (it restarted and was
        # told otherwise, or someone else changed it): find out again.
        if lst.leader_id > mem.leader_id or lst.role != NodeRole.LEADER:
            mem.leader = ""
            return done(f"{leader} no longer leads epoch {mem.leader_id}: re-adopting")

    # --- 3. failover (or a planned switchover) ----------------------------------
    successor = ""
    if mem.handover:
        successor, waiting = handover_step(leader, observed, alive, dead, mem, now, calls,
                                           give_up)
        if waiting:
            return done(waiting)
    if successor:
        new_epoch = promote(successor)
        events.append((INFO, f"switchover: {successor} leads epoch {new_epoch} (it holds "
                                f"everything {leader} logged)"))
        handover.append((True, f"{successor} leads epoch {new_epoch}"))
        mem.handover, mem.handover_until = "", 0.0
        leader = successor
    elif leader in dead:
        if now < mem.lease_safe_at:
            return done(f"leader {leader} is {'deposed' if deposed else 'dead'}; waiting "
                        f"{mem.lease_safe_at - now:.2f}s for its lease to run out")
        candidates = promotable(mem, alive, dead)
        if not candidates:
            return nobody(f"leader {leader} is dead and no node known to hold every "
                          "acknowledged write is reachable")
        new_leader = max(candidates)[2]
        new_epoch = promote(new_leader)
        events.append((WARNING, f"leader {leader} is dead: promoting {new_leader} "
                                        f"with epoch {new_epoch}"))
        leader = new_leader
    elif leader not in alive:
        if deposed:
            return done(f"leader {leader} deposed: it reaches no follower")
        return done(f"leader {leader} missed {mem.misses.get(leader, 0)} poll(s)", quiet=True)
    elif alive[leader].role == NodeRole.LEADER and (
            alive[leader].extra.get("epoch_spent") and alive[leader].leader_id == mem.leader_id
            or alive[leader].leader_id < mem.leader_id and not new_epoch and
            not intact(alive[leader])):
        # It writes nothing more in this epoch (and no earlier incarnation
        # of it can) - or its promotion was lost on the way and its machine
        # rebooted since it was chosen, so it may hold less than it did then
        # and the promotion cannot simply be said again.  A new epoch now,
        # for whoever holds the most of the old one: the leader itself if it
        # is intact, or a synchronous node if it lost data.  With no
        # synchronous chain recorded, whatever was acknowledged went through
        # a follower not yet seen synchronous: the node of the epoch holding
        # the most.
        lst = alive[leader]
        candidates = promotable(mem, alive, dead)
        if intact(lst) and not lst.extra.get("wal_broken"):
            # (a broken WAL could not be written in a new epoch either)
            candidates.append((lst.position, 1, leader))
        elif not mem.sync_chain:
            # Nobody is known to hold what it acknowledged (a promotion was
            # the last thing seen); any node may, a dead one included: wait
            # until every node answers.
            if len(alive) < len(order):
                return done(f"leader {leader} restarted and may have lost acknowledged "
                            "writes: waiting for every node to answer")
            logs = [a for a, st in alive.items() if not st.extra.get("wal_broken")]
            if logs:
                best = max(logs, key=lambda a: log_rank(alive[a]) + (int(a == leader),))
                candidates = [(alive[best].position, 1, best)]
        if not candidates:
            return nobody(f"leader {leader} restarted and may have lost acknowledged writes; "
                          "no node known to hold them all is reachable")
        new_leader = max(candidates)[2]
        new_epoch = promote(new_leader)
        why = (f"writes nothing more in epoch {memory.leader_id}"
               if lst.leader_id == memory.leader_id else
               f"rebooted before it took up epoch {memory.leader_id}")
        events.append((WARNING, f"leader {leader} {why}: {new_leader} leads epoch {new_epoch}"))
        leader = new_leader
    else:
        # the leader answered: record who holds every acknowledged write
        chain_now = synchronous_chain(leader, observed)
        # A member whose machine rebooted since it was recorded may be
        # claimed synchronous by an upstream that has not noticed (an idle
        # link): the claim is stale.  It is not counted now, and its
        # upstream re-links it (a handshake), so the next claim is fresh.
        # Nor does the recorded chain count it, from it down: it kept only
        # what it had fsynced, and recording its new boot below would
        # otherwise make it look whole to ``promotable`` before any fresh
        # claim (the leader dying then promoted a node that may have lost
        # acknowledged writes).
        prev = leader
        for i, (a, _) in enumerate(chain_now):
            st = alive[a]
            if rebooted_since(mem, a, st):
                chain_now = chain_now[:i]
                recorded = [x for x, _ in mem.sync_chain]
                if a in recorded:
                    mem.sync_chain = mem.sync_chain[:recorded.index(a)]
                mem.sync_boot[a] = str(st.extra.get("boot", ""))
                calls.append(Call("set_follower", prev, target=a))
                events.append((WARNING, f"{a} restarted after a reboot: {prev} re-links it "
                                        "before it counts as synchronous again"))
                break
            prev = a
        require_sync = bool(alive[leader].extra.get("require_sync"))
        if chain_now or not require_sync:
            mem.sync_chain = chain_now
            mem.unconfirmed = [a for a in mem.unconfirmed
                               if a != alive[leader].follower and a not in dict(chain_now)]
            mem.sync_boot.update({
                a: str(alive[a].extra.get("boot", "")) for a in [leader] +
                [a for a, _ in chain_now] if a in alive and not alive[a].extra.get("acks_durable")})

    # --- 4. the chain -------------------------------------------------------------
    chain = [a for a in mem.chain if a != leader and a not in dead and a in order]
    for a in order:  # newcomers and returning nodes join at the tail
        if a != leader and a not in chain and a in alive:
            chain.append(a)
    chain = reroute(leader, chain, alive, mem, cfg, now, events)
    # members being removed go to the tail, out of the way of the others
    chain = [a for a in chain if a not in mem.leaving] + [a for a in chain if a in mem.leaving]
    # A node holding more than the forwarder it follows refuses it (only the
    # leader can judge entries it holds beyond its upstream).  When that
    # forwarder is itself synchronous, the extra entries are in no log
    # above: the node moves up, one place a tick, until the leader is its
    # upstream.
    for i in range(1, len(chain)):
        above = alive.get(leader if i == 1 else chain[i - 2])
        up, down = alive.get(chain[i - 1]), alive.get(chain[i])
        if above is not None and up is not None and down is not None and \
                above.follower == chain[i - 1] and above.follower_sync and \
                up.follower == chain[i] and down.position > up.position and \
                up.follower_state in (FollowerState.NOT_CONNECTED, FollowerState.ERROR) and \
                ((leader if i == 1 else chain[i - 2]), chain[i]) not in mem.cut:
            chain[i - 1], chain[i] = chain[i], chain[i - 1]
            events.append((WARNING, f"{chain[i - 1]} holds more than its upstream {chain[i]}: "
                                    "it moves up the chain"))
            break
    mem.chain = chain
    full = [leader] + chain
    for i, a in enumerate(full):
        st = alive.get(a)
        if st is None:
            continue  # suspect: leave it (and the links to it) alone this tick
        want_follower = full[i + 1] if i + 1 < len(full) else ""
        if i == 0 and not new_epoch and st.role == NodeRole.LEADER and \
                st.leader_id < mem.leader_id:
            # its promotion was lost on the way (the node still leads the
            # epoch before): say it again
            calls.append(Call("set_role", a, NodeRole.LEADER, mem.leader_id))
            calls.append(Call("renew", a, leader_id=mem.leader_id))
        if i > 0:
            want_role = NodeRole.FORWARDER if want_follower else NodeRole.FOLLOWER
            if st.role != want_role or st.leader_id < mem.leader_id:
                calls.append(Call("set_role", a, want_role, mem.leader_id))
            if st.leader != full[i - 1]:
                calls.append(Call("set_leader", a, target=full[i - 1]))
        if st.follower != want_follower:
            calls.append(Call("set_follower", a, target=want_follower))
            if i == 0 and want_follower and want_follower not in mem.unconfirmed and \
                    not (mem.sync_chain and mem.sync_chain[0][0] == want_follower):
                mem.unconfirmed.append(want_follower)
                if want_follower in alive:  # its boot now, to see a reboot later
                    mem.sync_boot[want_follower] = str(alive[want_follower].extra.get("boot", ""))
        elif want_follower and st.follower_state == FollowerState.ERROR and \
                now - mem.error_retry.get(a, 0.0) >= cfg.follower_error_retry:
            mem.error_retry[a] = now
            calls.append(Call("set_follower", a, target=want_follower))  # retry the link
    synced = [a for a, _ in mem.sync_chain]
    return done(f"leader {leader} (epoch {mem.leader_id}); chain {' -> '.join(full)}; "
                f"synchronous: {', '.join(synced) if synced else 'none'}")


def handover_step(leader: str, observed: dict[str, NodeStatus | None],
                  alive: dict[str, NodeStatus], dead: set[str], mem: Memory, now: float,
                  calls: list[Call], give_up: Callable[[str], None]) -> tuple[str, str]:
    """One tick of a planned switchover to ``mem.handover``; returns (the
    node to promote now, or ""; a note to do nothing else this tick, or
    "").  Both empty: go on as usual (the switchover goes on, or was given
    up).

    1. While the target is in the leader's synchronous chain (it holds
       every acknowledged write), the leader is told to ``step_down``: it
       takes no more writes and answers no leader reads in its epoch (the
       epoch is spent), while what it logged goes on down the chain.
    2. Once the leader reports it stepped down and the target holds
       everything the leader logged, the target is promoted with a new
       epoch - at once: the old leader, alive and spent, can neither write
       nor answer a leader read whatever its lease says, so there is no
       lease to wait out.  The old leader rejoins at the tail.
    3. Past ``handover_until`` the switchover is given up.  Before the
       step-down nothing changed; after it, the usual rule for a spent
       epoch gives the leader (which holds the most) a new epoch."""
    target = mem.handover
    lst = alive.get(leader)
    tst = alive.get(target)
    if leader in dead or lst is not None and (lst.role != NodeRole.LEADER or
                                              lst.leader_id != mem.leader_id):
        give_up(f"leader {leader} stopped answering or leading epoch {mem.leader_id}")
        return "", ""
    if target in dead or target not in alive and target not in mem.misses or \
            tst is not None and tst.leader_id != mem.leader_id:
        give_up(f"{target} stopped answering or following epoch {mem.leader_id}")
        return "", ""
    stepped = lst is not None and bool(lst.extra.get("stepped_down"))
    if lst is not None and lst.extra.get("epoch_spent") and not stepped:
        give_up(f"leader {leader} writes nothing more in epoch {mem.leader_id} (it restarted "
                "or failed to log)")
        return "", ""
    if lst is None or tst is None:
        # A poll missed (a busy machine): not dead yet - wait, within the time
        if now >= mem.handover_until:
            give_up(f"{leader if lst is None else target} did not answer in time")
            return "", ""
        return "", (f"switching over to {target}: waiting for {target} to answer"
                    if stepped else "")
    if not stepped:
        if target in dict(synchronous_chain(leader, observed)):
            calls.append(Call("step_down", leader, leader_id=mem.leader_id, target=target))
        elif now >= mem.handover_until:
            give_up(f"{target} is not synchronous ({tst.role.name}, WAL {tst.position} of "
                    f"{lst.position}); nothing changed")
        return "", ""
    if tst.position >= lst.position:
        return target, ""
    if now >= mem.handover_until:
        give_up(f"{target} holds WAL {tst.position} of the {lst.position} {leader} logged")
        return "", ""
    return "", (f"switching over from {leader} to {target}: it holds WAL {tst.position} of "
                f"{lst.position}")


def removable(address: str, mem: Memory) -> str:
    """May ``address`` leave the membership now?  "" if so, else why not.

    Not the leader (switch over first).  Not a node that may hold
    acknowledged writes nobody else is known to hold: the leader's
    follower not yet seen synchronous (``unconfirmed``), or a member of the
    recorded synchronous chain unless a member before it remains (a node
    ahead of it in that chain holds at least what it holds).  While it is
    leaving the plan moves it to the tail, so the others become synchronous
    ahead of it and it becomes removable."""
    if address == mem.leader:
        return f"{address} leads: switch over first"
    if address in mem.unconfirmed:
        return f"{address} is the leader's follower and not yet seen synchronous"
    sync = [a for a, _ in mem.sync_chain]
    if not sync:
        return "no synchronous chain seen yet"
    if address in sync and not [a for a in sync[:sync.index(address)] if a != address]:
        return (f"{address} is the first synchronous copy of the acknowledged writes (synchronous "
                f"chain {', '.join(sync)}): the others are not yet synchronous ahead of it")
    return ""


def removal_refused(order: list[str], memory: Memory, address: str) -> str:
    """Why a removal of ``address`` is refused at once ("" if it may begin)."""
    if address not in order:
        return f"{address} is not a member (members: {', '.join(order)})"
    if address in memory.leaving:
        return f"{address} is being removed already"
    if address == memory.leader:
        return f"{address} leads: switch over first (zrepl switchover --to another node)"
    if not [a for a in order if a not in (address, memory.leader)] and memory.leader:
        return (f"{address} is the leader's only follower: it holds the last synchronous copy "
                "of the acknowledged writes")
    return ""


def switchover_target(order: list[str], memory: Memory, to: str) -> str:
    """The node a switchover requested now would hand over to (``to``, or
    the leader's synchronous follower); ValueError with the reason it is
    refused at once."""
    if memory.handover:
        raise ValueError(f"a switchover to {memory.handover} is under way")
    if not memory.leader:
        raise ValueError("there is no leader to switch over from")
    if to:
        if to not in order:
            raise ValueError(f"{to} is not a member (members: {', '.join(order)})")
        if to == memory.leader:
            raise ValueError(f"{to} leads already")
        return to
    if not memory.sync_chain:
        raise ValueError(f"the leader {memory.leader} has no synchronous follower to hand "
                         "over to")
    return memory.sync_chain[0][0]


def reroute(leader: str, chain: list[str], alive: dict[str, NodeStatus], mem: Memory,
            cfg: Config, now: float, events: list[tuple[int, str]]) -> list[str]:
    """Route the chain around a broken link.  When a node cannot reach its
    follower although both answer the supervisor (a partition between the
    two, a one-way loss), the follower is moved to the first place, from
    the tail, where the chain uses no link seen broken lately: with
    ``require_sync`` the leader writes again once its new follower is
    synchronous, instead of waiting for the link to heal.  A link counts as
    broken once its upstream reported it ``NOT_CONNECTED`` (a failed
    acknowledgement or handshake) at ``missed_heartbeats`` polls in a row
    with the follower answering every one; it is then avoided for
    ``follower_error_retry`` seconds.  Nothing here can lose a write: the
    nodes' handshakes judge every new link, and the synchronous chain the
    failover relies on is what the nodes report."""
    full = [leader] + chain
    links = set(zip(full, full[1:]))
    for key in [k for k in mem.link_down if k not in links]:
        del mem.link_down[key]
    for up, down in zip(full, full[1:]):
        ust = alive.get(up)
        if ust is None or down not in alive or ust.follower != down or \
                ust.follower_state != FollowerState.NOT_CONNECTED:
            mem.link_down.pop((up, down), None)
            continue
        since = mem.link_down.setdefault((up, down), now)
        if now - since < cfg.heartbeat_interval * (cfg.missed_heartbeats - 1.5):
            continue
        mem.cut[(up, down)] = now + cfg.follower_error_retry
        rest = [a for a in chain if a != down]
        for j in range(len(rest), -1, -1):
            tried = rest[:j] + [down] + rest[j:]
            way = [leader] + tried
            if tried != chain and not any(link in mem.cut for link in zip(way, way[1:])):
                del mem.link_down[(up, down)]
                events.append((WARNING, f"{up} cannot reach its follower {down}, though both "
                                        f"answer: the chain becomes {' -> '.join(way)}"))
                return tried
    return chain


def isolated(leader: str, alive: dict[str, NodeStatus], mem: Memory, cfg: Config,
             now: float) -> bool:
    """Should ``leader`` be deposed?  It has been unable to reach its
    follower, though the follower answers, for twice as long as
    :func:`reroute` waits - so every way round was tried and failed - while
    at least two other nodes answer (one to lead, one to follow it), and
    one of them surely holds every acknowledged write (:func:`promotable`).
    Not a leader whose epoch is spent: that one is replaced at once anyway."""
    st = alive[leader]
    since = mem.link_down.get((leader, st.follower)) if st.follower else None
    if since is None or st.follower not in alive or st.extra.get("epoch_spent") or \
            st.follower_state != FollowerState.NOT_CONNECTED or \
            now - since < cfg.heartbeat_interval * (2 * cfg.missed_heartbeats - 1.5) or \
            sum(1 for a in alive if a != leader) < 2:
        return False
    others = {a: s for a, s in alive.items() if a != leader}
    dead = {a for a, n in mem.misses.items() if n >= cfg.missed_heartbeats and a not in others}
    return bool(promotable(mem, others, dead))


# --- the lease --------------------------------------------------------------------


def renews(memory: Memory, address: str) -> bool:
    """Does this tick's poll of ``address`` renew its lease?  Only the
    leader's, and only while it answered the poll before."""
    return bool(address == memory.leader and memory.leader_id and
                memory.misses.get(address, 0) == 0)


def renewal_at(memory: Memory, now: float, cfg: Config) -> None:
    """A renewal left at ``now``, or its confirmation came back at ``now``:
    the lease runs out before ``now + lease * lease_margin`` either way.
    The node starts its lease no later than it receives the renewal, so the
    bound from the sending holds even when the reply is lost (the margin
    covers the renewal's transit and the clocks' rate difference), and the
    bound from the reply is the later one when it comes."""
    memory.lease_safe_at = max(memory.lease_safe_at, now + cfg.lease * cfg.lease_margin)
