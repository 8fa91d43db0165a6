"""The daemon's decisions, sans-io: reports, sessions, the gate, recovery.

``server.py`` runs a :class:`Coordinator` on an asyncio loop with real
sockets, ZEO clients and files; the whole-protocol simulation
(``tests/simulation.py``) runs the same object with simulated ones. Nothing
here does I/O or reads a clock: inputs are method calls (decoded commands
from a peer, results of scans, no-ops and owner checks, timers), outputs are
reply bytes and :class:`Action` objects the shell carries out
(:meth:`Coordinator.take_actions`).

Theory of operation
===================
What may be *published* is decided by the tracker's report rules
(``tracker.py``) and, for every storage the daemon can read, by the gate
(``gate.py``), which makes the point coherent whatever was lost: the point
never goes past what was read on a storage, and never keeps part of a
stamped transaction. So the recovery paths below decide only how *fast*
the point moves and what is *declared*; none of them can publish a split.

Readable storages
    ``zeo`` (read through ZEO; a no-op commit can be made on them) or
    ``file`` (the ``Data.fs`` read directly, read-only; the daemon must run
    on the same host; its writer is the process in ``Data.fs.lock``).
    Everything else is *unreadable*: only reports tell about it (the legacy
    trust model), and once reports about it may have been lost it stays
    blocked (see "Lost reports").

Sessions
    A tidstorage client says ``HELLO`` (session id + secret, pid, host)
    first. Its multi-storage transactions over readable storages are not
    held by the tracker at all (the gate covers them, so a vanished client
    blocks nothing); they are remembered for in-doubt resolution and status.
    Transactions of legacy clients (no HELLO) and those touching an
    unreadable storage go through the tracker as before. A reconnecting
    session re-declares its open transactions (``session.py``): a BEGIN of
    an id the same session already has in flight re-attaches it.

Bootstrap
    After a (re)start the published point is reloaded from the TID log; each
    readable storage is read from its published TID (every transaction of
    it above that TID, exactly: a coherent point keeps a stamped
    transaction on all its storages or on none, so a transaction partly
    above the point is wholly above it), or from its beginning when nothing
    was published for it. The tracker publishes nothing until the daemon's
    own no-op commit has finished on every ``zeo`` storage (every legacy
    transaction that had voted has then ended); with no ``zeo`` storage it
    is bootstrapped at once. ``BOOTSTRAPED`` answers 1 once that is done and
    every readable storage has been read once.

In-doubt transactions and their proof
    A transaction is *in doubt* when its client's connection dropped
    without ``QUIT``, when the client says ``INDOUBT``, or -- for a stamped
    transaction nobody reported -- when it has been seen on some storages
    and not on the others for :data:`INCOMPLETE_DELAY`. The verdict comes
    from the files, after a *proof* that the transaction cannot change any
    more on each storage where it is missing:

    * it was seen finished on another storage, so (two-phase commit) it has
      voted everywhere; on a ``zeo`` storage it then holds or has released
      the commit lock, and a no-op commit made *after* the observation
      waits for it: read that storage again after the no-op;
    * on a ``file`` storage: the process that held ``Data.fs.lock`` when it
      was observed is gone (or no longer holds it), or the transaction's own
      client is not the lock holder; read the file again after that.

    Then: found everywhere: committed; found nowhere: it cannot be split
    (the gate covers it if it commits later), the tracker drops it;
    found in some storages only: **split**, logged CRITICAL once; the gate
    keeps it out of every published point for ever (and with it whatever
    later transaction links its storages to others). No time window, no TID
    compared across storages: a TID-less "missing" is always a proven one.

Lost reports
    ``LOST`` from a client, or an abrupt disconnect: for readable storages
    it only asks for a prompt read (the gate is sound without it). An
    unreadable storage named by it is blocked: nothing is published for it
    again by this daemon process, and an ERROR says to configure ``zeo`` or
    ``data_fs`` for it.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from . import protocol as p
from .backoff import Backoff
from .gate import NONE, Gate, KnownTxn
from .session import session_of
from .stamps import Stamp
from .tids import tid_seconds
from .tracker import Publication, Refused, Tracker

log = logging.getLogger("tidstorage.server")

__all__ = [
    "Coordinator", "Peer", "Action", "Scan", "Noop", "CheckOwner", "SetTimer", "Publish",
    "OwnerInfo", "INCOMPLETE_DELAY",
]

#: A stamped transaction seen on some of its storages and not the others for
#: this long (seconds) is checked (normally its other parts follow within
#: milliseconds). Only a trigger: the verdict rests on proofs, not on time.
INCOMPLETE_DELAY = 1.0
#: How often the writer of a ``file`` storage is checked again while it still
#: holds the lock (seconds).
OWNER_POLL = 0.5
#: How often an idle readable storage is read for unreported commits (s).
SCAN_POLL = 0.5
#: How long after a reported commit its storage is read (seconds): reads
#: triggered by reports are coalesced, one per storage per this delay.
SCAN_HINT_DELAY = 0.02
#: How often the fast-path TID ceiling is computed again (seconds).
CEILING_REFRESH = 0.5
#: Retry backoff of failed no-ops and reads (seconds): first, longest.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
#: Most sessions remembered (attached or not); the oldest detached ones
#: without open transactions are forgotten first.
MAX_SESSIONS = 100_000
#: Most ended transaction ids remembered, so that late repeated reports are
#: recognised and ignored quietly.
MAX_ENDED = 100_000
#: Most open connections of one session (a process has one per daemon; a
#: few more while reconnections race): budgets per client, not per address.
MAX_PEERS_PER_SESSION = 16
#: Most transactions in flight in all, and per session (a process commits
#: one transaction per thread at a time): a BEGIN beyond is refused.
MAX_IN_FLIGHT = 100_000
MAX_TXNS_PER_SESSION = 10_000
#: Most transactions read on one storage above its published TID, and most
#: transactions the gate knows of: the memory a split can make the daemon
#: hold (it freezes storages while the writers go on) until it is repaired.
MAX_HELD_TIDS = 2_000_000
MAX_KNOWN = 200_000
#: Most unknown storage ids remembered for status (a flood of ids must not
#: grow the daemon), and most names listed in one log line.
MAX_UNKNOWN_IDS = 1000
LOG_LIST_MAX = 8
#: Most entries of each kind in the SIGUSR1 state dump.
DESCRIBE_MAX = 20
#: Repeated refusals / decreases: at most one log line per key this often (s).
LOG_INTERVAL = 10.0
LOG_KEYS_MAX = 10_000


# -- actions ------------------------------------------------------------------


class Action:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Scan(Action):
    """Read every committed transaction of ``storage`` with a TID above
    ``since`` (all of them, or up to a batch limit with ``more=True``), and
    call :meth:`Coordinator.scan_result` with ``seq``."""

    storage: str
    since: int
    seq: int


@dataclass(frozen=True, slots=True)
class Noop(Action):
    """Commit a no-op on ``storages`` (one two-phase commit; stamped with
    ``coherency_id`` when there are several) and call
    :meth:`Coordinator.noop_result` with ``request``."""

    request: int
    storages: tuple[str, ...]
    coherency_id: str


@dataclass(frozen=True, slots=True)
class CheckOwner(Action):
    """Find the process holding ``storage``'s ``Data.fs.lock`` (without
    taking it) and call :meth:`Coordinator.owner_result`."""

    request: int
    storage: str


@dataclass(frozen=True, slots=True)
class SetTimer(Action):
    key: tuple
    delay: float


@dataclass(frozen=True, slots=True)
class Publish(Action):
    """The published point moved: record ``changes`` in the TID log."""

    changes: dict


@dataclass(frozen=True, slots=True)
class OwnerInfo:
    """Who holds a ``file`` storage's lock: ``pid`` None when nobody does;
    ``ident`` tells two processes with the same pid apart (start time)."""

    pid: int | None
    alive: bool = False
    ident: str = ""


# -- state ----------------------------------------------------------------------


class Peer:
    """One client connection, as the coordinator sees it."""

    __slots__ = ("name", "session", "begun", "refused", "quit", "closed", "storages")

    def __init__(self, name: str) -> None:
        self.name = name
        self.session: _Session | None = None
        #: legacy (session-less) transactions begun on this connection
        self.begun: set[str] = set()
        #: a BEGIN was refused since the last SYNC
        self.refused = False
        self.quit = False
        self.closed = False
        #: storages reported on this connection (for an abrupt disconnect)
        self.storages: set[str] = set()


class _Session:
    __slots__ = ("id", "digest", "pid", "host", "peers", "txns", "storages")

    def __init__(self, sid: str, digest: bytes, pid: int, host: str) -> None:
        self.id = sid
        self.digest = digest
        self.pid = pid
        self.host = host
        #: its open connections: usually one; two while a reconnection races
        #: the daemon noticing the old one is gone, or while a second
        #: reporter of the process turns into an alias of the first
        self.peers: set[Peer] = set()
        self.txns: set[str] = set()
        self.storages: set[str] = set()


@dataclass(slots=True)
class _Txn:
    id: str
    storages: frozenset[str]
    session: _Session | None
    peer: Peer | None
    in_tracker: bool
    resolution: "_Resolution | None" = None
    #: when it began (the coordinator's clock)
    started: float = 0.0
    #: a legacy transaction whose connection ended: when it counts as in doubt
    deadline: float | None = None


@dataclass(slots=True)
class _Proof:
    """The no-op proving the transactions in doubt on one ``zeo`` storage."""

    #: transactions the no-op in flight will prove (observed before it left)
    flying: set[str] = field(default_factory=set)
    #: transactions observed since: they need the next no-op
    next: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Resolution:
    """Finding the fate of one transaction (see "In-doubt transactions")."""

    txn: str
    storages: frozenset[str]
    why: str
    #: the transaction's session pid on this host, if known (file owners)
    pid: int | None
    #: its client said INDOUBT: it has aborted what did not finish (for a
    #: ``file`` storage, written by that same process, that is the proof)
    reported: bool = False
    #: storage -> scan sequence number whose result is awaited
    reads: dict[str, int] = field(default_factory=dict)
    #: storages where it is missing, awaiting their proof
    proving: set[str] = field(default_factory=set)
    #: storage -> the owner seen first (file storages)
    owners: dict[str, OwnerInfo] = field(default_factory=dict)
    phase: str = "reading"
    #: when the resolution started (the coordinator's clock)
    since: float = 0.0


class RateLimitedLog:
    """At most one line per key per :data:`LOG_INTERVAL`; the lines held back
    are counted and reported with the next one (one line per state change,
    not per message, whatever a client sends)."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float]) -> None:
        self._log = logger
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            self._held[key] = self._held.get(key, 0) + 1
            return
        if len(self._last) > LOG_KEYS_MAX:  # bounded memory
            self._last.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            message += f" ({held} similar lines held back in the last {LOG_INTERVAL:g} s)"
        self._log.log(level, message, *args)


