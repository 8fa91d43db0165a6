"""The application side of the protocol: report commits, never fail them.

One :class:`Reporter` per daemon address per process, shared by every
wrapped storage and every thread (:func:`get_reporter`). Contract:

* ``begin(txn, storages)`` sends ``BEGIN`` + ``SYNC`` at once and returns a
  ticket; ``confirm(ticket)`` waits for the ``SYNC`` reply, which proves the
  daemon has registered the transaction. The storage wrapper calls it before
  the first ``tpc_finish``.
* ``commit``/``abort``/``single`` are fire-and-forget and batched: they go
  out with the next ``BEGIN`` or within :data:`FLUSH_DELAY` (one send, one
  daemon wake-up for many reports; publication is delayed that much at
  most). ``in_doubt`` is sent at once.
* Nothing here raises into the application. The daemon down, slow or gone
  mid-commit costs at most ``timeout`` seconds once: a confirmation that
  does not come in time drops the connection, and until a background thread
  has reconnected nothing waits at all.
* A multi-storage transaction whose BEGIN could not be confirmed is a *lost
  report*: the daemon may have published a point in the middle of it. Its
  storages are remembered and sent as ``LOST`` first thing on the next
  connection; the daemon then freezes them and re-checks them by itself
  (see ``server.py``). Lost single-storage reports are harmless (a cut can
  not split a transaction that lives in one storage) and are not tracked.
* One log line when the daemon is lost, one when it is back.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
import time
from typing import Iterable, Mapping

from . import protocol as p
from .client import open_socket

log = logging.getLogger("tidstorage.reporter")

DEFAULT_TIMEOUT = 1.0
#: Reconnection backoff: first and longest wait between attempts (seconds).
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 2.0
RECV_BYTES = 64 * 1024
#: Longest delay of a batched fire-and-forget report (seconds).
FLUSH_DELAY = 0.01


class Ticket:
    """A pending BEGIN confirmation."""

    __slots__ = ("event", "ok", "storages", "txn", "bounds", "generation")

    def __init__(self, txn: str, storages: tuple[str, ...], bounds) -> None:
        self.event = threading.Event()
        self.ok = False
        self.txn = txn
        self.storages = storages
        self.bounds = bounds
        self.generation = -1  # the connection it was sent on

    def settle(self, ok: bool) -> None:
        self.ok = ok
        self.event.set()


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
        self._auth_token = auth_token
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._waiters: collections.deque[Ticket] = collections.deque()
        self._lost: set[str] = set()
        self._first_attempt = threading.Event()  # set after the first connect attempt
        self._was_up = False
        self._down_logged = False
        self._closed = False
        self._generation = 0  # counts connections
        self._pending: list[bytes] = []  # batched reports, sent in order
        self._flush_wanted = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"tidstorage-reporter-{address[0]}:{address[1]}", daemon=True
        )
        self._thread.start()
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"tidstorage-flush-{address[0]}:{address[1]}", daemon=True
        )
        self._flusher.start()

    # -- the application's side -------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def lost_storages(self) -> set[str]:
        with self._lock:
            return set(self._lost)

    def begin(
        self, txn: str, storages: Iterable[str], bounds: Mapping[str, int] | None = None
    ) -> Ticket:
        ticket = Ticket(txn, tuple(storages), bounds)
        self._send_begin(ticket)
        return ticket

    def _send_begin(self, ticket: Ticket) -> None:
        self._wait_first_attempt()
        data = p.encode_begin(ticket.txn, ticket.storages, ticket.bounds) + p.SYNC_REQUEST
        with self._lock:
            if self._sock is not None:
                ticket.generation = self._generation
                self._waiters.append(ticket)
                if self._pending:  # earlier reports first, in the same send
                    self._pending.append(data)
                    data = b"".join(self._pending)
                    self._pending.clear()
                if self._send_locked(data):
                    return
            self._lost.update(ticket.storages)
        ticket.settle(False)

    def confirm(self, ticket: Ticket) -> bool:
        """Wait (at most ``timeout``) until the daemon has registered the BEGIN.

        A BEGIN confirmed on an earlier connection (the daemon restarted
        since) is sent again: the daemon that will see the COMMIT must have
        registered the transaction before its first ``tpc_finish``.
        """
        for attempt in (1, 2):
            if not ticket.event.wait(self.timeout):
                with self._lock:
                    self._lost.update(ticket.storages)
                    self._drop_locked(f"no confirmation within {self.timeout:g} s")
                return False
            if not ticket.ok:
                with self._lock:
                    self._lost.update(ticket.storages)
                return False
            if ticket.generation == self._generation:
                return True
            if attempt == 1:  # confirmed by a daemon that has gone since
                ticket.event = threading.Event()
                ticket.ok = False
                self._send_begin(ticket)
        return False

    def commit(self, txn: str, tids: Mapping[str, int], ticket: Ticket | None = None) -> None:
        """Report the TIDs; skipped if the daemon restarted since the BEGIN
        (the new daemon does not know the transaction; its bootstrap covers it)."""
        if ticket is not None and ticket.generation != self._generation:
            return
        self._queue(p.encode_commit(txn, tids))

    def abort(self, txn: str, ticket: Ticket | None = None) -> None:
        """Report a failed commit; skipped, like :meth:`commit`, if the
        daemon restarted since the BEGIN."""
        if ticket is not None and ticket.generation != self._generation:
            return
        self._queue(p.encode_abort(txn))

    def in_doubt(self, txn: str) -> None:
        """Tell the daemon this process does not know the outcome of ``txn``."""
        self._send(p.encode_in_doubt(txn))

    def single(self, txn: str, storage: str, tid: int) -> None:
        """Report a finished single-storage transaction (no wait, no tracking)."""
        self._queue(p.encode_begin(txn, (storage,)) + p.encode_commit(txn, {storage: tid}))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.sendall(b"".join(self._pending) + p.QUIT_REQUEST)
                except OSError:
                    pass
            self._drop_locked(None)
        self._wake.set()
        self._flush_wanted.set()

    # -- plumbing ---------------------------------------------------------

    def _wait_first_attempt(self) -> None:
        if self._sock is None and not self._first_attempt.is_set():
            # Only at process start: give the first connection a chance.
            self._first_attempt.wait(self.timeout)

    def _send(self, data: bytes) -> None:
        self._wait_first_attempt()
        with self._lock:
            if self._sock is not None:
                if self._pending:
                    self._pending.append(data)
                    data = b"".join(self._pending)
                    self._pending.clear()
                self._send_locked(data)

    def _queue(self, data: bytes) -> None:
        self._wait_first_attempt()
        with self._lock:
            if self._sock is None:
                return  # lost: harmless or resolved by the daemon (see module doc)
            self._pending.append(data)
            if len(self._pending) == 1:
                self._flush_wanted.set()

    def flush(self) -> None:
        """Send the batched reports now."""
        with self._lock:
            if self._sock is not None and self._pending:
                data = b"".join(self._pending)
                self._pending.clear()
                self._send_locked(data)

    def _flush_loop(self) -> None:
        while not self._closed:
            self._flush_wanted.wait()
            self._flush_wanted.clear()
            time.sleep(FLUSH_DELAY)
            self.flush()

    def _send_locked(self, data: bytes) -> bool:
        try:
            self._sock.sendall(data)
            return True
        except OSError as exc:
            self._drop_locked(f"send failed: {exc}")
            return False

    def _drop_locked(self, reason: str | None) -> None:
        sock, self._sock = self._sock, None
        self._pending.clear()  # lost with the connection (see the module doc)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
            if reason is not None and not self._down_logged:
                self._down_logged = True
                log.warning(
                    "lost the tidstorage daemon at %s:%d (%s); commits go on without"
                    " waiting, reconnecting in the background",
                    *self.address,
                    reason,
                )
        waiters, self._waiters = self._waiters, collections.deque()
        for ticket in waiters:
            self._lost.update(ticket.storages)
            ticket.settle(False)
        self._wake.set()

    def _connect(self) -> socket.socket:
        sock = open_socket(self.address, self.timeout, self._ssl)
        reader = p.ReplyReader()
        hello = b""
        if self._auth_token is not None:
            hello += p.encode_auth(self._auth_token)
        with self._lock:
            lost = sorted(self._lost)
        if lost:
            hello += p.encode_lost(lost)
        hello += p.SYNC_REQUEST
        sock.sendall(hello)
        expected = 1 + (self._auth_token is not None)
        replies: list[int] = []
        while len(replies) < expected:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionError("the daemon closed the connection (authentication refused?)")
            reader.feed(data)
            while (value := reader.read_int()) is not None:
                replies.append(value)
        if replies != [1] * expected:
            raise ConnectionError(f"unexpected handshake replies {replies}")
        with self._lock:
            self._lost.difference_update(lost)
        return sock

    def _run(self) -> None:
        delay = RECONNECT_FIRST
        while not self._closed:
            try:
                sock = self._connect()
            except (OSError, ConnectionError, p.ProtocolError) as exc:
                self._first_attempt.set()
                if not self._down_logged:
                    self._down_logged = True
                    log.warning(
                        "cannot reach the tidstorage daemon at %s:%d (%s); commits go on"
                        " without waiting, retrying in the background",
                        *self.address,
                        exc,
                    )
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_FIRST
            with self._lock:
                self._generation += 1
                self._sock = sock
            self._first_attempt.set()
            if self._down_logged or self._was_up:
                log.warning("the tidstorage daemon at %s:%d is back", *self.address)
            self._down_logged = False
            self._was_up = True
            self._read(sock)

    def _read(self, sock: socket.socket) -> None:
        """Settle BEGIN tickets from SYNC replies until the connection ends."""
        reader = p.ReplyReader()
        while True:
            try:
                data = sock.recv(RECV_BYTES)
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
            try:
                reader.feed(data)
                values = []
                while (value := reader.read_int()) is not None:
                    values.append(value)
            except p.ProtocolError as exc:
                with self._lock:
                    if self._sock is sock:
                        self._drop_locked(f"bad reply: {exc}")
                return
            with self._lock:
                if self._sock is not sock:
                    return
                for value in values:
                    if self._waiters:
                        self._waiters.popleft().settle(value == 1)


_reporters: dict[tuple, Reporter] = {}
_reporters_lock = threading.Lock()


def get_reporter(
    address: tuple[str, int], *, auth_token: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Reporter:
    """The process-wide reporter for this daemon address (created once)."""
    key = (address, auth_token, timeout)
    with _reporters_lock:
        reporter = _reporters.get(key)
        if reporter is None or reporter._closed:
            reporter = _reporters[key] = Reporter(address, auth_token=auth_token, timeout=timeout)
        return reporter
