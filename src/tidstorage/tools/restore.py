"""``tidstorage restore`` and ``tidstorage repair``, and the cut they share.

The cut
-------

Each ``Data.fs`` is cut just after its last transaction whose TID is <= the
storage's TID in a TID log (:func:`tidstorage.formats.filestorage.find_cut`: a backward
walk from the end).  Then the stamps in the files' tails are checked
(:func:`tidstorage.tools.verify.check`): if the TID log's point splits a
multi-storage transaction (a stale or damaged log), the cut is lowered to the
largest coherent one, and the output says so -- by at most
:data:`MAX_CUT_LOWERING` without ``--force-cut``.  After cutting, the files
are checked again.  Blob files of the revisions dropped by the cut are pruned.

Restore
-------

From the repozo repositories, as of the last backup recorded in
``timestamp_file`` (or the last one at or before ``--date``); with the TID
log copy saved by that backup (or ``-t``).  The repositories and the TID
log must be this set's (see "Identity" in :mod:`tidstorage.tools.backup`).
Everything is checked before anything is written (the recorded backup still
restorable, repository files listed by repozo's ``.dat`` present
and of the right size; the checksums are verified by ``repozo -R -w`` while
it recovers, which costs no extra read).  Each storage is recovered into a
temporary file in the destination directory, cut, then renamed over the
destination (``--force`` needed if it exists, which is then kept as
``<file>.before-restore``, a hard link); the stale ``.index`` is
removed first, so a restored ``Data.fs`` never sits beside an index of
another file.  Any failure removes the temporary files: the destination is
as it was.

Repair
------

In place, after a crash: each live ``Data.fs`` is cut at its published TID
in the daemon's TID log (or ``-t``).  Refused while a process holds a
storage's ``Data.fs.lock``; the locks are held during the repair.  Before a
file is cut, it is copied to ``Data.fs.before-repair`` and the copy is
checked (size, SHA-256 read back from disk); pruned blob files are moved to
``<blob_dir>.before-repair``.  A leftover safety copy is never overwritten:
the repair refuses and says what to do.  Resumable: the plan is recorded
beside each ``Data.fs`` before anything changes, and a re-run replays it
(see :func:`run_repair`).  Re-running a finished repair changes nothing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError, StorageConfig
from ..core.tids import tid_seconds
from ..formats import blobs, filestorage
from ..formats.filestorage import CutPoint, ScanError
from ..formats.tidlog import read_log
from . import verify
from .backup import (
    FULL_EXTS,
    Lock,
    ToolError,
    blob_backup_dir,
    check_identities,
    check_tidlog_identity,
    data_files,
    id_filename,
    parse_date,
    read_timestamps,
    repozo_argv,
    require,
    tidlog_copies,
)

__all__ = [
    "CACHE_NOTE",
    "SAFETY_SUFFIX",
    "CutDecision",
    "decide_cuts",
    "StorageRestore",
    "RestoreResult",
    "run_restore",
    "RepairResult",
    "run_repair",
]

Echo = Callable[[str], None]

CACHE_NOTE = (
    "ZEO clients that were connected to these storages hold newer data than the "
    "server now has: stop them, delete their persistent caches (*.zec files) and "
    "blob caches, then restart them (otherwise they fail with \"Server behind client\")."
)

#: Suffix of repair's safety copy of a Data.fs (and of the pruned blobs dir).
SAFETY_SUFFIX = ".before-repair"
#: Suffix under which restore keeps a file (or blob directory) it replaces.
RESTORE_SAFETY_SUFFIX = ".before-restore"
_RESTORE_TMP = ".tidstorage-restore"


def _quiet(_: str) -> None:
    pass


def _err(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename:
        text += f": {exc.filename}"
    return text


# ---------------------------------------------------------------------------
# The cut
# ---------------------------------------------------------------------------


@dataclass
class CutDecision:
    """Where one storage's Data.fs is cut."""

    id: str
    path: Path
    size: int
    tid: int                  #: the TID log's TID
    final_tid: int            #: after lowering to the largest coherent cut
    point: CutPoint           #: find_cut(path, final_tid)
    log_point: CutPoint       #: find_cut(path, tid)

    @property
    def lowered(self) -> bool:
        return self.point.offset != self.log_point.offset

    @property
    def changes(self) -> bool:
        return self.point.offset != self.size


#: How far, in seconds of TID time, the stamp check may lower a storage's cut
#: below the TID log's point without ``--force-cut``.  A TID log that
#: describes these files splits only transactions in flight around its point
#: (seconds), or, for a log newer than the backup (``-t``), those committed
#: while the backup ran; an hour covers both for ordinary sets (it is also
#: the default verify window).  Lowering further means that the TID log or
#: the files are not what they claim (another deployment's repository, two
#: storages' repositories swapped): the cut would empty the files.  A cut
#: that would leave nothing where the TID log's point keeps transactions is
#: always beyond the bound.
MAX_CUT_LOWERING = 3600.0


def _lowering(d: CutDecision) -> float:
    """Seconds of TID time the cut was lowered by (inf: to an empty file)."""
    if not d.lowered or d.log_point.last_tid is None:
        return 0.0
    if d.point.last_tid is None:
        return math.inf
    return tid_seconds(d.log_point.last_tid) - tid_seconds(d.point.last_tid)


def _refuse_deep_lowering(cuts: dict[str, CutDecision]) -> None:
    deep = [d for d in cuts.values() if _lowering(d) > MAX_CUT_LOWERING]
    if not deep:
        return
    lines = []
    for d in sorted(deep, key=lambda d: d.id):
        how = ("to an empty file" if d.point.last_tid is None
               else f"by {_lowering(d) / 3600:.1f} hours of commits, to "
                    f"{verify.format_tid(d.point.last_tid)}")
        lines.append(f"storage {d.id}: the stamp check would lower the cut {how} instead of "
                     f"{verify.format_tid(d.log_point.last_tid)} "
                     f"({d.point.dropped - d.log_point.dropped} more transaction(s) dropped)")
    raise ToolError("\n".join(lines + [
        f"that is more than the {MAX_CUT_LOWERING / 3600:g} hour(s) a TID log of these files "
        "can be off by: the TID log or a repository is probably not this set's (another "
        "deployment's, or two storages' swapped); nothing was changed. Check, then use "
        "--force-cut to cut that low anyway"]))


