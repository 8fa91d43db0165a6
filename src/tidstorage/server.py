"""The coherency daemon: an asyncio shell around the tracker.

One event loop serves every connection (``asyncio.Protocol``: large reads,
no thread per connection; when received bytes are applied is decided in
``connection.py``). Each connection has a :class:`~.protocol.Decoder`;
decoded commands are applied to the one :class:`~.tracker.Tracker` in order,
and replies are written in one write per read. Publications go to the TID
log writer, which records them with the burst / full-dump periods.

Recovery (blocking ZEO work in worker threads, see ``recovery.py``), each
step registered in the tracker as a transaction, so that the storages it
concerns publish nothing meanwhile:

* bootstrap: a no-op commit on every storage with a ``zeo`` address, then a
  stamp check of what was committed since the reloaded published point;
  publication starts after it (``BOOTSTRAPED`` answers 1).
* ``LOST`` storages (a client could not get a BEGIN confirmed): frozen at
  once, then re-checked the same way (no-op + stamp check), coalesced.
  Storages without ``zeo`` cannot be re-checked: they stay frozen for
  ``in_doubt_grace`` seconds.
* in-doubt transactions: the connection that sent a BEGIN closed and no
  COMMIT/ABORT came within ``in_doubt_grace`` seconds, or the client sent
  ``INDOUBT``: the daemon looks for the transaction's stamp in its storages.
  Found everywhere: committed with those TIDs; nowhere: aborted; in some:
  *split*. A split stays in flight for ever: nothing linked to it is
  published again; the daemon logs CRITICAL with the repair command.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from . import protocol as p
from .config import Config
from .connection import BulkQueue, Connection
from .tidlog import TidLogWriter, read_log
from .tracker import Publication, Refused, Tracker

log = logging.getLogger("tidstorage.server")

#: Repeated refusals / decreases: at most one log line per key this often.
LOG_INTERVAL = 10.0
LOG_KEYS_MAX = 10000
#: How often the TID log writer checks whether a record is due (seconds).
TICK_SECONDS = 0.2
#: Bootstrap retry backoff: first and longest wait between attempts (seconds).
BOOTSTRAP_RETRY_FIRST = 0.5
BOOTSTRAP_RETRY_MAX = 30.0


@dataclass(frozen=True)
class ListenOptions:
    address: str
    port: int
    auth_token: str | None = None
    ssl_context: ssl.SSLContext | None = None


class Daemon:
    """The daemon's state and behaviour, independent of signals and CLI."""

    def __init__(
        self,
        config: Config,
        *,
        address: str | None = None,
        port: int | None = None,
        status_file: Path | None = None,
    ) -> None:
        self.config = config
        server = config.server
        self.listen = ListenOptions(
            address=address or server.address,
            port=server.port if port is None else port,
            auth_token=config.auth_token(),
            ssl_context=_ssl_context(server.tls_cert, server.tls_key),
        )
        self.status_file = status_file or server.status_file
        initial: dict[str, int] = {}
        if self.status_file is not None:
            contents = read_log(self.status_file)
            initial = contents.final_tids()
            if initial:
                log.info(
                    "reloaded published TIDs of %d storages from %s", len(initial), self.status_file
                )
        self.tracker = Tracker(initial)
        self._state = self.tracker.published_view()
        self.writer: TidLogWriter | None = None
        if self.status_file is not None:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            self.writer = TidLogWriter(
                self.status_file,
                burst_period=server.burst_period,
                full_dump_period=server.full_dump_period,
                initial_state=initial,
            )
        self._specs = self._zeo_specs()
        self.grace = server.in_doubt_grace
        self._owner: dict[str, Connection] = {}  # in-flight txn -> connection that began it
        self._resolving: set[str] = set()
        self._splits: dict[str, str] = {}  # frozen for ever: txn -> description
        self._warned_legacy: set[str] = set()
        self._lost_queue: list[tuple[str, list[str]]] = []
        self._lost_event: asyncio.Event | None = None
        self._bootstrapped_event: asyncio.Event | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self.bulk = BulkQueue()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[Connection] = set()
        self._tick_handle: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()
        self._log_failing = False
        self._limited = RateLimitedLog(log)
        self.port: int | None = None

    # -- life cycle ------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self),
            self.listen.address,
            self.listen.port,
            ssl=self.listen.ssl_context,
            reuse_address=True,
            backlog=4096,
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info(
            "listening on %s:%d%s%s",
            self.listen.address,
            self.port,
            " (TLS)" if self.listen.ssl_context else "",
            " (auth required)" if self.listen.auth_token else "",
        )
        if self.writer is not None:
            self._tick_handle = loop.call_later(TICK_SECONDS, self._tick)
        self._lost_event = asyncio.Event()
        self._bootstrapped_event = asyncio.Event()
        self._spawn(self._bootstrap())
        self._spawn(self._recheck_worker())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed", exc_info=task.exception())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Close the server and every connection, flush and fsync the log."""
        if self._stopped.is_set():
            return
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.writer is not None:
            self._write_log(self.writer.close)
        log.info("stopped; published TIDs: %s", _short(self.tracker.published()))
        self._stopped.set()

    def reopen_logs(self) -> None:
        """SIGHUP: start a new TID log file (with a full record)."""
        if self.writer is not None:
            self._write_log(self.writer.reopen)
            log.info("reopened TID log %s", self.status_file)

    def describe(self) -> str:
        """SIGUSR1: the internal state in a few lines."""
        t = self.tracker
        lines = [
            f"bootstrapped={t.bootstrapped} connections={len(self._connections)}"
            f" in_flight={len(t.in_flight())}",
            f"published={_short(t.published())}",
        ]
        for storages, in_flight, held in t.groups():
            lines.append(f"group {sorted(storages)}: in_flight={in_flight} held={held}")
        for txn, why in self._splits.items():
            lines.append(f"SPLIT {txn}: {why}")
        return "\n".join(lines)

    # -- bootstrap -------------------------------------------------------

    async def _bootstrap(self) -> None:
        specs = self._specs
        if not specs:
            self._set_bootstrapped()
            log.info("bootstrap complete (no storage with a zeo address)")
            return
        log.info("bootstrap started: no-op commit on %s", ", ".join(sorted(specs)))
        txn = self._internal_id("bootstrap")
        self.tracker.begin(txn, list(specs))
        result = await self._with_retries("bootstrap", self._check_call(specs, txn))
        self._freeze_splits(result.splits)
        self._set_bootstrapped()
        self._apply_publication(self.tracker.commit(txn, result.tids, barrier=True))
        log.info(
            "bootstrap complete: %s (%d recent transactions checked%s)",
            _short(result.tids),
            result.scanned,
            f", {len(result.splits)} SPLIT" if result.splits else ", none split",
        )

    def _set_bootstrapped(self) -> None:
        self.tracker.set_bootstrapped()
        self._bootstrapped_event.set()

    def _internal_id(self, what: str) -> str:
        return f"tidstorage-{what}-{next(self._ids)}"

    def _check_call(self, specs: dict, txn: str) -> Callable:
        """A blocking no-op + stamp check over ``specs`` (for a thread)."""
        from .recovery import noop_and_check, scan_start

        published = self.tracker.published_view()
        since = {s: scan_start(published.get(s)) for s in specs}
        return lambda: noop_and_check(specs, since, "ts:" + txn)

    async def _with_retries(self, what: str, call: Callable):
        """Run a blocking recovery call in a thread until it succeeds."""
        delay = BOOTSTRAP_RETRY_FIRST
        attempt = 0
        while True:
            attempt += 1
            try:
                return await _in_thread(call)
            except Exception as exc:  # ZeoUnavailable, storage errors: retry
                log.warning("%s attempt %d failed: %s; retrying in %.1f s", what, attempt, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BOOTSTRAP_RETRY_MAX)

    def _freeze_splits(self, splits) -> None:
        """Keep split transactions in flight for ever (see the module doc)."""
        for split in splits:
            if split.id in self._splits:
                continue
            where = ", ".join(f"{s} (tid {t:#018x})" for s, t in sorted(split.present.items()))
            why = f"recorded in {where}, missing in {', '.join(split.missing)}"
            self._splits[split.id] = why
            if split.id not in self.tracker.in_flight():
                self.tracker.begin(split.id, list(split.storages))
            log.critical(
                "SPLIT transaction %s over %s: %s. Nothing will be published at or past it"
                " on these storages (nor on storages linked to them). Repair: stop the"
                " applications, run `tidstorage repair -c %s`, restart the daemon.",
                split.id,
                ", ".join(split.storages),
                why,
                self.config.path or "CONFIG",
            )

    # -- lost reports ----------------------------------------------------

    def on_lost(self, conn: "Connection", storages: list[str]) -> None:
        """``LOST``: freeze these storages now, re-check them soon."""
        if not storages:
            return
        zeo = sorted(s for s in set(storages) if s in self._specs)
        other = sorted(set(storages) - set(zeo))
        log.warning(
            "%s: reports for storages %s were lost: freezing them until re-checked",
            conn.peer,
            ", ".join(sorted(set(storages))),
        )
        if zeo:
            txn = self._internal_id("recheck")
            self.tracker.begin(txn, zeo)
            self._lost_queue.append((txn, zeo))
            self._lost_event.set()
        if other:
            txn = self._internal_id("freeze")
            self.tracker.begin(txn, other)
            asyncio.get_running_loop().call_later(self.grace, self._end_freeze, txn, other)

    def _end_freeze(self, txn: str, storages: list[str]) -> None:
        log.warning(
            "storages %s have no zeo address and cannot be re-checked; publishing them again"
            " after in_doubt_grace (%g s)",
            ", ".join(storages),
            self.grace,
        )
        self._apply_publication(self.tracker.abort(txn))

    async def _recheck_worker(self) -> None:
        while True:
            await self._lost_event.wait()
            self._lost_event.clear()
            await self._bootstrapped_event.wait()
            batch, self._lost_queue = self._lost_queue, []
            if not batch:
                continue
            storages = sorted({s for _, group in batch for s in group})
            specs = {s: self._specs[s] for s in storages}
            txn = self._internal_id("recheck-noop")
            result = await self._with_retries("re-check", self._check_call(specs, txn))
            self._freeze_splits(result.splits)
            for frozen, group in batch:
                self._apply_publication(
                    self.tracker.commit(frozen, {s: result.tids[s] for s in group}, barrier=True)
                )
            log.info(
                "re-checked storages %s: %d recent transactions, %s",
                ", ".join(storages),
                result.scanned,
                f"{len(result.splits)} SPLIT" if result.splits else "none split",
            )

    # -- in-doubt transactions ---------------------------------------------

    def connection_closed(self, conn: "Connection") -> None:
        if not conn.begun:
            return
        loop = asyncio.get_running_loop()
        for txn in conn.begun:
            if self._owner.get(txn) is conn:
                loop.call_later(self.grace, self.in_doubt, txn, "its client disconnected")

    def in_doubt(self, txn: str, why: str, reported: bool = False) -> None:
        members = self.tracker.in_flight().get(txn)
        if members is None or txn in self._resolving or txn in self._splits:
            return
        owner = self._owner.get(txn)
        if owner is not None and not owner.closing and not reported:
            return  # the connection that began it is still there
        if not txn.startswith("ts:"):
            if txn not in self._warned_legacy:
                self._warned_legacy.add(txn)
                log.error(
                    "transaction %r is in doubt (%s) but was sent by a legacy client: it has"
                    " no stamp to check; storages %s stay blocked until it ends",
                    txn, why, ", ".join(sorted(members)),
                )
            return
        missing = sorted(s for s in members if s not in self._specs)
        if missing:
            log.error(
                "transaction %s is in doubt (%s) but storages %s have no zeo address to"
                " check: its storages stay blocked",
                txn, why, ", ".join(missing),
            )
            return
        self._resolving.add(txn)
        self._spawn(self._resolve(txn, sorted(members), why))

    async def _resolve(self, txn: str, storages: list[str], why: str) -> None:
        from .recovery import locate, scan_start

        try:
            published = self.tracker.published_view()
            since = {s: scan_start(published.get(s)) for s in storages}
            specs = {s: self._specs[s] for s in storages}
            found = await self._with_retries(
                f"in-doubt {txn}", lambda: locate(specs, since, txn)
            )
        finally:
            self._resolving.discard(txn)
        if txn not in self.tracker.in_flight():
            return  # its COMMIT/ABORT came meanwhile
        self._forget_owner(txn)
        if len(found) == len(storages):
            log.warning("in-doubt transaction %s (%s): found in every storage: committed", txn, why)
            self._apply_publication(self.tracker.commit(txn, found))
        elif not found:
            log.warning("in-doubt transaction %s (%s): found in no storage: aborted", txn, why)
            self._apply_publication(self.tracker.abort(txn))
        else:
            from .stamps import Split

            self._freeze_splits([Split(
                id=txn, storages=tuple(storages), present=found,
                missing=tuple(s for s in storages if s not in found), unknown=(),
            )])

    def _forget_owner(self, txn: str) -> None:
        owner = self._owner.pop(txn, None)
        if owner is not None:
            owner.begun.discard(txn)

    def _zeo_specs(self) -> dict:
        from .zeo import ZeoSpec, parse_address

        return {
            s.id: ZeoSpec(parse_address(s.zeo), s.zeo_storage)
            for s in self.config.storages.values()
            if s.zeo
        }

    # -- commands --------------------------------------------------------

    def _tick(self) -> None:
        self._write_log(self.writer.tick)
        self._tick_handle = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)

    def _write_log(self, action: Callable, *args) -> None:
        """Run a TID log write; log a failure once, and the recovery once.

        The writer keeps what it could not write and retries at each tick,
        so a full disk delays records but loses none.
        """
        try:
            action(*args)
        except OSError as exc:
            if not self._log_failing:
                self._log_failing = True
                log.error("cannot write the TID log %s: %s (will retry)", self.status_file, exc)
            return
        if self._log_failing:
            self._log_failing = False
            log.warning("writing the TID log %s works again", self.status_file)

    def _apply_publication(self, pub: Publication, changed: dict | None = None) -> None:
        """Log refused decreases; record what moved (in ``changed`` when the
        caller batches, else in the TID log writer at once)."""
        if pub.decreases:
            for storage, tid, old in pub.decreases:
                self._limited.log(
                    logging.CRITICAL,
                    f"decrease {storage}",
                    "Decreasing update ignored: storage %r tid %d < published %d"
                    " (a backup taken now may hold part of a transaction)",
                    storage,
                    tid,
                    old,
                )
        if pub.published and self.writer is not None:
            if changed is not None:
                changed.update(pub.published)
            else:
                self._write_log(self.writer.published, pub.published, self._state)

    def apply(self, conn: "Connection", events: list[tuple]) -> bytes:
        """Apply decoded commands from one connection; return the replies."""
        changed: dict[str, int] = {}  # published TIDs moved by these events
        try:
            return self._apply(conn, events, changed)
        finally:
            if changed:  # one call to the TID log writer per read, not per commit
                self._write_log(self.writer.published, changed, self._state)

    def _apply(self, conn: "Connection", events: list[tuple], changed: dict) -> bytes:
        tracker = self.tracker
        owners = self._owner
        replies: list[bytes] = []
        for event in events:
            kind = event[0]
            try:
                if kind is p.COMMIT:
                    pub = tracker.commit(event[1], event[2])
                    owner = owners.pop(event[1], None)
                    if owner is not None:
                        owner.begun.discard(event[1])
                    if pub.published or pub.decreases:
                        self._apply_publication(pub, changed)
                elif kind is p.BEGIN:
                    tracker.begin(event[1], event[2], event[3])
                    owners[event[1]] = conn
                    conn.begun.add(event[1])
                elif kind is p.ABORT:
                    pub = tracker.abort(event[1])
                    owner = owners.pop(event[1], None)
                    if owner is not None:
                        owner.begun.discard(event[1])
                    if pub.published or pub.decreases:
                        self._apply_publication(pub, changed)
                elif kind is p.DUMP:
                    replies.append(p.encode_dict(self._state))
                elif kind is p.SYNC:
                    replies.append(b"1\n")
                elif kind is p.BOOTSTRAPED:
                    replies.append(b"1\n" if tracker.bootstrapped else b"0\n")
                elif kind is p.QUIT:
                    conn.close_after(replies)
                    return b""
                elif kind is p.ERROR:
                    log.error("%s: protocol error: %s; closing the connection", conn.peer, event[1])
                    conn.close_after(replies)
                    return b""
                elif kind is p.LOST:
                    self.on_lost(conn, event[1])
                elif kind is p.INDOUBT:
                    self.in_doubt(event[1], "its client reported it", reported=True)
                elif kind is p.AUTH:
                    # A repeated AUTH on an authenticated connection is harmless.
                    replies.append(b"1\n")
            except Refused as exc:
                self._limited.log(logging.ERROR, f"refused {conn.peer} {exc.reason}", "%s: refused: %s",
                                  conn.peer, exc)
        return b"".join(replies)

    def check_auth(self, conn: "Connection", events: list[tuple]) -> list[tuple] | None:
        """Authenticate ``conn`` from its first event; None if it failed."""
        first = events[0]
        token = self.listen.auth_token
        if first[0] is p.AUTH and hmac.compare_digest(first[1].encode(), token.encode()):
            conn.authenticated = True
            conn.write(b"1\n")
            return events[1:]
        what = "wrong token" if first[0] is p.AUTH else f"{first[0]} before AUTH"
        log.error("%s: authentication failed (%s); closing the connection", conn.peer, what)
        conn.close()
        return None


class RateLimitedLog:
    """At most one line per key per :data:`LOG_INTERVAL`; the lines held back
    are counted and reported with the next one, so a misbehaving client
    cannot flood the log (one line per state change, not per commit)."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
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


def _ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def _in_thread(func: Callable, *args):
    """Run a blocking call in a daemon thread (never delays shutdown)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run() -> None:
        result = exc = None
        try:
            result = func(*args)
        except BaseException as e:  # delivered to the awaiting task
            exc = e
        try:
            loop.call_soon_threadsafe(_settle, future, result, exc)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    threading.Thread(target=run, name="tidstorage-bootstrap", daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result, exc) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _short(tids: Mapping[str, int], limit: int = 8) -> str:
    items = sorted(tids.items())
    text = ", ".join(f"{k}={v:#x}" for k, v in items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items)} storages)"
    return "{" + text + "}"
