"""``tidstorage backup``: TID log copy, repozo backups, blob snapshots.

One backup, named by the UTC time it starts (``T``, repozo's
``YYYY-MM-DD-HH-MM-SS`` format):

1. take the backup lock (``status_file_backup_dir/.tidstorage-backup.lock``,
   an ``flock``); its descriptor is inherited by every repozo child, so the
   lock is held until the last of them has exited, even if the backup
   process dies; wait, if needed, until ``T`` is newer than every name already used
   (timestamps, TID log copies, repository files, blob snapshots), so that
   names sort like backups;
2. ask the daemon for its published point and its lag (the status command;
   ``--max-lag`` fails here when it lags, is not bootstrapped or cannot be
   reached; otherwise a warning), then copy the daemon's TID log
   (``server.status_file``) to ``status_file_backup_dir/<log name>-T``
   (temporary file, fsync, rename) with, appended to the copy only, a full
   record of the daemon's point when it is ahead of the log's last record
   (up to ``burst_period`` behind): the restore point is the daemon's point
   at backup time. Every TID either publishes is already in each
   ``Data.fs`` (the daemon publishes only what it has read there);
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

The repositories and the TID log copies carry the set's identity (see
:mod:`tidstorage.tools.identity`): a backup refuses another set's.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError
from ..errors import ToolError
from ..formats import blobs
from ..formats import repozo as rz
from ..formats.durable import append_line, atomic_write, fsync_dir, fsync_file
from ..formats.tidlog import TidLogError, read_log
from .common import (
    BACKUP_LOCK,
    Lock,
    Progress,
    blob_backup_dir,
    os_error_text,
    read_timestamps,
    require,
    require_storages,
    tidlog_copies,
    wait_writing,
)
from .identity import ensure_identities, tidlog_identity_path, write_identity

__all__ = [
    "INTERRUPTED_DIR",
    "BackupResult",
    "Progress",
    "StorageBackup",
    "DaemonPoint",
    "check_backup_config",
    "check_freshness",
    "daemon_point",
    "fetch_tidlog",
    "clear_debris",
    "repository_debris",
    "run_backup",
]

# ---------------------------------------------------------------------------
# Backup
# ---------------------------------------------------------------------------



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


#: A backup warns when a storage's lag (see ``coordinator.lag``) reaches this.
LAG_WARNING = 10.0
#: How long a backup waits for the daemon's answer (seconds).
DAEMON_TIMEOUT = 5.0


@dataclass
class DaemonPoint:
    """What the daemon said when the backup started."""

    published: dict[str, int]
    lags: dict[str, float | None]
    bootstrapped: bool

    def max_lag(self, storages) -> float | None:
        """The largest lag of ``storages`` (None: one is unknown)."""
        lags = [self.lags.get(s) for s in storages]
        return None if any(lag is None for lag in lags) else max(lags, default=0.0)


def daemon_point(config: Config, timeout: float = DAEMON_TIMEOUT) -> DaemonPoint:
    """The daemon's published point and lags (ClientError if unreachable)."""
    from ..errors import ClientError

    with _client(config, timeout) as client:
        answer = client.admin({"verb": "status"})
    if not answer.get("ok"):
        raise ClientError(f"the daemon refused the status request: {answer.get('error')}")
    storages = answer.get("storages", {})
    return DaemonPoint(
        published={s: int(t) for s, t in answer.get("published", {}).items()},
        lags={s: info.get("lag") for s, info in storages.items()},
        bootstrapped=bool(answer.get("bootstrapped")))


def _client(config: Config, timeout: float):
    from ..daemon.client import Client

    ssl_context = None
    if config.server.tls_cert is not None:
        import ssl

        ssl_context = ssl.create_default_context(cafile=str(config.server.tls_cert))
    return Client((config.server.address, config.server.port), auth_token=config.auth_token(),
                  timeout=timeout, ssl_context=ssl_context)


