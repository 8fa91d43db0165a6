"""Off-machine repositories in an S3-compatible object store (issue 13).

With ``[backup] target = "s3://bucket/prefix"``, the local directories of
the config (each storage's ``backup_dir`` and ``<backup_dir>.blobs``,
``status_file_backup_dir``, ``timestamp_file``) are a *staging copy*:
repozo and the tools work there as without a target, and this module
mirrors them to and from the store.

Objects, under ``<prefix>/``:

* ``repos/<storage>/<name>``: the repository files (``.fs[z]``,
  ``.deltafs[z]``, ``.dat``, ``.index``, the identity file);
* ``tidlog/<name>``: the TID log copies, their identity sidecars, the set's
  identity file;
* ``blobs/<storage>/data/<sha256>``: blob files, by content (a blob
  unchanged between snapshots, hard-linked locally, is one object);
* ``blobs/<storage>/snapshots/<T>.json``: a snapshot's manifest (relative
  path, SHA-256, size, mode of each file; its directories);
* ``timestamps/<E>``: one object per *recorded* backup.

:func:`push` (``run_backup``, after every storage succeeded and before the
timestamp is appended locally) uploads every local file the store lacks or
holds with another SHA-256: blob data, then manifests, then repository and
TID log files, and only then the backup's ``timestamps/<E>`` object -- one
PUT: the backup is recorded in the store when, and only when, every object
it needs was confirmed. A push killed midway records nothing; the next one
uploads what is missing (incomplete multipart uploads under the prefix are
aborted first).

Checksums, both ends: every upload carries ``ChecksumAlgorithm=SHA256``
(the server checks the bytes it receives, per part for multipart uploads)
and the file's whole SHA-256 in the object metadata ``sha256``; a HEAD then
confirms size and metadata (and, for a single-part object, the server's own
``ChecksumSHA256``). Every download is hashed while streamed to a temporary
file and compared with ``sha256`` (and the size) before it is renamed into
place.

:func:`pull` (``restore``, ``restore --list-points``, ``standby sync``,
``cleanup``) brings the staging copy up to date: downloads the objects that
are missing locally or differ, rebuilds missing blob snapshots (hard links
to the previous snapshot's unchanged files), and adds the store's recorded
backups to ``timestamp_file``. The store wins: a local file that differs
from its object is replaced. :func:`after_cleanup` deletes the objects of
what ``cleanup`` deleted (recorded backups first), then blob data no
manifest names any more.

No click here; errors are :class:`ToolError` naming the object.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..config import Config, ConfigError, check_secret_mode
from ..errors import ToolError
from ..formats import blobs
from ..formats import repozo as rz
from ..formats.durable import atomic_write, fsync_dir
from .common import (
    BACKUP_LOCK,
    Echo,
    Lock,
    Progress,
    blob_backup_dir,
    id_filename,
    quiet,
    read_timestamps,
)
from .identity import IDENTITY_FILE

__all__ = ["MULTIPART_THRESHOLD", "Store", "after_cleanup", "enabled", "pull",
           "pull_if_target", "push", "PushResult", "PullResult"]

#: Files above this are uploaded in parts (boto3's TransferConfig).
MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNK = 16 << 20
_CHUNK = 1 << 20
#: The local cache of SHA-256s (by inode, size and mtime) and of the
#: objects confirmed, in ``status_file_backup_dir``.
STATE_FILE = ".tidstorage-s3-state.json"
META = "sha256"


def enabled(config: Config) -> bool:
    return config.backup.target is not None


# -- credentials, client -------------------------------------------------------


def read_credentials(path: Path) -> dict[str, str]:
    """``access_key_id``/``secret_access_key`` (and ``session_token``) from
    ``path``: ``key = value`` lines, or an INI file like
    ``~/.aws/credentials`` (its ``[default]`` section, else its first).
    The file must be accessible by its owner only."""
    try:
        with open(path, "rb") as f:
            check_secret_mode(path, os.fstat(f.fileno()).st_mode, "S3 credentials file")
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read S3 credentials file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"S3 credentials file {path} is not UTF-8 text") from None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        if not any(line.strip().startswith("[") for line in text.splitlines()):
            text = "[default]\n" + text
        parser.read_string(text)
    except configparser.Error:
        raise ConfigError(f"S3 credentials file {path}: not key = value lines") from None
    sections = parser.sections()
    section = parser["default"] if "default" in sections else parser[sections[0]] \
        if sections else {}
    out = {}
    for key in ("access_key_id", "secret_access_key", "session_token"):
        value = section.get(key) or section.get(f"aws_{key}")
        if value:
            out[key] = value.strip()
    if "access_key_id" not in out or "secret_access_key" not in out:
        raise ConfigError(f"S3 credentials file {path}: access_key_id and secret_access_key"
                          " are required")
    return out


class Store:
    """The bucket and prefix of ``[backup] target``, through boto3."""

    def __init__(self, config: Config) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config as BotoConfig
        except ImportError:
            raise ConfigError("backup.target needs boto3: pip install 'tidstorage[s3]'") from None
        b = config.backup
        url = urlsplit(b.target)
        self.bucket = url.netloc
        self.prefix = url.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        kw = {}
        if b.s3_credentials_file is not None:
            cred = read_credentials(b.s3_credentials_file)
            kw = {"aws_access_key_id": cred["access_key_id"],
                  "aws_secret_access_key": cred["secret_access_key"],
                  "aws_session_token": cred.get("session_token")}
        boto = BotoConfig(
            s3={"addressing_style": "path"} if b.s3_endpoint else {},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10, read_timeout=120,
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_supported")
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=b.s3_endpoint, region_name=b.s3_region or "us-east-1",
            config=boto, **kw)
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=4, max_bandwidth=b.s3_max_bandwidth)

    # keys
    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def where(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"

    def _error(self, verb: str, rel: str, exc: Exception) -> ToolError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            text = f"{err.get('Code', '?')} ({err.get('Message') or 'no message'})"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return ToolError(f"object store: cannot {verb} {self.where(rel)}: {text}")

    def _call(self, verb: str, rel: str, fn, *args, **kw):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kw)
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            cause = exc.__cause__ or exc.__context__  # upload_file wraps the ClientError
            if isinstance(exc, Boto3Error) and isinstance(cause, (BotoCoreError, ClientError)):
                exc = cause
            raise self._error(verb, rel, exc) from None

    def listing(self, under: str = "") -> dict[str, int]:
        """rel -> size of every object under ``under``."""
        out: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2")
        prefix = self.key(under) if under else (self.prefix + "/" if self.prefix else "")
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out[self.rel(obj["Key"])] = obj["Size"]
        except (BotoCoreError, ClientError) as exc:
            raise self._error("list", under or "", exc) from None
        return out

    def head(self, rel: str) -> dict | None:
        from botocore.exceptions import ClientError
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(rel),
                                           ChecksumMode="ENABLED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error("read", rel, exc) from None

    def remote_sha(self, rel: str) -> str | None:
        h = self.head(rel)
        return None if h is None else h.get("Metadata", {}).get(META)

    def upload(self, path: Path, rel: str, sha: str, size: int,
               sent: Callable[[int], None] | None = None) -> None:
        """Upload ``path`` (streamed; multipart above the threshold), then
        confirm the object: size, metadata SHA-256, the server's checksum.
        ``sent(n)``: n more bytes went up (boto3's callback)."""
        self._call("upload to", rel, self.client.upload_file, str(path), self.bucket,
                   self.key(rel), Config=self.transfer, Callback=sent,
                   ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {META: sha}})
        self.confirm(rel, sha, size)

    def put_bytes(self, data: bytes, rel: str) -> None:
        sha = hashlib.sha256(data).hexdigest()
        self._call("upload to", rel, self.client.put_object, Bucket=self.bucket,
                   Key=self.key(rel), Body=data, ChecksumAlgorithm="SHA256",
                   Metadata={META: sha})
        self.confirm(rel, sha, len(data))

    def confirm(self, rel: str, sha: str, size: int) -> None:
        h = self.head(rel)
        if h is None:
            raise ToolError(f"object store: {self.where(rel)} is missing after its upload")
        server = h.get("ChecksumSHA256")
        b64 = base64.b64encode(bytes.fromhex(sha)).decode()
        if (h.get("ContentLength") != size or h.get("Metadata", {}).get(META) != sha
                or (server is not None and "-" not in server and server != b64)):
            raise ToolError(f"object store: {self.where(rel)} does not match what was uploaded"
                            f" (size {h.get('ContentLength')} vs {size}, checksum)")

    def download(self, rel: str, dest: Path, got: Callable[[int], None] | None = None) -> str:
        """Stream ``rel`` into ``dest`` (temporary file, fsync, checked
        against the object's size and SHA-256, renamed). Returns the SHA-256.
        ``got(n)``: n more bytes came down."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.s3tmp")
        answer = self._call("download", rel, self.client.get_object, Bucket=self.bucket,
                            Key=self.key(rel))
        want = answer.get("Metadata", {}).get(META)
        h = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as f:
                body = answer["Body"]
                try:
                    while chunk := body.read(_CHUNK):
                        h.update(chunk)
                        f.write(chunk)
                        size += len(chunk)
                        if got is not None:
                            got(len(chunk))
                except Exception as exc:  # noqa: BLE001 -- botocore/urllib3 read errors
                    raise self._error("download", rel, exc) from None
                f.flush()
                os.fsync(f.fileno())
            if want is None or h.hexdigest() != want or size != answer.get("ContentLength"):
                raise ToolError(f"object store: {self.where(rel)}: the bytes downloaded do not"
                                f" match its SHA-256 ({want or 'none recorded'}): not used")
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return want

    def get_bytes(self, rel: str) -> bytes:
        answer = self._call("download", rel, self.client.get_object, Bucket=self.bucket,
                            Key=self.key(rel))
        data = answer["Body"].read()
        if hashlib.sha256(data).hexdigest() != answer.get("Metadata", {}).get(META):
            raise ToolError(f"object store: {self.where(rel)}: SHA-256 mismatch")
        return data

    def delete(self, rels: list[str]) -> None:
        for i in range(0, len(rels), 1000):
            batch = rels[i:i + 1000]
            answer = self._call("delete", batch[0], self.client.delete_objects,
                                Bucket=self.bucket, Delete={"Objects": [
                                    {"Key": self.key(r)} for r in batch], "Quiet": True})
            if answer.get("Errors"):
                e = answer["Errors"][0]
                raise ToolError(f"object store: cannot delete s3://{self.bucket}/{e['Key']}: "
                                f"{e.get('Code')} ({e.get('Message')})")

    def abort_uploads(self) -> None:
        """Abort the multipart uploads left under the prefix (a killed push)."""
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            answer = self.client.list_multipart_uploads(
                Bucket=self.bucket, Prefix=self.prefix + "/" if self.prefix else "")
            for up in answer.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"],
                                                   UploadId=up["UploadId"])
        except (BotoCoreError, ClientError):
            pass  # only leftovers: a failure here costs space, not correctness


# -- the local staging copy -----------------------------------------------------


class _State:
    """SHA-256s by inode (so hard-linked and unchanged files are hashed
    once) and the objects confirmed (rel -> sha256)."""

    def __init__(self, config: Config) -> None:
        self.path = config.backup.status_file_backup_dir / STATE_FILE
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.hashes: dict[str, list] = data.get("hashes", {})
        self.objects: dict[str, str] = data.get("objects", {})
        self.seen: set[str] = set()

    def sha(self, path: Path) -> tuple[str, int]:
        st = path.stat()
        ident = f"{st.st_dev}:{st.st_ino}"
        self.seen.add(ident)
        cached = self.hashes.get(ident)
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2], st.st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        self.hashes[ident] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        return h.hexdigest(), st.st_size

    def save(self) -> None:
        self.hashes = {k: v for k, v in self.hashes.items() if k in self.seen}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"hashes": self.hashes, "objects": self.objects}))


def _repo_files(repo: Path) -> list[str]:
    try:
        names = os.listdir(repo)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith(".") and n != rz.SCRATCH_FILE
                  and not n.endswith(".tmp") and (repo / n).is_file())


def _upload_order(name: str) -> tuple[int, str]:
    # data files first, their .dat after them, indexes and identities last
    return (0 if rz.is_data_file(name) else 1 if name.endswith(".dat") else 2, name)


def _local_files(config: Config) -> list[tuple[str, Path]]:
    """(rel, path) of the repository and TID log files, in upload order."""
    out = []
    for sid, st in sorted(config.storages.items()):
        sub = f"repos/{id_filename(sid)}"
        out += [(f"{sub}/{n}", st.backup_dir / n)
                for n in sorted(_repo_files(st.backup_dir), key=_upload_order)]
    d = config.backup.status_file_backup_dir
    out += [(f"tidlog/{n}", d / n) for n in _repo_files(d)]
    return out


def _manifest(snap: Path, state: _State) -> dict:
    files, dirs = [], []
    for root, dnames, fnames in os.walk(snap):
        rel_root = os.path.relpath(root, snap)
        for d in sorted(dnames):
            dirs.append(os.path.normpath(os.path.join(rel_root, d)))
        for f in sorted(fnames):
            p = Path(root, f)
            sha, size = state.sha(p)
            files.append([os.path.normpath(os.path.join(rel_root, f)), sha, size,
                          stat.S_IMODE(p.stat().st_mode)])
    return {"format": 1, "dirs": sorted(dirs), "files": sorted(files)}


# -- push -----------------------------------------------------------------------


@dataclass
class PushResult:
    uploaded: list[str] = field(default_factory=list)
    bytes: int = 0
    skipped: int = 0
    recorded: list[str] = field(default_factory=list)


class _Meter:
    """Bytes moved per storage, reported to a :data:`Progress` as phase
    ``phase`` (``upload``/``download``) against the storage's total."""

    def __init__(self, progress: Progress | None, phase: str,
                 totals: dict[str, int]) -> None:
        self.progress, self.phase, self.totals = progress, phase, totals
        self.done = dict.fromkeys(totals, 0)

    def callback(self, sid: str | None) -> Callable[[int], None] | None:
        if self.progress is None or sid is None or sid not in self.totals:
            return None

        def moved(n: int) -> None:
            self.done[sid] += n
            self.progress(sid, self.phase, self.done[sid], self.totals[sid])
        return moved