class Coordinator:
    """See the module docstring."""

    def __init__(
        self,
        kinds: Mapping[str, str | None],
        initial: Mapping[str, int] | None = None,
        *,
        clock: Callable[[], float],
        daemon_id: str,
        host: str = "",
        grace: float = 60.0,
        config_name: str = "CONFIG",
        legacy_clients: bool = True,
        any_storage: bool | None = None,
        tid_ceiling: Callable[[int], int] | None = None,
        admin_token: str | None = None,
        rewrite_log: Callable[[dict[str, int]], str] | None = None,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
        shell_status: Callable[[], dict] | None = None,
        record_accept: Callable[[str], None] | None = None,
        accepted: Iterable[str] = (),
        read_tidlog: Callable[[int], dict] | None = None,
    ) -> None:
        #: storage id -> "zeo", "file" or None (unreadable)
        self.kinds = {s: k for s, k in kinds.items()}
        readable = [s for s, k in self.kinds.items() if k]
        self.zeo = sorted(s for s, k in self.kinds.items() if k == "zeo")
        self.clock = clock
        self.daemon_id = daemon_id
        self.host = host
        self.grace = grace
        self.config_name = config_name
        #: accept reports from clients that say no HELLO (legacy TIDStorage)
        self.legacy_clients = legacy_clients
        #: accept storage ids that are not configured (only when none is)
        self.any_storage = (not self.kinds) if any_storage is None else any_storage
        #: tid_ceiling(last known TID of a storage) -> the highest plausible
        #: TID for it now (None: no check); see _check_tids
        self.tid_ceiling = tid_ceiling
        #: storage ids reported but not configured: id -> peers that sent them
        self.unknown_ids: dict[str, set[str]] = {}
        #: the token ADMIN requests that change the published state must carry
        self.admin_token = admin_token
        #: rewrite_log(state) starts a new TID log holding ``state`` and
        #: returns where the old one is kept (the shell's); raises on failure
        self.rewrite_log = rewrite_log
        self.tracker = Tracker(initial)
        self.gate = Gate(readable, initial)
        self.gate.accepted.update(accepted)
        self._healed_seen = 0
        self._actions: list[Action] = []
        self._dirty = False
        self._offers: dict[str, int] = {}  # unreadable storage -> tracker TID
        self._blocked: set[str] = set()  # unreadable storages after lost reports
        self._txns: dict[str, _Txn] = {}
        self._sessions: dict[str, _Session] = {}
        #: ids of ended session transactions (bounded FIFO + set)
        self._ended: set[str] = set()
        self._ended_order: collections.deque[str] = collections.deque()
        self._hinted: set[str] = set()  # reported past a read in flight
        self._held_back: set[str] = set()  # not read any more (_check_held)
        self._floor = NONE  # see _check_tids
        self._floor_until = float("-inf")
        self._resolutions: dict[str, _Resolution] = {}
        self._proofs: dict[str, _Proof] = {}
        self._requests = 0
        self._pending: dict[int, tuple] = {}  # request -> what it is for
        self._scan_seq = {s: 0 for s in readable}
        self._scan_busy: dict[str, bool] = {s: False for s in readable}
        self._scan_again: dict[str, bool] = {s: False for s in readable}
        self._scan_done = {s: 0 for s in readable}  # last completed seq
        self._scanned_once: set[str] = set()
        self.started = clock()
        self.wall = wall
        #: shell_status() -> what the shell adds to the status (its TID log)
        self.shell_status = shell_status
        #: record_accept(split id) writes an acceptance to the TID log (raises)
        self.record_accept = record_accept
        #: read_tidlog(offset) -> a page of the TID log's bytes (the shell's;
        #: the ``tidlog`` verb: a backup on a host without the log file)
        self.read_tidlog = read_tidlog
        self._retry: dict[tuple, Backoff] = {}  # failed reads and no-ops, until one works
        self._random = rng or random.Random()
        self._armed: set[tuple] = set()  # timers set and not fired yet
        self._bootstrap_txn: str | None = None
        self._boot_logged = False
        self._ids = 0
        self._limited = RateLimitedLog(log, clock)
        self.stats = collections.Counter()
        #: commands received; refusals, by reason (the metrics; BEGIN,
        #: COMMIT and ABORT are counted in self.stats)
        self.events = 0
        self.refused_events = 0
        self.begins = self.commits = self.aborts = 0
        self.refusals: collections.Counter = collections.Counter()
        #: the latest verdicts: (txn, "committed" | "aborted" | "split", parts)
        self.verdicts: collections.deque = collections.deque(maxlen=1000)

    # -- life cycle ------------------------------------------------------

    def start(self) -> None:
        """Begin the bootstrap (see the module doc): read, and the no-op."""
        for storage in self.gate.verified:
            self._request_scan(storage)
        if self.zeo:
            self._bootstrap_txn = txn = self._internal_id("bootstrap")
            self.tracker.begin(txn, self.zeo)
            self._noop(tuple(self.zeo), ("bootstrap", txn), "")
            log.info("bootstrap started: no-op commit on %s", ", ".join(self.zeo))
        else:
            self.tracker.set_bootstrapped()
            self._check_bootstrapped()
        unreadable = sorted(s for s, k in self.kinds.items() if not k)
        if unreadable:
            log.warning(
                "storages %s have neither zeo nor data_fs: the daemon cannot read them, so"
                " their published TIDs rest on reports alone (lost reports block them)",
                _names(unreadable))
        self._dirty = True

    def _check_bootstrapped(self) -> None:
        if self.bootstrapped and not self._boot_logged:
            self._boot_logged = True
            self._publish()
            log.info("bootstrap complete: no-op committed on %s, every readable storage read"
                     " (%d transactions); published %s", _names(self.zeo) or "no zeo storage",
                     self.stats["records"], _short(self.gate.published))

    @property
    def bootstrapped(self) -> bool:
        return self.tracker.bootstrapped and len(self._scanned_once) == len(self.gate.verified)

    def published(self) -> Mapping[str, int]:
        return self.gate.published

    def take_actions(self) -> list[Action]:
        """What the shell must do now (call after every input)."""
        if self._dirty:
            self._publish()
        actions, self._actions = self._actions, []
        return actions

    # -- connections -----------------------------------------------------

    def connection_closed(self, peer: Peer) -> None:
        if peer.closed:
            return
        peer.closed = True
        clean = peer.quit
        session = peer.session
        if session is not None:
            log.debug("%s: session %s (pid %s) %s", peer.name, session.id, session.pid,
                      "quit" if clean else "disconnected without QUIT")
        for txn in list(peer.begun):  # legacy transactions: they may come back
            self._timer(("legacy", txn), self.grace)
            state = self._txns.get(txn)
            if state is not None:
                state.deadline = self.clock() + self.grace
        if session is not None:
            session.peers.discard(peer)
        if session is not None and not session.peers:
            # The process has no connection left: what it had open is in
            # doubt (after a clean QUIT too, if anything was left open).
            for txn in list(session.txns):
                state = self._txns.get(txn)
                if state is not None:
                    self._in_doubt(state, "its client disconnected" if not clean
                                   else "its client quit with it open")
            if not clean:
                self._lost(session.storages, f"{peer.name} disconnected without QUIT")
        self._forget_sessions()

    def apply(self, peer: Peer, events: list[tuple]) -> bytes:
        """Apply decoded commands from ``peer``; return the replies."""
        replies: list[bytes] = []
        self.events += len(events)
        for event in events:
            kind = event[0]
            try:
                if kind is p.COMMIT:
                    self._end(peer, event[1], event[2])
                elif kind is p.BEGIN:
                    self._begin(peer, event[1], event[2], event[3])
                elif kind is p.ABORT:
                    self._end(peer, event[1], None)
                elif kind is p.SYNC:
                    if self._dirty:  # "applied" includes its publication
                        self._publish()
                    replies.append(b"0\n" if peer.refused else b"1\n")
                    peer.refused = False
                elif kind is p.DUMP:
                    if self._dirty:
                        self._publish()
                    replies.append(p.encode_dict(self.gate.published))
                elif kind is p.BOOTSTRAPED:
                    replies.append(b"1\n" if self.bootstrapped else b"0\n")
                elif kind is p.HELLO:
                    replies.append(self._hello(peer, *event[1:]))
                elif kind is p.INDOUBT:
                    state = self._txns.get(event[1])
                    if state is not None:
                        if state.session is not None and peer.session is not state.session:
                            raise Refused(f"INDOUBT {event[1]!r} from {peer.name}, which is not"
                                          " the session that began it", "session")
                        self._in_doubt(state, "its client reported it", reported=True)
                elif kind is p.LOST:
                    # Only storages this client reported: a stranger's LOST
                    # must not block anything.
                    mine = peer.session.storages if peer.session is not None else peer.storages
                    self._lost([s for s in event[1] if s in mine or self.kinds.get(s)],
                               f"{peer.name} reported lost reports")
                elif kind is p.ADMIN:
                    replies.append(p.encode_admin_reply(self._admin(peer, event[1])))
                elif kind is p.QUIT:
                    peer.quit = True
                    break
                elif kind is p.AUTH:
                    replies.append(b"1\n")  # a repeated AUTH on an authenticated connection
            except Refused as exc:
                self.refusals[exc.reason] += 1
                self.refused_events += 1
                if kind is p.BEGIN or kind is p.HELLO:
                    peer.refused = True
                if kind is p.HELLO:
                    replies.append(p.encode_field("-"))
                self._limited.log(logging.ERROR, f"refused {peer.name} {exc.reason}",
                                  "%s: refused: %s", peer.name, exc)
        return b"".join(replies)

    def _hello(self, peer: Peer, sid: str, secret: str, pid: int, host: str) -> bytes:
        digest = hashlib.sha256(secret.encode()).digest()
        session = self._sessions.get(sid)
        if session is None:
            if len(self._sessions) >= MAX_SESSIONS:
                self._forget_sessions(force=True)
            session = self._sessions[sid] = _Session(sid, digest, pid, host)
        elif not hmac.compare_digest(session.digest, digest):
            # Not the process that opened this session: a fresh session
            # under another name would do, but never the same one.
            raise Refused(f"HELLO for session {sid!r} with the wrong secret", "session")
        live = {other for other in session.peers if not other.closed}
        if len(live) >= MAX_PEERS_PER_SESSION:
            raise Refused(f"session {sid!r} has {len(live)} connections already"
                          " (MAX_PEERS_PER_SESSION)", "budget")
        session.peers = live
        # A connection the client gave up on may still deliver what it sent
        # before: it keeps its session (its transactions are the session's).
        session.peers.add(peer)
        session.pid, session.host = pid, host
        log.debug("%s: session %s (pid %d on %s), %d connection(s)", peer.name, sid, pid, host,
                  len(session.peers))
        peer.session = session
        return p.encode_field(self.daemon_id)

    # -- reports -----------------------------------------------------------

    def _check_client(self, peer: Peer) -> None:
        if peer.session is None and not self.legacy_clients:
            raise Refused(f"{peer.name} said no HELLO and legacy clients are refused"
                          " ([server] legacy_clients = false)", "legacy")

    def _check_storages(self, peer: Peer, storages) -> None:
        if self.any_storage:
            return
        unknown = [s for s in storages if s not in self.kinds]
        if unknown:
            for storage in unknown[:LOG_LIST_MAX]:
                if storage not in self.unknown_ids and len(self.unknown_ids) < MAX_UNKNOWN_IDS:
                    # Once per id: a name typo in zope.conf, usually.
                    log.warning("%s: reports storage id %r, which is not configured (%s):"
                                " its reports are refused; check the names in zope.conf"
                                " (tidstorage config check)", peer.name, storage[:200],
                                self.config_name)
                peers = self.unknown_ids.setdefault(storage, set())
                if len(self.unknown_ids) <= MAX_UNKNOWN_IDS and len(peers) < LOG_LIST_MAX:
                    peers.add(peer.name)
            raise Refused(f"storages {_names(unknown)} are not in the configuration", "unknown-id")

    def _check_tids(self, txn: str, tids: Mapping[str, int]) -> None:
        """Refuse TIDs implausibly far ahead of what each storage has shown
        (a forged report would freeze a storage for ever: real commits would
        then all be "decreasing"; see ``[server] max_tid_ahead``)."""
        ceiling = self.tid_ceiling
        if ceiling is None:
            return
        # Fast path: below the ceiling of a storage that showed nothing yet
        # (the lowest of all ceilings), computed at most every CEILING_REFRESH.
        now = self.clock()
        if now >= self._floor_until:
            self._floor = ceiling(NONE)
            self._floor_until = now + CEILING_REFRESH
        floor = self._floor
        known = self.gate.verified
        published = self.gate.published
        for storage, tid in tids.items():
            if tid <= floor:
                continue
            last = max(known.get(storage, NONE), published.get(storage, NONE))
            limit = ceiling(last)
            if tid > limit:
                raise Refused(f"{txn!r}: TID {tid:#x} of storage {storage!r} is implausibly"
                              f" far ahead (limit {limit:#x}; see [server] max_tid_ahead)",
                              "future-tid")

    def _begin(self, peer: Peer, txn: str, storages: list[str], bounds) -> None:
        self.begins += 1
        session = peer.session
        if session is None and not self.legacy_clients:
            self._check_client(peer)
        state = self._txns.get(txn)
        if state is not None:
            if session is not None and state.session is session:
                # Re-declared after a reconnection: it is alive again.
                state.peer = peer
                self._cancel_resolution(txn)
                return
            raise Refused(f"BEGIN {txn!r}: this transaction is already in flight", "duplicate")
        if session is not None and txn in self._ended:
            return  # a stale BEGIN of an ended transaction (ids are never reused)
        members = frozenset(storages)
        if not members:
            raise Refused(f"BEGIN {txn!r} names no storage", "empty")
        if not self.any_storage:
            self._check_storages(peer, members)
        if bounds and self.tid_ceiling is not None:
            self._check_tids(txn, bounds)
        if len(self._txns) >= MAX_IN_FLIGHT:
            raise Refused(f"BEGIN {txn!r}: {len(self._txns)} transactions in flight already"
                          " (MAX_IN_FLIGHT)", "budget")
        if session is not None and len(session.txns) >= MAX_TXNS_PER_SESSION:
            raise Refused(f"BEGIN {txn!r}: session {session.id} has {len(session.txns)}"
                          " transactions in flight already (MAX_TXNS_PER_SESSION)", "budget")
        if session is not None:
            kinds = self.kinds
            readable = all(kinds.get(s) for s in members)
            if not readable:
                self.tracker.begin(txn, members, bounds)
            self._txns[txn] = _Txn(txn, members, session, peer, not readable, None,
                                   self.clock())
            session.txns.add(txn)
            session.storages.update(members)
        else:
            self.tracker.begin(txn, members, bounds)
            self._txns[txn] = _Txn(txn, members, None, peer, True, None, self.clock())
            peer.begun.add(txn)
        peer.storages.update(members)

    def _end(self, peer: Peer, txn: str, tids: Mapping[str, int] | None) -> None:
        if tids is None:
            self.aborts += 1
        else:
            self.commits += 1
        if peer.session is None and not self.legacy_clients:
            self._check_client(peer)
        state = self._txns.get(txn)
        if state is not None and state.session is not None and peer.session is not state.session:
            # Reports are bound to the session that began the transaction: a
            # coherency id read from a Data.fs must not let anyone end it.
            raise Refused(f"{'COMMIT' if tids is not None else 'ABORT'} {txn!r} from"
                          f" {peer.name}, which is not the session that began it", "session")
        if tids is not None and self.tid_ceiling is not None:
            try:
                self._check_tids(txn, tids)
            except Refused:
                # Its TIDs cannot be trusted; holding it in flight would
                # block its storages for ever: it ends, as if aborted.
                if state is not None:
                    self._end(peer, txn, None)
                raise
        if state is None:
            if txn in self._ended:
                # A repeated late report (re-sent after a reconnection).
                if tids is not None and len(tids) > 1:
                    self.gate.report(txn, tids)
                    self._dirty = True
                return
            what = "COMMIT" if tids is not None else "ABORT"
            raise Refused(f"{what} {txn!r} received, but it never began (or ended already)",
                          "unknown")
        if state.in_tracker:  # the tracker checks the storages match
            pub = self.tracker.commit(txn, tids) if tids is not None else self.tracker.abort(txn)
            if pub.published or pub.decreases:
                self._tracker_published(pub)
        elif tids is not None and (len(tids) != len(state.storages)
                                   or not state.storages.issuperset(tids)):
            raise Refused(f"COMMIT {txn!r} names storages {sorted(tids)} but BEGIN named"
                          f" {sorted(state.storages)}", "mismatch")
        self._forget_txn(state)
        if tids is not None:
            if len(tids) > 1:
                self.gate.report(txn, tids)
            if self.gate.verified:
                self._scan_hint(tids)
        self._dirty = True

    def _forget_txn(self, state: _Txn) -> None:
        txn = state.id
        self._txns.pop(txn, None)
        if self._resolutions:
            self._resolutions.pop(txn, None)
        if state.peer is not None:
            state.peer.begun.discard(txn)
        if state.session is not None:  # legacy ids may be reused; session ids never are
            state.session.txns.discard(txn)
            self._ended.add(txn)
            self._ended_order.append(txn)
            if len(self._ended_order) > MAX_ENDED:
                self._ended.discard(self._ended_order.popleft())

    def _scan_hint(self, tids: Mapping[str, int]) -> None:
        """Reported TIDs above a frontier: read that storage soon. Reads are
        coalesced (one per SCAN_HINT_DELAY per storage): a read through ZEO
        per commit would compete with the commits themselves."""
        verified = self.gate.verified
        for storage, tid in tids.items():
            frontier = verified.get(storage)
            if frontier is not None and tid > frontier:
                if self._scan_busy[storage]:
                    self._hinted.add(storage)  # read again soon after this read
                else:
                    self._timer(("hint", storage), SCAN_HINT_DELAY)

    def _tracker_published(self, pub: Publication) -> None:
        for storage, tid, old in pub.decreases:
            self._limited.log(
                logging.CRITICAL, f"decrease {storage}",
                "Decreasing update ignored: storage %r tid %d < published %d"
                " (a backup taken now may hold part of a transaction)", storage, tid, old)
        for storage, tid in pub.published.items():
            if not self.kinds.get(storage):
                self._offers[storage] = tid
        if pub.published:
            self._dirty = True

    # -- lost reports --------------------------------------------------------

    def _lost(self, storages: Iterable[str], why: str) -> None:
        if self._dirty:
            self._publish()  # what was reported before the LOST still counts
        blocked = []
        for storage in set(storages):
            if self.kinds.get(storage):
                self._request_scan(storage)
            elif storage not in self._blocked:
                self._blocked.add(storage)
                blocked.append(storage)
        if blocked:
            log.error(
                "%s: reports about storages %s may have been lost, and the daemon cannot"
                " read them: nothing more is published for them until the daemon restarts."
                " Configure zeo or data_fs for them.", why, _names(blocked))
            self._dirty = True

    def _legacy_in_doubt(self, txn: str) -> None:
        state = self._txns.get(txn)
        if state is None or state.session is not None or (
                state.peer is not None and not state.peer.closed):
            return
        log.error(
            "transaction %r is in doubt (its legacy client disconnected %g s ago and did not"
            " end it): legacy clients do not stamp, so it cannot be checked; storages %s stay"
            " blocked until it ends", txn, self.grace, _names(state.storages))

    # -- in-doubt resolution ---------------------------------------------------

    def _in_doubt(self, state: _Txn, why: str, reported: bool = False) -> None:
        txn = state.id
        if txn in self._resolutions:
            return
        if not all(self.kinds.get(s) for s in state.storages):
            unreadable = sorted(s for s in state.storages if not self.kinds.get(s))
            self._limited.log(
                logging.ERROR, f"in doubt {txn}",
                "transaction %s is in doubt (%s) but the daemon cannot read storages %s:"
                " its storages stay blocked until it ends (configure zeo or data_fs)",
                txn, why, _names(unreadable))
            return
        session = state.session
        pid = session.pid if session is not None and session.host == self.host else None
        self._resolve(txn, state.storages, why, pid, reported)

    def _resolve(self, txn: str, storages: frozenset[str], why: str, pid: int | None,
                 reported: bool = False) -> None:
        res = self._resolutions[txn] = _Resolution(txn, storages, why, pid, reported,
                                                   since=self.clock())
        for storage in storages:
            res.reads[storage] = self._request_scan(storage)
        self.stats["resolutions"] += 1
        self._progress(res)

    def _cancel_resolution(self, txn: str) -> None:
        self._resolutions.pop(txn, None)

    def _progress(self, res: _Resolution) -> None:
        """Move a resolution on as far as its reads and proofs allow."""
        if self._resolutions.get(res.txn) is not res:
            return
        done = self._scan_done
        if any(done[s] < seq for s, seq in res.reads.items()):
            return  # a read is pending
        parts = self.gate.parts(res.txn)
        if res.phase == "reading":
            missing = set(res.storages) - set(parts)
            if not parts or not missing:
                return self._verdict(res, parts)
            res.phase = "proving"
            res.proving = set(missing)
            res.reads = {}
            for storage in sorted(missing):
                self._prove(res, storage)
            return
        if res.proving:
            return
        self._verdict(res, parts)

    def _prove(self, res: _Resolution, storage: str) -> None:
        if self.kinds[storage] == "zeo":
            # One no-op proves it for every transaction observed before it was
            # issued: resolutions waiting on one storage share it (a flood of
            # in-doubt reports costs one no-op per storage at a time).
            proof = self._proofs.setdefault(storage, _Proof())
            proof.next.add(res.txn)
            if not proof.flying:
                self._start_proof(storage, proof)
        elif res.reported:
            self._proven(res.txn, storage)
        else:
            self._check_owner(("owner", res.txn, storage), storage)

    def _start_proof(self, storage: str, proof: "_Proof") -> None:
        proof.flying, proof.next = proof.next, set()
        self._noop((storage,), ("prove", storage), "")

    def _proven(self, txn: str, storage: str) -> None:
        res = self._resolutions.get(txn)
        if res is None or storage not in res.proving:
            return
        res.proving.discard(storage)
        res.reads[storage] = self._request_scan(storage)
        self._progress(res)

    def _verdict(self, res: _Resolution, parts: dict[str, int]) -> None:
        del self._resolutions[res.txn]
        state = self._txns.get(res.txn)
        missing = sorted(set(res.storages) - set(parts))
        if not missing:
            outcome = "committed"
        elif not parts:
            outcome = "aborted"
        else:
            outcome = "split"
        self.stats[outcome] += 1
        self.verdicts.append((res.txn, outcome, dict(parts)))
        if state is not None:
            self._forget_txn(state)
            if state.in_tracker:
                pub = (self.tracker.commit(res.txn, parts) if outcome == "committed"
                       else self.tracker.abort(res.txn))
                self._tracker_published(pub)
        if outcome == "split":
            self.gate.mark_split(res.txn, missing)
            where = ", ".join(f"{s} (tid {t:#018x})" for s, t in sorted(parts.items()))
            log.critical(
                "SPLIT transaction %s over %s (%s): recorded in %s, proven missing in %s."
                " No published point will keep it, nor move those storages past it."
                " Repair: stop the applications, run `tidstorage repair -c %s`, restart"
                " the daemon; or heal it online: `tidstorage heal -c %s`.", res.txn,
                _names(res.storages), res.why, where, _names(missing), self.config_name,
                self.config_name)
        elif state is not None:
            log.warning("in-doubt transaction %s (%s): %s", res.txn, res.why,
                        "found in every storage: committed" if outcome == "committed"
                        else "found in no storage: it left nothing (if it still commits,"
                        " the files will show it)")
        self._dirty = True

    def _check_incomplete(self) -> None:
        """Arm a timer for stamped transactions nobody reported that are
        seen on some storages only (see "In-doubt transactions")."""
        for known in self.gate.incomplete():
            txn = known.id
            if txn in self._txns or txn in self._resolutions:
                continue
            self._timer(("incomplete", txn), INCOMPLETE_DELAY)

    # -- I/O requests and results --------------------------------------------

    def _request(self, what: tuple) -> int:
        self._requests += 1
        self._pending[self._requests] = what
        return self._requests

    def _request_scan(self, storage: str) -> int:
        """A read of ``storage`` that starts after now; returns its seq."""
        if storage in self._held_back:
            # Not read any more (see _check_held): the read is "done" at once.
            self._scan_seq[storage] += 1
            self._scan_done[storage] = self._scan_seq[storage]
            return self._scan_seq[storage]
        if self._scan_busy[storage]:
            self._scan_again[storage] = True
            return self._scan_seq[storage] + 1
        seq = self._scan_seq[storage] = self._scan_seq[storage] + 1
        self._scan_busy[storage] = True
        self._actions.append(Scan(storage, self.gate.verified[storage], seq))
        return seq

    def _noop(self, storages: tuple[str, ...], what: tuple, coherency_id: str) -> None:
        request = self._request(("noop", storages, what, coherency_id))
        self._actions.append(Noop(request, storages, coherency_id))

    def _check_owner(self, what: tuple, storage: str) -> None:
        request = self._request(("owner", storage, what))
        self._actions.append(CheckOwner(request, storage))

    def scan_result(self, storage: str, seq: int, records: list[tuple[int, Stamp | None]] | None,
                    *, more: bool = False, error: str | None = None) -> None:
        """A :class:`Scan` finished (``records`` None with ``error``)."""
        if storage not in self._scan_busy or seq != self._scan_seq[storage]:
            return
        self._scan_busy[storage] = False
        if error is not None:
            delay = self._backoff(("scan", storage))
            self._limited.log(logging.WARNING, f"scan {storage}",
                              "cannot read storage %s: %s; retrying in %.1f s", storage, error, delay)
            self._scan_again[storage] = False
            self._timer(("scan", storage), delay)
            return
        self._retry.pop(("scan", storage), None)
        if records:
            self.gate.feed(storage, records)
            self._dirty = True
            self.stats["records"] += len(records)
            self._check_held(storage)
        self._scan_done[storage] = seq
        if storage not in self._scanned_once:
            self._scanned_once.add(storage)
            self._dirty = True
            self._check_bootstrapped()
        if more:
            self._limited.log(logging.INFO, f"reading {storage}",
                              "reading storage %s: at %s, %d transactions read so far (a first"
                              " read of its whole history, or a long absence)", storage,
                              _short({storage: self.gate.verified[storage]}),
                              self.stats["records"])
        if more or self._scan_again[storage]:
            self._scan_again[storage] = False
            self._request_scan(storage)
        elif storage in self._hinted:
            self._hinted.discard(storage)
            self._timer(("hint", storage), SCAN_HINT_DELAY)
        else:
            self._timer(("poll", storage), SCAN_POLL)
        for res in list(self._resolutions.values()):
            if storage in res.reads:
                self._progress(res)
        if records:
            self._check_incomplete()

    def _check_held(self, storage: str) -> None:
        """What the gate holds back (a split freezes its storages, and every
        later transaction linking them) must not grow for ever: beyond
        MAX_HELD_TIDS read transactions of one storage above its published
        TID, or MAX_KNOWN known transactions, the storage is not read any
        more (it cannot publish anyway) until the split is repaired and the
        daemon restarted, or an operator corrects the point."""
        held = self.gate.held(storage)
        if held <= MAX_HELD_TIDS and len(self.gate) <= MAX_KNOWN:
            return
        if storage not in self._held_back:
            self._held_back.add(storage)
            splits = _names(self.gate.splits) or "none declared yet"
            log.critical(
                "storage %s: %d transactions read above its published TID %s, %d known"
                " transactions held back (splits: %s): the daemon stops reading it"
                " (MAX_HELD_TIDS %d, MAX_KNOWN %d); nothing more is published for it until the"
                " split is repaired (tidstorage repair, then restart the daemon)",
                storage, held, _short({storage: self.gate.published.get(storage, NONE)}),
                len(self.gate), splits, MAX_HELD_TIDS, MAX_KNOWN)

    def noop_result(self, request: int, tids: Mapping[str, int] | None,
                    error: str | None = None) -> None:
        what = self._pending.pop(request, None)
        if what is None:
            return
        _, storages, purpose, coherency_id = what
        if error is not None or tids is None:
            delay = self._backoff(purpose)
            self._limited.log(logging.WARNING, f"noop {purpose[0]} {storages}",
                              "no-op commit on %s failed: %s; retrying in %.1f s",
                              _names(storages), error, delay)
            self._timer(("retry-noop", purpose, storages, coherency_id), delay)
            return
        self._retry.pop(purpose, None)
        for storage in storages:
            self._request_scan(storage)
        if purpose[0] == "bootstrap":
            txn = purpose[1]
            self.tracker.set_bootstrapped()
            self._tracker_published(self.tracker.commit(txn, dict(tids), barrier=True))
            log.info("bootstrap no-op committed on %s", _short(tids))
            self._dirty = True
            self._check_bootstrapped()
        elif purpose[0] == "prove":
            storage = purpose[1]
            proof = self._proofs[storage]
            done, proof.flying = proof.flying, set()
            for txn in done:
                self._proven(txn, storage)
            if proof.next:
                self._start_proof(storage, proof)

    def owner_result(self, request: int, owner: OwnerInfo) -> None:
        what = self._pending.pop(request, None)
        if what is None:
            return
        _, storage, purpose = what
        txn = purpose[1]
        res = self._resolutions.get(txn)
        if res is None or storage not in res.proving:
            return
        first = res.owners.setdefault(storage, owner)
        settled = (
            owner.pid is None
            or not owner.alive
            or owner.pid != first.pid
            or owner.ident != first.ident
            or (res.pid is not None and owner.pid != res.pid)
        )
        if settled:
            self._proven(txn, storage)
        else:
            self._timer(("owner", txn, storage), OWNER_POLL)

    def timer(self, key: tuple) -> None:
        self._armed.discard(key)
        kind = key[0]
        if kind == "poll" or kind == "scan" or kind == "hint":
            storage = key[1]
            if not self._scan_busy[storage]:
                self._request_scan(storage)
        elif kind == "legacy":
            self._legacy_in_doubt(key[1])
        elif kind == "incomplete":
            txn = key[1]
            known = self.gate.known(txn)
            if (known is not None and known.parts and not known.complete and not known.never
                    and txn not in self._txns and txn not in self._resolutions):
                # Nobody reported it; its id names the session that wrote it.
                session = self._sessions.get(session_of(txn) or "")
                pid = session.pid if session is not None and session.host == self.host else None
                self._resolve(txn, known.storages, "seen on some of its storages only", pid)
        elif kind == "owner":
            _, txn, storage = key
            res = self._resolutions.get(txn)
            if res is not None and storage in res.proving:
                self._check_owner(("owner", txn, storage), storage)
        elif kind == "retry-noop":
            _, purpose, storages, coherency_id = key
            self._noop(storages, purpose, coherency_id)

    def _backoff(self, key: tuple) -> float:
        backoff = self._retry.get(key)
        if backoff is None:
            backoff = self._retry[key] = Backoff(RETRY_FIRST, RETRY_MAX, self._random)
        return backoff.next()

    # -- the operators' command ---------------------------------------------------

    def _admin(self, peer: Peer, text: str) -> dict:
        try:
            request = json.loads(text)
        except ValueError as exc:
            return {"ok": False, "error": f"the request is not JSON: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "the request is not a JSON object"}
        verb = request.get("verb")
        if verb == "status":
            if self._dirty:
                self._publish()
            answer = {"ok": True, **self.status()}
            if self.shell_status is not None:
                answer.update(self.shell_status())
            return answer
        if verb == "tidlog":
            # A page of the TID log file (any authenticated connection, as
            # status): a backup on another host copies it page by page.
            offset = request.get("offset", 0)
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                return {"ok": False, "error": "offset: a byte offset (>= 0) is needed"}
            if self.read_tidlog is None:
                return {"ok": False, "error": "this daemon writes no TID log (no status_file)"}
            try:
                return {"ok": True, **self.read_tidlog(offset)}
            except OSError as exc:
                return {"ok": False, "error": f"cannot read the TID log: {exc}"}
        if verb in ("set-tid", "forget", "accept", "healed"):
            token = request.get("token")
            if self.admin_token is None:
                return {"ok": False, "error": "this daemon has no admin token: set [server]"
                        " admin_token_file to allow changing its published state"}
            if not isinstance(token, str) or not hmac.compare_digest(
                    token.encode(), self.admin_token.encode()):
                self._limited.log(logging.ERROR, f"admin refused {peer.name}",
                                  "%s: ADMIN %s refused: wrong admin token", peer.name, verb)
                return {"ok": False, "error": "wrong admin token"}
            if verb in ("accept", "healed"):
                split = request.get("split")
                if not isinstance(split, str) or not split or len(split) > p.MAX_FIELD_BYTES:
                    return {"ok": False, "error": "split: a split transaction's id is needed"}
                if verb == "accept":
                    return self._accept(peer, split)
                return self._healed(peer, split, request.get("tids"))
            storage = request.get("storage")
            if not isinstance(storage, str) or not storage:
                return {"ok": False, "error": "storage: a storage id is needed"}
            if not self.any_storage and storage not in self.kinds:
                return {"ok": False, "error": f"storage {storage!r} is not configured"}
            tid = None
            if verb == "set-tid":
                tid = request.get("tid")
                if isinstance(tid, bool) or not isinstance(tid, int) or not -1 <= tid <= p.MAX_TID:
                    return {"ok": False, "error": "tid: an integer TID (or -1) is needed"}
            return self._correct(peer, storage, tid)
        return {"ok": False, "error": f"unknown verb {str(verb)[:40]!r}"}

    def _accept(self, peer: Peer, split: str) -> dict:
        """An operator accepts split ``split`` as it is (it cannot be undone):
        recorded in the TID log first, then publication resumes."""
        if split in self.gate.accepted:
            return {"ok": True, "split": split, "already": True}
        known = self.gate.splits.get(split) or self.gate.known(split)
        if known is None:
            return {"ok": False, "error": f"{split!r} is not a split this daemon knows"}
        if not known.never:
            return {"ok": False, "error": f"{split!r} is not proven split (yet): only a proven"
                    " split can be accepted"}
        if self.record_accept is not None:
            try:
                self.record_accept(split)
            except Exception as exc:
                log.error("%s: ADMIN accept of %s failed, nothing changed: cannot write the"
                          " TID log: %s: %s", peer.name, split, type(exc).__name__, exc)
                return {"ok": False, "error": f"cannot write the TID log: {exc}"}
        self.gate.accept(split)
        log.warning("%s: ADMIN: split transaction %s over %s ACCEPTED by the operator as it"
                    " is (parts %s): publication resumes past it", peer.name, split,
                    _names(known.storages), _short(known.parts))
        self._dirty = True
        return {"ok": True, "split": split, "parts": dict(known.parts)}

    def _healed(self, peer: Peer, split: str, tids) -> dict:
        """``tidstorage heal`` committed the heal of ``split``: read its
        storages now (the heal is learnt from the files, as everything)."""
        storages = list(tids) if isinstance(tids, dict) else []
        known = self.gate.splits.get(split)
        if known is not None:
            storages += list(known.parts)
        for storage in set(storages):
            if self.kinds.get(storage):
                self._held_back.discard(storage)
                self._request_scan(storage)
        log.info("%s: ADMIN: heal of %s reported on %s", peer.name, split,
                 _names(set(storages)))
        return {"ok": True, "split": split, "reading": sorted(s for s in set(storages)
                                                             if self.kinds.get(s))}

    def _correct(self, peer: Peer, storage: str, tid: int | None) -> dict:
        """An operator sets (or forgets) a storage's published TID, even
        downward (a point poisoned by a forged or broken report)."""
        if self._dirty:
            self._publish()
        old = self.gate.published.get(storage)
        saved = (dict(self.gate.published), self.tracker.published())
        self.gate.correct(storage, tid)
        self.tracker.correct(storage, tid)
        self._offers.pop(storage, None)
        kept = None
        if self.rewrite_log is not None:
            try:
                kept = self.rewrite_log(dict(self.gate.published))
            except Exception as exc:
                self.gate.correct(storage, saved[0].get(storage))
                self.tracker.correct(storage, saved[1].get(storage))
                log.error("%s: ADMIN correction of %s failed, nothing changed: cannot start a"
                          " new TID log: %s: %s", peer.name, storage, type(exc).__name__, exc)
                return {"ok": False, "error": f"cannot start a new TID log: {exc}"}
        log.warning("%s: ADMIN: published TID of %s %s by the operator (was %s); the TID"
                    " log was started anew%s", peer.name, storage,
                    "forgotten" if tid is None else f"set to {tid:#x}",
                    "none" if old is None else f"{old:#x}",
                    f" (the old one kept as {kept})" if kept else "")
        if self.kinds.get(storage):
            self._request_scan(storage)
        self._dirty = True
        return {"ok": True, "storage": storage, "old": old, "new": tid, "kept": kept}

    def oldest_unpublished(self, storage: str) -> int | None:
        """The lowest TID committed on ``storage`` (read or reported) that
        the published point does not cover."""
        published = self.gate.published.get(storage, NONE)
        oldest = self.gate.oldest_unpublished(storage)
        if not self.kinds.get(storage):
            # Not read: what the tracker holds back of the reports (and a
            # tracker point the gate has not taken yet).
            held = self.tracker.oldest_held(storage)
            if held is not None and (oldest is None or held < oldest):
                oldest = held
            offer = self._offers.get(storage)
            if offer is not None and offer > published and (oldest is None or offer < oldest):
                oldest = offer
        return oldest

    def lag(self, storage: str) -> float | None:
        """The **lag** of ``storage`` (one definition everywhere: status,
        dump, ``--max-lag``, metrics): the age, in seconds of the wall
        clock against the TID's own time, of the oldest committed
        transaction that the published point does not cover; 0 when it
        covers everything the daemon knows of (an idle healthy site has lag
        0). None when unknown: a readable storage not read yet."""
        if self.kinds.get(storage) and storage not in self._scanned_once:
            return None
        oldest = self.oldest_unpublished(storage)
        if oldest is None:
            return 0.0
        return max(0.0, self.wall() - tid_seconds(oldest))

    def status(self) -> dict:
        """What an operator (and ``tidstorage status``) needs to know; see
        ``protocol.encode_admin`` for the command and its limits."""
        gate = self.gate
        now = self.clock()
        storages = {}
        frozen_by: dict[str, list[str]] = {}
        for txn, known in gate.splits.items():
            for storage in known.storages:
                frozen_by.setdefault(storage, []).append(txn)
        ids = sorted(set(self.kinds) | set(gate.published))
        for storage in ids[:p.MAX_STORAGES]:
            kind = self.kinds.get(storage)
            oldest = self.oldest_unpublished(storage)
            problems = []
            if storage in self._blocked:
                problems.append("blocked: reports were lost and the daemon cannot read it")
            if storage in self._held_back:
                problems.append("held back: too much unpublished for a frozen split")
            if ("scan", storage) in self._retry:
                problems.append("cannot be read (retrying)")
            if storage in frozen_by:
                problems.append(f"frozen by {len(frozen_by[storage])} split(s)")
            storages[storage] = {
                "kind": kind,
                "published": gate.published.get(storage),
                "read": gate.verified.get(storage) if kind else None,
                "oldest_unpublished": oldest,
                "lag": self.lag(storage),
                "problems": problems,
            }
        in_flight = sorted(self._txns.values(), key=lambda t: t.started)
        return {
            "daemon": self.daemon_id,
            "bootstrapped": self.bootstrapped,
            "uptime": now - self.started,
            "published": dict(gate.published),
            "verified": dict(gate.verified),
            "readable": {s: k for s, k in self.kinds.items()},
            "storages": storages,
            "in_flight": len(self._txns),
            "oldest_in_flight": [
                {"id": t.id, "storages": sorted(t.storages), "age": now - t.started,
                 "deadline": None if t.deadline is None else t.deadline - now}
                for t in in_flight[:DESCRIBE_MAX]],
            "resolving": sorted(self._resolutions)[:DESCRIBE_MAX],
            "in_doubt": [
                {"id": r.txn, "storages": sorted(r.storages), "why": r.why, "phase": r.phase,
                 "age": now - r.since,
                 "waiting_for": sorted(r.proving) if r.phase == "proving" else sorted(r.reads)}
                for r in sorted(self._resolutions.values(), key=lambda r: r.since)[:DESCRIBE_MAX]],
            "in_doubt_count": len(self._resolutions),
            "incomplete": len(gate.incomplete()),
            "splits": {txn: {"parts": known.parts, "missing": sorted(known.never)}
                       for txn, known in list(gate.splits.items())[:DESCRIBE_MAX]},
            "split_count": len(gate.splits),
            "healed": {txn: heals for txn, heals in list(gate.healed.items())[-DESCRIBE_MAX:]},
            "accepted": sorted(gate.accepted)[:DESCRIBE_MAX],
            "unknown_ids": {i: sorted(p) for i, p in list(self.unknown_ids.items())[:DESCRIBE_MAX]},
            "blocked": sorted(self._blocked),
            "held_back": sorted(self._held_back),
            "sessions": len(self._sessions),
            "counts": dict(self.stats),
            "reports": {"begin": self.begins, "commit": self.commits, "abort": self.aborts,
                        "all": self.events},
            "refusals": dict(self.refusals),
        }

    # -- publication -------------------------------------------------------------

    def _publish(self) -> None:
        self._dirty = False
        tracker = self.tracker
        gate = self.gate
        if not tracker.bootstrapped:
            limits = {s: gate.published.get(s, NONE) for s in gate.verified}
        else:
            limits = tracker.limits()
        offers = self._offers
        if offers:
            self._offers = {}
            if self._blocked:
                offers = {s: t for s, t in offers.items() if s not in self._blocked}
        changed, violations = gate.compute(limits, offers)
        if gate.healed_total != self._healed_seen:
            new = min(gate.healed_total - self._healed_seen, len(gate.healed))
            for txn in list(gate.healed)[-new:]:
                log.warning("split transaction %s HEALED: its heal was read on %s and the"
                            " published point moved past it; its storages are free again",
                            txn, _short(gate.healed[txn]))
            self._healed_seen = gate.healed_total
        for v in violations:
            log.critical(
                "the published point splits transaction %s over %s (parts %s): learnt after"
                " publication (a late report from a legacy client, or about a storage the"
                " daemon cannot read); a backup taken at that point holds part of it",
                v.txn, _names(v.storages), v.parts)
        if changed:
            tracker.observe_published(changed)
            self._actions.append(Publish(changed))

    # -- helpers ---------------------------------------------------------------

    def _internal_id(self, what: str) -> str:
        # Unique across restarts: the stamps of earlier runs are in the files.
        self._ids += 1
        return f"tidstorage-{self.daemon_id}-{what}-{self._ids}"

    def _timer(self, key: tuple, delay: float) -> None:
        if key not in self._armed:
            self._armed.add(key)
            self._actions.append(SetTimer(key, delay))

    def _forget_sessions(self, force: bool = False) -> None:
        if len(self._sessions) < MAX_SESSIONS and not force:
            return
        for sid, session in list(self._sessions.items()):
            if not session.peers and not session.txns:
                del self._sessions[sid]
            if len(self._sessions) < MAX_SESSIONS * 0.9:
                break

    def describe(self) -> str:
        """SIGUSR1: the internal state in a few lines."""
        t = self.tracker
        lines = [
            f"bootstrapped={self.bootstrapped} in_flight={len(self._txns)}"
            f" sessions={len(self._sessions)} known={len(self.gate)}",
            f"published={_short(self.gate.published)}",
            f"verified={_short(self.gate.verified)}",
        ]
        for txn, state in list(self._txns.items())[:DESCRIBE_MAX]:
            lines.append(f"in flight {txn}: {_names(state.storages)}"
                         f"{'' if state.session is None else ' session ' + state.session.id}")
        if len(self._txns) > DESCRIBE_MAX:
            lines.append(f"... ({len(self._txns)} in flight)")
        groups = t.groups()
        for storages, in_flight, held in groups[:DESCRIBE_MAX]:
            lines.append(f"group {_names(storages)}: in_flight={in_flight} held={_short(held)}")
        resolutions = list(self._resolutions.items())
        for txn, res in resolutions[:DESCRIBE_MAX]:
            lines.append(f"resolving {txn}: {res.phase}, proving {_names(res.proving)}")
        splits = list(self.gate.splits.items())
        for txn, known in splits[:DESCRIBE_MAX]:
            lines.append(f"SPLIT {txn}: parts {_short(known.parts)}, missing {_names(known.never)}")
        if max(len(groups), len(resolutions), len(splits)) > DESCRIBE_MAX:
            lines.append(f"... ({len(groups)} groups, {len(resolutions)} resolutions,"
                         f" {len(splits)} splits)")
        if self._blocked:
            lines.append(f"blocked (unreadable, lost reports): {_names(self._blocked)}")
        if self._held_back:
            lines.append(f"held back, not read any more: {_names(self._held_back)}")
        return "\n".join(lines)

    def in_flight(self) -> dict[str, frozenset[str]]:
        return {txn: state.storages for txn, state in self._txns.items()}

    def splits(self) -> dict[str, KnownTxn]:
        return dict(self.gate.splits)


def _names(storages: Iterable[str], limit: int = 8) -> str:
    items = sorted(storages)
    text = ", ".join(items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items)} storages)"
    return text


def _short(tids: Mapping[str, int], limit: int = 8) -> str:
    items = sorted(tids.items())
    text = ", ".join(f"{k}={v:#x}" for k, v in items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items)} storages)"
    return "{" + text + "}"