def fetch_tidlog(config: Config, timeout: float = DAEMON_TIMEOUT, tries: int = 3) -> bytes:
    """The daemon's TID log, asked over its authenticated protocol (ADMIN
    ``tidlog``, page by page): what a backup on a host that is not the
    daemon's copies.  Started again (up to ``tries`` times) if the file was
    replaced between pages (SIGHUP, an operator's correction).  ClientError
    if the daemon cannot be reached or refuses."""
    import base64

    from ..errors import ClientError

    for _ in range(tries):
        chunks, offset, ident = [], 0, None
        with _client(config, timeout) as client:
            while True:
                answer = client.admin({"verb": "tidlog", "offset": offset})
                if not answer.get("ok"):
                    raise ClientError("the daemon refused the tidlog request: "
                                      f"{answer.get('error')}")
                if ident is None:
                    ident = answer.get("file")
                elif answer.get("file") != ident:
                    break  # replaced: start again
                data = base64.b64decode(answer.get("data", ""))
                chunks.append(data)
                offset += len(data)
                if not data or offset >= int(answer.get("size", 0)):
                    return b"".join(chunks)
    raise ClientError(f"the daemon's TID log was replaced {tries} times while it was read")


def check_freshness(config: Config, max_lag: float | None, warnings: list[str],
                    timeout: float = DAEMON_TIMEOUT) -> DaemonPoint | None:
    """Ask the daemon; with ``max_lag``, raise ToolError (nothing is backed
    up) when its point lags more, is not bootstrapped or the daemon cannot
    be reached; otherwise append warnings. None: no answer."""
    from ..errors import ClientError

    where = f"{config.server.address}:{config.server.port}"
    try:
        point = daemon_point(config, timeout)
    except (ClientError, ConfigError, OSError) as exc:
        text = (f"cannot ask the daemon at {where} for its point ({exc}): the restore point"
                " is the TID log's last record, which may be older")
        if max_lag is not None:
            raise ToolError(f"{text}; --max-lag given: no backup made") from None
        warnings.append(text)
        return None
    ids = sorted(config.storages)
    if not point.bootstrapped:
        text = (f"the daemon at {where} has not completed its bootstrap: its point is the"
                " TID log's, behind what the storages hold")
        if max_lag is not None:
            raise ToolError(f"{text}; --max-lag given: no backup made")
        warnings.append(text)
    lag = point.max_lag(ids)
    worst = ", ".join(f"{s} {point.lags[s]:.1f} s" for s in ids
                      if point.lags.get(s) is not None and point.lags[s] >= min(
                          LAG_WARNING, max_lag if max_lag is not None else LAG_WARNING))
    if lag is None:
        unknown = ", ".join(s for s in ids if point.lags.get(s) is None)
        text = f"the lag of storage(s) {unknown} is unknown (not read by the daemon yet)"
        if max_lag is not None:
            raise ToolError(f"{text}; --max-lag given: no backup made")
        warnings.append(text)
    elif max_lag is not None and lag > max_lag:
        raise ToolError(f"the published point lags {lag:.1f} s (> --max-lag {max_lag:g} s:"
                        f" {worst}): a restore would lose that much; no backup made")
    elif lag >= LAG_WARNING:
        warnings.append(f"the published point lags {lag:.1f} s ({worst}): a restore of this"
                        " backup loses the transactions committed in that time")
    return point


@dataclass
class BackupResult:
    started: str
    timestamp: str | None = None    # appended to timestamp_file (success only)
    tidlog_copy: str | None = None
    #: "daemon" (the daemon's point at backup time) or "tidlog" (its last record)
    point_source: str | None = None
    #: where the TID log came from: "file" (server.status_file on this host)
    #: or "daemon" (asked over the protocol: a host that is not the daemon's)
    tidlog_source: str | None = None
    #: the restore point the TID log copy ends with
    point: dict[str, int] = field(default_factory=dict)
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
            "point_source": self.point_source, "point": self.point,
            "tidlog_source": self.tidlog_source,
            "warnings": self.warnings,
            "storages": {s: r.to_json() for s, r in sorted(self.storages.items())},
        }


def check_backup_config(config: Config) -> None:
    """ConfigError (exit 2) unless the config has what a backup needs."""
    require_storages(config)
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
        files = rz.data_files(st.backup_dir)
        if files:
            names.append(rz.file_date(files[-1]))
        snaps = blobs.list_snapshots(blob_backup_dir(st.backup_dir))
        names += snaps[-1:]
    return max(names)


