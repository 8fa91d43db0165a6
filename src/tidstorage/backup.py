"""``tidstorage backup``: TID log copy, repozo backups, blob snapshots.

One backup, named by the UTC time it starts (``T``, repozo's
``YYYY-MM-DD-HH-MM-SS`` format):

1. take the backup lock (``status_file_backup_dir/.tidstorage-backup.lock``,
   an ``flock``); its descriptor is inherited by every repozo child, so the
   lock is held until the last of them has exited, even if the backup
   process dies; wait, if needed, until ``T`` is newer than every name already used
   (timestamps, TID log copies, repository files, blob snapshots), so that
   names sort like backups;
2. copy the daemon's TID log (``server.status_file``) to
   ``status_file_backup_dir/<log name>-T`` (temporary file, fsync, rename):
   every TID it publishes is then already in each ``Data.fs``;
3. for every storage, in parallel (at most one per core, ``--jobs``):
   ``repozo -B -r backup_dir -f data_fs`` (``-F``, ``-z``, ``-Q`` passed on),
   (started through :data:`_CHILD_GUARD`: killed by the kernel if the
   backup dies, so a killed backup leaves no repozo running; debris of an
   interrupted run -- ``tmp.tmp``, a data file missing from its ``.dat``,
   an index without its data file -- is removed or moved aside first, with a
   warning), then a snapshot of ``blob_dir`` into ``<backup_dir>.blobs/T`` (hard links
   to the files unchanged since the previous snapshot), then delete the
   repository's older ``.index`` files (only the newest one is kept);
4. only if every storage succeeded: fsync what was written and append the
   backup's end time ``E`` (>= every repozo file name of this backup) to
   ``timestamp_file``.  A restore as of ``E`` uses repozo files up to ``E``,
   the newest TID log copy and blob snapshots named ``<= E``: this backup's.

The shared helpers of the operator tools (timestamps, repository listings,
repozo's command line, locks, errors) live here too.
"""

from __future__ import annotations

import calendar
import concurrent.futures
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zc.lockfile

from . import blobs
from .config import Config, ConfigError
from .tidlog import read_log

__all__ = [
    "ToolError",
    "format_timestamp",
    "parse_date",
    "timestamp_seconds",
    "read_timestamps",
    "repozo_argv",
    "data_files",
    "tidlog_copies",
    "blob_backup_dir",
    "id_filename",
    "id_from_filename",
    "Lock",
    "StorageBackup",
    "BackupResult",
    "run_backup",
]

# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


class ToolError(Exception):
    """An operational failure (exit code 1).  The message names the storage
    and/or the file."""


TIMESTAMP_FORMAT = "%Y-%m-%d-%H-%M-%S"
TIMESTAMP_RE = re.compile(r"\d{4}(?:-\d\d){5}")
#: repozo's data files (``ZODB/scripts/repozo.py`` ``is_data_file``)
DATA_FILE_RE = re.compile(r"(\d{4}(?:-\d\d){5})\.(?:delta)?fsz?")
FULL_EXTS = (".fs", ".fsz")
_DATE_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)(?:[-T ](\d\d)(?:[-:](\d\d)(?:[-:](\d\d))?)?)?Z?")
BACKUP_LOCK = ".tidstorage-backup.lock"


def format_timestamp(seconds: float) -> str:
    """UTC ``YYYY-MM-DD-HH-MM-SS`` (repozo's file names)."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime(seconds))


def timestamp_seconds(stamp: str) -> int:
    return calendar.timegm(time.strptime(stamp, TIMESTAMP_FORMAT))


def parse_date(text: str) -> str:
    """A UTC date as repozo takes it (``yyyy-mm-dd[-hh[-mm[-ss]]]``, also with
    ``T``/space and ``:``), normalised to ``YYYY-MM-DD-HH-MM-SS``.

    Raises ValueError.
    """
    m = _DATE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad date {text!r}: expected UTC yyyy-mm-dd[-hh[-mm[-ss]]]")
    parts = [int(p) if p else 0 for p in m.groups()]
    try:
        stamp = "%04d-%02d-%02d-%02d-%02d-%02d" % tuple(parts)
        time.strptime(stamp, TIMESTAMP_FORMAT)
    except ValueError:
        raise ValueError(f"bad date {text!r}: no such day or time") from None
    return stamp


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


def repozo_argv() -> list[str]:
    """How to run repozo: the ``repozo`` script beside this Python, if any."""
    script = Path(sys.executable).with_name("repozo")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "ZODB.scripts.repozo"]


def data_files(repository: Path) -> list[str]:
    """repozo data file names of a repository, oldest first."""
    try:
        names = os.listdir(repository)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if DATA_FILE_RE.fullmatch(n))


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
        if len(name) < 21 or name[-20] != "-" or not TIMESTAMP_RE.fullmatch(name[-19:]):
            continue
        if basename is not None and name[:-20] != basename:
            continue
        if name.endswith(".tmp"):
            continue
        out.append((name[-19:], directory / name))
    out.sort()
    return out


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
    from urllib.parse import unquote

    return unquote(name, errors="surrogatepass")


def blob_backup_dir(backup_dir: Path) -> Path:
    """Where a storage's blob snapshots go: beside its repozo repository."""
    return Path(str(backup_dir) + ".blobs")


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
                pass
            raise ToolError(f"{what}: lock file {self.path} is held{holder}") from None

    def fileno(self) -> int:
        """The descriptor holding the lock (an ``flock``: every process that
        inherits it holds the lock until it closes it)."""
        return self._lock._fp.fileno()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def require(value, key: str, why: str):
    if value is None:
        raise ConfigError(f"{key}: required by {why}")
    return value


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    blobs.fsync_dir(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line to ``path``, durably (starting a new line if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = line.encode() + b"\n"
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    blobs.fsync_dir(path.parent)


# ---------------------------------------------------------------------------
# Backup
# ---------------------------------------------------------------------------

#: progress(storage id, phase, done, total): phase in "repozo", "blobs",
#: "done", "failed"; done/total in bytes (total may be None)
Progress = Callable[[str, str, int, "int | None"], None]


@dataclass
class StorageBackup:
    id: str
    ok: bool = False
    mode: str = ""                 # "full", "incremental" or "unchanged"
    files: list[str] = field(default_factory=list)   # new repository files
    bytes: int = 0                 # bytes of new data files
    seconds: float = 0.0
    error: str | None = None
    blob_snapshot: str | None = None
    blob_files: int = 0
    blob_linked: int = 0
    blob_copied: int = 0
    blob_bytes_copied: int = 0
    removed_indexes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class BackupResult:
    started: str
    timestamp: str | None = None    # appended to timestamp_file (success only)
    tidlog_copy: str | None = None
    storages: dict[str, StorageBackup] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.timestamp is not None

    def to_json(self) -> dict:
        return {
            "ok": self.ok, "started": self.started, "timestamp": self.timestamp,
            "tidlog_copy": self.tidlog_copy, "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            "storages": {s: r.to_json() for s, r in sorted(self.storages.items())},
        }


def check_backup_config(config: Config) -> None:
    """ConfigError (exit 2) unless the config has what a backup needs."""
    if not config.storages:
        raise ConfigError(f"{config.path}: storages: no storage configured")
    require(config.server.status_file, "server.status_file", "backup (the TID log to copy)")
    require(config.backup.timestamp_file, "backup.timestamp_file", "backup")
    require(config.backup.status_file_backup_dir, "backup.status_file_backup_dir", "backup")
    seen: dict[Path, str] = {}
    for sid, st in config.storages.items():
        require(st.data_fs, f"storages.{st.name}.data_fs", "backup")
        require(st.backup_dir, f"storages.{st.name}.backup_dir", "backup")
        if st.backup_dir in seen:
            raise ConfigError(f"storages.{st.name}.backup_dir: same directory as storage "
                              f"{seen[st.backup_dir]!r} ({st.backup_dir})")
        seen[st.backup_dir] = sid


def _latest_name(config: Config) -> str:
    names = [""]
    names += read_timestamps(config.backup.timestamp_file)[-1:]
    names += [ts for ts, _ in tidlog_copies(config.backup.status_file_backup_dir)][-1:]
    for st in config.storages.values():
        files = data_files(st.backup_dir)
        if files:
            names.append(files[-1][:19])
        snaps = blobs.list_snapshots(blob_backup_dir(st.backup_dir))
        names += snaps[-1:]
    return max(names)


def _start_name(config: Config, clock: Callable[[], float]) -> str:
    latest = _latest_name(config)
    deadline = clock() + 3.0
    while True:
        now = clock()
        name = format_timestamp(now)
        if name > latest:
            return name
        if now > deadline:
            raise ToolError(f"a backup named {latest} already exists and the clock says "
                            f"{name}: is the clock behind?")
        time.sleep(min(1.0, 1.0 - math.fmod(now, 1.0) + 0.01))


def _copy_tidlog(config: Config, name: str, result: BackupResult) -> Path:
    log = config.server.status_file
    dest_dir = config.backup.status_file_backup_dir
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        raise ToolError(f"TID log {log} (server.status_file) does not exist: "
                        "has the daemon run?") from None
    except OSError as exc:
        raise ToolError(f"cannot read TID log {log}: {exc.strerror}") from None
    dest = dest_dir / f"{log.name}-{name}"
    try:
        atomic_write(dest, data)
    except OSError as exc:
        raise ToolError(f"cannot copy the TID log to {dest}: {exc.strerror or exc}") from None
    tids = read_log(dest).final_tids()
    missing = sorted(set(config.storages) - set(tids))
    if missing:
        result.warnings.append(
            f"TID log {log} has no TID for storage(s) {', '.join(missing)}: this backup "
            "can only be restored with --no-cut or another TID log (-t)")
    return dest


def _incremental_estimate(repo: Path, size: int) -> int:
    """Bytes repozo will copy for an incremental backup (from the .dat)."""
    fulls = [n for n in data_files(repo) if n.endswith(FULL_EXTS)]
    if not fulls:
        return size
    dat = repo / (fulls[-1][:19] + ".dat")
    try:
        lines = dat.read_text().split("\n")
        end = int([ln for ln in lines if ln.strip()][-1].split()[2])
    except (OSError, IndexError, ValueError):
        return size
    return max(size - end, 0)


#: How repozo is started (``python -c _CHILD_GUARD PARENT_PID ARGV...``): the
#: child asks the kernel to SIGKILL it when the thread that started it ends
#: (``PR_SET_PDEATHSIG``; that thread waits for it, so it ends early only if
#: the backup process dies), checks that its parent is still the backup (it
#: may have died before the request), then becomes repozo (``exec``).  Done
#: in the child because ``preexec_fn`` is unsafe in a process with threads.
#: Elsewhere than Linux, only the inherited lock protects: a second backup
#: waits until an orphaned repozo has finished.
_CHILD_GUARD = """\
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("tidstorage backup died before repozo started")
os.execv(sys.argv[2], sys.argv[2:])
"""


class _Children:
    """The repozo processes running (to kill them if the backup is
    interrupted) and the lock descriptor they inherit."""

    def __init__(self, lock_fd: int | None) -> None:
        self.lock_fd = lock_fd
        self._procs: set[subprocess.Popen] = set()
        self._mutex = threading.Lock()

    def start(self, argv: list[str]) -> subprocess.Popen:
        exe = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0]) or argv[0]
        guarded = [sys.executable, "-c", _CHILD_GUARD, str(os.getpid()), exe] + argv[1:]
        with self._mutex:
            proc = subprocess.Popen(
                guarded, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                pass_fds=() if self.lock_fd is None else (self.lock_fd,))
            self._procs.add(proc)
        return proc

    def done(self, proc: subprocess.Popen) -> None:
        with self._mutex:
            self._procs.discard(proc)

    def kill_all(self) -> None:
        with self._mutex:
            for proc in self._procs:
                try:
                    proc.kill()
                except OSError:
                    pass


def _run_repozo(st, args: list[str], progress: Progress | None,
                children: _Children) -> tuple[int, str]:
    repo = st.backup_dir
    argv = repozo_argv() + ["-B", "-r", str(repo), "-f", str(st.data_fs)] + args
    size = st.data_fs.stat().st_size
    total = size if "-F" in args or not data_files(repo) else _incremental_estimate(repo, size)
    tmp = repo / "tmp.tmp"  # where repozo copies before renaming
    proc = children.start(argv)
    try:
        return _wait(proc, st, tmp, total, progress)
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt): never leave it running
            proc.kill()
            proc.wait()
        children.done(proc)


def _wait(proc, st, tmp: Path, total: int, progress: Progress | None) -> tuple[int, str]:
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if progress is not None:
                try:
                    done = tmp.stat().st_size
                except OSError:
                    done = 0
                progress(st.id, "repozo", done, total)
    text = (err or b"").decode(errors="replace").strip()
    return proc.returncode, text


#: Where debris of an interrupted repozo run is moved (out of repozo's sight:
#: it only looks at the repository's top level).
INTERRUPTED_DIR = ".tidstorage-interrupted"


def repository_debris(repo: Path) -> list[tuple[str, str]]:
    """``(name, why)`` of what an interrupted repozo run left in ``repo``:
    its scratch file ``tmp.tmp``; data files of the newest chain that its
    ``.dat`` does not list (repozo renames a data file, then records it in
    the ``.dat``: ``repozo -R`` would splice them in); indexes newer than
    every remaining data file, without their own."""
    out: list[tuple[str, str]] = []
    if (repo / "tmp.tmp").exists():
        out.append(("tmp.tmp", "repozo's scratch file"))
    files = data_files(repo)
    fulls = [n for n in files if n.endswith(FULL_EXTS)]
    bad: set[str] = set()
    if fulls:
        dat = repo / (fulls[-1][:19] + ".dat")
        try:
            listed = {os.path.basename(ln.split()[0]) for ln in dat.read_text().splitlines()
                      if ln.strip()}
        except FileNotFoundError:
            listed = set()
        except (OSError, IndexError, UnicodeDecodeError):
            return out  # restore reports a damaged .dat; not debris to guess about
        bad = {n for n in files if n[:19] >= fulls[-1][:19] and n not in listed}
        out += [(n, f"a data file not listed in {dat.name}") for n in sorted(bad)]
    good = [n[:19] for n in files if n not in bad]
    newest = max(good, default="")
    try:
        names = sorted(os.listdir(repo))
    except FileNotFoundError:
        return out
    for n in names:
        if (n.endswith(".index") and TIMESTAMP_RE.fullmatch(n[:-6]) and n[:19] > newest):
            out.append((n, "an index without its data file"))
    return out


def clear_debris(st, warnings: list[str]) -> None:
    """Remove (``tmp.tmp``) or move aside (into :data:`INTERRUPTED_DIR`) the
    debris of an interrupted run, before repozo runs again.  Called under
    the backup lock, which every repozo child of a backup inherits: no
    backup is writing there."""
    repo = st.backup_dir
    for name, why in repository_debris(repo):
        path = repo / name
        if name == "tmp.tmp":
            path.unlink()
            warnings.append(f"storage {st.id}: removed {path} ({why}) left by an interrupted "
                            "backup")
            continue
        aside = repo / INTERRUPTED_DIR
        aside.mkdir(exist_ok=True)
        dest = aside / name
        while dest.exists():
            dest = dest.with_name(dest.name + "+")
        os.rename(path, dest)
        warnings.append(f"storage {st.id}: moved {path} ({why}, left by an interrupted "
                        f"backup) to {dest}; delete it once you are satisfied")
    blobs.fsync_dir(repo)


def _remove_debris(repo: Path, new: list[str]) -> None:
    """After a failed repozo run: its scratch file, and an index it wrote
    for a data file it did not finish."""
    (repo / "tmp.tmp").unlink(missing_ok=True)
    roots = {n[:19] for n in data_files(repo)}
    for n in new:
        if n.endswith(".index") and n[:19] not in roots:
            (repo / n).unlink(missing_ok=True)


def _backup_storage(st, name: str, args: list[str], progress: Progress | None,
                    children: _Children) -> StorageBackup:
    t0 = time.monotonic()
    r = StorageBackup(st.id)
    repo = st.backup_dir
    try:
        if not st.data_fs.exists():
            raise ToolError(f"storage {st.id}: {st.data_fs} does not exist")
        if st.blob_dir is not None and not st.blob_dir.is_dir():
            raise ToolError(f"storage {st.id}: blob directory {st.blob_dir} does not exist")
        repo.mkdir(parents=True, exist_ok=True)
        clear_debris(st, r.warnings)
        before = set(os.listdir(repo))
        code, err = _run_repozo(st, args, progress, children)
        new = sorted(set(os.listdir(repo)) - before - {"tmp.tmp"})
        r.files = new
        if code != 0:
            _remove_debris(repo, new)
            last = err.splitlines()[-1] if err else f"exit status {code}"
            raise ToolError(f"storage {st.id}: repozo -B failed ({repo}): {last}")
        new_data = [n for n in new if DATA_FILE_RE.fullmatch(n)]
        r.mode = ("full" if any(n.endswith(FULL_EXTS) for n in new_data)
                  else "incremental" if new_data else "unchanged")
        r.bytes = sum((repo / n).stat().st_size for n in new_data)
        for n in new:  # repozo does not fsync the .index it writes
            blobs.fsync_file(repo / n)
        blobs.fsync_dir(repo)
        if st.blob_dir is not None:
            if progress is not None:
                progress(st.id, "blobs", 0, None)
            snap = blobs.snapshot(
                st.blob_dir, blob_backup_dir(repo), name,
                progress=None if progress is None else
                (lambda files, nbytes: progress(st.id, "blobs", nbytes, None)))
            r.blob_snapshot = str(snap.path)
            r.blob_files, r.blob_linked = snap.files, snap.linked
            r.blob_copied, r.blob_bytes_copied = snap.copied, snap.bytes_copied
        indexes = sorted(n for n in os.listdir(repo)
                         if n.endswith(".index") and TIMESTAMP_RE.fullmatch(n[:-6]))
        for n in indexes[:-1]:
            (repo / n).unlink()
            r.removed_indexes.append(n)
        r.ok = True
    except ToolError as exc:
        r.error = str(exc)
    except OSError as exc:
        r.error = f"storage {st.id}: {exc.strerror or exc}" + (
            f": {exc.filename}" if getattr(exc, "filename", None) else "")
    except Exception as exc:  # a bug must not pass for a success
        r.error = f"storage {st.id}: {type(exc).__name__}: {exc}"
    r.seconds = time.monotonic() - t0
    if progress is not None:
        progress(st.id, "done" if r.ok else "failed", r.bytes, None)
    return r


def run_backup(config: Config, *, full: bool = False, gzip: bool = False, quick: bool = False,
               jobs: int | None = None, progress: Progress | None = None,
               after_storage: Callable[[StorageBackup], None] | None = None,
               clock: Callable[[], float] = time.time) -> BackupResult:
    """Back up every storage of ``config`` (see the module docstring).

    Never raises for a storage's failure: see ``result.ok`` and each
    ``StorageBackup.error``.  Raises :class:`ToolError` if the TID log cannot
    be copied or another backup is running, ConfigError for a bad config.
    ``after_storage`` is called (in the worker thread) when a storage is
    done; with ``jobs=1``, storages are backed up in sorted order.
    """
    check_backup_config(config)
    t0 = time.monotonic()
    log_dir = config.backup.status_file_backup_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    with Lock(log_dir / BACKUP_LOCK, "backup: another backup or cleanup is running") as lock:
        children = _Children(lock.fileno())
        name = _start_name(config, clock)
        result = BackupResult(started=name)
        result.tidlog_copy = str(_copy_tidlog(config, name, result))
        args = (["-F"] if full else []) + (["-z"] if gzip else []) + (["-Q"] if quick else [])
        ids = sorted(config.storages)
        workers = max(1, min(jobs or os.cpu_count() or 1, len(ids)))

        mutex = threading.Lock()

        def one(sid: str) -> StorageBackup:
            r = _backup_storage(config.storages[sid], name, args, progress, children)
            if after_storage is not None:
                with mutex:
                    after_storage(r)
            return r

        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="backup") as pool:
            try:
                for r in pool.map(one, ids):
                    result.storages[r.id] = r
                    result.warnings += r.warnings
            except BaseException:
                children.kill_all()  # e.g. KeyboardInterrupt: the workers end at once
                raise
        if all(r.ok for r in result.storages.values()):
            newest = max([name] + [f[:19] for r in result.storages.values() for f in r.files
                                   if DATA_FILE_RE.fullmatch(f)])
            end = max(format_timestamp(clock()), newest)
            append_line(config.backup.timestamp_file, end)
            result.timestamp = end
    result.seconds = time.monotonic() - t0
    return result

