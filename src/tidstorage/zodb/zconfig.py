"""ZConfig support: ``%import tidstorage`` and a ``<tidstorage>`` section."""

from __future__ import annotations

from pathlib import Path

from ZODB.config import BaseConfig

from ..config import read_token
from .storage import wrap


class TIDStorageConfig(BaseConfig):
    def open(self, database_name="unnamed", databases=None):
        config = self.config
        token = read_token(Path(config.auth_token_file)) if config.auth_token_file else None
        base = config.base.open()
        return wrap(base, config.name, server=config.server, auth_token=token,
                    timeout=config.timeout)
