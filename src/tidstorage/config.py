"""The TOML configuration shared by every ``tidstorage`` command.

::

    [server]
    address = "127.0.0.1"        # default 127.0.0.1 (never all interfaces by default)
    port = 9001                  # default 9001
    status_file = "var/tidstorage.tid"   # the TID log; optional
    burst_period = 30            # seconds; optional: incremental records
    full_dump_period = 300       # seconds; optional: full records
    auth_token_file = "secret"   # optional
    admin_token_file = "admin"   # optional: operators' changes (tidstorage admin)
    log_file = "var/tidstorage.log"      # optional; default stderr
    tls_cert = "cert.pem"        # optional, with tls_key
    tls_key = "key.pem"
    in_doubt_grace = 60          # seconds (legacy clients only, see the README)
    legacy_clients = true        # accept clients that say no HELLO (legacy TIDStorage)
    max_tid_ahead = 3600         # seconds: refuse reported TIDs further in the future
    metrics_address = "127.0.0.1:9102"   # optional: Prometheus metrics (off by default)
    all_writers_stamp = false    # true: restore/repair keep the whole transactions
                                 # the stamps prove above the TID log's point

    [storages.main]              # "main": the storage id on the wire and in the log
    data_fs = "var/main/Data.fs"
    blob_dir = "var/main/blobs"  # optional
    backup_dir = "backups/main"
    zeo = "127.0.0.1:8100"       # optional: used by bootstrap
    zeo_storage = "1"            # optional, default "1"
    id = "..."                   # optional: the wire id, if not the table name
    database = "..."             # optional: the ZODB database name (<zodb_db NAME>),
                                 # if not the table name (heal: cross-database refs)

    [backup]
    timestamp_file = "backups/timestamps.log"
    status_file_backup_dir = "backups/tidlog"
    keep_full_backups = 3
    target = "s3://bucket/prefix"    # optional: repositories in an object store
    s3_endpoint = "https://s3.example.org"   # optional (default AWS)
    s3_credentials_file = "s3.cred"  # optional, mode 0600 (else AWS_* variables)
    s3_region = "us-east-1"          # optional
    s3_allow_http = false            # plain http beyond loopback (refused by default)
    s3_max_bandwidth = 50000000      # optional: upload throttle, bytes/s

Relative paths are relative to the directory of the config file. Any unknown
key, wrong type or missing required key raises :class:`ConfigError` naming the
file and the key; the CLI turns it into exit code 2.

Secrets: the auth token file (read by the daemon and by every client) and
the TLS key (checked when the daemon starts, :func:`check_daemon`) must be
accessible by their owner only (mode 0600 or 0400, as OpenSSH requires of
private keys), and the token must be at least :data:`MIN_TOKEN_LENGTH`
characters long. The daemon warns at start when it listens beyond loopback
without a token. ``status_file`` keeps its last component as written (its
directories are resolved): the TID log writer refuses a symbolic link there.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.addresses import parse_host_port, parse_zeo_address
from .core.protocol import MAX_STORAGES
from .errors import ConfigError

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 9001
DEFAULT_IN_DOUBT_GRACE = 60.0
#: How far (seconds of TID time) a reported TID may lie ahead of both the
#: daemon's clock and the storage's last known TID: a forged or broken
#: report with a TID far in the future would otherwise freeze the storage
#: (every real commit after it would look like a decrease). A storage whose
#: clock once jumped further ahead needs a larger value.
DEFAULT_MAX_TID_AHEAD = 3600.0
#: Shortest auth token accepted (characters). The token is all that stands
#: between any host that can reach the daemon's port and reports that move
#: or freeze the published point, and a wrong guess costs an attacker one
#: connection: a word or a short PIN falls to online guessing, 16 random
#: characters do not (``openssl rand -hex 16`` gives 32).
MIN_TOKEN_LENGTH = 16
#: Permission bits a secret file must not have: any access by its group or
#: by others (OpenSSH's rule for private keys).
SECRET_MODE_BITS = 0o077


@dataclass(frozen=True)
class StorageConfig:
    name: str  # the table name in [storages.NAME]
    id: str  # the id on the wire and in the TID log
    data_fs: Path | None = None
    blob_dir: Path | None = None
    backup_dir: Path | None = None
    zeo: str | None = None
    zeo_storage: str = "1"
    #: the ZODB database name (``<zodb_db NAME>``) when not the table name:
    #: how ``heal`` knows where a cross-database reference points
    database: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    address: str = DEFAULT_ADDRESS
    port: int = DEFAULT_PORT
    status_file: Path | None = None
    burst_period: float | None = None
    full_dump_period: float | None = None
    auth_token_file: Path | None = None
    admin_token_file: Path | None = None
    log_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    in_doubt_grace: float = DEFAULT_IN_DOUBT_GRACE
    legacy_clients: bool = True
    max_tid_ahead: float = DEFAULT_MAX_TID_AHEAD
    #: (host, port) of the Prometheus endpoint; None: off
    metrics_address: tuple[str, int] | None = None
    #: every writer stamps its multi-storage commits (no legacy client):
    #: restore and repair cut at the stamps' point (tools/cut.py)
    all_writers_stamp: bool = False


@dataclass(frozen=True)
class BackupConfig:
    timestamp_file: Path | None = None
    status_file_backup_dir: Path | None = None
    keep_full_backups: int = 3
    # -- off-machine repositories (tools/objectstore.py) --
    #: "s3://bucket/prefix": the local directories above are a staging copy
    target: str | None = None
    #: the S3 endpoint URL (default: AWS's); plain http only on loopback
    #: unless s3_allow_http
    s3_endpoint: str | None = None
    #: access_key_id / secret_access_key (mode 0600); default: the AWS
    #: environment variables
    s3_credentials_file: Path | None = None
    s3_region: str | None = None
    s3_allow_http: bool = False
    #: upload throttle, bytes per second (None: unlimited)
    s3_max_bandwidth: int | None = None


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    storages: dict[str, StorageConfig] = field(default_factory=dict)  # by wire id
    backup: BackupConfig = field(default_factory=BackupConfig)

    def auth_token(self) -> str | None:
        """The auth token, read from ``auth_token_file`` (stripped)."""
        return read_token(self.server.auth_token_file)

    def admin_token(self) -> str | None:
        """The admin token (``admin_token_file``): operators' changes of the
        published state (``tidstorage admin``) must carry it."""
        return read_token(self.server.admin_token_file, "admin token file")

    def databases(self) -> dict[str, str]:
        """ZODB database name -> storage id (``database``, by default the
        table name)."""
        return {st.database or st.name: sid for sid, st in self.storages.items()}


def read_token(path: Path | None, what: str = "auth token file") -> str | None:
    """The token in ``path`` (one line, stripped), after checking the file's
    permissions (see :func:`check_secret_mode`) and the token's length."""
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            check_secret_mode(path, os.fstat(file.fileno()).st_mode, what)
            token = file.read().decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    if not token or "\n" in token or "\r" in token:
        raise ConfigError(f"{what} {path} must hold one non-empty line")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{what} {path}: the token is {len(token)} characters long, at least"
            f" {MIN_TOKEN_LENGTH} are required (e.g. openssl rand -hex 16 > {path})")
    return token