def _start_name(config: Config, clock: Callable[[], float]) -> str:
    latest = _latest_name(config)
    deadline = clock() + 3.0
    while True:
        now = clock()
        name = rz.format_timestamp(now)
        if name > latest:
            return name
        if now > deadline:
            raise ToolError(f"a backup named {latest} already exists and the clock says "
                            f"{name}: is the clock behind?")
        time.sleep(min(1.0, 1.0 - math.fmod(now, 1.0) + 0.01))


def _with_point(data: bytes, log_tids: dict[str, int], last_time: float | None,
                point: DaemonPoint, warnings: list[str]) -> tuple[bytes, dict[str, int]]:
    """``data`` (a TID log) with a full record of the daemon's point
    appended when that point is ahead of the log's last state (each is a
    point the daemon published; points only grow, so one is at or above
    the other: the log may be the newer when the daemon wrote a record
    after answering)."""
    from ..formats.tidlog import KIND_FULL, TIMESTAMP_STEP, encode_record

    daemon = point.published
    ids = set(daemon) | set(log_tids)
    if all(daemon.get(s, -1) <= log_tids.get(s, -1) for s in ids):
        return data, log_tids  # the log is as new
    if not all(daemon.get(s, -1) >= log_tids.get(s, -1) for s in ids):
        # Neither is above the other: an operator's correction in between.
        warnings.append("the daemon's point and the TID log's last state differ both ways"
                        " (an operator's correction during the backup?): the backup keeps"
                        " the log's point")
        return data, log_tids
    merged = {**log_tids, **daemon}
    now = time.time()
    if last_time is not None and now <= last_time:
        now = last_time + TIMESTAMP_STEP
    if data and not data.endswith(b"\n"):
        data += b"\n"  # a torn last line: it never counted
    return data + encode_record(now, KIND_FULL, merged), merged


def _copy_tidlog(config: Config, name: str, result: BackupResult, set_id: str,
                 point: DaemonPoint | None = None) -> Path:
    log = config.server.status_file
    dest_dir = config.backup.status_file_backup_dir
    try:
        data = log.read_bytes()
        result.tidlog_source = "file"
    except FileNotFoundError:
        if point is None:
            raise ToolError(f"TID log {log} (server.status_file) does not exist: "
                            "has the daemon run?") from None
        # issue 13: a host that is not the daemon's gets the log from it
        from ..errors import ClientError
        try:
            data = fetch_tidlog(config)
        except (ClientError, OSError) as exc:
            raise ToolError(f"TID log {log} (server.status_file) is not on this host and the"
                            f" daemon did not send it: {exc}; no backup made") from None
        result.tidlog_source = "daemon"
    except OSError as exc:
        raise ToolError(f"cannot read TID log {log}: {exc.strerror}") from None
    dest = dest_dir / f"{log.name}-{name}"
    result.point_source = "tidlog"
    if point is not None:
        try:
            atomic_write(dest, data)
            contents = read_log(dest)
        except (TidLogError, OSError):
            contents = None  # reported below
        if contents is not None:
            tids = contents.final_tids()
            last = contents.records[-1].time if contents.records else None
            data, _ = _with_point(data, tids, last, point, result.warnings)
            result.point_source = "daemon"  # the copy ends at the daemon's point (or newer)
    try:
        atomic_write(dest, data)
        write_identity(tidlog_identity_path(dest), set_id=set_id, role="tidlog",
                       sha256=hashlib.sha256(data).hexdigest())
    except OSError as exc:
        raise ToolError(f"cannot copy the TID log to {dest}: {exc.strerror or exc}") from None
    try:
        tids = read_log(dest).final_tids()
    except TidLogError as exc:  # a corrupt record in the middle: its points are wrong
        dest.unlink()
        tidlog_identity_path(dest).unlink()
        raise ToolError(f"TID log {log} (server.status_file) is corrupt: {exc.reason} "
                        f"(line {exc.lineno}); no backup made") from None
    result.point = tids
    missing = sorted(set(config.storages) - set(tids))
    if missing:
        result.warnings.append(
            f"TID log {log} has no TID for storage(s) {', '.join(missing)}: this backup "
            "can only be restored with --no-cut or another TID log (-t)")
    return dest


def _incremental_estimate(repo: Path, size: int) -> int:
    """Bytes repozo will copy for an incremental backup (from the .dat)."""
    fulls = rz.full_files(repo)
    if not fulls:
        return size
    try:
        end = rz.read_dat(rz.dat_path(repo, fulls[-1]))[-1].end
    except (OSError, IndexError, ValueError):  # no estimate: the whole file
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
    argv = rz.repozo_argv() + ["-B", "-r", str(repo), "-f", str(st.data_fs)] + args
    size = st.data_fs.stat().st_size
    total = size if "-F" in args or not rz.data_files(repo) else _incremental_estimate(repo, size)
    tmp = repo / rz.SCRATCH_FILE
    proc = children.start(argv)
    try:
        return wait_writing(proc, st.id, tmp, total, progress)
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt): never leave it running
            proc.kill()
            proc.wait()
        children.done(proc)




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
    if (repo / rz.SCRATCH_FILE).exists():
        out.append((rz.SCRATCH_FILE, "repozo's scratch file"))
    files = rz.data_files(repo)
    fulls = [n for n in files if rz.is_full(n)]
    bad: set[str] = set()
    if fulls:
        dat = rz.dat_path(repo, fulls[-1])
        try:
            listed = {e.name for e in rz.read_dat(dat)}
        except FileNotFoundError:
            listed = set()
        except (OSError, ValueError):
            return out  # restore reports a damaged .dat; not debris to guess about
        start = rz.file_date(fulls[-1])
        bad = {n for n in files if rz.file_date(n) >= start and n not in listed}
        out += [(n, f"a data file not listed in {dat.name}") for n in sorted(bad)]
    newest = max((rz.file_date(n) for n in files if n not in bad), default="")
    for n in rz.index_files(repo):
        if rz.file_date(n) > newest:
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
        if name == rz.SCRATCH_FILE:
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
    fsync_dir(repo)


def _remove_debris(repo: Path, new: list[str]) -> None:
    """After a failed repozo run: its scratch file, and an index it wrote
    for a data file it did not finish."""
    (repo / rz.SCRATCH_FILE).unlink(missing_ok=True)
    dates = {rz.file_date(n) for n in rz.data_files(repo)}
    for n in new:
        if rz.is_index(n) and rz.file_date(n) not in dates:
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
        new = sorted(set(os.listdir(repo)) - before - {rz.SCRATCH_FILE})
        r.files = new
        if code != 0:
            _remove_debris(repo, new)
            last = err.splitlines()[-1] if err else f"exit status {code}"
            raise ToolError(f"storage {st.id}: repozo -B failed ({repo}): {last}")
        new_data = [n for n in new if rz.is_data_file(n)]
        r.mode = ("full" if any(rz.is_full(n) for n in new_data)
                  else "incremental" if new_data else "unchanged")
        r.bytes = sum((repo / n).stat().st_size for n in new_data)
        for n in new:  # repozo does not fsync the .index it writes
            fsync_file(repo / n)
        fsync_dir(repo)
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
        for n in rz.index_files(repo)[:-1]:
            (repo / n).unlink()
            r.removed_indexes.append(n)
        r.ok = True
    except ToolError as exc:
        r.error = str(exc)
    except OSError as exc:
        r.error = f"storage {st.id}: {os_error_text(exc)}"
    except Exception as exc:  # noqa: BLE001 -- a bug must not pass for a success
        r.error = f"storage {st.id}: {type(exc).__name__}: {exc}"
    r.seconds = time.monotonic() - t0
    if progress is not None:
        progress(st.id, "done" if r.ok else "failed", r.bytes, None)
    return r


def run_backup(config: Config, *, full: bool = False, gzip: bool = False, quick: bool = False,
               jobs: int | None = None, progress: Progress | None = None,
               after_storage: Callable[[StorageBackup], None] | None = None,
               clock: Callable[[], float] = time.time, max_lag: float | None = None,
               ask_daemon: bool = True) -> BackupResult:
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
        set_id = ensure_identities(config)
        point = (check_freshness(config, max_lag, result.warnings) if ask_daemon else None)
        result.tidlog_copy = str(_copy_tidlog(config, name, result, set_id, point))
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
            newest = max([name] + [rz.file_date(f) for r in result.storages.values()
                                   for f in r.files if rz.is_data_file(f)])
            end = max(rz.format_timestamp(clock()), newest)
            if config.backup.target is not None:  # issue 13: upload, record in the store
                from .objectstore import push
                push(config, end, progress=progress)
            append_line(config.backup.timestamp_file, end)
            result.timestamp = end
    result.seconds = time.monotonic() - t0
    return result

