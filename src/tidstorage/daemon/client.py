"""A small blocking client of the daemon (CLI, tools, tests).

Speaks the protocol of :mod:`tidstorage.core.protocol`. One socket, reads of up
to :data:`~.protocol.RECV_BYTES`, replies parsed by :class:`~.protocol.ReplyReader`.
Not thread-safe: use one per thread, or a lock.
"""

from __future__ import annotations

import socket
import ssl
from typing import Iterable, Mapping

from ..core import protocol as p
from ..errors import ClientError

DEFAULT_TIMEOUT = 5.0


def open_socket(
    address: tuple[str, int], timeout: float, ssl_context: ssl.SSLContext | None = None
) -> socket.socket:
    """A TCP connection to the daemon (no Nagle delay; TLS if configured)."""
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is not None:
        sock = ssl_context.wrap_socket(sock, server_hostname=address[0])
    return sock


class Client:
    def __init__(
        self,
        address: tuple[str, int],
        *,
        auth_token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self._reader = p.ReplyReader()
        try:
            self._sock = open_socket(address, timeout, ssl_context)
        except OSError as exc:
            raise ClientError(f"cannot connect to the daemon at {_fmt(address)}: {exc}") from None
        if auth_token is not None:
            self._send(p.encode_auth(auth_token))
            if self._read(self._reader.read_int) != 1:
                raise ClientError(f"authentication refused by {_fmt(address)}")

    # -- commands --------------------------------------------------------

    def begin(self, txn: str, storages: Iterable[str], *, sync: bool = False) -> None:
        data = p.encode_begin(txn, storages)
        if sync:
            self._send(data + p.SYNC_REQUEST)
            self._expect_one()
        else:
            self._send(data)

    def commit(self, txn: str, tids: Mapping[str, int]) -> None:
        self._send(p.encode_commit(txn, tids))

    def abort(self, txn: str) -> None:
        self._send(p.encode_abort(txn))

    def sync(self) -> None:
        """Return once the daemon has applied everything sent before."""
        self._send(p.SYNC_REQUEST)
        self._expect_one()

    def dump(self) -> dict[str, int]:
        self._send(p.DUMP_REQUEST)
        return self._read(self._reader.read_dict)

    def admin(self, request: Mapping) -> dict:
        """An ADMIN request (a dict; see ``protocol.py``); its JSON answer."""
        self._send(p.encode_admin(request))
        return self._read(self._reader.read_admin)

    def bootstrapped(self) -> bool:
        self._send(p.BOOTSTRAPED_REQUEST)
        return self._read(self._reader.read_int) == 1

    def send_raw(self, data: bytes) -> None:
        self._send(data)

    def close(self) -> None:
        try:
            self._sock.sendall(p.QUIT_REQUEST)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------

    def _expect_one(self) -> None:
        if self._read(self._reader.read_int) != 1:
            raise ClientError(f"unexpected SYNC reply from {_fmt(self.address)}")

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ClientError(f"lost the daemon at {_fmt(self.address)}: {exc}") from None

    def _read(self, parse):
        while True:
            try:
                value = parse()
            except p.ProtocolError as exc:
                raise ClientError(f"bad reply from {_fmt(self.address)}: {exc}") from None
            if value is not None:
                return value
            try:
                data = self._sock.recv(p.RECV_BYTES)
            except OSError as exc:
                raise ClientError(f"lost the daemon at {_fmt(self.address)}: {exc}") from None
            if not data:
                raise ClientError(f"the daemon at {_fmt(self.address)} closed the connection")
            self._reader.feed(data)


def _fmt(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"