def _sid_of(rel: str, by_name: dict) -> str | None:
    """The storage an object belongs to (``repos/<name>/...``,
    ``blobs/<name>/...``), or None (the TID log copies, the records)."""
    parts = rel.split("/")
    if len(parts) >= 2 and parts[0] in ("repos", "blobs") and parts[1] in by_name:
        return by_name[parts[1]][0]
    return None


def _owned(rel: str) -> bool:
    """Objects one host writes and no other may replace: the repositories
    (a storage is backed up by one host) and the set's identity.  (TID log
    copies are not: two hosts backing up in the same second make copies of
    one name, each a history of the same daemon's log.)"""
    return rel.startswith("repos/") or rel == f"tidlog/{IDENTITY_FILE}"


def _lock(config: Config):
    d = config.backup.status_file_backup_dir
    d.mkdir(parents=True, exist_ok=True)
    return Lock(d / BACKUP_LOCK, "object store: a backup or cleanup is running")


def push(config: Config, timestamp: str | None = None, *, echo: Echo = quiet,
         progress: Progress | None = None) -> PushResult:
    """Upload what the store lacks, then record ``timestamp`` (and every
    recorded local backup the store lacks) as ``timestamps/<T>`` objects.
    Called by ``run_backup`` under the backup lock; raises ToolError
    (nothing recorded) on any failure."""
    store = Store(config)
    state = _State(config)
    result = PushResult()
    store.abort_uploads()
    have = store.listing()

    def needed(rel: str, path: Path) -> bool:
        """Whether ``rel`` must be uploaded; ToolError if that would replace
        an object of the store that this host did not write (see
        :func:`_owned`)."""
        sha, size = state.sha(path)
        if have.get(rel) == size and state.objects.get(rel) == sha:
            return False
        if rel in have:
            remote = store.remote_sha(rel)
            if remote == sha:
                state.objects[rel] = sha
                return False
            if _owned(rel) and remote != state.objects.get(rel):
                raise ToolError(
                    f"object store: {store.where(rel)} holds what this host neither uploaded"
                    " nor downloaded: another host backs up this storage into the store, or"
                    " this staging copy is not the store's (a new machine: `tidstorage restore"
                    " --list-points` pulls it first); nothing was uploaded nor recorded")
        return True

    def send(rel: str, path: Path) -> None:
        sha, size = state.sha(path)
        echo(f"uploading {path} to {store.where(rel)}")
        store.upload(path, rel, sha, size, meter.callback(_sid_of(rel, by_name)))
        state.objects[rel] = sha
        have[rel] = size
        result.uploaded.append(rel)
        result.bytes += size

    by_name = _storage_dirs(config)
    try:
        todo = [(rel, path) for rel, path in _local_files(config) if needed(rel, path)]
        totals = dict.fromkeys(config.storages, 0)
        for rel, path in todo:
            if (sid := _sid_of(rel, by_name)) is not None:
                totals[sid] += state.sha(path)[1]
        meter = _Meter(progress, "upload", totals)
        for sid, st in sorted(config.storages.items()):
            snaps_dir = blob_backup_dir(st.backup_dir)
            base = f"blobs/{id_filename(sid)}"
            for name in blobs.list_snapshots(snaps_dir):
                mrel = f"{base}/snapshots/{name}.json"
                if mrel in have:
                    continue
                manifest = _manifest(snaps_dir / name, state)
                for relpath, sha, size, _mode in manifest["files"]:
                    drel = f"{base}/data/{sha}"
                    if have.get(drel) == size:
                        result.skipped += 1
                        continue
                    totals[sid] += size
                    store.upload(snaps_dir / name / relpath, drel, sha, size,
                                 meter.callback(sid))
                    have[drel] = size
                    result.uploaded.append(drel)
                    result.bytes += size
                store.put_bytes(json.dumps(manifest).encode(), mrel)
                have[mrel] = 0
                result.uploaded.append(mrel)
        for rel, path in todo:
            send(rel, path)
        stamps = read_timestamps(config.backup.timestamp_file)
        for ts in sorted(set(stamps) | ({timestamp} if timestamp else set())):
            rel = f"timestamps/{ts}"
            if rel not in have:
                # The record, last: one PUT, after every object was confirmed.
                store.put_bytes(f"{ts}\n".encode(), rel)
                result.recorded.append(ts)
        # Indexes older than each repository's newest one (backup deletes them).
        stale = []
        for sid, st in config.storages.items():
            local = [n for n in _repo_files(st.backup_dir) if rz.is_index(n)]
            sub = f"repos/{id_filename(sid)}/"
            stale += [r for r in have if r.startswith(sub) and rz.is_index(r[len(sub):])
                      and local and r[len(sub):] < max(local)]
        if stale:
            store.delete(sorted(stale))
    finally:
        state.save()
    return result


