"""Network addresses as operators write them: one parser for every place.

``host:port`` and ``[ipv6]:port`` name a TCP endpoint (the daemon, a ZEO
server, a metrics listener); a ZEO server may also be a unix socket path
(any text containing ``/``). Errors are :class:`ValueError` naming the text
and what was expected, so that the caller can add the file and field.
"""

from __future__ import annotations

import os
import re

__all__ = ["Address", "parse_host_port", "parse_zeo_address", "format_address"]

#: A TCP endpoint ``(host, port)``, or a unix socket path.
Address = tuple[str, int] | str

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]+)$")


def parse_host_port(text: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> ``(host, port)``."""
    if not isinstance(text, str):
        raise ValueError(f"invalid {what} {text!r}: expected a string")
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"invalid {what} {text!r}: empty")
    match = _HOST_PORT.match(stripped)
    if match is None:
        if stripped.count(":") > 1 and not stripped.startswith("["):
            hint = "put IPv6 addresses in brackets, e.g. [::1]:8100"
        else:
            hint = "expected host:port or [ipv6]:port"
        raise ValueError(f"invalid {what} {text!r}: {hint}")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"invalid {what} {text!r}: port {port} out of range")
    host = match["v6"] if match["v6"] is not None else match["host"]
    return (host, port)


def parse_zeo_address(text: str) -> Address:
    """A ZEO server address: ``host:port``, ``[ipv6]:port``, or a unix
    socket path (a text containing ``/``; ``~`` is expanded)."""
    if isinstance(text, str) and "/" in text:
        stripped = text.strip()
        if "\0" in stripped:
            raise ValueError(f"invalid ZEO address {text!r}: NUL in socket path")
        return os.path.expanduser(stripped)
    try:
        return parse_host_port(text, "ZEO address")
    except ValueError as exc:
        if "expected host:port" in str(exc):
            raise ValueError(f"invalid ZEO address {text!r}: expected host:port, [ipv6]:port"
                             " or a unix socket path") from None
        raise


def format_address(address: Address) -> str:
    """The inverse of the parsers (for messages and config files)."""
    if isinstance(address, str):
        return address
    host, port = address
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