def decide_cuts(paths: dict[str, Path], tids: dict[str, int], *, window: float,
                echo: Echo = _quiet, force_cut: bool = False,
                ) -> tuple[dict[str, CutDecision], verify.VerifyReport]:
    """Cut points at ``tids``, lowered to the largest coherent cut if needed.

    Raises :class:`ToolError` if that lowers a cut by more than
    :data:`MAX_CUT_LOWERING` (unless ``force_cut``).  Also returns the
    verification report (splits at ``tids``, what was read).
    """
    report = verify.check(paths, cut=tids, window=window, compute=True)
    for w in report.windows.values():
        if w.warning:
            echo(f"warning: {w.warning}")
    if report.splits:
        echo(f"the TID log's point splits {len(report.splits)} multi-storage "
             "transaction(s):")
        for sp in report.splits[:20]:
            echo(f"  {verify.describe_split(sp)}")
        if len(report.splits) > 20:
            echo(f"  ... and {len(report.splits) - 20} more")
    out = {}
    for s, path in sorted(paths.items()):
        log_point = filestorage.find_cut(path, tids[s])
        final = report.coherent[s]
        point = log_point if final >= tids[s] else filestorage.find_cut(path, max(final, 0))
        d = CutDecision(s, path, path.stat().st_size, tids[s], final, point, log_point)
        if log_point.warning:
            echo(f"warning: {log_point.warning}")
        last = filestorage.last_tid(path)
        if last is not None and tids[s] > last:
            echo(f"note: storage {s}: the TID log's TID {verify.format_tid(tids[s])} is after "
                 f"the last transaction of {path} ({verify.format_tid(last)})")
        if d.lowered:
            echo(f"storage {s}: cut LOWERED to the largest coherent cut: keeps up to "
                 f"{verify.format_tid(point.last_tid)} instead of "
                 f"{verify.format_tid(log_point.last_tid)} "
                 f"({point.dropped - log_point.dropped} more transaction(s) dropped)")
        out[s] = d
    if not force_cut:
        _refuse_deep_lowering(out)
    return out, report


def confirm_cuts(cuts: dict[str, CutDecision], *, window: float,
                 echo: Echo = _quiet) -> None:
    """After truncation: check that each file ends where it was cut, then
    verify the cut files again (their tails are read anew).  Raises
    :class:`ToolError` if a file is not as intended or a transaction is
    still split."""
    for s, d in sorted(cuts.items()):
        size = d.path.stat().st_size
        last = filestorage.last_tid(d.path)
        if size != d.point.offset or last != d.point.last_tid:
            raise ToolError(f"storage {s}: {d.path} is {size} bytes ending with "
                            f"{verify.format_tid(last)} after cutting, expected "
                            f"{d.point.offset} bytes ending with "
                            f"{verify.format_tid(d.point.last_tid)}")
    after = verify.check({s: d.path for s, d in cuts.items()}, window=window)
    if after.splits:
        for sp in after.splits:
            echo(f"verify: SPLIT {verify.describe_split(sp)}")
        raise ToolError(f"after cutting, {len(after.splits)} transaction(s) are still split")
    echo(f"verify: coherent ({_scanned(after)})")


def _post_check(paths: dict[str, Path], window: float, echo: Echo) -> bool:
    """Verify files that were not cut (restore --no-cut): report only."""
    report = verify.check(paths, window=window)
    if report.ok:
        echo(f"verify: coherent ({_scanned(report)})")
        return True
    for sp in report.splits:
        echo(f"verify: SPLIT {verify.describe_split(sp)}")
    return False


def _scanned(report: verify.VerifyReport) -> str:
    return ", ".join(f"{s}: {w.transactions} transactions read" for s, w in
                     sorted(report.windows.items()))


def _read_tids(path: Path, storages, echo: Echo) -> dict[str, int]:
    if not path.exists():
        raise ToolError(f"TID log {path} does not exist")
    contents = read_log(path)
    if contents.torn_tail:
        echo(f"warning: {path}:{contents.torn_tail[0]}: ignored torn last line")
    tids = contents.final_tids()
    missing = sorted(set(storages) - set(tids))
    if missing:
        raise ToolError(f"storage(s) {', '.join(missing)} missing from TID log {path} "
                        f"(it has: {', '.join(sorted(tids)) or 'nothing'}); nothing was changed")
    return {s: tids[s] for s in storages}


def _describe_cut(d: CutDecision, shown: Path | None = None) -> str:
    p = d.point
    shown = shown or d.path
    if not d.changes:
        return (f"storage {d.id}: {shown}: nothing after {verify.format_tid(p.last_tid)}, "
                "not cut")
    return (f"storage {d.id}: {shown}: cut at offset {p.offset} of {d.size} after "
            f"{verify.format_tid(p.last_tid)}: {p.dropped} transaction(s), "
            f"{d.size - p.offset} bytes dropped")


# ---------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------


@dataclass
class StorageRestore:
    id: str
    repository: Path
    files: list[str]              #: repozo files recovered (oldest first)
    target: Path
    blob_target: Path | None
    snapshot: Path | None
    tid: int | None
    live: Path | None = None      #: --check: the live file compared
    cut: CutDecision | None = None
    size: int = 0                 #: restored size (after the cut)
    blob_files: int = 0
    pruned_blobs: int = 0
    check: dict = field(default_factory=dict)

    @property
    def tmp(self) -> Path:
        return self.target.with_name(f".{self.target.name}{_RESTORE_TMP}")

    @property
    def blob_tmp(self) -> Path | None:
        if self.blob_target is None:
            return None
        return self.blob_target.with_name(f".{self.blob_target.name}{_RESTORE_TMP}")


