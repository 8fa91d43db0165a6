"""The application side of the protocol, sans-io: what a process tells a daemon.

``reporter.py`` runs this over a socket with threads; the whole-protocol
simulation (``tests/simulation.py``) runs it over a simulated network. No
I/O, no threads, no clock here: every method returns the bytes to send (or
``None`` when there is no connection) and the caller sends them in order.

A process has one :class:`ClientSession` per daemon. Its identity (a random
session id and secret, the pid and host name) is sent with ``HELLO`` on
every connection, so the daemon recognises a reconnecting process.

Rules (issue "sound and live recovery paths")
---------------------------------------------
* **Confirmed before the first finish, or re-declared.** A multi-storage
  commit sends ``BEGIN2`` + ``SYNC`` when it is sealed; the storage wrapper
  waits (at most its timeout) for the ``SYNC`` reply on the *current*
  connection before its first ``tpc_finish``. A refused ``BEGIN`` makes the
  daemon answer ``0``: not confirmed.
* **Every reconnection re-declares what is in flight.** On each new
  connection (after a daemon restart or not) every open multi-storage commit
  is sent again: before its first finish as ``BEGIN2`` + ``SYNC`` (so it can
  still be confirmed before it finishes), after some finishes as ``BEGIN2``
  whose bounds on the finished storages are their TIDs minus one.
* **Unsent reports never become silence.** Reports (``COMMIT``, ``ABORT``,
  single-storage commits) are batched and followed by a ``SYNC``; until its
  reply comes they are *unacknowledged*. A connection lost with
  unacknowledged reports, or a commit that ended while the daemon could not
  be told, leaves *late* reports, sent first thing on the next connection.
  A commit that ended without its BEGIN having been confirmed by the daemon
  now connected is sent whole (``BEGIN2`` then ``COMMIT``/``INDOUBT``) and
  its storages as ``LOST`` -- only once it has ended, so that any re-check
  the daemon makes of those storages comes after its last ``tpc_finish``.
  The daemon treats repeated reports as no-ops.
* **A clean exit leaves nothing in doubt**: :meth:`close` returns the
  batched reports followed by ``QUIT``.

Soundness does not rest on these rules where the daemon can read the
storages (see ``gate.py``): they make publication fast and in-doubt
resolution cheap, and they are all the protection storages the daemon
cannot read have.
"""

from __future__ import annotations

import collections
import itertools
import os
import secrets
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from . import protocol as p
from .stamps import stamp_value

__all__ = ["ClientSession", "Ticket", "CommitFlow", "MAX_LATE", "process_identity",
           "new_coherency_id", "session_of"]

#: Prefix of coherency ids: the daemon resolves only these from stamps.
ID_PREFIX = "ts:"

_identity: tuple[int, str, str] | None = None  # (pid, session id, secret)
_counter = itertools.count(1)


