"""The ZODB integration: a storage wrapper that reports every commit.

Wrap each storage of the coherent set (in ZConfig with ``%import
tidstorage`` and a ``<tidstorage>`` section, or in Python with
:func:`wrap`); nothing is monkey-patched. Like ``zc.zlibstorage``, the
wrapper delegates everything to its base storage and overrides only the
two-phase commit.

How one commit is reported
--------------------------
ZODB's transaction manager calls ``tpc_begin`` on every resource before the
first ``commit``/``store``, then votes all, then finishes one at a time.
Every ``TransactionMetaData`` that the storages of one transaction receive
shares the same ``extension`` dict, which names the commit across the
wrappers of this process.

1. ``tpc_begin``: the wrapper joins the commit's :class:`_Commit` and *defers*
   its base storage's ``tpc_begin``.
2. The first ``store``/``vote``/... on any member *seals* the commit: every
   ``tpc_begin`` has been called, so the member list is complete. With two
   or more wrapped storages the commit is stamped in the extension
   (``{"tidstorage": {"id": ..., "storages": [...]}}``, before any base
   ``tpc_begin``, so every storage records the same stamp) and ``BEGIN`` +
   ``SYNC`` go to the daemon. Then the base ``tpc_begin`` runs.
3. Before the first ``tpc_finish`` the wrapper waits for the ``SYNC`` reply
   (at most ``timeout``; see ``reporter.py``): the daemon has registered the
   transaction before any storage holds part of it.
4. After the last ``tpc_finish``: ``COMMIT`` with every storage's TID. If
   the commit fails before any finish: ``ABORT``. If it fails after some
   finished and not others: ``INDOUBT`` (the daemon checks the stamps).

A single-storage commit is reported after its ``tpc_finish`` without
waiting. Read-only transactions never reach a storage's ``tpc_begin`` and
report nothing. Nothing here ever makes a commit fail: reporting errors are
logged, once per state change, and swallowed.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from typing import Any

import zope.interface
from ZODB.utils import u64

from .reporter import Reporter, Ticket, get_reporter
from .stamps import STAMP_KEY

log = logging.getLogger("tidstorage.storage")

#: Prefix of coherency ids: the daemon resolves only these from stamps.
ID_PREFIX = "ts:"


_ids = itertools.count(1)
_id_prefix = ID_PREFIX + uuid.uuid4().hex[:16] + "-"  # unique per process


def new_coherency_id() -> str:
    """``ts:<random per process>-<counter>``: unique, and cheap per commit."""
    global _id_prefix, _id_pid
    if os.getpid() != _id_pid:  # a forked child must not reuse the parent's ids
        _id_pid = os.getpid()
        _id_prefix = ID_PREFIX + uuid.uuid4().hex[:16] + "-"
    return f"{_id_prefix}{next(_ids)}"


_id_pid = os.getpid()


def legacy_storage_id(storage: Any) -> str | None:
    """The id the legacy TIDStorage product gave a ZEO ClientStorage.

    ``repr((addresses, storage_name))``, e.g. ``((('127.0.0.1', 8100),), '1')``:
    the keys of existing legacy TID logs. None if ``storage`` is not ZEO.
    """
    addr = getattr(storage, "_addr", None)
    name = getattr(storage, "_storage", None)
    if addr is None or not isinstance(name, str):
        return None
    if isinstance(addr, str):
        addrs: tuple = (addr,)
    elif isinstance(addr, tuple) and len(addr) == 2 and isinstance(addr[1], int):
        addrs = (tuple(addr),)
    else:
        addrs = tuple(a if isinstance(a, str) else tuple(a) for a in addr)
    return repr((addrs, name))


class _Commit:
    """One transaction's commit over the wrapped storages of this process."""

    __slots__ = (
        "lock", "extension", "members", "begun", "sealed", "multi", "id",
        "ticket", "confirmed", "tids", "finished", "aborted", "reporter", "done",
        "uncertain", "storage_ids",
    )

    def __init__(self, extension: dict, reporter: Reporter) -> None:
        self.lock = threading.Lock()
        self.extension = extension  # keeps id(extension) from being reused
        self.reporter = reporter
        self.members: list[TIDStorage] = []
        self.begun: set[int] = set()  # id() of members whose base tpc_begin ran
        self.sealed = False
        self.multi = False
        self.id = new_coherency_id()
        self.ticket: Ticket | None = None
        self.confirmed: bool | None = None
        self.tids: dict[str, int] = {}
        self.finished: set[str] = set()
        self.aborted: set[str] = set()
        #: storages whose tpc_finish raised: they may hold the transaction
        self.uncertain: set[str] = set()
        self.storage_ids: list[str] = []  # sorted, set when sealed
        self.done = False

    def seal(self) -> None:
        """Called with ``lock`` held, once every member has called tpc_begin."""
        self.sealed = True
        self.storage_ids = names = sorted({m.storage_id for m in self.members})
        self.multi = len(names) > 1
        if not self.multi:
            return
        self.extension[STAMP_KEY] = {"id": self.id, "storages": names}
        try:
            # Bounds (see tracker.py): each storage's last TID known here,
            # before any vote; this commit's TIDs will be greater.
            bounds = {}
            for member in self.members:
                last = member.base.lastTransaction()
                bounds[member.storage_id] = u64(last) if last else 0
            self.ticket = self.reporter.begin(self.id, names, bounds)
        except Exception:  # never fail a commit
            log.exception("tidstorage: cannot report BEGIN")