# -- pull -----------------------------------------------------------------------


@dataclass
class PullResult:
    downloaded: list[str] = field(default_factory=list)
    bytes: int = 0
    snapshots: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)


def pull_if_target(config: Config, echo: Echo = quiet, progress: Progress | None = None,
                   blobs_of: set[str] | None = None) -> PullResult | None:
    """:func:`pull` if ``[backup] target`` is set (the CLI's hook)."""
    if not enabled(config):
        return None
    result = pull(config, echo=echo, progress=progress, blobs_of=blobs_of)
    if result.downloaded or result.snapshots:
        echo(f"object store: {len(result.downloaded)} file(s) ({result.bytes} bytes) and "
             f"{len(result.snapshots)} blob snapshot(s) downloaded")
    return result


def _storage_dirs(config: Config) -> dict[str, tuple[str, object]]:
    return {id_filename(sid): (sid, st) for sid, st in config.storages.items()}


def pull(config: Config, *, echo: Echo = quiet, blobs_of: set[str] | None = None,
         progress: Progress | None = None) -> PullResult:
    """Bring the staging copy up to date from the store (see the module
    docstring). Under the backup lock.  ``blobs_of``: the storages whose
    blob snapshots are rebuilt (None: all; a plan for several hosts reads
    every storage's repository but restores only this host's blobs)."""
    if config.backup.status_file_backup_dir is None:
        raise ConfigError("backup.status_file_backup_dir: required by backup.target "
                          "(the staging copy)")
    store = Store(config)
    result = PullResult()
    with _lock(config):
        state = _State(config)
        try:
            have = store.listing()
            by_name = _storage_dirs(config)
            stamps = []
            manifests: dict[str, dict] = {}
            downloads: list[tuple[str, Path, int]] = []
            for rel, size in sorted(have.items()):
                parts = rel.split("/")
                if parts[0] == "timestamps" and len(parts) == 2:
                    if rz.TIMESTAMP_RE.fullmatch(parts[1]):
                        stamps.append(parts[1])
                    continue
                if parts[0] == "repos" and len(parts) == 3 and parts[1] in by_name:
                    dest = by_name[parts[1]][1].backup_dir / parts[2]
                elif parts[0] == "tidlog" and len(parts) == 2:
                    dest = config.backup.status_file_backup_dir / parts[1]
                elif (parts[0] == "blobs" and len(parts) == 4 and parts[2] == "snapshots"
                      and parts[1] in by_name and parts[3].endswith(".json")):
                    manifests.setdefault(parts[1], {})[parts[3][:-5]] = None
                    continue
                else:
                    continue
                if dest.name.startswith(".") or "/" in parts[-1]:
                    continue
                if dest.is_file() and dest.stat().st_size == size:
                    sha, _ = state.sha(dest)
                    if state.objects.get(rel) == sha or store.remote_sha(rel) == sha:
                        state.objects[rel] = sha
                        continue
                downloads.append((rel, dest, size))
            totals = dict.fromkeys(config.storages, 0)
            for rel, _dest, size in downloads:
                if (sid := _sid_of(rel, by_name)) is not None:
                    totals[sid] += size
            meter = _Meter(progress, "download", totals)
            for rel, dest, size in downloads:
                echo(f"downloading {store.where(rel)} to {dest}")
                state.objects[rel] = store.download(rel, dest,
                                                    meter.callback(_sid_of(rel, by_name)))
                result.downloaded.append(rel)
                result.bytes += size
            for fname, names in sorted(manifests.items()):
                if blobs_of is not None and by_name[fname][0] not in blobs_of:
                    continue
                _pull_snapshots(store, by_name[fname][1], fname, sorted(names), have,
                                result, state, meter)
            local = read_timestamps(config.backup.timestamp_file)
            new = sorted(set(stamps) - set(local))
            if new and config.backup.timestamp_file is not None:
                atomic_write(config.backup.timestamp_file,
                             "".join(f"{ts}\n" for ts in sorted(set(local) | set(stamps))))
                result.recorded = new
        finally:
            state.save()
    return result


