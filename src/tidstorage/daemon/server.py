"""The coherency daemon: an asyncio shell around the coordinator.

Every decision is in ``coordinator.py`` (with the tracker and the gate); this
module only moves bytes and runs I/O:

* one event loop serves every connection (``asyncio.Protocol``: large reads,
  no thread per connection; when received bytes are applied is decided in
  ``connection.py``); decoded commands go to the coordinator, replies are
  written in one write per read;
* the coordinator's actions are carried out here: reads of the storages
  (``scanners.py``: one worker thread per readable storage), no-op commits
  and lock-owner checks (worker threads), timers (``loop.call_later``) and
  publications (the TID log writer, with its burst / full-dump periods).

Worker threads are daemon threads: a ZEO server that does not answer never
delays shutdown.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import queue
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import Config, ConfigError
from ..core import coordinator as co
from ..core import protocol as p
from ..core.coordinator import LOG_INTERVAL, RateLimitedLog  # noqa: F401  (re-exported)
from ..core.tids import tid_at, tid_seconds
from ..formats.durable import fsync_dir
from ..formats.tidlog import TidLogWriter, read_log
from .connection import BulkQueue, Connection

log = logging.getLogger("tidstorage.server")

#: How often the TID log writer checks whether a record is due (seconds).
TICK_SECONDS = 0.2
#: How long a no-op commit may wait to connect to its ZEO servers (seconds).
NOOP_CONNECT_TIMEOUT = 10.0

# Budgets: what peers can make the daemon hold, whatever they send. With
# these, its memory stays below about MAX_CONNECTIONS x (WRITE_HIGH_WATER +
# a batch of replies) + MAX_REPLY_BYTES, and strangers cost MAX_UNAUTHENTICATED
# x MAX_PREAUTH_BYTES.
#: Most client connections at once (application processes hold one or two
#: each; beyond this, new connections are closed at once).
MAX_CONNECTIONS = 4096
#: Most connections that have not authenticated yet (when a token is set).
MAX_UNAUTHENTICATED = 256
#: An unauthenticated connection is closed after this long (seconds).
UNAUTHENTICATED_IDLE = 10.0
#: A failed AUTH closes its connection after this delay (seconds): guessing
#: costs MAX_UNAUTHENTICATED tries per delay at most.
AUTH_FAILURE_DELAY = 1.0
#: Most reply bytes waiting in the buffers of peers that do not read them;
#: beyond this, commands with replies wait (DUMP floods).
MAX_REPLY_BYTES = 64 * 1024 * 1024
#: Accept queue of the listening socket.
BACKLOG = 1024
#: Bytes of the TID log per ADMIN ``tidlog`` answer: base64 makes them 4/3
#: as many, under ``protocol.MAX_ADMIN_REPLY_BYTES`` (4 MiB) with the JSON
TIDLOG_PAGE = 2 * 1024 * 1024


@dataclass(frozen=True)
class ListenOptions:
    address: str
    port: int
    auth_token: str | None = None
    ssl_context: ssl.SSLContext | None = None


class _Worker:
    """A daemon thread running blocking calls one at a time."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, func: Callable, done: Callable) -> None:
        self._queue.put((func, done))

    def _run(self) -> None:
        while True:
            func, done = self._queue.get()
            try:
                result, error = func(), None
            except Exception as exc:  # delivered to the loop
                result, error = None, exc
            try:
                self._loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop has closed: nobody waits any more
                return


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
        accepted: set[str] = set()
        if self.status_file is not None:
            contents = read_log(self.status_file)
            initial = contents.final_tids()
            accepted = contents.accepted()
            if initial:
                log.info(
                    "reloaded published TIDs of %d storages from %s", len(initial), self.status_file
                )
            if config.storages:
                foreign = sorted(set(initial) - set(config.storages))
                if foreign:
                    # A storage removed from the config, or ids a forger made
                    # the old daemon publish: not published by this one.
                    log.warning("the TID log names %d storage ids that are not configured (%s):"
                                " not published any more", len(foreign), co._names(foreign))
                    initial = {s: t for s, t in initial.items() if s in config.storages}
            if len(initial) > p.MAX_STORAGES:
                raise ConfigError(
                    f"{self.status_file}: the TID log names {len(initial)} storage ids, more than"
                    f" the {p.MAX_STORAGES} the daemon publishes (protocol.MAX_STORAGES):"
                    " configure [storages], or start a new TID log")
        from ..core.addresses import parse_zeo_address
        from .zeo import ZeoSpec

        kinds: dict[str, str | None] = {}
        self._readers: dict[str, object] = {}
        self._zeo_specs: dict[str, ZeoSpec] = {}
        self._files: dict[str, Path] = {}
        from .scanners import FileReader, ZeoReader

        for sid, st in config.storages.items():
            if st.zeo:
                spec = self._zeo_specs[sid] = ZeoSpec(parse_zeo_address(st.zeo), st.zeo_storage)
                self._readers[sid] = ZeoReader(sid, spec)
                kinds[sid] = "zeo"
            elif st.data_fs is not None:
                self._readers[sid] = FileReader(sid, st.data_fs)
                kinds[sid] = "file"
            else:
                kinds[sid] = None
            if st.data_fs is not None:
                self._files[sid] = st.data_fs
        self.daemon_id = uuid.uuid4().hex[:16]
        ahead = server.max_tid_ahead

        def tid_ceiling(last: int) -> int:
            # the later of the daemon's clock and the storage's own last TID
            # (its clock may run ahead), plus the allowed jump
            now = time.time()
            base = max(now, tid_seconds(last)) if last >= 0 else now
            return tid_at(base + ahead)

        self.core = co.Coordinator(
            kinds, initial, clock=time.monotonic, daemon_id=self.daemon_id,
            host=socket.gethostname(), grace=server.in_doubt_grace,
            config_name=str(config.path) if config.path else "CONFIG",
            legacy_clients=server.legacy_clients, tid_ceiling=tid_ceiling,
            admin_token=config.admin_token(), rewrite_log=self._rewrite_log,
            shell_status=self._shell_status, record_accept=self._record_accept,
            accepted=accepted,
            read_tidlog=self._read_tidlog if self.status_file is not None else None)
        if not kinds:
            log.warning("no [storages] in the configuration: any storage id is accepted and"
                        " the daemon cannot read any storage (legacy mode)")
        self.writer: TidLogWriter | None = None
        if self.status_file is not None:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            self.writer = TidLogWriter(
                self.status_file,
                burst_period=server.burst_period,
                full_dump_period=server.full_dump_period,
                initial_state=initial,
                accepted=sorted(accepted),
            )
        self.bulk = BulkQueue()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[Connection] = set()
        self._tick_handle: asyncio.TimerHandle | None = None
        self._write_paused: set[Connection] = set()
        self._waiting_replies: set[Connection] = set()
        #: connections that have not authenticated yet
        self._strangers: set[Connection] = set()
        self._limited = co.RateLimitedLog(log, time.monotonic)
        self._timers: dict[tuple, asyncio.TimerHandle] = {}
        self._workers: dict[str, _Worker] = {}
        self._stopped = asyncio.Event()
        self._log_failing = False
        #: the process's exit status (1 if the TID log could not be completed)
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self.metrics = None
        if server.metrics_address is not None:
            from .metrics import Metrics

            self.metrics = Metrics()

    @property
    def tracker(self):
        return self.core.tracker

    # -- life cycle ------------------------------------------------------

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self, self.bulk, auth_required=self.listen.auth_token is not None,
                               auth_failure_delay=AUTH_FAILURE_DELAY),
            self.listen.address,
            self.listen.port,
            ssl=self.listen.ssl_context,
            reuse_address=True,
            backlog=BACKLOG,
        )
        loop.set_exception_handler(self._loop_error)
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
        for sid in self._readers:
            self._workers[sid] = _Worker(f"tidstorage-read-{sid}"[:60], loop)
        self._workers[""] = _Worker("tidstorage-owners", loop)
        self.core.start()
        self.run_actions()
        if self.metrics is not None:
            try:
                self.metrics.start(self.config.server.metrics_address, self.full_status, loop)
            except OSError as exc:
                await self.stop()
                host, port = self.config.server.metrics_address
                raise ConfigError(f"server.metrics_address: cannot listen on {host}:{port}:"
                                  f" {exc.strerror or exc}") from None

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
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as exc:
                self.exit_code = 1
                log.error(
                    "stopping: could not write the last published TIDs to the TID log %s"
                    " (%s: %s): it lacks %s; a restart serves the older point it holds",
                    self.status_file, type(exc).__name__, exc,
                    co._short(self.writer.unwritten or self.core.published()))
        for reader in self._readers.values():
            reader.close()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("stopped; published TIDs: %s", co._short(self.core.published()))
        self._stopped.set()

    def _rewrite_log(self, state: dict[str, int]) -> str | None:
        """Start a new TID log holding ``state`` (an operator's correction:
        the log's records only move up, so a lower TID needs a new file);
        the old file is kept beside it. Returns its new name."""
        if self.writer is None:
            return None
        path = Path(self.status_file)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = path.with_name(f"{path.name}.before-correction-{stamp}")
        n = 1
        while kept.exists():  # never replace an older kept log
            n += 1
            kept = path.with_name(f"{path.name}.before-correction-{stamp}-{n}")
        fresh = path.with_name(f"{path.name}.new")
        server = self.config.server
        try:
            fresh.unlink(missing_ok=True)
            with TidLogWriter(fresh, burst_period=server.burst_period,
                              full_dump_period=server.full_dump_period,
                              initial_state=state) as new:
                for split in sorted(self.core.gate.accepted):  # they go with the new file
                    new.accept(split)
                new.write_full()
        except BaseException:
            fresh.unlink(missing_ok=True)
            raise
        self.writer.close()
        if path.exists():
            os.replace(path, kept)
        os.replace(fresh, path)
        fsync_dir(path.parent)
        self.writer = TidLogWriter(path, burst_period=server.burst_period,
                                   full_dump_period=server.full_dump_period,
                                   initial_state=state,
                                   accepted=sorted(self.core.gate.accepted))
        return str(kept)

    def _record_accept(self, split: str) -> None:
        """An accepted split, in the TID log (fsync'd) before it counts."""
        if self.writer is None:
            log.warning("accepting split %s without a TID log (no status_file): a restarted"
                        " daemon will not know it", split)
            return
        self.writer.accept(split)

    def _read_tidlog(self, offset: int) -> dict:
        """A page of the TID log (ADMIN ``tidlog``): at most
        :data:`TIDLOG_PAGE` bytes from ``offset``, base64 (so that the
        JSON answer stays under ``protocol.MAX_ADMIN_REPLY_BYTES``), with
        the file's size and identity (a backup starts again if the file
        was replaced between pages: SIGHUP, an operator's correction)."""
        import base64

        with open(self.status_file, "rb") as f:
            st = os.fstat(f.fileno())
            f.seek(offset)
            data = f.read(TIDLOG_PAGE)
        return {"offset": offset, "size": st.st_size, "file": f"{st.st_dev}:{st.st_ino}",
                "data": base64.b64encode(data).decode("ascii")}

    def full_status(self) -> dict:
        """The status command's answer (on the event loop)."""
        return {**self.core.status(), **self._shell_status()}

    def _shell_status(self) -> dict:
        """The TID log and the connections, for the status command."""
        tidlog = None
        if self.writer is not None:
            last = self.writer.last_record_time
            tidlog = {
                "path": str(self.status_file),
                "last_record_age": None if last is None else max(0.0, time.time() - last),
                "unwritten": len(self.writer.unwritten),
                "failing": self._log_failing,
            }
        return {"tidlog": tidlog, "connections": len(self._connections)}

    def reopen_logs(self) -> None:
        """SIGHUP: start a new TID log file (with a full record).

        If that fails, the old file stays in use (and the timer runs on)."""
        if self.writer is None:
            return
        try:
            self.writer.reopen()
        except Exception as exc:  # a bad path, a full disk, a permission...
            log.error("cannot reopen the TID log %s (%s: %s): still writing to the file"
                      " that was open", self.status_file, type(exc).__name__, exc)
            return
        log.info("reopened TID log %s", self.status_file)

    def describe(self) -> str:
        """SIGUSR1: the internal state in a few lines."""
        return f"connections={len(self._connections)} " + self.core.describe()

    # -- actions ---------------------------------------------------------

    def run_actions(self) -> None:
        """Carry out what the coordinator asks for (after every input)."""
        core = self.core
        for action in core.take_actions():
            kind = type(action)
            if kind is co.Publish:
                if self.writer is not None:
                    self._write_log(self.writer.published, action.changes, core.published())
            elif kind is co.Scan:
                self._scan(action)
            elif kind is co.SetTimer:
                self._set_timer(action.key, action.delay)
            elif kind is co.Noop:
                self._noop(action)
            elif kind is co.CheckOwner:
                self._check_owner(action)

    def _scan(self, action: co.Scan) -> None:
        reader = self._readers[action.storage]

        def done(result, error) -> None:
            if error is not None:
                self.core.scan_result(action.storage, action.seq, None, error=str(error))
            else:
                records, more = result
                self.core.scan_result(action.storage, action.seq, records, more=more)
            self.run_actions()

        self._workers[action.storage].submit(lambda: reader.read(action.since), done)

    def _noop(self, action: co.Noop) -> None:
        from .zeo import commit_noop

        specs = {s: self._zeo_specs[s] for s in action.storages}
        loop = self._loop

        def run() -> None:
            try:
                result, error = commit_noop(specs, NOOP_CONNECT_TIMEOUT,
                                            coherency_id=action.coherency_id or None), None
            except Exception as exc:
                result, error = None, f"{type(exc).__name__}: {exc}"
            try:
                loop.call_soon_threadsafe(self._noop_done, action, result, error)
            except RuntimeError:
                pass

        threading.Thread(target=run, name="tidstorage-noop", daemon=True).start()

    def _noop_done(self, action: co.Noop, result, error) -> None:
        self.core.noop_result(action.request, result, error=error)
        self.run_actions()

    def _check_owner(self, action: co.CheckOwner) -> None:
        from .scanners import lock_owner

        path = self._files[action.storage]

        def done(result, error) -> None:
            if error is not None:
                log.warning("cannot check who writes %s: %s", path, error)
                result = co.OwnerInfo(0, alive=True, ident="unknown")  # not proven: retried
            self.core.owner_result(action.request, result)
            self.run_actions()

        self._workers[""].submit(lambda: lock_owner(path), done)

    def _set_timer(self, key: tuple, delay: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._timers[key] = self._loop.call_later(delay, self._fire, key)

    def _fire(self, key: tuple) -> None:
        self._timers.pop(key, None)
        self.core.timer(key)
        self.run_actions()

    # -- the TID log -------------------------------------------------------

    def _tick(self) -> None:
        try:
            self._write_log(self.writer.tick)
        finally:  # whatever happens, the next tick comes
            self._tick_handle = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)

    def _write_log(self, action: Callable, *args) -> None:
        """Run a TID log write; log a failure once, and the recovery once.

        The writer keeps what it could not write and retries at each tick,
        so a full disk delays records but loses none.
        """
        writer = self.writer
        before = writer.last_record_time
        start = time.perf_counter()
        try:
            action(*args)
            if self.metrics is not None and writer.last_record_time != before:
                self.metrics.tidlog_write.observe(time.perf_counter() - start)
        except Exception as exc:  # OSError mostly; anything else is reported too
            if not self._log_failing:
                self._log_failing = True
                log.error("cannot write the TID log %s: %s: %s (will retry)", self.status_file,
                          type(exc).__name__, exc)
            return
        if self._log_failing:
            self._log_failing = False
            log.warning("writing the TID log %s works again", self.status_file)

    # -- connections -------------------------------------------------------

    def _loop_error(self, loop, context: dict) -> None:
        """asyncio's own errors (accept() out of file descriptors...), at
        most one line per kind per interval."""
        message = context.get("message", "asyncio error")
        exc = context.get("exception")
        key = f"loop {message} {type(exc).__name__ if exc else ''}"
        self._limited.log(logging.ERROR, key, "%s%s", message, f": {exc!r}" if exc else "")

    # The connections' Handler (see connection.py).

    def accept(self, conn: Connection) -> bool:
        full = len(self._connections) >= MAX_CONNECTIONS
        strangers = not conn.authenticated and len(self._strangers) >= MAX_UNAUTHENTICATED
        if full or strangers:
            self._limited.log(logging.WARNING, "connection cap",
                              "%s: refused: %s", conn.peer.name,
                              f"{MAX_CONNECTIONS} connections already (MAX_CONNECTIONS)" if full
                              else f"{MAX_UNAUTHENTICATED} unauthenticated connections already"
                              " (MAX_UNAUTHENTICATED)")
            return False
        self._connections.add(conn)
        if not conn.authenticated:
            self._strangers.add(conn)
            self._loop.call_later(UNAUTHENTICATED_IDLE, self._auth_deadline, conn)
        return True

    def _auth_deadline(self, conn: Connection) -> None:
        if not conn.authenticated and not conn.closing:
            self.refuse(conn, f"no AUTH within {UNAUTHENTICATED_IDLE:g} s")

    def refuse(self, conn: Connection, why: str) -> None:
        """Close an unauthenticated connection that broke a budget."""
        self._limited.log(logging.WARNING, f"refuse {why[:20]}", "%s: closed: %s",
                          conn.peer.name, why)
        conn.close()

    def closed(self, conn: Connection) -> None:
        if conn not in self._connections:
            return  # refused at once
        self._connections.discard(conn)
        self._strangers.discard(conn)
        self.writer_paused(conn, False)
        self._waiting_replies.discard(conn)
        self.core.connection_closed(conn.peer)
        self.run_actions()

    def writer_paused(self, conn: Connection, paused: bool) -> None:
        if paused:
            self._write_paused.add(conn)
            return
        self._write_paused.discard(conn)
        if self._waiting_replies and not self._reply_pressure():
            waiting, self._waiting_replies = self._waiting_replies, set()
            for other in waiting:
                if not other.closing:
                    self._loop.call_soon(other.run_events)

    def _reply_pressure(self) -> bool:
        total = 0
        for conn in self._write_paused:
            total += conn.buffered()
            if total > MAX_REPLY_BYTES:
                return True
        return False

    def must_wait(self, conn: Connection) -> bool:
        """Must ``conn``'s commands wait (too many replies not read)?"""
        if len(self._write_paused) * 256 * 1024 < MAX_REPLY_BYTES or not self._reply_pressure():
            return False
        self._waiting_replies.add(conn)
        return True

    def apply(self, conn: Connection, events: list[tuple]) -> bytes:
        """Apply decoded commands from one connection; return the replies."""
        error = None
        if events[-1][0] is p.ERROR:
            error = events.pop()[1]
        out = self.core.apply(conn.peer, events) if events else b""
        self.run_actions()
        if error is not None:
            log.error("%s: protocol error: %s; closing the connection", conn.peer.name, error)
            conn.close_after([out] if out else [])
            return b""
        if conn.peer.quit:
            conn.close_after([out] if out else [])
            return b""
        return out

    def authenticate(self, conn: Connection, event: tuple) -> bool:
        """Is ``event`` (the first command of ``conn``) the right AUTH?"""
        token = self.listen.auth_token
        if event[0] is p.AUTH and hmac.compare_digest(event[1].encode(), token.encode()):
            self._strangers.discard(conn)
            return True
        what = "wrong token" if event[0] is p.AUTH else f"{event[0]} before AUTH"
        self._limited.log(logging.ERROR, "auth failed",
                          "%s: authentication failed (%s); closing the connection in %g s",
                          conn.peer.name, what, AUTH_FAILURE_DELAY)
        return False


def _ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx
