"""ZEO client helpers: the daemon's bootstrap commit.

When the coherency daemon (re)starts it cannot know about commits that are
already in progress.  :func:`commit_noop` commits one empty transaction on
every configured ZEO storage as a single two-phase commit.  ZEO takes a
storage's commit lock at *vote* time and holds it until finish/abort, and the
TID of a transaction is chosen while holding that lock, so once the no-op
has been finished on a storage every transaction that was voting or
committing there before has ended, and its TID is lower than the no-op's.

Logging: this module never configures logging.  ZEO logs a few INFO lines per
client connection (``ZEO.ClientStorage``, ``ZEO.asyncio``); applications that
do not want them can call :func:`quiet_zeo_logging` once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ZODB.Connection import TransactionMetaData
from ZODB.utils import u64

from ..core.addresses import Address, format_address
from ..core.stamps import STAMP_KEY, bootstrap_value, is_bootstrap
from ..errors import ZeoUnavailable

__all__ = [
    "BOOTSTRAP_EXTENSION",
    "ZeoSpec",
    "ZeoUnavailable",
    "commit_noop",
    "is_bootstrap_extension",
    "last_transaction",
    "open_client",
    "quiet_zeo_logging",
]

logger = logging.getLogger(__name__)

#: Extension dict stored in the bootstrap transactions' metadata.
BOOTSTRAP_EXTENSION = {STAMP_KEY: bootstrap_value()}

#: Client label shown in the ZEO server's log for our connections.
CLIENT_LABEL = "tidstorage"

# How long tpc_abort may wait for a lost connection to come back.
_ABORT_TIMEOUT = 2.0

@dataclass(frozen=True)
class ZeoSpec:
    """Where to reach one storage: a ZEO server address and storage name."""

    address: Address
    storage: str = "1"

    def __post_init__(self):
        address = self.address
        if isinstance(address, list):  # e.g. from JSON
            address = tuple(address)
        if isinstance(address, tuple):
            if (len(address) != 2 or not isinstance(address[0], str)
                    or isinstance(address[1], bool)
                    or not isinstance(address[1], int)):
                raise ValueError(f"invalid ZEO address {self.address!r}: "
                                 "expected (host, port)")
        elif not isinstance(address, str) or not address:
            raise ValueError(f"invalid ZEO address {self.address!r}")
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "storage", str(self.storage))

    def __str__(self) -> str:
        return f"{format_address(self.address)} storage {self.storage}"


def _describe(storage_id: str, spec: ZeoSpec) -> str:
    return (f"storage {storage_id!r} (ZEO {format_address(spec.address)}, "
            f"storage {spec.storage!r})")


# -- clients ----------------------------------------------------------------

def open_client(spec: ZeoSpec, timeout: float = 30.0, *, read_only=False,
                storage_id: str | None = None):
    """Open a ``ClientStorage`` for *spec*, waiting up to *timeout* seconds.

    In-memory client cache, no blob dir.  Raises :class:`ZeoUnavailable`.
    """
    from ZEO.ClientStorage import ClientStorage

    sid = storage_id if storage_id is not None else spec.storage
    try:
        return ClientStorage(
            spec.address, storage=spec.storage,
            wait=True, wait_timeout=timeout,
            read_only=read_only, blob_dir=None,
            cache=None, client=None,
            name=f"tidstorage[{sid}] {format_address(spec.address)}",
            client_label=CLIENT_LABEL)
    except Exception as exc:
        raise ZeoUnavailable(
            f"cannot connect to {_describe(sid, spec)} within {timeout}s: "
            f"{_exc_text(exc)}", sid, spec.address) from exc


def _exc_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:  # pragma: no cover - closing must never mask errors
        logger.debug("error closing %s", client, exc_info=True)


def _open_all(specs: Mapping[str, ZeoSpec], timeout: float) -> dict:
    """Open one client per spec concurrently (so that several unreachable
    servers cost *timeout* once, not once each)."""
    ids = list(specs)
    if len(ids) == 1:
        sid = ids[0]
        return {sid: open_client(specs[sid], timeout, storage_id=sid)}
    clients = {}
    errors = []
    with ThreadPoolExecutor(max_workers=len(ids),
                            thread_name_prefix="tidstorage-zeo-open") as pool:
        futures = {sid: pool.submit(open_client, specs[sid], timeout,
                                    storage_id=sid) for sid in ids}
        for sid in ids:
            try:
                clients[sid] = futures[sid].result()
            except BaseException as exc:
                errors.append(exc)
    if errors:
        for client in clients.values():
            _close_quietly(client)
        if len(errors) == 1:
            raise errors[0]
        first = errors[0]
        message = "; ".join(str(e) for e in errors)
        raise ZeoUnavailable(message, getattr(first, "storage_id", None),
                             getattr(first, "address", None)) from first
    return clients


def _sort_key(client, storage_id: str) -> tuple[str, str]:
    # ZODB's transaction manager votes resource managers in ``sortKey()``
    # order, and for ZEO that is ``"<storage>:<canonical server address>"``.
    # Voting in the same order keeps us from deadlocking against a
    # multi-database application commit over the same storages (ZEO takes
    # the commit lock at vote).  The storage id breaks ties.
    try:
        key = client.sortKey()
    except Exception:
        key = ""
    return (key, storage_id)


def commit_noop(specs: Mapping[str, ZeoSpec], timeout: float = 30.0,
                description: str = "tidstorage bootstrap",
                coherency_id: str | None = None) -> dict[str, int]:
    """Commit one empty transaction on all *specs* as a single 2PC.

    *specs* maps storage ids (tidstorage's names) to :class:`ZeoSpec`.
    *timeout* bounds connecting; votes wait for the commit locks as long as
    it takes (that waiting is the point; a stuck committer is ZEO's
    ``transaction-timeout`` business).  Returns ``{storage_id: u64(tid)}``.

    When this returns, every transaction that had started voting on any of
    these storages before the call has finished or aborted.  Raises
    :class:`ZeoUnavailable` on any failure; storages where the commit had
    begun but not finished are aborted.  Raises :class:`ValueError` if two
    specs turn out to be the same ZEO storage (that 2PC would deadlock).
    """
    if not specs:
        return {}
    specs = {str(sid): spec for sid, spec in specs.items()}
    clients = _open_all(specs, timeout)
    try:
        return _two_phase_noop(specs, clients, description, coherency_id)
    finally:
        for client in clients.values():
            _close_quietly(client)


def _two_phase_noop(specs, clients, description, coherency_id=None) -> dict[str, int]:
    keys = {sid: _sort_key(clients[sid], sid) for sid in clients}
    seen: dict[str, str] = {}
    for sid in sorted(clients):
        key = keys[sid][0]
        if key and key in seen:
            # Two votes on one ZEO storage in one 2PC would wait for each
            # other's commit lock forever.
            raise ValueError(
                f"storages {seen[key]!r} and {sid!r} are the same ZEO storage "
                f"({format_address(specs[sid].address)}, storage "
                f"{specs[sid].storage!r})")
        seen[key] = sid
    order = sorted(clients, key=keys.__getitem__)
    # Marked as the daemon's (``is_bootstrap_extension``) but, unless a
    # coherency id is given, not stamped as a multi-storage transaction: it
    # writes no data, so a daemon killed between its finishes leaves no
    # split that matters (see gate.py).
    stamp = bootstrap_value(coherency_id, specs) if coherency_id else bootstrap_value()
    txn = TransactionMetaData(
        user="", description=description, extension={STAMP_KEY: stamp})
    begun: list[str] = []       # tpc_begin called, client-side 2PC open
    finished: dict[str, int] = {}
    phase = "tpc_begin"
    current = None
    try:
        for sid in order:
            current = sid
            clients[sid].tpc_begin(txn)
            begun.append(sid)
        phase = "tpc_vote"
        for sid in order:
            current = sid
            clients[sid].tpc_vote(txn)
        phase = "tpc_finish"
        for sid in order:
            current = sid
            # ClientStorage.tpc_finish ends its side of the 2PC even when it
            # fails, so a storage whose finish was attempted is not aborted.
            begun.remove(sid)
            tid = clients[sid].tpc_finish(txn)
            finished[sid] = u64(tid)
    except BaseException as exc:
        for sid in begun:
            client = clients[sid]
            # A disconnected client's server-side transaction died with the
            # connection; don't wait for a reconnection just to abort it.
            abort_timeout = _ABORT_TIMEOUT if client.is_connected() else 0
            try:
                client.tpc_abort(txn, timeout=abort_timeout)
            except Exception:
                logger.debug("tpc_abort on %s failed", sid, exc_info=True)
        if not isinstance(exc, Exception):
            raise
        message = (f"bootstrap commit failed at {phase} on "
                   f"{_describe(current, specs[current])}: {_exc_text(exc)}")
        if finished:
            message += (" (already finished on "
                        + ", ".join(repr(s) for s in finished) + ")")
        raise ZeoUnavailable(message, current, specs[current].address) from exc
    logger.debug("bootstrap commit done: %s", finished)
    return {sid: finished[sid] for sid in specs}


def last_transaction(spec: ZeoSpec, timeout: float = 10.0) -> int:
    """``u64`` of the storage's ``lastTransaction()`` via a short-lived
    read-only client."""
    client = open_client(spec, timeout, read_only=True)
    try:
        return u64(client.lastTransaction())
    finally:
        _close_quietly(client)


def is_bootstrap_extension(extension) -> bool:
    """Whether a transaction extension (dict or pickled bytes) marks a
    bootstrap no-op commit."""
    if isinstance(extension, (bytes, bytearray)):
        if not extension:
            return False
        try:
            extension = TransactionMetaData(extension=bytes(extension)).extension
        except Exception:
            return False
    if not isinstance(extension, Mapping):
        return False
    return is_bootstrap(extension.get(STAMP_KEY))


_quiet_lock = threading.Lock()


def quiet_zeo_logging(level: int = logging.WARNING) -> None:
    """Opt-in: raise the ``ZEO`` logger's level to *level* unless the
    application already set one.  Adds no handlers."""
    with _quiet_lock:
        zeo = logging.getLogger("ZEO")
        if zeo.level == logging.NOTSET:
            zeo.setLevel(level)
