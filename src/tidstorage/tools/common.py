"""What the operator tools share: how they talk (:data:`Echo`), word errors
and check the configuration, their locks, and the layout of a backup set
(the timestamp file, the TID log copies, blob snapshot directories, file
names made from storage ids).

The tools return results and raise :class:`~tidstorage.errors.ToolError`
or :class:`~tidstorage.errors.ConfigError`; they never print nor import
click (``cli/tools.py`` does that).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Self
from urllib.parse import unquote

import zc.lockfile

from ..config import Config, ConfigError
from ..errors import ToolError
from ..formats import blobs
from ..formats import repozo as rz
from ..formats.durable import fsync_dir, sha256_file
from ..formats.repozo import TIMESTAMP_LEN, TIMESTAMP_RE

__all__ = [
    "BACKUP_LOCK",
    "MAX_ID_FILENAME",
    "Echo",
    "Progress",
    "backup_problems",
    "human_size",
    "wait_writing",
    "Lock",
    "blob_backup_dir",
    "id_filename",
    "id_from_filename",
    "os_error_text",
    "quiet",
    "read_timestamps",
    "require",
    "require_storages",
    "restrict_storages",
    "parse_storage_list",
    "safety_copy",
    "same_bytes",
    "set_tidlog_copies",
    "tidlog_copies",
]

#: How a tool tells what it does, one line at a time (``click.echo`` on the
#: command line, a list's ``append`` in tests).
Echo = Callable[[str], None]
#: progress(storage id, phase, done, total) of a backup or a restore: phase
#: in "repozo", "blobs", "done", "failed"; done/total in bytes (total may be
#: None)
Progress = Callable[[str, str, int, "int | None"], None]

#: The backup lock, in ``status_file_backup_dir``: held by backup, cleanup
#: and adopt (and inherited by every repozo child of a backup).
BACKUP_LOCK = ".tidstorage-backup.lock"


def quiet(_: str) -> None:
    """An :data:`Echo` that says nothing."""


def os_error_text(exc: OSError) -> str:
    """An OSError as a message: its reason, and the file it names."""
    text = exc.strerror or str(exc)
    if getattr(exc, "filename", None):
        text += f": {exc.filename}"
    return text


# -- configuration ------------------------------------------------------------


def require(value, key: str, why: str):
    """``value``, or ConfigError naming ``key`` if it is not set."""
    if value is None:
        raise ConfigError(f"{key}: required by {why}")
    return value


def require_storages(config: Config) -> None:
    """ConfigError unless ``config`` has at least one storage."""
    if not config.storages:
        raise ConfigError(f"{config.path}: storages: no storage configured")


def parse_storage_list(text: str | None) -> list[str] | None:
    """``--storages a,b`` as a list of ids (None: not given).  Blanks around
    ids are ignored; an empty list is a ConfigError."""
    if text is None:
        return None
    ids = [s.strip() for s in text.split(",") if s.strip()]
    if not ids:
        raise ConfigError("--storages: no storage id given")
    return ids


def restrict_storages(config: Config, ids: list[str] | None) -> Config:
    """``config`` restricted to the storages ``ids`` (``--storages``: the
    storages of this host when the ZEO servers run on several machines);
    everything else (the daemon, the backup set, the other keys) is shared.
    ``ids`` None: ``config`` itself.  ConfigError (exit 2) naming the ids
    that are not configured."""
    import dataclasses

    if ids is None:
        return config
    unknown = [s for s in ids if s not in config.storages]
    if unknown:
        known = ", ".join(sorted(config.storages)) or "none"
        raise ConfigError(f"--storages: storage(s) {', '.join(unknown)} not configured in "
                          f"{config.path} (configured: {known})")
    return dataclasses.replace(config, storages={s: config.storages[s] for s in ids})


# -- locks --------------------------------------------------------------------


class Lock:
    """A ``zc.lockfile`` lock (the kind FileStorage takes on Data.fs.lock)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        try:
            self._lock = zc.lockfile.LockFile(str(self.path))
        except zc.lockfile.LockError:
            holder = ""
            try:
                pid = self.path.read_text().strip()
                if pid:
                    holder = f" (held by process {pid})"
            except OSError:
                pass  # the holder is only named if it can be read
            raise ToolError(f"{what}: lock file {self.path} is held{holder}") from None

    def fileno(self) -> int:
        """The descriptor holding the lock (an ``flock``: every process that
        inherits it holds the lock until it closes it)."""
        return self._lock._fp.fileno()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- safety copies ------------------------------------------------------------


