"""Reading zope.conf and zeo.conf without their schemas (ZConfig's
schemaless parser): what ``tidstorage config check`` and ``config
from-zope`` compare with the TOML.

No Zope import, no ZEO server: the files are parsed, ``%define`` and
``%include`` honoured, and the sections that matter picked out:

* in zope.conf (or any ZODB config), each database section (``<zodb_db
  NAME>`` of Zope, ``<zodb NAME>`` of ZODB) with its ``mount-point`` and its
  storage: a ``<tidstorage>`` wrapper (``name``, ``server``) around a
  ``<zeoclient>`` (``server``, ``storage``) or a ``<filestorage>``
  (``path``, ``blob-dir``), or an unwrapped storage;
* in zeo.conf, the server's ``address`` (``<zeo>``) and each
  ``<filestorage NAME>`` it serves (``path``, ``blob-dir``).

Addresses are read with ZConfig's own datatypes (``8100`` is
``127.0.0.1:8100`` for a client, every interface for a server), so they
mean what they mean to Zope and ZEO.
"""

from __future__ import annotations

import io
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import ZConfig
import ZConfig.cfgparser
import ZConfig.schemaless
from ZConfig.datatypes import SocketBindingAddress, SocketConnectionAddress

from ..errors import ConfigError

__all__ = ["Database", "ZeoServerConf", "ZeoStorage", "read_zope_conf", "read_zeo_conf"]

Address = tuple[str, int] | str

#: Section types that hold a database, and those that are a storage.
DATABASE_TYPES = ("zodb_db", "zodb")
STORAGE_TYPES = ("zeoclient", "filestorage", "mappingstorage", "demostorage",
                 "blobstorage", "relstorage", "zlibstorage")


@dataclass
class Database:
    """One database of a zope.conf."""

    name: str
    mount_points: list[str]
    #: the ``<tidstorage>`` wrapper's values (None: not wrapped)
    storage_id: str | None
    wrapped: bool
    daemon: Address | None
    #: the base storage: "zeoclient", "filestorage", ...
    base: str
    zeo_servers: list[Address] = field(default_factory=list)
    zeo_storage: str = "1"
    path: Path | None = None
    blob_dir: Path | None = None
    where: str = ""

    @property
    def legacy_id(self) -> str | None:
        """The id the legacy TIDStorage gives a ZEO client (see
        ``zodb.storage.legacy_storage_id``)."""
        if self.base != "zeoclient" or not self.zeo_servers:
            return None
        return repr((tuple(self.zeo_servers), self.zeo_storage))

    @property
    def wire_id(self) -> str | None:
        return self.storage_id if self.storage_id else self.legacy_id


@dataclass
class ZeoStorage:
    name: str
    path: Path | None
    blob_dir: Path | None


@dataclass
class ZeoServerConf:
    """One zeo.conf."""

    file: Path
    address: Address
    storages: dict[str, ZeoStorage]


class _Parser(ZConfig.schemaless.Parser):
    # The schemaless parser refuses %define; Zope instances use it
    # (%define INSTANCE ...): keep ZConfig's own handling.
    handle_define = ZConfig.cfgparser.ZConfigParser.handle_define


class _Context(ZConfig.schemaless.Context):
    def includeConfiguration(self, section, newurl, defines):
        with urllib.request.urlopen(newurl) as f:  # a file: URL
            text = io.StringIO(f.read().decode())
        _Parser(ZConfig.schemaless.Resource(text, newurl), self, defines).parse(section)