def _pull_snapshots(store: Store, st, fname: str, names: list[str], have: dict,
                    result: PullResult, state: _State, meter: _Meter) -> None:
    snaps_dir = blob_backup_dir(st.backup_dir)
    base = f"blobs/{fname}"
    #: the newest snapshot present locally before ``name``, and its manifest
    previous: tuple[Path, dict | None] | None = None
    for name in names:
        target = snaps_dir / name
        if target.is_dir():
            previous = (target, None)  # its manifest fetched only if needed
            continue
        manifest = json.loads(store.get_bytes(f"{base}/snapshots/{name}.json"))
        if previous is not None and previous[1] is None:
            prel = f"{base}/snapshots/{previous[0].name}.json"
            pm = json.loads(store.get_bytes(prel)) if prel in have else {"files": []}
            previous = (previous[0], pm)
        old = {} if previous is None else {f[0]: f for f in previous[1]["files"]}
        partial = snaps_dir / (name + blobs.PARTIAL_SUFFIX)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        for d in manifest["dirs"]:
            (partial / d).mkdir(parents=True, exist_ok=True)
        for relpath, sha, size, mode in manifest["files"]:
            if Path(relpath).is_absolute() or ".." in Path(relpath).parts:
                raise ToolError(f"object store: {store.where(base)}/snapshots/{name}.json names"
                                f" {relpath!r}: not a relative path")
            dest = partial / relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            prev = old.get(relpath)
            src = None if previous is None else previous[0] / relpath
            if (prev is not None and prev[1] == sha and src.is_file()
                    and src.stat().st_size == size):
                os.link(src, dest)
                continue
            if st.id in meter.totals:
                meter.totals[st.id] += size
            store.download(f"{base}/data/{sha}", dest, meter.callback(st.id))
            os.chmod(dest, mode)
            result.bytes += size
        for root, _dirs, _files in os.walk(partial):
            fsync_dir(root)
        os.rename(partial, target)
        fsync_dir(snaps_dir)
        result.snapshots.append(f"{st.id}/{name}")
        previous = (target, manifest)


