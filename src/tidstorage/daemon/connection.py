"""One client connection of the daemon, and the scheduling of bulk reads.

The connection talks to a :class:`Handler` (the daemon, injected; this
module never imports ``server.py``), which decides what each command does
and what the budgets allow; this module decides *when* received bytes are
applied:

* a small read (an interactive request: ``DUMP``, a ZODB client's
  ``BEGIN2`` + ``SYNC``...) is applied at once;
* a large read (pipelined bulk reports) is queued in pieces ending at a line
  break, reading from that peer pauses (TCP pushes back, nothing piles up
  here), and :class:`BulkQueue` works the queue off round robin in slices
  of at most :data:`BULK_SLICE_SECONDS` per event-loop iteration.

So interactive requests never wait behind a flood: ``DUMP`` latency stays at
a few milliseconds while the daemon is saturated.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Protocol

from ..core import protocol as p
from ..core.coordinator import Peer

log = logging.getLogger("tidstorage.server")

#: Flow control: stop reading from a peer that does not read its replies once
#: this many reply bytes are buffered for it (asyncio's high-water mark).
WRITE_HIGH_WATER = 256 * 1024
#: A read up to this size is an interactive request: applied at once.
SMALL_READ = 4096
#: Bulk reads are applied in pieces of about this size (~100 transactions)...
BULK_PIECE = 16 * 1024
#: ...for at most this long per event-loop iteration (then other peers, and
#: DUMPs, get their turn).
BULK_SLICE_SECONDS = 0.001
#: Most DUMPs answered per batch of commands of one peer: a burst of DUMPs
#: (each reply holds every published TID) is answered a few at a time, as
#: the peer reads the replies (see ``Connection.pause_writing``).
DUMPS_PER_BATCH = 4
#: Bytes an unauthenticated peer may send before its AUTH is complete (an
#: AUTH is a few dozen bytes): nothing is buffered for strangers.
MAX_PREAUTH_BYTES = 4096


class Handler(Protocol):
    """What a :class:`Connection` asks of the daemon."""

    def accept(self, conn: "Connection") -> bool:
        """A new connection: False refuses it (budgets)."""

    def authenticate(self, conn: "Connection", event: tuple) -> bool:
        """Is ``event`` (the first command) the right AUTH? On False the
        connection is closed after :attr:`auth_failure_delay`."""

    def apply(self, conn: "Connection", events: list[tuple]) -> bytes:
        """Apply decoded commands; return the replies."""

    def must_wait(self, conn: "Connection") -> bool:
        """Must the commands of ``conn`` wait (too many replies unread)?"""

    def writer_paused(self, conn: "Connection", paused: bool) -> None:
        """``conn``'s peer stopped (or resumed) reading its replies."""

    def refuse(self, conn: "Connection", why: str) -> None:
        """An unauthenticated peer broke a budget: log and close it."""

    def closed(self, conn: "Connection") -> None:
        """``conn`` has ended."""


class BulkQueue:
    """Connections with queued bulk pieces, worked off in slices."""

    def __init__(self) -> None:
        self._queue: collections.deque[Connection] = collections.deque()
        self._scheduled = False

    def add(self, conn: "Connection") -> None:
        self._queue.append(conn)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._work)

    def _work(self) -> None:
        deadline = time.perf_counter() + BULK_SLICE_SECONDS
        queue = self._queue
        try:
            while queue and time.perf_counter() < deadline:
                conn = queue.popleft()
                try:
                    drained = conn.work(deadline)
                except Exception:
                    # A bug must cost that connection, not every bulk reader.
                    log.exception("%s: unexpected error while applying its commands;"
                                  " closing the connection", conn.peer.name)
                    conn.close()
                    continue
                if not drained:
                    queue.append(conn)
        finally:
            if queue:
                asyncio.get_running_loop().call_soon(self._work)
            else:
                self._scheduled = False