def process_identity() -> tuple[str, str]:
    """This process's session id and secret (new ones in a forked child)."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        _identity = (pid, "s" + secrets.token_hex(8), secrets.token_hex(16))
    return _identity[1], _identity[2]


def new_coherency_id() -> str:
    """``ts:<session id>-<counter>``: unique, cheap, and it names its process's
    session, so the daemon can find who wrote a transaction nobody reported."""
    return f"{ID_PREFIX}{process_identity()[0]}-{next(_counter)}"


def session_of(coherency_id: str) -> str | None:
    """The session id a coherency id was made by (None if not one of ours)."""
    if not coherency_id.startswith(ID_PREFIX):
        return None
    head, sep, tail = coherency_id[len(ID_PREFIX):].rpartition("-")
    return head if sep and tail.isdigit() else None

#: Most ended reports kept while the daemon cannot be told (oldest dropped
#: first): a process cut off from its daemon for hours must not grow without
#: bound. What is dropped costs publication delay, never coherency, where
#: the daemon reads the storages.
MAX_LATE = 10_000


class Ticket:
    """A pending confirmation of one BEGIN on one connection."""

    __slots__ = ("txn", "generation", "ok")

    def __init__(self, txn: str, generation: int) -> None:
        self.txn = txn
        self.generation = generation
        #: None while pending, then True (registered) or False
        self.ok: bool | None = None


@dataclass(slots=True)
class _Sync:
    """One SYNC sent: the ticket it settles (if any) and the reports it acks."""

    ticket: Ticket | None
    reports: list[tuple[str, bytes]]


@dataclass(slots=True)
class _Open:
    """An open multi-storage commit of this process."""

    txn: str
    storages: tuple[str, ...]
    bounds: dict[str, int]
    ticket: Ticket | None = None
    finished: dict[str, int] = field(default_factory=dict)


class ClientSession:
    """See the module docstring."""

    def __init__(self, *, pid: int, host: str, auth_token: str | None = None,
                 session_id: str | None = None, secret: str | None = None) -> None:
        if session_id is None:
            session_id, secret = process_identity()
        self.id = session_id
        self.secret = secret or secrets.token_hex(16)
        self.pid = pid
        self.host = host
        self.auth_token = auth_token
        #: counts connections; 0 before the first
        self.generation = 0
        self.connected = False
        #: the daemon's own id, learnt in the handshake
        self.daemon_id: str | None = None
        self._open: dict[str, _Open] = {}
        #: txn -> report, to send on the next connection (ordered, bounded)
        self._late: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lost: set[str] = set()
        #: batched reports for the current connection
        self._pending: list[tuple[str, bytes]] = []
        self._syncs: collections.deque[_Sync] = collections.deque()

    # -- queries ---------------------------------------------------------

    def open_commits(self) -> list[str]:
        return list(self._open)

    def confirmation(self, txn: str) -> bool | None:
        """True: the daemon now connected registered ``txn``; None: pending
        on this connection; False: not registered (no connection, refused,
        or confirmed only by a connection that has gone)."""
        state = self._open.get(txn)
        if state is None or state.ticket is None or not self.connected:
            return False
        ticket = state.ticket
        if ticket.generation != self.generation:
            return False
        return ticket.ok

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    @property
    def late_count(self) -> int:
        return len(self._late)

    # -- connection life cycle -----------------------------------------------

    def handshake(self) -> bytes:
        """What to send first on a new connection (replies: ``1`` per AUTH,
        then the daemon id); then call :meth:`attached`."""
        out = b""
        if self.auth_token is not None:
            out += p.encode_auth(self.auth_token)
        return out + p.encode_hello(self.id, self.secret, self.pid, self.host)

    def attached(self, daemon_id: str) -> bytes:
        """The handshake succeeded: re-declare, send late reports and LOST."""
        self.generation += 1
        self.connected = True
        self.daemon_id = daemon_id
        out: list[bytes] = []
        for state in self._open.values():
            if state.finished:
                bounds = {s: (state.finished[s] - 1 if s in state.finished else b)
                          for s, b in state.bounds.items()}
                out.append(p.encode_begin(state.txn, state.storages, bounds))
            else:
                state.ticket = Ticket(state.txn, self.generation)
                out.append(p.encode_begin(state.txn, state.storages, state.bounds))
                out.append(p.SYNC_REQUEST)
                self._syncs.append(_Sync(state.ticket, []))
        reports = list(self._late.items())
        self._late.clear()
        if self._lost:
            reports.append(("", p.encode_lost(sorted(self._lost))))
            self._lost.clear()
        if reports:
            out.extend(data for _, data in reports)
            out.append(p.SYNC_REQUEST)
            self._syncs.append(_Sync(None, reports))
        return b"".join(out)

    def detached(self) -> None:
        """The connection is gone: what it did not acknowledge becomes late."""
        self.connected = False
        syncs, self._syncs = self._syncs, collections.deque()
        for sync in syncs:
            if sync.ticket is not None:
                sync.ticket.ok = False
            for txn, data in sync.reports:
                self._keep_late(txn, data)
        pending, self._pending = self._pending, []
        for txn, data in pending:
            self._keep_late(txn, data)

    def reply(self, value: int) -> None:
        """A SYNC reply arrived (in order)."""
        if not self._syncs:
            return
        sync = self._syncs.popleft()
        if sync.ticket is not None:
            sync.ticket.ok = value == 1

    # -- commits ---------------------------------------------------------

    def begin(self, txn: str, storages: Iterable[str], bounds: Mapping[str, int]) -> bytes | None:
        """A multi-storage commit is sealed: BEGIN2 + SYNC (batched reports first)."""
        state = self._open[txn] = _Open(txn, tuple(storages), dict(bounds))
        if not self.connected:
            return None
        state.ticket = Ticket(txn, self.generation)
        reports, self._pending = self._pending, []
        self._syncs.append(_Sync(state.ticket, reports))
        data = p.encode_begin(txn, state.storages, state.bounds) + p.SYNC_REQUEST
        if reports:
            return b"".join(r for _, r in reports) + data
        return data

    def finished(self, txn: str, storage: str, tid: int) -> None:
        state = self._open.get(txn)
        if state is not None:
            state.finished[storage] = tid

    def ended(self, txn: str, outcome: str, tids: Mapping[str, int] | None = None) -> bytes | None:
        """The commit ended: ``"commit"`` (``tids``), ``"abort"`` or ``"indoubt"``.

        Returns bytes to send at once (INDOUBT, or nothing); COMMIT and
        ABORT are batched (see :meth:`flush`).
        """
        state = self._open.pop(txn, None)
        if state is None:
            return None
        confirmed = (self.connected and state.ticket is not None
                     and state.ticket.generation == self.generation and state.ticket.ok)
        if outcome == "commit":
            report = p.encode_commit(txn, tids or {})
        elif outcome == "abort":
            report = p.encode_abort(txn)
        else:
            report = p.encode_in_doubt(txn)
        if not confirmed and outcome != "abort":
            # The daemon now connected may not know it: send it whole.
            done = dict(state.finished)
            bounds = {s: (done[s] - 1 if s in done else b) for s, b in state.bounds.items()}
            report = p.encode_begin(txn, state.storages, bounds) + report
            self._lost.update(state.storages)
            if self.connected:
                report += p.encode_lost(sorted(self._lost))
                self._lost.clear()
        if not self.connected:
            self._keep_late(txn, report)
            return None
        if outcome == "indoubt":
            self._syncs.append(_Sync(None, [(txn, report)]))
            return report + p.SYNC_REQUEST
        self._pending.append((txn, report))
        return None

    def single(self, txn: str, storage: str, tid: int) -> None:
        """A finished single-storage commit (batched; late if disconnected)."""
        report = p.encode_begin(txn, (storage,)) + p.encode_commit(txn, {storage: tid})
        if self.connected:
            self._pending.append((txn, report))
        else:
            self._keep_late(txn, report)

    def flush(self) -> bytes | None:
        """The batched reports and a SYNC that acknowledges them."""
        if not self.connected or not self._pending:
            return None
        reports, self._pending = self._pending, []
        self._syncs.append(_Sync(None, reports))
        return b"".join(r for _, r in reports) + p.SYNC_REQUEST

    def close(self) -> bytes | None:
        """Clean exit: the batched reports, then QUIT."""
        if not self.connected:
            return None
        reports, self._pending = self._pending, []
        self.connected = False
        return b"".join(r for _, r in reports) + p.QUIT_REQUEST

    def _keep_late(self, txn: str, data: bytes) -> None:
        if not txn:  # a LOST line: its storages are kept in _lost instead
            return
        self._late[txn] = data
        self._late.move_to_end(txn)
        while len(self._late) > MAX_LATE:
            self._late.popitem(last=False)


class CommitFlow:
    """One transaction's commit over the wrapped storages of this process.

    The storage wrapper (``storage.py``) drives it; members are identified by
    their storage ids. Every ``TransactionMetaData`` of one ZODB transaction
    shares the same ``extension`` dict, which is how the wrappers of a
    process find the flow of their transaction: one flow per extension,
    whatever daemon address the members were configured with (two sections
    naming the same daemon differently must not make one transaction two).
    """

    __slots__ = ("extension", "members", "sealed", "multi", "id", "storage_ids",
                 "finished", "aborted", "uncertain", "done", "confirmed", "tids")

    def __init__(self, extension: dict, coherency_id: str) -> None:
        self.extension = extension
        self.members: list[str] = []
        self.sealed = False
        self.multi = False
        self.id = coherency_id
        self.storage_ids: list[str] = []
        self.tids: dict[str, int] = {}
        self.finished: set[str] = set()
        self.aborted: set[str] = set()
        #: storages whose tpc_finish raised: they may hold the transaction
        self.uncertain: set[str] = set()
        self.done = False
        self.confirmed: bool | None = None

    def join(self, storage_id: str) -> None:
        self.members.append(storage_id)

    def seal(self, stamp_key: str) -> bool:
        """Every member has called tpc_begin: stamp a multi-storage commit.

        Returns whether it is one (the caller then reports BEGIN2)."""
        self.sealed = True
        self.storage_ids = names = sorted(set(self.members))
        self.multi = len(names) > 1
        if self.multi:
            self.extension[stamp_key] = stamp_value(self.id, names)
        return self.multi

    def member_finished(self, storage_id: str, tid: int | None) -> bool:
        """Returns True when this was the last member to finish."""
        if tid is not None:
            self.tids[storage_id] = tid
        self.finished.add(storage_id)
        if len(self.finished) < len(self.storage_ids) or self.done:
            return False
        self.done = True
        return True

    def member_aborted(self, storage_id: str) -> str | None:
        """A member aborted; once all have ended: ``"abort"``, ``"indoubt"``
        (some finished or failed in tpc_finish) or None (not yet)."""
        if storage_id not in self.finished:
            self.aborted.add(storage_id)
        if len(self.aborted | self.finished) < len(self.storage_ids) or self.done:
            return None
        self.done = True
        return "indoubt" if (self.finished or self.uncertain) else "abort"
