"""A TCP proxy between a client process and the daemon that a test can cut.

Real sockets: ``cut()`` resets every open connection (both ends see it, as
when a network path fails or a peer is killed); ``refuse()`` makes new
connections fail until ``accept()``; ``hold()`` stops forwarding (a
partition: nothing arrives, nothing is closed) until ``release()``.
"""

from __future__ import annotations

import socket
import struct
import threading


class Proxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listen = socket.socket()
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind(("127.0.0.1", 0))
        self._listen.listen(64)
        self.address = self._listen.getsockname()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._refusing = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return self.address[1]

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            if self._refusing:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            self._flowing.wait()
            try:
                dst.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        """Reset every open connection."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def refuse(self) -> None:
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        try:
            self._listen.close()
        except OSError:
            pass
        self.cut()


def _reset(sock: socket.socket) -> None:
    """End ``sock`` at once: shutdown first, so that the threads blocked in
    ``recv`` on it wake up (a bare close would wait for them)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    for how in (socket.SHUT_RDWR,):
        try:
            sock.shutdown(how)
        except OSError:
            pass
    try:
        sock.close()
    except OSError:
        pass