# -- cleanup --------------------------------------------------------------------


def after_cleanup(config: Config, plan, *, echo: Echo = quiet, shared: bool = True
                  ) -> list[str]:
    """Delete the objects of what ``run_cleanup`` deleted (``plan``): its
    pruned recorded backups first, then the files, then blob data no
    remaining manifest names. Returns the objects deleted.

    ``shared`` False (``cleanup --storages``, some of the storages: a host
    of several): only the objects of these storages (``repos/``,
    ``blobs/``); the recorded backups (``timestamps/``) and the TID log
    copies (``tidlog/``) are every host's, judged here by these storages
    alone, and are left to a cleanup of every storage."""
    if not enabled(config):
        return []
    store = Store(config)
    have = store.listing()
    gone = [f"timestamps/{ts}" for ts in sorted(plan.pruned)
            if shared and f"timestamps/{ts}" in have]
    store.delete(gone)  # first: the store never records a backup whose files are gone
    rels = []
    log_dir = config.backup.status_file_backup_dir
    snaps_touched = set()
    for sid, st in config.storages.items():
        fname = id_filename(sid)
        for path in plan.delete:
            if path.parent == st.backup_dir:
                rels.append(f"repos/{fname}/{path.name}")
            elif path.parent == blob_backup_dir(st.backup_dir):
                rels.append(f"blobs/{fname}/snapshots/{path.name}.json")
                snaps_touched.add(fname)
    rels += [f"tidlog/{p.name}" for p in plan.delete if shared and log_dir is not None
             and p.parent == log_dir]
    rels = [r for r in rels if r in have]
    store.delete(rels)
    for r in rels:
        have.pop(r, None)
    for fname in sorted(snaps_touched):
        base = f"blobs/{fname}"
        used = set()
        for rel in have:
            if rel.startswith(f"{base}/snapshots/") and rel.endswith(".json"):
                used |= {f[1] for f in json.loads(store.get_bytes(rel))["files"]}
        unused = [r for r in have if r.startswith(f"{base}/data/")
                  and r.rsplit("/", 1)[1] not in used]
        store.delete(unused)
        rels += unused
    for r in gone + rels:
        echo(f"deleted {store.where(r)}")
    return gone + rels
