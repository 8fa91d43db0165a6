"""ZConfig support: ``%import tidstorage`` and a ``<tidstorage>`` section.

The keys are checked when the configuration is read, so a bad value is a
``ZConfig.ConfigurationError`` naming its line (ZConfig turns the
``ValueError`` of a datatype into one), not an error at the first commit.
"""

from __future__ import annotations

from pathlib import Path

from ZODB.config import BaseConfig

from ..config import read_token
from ..core.addresses import parse_host_port
from .storage import wrap


def daemon_address(value: str) -> tuple[str, int]:
    """``server``: the daemon, ``host:port`` or ``[ipv6]:port``."""
    return parse_host_port(value, "daemon address")


def timeout(value: str) -> float:
    """``timeout``: seconds, more than 0."""
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"invalid timeout {value!r}: must be more than 0 seconds")
    return seconds


class TIDStorageConfig(BaseConfig):
    def open(self, database_name="unnamed", databases=None):
        config = self.config
        token = read_token(Path(config.auth_token_file)) if config.auth_token_file else None
        base = config.base.open()
        try:
            return wrap(base, config.name, server=config.server, auth_token=token,
                        timeout=config.timeout)
        except BaseException:
            base.close()  # a storage nobody will close holds its lock file
            raise