def check_secret_mode(path: Path, mode: int, what: str) -> None:
    """Refuse a secret file its group or others may access (ConfigError
    naming the file and its mode); owner-only (0600, 0400) is fine."""
    if mode & SECRET_MODE_BITS:
        raise ConfigError(
            f"{what} {path} has mode {stat.S_IMODE(mode):04o}: it must be accessible by its"
            f" owner only (chmod 600 {path})")


def check_daemon(config: Config, address: str | None = None) -> list[str]:
    """What the daemon checks at start beyond the config file itself
    (``tidstorage serve`` calls it right after loading the config).

    Raises :class:`ConfigError` for a TLS key its group or others may read
    (the token file is checked whenever it is read, by :func:`read_token`).
    Returns the warnings to log: listening on ``address`` (default: the
    configured one) beyond loopback without an auth token lets any host that
    can reach the port send reports.
    """
    server = config.server
    if server.tls_key is not None:
        try:
            mode = os.stat(server.tls_key).st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read TLS key {server.tls_key}: {exc.strerror}") from None
        check_secret_mode(server.tls_key, mode, "TLS key")
    address = address or server.address
    warnings = []
    if server.auth_token_file is None and not is_loopback(address):
        warnings.append(
            f"listening on {address}, not a loopback address, without an auth token: any host"
            " that can reach the port can send reports that move or freeze the published"
            " point (set server.auth_token_file, or listen on 127.0.0.1)")
    if server.metrics_address is not None and not is_loopback(server.metrics_address[0]):
        warnings.append(
            f"serving metrics on {server.metrics_address[0]}, not a loopback address: any host"
            " that can reach the port reads the storages' ids, TIDs and lags (they are not"
            " authenticated; restrict the port with a firewall)")
    return warnings


