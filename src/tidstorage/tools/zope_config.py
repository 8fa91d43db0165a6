"""One source of truth: the TOML against zope.conf and zeo.conf, and each
``data_fs`` against what its ZEO server serves (``tidstorage config check``);
a TOML written from zope.conf and zeo.conf (``tidstorage config from-zope``).

The same facts live in three files (the ZEO address in zeo.conf, zope.conf
and the TOML; the ``Data.fs`` paths in zeo.conf and the TOML; the storage
ids in zope.conf and the TOML; the daemon's address in each ``<tidstorage>``
section and the TOML). A mismatch is silent until a restore is wrong: a
typo'd ``name`` makes a storage the daemon never hears of; two swapped
``data_fs`` make a backup of each file under the other's name. These checks
find each, naming both files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import Config
from ..core.addresses import parse_zeo_address
from ..formats import filestorage
from ..formats.zopeconf import (
    Database,
    ZeoServerConf,
    format_address,
    read_zeo_conf,
    read_zope_conf,
    same_endpoint,
)

__all__ = ["Finding", "check", "from_zope"]

ERROR, WARNING, OK = "error", "warning", "ok"
#: Attempts at matching a file's last TID with its ZEO server's (commits
#: land between the two reads).
PROBE_ATTEMPTS = 5


@dataclass
class Finding:
    severity: str
    text: str

    def to_json(self) -> dict:
        return asdict(self)


def _served_by(zeos: list[ZeoServerConf], address, storage: str):
    for zeo in zeos:
        if same_endpoint(zeo.address, address) and storage in zeo.storages:
            return zeo, zeo.storages[storage]
    return None, None


def check(config: Config, zope_confs: list[Path], zeo_confs: list[Path], *,
          probe: bool = True, timeout: float = 10.0) -> list[Finding]:
    """Compare; findings in file order (errors and warnings, and one OK
    line per storage whose facts agree)."""
    where = str(config.path) if config.path else "the TOML"
    findings: list[Finding] = []
    add = lambda sev, text: findings.append(Finding(sev, text))  # noqa: E731
    dbs: list[Database] = [db for f in zope_confs for db in read_zope_conf(f)]
    zeos = [read_zeo_conf(f) for f in zeo_confs]
    storages = config.storages
    daemon = (config.server.address, config.server.port)
    used: set[str] = set()
    for db in dbs:
        if not db.wrapped:
            add(WARNING, f"{db.where}: not wrapped in <tidstorage>: its commits are not"
                         " reported (a transaction over it and another database can be split)")
            continue
        wire = db.wire_id
        if wire not in storages:
            known = ", ".join(sorted(storages)) or "none"
            add(ERROR, f"{db.where}: storage id {wire!r} is not in {where} (known: {known}):"
                       " the daemon refuses its reports" + _near(wire, storages))
            continue
        used.add(wire)
        st = storages[wire]
        mapped = config.databases().get(db.name)
        if mapped is None:
            add(WARNING, f"{where}: storages.{st.name} is database {db.name!r} in {db.where}:"
                         f" set storages.{st.name}.database = {db.name!r} (heal takes a"
                         " cross-database reference to an unknown database as pointing"
                         " anywhere, and refuses more than it must)")
        elif mapped != wire:
            add(ERROR, f"{where}: database {db.name!r} of {db.where} is storages.{st.name},"
                       f" but storages.{storages[mapped].name} says it is {db.name!r}:"
                       " heal would look for its cross-database references in the wrong place")
        if db.daemon is not None and not same_endpoint(daemon, db.daemon):
            add(ERROR, f"{db.where}: <tidstorage> server {format_address(db.daemon)} is not"
                       f" the daemon of {where} ({format_address(daemon)})")
        if db.base == "zeoclient":
            if st.zeo is None:
                add(WARNING, f"{where}: storages.{st.name} has no zeo (zope.conf reaches it"
                             f" through ZEO at {', '.join(map(format_address, db.zeo_servers))}):"
                             " the daemon cannot read it")
            else:
                mine = parse_zeo_address(st.zeo)
                if not any(same_endpoint(a, mine) for a in db.zeo_servers):
                    add(ERROR, f"{where}: storages.{st.name}.zeo = {st.zeo!r} but {db.where}"
                               f" uses {', '.join(map(format_address, db.zeo_servers))}")
                if st.zeo_storage != db.zeo_storage:
                    add(ERROR, f"{where}: storages.{st.name}.zeo_storage = {st.zeo_storage!r}"
                               f" but {db.where} uses storage {db.zeo_storage!r}")
        elif db.base == "filestorage" and db.path is not None and st.data_fs is not None:
            if db.path != st.data_fs:
                add(ERROR, f"{where}: storages.{st.name}.data_fs = {st.data_fs} but {db.where}"
                           f" opens {db.path}")
    if dbs:
        for wire, st in sorted(storages.items()):
            if wire not in used:
                add(WARNING, f"{where}: storages.{st.name} (id {wire!r}) is used by no wrapped"
                             " database of " + ", ".join(map(str, zope_confs)))
    for wire, st in sorted(storages.items()):
        if st.zeo is None:
            continue
        address = parse_zeo_address(st.zeo)
        zeo, served = _served_by(zeos, address, st.zeo_storage)
        if zeos and zeo is None:
            add(WARNING, f"{where}: storages.{st.name}: no --zeo-conf serves storage"
                         f" {st.zeo_storage!r} at {st.zeo}")
        elif served is not None and served.path is not None and st.data_fs is not None \
                and served.path != st.data_fs:
            add(ERROR, f"{where}: storages.{st.name}.data_fs = {st.data_fs} but {zeo.file}"
                       f" serves storage {st.zeo_storage!r} from {served.path}")
        if probe and st.data_fs is not None:
            findings.extend(_probe(where, st, address, timeout))
    if not any(f.severity == ERROR for f in findings):
        add(OK, f"{len(storages)} storage(s) of {where} agree with "
                f"{len(zope_confs)} zope.conf and {len(zeo_confs)} zeo.conf file(s)")
    return findings


def _probe(where, st, address, timeout) -> list[Finding]:
    """Does ``data_fs`` hold what the ZEO server serves? Its last TID must
    lie between two reads of the server's last transaction."""
    from ..daemon.zeo import ZeoSpec, ZeoUnavailable, last_transaction

    spec = ZeoSpec(address, st.zeo_storage)
    for _ in range(PROBE_ATTEMPTS):
        try:
            before = last_transaction(spec, timeout)
            on_disk = filestorage.last_tid(st.data_fs)
            after = last_transaction(spec, timeout)
        except ZeoUnavailable as exc:
            return [Finding(WARNING, f"{where}: storages.{st.name}: ZEO {st.zeo} not reachable"
                                     f" ({exc}); data_fs not compared with it")]
        except Exception as exc:  # an unreadable file, a bad storage name
            return [Finding(ERROR, f"{where}: storages.{st.name}: cannot compare data_fs"
                                   f" {st.data_fs} with ZEO {st.zeo}: {type(exc).__name__}:"
                                   f" {exc}")]
        on_disk = 0 if on_disk is None else on_disk
        if before <= on_disk <= after:
            if after == 0:
                return [Finding(WARNING, f"{where}: storages.{st.name}: empty on ZEO {st.zeo}"
                                         f" and in {st.data_fs}: cannot tell whether it is"
                                         " the file the server serves")]
            return []
        if on_disk < before and after == before:
            break
    return [Finding(ERROR, f"{where}: storages.{st.name}.data_fs = {st.data_fs} ends at TID"
                           f" {on_disk:#x} but ZEO {st.zeo} storage {st.zeo_storage!r} is at"
                           f" {after:#x}: not the file that server serves (swapped paths?)")]