@dataclass
class RestoreResult:
    date: str
    tidlog: Path | None
    storages: dict[str, StorageRestore]
    ok: bool = True
    coherent: bool | None = None

    def lowered(self) -> list[str]:
        return sorted(s for s, r in self.storages.items() if r.cut and r.cut.lowered)


def backup_problems(config: Config, date: str, *, tidlog_copy: bool = True) -> list[str]:
    """Why the recorded backup ``date`` cannot be restored (empty: it can):
    repository files (checked against the ``.dat``), blob snapshots, and,
    with ``tidlog_copy``, the TID log copy it cuts at."""
    out = []
    for sid, st in sorted(config.storages.items()):
        try:
            _repository_files(sid, st.backup_dir, date)
        except ToolError as exc:
            out.append(str(exc))
        if st.blob_dir is not None and blobs.latest_snapshot(
                blob_backup_dir(st.backup_dir), at_most=date) is None:
            out.append(f"storage {sid}: no blob backup at or before {date} in "
                       f"{blob_backup_dir(st.backup_dir)}")
    directory = config.backup.status_file_backup_dir
    if tidlog_copy and directory is not None:
        base = config.server.status_file.name if config.server.status_file else None
        if not [ts for ts, _ in tidlog_copies(directory, base) if ts <= date]:
            out.append(f"no TID log copy at or before {date} in {directory}")
    return out


def _choose_date(config: Config, date: str | None, echo: Echo, *,
                 tidlog_copy: bool = True) -> str:
    stamps = read_timestamps(config.backup.timestamp_file)
    if date is None:
        if not stamps:
            raise ToolError(f"no backup recorded in timestamp file "
                            f"{config.backup.timestamp_file}: give --date")
        chosen = stamps[-1]
    else:
        wanted = parse_date(date)
        if not stamps:
            echo(f"note: no backup recorded in {config.backup.timestamp_file}; "
                 f"restoring the repositories as of {wanted}")
            return wanted
        before = [t for t in stamps if t <= wanted]
        if not before:
            raise ToolError(f"no backup at or before {wanted} (the oldest in "
                            f"{config.backup.timestamp_file} is {stamps[0]}; older ones "
                            "were removed by cleanup, or never made)")
        chosen = before[-1]
    problems = backup_problems(config, chosen, tidlog_copy=tidlog_copy)
    if problems:
        others = [t for t in stamps if t != chosen
                  and not backup_problems(config, t, tidlog_copy=tidlog_copy)]
        hint = (f"restorable recorded backups: {', '.join(others[-5:])}"
                + (" (and older)" if len(others) > 5 else "") + " (use --date)"
                if others else "no recorded backup is restorable")
        raise ToolError("\n".join(
            [f"backup {chosen}, recorded in {config.backup.timestamp_file}, cannot be "
             "restored any more:"] + [f"  {p}" for p in problems]
            + [f"its files were deleted or damaged since it was recorded; {hint}; "
               "`tidstorage cleanup` removes such entries; nothing was changed"]))
    if date is not None and chosen != parse_date(date):
        echo(f"restoring the last complete backup at or before {parse_date(date)}: {chosen}")
    return chosen


def _choose_tidlog(config: Config, date: str, tidlog: Path | None) -> Path:
    if tidlog is not None:
        return tidlog
    directory = config.backup.status_file_backup_dir
    base = config.server.status_file.name if config.server.status_file else None
    copies = [p for ts, p in tidlog_copies(directory, base) if ts <= date]
    if not copies:
        raise ToolError(f"no TID log copy at or before {date} in {directory}: give a TID "
                        "log with -t, or restore without cutting (--no-cut)")
    return copies[-1]