def is_loopback(address: str) -> bool:
    """Whether every address ``address`` (an IP address or a host name)
    stands for is a loopback one. Unresolvable names are not."""
    host = address.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    try:
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
    except ValueError:
        return False


# Each section: key -> kind: "path", "file" (a path whose last component is
# not resolved), "seconds", "count", "str", "port", "bool", "address" (host:port).
_SERVER_KEYS = {
    "address": "str",
    "port": "port",
    "status_file": "file",
    "burst_period": "seconds",
    "full_dump_period": "seconds",
    "auth_token_file": "path",
    "admin_token_file": "path",
    "log_file": "path",
    "tls_cert": "path",
    "tls_key": "path",
    "in_doubt_grace": "seconds",
    "legacy_clients": "bool",
    "max_tid_ahead": "seconds",
    "metrics_address": "address",
    "all_writers_stamp": "bool",
}
_STORAGE_KEYS = {
    "data_fs": "path",
    "blob_dir": "path",
    "backup_dir": "path",
    "zeo": "str",
    "zeo_storage": "str",
    "id": "str",
    "database": "str",
}
_BACKUP_KEYS = {
    "timestamp_file": "path",
    "status_file_backup_dir": "path",
    "keep_full_backups": "count",
    "target": "str",
    "s3_endpoint": "str",
    "s3_credentials_file": "path",
    "s3_region": "str",
    "s3_allow_http": "bool",
    "s3_max_bandwidth": "count",
}
_TOP_KEYS = {"server", "storages", "backup"}