def _near(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_zope(zope_confs: list[Path], zeo_confs: list[Path], *, output: Path) -> dict:
    """A TOML config (as a dict) from zope.conf and zeo.conf: one storage
    per wrapped database, its ZEO address and, from the zeo.conf serving
    it, its ``data_fs`` and ``blob_dir``; the daemon's address from the
    ``<tidstorage>`` sections. Paths are written relative to ``output``'s
    directory when they lie below it."""
    from ..errors import ConfigError

    dbs = [db for f in zope_confs for db in read_zope_conf(f)]
    zeos = [read_zeo_conf(f) for f in zeo_confs]
    base = output.resolve().parent
    daemons = {db.daemon for db in dbs if db.wrapped and db.daemon is not None}
    if len(daemons) > 1:
        raise ConfigError("the <tidstorage> sections name several daemons: "
                          + ", ".join(sorted(map(format_address, daemons))))
    server: dict = {"status_file": "var/tidstorage.tid", "burst_period": 30,
                    "full_dump_period": 300}
    if daemons:
        host, port = next(iter(daemons))
        server = {"address": host, "port": port, **server}
    storages: dict[str, dict] = {}
    for db in dbs:
        if not db.wrapped:
            continue
        wire = db.wire_id
        if wire is None:
            raise ConfigError(f"{db.where}: <tidstorage> has no name and its storage is not a"
                              " ZEO client (no legacy id): add a name")
        key = db.storage_id if db.storage_id and _bare(db.storage_id) else db.name
        entry: dict = {}
        if key != wire:
            entry["id"] = wire
        if key != db.name:
            entry["database"] = db.name
        if db.base == "zeoclient" and db.zeo_servers:
            entry["zeo"] = format_address(db.zeo_servers[0])
            if db.zeo_storage != "1":
                entry["zeo_storage"] = db.zeo_storage
            zeo, served = _served_by(zeos, db.zeo_servers[0], db.zeo_storage)
            if served is not None and served.path is not None:
                entry["data_fs"] = _rel(served.path, base)
                if served.blob_dir is not None:
                    entry["blob_dir"] = _rel(served.blob_dir, base)
        elif db.base == "filestorage" and db.path is not None:
            entry["data_fs"] = _rel(db.path, base)
            if db.blob_dir is not None:
                entry["blob_dir"] = _rel(db.blob_dir, base)
        entry["backup_dir"] = f"backups/{key}"
        if key in storages:
            raise ConfigError(f"{db.where}: storage {key!r} is named twice")
        storages[key] = entry
    if not storages:
        raise ConfigError("no <tidstorage>-wrapped database in "
                          + ", ".join(map(str, zope_confs)))
    return {"server": server, "storages": storages,
            "backup": {"timestamp_file": "backups/timestamps.log",
                       "status_file_backup_dir": "backups/tidlog"}}


def _bare(name: str) -> bool:
    return name.replace("_", "").replace("-", "").isalnum()


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