class Connection(asyncio.Protocol):
    """One client connection (see the module docstring for scheduling)."""

    __slots__ = (
        "_handler", "_bulk", "transport", "peer", "decoder", "authenticated", "closing",
        "backlog", "write_paused", "events", "received", "_auth_failure_delay",
    )

    def __init__(self, handler: Handler, bulk: BulkQueue, *, auth_required: bool,
                 auth_failure_delay: float = 1.0) -> None:
        self._handler = handler
        self._bulk = bulk
        self._auth_failure_delay = auth_failure_delay
        self.decoder = p.Decoder()
        self.authenticated = not auth_required
        self.closing = False
        self.peer = Peer("?")  # the coordinator's view of this connection
        self.transport = None
        self.backlog: collections.deque[bytes] = collections.deque()
        self.write_paused = False
        #: decoded commands not applied yet (a DUMP burst waits for its replies
        #: to be read)
        self.events: collections.deque[tuple] = collections.deque()
        self.received = 0  # bytes received (counted until authenticated)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer.name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if not self._handler.accept(self):
            self.closing = True
            transport.abort()
            return
        log.debug("%s: connected", self.peer.name)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if len(data) <= SMALL_READ and not self.backlog:
            self.process(data)
            return
        # Bulk: queue it in slices that end at a line break.
        backlog = self.backlog
        start = 0
        size = len(data)
        while size - start > BULK_PIECE:
            cut = data.rfind(b"\n", start, start + BULK_PIECE) + 1
            if cut <= start:
                break  # no line break: one piece (the decoder bounds it)
            backlog.append(data[start:cut])
            start = cut
        backlog.append(data[start:] if start else data)
        self.transport.pause_reading()
        self._bulk.add(self)

    def process(self, data: bytes) -> None:
        if not self.authenticated:
            self.received += len(data)
            if self.received > MAX_PREAUTH_BYTES:
                self._handler.refuse(self, f"{self.received} bytes before AUTH")
                return
        events = self.decoder.feed(data)
        if not events:
            return
        if not self.authenticated:
            if not self._handler.authenticate(self, events[0]):
                # Slow guessing down: the connection stays, useless, a while.
                self.closing = True
                self.transport.pause_reading()
                asyncio.get_running_loop().call_later(self._auth_failure_delay,
                                                      self.transport.close)
                return
            self.authenticated = True
            self.transport.write(b"1\n")
            events = events[1:]
            if not events:
                return
        if self.events:
            self.events.extend(events)
            return
        if self._fits(events):
            self._apply(events)
        else:
            self.events.extend(events)
            self.run_events()

    def _fits(self, events: list[tuple]) -> bool:
        if self.write_paused or self._handler.must_wait(self):
            return False
        dumps = 0
        for event in events:
            if event[0] is p.DUMP:
                dumps += 1
                if dumps > DUMPS_PER_BATCH:
                    return False
        return True

    def _apply(self, events: list[tuple]) -> None:
        out = self._handler.apply(self, events)
        if out and not self.closing:
            self.transport.write(out)

    def run_events(self) -> None:
        """Apply deferred commands, a few DUMPs at a time, while the peer
        reads its replies (and the daemon's reply budget allows)."""
        events = self.events
        while events and not self.closing:
            if self.write_paused or self._handler.must_wait(self):
                self.transport.pause_reading()
                return
            batch = []
            dumps = 0
            while events:
                if events[0][0] is p.DUMP:
                    if dumps == DUMPS_PER_BATCH:
                        break
                    dumps += 1
                batch.append(events.popleft())
            self._apply(batch)
        if not events and not self.closing and not self.write_paused and not self.backlog:
            self.transport.resume_reading()

    def work(self, deadline: float) -> bool:
        """Process queued pieces until ``deadline``; True when drained."""
        backlog = self.backlog
        clock = time.perf_counter
        while backlog:
            if self.closing:
                backlog.clear()
                break
            self.process(backlog.popleft())
            if clock() >= deadline:
                break
        if backlog:
            return False
        if not self.closing and not self.write_paused and not self.events:
            self.transport.resume_reading()
        return True

    def drain(self) -> None:
        """Apply everything received (the peer is going away)."""
        while self.backlog and not self.closing:
            self.process(self.backlog.popleft())
        self.backlog.clear()
        if self.events and not self.closing:
            # replies cannot be read any more: apply what has none to read
            batch = [e for e in self.events if e[0] is not p.DUMP]
            self.events.clear()
            if batch:
                self._handler.apply(self, batch)

    def eof_received(self) -> bool:
        self.drain()
        if self.decoder.pending:
            log.warning("%s: disconnected in the middle of a command (ignored)", self.peer.name)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.drain()
        self.closing = True
        self._handler.closed(self)
        log.debug("%s: disconnected", self.peer.name)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.transport.pause_reading()
        self._handler.writer_paused(self, True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._handler.writer_paused(self, False)
        if self.events:
            self.run_events()
        elif not self.backlog:
            self.transport.resume_reading()

    def buffered(self) -> int:
        """Reply bytes waiting for the peer to read them."""
        return self.transport.get_write_buffer_size()

    def close_after(self, replies: list[bytes]) -> None:
        if replies:
            self.transport.write(b"".join(replies))
        self.close()

    def close(self) -> None:
        self.closing = True
        self.transport.close()