def _load(path: Path):
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    context = _Context()
    url = path.resolve().as_uri()
    try:
        _Parser(ZConfig.schemaless.Resource(io.StringIO(text), url), context).parse(context.top)
    except (ZConfig.ConfigurationError, NotImplementedError, OSError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return context.top


def _one(section, key: str, where: str) -> str | None:
    values = section.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise ConfigError(f"{where}: {key} is given {len(values)} times")
    return values[0]


def _path(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    return (base / os.path.expanduser(value)).resolve()


def _client_address(text: str, where: str) -> Address:
    try:
        return SocketConnectionAddress(text).address
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_zope_conf(path: Path) -> list[Database]:
    """The databases of a zope.conf (or any ZODB ZConfig file)."""
    path = Path(path)
    top = _load(path)
    base = path.resolve().parent
    out: list[Database] = []

    def visit(section, trail: str) -> None:
        for sub in section.sections:
            kind = sub.type.lower()
            where = f"{path}: <{sub.type}{' ' + sub.name if sub.name else ''}>"
            if kind in DATABASE_TYPES:
                out.append(_database(sub, where, base))
            else:
                visit(sub, where)

    visit(top, str(path))
    return out


def _database(section, where: str, base: Path) -> Database:
    storages = [s for s in section.sections if s.type.lower() in STORAGE_TYPES + ("tidstorage",)]
    if len(storages) != 1:
        raise ConfigError(f"{where}: expected one storage section, found {len(storages)}")
    storage = storages[0]
    wrapped = storage.type.lower() == "tidstorage"
    storage_id = daemon = None
    if wrapped:
        inner = [s for s in storage.sections if s.type.lower() in STORAGE_TYPES]
        if len(inner) != 1:
            raise ConfigError(f"{where} <tidstorage>: expected one storage section inside,"
                              f" found {len(inner)}")
        storage_id = _one(storage, "name", f"{where} <tidstorage>")
        server = _one(storage, "server", f"{where} <tidstorage>") or "127.0.0.1:9001"
        daemon = _client_address(server, f"{where} <tidstorage> server")
        storage = inner[0]
    kind = storage.type.lower()
    swhere = f"{where} <{storage.type}>"
    db = Database(
        name=section.name or "main",
        mount_points=list(section.get("mount-point", [])),
        storage_id=storage_id, wrapped=wrapped, daemon=daemon, base=kind, where=where)
    if kind == "zeoclient":
        db.zeo_servers = [_client_address(s, f"{swhere} server")
                          for s in storage.get("server", [])]
        db.zeo_storage = _one(storage, "storage", swhere) or "1"
        db.blob_dir = _path(_one(storage, "blob-dir", swhere), base)
    elif kind == "filestorage":
        db.path = _path(_one(storage, "path", swhere), base)
        db.blob_dir = _path(_one(storage, "blob-dir", swhere), base)
    return db


def read_zeo_conf(path: Path) -> ZeoServerConf:
    """A ZEO server's address and the file storages it serves."""
    path = Path(path)
    top = _load(path)
    base = path.resolve().parent
    address: Address | None = None
    storages: dict[str, ZeoStorage] = {}
    for sub in top.sections:
        kind = sub.type.lower()
        where = f"{path}: <{sub.type}{' ' + sub.name if sub.name else ''}>"
        if kind == "zeo":
            text = _one(sub, "address", where)
            if text is None:
                raise ConfigError(f"{where}: no address")
            try:
                address = SocketBindingAddress(text).address
            except ValueError as exc:
                raise ConfigError(f"{where}: address: {exc}") from None
        elif kind == "filestorage":
            name = sub.name or "1"
            storages[name] = ZeoStorage(name, _path(_one(sub, "path", where), base),
                                        _path(_one(sub, "blob-dir", where), base))
        elif kind in STORAGE_TYPES:
            storages[sub.name or "1"] = ZeoStorage(sub.name or "1", None, None)
    if address is None:
        raise ConfigError(f"{path}: no <zeo> section with an address")
    return ZeoServerConf(path, address, storages)


def same_endpoint(server: Address, client: Address) -> bool:
    """Does a client address reach a server bound to ``server``? Ports must
    match; a server bound to every interface ("" / 0.0.0.0 / ::) or a
    loopback host is reached by any loopback name."""
    if isinstance(server, str) or isinstance(client, str):
        return os.path.realpath(str(server)) == os.path.realpath(str(client))
    if server[1] != client[1]:
        return False
    shost, chost = server[0], client[0]
    if shost == chost or shost in ("", "0.0.0.0", "::"):
        return True
    return _loopback(shost) and _loopback(chost)


def _loopback(host: str) -> bool:
    from ..config import is_loopback

    return is_loopback(host)


def format_address(address: Address) -> str:
    from ..core.addresses import format_address as fmt

    if not isinstance(address, str) and address[0] == "":
        return f"127.0.0.1:{address[1]}"
    return fmt(address)