def safety_copy(src: Path, dst: Path) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` (must not exist) and check the copy: what
    restore and repair keep of a file before they replace or cut it.

    Written to ``dst.tmp``, fsync'ed, evicted from the page cache and read
    back: size and SHA-256 must match what was read from ``src``.  Then
    renamed to ``dst``.  Returns (size, hex digest).  Raises OSError, or
    ToolError if the copy does not match.
    """
    tmp = dst.with_name(dst.name + ".tmp")
    h = hashlib.sha256()
    size = 0
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(1 << 20):
                h.update(chunk)
                fo.write(chunk)
                size += len(chunk)
            fo.flush()
            os.fsync(fo.fileno())
            try:  # so that the check reads the disk, not the page cache
                os.posix_fadvise(fo.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass  # only a weaker check: the bytes were fsync'ed
        if src.stat().st_size != size or tmp.stat().st_size != size:
            raise ToolError(f"safety copy {tmp} of {src}: size mismatch")
        if sha256_file(tmp, size) != h.hexdigest():
            raise ToolError(f"safety copy {tmp} of {src}: SHA-256 mismatch when read back")
        if dst.exists():
            raise ToolError(f"{dst} appeared while copying: not overwritten")
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, h.hexdigest()


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (size, then SHA-256)."""
    size = a.stat().st_size
    return size == b.stat().st_size and sha256_file(a, size) == sha256_file(b, size)


# -- the backup set -----------------------------------------------------------


def read_timestamps(path: Path | None) -> list[str]:
    """The backup timestamps in ``timestamp_file`` (oldest first).

    Blank lines are ignored (the legacy tool wrote ``"\\n" + timestamp``);
    a line that is not a timestamp raises :class:`ToolError`.
    """
    if path is None or not path.exists():
        return []
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not TIMESTAMP_RE.fullmatch(line):
            raise ToolError(f"{path}:{lineno}: not a backup timestamp: {line[:60]!r}")
        out.append(line)
    return out


def tidlog_copies(directory: Path | None, basename: str | None = None) -> list[tuple[str, Path]]:
    """``(timestamp, path)`` of the TID log copies in ``directory``, oldest
    first.  A copy is named ``<log name>-<timestamp>``; with ``basename``,
    only copies of that log."""
    if directory is None:
        return []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if len(name) < TIMESTAMP_LEN + 2 or name[-TIMESTAMP_LEN - 1] != "-":
            continue
        base, stamp = name[:-TIMESTAMP_LEN - 1], name[-TIMESTAMP_LEN:]
        if not TIMESTAMP_RE.fullmatch(stamp):
            continue
        if basename is not None and base != basename:
            continue
        if name.endswith(".tmp"):
            continue
        out.append((stamp, directory / name))
    out.sort()
    return out


def set_tidlog_copies(config: Config) -> list[tuple[str, Path]]:
    """The copies of this set's TID log (``server.status_file``) made by its
    backups, oldest first."""
    base = config.server.status_file.name if config.server.status_file else None
    return tidlog_copies(config.backup.status_file_backup_dir, base)


def blob_backup_dir(backup_dir: Path) -> Path:
    """Where a storage's blob snapshots go: beside its repozo repository."""
    return Path(str(backup_dir) + ".blobs")


#: Longest file name made from a storage id: the suffixes added to it (e.g.
#: ``.fs.index.index_tmp``, restore's ``.<name>.tidstorage-restore.part``)
#: must still fit in the 255 bytes of a file name (NAME_MAX).
MAX_ID_FILENAME = 160
_ID_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def id_filename(storage_id: str) -> str:
    """A storage id as one safe file name: every path built from an id goes
    through this.

    Letters, digits, ``-``, ``_`` and ``.`` (but not a leading one) stay;
    every other byte of the UTF-8 id is ``%XX`` (so ``/``, ``..``, spaces
    and the quotes of legacy ids such as ``((('host', 8100),), '1')`` never
    reach the file system as such).  Reversible by :func:`id_from_filename`,
    except for ids longer than :data:`MAX_ID_FILENAME` once quoted: those
    are cut and end with ``~`` and 16 hex digits of their SHA-256.
    """
    out = []
    for i, ch in enumerate(storage_id):
        if ch in _ID_SAFE or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    name = "".join(out) or "%"
    if len(name) > MAX_ID_FILENAME:
        digest = hashlib.sha256(storage_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = name[:MAX_ID_FILENAME - 17].rstrip("%0123456789ABCDEF") + "~" + digest
    return name


def id_from_filename(name: str) -> str:
    """The storage id of a file name made by :func:`id_filename` (a name
    made the old way, the raw id, gives itself back)."""
    return unquote(name, errors="surrogatepass")


def wait_writing(proc, sid: str, path: Path, total: int | None,
                 progress: Progress | None) -> tuple[int, str]:
    """Wait for a repozo child that writes ``path``; report its size as
    progress every 0.2 s. Returns its exit status and its stderr."""
    import subprocess

    while True:
        try:
            _out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if progress is not None:
                try:
                    done = path.stat().st_size
                except OSError:
                    done = 0
                progress(sid, "repozo", done, total)
    return proc.returncode, (err or b"").decode(errors="replace").strip()


def human_size(n: int | float | None) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units, as du -h)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover


def backup_problems(config: Config, date: str, *, tidlog_copy: bool = True) -> list[str]:
    """Why the recorded backup ``date`` cannot be restored (empty: it can):
    repository files (checked against the ``.dat``), blob snapshots, and,
    with ``tidlog_copy``, the TID log copy it cuts at."""
    out = []
    for sid, st in sorted(config.storages.items()):
        try:
            rz.verified_chain(st.backup_dir, date)
        except rz.RepositoryError as exc:
            out.append(f"storage {sid}: {exc}")
        if st.blob_dir is not None and blobs.latest_snapshot(
                blob_backup_dir(st.backup_dir), at_most=date) is None:
            out.append(f"storage {sid}: no blob backup at or before {date} in "
                       f"{blob_backup_dir(st.backup_dir)}")
    directory = config.backup.status_file_backup_dir
    if (tidlog_copy and directory is not None
            and not [ts for ts, _ in set_tidlog_copies(config) if ts <= date]):
        out.append(f"no TID log copy at or before {date} in {directory}")
    return out