def _repository_files(sid: str, repo: Path, date: str) -> list[str]:
    """The repozo files recovering ``repo`` as of ``date``, after checking
    them against the chain's ``.dat`` (presence, sizes, continuity)."""
    if not repo.is_dir():
        raise ToolError(f"storage {sid}: backup directory {repo} does not exist")
    needed = []
    for name in reversed(data_files(repo)):
        if name[:19] <= date:
            needed.append(name)
            if name.endswith(FULL_EXTS):
                break
    needed.reverse()
    if not needed:
        raise ToolError(f"storage {sid}: no backup at or before {date} in {repo}")
    if not needed[0].endswith(FULL_EXTS):
        raise ToolError(f"storage {sid}: no full backup at or before {date} in {repo} "
                        f"(only incremental files: {needed[0]} ...)")
    dat = repo / (needed[0][:19] + ".dat")
    try:
        lines = [ln.split() for ln in dat.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise ToolError(f"storage {sid}: {dat} is missing (repozo's list of the files "
                        f"of the backup chain starting at {needed[0]})") from None
    listed = {}
    end = 0
    for fields in lines:
        if len(fields) != 4:
            raise ToolError(f"storage {sid}: {dat}: malformed line {' '.join(fields)!r}")
        name = os.path.basename(fields[0])
        try:
            start, stop = int(fields[1]), int(fields[2])
        except ValueError:
            raise ToolError(f"storage {sid}: {dat}: malformed line {' '.join(fields)!r}") from None
        if name[:19] > date:
            break
        if start != end:
            raise ToolError(f"storage {sid}: {dat}: {name} starts at {start}, the previous "
                            f"file ends at {end}: the chain is broken")
        end = stop
        listed[name] = stop - start
        path = repo / name
        if not path.exists():
            raise ToolError(f"storage {sid}: repository file {path} is missing")
        if not name.endswith("z") and path.stat().st_size != stop - start:
            raise ToolError(f"storage {sid}: repository file {path} is "
                            f"{path.stat().st_size} bytes, should be {stop - start} "
                            "(corrupt or truncated)")
    for name in needed:
        if name not in listed:
            raise ToolError(f"storage {sid}: repository file {repo / name} is not listed in "
                            f"{dat}: cannot verify it")
    return needed


def _check_config(config: Config, *, output_dir, check: bool, date, no_cut, tidlog) -> None:
    if not config.storages:
        raise ConfigError(f"{config.path}: storages: no storage configured")
    if date is None:
        require(config.backup.timestamp_file, "backup.timestamp_file",
                "restore (or give --date)")
    if not no_cut and tidlog is None:
        require(config.backup.status_file_backup_dir, "backup.status_file_backup_dir",
                "restore (the TID log copies; or give -t, or --no-cut)")
    for st in config.storages.values():
        require(st.backup_dir, f"storages.{st.name}.backup_dir", "restore")
        if output_dir is None or check:
            require(st.data_fs, f"storages.{st.name}.data_fs",
                    "restore --check" if check else "restore (or use --output-dir)")


def _plan(config, date, tids, output_dir, check_dirs) -> dict[str, StorageRestore]:
    plans, errors = {}, []
    for sid, st in sorted(config.storages.items()):
        try:
            files = _repository_files(sid, st.backup_dir, date)
        except ToolError as exc:
            errors.append(str(exc))
            continue
        snap = None
        if st.blob_dir is not None:
            snap = blobs.latest_snapshot(blob_backup_dir(st.backup_dir), at_most=date)
            if snap is None:
                errors.append(f"storage {sid}: no blob backup at or before {date} in "
                              f"{blob_backup_dir(st.backup_dir)}")
                continue
        if check_dirs is not None:
            target, blob_target = output_paths(check_dirs[sid], sid)
        elif output_dir is not None:
            target, blob_target = output_paths(output_dir, sid)
        else:
            target, blob_target = st.data_fs, st.blob_dir
        plans[sid] = StorageRestore(
            id=sid, repository=st.backup_dir, files=files, target=target,
            blob_target=blob_target if st.blob_dir is not None else None, snapshot=snap,
            tid=None if tids is None else tids[sid],
            live=st.data_fs if check_dirs is not None else None)
    if errors:
        raise ToolError("\n".join(errors + ["nothing was changed"]))
    return plans


def output_paths(directory: Path, storage_id: str) -> tuple[Path, Path]:
    """``DIR/<id>.fs`` and ``DIR/<id>.blobs`` (the id quoted: never outside DIR)."""
    name = id_filename(storage_id)
    return directory / f"{name}.fs", directory / f"{name}.blobs"


def migrate_output_names(directory: Path, ids, echo: Echo = _quiet) -> list[tuple[Path, Path]]:
    """Rename what an earlier restore ``--output-dir`` wrote under the raw
    id (before ids were quoted) to the quoted name, so that it is found
    (and protected: replacing it still needs ``--force``).  Only names that
    stay inside ``directory`` and whose new name is free are renamed.
    Returns the (old, new) pairs renamed."""
    done = []
    top = directory.resolve()
    for sid in sorted(ids):
        new_fs, new_blobs = output_paths(directory, sid)
        pairs = [(directory / f"{sid}.fs", new_fs), (directory / f"{sid}.blobs", new_blobs)]
        pairs += [(Path(f"{old}{sfx}"), Path(f"{new}{sfx}")) for old, new in pairs[:1]
                  for sfx in (".index",)]
        for old, new in pairs:
            if old == new or not os.path.lexists(old) or os.path.lexists(new):
                continue
            if "/" in sid or old.resolve().parent != top or old.is_symlink():
                echo(f"warning: {old} looks like an old-style restore of storage {sid!r} "
                     "outside the output directory: left alone")
                continue
            os.rename(old, new)
            done.append((old, new))
            echo(f"note: renamed {old} (named the old way) to {new}")
    if done:
        blobs.fsync_dir(directory)
    return done


def _refuse_overwrite(plans: dict[str, StorageRestore], force: bool) -> None:
    errors = []
    for r in plans.values():
        if r.target.exists() and not force:
            errors.append(f"storage {r.id}: {r.target} exists (use --force to replace it, "
                          "or --output-dir to restore elsewhere)")
        if (r.blob_target is not None and r.blob_target.exists() and not force
                and any(r.blob_target.iterdir())):
            errors.append(f"storage {r.id}: blob directory {r.blob_target} exists and is "
                          "not empty (use --force to replace it)")
        if r.target.is_dir():
            errors.append(f"storage {r.id}: {r.target} is a directory")
        for what, old in (("file", r.target), ("blob directory", r.blob_target)):
            if old is None or not os.path.lexists(old):
                continue
            kept = Path(f"{old}{RESTORE_SAFETY_SUFFIX}")
            if os.path.lexists(kept):
                errors.append(f"storage {r.id}: {kept} (the {what} an earlier restore "
                              "replaced) exists: it is never overwritten; check it, then "
                              "delete or move it away")
    if errors:
        raise ToolError("\n".join(errors + ["nothing was changed"]))


def _cleanup(r: StorageRestore) -> None:
    for p in (r.tmp, Path(f"{r.tmp}.part"), Path(f"{r.tmp}.index"),
              Path(f"{r.tmp}.index.index_tmp")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    if r.blob_tmp is not None and r.blob_tmp.exists():
        shutil.rmtree(r.blob_tmp, ignore_errors=True)


def _recover(r: StorageRestore, date: str) -> None:
    r.target.parent.mkdir(parents=True, exist_ok=True)
    _cleanup(r)  # leftovers of an interrupted restore: ours, never the user's
    argv = repozo_argv() + ["-R", "-w", "-r", str(r.repository), "-D", date, "-o", str(r.tmp)]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not r.tmp.exists():
        err = proc.stderr.decode(errors="replace").strip()
        last = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
        raise ToolError(f"storage {r.id}: repozo -R failed ({r.repository} as of {date}): {last}")
    if r.snapshot is not None:
        try:
            r.blob_files, _ = blobs.copy_tree(r.snapshot, r.blob_tmp)
        except OSError as exc:
            raise ToolError(f"storage {r.id}: cannot copy blobs from {r.snapshot}: "
                            f"{_err(exc)}") from None


def _install(r: StorageRestore) -> None:
    """Rename the restored files over the target (the stale index first)."""
    parent = r.target.parent
    blobs.fsync_file(r.tmp)  # repozo -R does not fsync what it writes
    for suffix in (".index", ".index.index_tmp"):
        Path(f"{r.target}{suffix}").unlink(missing_ok=True)
    if os.path.lexists(r.target):  # keep what is replaced: a hard link, the same bytes
        kept = Path(f"{r.target}{RESTORE_SAFETY_SUFFIX}")
        size = r.target.stat().st_size
        try:
            os.link(r.target, kept)
        except OSError:  # no hard links here: a checked copy
            safety_copy(r.target, kept)
        if not (kept.stat().st_size == size and os.path.samefile(kept, r.target)
                or _same_bytes(kept, r.target)):
            raise ToolError(f"storage {r.id}: the safety copy {kept} of {r.target} does not "
                            "match it")
    blobs.fsync_dir(parent)
    os.replace(r.tmp, r.target)
    tmp_index = Path(f"{r.tmp}.index")
    if tmp_index.exists():
        os.replace(tmp_index, f"{r.target}.index")
    blobs.fsync_dir(parent)
    if r.blob_tmp is not None and r.blob_tmp.exists():
        if os.path.lexists(r.blob_target):
            if r.blob_target.is_dir() and not any(r.blob_target.iterdir()):
                r.blob_target.rmdir()
            else:
                os.rename(r.blob_target, f"{r.blob_target}{RESTORE_SAFETY_SUFFIX}")
        os.rename(r.blob_tmp, r.blob_target)
        blobs.fsync_dir(r.blob_target.parent)


def _digest(path: Path, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _compare(r: StorageRestore, echo: Echo) -> bool:
    live, restored = r.live, r.target
    if not live.exists():
        echo(f"storage {r.id}: live file {live} does not exist; restored {r.size} bytes")
        r.check = {"live_size": None, "restored_size": r.size, "ok": False}
        return False
    ls, rs = live.stat().st_size, restored.stat().st_size
    common = min(ls, rs)
    same = _digest(live, common) == _digest(restored, common)
    ok = same and rs <= ls
    if rs < ls:
        size_text = f"shorter than the live file by {ls - rs} bytes ({(ls - rs) / ls:.2%})"
    elif rs > ls:
        size_text = (f"LONGER than the live file by {rs - ls} bytes: was the live file "
                     "packed or cut since the backup?")
    else:
        size_text = "same size as the live file"
    echo(f"storage {r.id}: restored {rs} bytes, {size_text}; common prefix "
         f"({common} bytes) {'identical' if same else 'DIFFERENT (sha256 mismatch)'}")
    missing_blobs = 0
    live_blobs = r.check.get("live_blob_dir")
    restored_blobs = r.blob_target
    if live_blobs is not None and restored_blobs is not None and restored_blobs.exists():
        for path, _oid, _tid in blobs.blob_files(restored_blobs):
            other = Path(live_blobs) / os.path.relpath(path, restored_blobs)
            if not other.exists() or other.stat().st_size != path.stat().st_size:
                missing_blobs += 1
        echo(f"storage {r.id}: {r.blob_files - r.pruned_blobs} blob file(s) restored, "
             f"{missing_blobs} missing or different in {live_blobs}")
    r.check.update({"live_size": ls, "restored_size": rs, "prefix_identical": same,
                    "blobs_missing_in_live": missing_blobs, "ok": ok})
    return ok


def run_restore(config: Config, *, date: str | None = None, tidlog: Path | None = None,
                no_cut: bool = False, output_dir: Path | None = None, force: bool = False,
                check: bool = False, window: float = verify.DEFAULT_WINDOW,
                jobs: int | None = None, force_cut: bool = False,
                echo: Echo = _quiet) -> RestoreResult:
    """Restore every storage (see the module docstring).

    The repositories and the TID log must be this set's (see "Identity" in
    :mod:`tidstorage.tools.backup`); a cut lowered by more than
    :data:`MAX_CUT_LOWERING` needs ``force_cut``; an existing file (or blob
    directory) is replaced only with ``force``, after it was kept as
    ``<file>.before-restore`` (a hard link: the same bytes).

    Raises :class:`ToolError` (nothing changed) or ConfigError.  With
    ``check``, restores into temporary directories beside the live files,
    compares, deletes them, and sets ``result.ok`` to the comparison's
    outcome.
    """
    _check_config(config, output_dir=output_dir, check=check, date=date, no_cut=no_cut,
                  tidlog=tidlog)
    set_id = check_identities(config, for_what="restore")
    date = _choose_date(config, date, echo, tidlog_copy=not no_cut and tidlog is None)
    tids = None
    log_path = None
    if not no_cut:
        log_path = _choose_tidlog(config, date, tidlog)
        if not log_path.exists():
            raise ToolError(f"TID log {log_path} does not exist")
        check_tidlog_identity(config, log_path, set_id, chosen=tidlog is None)
        tids = _read_tids(log_path, config.storages, echo)
    elif tidlog is not None:
        raise ConfigError("-t/--tidlog makes no sense with --no-cut")
    check_dirs = None
    if check:
        check_dirs = {}
    if output_dir is not None and output_dir.is_dir():
        migrate_output_names(output_dir, config.storages, echo)
    try:
        if check:
            for sid, st in config.storages.items():
                where = st.data_fs.parent if st.data_fs.parent.is_dir() else None
                check_dirs[sid] = Path(tempfile.mkdtemp(prefix=".tidstorage-check-",
                                                        dir=where))
        plans = _plan(config, date, tids, output_dir, check_dirs)
        if check:
            for sid, r in plans.items():
                r.check["live_blob_dir"] = (str(config.storages[sid].blob_dir)
                                            if config.storages[sid].blob_dir else None)
        else:
            _refuse_overwrite(plans, force)
        result = RestoreResult(date=date, tidlog=log_path, storages=plans)
        echo(f"restoring {len(plans)} storage(s) as of {date}"
             + (f", cut at the TIDs of {log_path}" if log_path else ", without cutting"))
        locks = []
        try:
            if output_dir is None and not check:
                for r in plans.values():
                    r.target.parent.mkdir(parents=True, exist_ok=True)
                    locks.append(Lock(Path(f"{r.target}.lock"),
                                      f"storage {r.id}: {r.target} is in use, stop its "
                                      "server first"))
            _restore_all(config, plans, date, tids, window, jobs, echo, result, force_cut)
        finally:
            for lock in locks:
                lock.release()
        if check:
            result.ok = all([_compare(r, echo) for r in plans.values()])
        return result
    finally:
        if check_dirs:
            for d in check_dirs.values():
                shutil.rmtree(d, ignore_errors=True)


def _restore_all(config, plans, date, tids, window, jobs, echo, result, force_cut) -> None:
    try:
        workers = max(1, min(jobs or os.cpu_count() or 1, len(plans)))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
            futures = {pool.submit(_recover, r, date): r for r in plans.values()}
            errors = []
            for fut in concurrent.futures.as_completed(futures):
                try:
                    fut.result()
                except ToolError as exc:
                    errors.append(str(exc))
                except OSError as exc:
                    errors.append(f"storage {futures[fut].id}: {_err(exc)}")
        if errors:
            raise ToolError("\n".join(sorted(errors) + ["nothing was changed"]))
        for r in plans.values():
            echo(f"storage {r.id}: recovered {r.tmp.stat().st_size} bytes from "
                 f"{len(r.files)} repozo file(s) ({r.files[0]} .. {r.files[-1]})"
                 + (f" and {r.blob_files} blob file(s) from {r.snapshot}" if r.snapshot else ""))
        paths = {s: r.tmp for s, r in plans.items()}
        if tids is not None:
            cuts, _report = decide_cuts(paths, tids, window=window, echo=echo,
                                        force_cut=force_cut)
            for s, d in cuts.items():
                echo(_describe_cut(d, plans[s].target))
                plans[s].cut = d
                if d.changes:
                    filestorage.truncate_at(d.path, d.point.offset)
            confirm_cuts(cuts, window=window, echo=echo)
            result.coherent = True
        else:
            result.coherent = _post_check(paths, window, echo)
            if not result.coherent:
                echo("warning: restored without cutting: the files hold split transactions")
        for s, r in plans.items():
            r.size = r.tmp.stat().st_size
            if r.blob_tmp is not None and r.blob_tmp.exists():
                last = r.cut.point.last_tid if r.cut else filestorage.last_tid(r.tmp)
                pruned = blobs.prune(r.blob_tmp, last)
                r.pruned_blobs = len(pruned.files)
                if pruned.files:
                    echo(f"storage {s}: pruned {len(pruned.files)} blob file(s) newer than "
                         f"{verify.format_tid(last)}")
    except ToolError:
        for r in plans.values():
            _cleanup(r)
        raise
    except (OSError, ScanError) as exc:
        for r in plans.values():
            _cleanup(r)
        text = _err(exc) if isinstance(exc, OSError) else str(exc)
        raise ToolError(f"restore failed: {text}; nothing was changed") from None
    except BaseException:
        for r in plans.values():
            _cleanup(r)
        raise
    installed: list[str] = []
    try:
        for r in plans.values():
            _install(r)
            installed.append(r.id)
            echo(f"storage {r.id}: restored {r.target}"
                 + (f" and {r.blob_target}" if r.blob_target is not None else ""))
    except BaseException as exc:
        for r in plans.values():
            _cleanup(r)
        if not isinstance(exc, Exception):
            raise
        text = _err(exc) if isinstance(exc, OSError) else str(exc)
        done = ", ".join(installed) or "none"
        raise ToolError(f"restore failed while putting the restored files in place: {text}; "
                        f"storages already restored: {done}; the others are unchanged; "
                        "run the restore again (with --force)") from None


# ---------------------------------------------------------------------------
# Repair
# ---------------------------------------------------------------------------


@dataclass
class RepairResult:
    tidlog: Path
    cuts: dict[str, CutDecision] = field(default_factory=dict)
    safety_copies: dict[str, Path] = field(default_factory=dict)
    pruned_blobs: dict[str, int] = field(default_factory=dict)
    pruned_to: dict[str, Path] = field(default_factory=dict)
    leftovers: list[Path] = field(default_factory=list)
    coherent: bool = True

    @property
    def changed(self) -> bool:
        return bool(self.safety_copies or self.pruned_blobs)


def safety_copy(src: Path, dst: Path) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` (must not exist) and check the copy.

    Written to ``dst.tmp``, fsync'ed, evicted from the page cache and read
    back: size and SHA-256 must match what was read from ``src``.  Then
    renamed to ``dst``.  Returns (size, hex digest).
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
            try:
                os.posix_fadvise(fo.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass
        if src.stat().st_size != size or tmp.stat().st_size != size:
            raise ToolError(f"safety copy {tmp} of {src}: size mismatch")
        if _digest(tmp, size) != h.hexdigest():
            raise ToolError(f"safety copy {tmp} of {src}: SHA-256 mismatch when read back")
        if dst.exists():
            raise ToolError(f"{dst} appeared while copying: not overwritten")
        os.rename(tmp, dst)
        blobs.fsync_dir(dst.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, h.hexdigest()


def _repair_storages(config: Config) -> dict[str, StorageConfig]:
    if not config.storages:
        raise ConfigError(f"{config.path}: storages: no storage configured")
    for st in config.storages.values():
        require(st.data_fs, f"storages.{st.name}.data_fs", "repair")
    return dict(config.storages)


#: Suffix of the repair plan written beside each Data.fs (see :func:`run_repair`).
PLAN_SUFFIX = ".repair-plan"
PLAN_FORMAT = 1
#: Test hook, only to *place* a kill: after cutting a storage, repair writes
#: that storage's id to the file named by this variable and waits for ever.
PAUSE_AFTER_CUT_ENV = "TIDSTORAGE_TEST_REPAIR_PAUSE_AFTER_CUT"


def _plan_path(data_fs: Path) -> Path:
    return Path(f"{data_fs}{PLAN_SUFFIX}")


def _cut_to_json(d: CutDecision) -> dict:
    return {"id": d.id, "path": str(d.path), "size": d.size, "tid": d.tid,
            "final_tid": d.final_tid, "point": dict(d.point.__dict__),
            "log_point": dict(d.log_point.__dict__)}


def _cut_from_json(data: dict) -> CutDecision:
    return CutDecision(data["id"], Path(data["path"]), data["size"], data["tid"],
                       data["final_tid"], CutPoint(**data["point"]), CutPoint(**data["log_point"]))


def _write_plans(plan: dict, paths: list[Path]) -> None:
    """The plan, durably, beside every Data.fs (temporary file, fsync,
    rename, fsync of the directory): a re-run finds it whatever survives."""
    from .backup import atomic_write

    data = (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode()
    for path in paths:
        atomic_write(path, data)


def _read_plan(storages: dict[str, StorageConfig]) -> dict | None:
    """The plan of an interrupted repair, if any (every copy must agree)."""
    found: dict[Path, dict] = {}
    for st in storages.values():
        path = _plan_path(st.data_fs)
        if not path.exists():
            continue
        try:
            found[path] = json.loads(path.read_text())
            if found[path].get("format") != PLAN_FORMAT:
                raise ValueError(f"unknown format {found[path].get('format')!r}")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ToolError(f"cannot read the repair plan {path}: {exc}; nothing was "
                            "changed") from None
    if not found:
        return None
    ids = {plan["plan_id"] for plan in found.values()}
    if len(ids) > 1:
        raise ToolError("repair plans of different repairs: " + ", ".join(
            f"{p} ({plan['plan_id']})" for p, plan in sorted(found.items()))
            + "; nothing was changed")
    plan = next(iter(found.values()))
    expected = {s: str(st.data_fs) for s, st in storages.items()}
    planned = {s: e["cut"]["path"] for s, e in plan["storages"].items()}
    if planned != expected:
        raise ToolError(f"the repair plan {next(iter(found))} is for other storages or files "
                        f"({planned}) than the configuration ({expected}); nothing was changed")
    return plan


def _same_bytes(a: Path, b: Path) -> bool:
    size = a.stat().st_size
    return size == b.stat().st_size and _digest(a, size) == _digest(b, size)


def _pause_after_cut(sid: str) -> None:
    marker = os.environ.get(PAUSE_AFTER_CUT_ENV)
    if marker:
        Path(marker).write_text(sid)
        while True:
            time.sleep(3600)


def _make_plan(storages, tids, tidlog: Path, window: float, force_cut: bool, echo: Echo,
               result: RepairResult) -> dict | None:
    """Decide the cuts and what to prune; refuse leftovers; None: nothing to do."""
    paths = {s: st.data_fs for s, st in storages.items()}
    try:
        cuts, _report = decide_cuts(paths, tids, window=window, echo=echo, force_cut=force_cut)
    except ScanError as exc:
        raise ToolError(f"cannot read {exc.path}: {exc}; nothing was changed") from None
    result.cuts = cuts
    entries: dict[str, dict] = {}
    refusals = []
    for s, d in sorted(cuts.items()):
        echo(_describe_cut(d))
        safety = Path(f"{d.path}{SAFETY_SUFFIX}")
        if safety.exists():
            result.leftovers.append(safety)
        if d.changes and safety.exists():
            refusals.append(
                f"storage {s}: a safety copy from an earlier repair exists: {safety}. "
                "It is never overwritten: check that storage (and keep the copy if in "
                "doubt, elsewhere), then delete or move it away, and run repair again")
        entry = {"cut": _cut_to_json(d), "last_tid": filestorage.last_tid(d.path),
                 "safety": str(safety), "blob_dir": None, "blobs_to": None}
        blob_dir = storages[s].blob_dir
        if blob_dir is not None:
            moved = Path(f"{blob_dir}{SAFETY_SUFFIX}")
            if moved.exists():
                result.leftovers.append(moved)
            if blobs.prune(blob_dir, d.point.last_tid, dry_run=True).files:
                entry.update(blob_dir=str(blob_dir), blobs_to=str(moved))
                if moved.exists():
                    refusals.append(
                        f"storage {s}: {moved} (blob files pruned by an earlier repair) "
                        "exists: check, then delete or move it away, and run repair again")
        entries[s] = entry
    if refusals:
        raise ToolError("\n".join(refusals + ["nothing was changed"]))
    if not any(d.changes for d in cuts.values()) and not any(e["blob_dir"] for e in entries.values()):
        return None
    return {"format": PLAN_FORMAT, "plan_id": uuid.uuid4().hex, "created": time.time(),
            "tidlog": str(tidlog), "storages": entries}


def _execute_plan(plan: dict, plan_files: list[Path], echo: Echo, result: RepairResult) -> None:
    """Carry the plan out, or the rest of it: every step checks what is
    already done, so a run killed anywhere can be replayed.  If a safety
    copy cannot be made before any file is cut, the copies made and the plan
    are removed: nothing was changed."""
    entries = sorted(plan["storages"].items())
    cuts = {s: _cut_from_json(e["cut"]) for s, e in entries}
    result.cuts = cuts
    todo = []
    problems = []
    for s, e in entries:  # where each file stands, before anything is done
        d = cuts[s]
        if not d.changes:
            continue
        size = d.path.stat().st_size
        if size == d.size and filestorage.last_tid(d.path) == e["last_tid"]:
            todo.append(s)
        elif size == d.point.offset and filestorage.last_tid(d.path) == d.point.last_tid:
            echo(f"storage {s}: {d.path} already cut to {size} bytes")
            safety = Path(e["safety"])
            if safety.exists():
                result.safety_copies[s] = safety
            else:
                echo(f"warning: storage {s}: its safety copy {safety} is gone")
        else:
            problems.append(f"storage {s}: {d.path} is {size} bytes: the plan expects "
                            f"{d.size} (before the cut) or {d.point.offset} (after it): the "
                            "file changed since the plan was made")
    if problems:
        raise ToolError("\n".join(problems + [
            "nothing more was changed; check these storages, then remove the plan files "
            f"(*{PLAN_SUFFIX} beside each Data.fs) to start a new repair"]))
    made: list[Path] = []
    for s in todo:  # safety copies: every one checked before any cut
        d = cuts[s]
        safety = Path(plan["storages"][s]["safety"])
        if safety.exists():
            if not _same_bytes(safety, d.path):
                raise ToolError(f"storage {s}: {safety} exists and is not a copy of {d.path}: "
                                "it is never overwritten; nothing more was changed")
            echo(f"storage {s}: safety copy {safety} (made by the interrupted repair) checked")
        else:
            try:
                size, digest = safety_copy(d.path, safety)
            except (OSError, ToolError) as exc:
                why = _err(exc) if isinstance(exc, OSError) else str(exc)
                for p in made:  # copies of files left untouched
                    p.unlink(missing_ok=True)
                if len(todo) == sum(cuts[x].changes for x in cuts) and \
                        len(made) == len(result.safety_copies):
                    for p in plan_files:  # nothing done before this run either
                        p.unlink(missing_ok=True)
                    after = "nothing was changed"
                else:
                    after = "no file was cut by this run: run repair again to resume"
                raise ToolError(f"storage {s}: cannot make the safety copy {safety}: "
                                f"{why}; {after}") from None
            made.append(safety)
            echo(f"storage {s}: safety copy {safety} ({size} bytes, sha256 {digest[:16]}...) "
                 "checked")
        result.safety_copies[s] = safety
    for s in todo:
        d = cuts[s]
        filestorage.truncate_at(d.path, d.point.offset)
        echo(f"storage {s}: {d.path} cut to {d.point.offset} bytes")
        _pause_after_cut(s)
    for s, e in entries:
        if not e["blob_dir"]:
            continue
        moved = Path(e["blobs_to"])
        pruned = blobs.prune(e["blob_dir"], cuts[s].point.last_tid, move_to=moved, resume=True)
        result.pruned_blobs[s] = len(pruned.files)
        result.pruned_to[s] = moved
        echo(f"storage {s}: moved {len(pruned.files)} blob file(s) newer than the cut to "
             f"{moved}")


def run_repair(config: Config, *, tidlog: Path | None = None,
               window: float = verify.DEFAULT_WINDOW, force_cut: bool = False,
               echo: Echo = _quiet) -> RepairResult:
    """Cut every live Data.fs at its published TID (see the module docstring).

    Resumable: the plan (the cut points, what to prune) is written durably
    beside every Data.fs (``Data.fs.repair-plan``) before anything is
    changed, and removed when the repair is done.  A run that finds a plan
    replays it -- never a new plan over a half-cut set, which would choose
    another point -- checking at each step what is already done; a safety
    copy is never overwritten (an existing one must be the file's copy).
    """
    storages = _repair_storages(config)
    missing = [f"storage {s}: {st.data_fs} does not exist" for s, st in sorted(storages.items())
               if not st.data_fs.exists()]
    if missing:
        raise ToolError("\n".join(missing + ["nothing was changed"]))
    locks: list[Lock] = []
    try:
        for s, st in sorted(storages.items()):
            locks.append(Lock(Path(f"{st.data_fs}.lock"),
                              f"storage {s}: {st.data_fs} is in use by a running process (stop "
                              "its ZEO server or application first)"))
        plan = _read_plan(storages)
        if plan is not None:
            result = RepairResult(tidlog=Path(plan["tidlog"]))
            echo(f"resuming the interrupted repair planned at "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(plan['created']))} UTC "
                 f"from {plan['tidlog']} (its cut points are kept"
                 + (f"; -t {tidlog} is ignored)" if tidlog else ")"))
        else:
            if tidlog is None:
                tidlog = require(config.server.status_file, "server.status_file",
                                 "repair (or give a TID log with -t)")
            tids = _read_tids(tidlog, storages, echo)
            result = RepairResult(tidlog=tidlog)
            plan = _make_plan(storages, tids, tidlog, window, force_cut, echo, result)
            if plan is not None:
                _write_plans(plan, [_plan_path(st.data_fs) for st in storages.values()])
        if plan is not None:
            _execute_plan(plan, [_plan_path(st.data_fs) for st in storages.values()], echo,
                          result)
            try:
                confirm_cuts(result.cuts, window=window, echo=echo)
            except ToolError as exc:
                echo(f"ERROR: {exc}")
                result.coherent = False
            for st in storages.values():  # done: a new run plans anew
                _plan_path(st.data_fs).unlink(missing_ok=True)
                blobs.fsync_dir(st.data_fs.parent)
    finally:
        for lock in locks:
            lock.release()
    if not result.changed:
        echo("nothing to repair: every storage ends at its published TID")
    for p in result.leftovers:
        if p not in result.safety_copies.values() and p not in result.pruned_to.values():
            echo(f"note: {p} is left from an earlier repair: delete it once you are satisfied")
    return result