class _Registry:
    """Open commits of this process, keyed by their shared extension dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commits: dict[tuple[int, int], _Commit] = {}

    def join(self, member: "TIDStorage", extension: dict) -> _Commit:
        key = (id(member.reporter), id(extension))
        with self._lock:
            commit = self._commits.get(key)
            if commit is None or commit.sealed:
                commit = self._commits[key] = _Commit(extension, member.reporter)
            commit.members.append(member)
            return commit

    def forget(self, commit: _Commit) -> None:
        key = (id(commit.reporter), id(commit.extension))
        with self._lock:
            if self._commits.get(key) is commit:
                del self._commits[key]


_registry = _Registry()


class TIDStorage:
    """Wrap ``base``; report its commits to the daemon as ``storage_id``."""

    def __init__(
        self,
        base: Any,
        storage_id: str | None = None,
        *,
        server: tuple[str, int] = ("127.0.0.1", 9001),
        auth_token: str | None = None,
        timeout: float = 1.0,
        reporter: Reporter | None = None,
    ) -> None:
        if storage_id is None:
            storage_id = legacy_storage_id(base)
            if storage_id is None:
                raise ValueError(
                    f"tidstorage: a name is required for storage {base!r} (not a ZEO client)"
                )
        from ZODB.interfaces import IMVCCStorage

        if IMVCCStorage.providedBy(base):
            raise TypeError(
                f"tidstorage: {base!r} is an IMVCCStorage (RelStorage?): ZODB would bypass"
                " the wrapper through new_instance(); not supported"
            )
        self.base = base
        self.storage_id = storage_id
        self.reporter = reporter or get_reporter(server, auth_token=auth_token, timeout=timeout)
        # Provide what the base provides (blob support among others), as
        # zc.zlibstorage does: ZODB checks interfaces, not attributes.
        zope.interface.directlyProvides(self, zope.interface.providedBy(base))

    # -- delegation ---------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return f"<TIDStorage {self.storage_id!r} around {self.base!r}>"

    def getName(self) -> str:
        return self.base.getName()

    def sortKey(self) -> str:
        return self.base.sortKey()

    # -- two-phase commit -------------------------------------------------

    def tpc_begin(self, transaction, tid=None, status=" "):
        if tid is not None:
            # copyTransactionsFrom/restore: not an application commit.
            return self.base.tpc_begin(transaction, tid, status)
        commit = _registry.join(self, transaction.extension)
        transaction.set_data(self, commit)

    def _begin(self, transaction) -> None:
        """Seal the commit if needed, then run the deferred base tpc_begin."""
        try:
            commit: _Commit = transaction.data(self)
        except KeyError:
            return  # tpc_begin with an explicit tid: passed through
        with commit.lock:
            if not commit.sealed:
                commit.seal()
            if id(self) in commit.begun:
                return
            commit.begun.add(id(self))
        self.base.tpc_begin(transaction)

    def store(self, oid, serial, data, version, transaction):
        self._begin(transaction)
        return self.base.store(oid, serial, data, version, transaction)

    def storeBlob(self, oid, serial, data, blobfilename, version, transaction):
        self._begin(transaction)
        return self.base.storeBlob(oid, serial, data, blobfilename, version, transaction)

    def restore(self, oid, serial, data, version, prev_txn, transaction):
        self._begin(transaction)
        return self.base.restore(oid, serial, data, version, prev_txn, transaction)

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn, transaction):
        self._begin(transaction)
        return self.base.restoreBlob(oid, serial, data, blobfilename, prev_txn, transaction)

    def deleteObject(self, oid, oldserial, transaction):
        self._begin(transaction)
        return self.base.deleteObject(oid, oldserial, transaction)

    def checkCurrentSerialInTransaction(self, oid, serial, transaction):
        self._begin(transaction)
        return self.base.checkCurrentSerialInTransaction(oid, serial, transaction)

    def undo(self, transaction_id, transaction):
        self._begin(transaction)
        return self.base.undo(transaction_id, transaction)

    def tpc_vote(self, transaction):
        self._begin(transaction)
        return self.base.tpc_vote(transaction)

    def tpc_finish(self, transaction, func=lambda tid: None):
        try:
            commit: _Commit | None = transaction.data(self)
        except KeyError:
            commit = None
        if commit is not None and commit.multi:
            with commit.lock:
                if commit.confirmed is None:
                    commit.confirmed = self._confirm(commit)
        try:
            tid = self.base.tpc_finish(transaction, func)
        except BaseException:
            # The server may have committed and the reply been lost: only the
            # stamps can tell (the abort path reports it INDOUBT).
            if commit is not None:
                with commit.lock:
                    commit.uncertain.add(self.storage_id)
            raise
        if commit is not None:
            self._finished(commit, tid)
        return tid

    def tpc_abort(self, transaction):
        try:
            commit: _Commit | None = transaction.data(self)
        except KeyError:
            commit = None
        if commit is None:
            return self.base.tpc_abort(transaction)
        with commit.lock:
            begun = id(self) in commit.begun
        try:
            if begun:
                self.base.tpc_abort(transaction)
        finally:
            self._aborted(commit)

    # -- reporting (never raises) -------------------------------------------

    def _confirm(self, commit: _Commit) -> bool:
        if commit.ticket is None:
            return False
        try:
            return self.reporter.confirm(commit.ticket)
        except Exception:
            log.exception("tidstorage: cannot confirm BEGIN")
            return False

    def _finished(self, commit: _Commit, tid: bytes | None) -> None:
        try:
            with commit.lock:
                if tid is not None:
                    commit.tids[self.storage_id] = u64(tid)
                commit.finished.add(self.storage_id)
                if len(commit.finished) < len(commit.storage_ids) or commit.done:
                    return
                commit.done = True
            _registry.forget(commit)
            if len(commit.tids) != len(commit.finished):
                log.error("tidstorage: a storage returned no TID from tpc_finish; commit not reported")
            elif commit.multi:
                if not commit.confirmed:
                    # The daemon may not know this transaction (its storages
                    # are reported LOST on reconnection) or will resolve it
                    # from the stamps: a COMMIT now would only be refused.
                    return
                self.reporter.commit(commit.id, commit.tids, commit.ticket)
            else:
                (storage, tid_int), = commit.tids.items()
                self.reporter.single(commit.id, storage, tid_int)
        except Exception:
            log.exception("tidstorage: cannot report COMMIT")

    def _aborted(self, commit: _Commit) -> None:
        try:
            with commit.lock:
                if self.storage_id not in commit.finished:
                    commit.aborted.add(self.storage_id)
                if len(commit.aborted | commit.finished) < len(commit.storage_ids) or commit.done:
                    return
                commit.done = True
            _registry.forget(commit)
            if not commit.multi or commit.ticket is None or commit.confirmed is False:
                return
            if commit.finished or commit.uncertain:
                log.critical(
                    "tidstorage: transaction %s finished on %s, failed in tpc_finish on %s,"
                    " aborted on %s: reported as in doubt; the daemon checks the stamps",
                    commit.id, sorted(commit.finished), sorted(commit.uncertain),
                    sorted(commit.aborted - commit.uncertain),
                )
                self.reporter.in_doubt(commit.id)
            else:
                self.reporter.abort(commit.id, commit.ticket)
        except Exception:
            log.exception("tidstorage: cannot report ABORT")


def wrap(base: Any, name: str | None = None, *, server: str | tuple[str, int] = "127.0.0.1:9001",
         auth_token: str | None = None, timeout: float = 1.0) -> TIDStorage:
    """Python API: ``db = ZODB.DB(tidstorage.wrap(storage, "main"))``.

    ``server`` is ``"host:port"`` or a tuple. Without ``name``, a ZEO client
    gets its legacy id (see :func:`legacy_storage_id`).
    """
    if isinstance(server, str):
        from .client import parse_server

        server = parse_server(server)
    return TIDStorage(base, name, server=server, auth_token=auth_token, timeout=timeout)
