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

1. ``tpc_begin``: the wrapper waits for its own two-phase commit lock (one
   commit at a time per storage, as the storage API promises and every base
   does at its ``tpc_begin``; held until ``tpc_finish`` starts, when the
   base's own lock takes over, or ``tpc_abort``), joins the commit's :class:`_Commit` and
   *defers* its base storage's ``tpc_begin``.
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

import logging
import os
import threading
from typing import Any

import zope.interface
from ZODB.utils import u64

from ..core.session import ID_PREFIX, CommitFlow, new_coherency_id  # noqa: F401  (ID_PREFIX re-exported)
from ..core.stamps import STAMP_KEY
from .reporter import Reporter, get_reporter

log = logging.getLogger("tidstorage.storage")


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


class _Commit(CommitFlow):
    """A :class:`~.session.CommitFlow` with what the wrapper needs besides."""

    __slots__ = ("begun", "lock", "objects", "reporter")

    def __init__(self, extension: dict) -> None:
        super().__init__(extension, new_coherency_id())
        self.lock = threading.Lock()
        self.begun: set[int] = set()  # id() of members whose base tpc_begin ran
        self.reporter: Reporter | None = None  # chosen when sealed
        self.objects: list[TIDStorage] = []


class _Registry:
    """Open commits of this process, keyed by their shared extension dict:
    one commit per ZODB transaction, whatever daemon address each member's
    section names (two sections spelling one daemon differently must not
    turn one transaction into two unstamped ones)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commits: dict[int, _Commit] = {}

    def join(self, member: TIDStorage, extension: dict) -> _Commit:
        key = id(extension)
        with self._lock:
            commit = self._commits.get(key)
            if commit is None or commit.sealed or commit.extension is not extension:
                commit = self._commits[key] = _Commit(extension)
            commit.join(member.storage_id)
            commit.objects.append(member)
            return commit

    def forget(self, commit: _Commit) -> None:
        key = id(commit.extension)
        with self._lock:
            if self._commits.get(key) is commit:
                del self._commits[key]


_registry = _Registry()


def _data(transaction, storage) -> _Commit | None:
    """The commit a wrapper joined for ``transaction`` (None: none, or ended)."""
    try:
        return transaction.data(storage)
    except KeyError:
        return None


def _seal(commit: _Commit, members: list[TIDStorage]) -> None:
    """Called with ``commit.lock`` held at the first store/vote of any member."""
    if not commit.seal(STAMP_KEY):
        return
    try:
        # Bounds (see tracker.py): each storage's last TID known here,
        # before any vote; this commit's TIDs will be greater.
        bounds = {}
        for member in members:
            last = member.base.lastTransaction()
            bounds[member.storage_id] = u64(last) if last else 0
        # One reporter for the whole commit: the first member's (two
        # addresses of one daemon resolve to one reporter once connected).
        commit.reporter = members[0].reporter.target()
        commit.reporter.begin(commit.id, commit.storage_ids, bounds)
    except Exception:  # never fail a commit
        log.exception("tidstorage: cannot report BEGIN")


class TIDStorage:
    """Wrap ``base``; report its commits to the daemon as ``storage_id``.

    Declares ``IStorageWrapper`` (as zc.zlibstorage does) and provides
    whatever its base provides; overrides only the two-phase commit (and
    ``close``, which also releases the reporter).
    """

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
        self._spec = (tuple(server), auth_token, timeout)
        self._fixed = reporter is not None
        self._reporter = reporter or get_reporter(server, auth_token=auth_token, timeout=timeout)
        acquire = getattr(self._reporter, "acquire", None)
        if acquire is not None:
            acquire()
        self._pid = os.getpid()
        self._released = False
        self._closed = False
        self._db = None
        # One two-phase commit at a time (IStorage.tpc_begin blocks while
        # another transaction commits): the base's own lock is only taken
        # at its deferred tpc_begin, so the wrapper blocks here instead.
        self._tpc_lock = threading.Lock()
        self._tpc_owner: Any = None  # the transaction holding _tpc_lock
        # Provide what the base provides (blob support among others), as
        # zc.zlibstorage does: ZODB checks interfaces, not attributes.
        from ZODB.interfaces import IStorageWrapper

        zope.interface.directlyProvides(self, zope.interface.providedBy(base), IStorageWrapper)

    @property
    def reporter(self) -> Reporter:
        """This process's reporter (a forked child gets a fresh one)."""
        if os.getpid() != self._pid and not self._fixed:
            server, token, timeout = self._spec
            self._reporter = get_reporter(server, auth_token=token, timeout=timeout).acquire()
            self._pid = os.getpid()
        return self._reporter

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

    def close(self) -> None:
        """Close the base; the last storage using the reporter closes it
        (batched reports, then QUIT: a clean exit leaves nothing in doubt)."""
        self._closed = True
        try:
            self.base.close()
        finally:
            if not self._released and os.getpid() == self._pid:
                self._released = True
                self._reporter.release()

    # -- IStorageWrapper (no data transformation: see through to the base) --

    def registerDB(self, db) -> None:
        self._db = db
        self.base.registerDB(db)

    def invalidate(self, transaction_id, oids):
        self._db.invalidate(transaction_id, oids)

    def invalidateCache(self):
        self._db.invalidateCache()

    def references(self, record, oids=None):
        from ZODB.interfaces import IStorageWrapper

        if IStorageWrapper.providedBy(self.base):
            return self.base.references(record, oids)
        from ZODB.serialize import referencesf

        return referencesf(record, oids)

    def transform_record_data(self, data):
        transform = getattr(self.base, "transform_record_data", None)
        return transform(data) if transform is not None else data

    def untransform_record_data(self, data):
        untransform = getattr(self.base, "untransform_record_data", None)
        return untransform(data) if untransform is not None else data

    # -- two-phase commit -------------------------------------------------

    def tpc_begin(self, transaction, tid=None, status=" "):
        if tid is not None:
            # copyTransactionsFrom/restore: not an application commit.
            return self.base.tpc_begin(transaction, tid, status)
        # Refuse now what the base would refuse at its (deferred) tpc_begin:
        # a wrapper must not change what the storage API promises.
        if self.base.isReadOnly():
            from ZODB.POSException import ReadOnlyError

            raise ReadOnlyError()
        if _data(transaction, self) is not None:
            from ZODB.POSException import StorageTransactionError

            raise StorageTransactionError("Duplicate tpc_begin calls for same transaction")
        self._tpc_lock.acquire()  # blocks while another transaction commits
        self._tpc_owner = transaction
        try:
            if self._closed:
                self._begin_closed(transaction)
            commit = _registry.join(self, transaction.extension)
            transaction.set_data(self, commit)
        except BaseException:
            self._tpc_release(transaction)
            raise

    def _begin_closed(self, transaction) -> None:
        """``tpc_begin`` after :meth:`close` (maybe while it waited for the
        lock): the base's own answer, not a deferred begin that would fail
        later (ZEO raises ClientDisconnected here)."""
        from ZODB.POSException import StorageError

        self.base.tpc_begin(transaction)
        self.base.tpc_abort(transaction)
        raise StorageError(f"tidstorage: {self!r} is closed")

    def _tpc_release(self, transaction) -> None:
        """Release the two-phase commit lock if ``transaction`` holds it."""
        if self._tpc_owner is transaction and transaction is not None:
            self._tpc_owner = None
            self._tpc_lock.release()

    def _begin(self, transaction) -> None:
        """Seal the commit if needed, then run the deferred base tpc_begin."""
        commit = _data(transaction, self)
        if commit is None:
            return  # tpc_begin with an explicit tid: passed through
        with commit.lock:
            if not commit.sealed:
                _seal(commit, commit.objects)
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
        commit = _data(transaction, self)
        if commit is not None and commit.multi:
            with commit.lock:
                if commit.confirmed is None:
                    commit.confirmed = self._confirm(commit)
        # The base holds its own commit lock until its tpc_finish ends; a
        # transaction waiting in tpc_begin may go on now (its first store
        # waits for the base), and nothing the base calls back into from
        # its tpc_finish waits for this lock.
        self._tpc_release(transaction)
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
            transaction.set_data(self, None)  # ended: a new tpc_begin is allowed
            self._finished(commit, tid)
        return tid

    def tpc_abort(self, transaction):
        commit = _data(transaction, self)
        if commit is None:
            try:
                return self.base.tpc_abort(transaction)
            finally:
                self._tpc_release(transaction)
        transaction.set_data(self, None)
        with commit.lock:
            begun = id(self) in commit.begun
            commit.begun.add(id(self))
        try:
            if not begun:
                # The deferred base tpc_begin never ran (tpc_begin, then
                # tpc_abort, nothing between): run it now, so that the base
                # sees the calls the storage API promised and its tpc_abort
                # does its cleanup (ZEO's iterator GC among others). Nothing
                # was stored: a base that refuses to begin has nothing to end.
                try:
                    self.base.tpc_begin(transaction)
                except Exception:
                    log.debug("tidstorage: deferred tpc_begin failed in tpc_abort",
                              exc_info=True)
                    return
            self.base.tpc_abort(transaction)
        finally:
            self._tpc_release(transaction)
            self._aborted(commit)

    # -- reporting (never raises) -------------------------------------------

    def _confirm(self, commit: _Commit) -> bool:
        if commit.reporter is None:
            return False
        try:
            return commit.reporter.confirm(commit.id)
        except Exception:
            log.exception("tidstorage: cannot confirm BEGIN")
            return False

    def _finished(self, commit: _Commit, tid: bytes | None) -> None:
        try:
            with commit.lock:
                tid_int = u64(tid) if tid is not None else None
                last = commit.member_finished(self.storage_id, tid_int)
                if commit.multi and commit.reporter is not None and tid_int is not None:
                    commit.reporter.finished(commit.id, self.storage_id, tid_int)
            if not last:
                return
            _registry.forget(commit)
            if len(commit.tids) != len(commit.finished):
                log.error("tidstorage: a storage returned no TID from tpc_finish; commit not reported")
            elif commit.multi:
                if commit.reporter is not None:
                    commit.reporter.ended(commit.id, "commit", commit.tids)
            else:
                (storage, tid_int), = commit.tids.items()
                self.reporter.single(commit.id, storage, tid_int)
        except Exception:
            log.exception("tidstorage: cannot report COMMIT")

    def _aborted(self, commit: _Commit) -> None:
        try:
            with commit.lock:
                outcome = commit.member_aborted(self.storage_id)
            if outcome is None:
                return
            _registry.forget(commit)
            if not commit.multi or commit.reporter is None:
                return
            if outcome == "indoubt":
                log.critical(
                    "tidstorage: transaction %s finished on %s, failed in tpc_finish on %s,"
                    " aborted on %s: reported as in doubt; the daemon checks the stamps",
                    commit.id, sorted(commit.finished), sorted(commit.uncertain),
                    sorted(commit.aborted - commit.uncertain),
                )
            commit.reporter.ended(commit.id, outcome)
        except Exception:
            log.exception("tidstorage: cannot report ABORT")


def wrap(base: Any, name: str | None = None, *, server: str | tuple[str, int] = "127.0.0.1:9001",
         auth_token: str | None = None, timeout: float = 1.0) -> TIDStorage:
    """Python API: ``db = ZODB.DB(tidstorage.wrap(storage, "main"))``.

    ``name`` is the storage id of the daemon's TOML config; without it, a
    ZEO client gets its legacy id (see :func:`legacy_storage_id`).
    ``server`` is the daemon, ``"host:port"``, ``"[ipv6]:port"`` or a
    ``(host, port)`` tuple; ``auth_token`` the token itself (see
    ``config.read_token`` to read a token file); ``timeout`` the longest
    wait for the daemon, in seconds.

    Raises ``ValueError`` for a bad ``server`` or ``timeout``, or no
    ``name`` for a storage that is not a ZEO client, and ``TypeError`` for
    an ``IMVCCStorage`` (RelStorage). Nothing is connected here: the daemon
    down, or never there, is no error (commits go on without it).
    """
    if isinstance(server, str):
        from ..core.addresses import parse_host_port

        server = parse_host_port(server, "daemon address")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"invalid timeout {timeout!r}: must be more than 0 seconds")
    return TIDStorage(base, name, server=server, auth_token=auth_token, timeout=timeout)