class _Reader:
    def __init__(self, path: Path | None) -> None:
        self.where = str(path) if path is not None else "<config>"
        self.base = path.parent if path is not None else Path.cwd()

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: {message}")

    def table(self, data: Any, key: str) -> dict:
        if not isinstance(data, dict):
            raise self.fail(key, f"must be a table, not {type(data).__name__}")
        return data

    def section(self, data: dict, prefix: str, spec: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = f"{prefix}.{key}"
            kind = spec.get(key)
            if kind is None:
                raise self.fail(name, f"unknown key (known: {', '.join(sorted(spec))})")
            out[key] = self.value(name, kind, value)
        return out

    def value(self, name: str, kind: str, value: Any) -> Any:
        if kind in ("str", "path", "file"):
            if not isinstance(value, str) or not value:
                raise self.fail(name, f"must be a non-empty string, not {value!r}")
            if kind == "path":
                return (self.base / Path(value).expanduser()).resolve()
            if kind == "file":
                return resolve_parent(self.base / Path(value).expanduser())
            return value
        if kind in ("port", "count"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(name, f"must be an integer, not {value!r}")
            if kind == "port" and not 0 <= value <= 65535:
                raise self.fail(name, f"must be a port number 0..65535, not {value}")
            if kind == "count" and value < 1:
                raise self.fail(name, f"must be at least 1, not {value}")
            return value
        if kind == "seconds":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(name, f"must be a number of seconds, not {value!r}")
            if not math.isfinite(value):  # TOML allows nan and inf
                raise self.fail(name, f"must be a finite number of seconds, not {value!r}")
            if value < 0:
                raise self.fail(name, f"must not be negative, not {value}")
            return float(value)
        if kind == "address":
            if not isinstance(value, str):
                raise self.fail(name, f"must be a \"host:port\" string, not {value!r}")
            try:
                return parse_host_port(value)
            except ValueError as exc:
                raise self.fail(name, str(exc)) from None
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(name, f"must be true or false, not {value!r}")
            return value
        raise AssertionError(kind)


def parse_config(data: dict, path: Path | None = None) -> Config:
    """Validate a decoded TOML document; see the module docstring."""
    r = _Reader(path)
    for key in data:
        if key not in _TOP_KEYS:
            raise r.fail(key, f"unknown section (known: {', '.join(sorted(_TOP_KEYS))})")
    server = ServerConfig(**r.section(r.table(data.get("server", {}), "server"), "server", _SERVER_KEYS))
    if (server.tls_cert is None) != (server.tls_key is None):
        raise r.fail("server.tls_cert", "tls_cert and tls_key go together")
    backup = BackupConfig(**r.section(r.table(data.get("backup", {}), "backup"), "backup", _BACKUP_KEYS))
    _check_target(r, backup)
    storages: dict[str, StorageConfig] = {}
    for name, table in r.table(data.get("storages", {}), "storages").items():
        values = r.section(r.table(table, f"storages.{name}"), f"storages.{name}", _STORAGE_KEYS)
        wire_id = values.pop("id", name)
        if "\n" in wire_id or "\r" in wire_id:
            raise r.fail(f"storages.{name}.id", "must not contain a line break")
        if wire_id in storages:
            raise r.fail(f"storages.{name}", f"storage id {wire_id!r} is used twice")
        if "zeo" in values:
            try:
                parse_zeo_address(values["zeo"])
            except ValueError as exc:
                raise r.fail(f"storages.{name}.zeo", str(exc)) from None
        database = values.get("database", name)
        for other in storages.values():
            if (other.database or other.name) == database:
                raise r.fail(f"storages.{name}", f"database name {database!r} is also"
                                                 f" storages.{other.name}'s")
        storages[wire_id] = StorageConfig(name=name, id=wire_id, **values)
    if len(storages) > MAX_STORAGES:
        raise r.fail("storages", f"{len(storages)} storages, more than the daemon tracks"
                                 f" ({MAX_STORAGES}, protocol.MAX_STORAGES)")
    return Config(path=path, server=server, storages=storages, backup=backup)


def _check_target(r: _Reader, backup: BackupConfig) -> None:
    """[backup] target / s3_*: an s3:// URL with a bucket; an http(s)
    endpoint, plain http only on loopback unless s3_allow_http."""
    from urllib.parse import urlsplit

    if backup.target is None:
        for key in ("s3_endpoint", "s3_credentials_file", "s3_region", "s3_max_bandwidth"):
            if getattr(backup, key) is not None:
                raise r.fail(f"backup.{key}", "needs backup.target (s3://bucket/prefix)")
        return
    url = urlsplit(backup.target)
    if url.scheme != "s3" or not url.netloc or url.query or url.fragment:
        raise r.fail("backup.target", f"must be an s3://bucket/prefix URL, not {backup.target!r}")
    if backup.s3_endpoint is not None:
        ep = urlsplit(backup.s3_endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise r.fail("backup.s3_endpoint",
                         f"must be an http(s):// URL, not {backup.s3_endpoint!r}")
        if (ep.scheme == "http" and not backup.s3_allow_http
                and not is_loopback(ep.hostname)):
            raise r.fail("backup.s3_endpoint",
                         f"plain http to {ep.hostname}, not a loopback address: credentials"
                         " and backups would cross the network unencrypted (use https, or"
                         " set backup.s3_allow_http = true)")


def resolve_parent(path: Path) -> Path:
    """``path`` absolute, its directories resolved, its last component kept
    as it is (a symbolic link stays one: its opener may refuse it)."""
    if path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path).expanduser().resolve()
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse_config(data, p)
