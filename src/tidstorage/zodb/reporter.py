"""The application side of the protocol: report commits, never fail them.

A threaded socket shell around :class:`~.session.ClientSession` (the rules
are there). One :class:`Reporter` per daemon per process, shared by every
wrapped storage and every thread (:func:`get_reporter`):

* the commit path calls :meth:`Reporter.begin` when a multi-storage commit
  is sealed and :meth:`Reporter.confirm` before its first ``tpc_finish``;
  ``confirm`` waits at most ``timeout`` for the daemon to register the
  transaction, and only when connected: the daemon down, slow or gone costs
  at most ``timeout`` once (a confirmation that does not come in time drops
  the connection), and until a background thread has reconnected nothing
  waits at all;
* ``COMMIT``/``ABORT``/single-storage reports are batched: they go out with
  the next ``BEGIN`` or within :data:`FLUSH_DELAY`, followed by a ``SYNC``
  whose reply acknowledges them (unacknowledged reports are sent again on
  the next connection); ``INDOUBT`` goes at once;
* every connection starts with ``HELLO`` and re-declares what is in flight
  (``session.py``); two configured addresses that reach the same daemon
  (the daemon's id learnt in the handshake, not DNS) share one connection:
  the second reporter becomes an alias of the first, and the longer of
  their timeouts is used;
* :meth:`Reporter.close` (when the last wrapped storage using it closes, and
  at interpreter exit) sends what is batched, then ``QUIT``, bounded by
  ``timeout``; a forked child gets fresh reporters (``os.register_at_fork``).
* Nothing here raises into the application; one log line when the daemon is
  lost, one when it is back.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from typing import Iterable, Mapping

from ..core import protocol as p
from ..core.backoff import Backoff
from ..core.session import ClientSession
from ..daemon.client import open_socket

log = logging.getLogger("tidstorage.reporter")

DEFAULT_TIMEOUT = 1.0
#: Reconnection backoff: first and longest wait between attempts (seconds).
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 2.0
#: Longest delay of a batched fire-and-forget report (seconds).
FLUSH_DELAY = 0.01


class Reporter:
    def __init__(
        self,
        address: tuple[str, int],
        *,
        auth_token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._ssl = ssl_context
        self._pid = os.getpid()
        self.session = ClientSession(pid=self._pid, host=socket.gethostname(),
                                     auth_token=auth_token)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sock: socket.socket | None = None
        self._first_attempt = threading.Event()
        self._was_up = False
        self._down_logged = False
        self._closed = False
        self._users = 0
        #: set when another reporter reaches the same daemon: use that one
        self.alias_of: Reporter | None = None
        self._flush_wanted = threading.Event()
        self._wake = threading.Event()
        name = f"{address[0]}:{address[1]}"
        self._thread = threading.Thread(target=self._run, name=f"tidstorage-reporter-{name}",
                                         daemon=True)
        self._flusher = threading.Thread(target=self._flush_loop,
                                         name=f"tidstorage-flush-{name}", daemon=True)
        _all.add(self)
        self._thread.start()
        self._flusher.start()

    # -- the application's side -------------------------------------------

    @property
    def connected(self) -> bool:
        return self.target()._sock is not None

    def target(self) -> "Reporter":
        """The reporter that really talks to this daemon (see aliases)."""
        reporter = self
        while reporter.alias_of is not None:
            reporter = reporter.alias_of
        return reporter

    def begin(self, txn: str, storages: Iterable[str], bounds: Mapping[str, int]) -> None:
        self._wait_first_attempt()
        with self._lock:
            self._send_locked(self.session.begin(txn, storages, bounds))

    def confirm(self, txn: str) -> bool:
        """Wait (at most ``timeout``) until the daemon now connected has
        registered ``txn``; False at once when there is no connection."""
        deadline = time.monotonic() + self.timeout
        with self._lock:
            while True:
                state = self.session.confirmation(txn)
                if state is not None:
                    return state
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._drop_locked(f"no confirmation within {self.timeout:g} s")
                    return False
                self._changed.wait(remaining)

    def finished(self, txn: str, storage: str, tid: int) -> None:
        with self._lock:
            self.session.finished(txn, storage, tid)

    def ended(self, txn: str, outcome: str, tids: Mapping[str, int] | None = None) -> None:
        """``"commit"`` (with ``tids``), ``"abort"`` or ``"indoubt"``."""
        with self._lock:
            self._send_locked(self.session.ended(txn, outcome, tids))
            wanted = self.session.has_pending
        if wanted:
            self._flush_wanted.set()

    def single(self, txn: str, storage: str, tid: int) -> None:
        with self._lock:
            self.session.single(txn, storage, tid)
            wanted = self.session.has_pending
        if wanted:
            self._flush_wanted.set()

    def flush(self) -> None:
        """Send the batched reports now."""
        with self._lock:
            self._send_locked(self.session.flush())

    def acquire(self) -> "Reporter":
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        """A wrapped storage using this reporter closed; the last one closes it."""
        with self._lock:
            self._users -= 1
            last = self._users <= 0
        if last:
            self.close()

    def close(self) -> None:
        """Send what is batched, then QUIT (bounded by ``timeout``); stop."""
        if os.getpid() != self._pid:
            return  # a forked child never touches its parent's connection
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sock = self._sock
            if sock is not None:
                data = self.session.close()
                try:
                    sock.settimeout(self.timeout)
                    if data:
                        sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self._sock = None
                try:
                    sock.close()
                except OSError:
                    pass
            self._changed.notify_all()
        self._wake.set()
        self._flush_wanted.set()

    # -- plumbing ---------------------------------------------------------

    def _wait_first_attempt(self) -> None:
        if self._sock is None and not self._first_attempt.is_set():
            # Only at process start: give the first connection a chance.
            self._first_attempt.wait(self.timeout)

    def _flush_loop(self) -> None:
        while not self._closed:
            self._flush_wanted.wait()
            self._flush_wanted.clear()
            if self._closed:
                return
            time.sleep(FLUSH_DELAY)
            self.flush()

    def _send_locked(self, data: bytes | None) -> None:
        if not data or self._sock is None:
            return
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self._drop_locked(f"send failed: {exc}")

    def _drop_locked(self, reason: str | None) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
            if reason is not None and not self._down_logged:
                self._down_logged = True
                log.warning(
                    "lost the tidstorage daemon at %s:%d (%s); commits go on without"
                    " waiting, reconnecting in the background", *self.address, reason)
        if self.session.connected:
            self.session.detached()
        self._changed.notify_all()
        self._wake.set()

    def _connect(self) -> tuple[socket.socket, str]:
        sock = open_socket(self.address, self.timeout, self._ssl)
        try:
            with self._lock:
                hello = self.session.handshake()
            sock.sendall(hello)
            reader = p.ReplyReader()
            if self.session.auth_token is not None:
                while (value := reader.read_int()) is None:
                    self._recv_into(sock, reader)
                if value != 1:
                    raise ConnectionError(f"authentication refused (reply {value})")
            while (daemon_id := reader.read_field()) is None:
                self._recv_into(sock, reader)
            if daemon_id == "-":
                raise ConnectionError("the daemon refused this session")
            return sock, daemon_id
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _recv_into(sock: socket.socket, reader: p.ReplyReader) -> None:
        data = sock.recv(p.RECV_BYTES)
        if not data:
            raise ConnectionError("the daemon closed the connection (authentication refused?)")
        reader.feed(data)

    def _become_alias(self, primary: "Reporter", sock: socket.socket) -> None:
        log.info("tidstorage: %s:%d reaches the same daemon as %s:%d: one connection for"
                 " both", *self.address, *primary.address)
        try:
            sock.sendall(p.QUIT_REQUEST)
            sock.close()
        except OSError:
            pass
        with primary._lock:
            primary.timeout = max(primary.timeout, self.timeout)
        with self._lock:
            self.alias_of = primary
            self._closed = True
            self._changed.notify_all()
        self._first_attempt.set()
        self._flush_wanted.set()

    def _run(self) -> None:
        backoff = Backoff(RECONNECT_FIRST, RECONNECT_MAX)
        while not self._closed:
            try:
                sock, daemon_id = self._connect()
            except (OSError, ConnectionError, p.ProtocolError) as exc:
                self._first_attempt.set()
                if not self._down_logged:
                    self._down_logged = True
                    log.warning(
                        "cannot reach the tidstorage daemon at %s:%d (%s); commits go on"
                        " without waiting, retrying in the background", *self.address, exc)
                self._wake.wait(backoff.next())
                self._wake.clear()
                continue
            primary = _claim(daemon_id, self)
            if primary is not self:
                self._become_alias(primary, sock)
                return
            backoff.reset()
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._sock = sock  # its timeout bounds every send
                self._send_locked(self.session.attached(daemon_id))
                self._changed.notify_all()
            self._first_attempt.set()
            if self._down_logged or self._was_up:
                log.warning("the tidstorage daemon at %s:%d is back", *self.address)
            self._down_logged = False
            self._was_up = True
            self._read(sock)

    def _read(self, sock: socket.socket) -> None:
        """Settle confirmations from SYNC replies until the connection ends."""
        reader = p.ReplyReader()
        while True:
            try:
                data = sock.recv(p.RECV_BYTES)
            except TimeoutError:
                if self._sock is not sock:
                    return
                continue
            except OSError as exc:
                with self._lock:
                    if self._sock is sock:
                        self._drop_locked(f"receive failed: {exc}")
                return
            if not data:
                with self._lock:
                    if self._sock is sock:
                        self._drop_locked("the daemon closed the connection")
                return
            with self._lock:
                if self._sock is not sock:
                    return
                try:
                    reader.feed(data)
                    while (value := reader.read_int()) is not None:
                        self.session.reply(value)
                except p.ProtocolError as exc:
                    self._drop_locked(f"bad reply: {exc}")
                    return
                self._changed.notify_all()


# -- one reporter per daemon ------------------------------------------------------

_reporters: dict[tuple, Reporter] = {}
_by_daemon: dict[str, Reporter] = {}
_reporters_lock = threading.Lock()
_all: "weakref.WeakSet[Reporter]" = weakref.WeakSet()


def _claim(daemon_id: str, reporter: Reporter) -> Reporter:
    """The live reporter for this daemon id (``reporter`` if it is the first)."""
    with _reporters_lock:
        primary = _by_daemon.get(daemon_id)
        if primary is None or primary._closed or primary is reporter:
            # Forget what an earlier daemon process was known as.
            for key in [k for k, r in _by_daemon.items() if r is reporter]:
                del _by_daemon[key]
            _by_daemon[daemon_id] = reporter
            return reporter
        return primary


def get_reporter(
    address: tuple[str, int], *, auth_token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> Reporter:
    """The process-wide reporter for this daemon address (created once).

    With several timeouts for one address, the longest wins (it is the
    longest the application accepts to wait)."""
    key = (tuple(address), auth_token)
    with _reporters_lock:
        reporter = _reporters.get(key)
        if reporter is None or reporter._closed and reporter.alias_of is None:
            reporter = _reporters[key] = Reporter(address, auth_token=auth_token,
                                                  timeout=timeout, ssl_context=ssl_context)
        elif timeout > reporter.timeout:
            reporter.timeout = timeout
        return reporter


def close_all() -> None:
    """Close every reporter of this process (at interpreter exit)."""
    for reporter in list(_all):
        try:
            reporter.close()
        except Exception:  # pragma: no cover - never fail an exit
            log.debug("closing a reporter at exit", exc_info=True)


def _after_fork_in_child() -> None:
    global _reporters_lock
    _reporters_lock = threading.Lock()
    _reporters.clear()
    _by_daemon.clear()
    for reporter in list(_all):
        reporter._closed = True  # its threads do not exist here
    _all.clear()


atexit.register(close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
