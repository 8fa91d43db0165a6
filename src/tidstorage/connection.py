"""One client connection of the daemon, and the scheduling of bulk reads.

The daemon's own logic (what each command does) is in ``server.py``; this
module decides *when* received bytes are applied:

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
from typing import TYPE_CHECKING

from . import protocol as p
from .coordinator import Peer

if TYPE_CHECKING:  # pragma: no cover
    from .server import Daemon

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
        while queue and time.perf_counter() < deadline:
            conn = queue.popleft()
            if not conn.work(deadline):
                queue.append(conn)
        if queue:
            asyncio.get_running_loop().call_soon(self._work)
        else:
            self._scheduled = False


class Connection(asyncio.Protocol):
    """One client connection (see the module docstring for scheduling)."""

    __slots__ = (
        "daemon", "transport", "peer", "decoder", "authenticated", "closing",
        "backlog", "write_paused",
    )

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.decoder = p.Decoder()
        self.authenticated = daemon.listen.auth_token is None
        self.closing = False
        self.peer = Peer("?")  # the coordinator's view of this connection
        self.transport = None
        self.backlog: collections.deque[bytes] = collections.deque()
        self.write_paused = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer.name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.daemon.connection_made(self)
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
        self.daemon.bulk.add(self)

    def process(self, data: bytes) -> None:
        events = self.decoder.feed(data)
        if not events:
            return
        if not self.authenticated:
            events = self.daemon.check_auth(self, events)
            if not events:
                return
        out = self.daemon.apply(self, events)
        if out and not self.closing:
            self.transport.write(out)

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
        if not self.closing and not self.write_paused:
            self.transport.resume_reading()
        return True

    def drain(self) -> None:
        """Apply everything received (the peer is going away)."""
        while self.backlog and not self.closing:
            self.process(self.backlog.popleft())
        self.backlog.clear()

    def eof_received(self) -> bool:
        self.drain()
        if self.decoder.pending:
            log.warning("%s: disconnected in the middle of a command (ignored)", self.peer.name)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.drain()
        self.closing = True
        self.daemon.connection_closed(self)
        log.debug("%s: disconnected", self.peer.name)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.backlog:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close_after(self, replies: list[bytes]) -> None:
        if replies:
            self.transport.write(b"".join(replies))
        self.close()

    def close(self) -> None:
        self.closing = True
        self.transport.close()
