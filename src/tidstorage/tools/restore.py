"""``tidstorage restore``: the backup set back, cut coherently.

From the repozo repositories, as of the last backup recorded in
``timestamp_file`` (or the last one at or before ``--date``); with the TID
log copy saved by that backup (or ``-t``), cut as :mod:`tidstorage.tools.cut`
says.  The repositories and the TID log must be this set's (see
:mod:`tidstorage.tools.identity`).  Everything is checked before anything is
written (the recorded backup still restorable, repository files listed by
repozo's ``.dat`` present and of the right size:
:func:`tidstorage.formats.repozo.verified_chain`; the checksums are verified
by ``repozo -R -w`` while it recovers, which costs no extra read).  Each
storage is recovered into a temporary file in the destination directory,
cut, then renamed over the destination (``--force`` needed if it exists,
which is then kept as ``<file>.before-restore``, a hard link); the stale
``.index`` is removed first, so a restored ``Data.fs`` never sits beside an
index of another file.  Any failure removes the temporary files: the
destination is as it was.

``--check`` restores into temporary directories beside the live files,
compares (:func:`_compare`), and deletes them.

``--dry-run`` prints the cut plan (:class:`tidstorage.tools.cut.CutPlan`)
and changes nothing.  The plan cannot be read from the repositories
without recovering them (repozo's files may be gzipped, and the cut is
found by reading each ``Data.fs`` tail backward), so each storage is
recovered by ``repozo -R`` into a temporary directory (beside its
destination when that directory exists), the cut is decided there, and the
directory is deleted; no lock is taken, nothing is installed.  With
``[server] all_writers_stamp = true`` the cut is raised to the stamps' point
(see :mod:`tidstorage.tools.cut`): a backup taken under load keeps every
whole transaction its files hold.

``--at TIME`` (point-in-time restore) picks a coherent point of the TID log
copies and the first backup whose files hold it
(:mod:`tidstorage.tools.pitr`), then restores as above, cut at that point.

``tidstorage repair`` lives in :mod:`tidstorage.tools.repair`.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError
from ..errors import ToolError
from ..formats import blobs, filestorage
from ..formats import repozo as rz
from ..formats.durable import fsync_dir, fsync_file, sha256_file
from ..formats.filestorage import ScanError
from . import verify
from .common import (
    Echo,
    Lock,
    Progress,
    backup_problems,
    blob_backup_dir,
    id_filename,
    os_error_text,
    quiet,
    read_timestamps,
    require,
    require_storages,
    safety_copy,
    same_bytes,
    set_tidlog_copies,
    wait_writing,
)
from .cut import (
    CACHE_NOTE,
    PLAN_FORMAT,
    CutDecision,
    CutPlan,
    confirm_cuts,
    decide_cuts,
    describe_cut,
    make_plan,
    plan_cuts,
    post_check,
    tidlog_accepted,
    tidlog_tids,
)
from .identity import check_identities, check_tidlog_identity

__all__ = [
    "CACHE_NOTE",
    "RESTORE_SAFETY_SUFFIX",
    "RestoreResult",
    "StorageRestore",
    "migrate_output_names",
    "output_paths",
    "apply_plan",
    "restore_shared",
    "run_restore",
    "shared_plan",
    "plan_hosts",
]

#: Suffix under which restore keeps a file (or blob directory) it replaces.
RESTORE_SAFETY_SUFFIX = ".before-restore"
_RESTORE_TMP = ".tidstorage-restore"


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
    #: restore --plan: this storage's own backup date (None: the restore's)
    date: str | None = None

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
    #: the cut's plan (also set by a real restore that cuts); with --dry-run
    #: it is all there is
    plan: CutPlan | None = None
    #: --at: what was chosen (:meth:`tidstorage.tools.pitr.Target.context`)
    point: dict | None = None

    def lowered(self) -> list[str]:
        return sorted(s for s, r in self.storages.items() if r.cut and r.cut.lowered)


def _choose_date(config: Config, date: str | None, echo: Echo, *,
                 tidlog_copy: bool = True) -> str:
    stamps = read_timestamps(config.backup.timestamp_file)
    if date is None:
        if not stamps:
            raise ToolError(f"no backup recorded in timestamp file "
                            f"{config.backup.timestamp_file}: give --date")
        chosen = stamps[-1]
    else:
        wanted = rz.parse_date(date)
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
        raise ToolError("\n".join([
            (f"backup {chosen}, recorded in {config.backup.timestamp_file}, cannot be "
             "restored any more:"), *[f"  {p}" for p in problems],
            (f"its files were deleted or damaged since it was recorded; {hint}; "
             "`tidstorage cleanup` removes such entries; nothing was changed")]))
    if date is not None and chosen != rz.parse_date(date):
        echo(f"restoring the last complete backup at or before {rz.parse_date(date)}: {chosen}")
    return chosen


def _choose_tidlog(config: Config, date: str, tidlog: Path | None) -> Path:
    if tidlog is not None:
        return tidlog
    directory = config.backup.status_file_backup_dir
    copies = [p for ts, p in set_tidlog_copies(config) if ts <= date]
    if not copies:
        raise ToolError(f"no TID log copy at or before {date} in {directory}: give a TID "
                        "log with -t, or restore without cutting (--no-cut)")
    return copies[-1]



def _check_config(config: Config, *, output_dir, check: bool, date, no_cut, tidlog) -> None:
    require_storages(config)
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
            files = rz.verified_chain(st.backup_dir, date)
        except rz.RepositoryError as exc:
            errors.append(f"storage {sid}: {exc}")
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


def migrate_output_names(directory: Path, ids, echo: Echo = quiet) -> list[tuple[Path, Path]]:
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
        fsync_dir(directory)
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


def _expected_size(r: StorageRestore) -> int | None:
    """The size repozo -R will write (the chain's last ``.dat`` end)."""
    fulls = [f for f in r.files if rz.is_full(f)]
    if not fulls:
        return None
    try:
        entries = rz.read_dat(rz.dat_path(r.repository, fulls[-1]))
    except (OSError, rz.DatError):
        return None
    names = {Path(f).name for f in r.files}
    ends = [e.end for e in entries if Path(e.name).name in names]
    return max(ends) if ends else None


def _recover(r: StorageRestore, date: str, progress: Progress | None = None) -> None:
    date = r.date or date
    r.target.parent.mkdir(parents=True, exist_ok=True)
    _cleanup(r)  # leftovers of an interrupted restore: ours, never the user's
    argv = rz.repozo_argv() + ["-R", "-w", "-r", str(r.repository), "-D", date, "-o", str(r.tmp)]
    total = _expected_size(r) if progress is not None else None
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as proc:
        _, err = wait_writing(proc, r.id, r.tmp, total, progress)
    if progress is not None:
        progress(r.id, "done" if proc.returncode == 0 else "failed",
                 r.tmp.stat().st_size if r.tmp.exists() else 0, total)
    if proc.returncode != 0 or not r.tmp.exists():
        last = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
        raise ToolError(f"storage {r.id}: repozo -R failed ({r.repository} as of {date}): {last}")
    if r.snapshot is not None:
        try:
            r.blob_files, _ = blobs.copy_tree(r.snapshot, r.blob_tmp)
        except OSError as exc:
            raise ToolError(f"storage {r.id}: cannot copy blobs from {r.snapshot}: "
                            f"{os_error_text(exc)}") from None


def _install(r: StorageRestore) -> None:
    """Rename the restored files over the target (the stale index first)."""
    parent = r.target.parent
    fsync_file(r.tmp)  # repozo -R does not fsync what it writes
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
                or same_bytes(kept, r.target)):
            raise ToolError(f"storage {r.id}: the safety copy {kept} of {r.target} does not "
                            "match it")
    fsync_dir(parent)
    os.replace(r.tmp, r.target)
    tmp_index = Path(f"{r.tmp}.index")
    if tmp_index.exists():
        os.replace(tmp_index, f"{r.target}.index")
    fsync_dir(parent)
    if r.blob_tmp is not None and r.blob_tmp.exists():
        if os.path.lexists(r.blob_target):
            if r.blob_target.is_dir() and not any(r.blob_target.iterdir()):
                r.blob_target.rmdir()
            else:
                os.rename(r.blob_target, f"{r.blob_target}{RESTORE_SAFETY_SUFFIX}")
        os.rename(r.blob_tmp, r.blob_target)
        fsync_dir(r.blob_target.parent)



def _compare(r: StorageRestore, echo: Echo) -> bool:
    live, restored = r.live, r.target
    if not live.exists():
        echo(f"storage {r.id}: live file {live} does not exist; restored {r.size} bytes")
        r.check = {"live_size": None, "restored_size": r.size, "ok": False}
        return False
    ls, rs = live.stat().st_size, restored.stat().st_size
    common = min(ls, rs)
    same = sha256_file(live, common) == sha256_file(restored, common)
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
                jobs: int | None = None, force_cut: bool = False, dry_run: bool = False,
                echo: Echo = quiet, progress: Progress | None = None,
                at: str | None = None) -> RestoreResult:
    """Restore every storage (see the module docstring).

    The repositories and the TID log must be this set's (see "Identity" in
    :mod:`tidstorage.tools.identity`); a cut lowered by more than
    :data:`~tidstorage.tools.cut.MAX_CUT_LOWERING` needs ``force_cut``; an existing file (or blob
    directory) is replaced only with ``force``, after it was kept as
    ``<file>.before-restore`` (a hard link: the same bytes).

    Raises :class:`ToolError` (nothing changed) or ConfigError.  With
    ``check``, restores into temporary directories beside the live files,
    compares, deletes them, and sets ``result.ok`` to the comparison's
    outcome.  With ``dry_run``, only ``result.plan`` (see the module
    docstring): nothing is changed.  With ``at`` (``--at``: a time, a point
    id or ``latest``), the point and the backup are chosen by
    :func:`tidstorage.tools.pitr.choose_target` (not with ``date``,
    ``tidlog`` nor ``no_cut``).
    """
    if at is not None and (date is not None or tidlog is not None or no_cut):
        raise ConfigError("--at chooses the backup and the point: not with --date, "
                          "-t/--tidlog nor --no-cut")
    if dry_run and (no_cut or check):
        raise ConfigError("--dry-run shows the cut plan: not with --no-cut nor --check")
    _check_config(config, output_dir=output_dir, check=check, date=date, no_cut=no_cut,
                  tidlog=tidlog)
    set_id = check_identities(config, for_what="restore")
    target = before_cut = None
    if at is not None:
        from .pitr import choose_target, cut_at_bound
        require(config.backup.timestamp_file, "backup.timestamp_file", "restore --at")
        try:
            target = choose_target(config, at, echo)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        date = target.backup.timestamp
        _choose_date(config, date, echo, tidlog_copy=False)  # still restorable
        if target.bound is not None:
            before_cut = cut_at_bound(target.bound, echo)
    else:
        date = _choose_date(config, date, echo, tidlog_copy=not no_cut and tidlog is None)
    tids = None
    log_path = None
    if target is not None:
        log_path = target.point.path
        check_tidlog_identity(config, log_path, set_id,
                              chosen=target.point.source != "live")
        tids = target.tids
    elif not no_cut:
        log_path = _choose_tidlog(config, date, tidlog)
        if not log_path.exists():
            raise ToolError(f"TID log {log_path} does not exist")
        check_tidlog_identity(config, log_path, set_id, chosen=tidlog is None)
        tids = tidlog_tids(log_path, config.storages, echo)
    elif tidlog is not None:
        raise ConfigError("-t/--tidlog makes no sense with --no-cut")
    if dry_run:
        result = _dry_run(config, date, tids, log_path, output_dir, force, window, jobs,
                          force_cut, echo, before_cut)
        if target is not None:
            result.point = target.context()
            result.plan.context.update(result.point)
        return result
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
        result = RestoreResult(date=date, tidlog=log_path, storages=plans,
                               point=None if target is None else target.context())
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
            _restore_all(config, plans, date, tids, window, jobs, echo, result, force_cut,
                         progress, before_cut)
        finally:
            for lock in locks:
                lock.release()
        if check:
            # a list: every storage is compared (and reported), not only up to a failure
            result.ok = all([_compare(r, echo) for r in plans.values()])  # noqa: C419
        return result
    finally:
        if check_dirs:
            for d in check_dirs.values():
                shutil.rmtree(d, ignore_errors=True)


def _restore_plan(cuts, report, plans, result, aws) -> CutPlan:
    plan = make_plan("restore", cuts, report, tidlog=result.tidlog, all_writers_stamp=aws,
                     shown={s: r.target for s, r in plans.items()})
    plan.context["backup"] = result.date
    return plan


def _dry_run(config, date, tids, log_path, output_dir, force, window, jobs, force_cut,
             echo, before_cut=None) -> RestoreResult:
    """The cut plan of a restore; changes nothing (see the module docstring)."""
    real = _plan(config, date, tids, output_dir, None)
    refusal = None
    try:
        _refuse_overwrite(real, force)
    except ToolError as exc:
        refusal = str(exc).removesuffix("\nnothing was changed")
    tmp_dirs = {}
    try:
        for sid, r in real.items():
            where = r.target.parent if r.target.parent.is_dir() else None
            tmp_dirs[sid] = Path(tempfile.mkdtemp(prefix=".tidstorage-dry-run-", dir=where))
        plans = _plan(config, date, tids, None, tmp_dirs)
        for sid, r in plans.items():
            r.snapshot = None  # the blobs are not needed to plan the cut
        result = RestoreResult(date=date, tidlog=log_path, storages=real)
        echo(f"dry run: recovering {len(plans)} storage(s) as of {date} into temporary "
             "directories to plan the cut (deleted afterwards)")
        aws = config.server.all_writers_stamp
        cuts, report = _decide_on_copies(plans, date, tids, log_path, jobs, window, force_cut,
                                         aws, echo, before_cut, "restore")
        for s, d in cuts.items():
            real[s].cut = d
        result.plan = _restore_plan(cuts, report, real, result, aws)
        result.plan.notes.append("planned on copies recovered by repozo -R into temporary "
                                 "directories, now deleted")
        if refusal:
            result.plan.notes += [f"restore would refuse: {line}"
                                  for line in refusal.splitlines()]
        return result
    finally:
        for d in tmp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)


def _decide_on_copies(plans, date, tids, log_path, jobs, window, force_cut, aws, echo,
                      before_cut, what):
    """Recover ``plans`` into their temporary files and decide the cut there
    (``--dry-run``, ``--plan``)."""
    _recover_all(plans, date, jobs)
    try:
        if before_cut is not None:
            before_cut({s: r.tmp for s, r in plans.items()})
        return decide_cuts({s: r.tmp for s, r in plans.items()}, tids, window=window,
                           echo=echo, force_cut=force_cut, all_writers_stamp=aws,
                           accepted=tidlog_accepted(log_path))
    except ScanError as exc:
        raise ToolError(f"{what} failed: {exc}; nothing was changed") from None


def _recover_all(plans: dict[str, StorageRestore], date: str, jobs: int | None,
                 progress: Progress | None = None) -> None:
    """repozo -R of every storage, in parallel; ToolError naming each failure."""
    workers = max(1, min(jobs or os.cpu_count() or 1, len(plans)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
        futures = {pool.submit(_recover, r, date, progress): r for r in plans.values()}
        errors = []
        for fut in concurrent.futures.as_completed(futures):
            try:
                fut.result()
            except ToolError as exc:
                errors.append(str(exc))
            except OSError as exc:
                errors.append(f"storage {futures[fut].id}: {os_error_text(exc)}")
    if errors:
        raise ToolError("\n".join(sorted(errors) + ["nothing was changed"]))


def _restore_all(config, plans, date, tids, window, jobs, echo, result, force_cut,
                 progress: Progress | None = None, before_cut=None) -> None:
    try:
        _recover_all(plans, date, jobs, progress)
        for r in plans.values():
            echo(f"storage {r.id}: recovered {r.tmp.stat().st_size} bytes from "
                 f"{len(r.files)} repozo file(s) ({r.files[0]} .. {r.files[-1]})"
                 + (f" and {r.blob_files} blob file(s) from {r.snapshot}" if r.snapshot else ""))
        paths = {s: r.tmp for s, r in plans.items()}
        if tids is not None:
            aws = config.server.all_writers_stamp
            if before_cut is not None:  # --at with the stamps: nothing after TIME
                before_cut(paths)
            accepted = tidlog_accepted(result.tidlog)
            cuts, report = decide_cuts(paths, tids, window=window, echo=echo,
                                       force_cut=force_cut, all_writers_stamp=aws,
                                       accepted=accepted)
            result.plan = _restore_plan(cuts, report, plans, result, aws)
            for s, d in cuts.items():
                echo(describe_cut(d, plans[s].target))
                plans[s].cut = d
                if d.changes:
                    filestorage.truncate_at(d.path, d.point.offset)
            confirm_cuts(cuts, window=window, echo=echo, accepted=accepted)
            result.coherent = True
        else:
            result.coherent = post_check(paths, window, echo)
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
        text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
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
        text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        done = ", ".join(installed) or "none"
        raise ToolError(f"restore failed while putting the restored files in place: {text}; "
                        f"storages already restored: {done}; the others are unchanged; "
                        "run the restore again (with --force)") from None


# -- storages on several hosts (restore --plan) --------------------------------

def _plan_each(config: Config, dates: dict[str, str], tids, output_dir,
               check_dirs) -> dict[str, StorageRestore]:
    """:func:`_plan` with a backup date per storage."""
    import dataclasses

    out, errors = {}, []
    for sid in sorted(dates):
        one = dataclasses.replace(config, storages={sid: config.storages[sid]})
        try:
            plans = _plan(one, dates[sid], None if tids is None else {sid: tids[sid]},
                          output_dir, None if check_dirs is None else {sid: check_dirs[sid]})
        except ToolError as exc:
            errors.append(str(exc).removesuffix("\nnothing was changed"))
            continue
        plans[sid].date = dates[sid]
        out.update(plans)
    if errors:
        raise ToolError("\n".join(errors + ["nothing was changed"]))
    return out


def plan_hosts(config: Config, *, at: str | None = None, window: float = verify.DEFAULT_WINDOW,
               jobs: int | None = None, force_cut: bool = False,
               echo: Echo = quiet, live: bool = True) -> RestoreResult:
    """``restore --plan``: the plan every host applies (``--plan FILE``).

    Computed where every storage's repository is visible (a shared
    directory, the object store's staging copy, copies of the
    repositories): one point of the TID log copies seen here that every
    storage has a backup holding (:func:`tidstorage.tools.pitr.choose_hosts_target`),
    then, as ``--dry-run`` does, each storage recovered from its backup into
    a temporary directory and the cut decided on all of them together (the
    stamps' check and raise see every storage).  ``result.plan`` is the
    :class:`CutPlan`; its context names the point, the backup used per
    storage and the set; the cut TIDs are final: a host only cuts there.
    Changes nothing.
    """
    from .pitr import choose_hosts_target, cut_at_bound

    require_storages(config)
    require(config.backup.status_file_backup_dir, "backup.status_file_backup_dir",
            "restore --plan (the TID log copies)")
    for st in config.storages.values():
        require(st.backup_dir, f"storages.{st.name}.backup_dir", "restore --plan")
    set_id = check_identities(config, for_what="restore --plan")
    try:
        target = choose_hosts_target(config, at, echo, live=live)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    log_path = target.point.path
    check_tidlog_identity(config, log_path, set_id, chosen=target.point.source != "live")
    tids = target.point.tids
    before_cut = cut_at_bound(target.bound, echo) if target.bound is not None else None
    tmp_root = Path(tempfile.mkdtemp(prefix=".tidstorage-plan-"))
    try:
        tmp_dirs = {}
        for sid in config.storages:
            tmp_dirs[sid] = tmp_root / id_filename(sid)
            tmp_dirs[sid].mkdir()
        # The blobs are not needed to plan the cut (nor present here: each
        # host has its storages' blob snapshots).
        import dataclasses

        no_blobs = dataclasses.replace(config, storages={
            s: dataclasses.replace(st, blob_dir=None) for s, st in config.storages.items()})
        plans = _plan_each(no_blobs, target.backups, tids, None, tmp_dirs)
        echo(f"planning: recovering {len(plans)} storage(s) into temporary directories "
             "(deleted afterwards)")
        aws = config.server.all_writers_stamp
        cuts, report = _decide_on_copies(plans, "", tids, log_path, jobs, window, force_cut,
                                         aws, echo, before_cut, "restore --plan")
        shown = {s: config.storages[s].data_fs or Path(id_filename(s)) for s in plans}
        plan = make_plan("restore", cuts, report, tidlog=log_path, all_writers_stamp=aws,
                         shown=shown)
        plan.context.update(target.context())
        plan.context.update({"plan": PLAN_FORMAT, "set_id": set_id})
        plan.notes.append("a plan for storages on several hosts: apply it on each host with "
                          "restore --plan FILE --storages <that host's storages>; every "
                          "host cuts its storages at these cut TIDs")
        result = RestoreResult(date=max(target.backups.values()), tidlog=log_path,
                               storages=plans, plan=plan, point=target.context())
        return result
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def shared_plan(config: Config, ids: list[str], *, at: str | None = None,
                window: float = verify.DEFAULT_WINDOW, jobs: int | None = None,
                force_cut: bool = False, blobs: bool = True, echo: Echo = quiet,
                progress: Progress | None = None) -> tuple[RestoreResult, dict]:
    """The plan every host computes alike from a shared repository
    (``[backup] target``, the object store), for a host whose storages are
    ``ids``: the staging copy brought up to date with every storage's
    repository, the TID log copies and the recorded backups (the blob
    snapshots of ``ids`` only, or none without ``blobs``); then
    :func:`plan_hosts`, which reads every storage, on the points of the TID
    log copies only (the live TID log is on the daemon's host alone: with it,
    that host could choose a point the others do not see).  Two hosts doing this
    with the same ``at``, the store unchanged in between (stop the backups
    first, as for any restore of a site), get the same cut TIDs;
    ``context["digest"]`` (a SHA-256 of the cut TIDs, backups and set) lets
    operators compare.  Returns the result and the plan as JSON data (what
    :func:`apply_plan` and ``standby promote`` take)."""
    import hashlib
    import json

    from .common import restrict_storages
    from .objectstore import pull_if_target

    restrict_storages(config, ids)  # the ids are configured
    if pull_if_target(config, echo, progress, set(ids) if blobs else set()) is None:
        raise ConfigError("a plan from a shared repository needs backup.target")
    # The live TID log is on one host only: the points come from the copies
    # in the store, the same on every host.
    planned = plan_hosts(config, at=at, window=window, jobs=jobs, force_cut=force_cut,
                         echo=echo, live=False)
    data = json.loads(json.dumps(planned.plan.to_json(), sort_keys=True))
    digest = hashlib.sha256(json.dumps(
        {"cuts": {s: p.get("cut_tid") for s, p in sorted(data["storages"].items())},
         "backups": data["context"].get("backups"), "set_id": data["context"].get("set_id")},
        sort_keys=True).encode()).hexdigest()[:16]
    planned.plan.context["digest"] = data["context"]["digest"] = digest
    echo(f"plan {digest}: point {data['context'].get('point_id') or data['context'].get('point')}"
         " (every host reading this store with the same --at computes this plan)")
    return planned, data


def restore_shared(config: Config, ids: list[str], *, at: str | None = None,
                   output_dir: Path | None = None, force: bool = False,
                   jobs: int | None = None, window: float = verify.DEFAULT_WINDOW,
                   force_cut: bool = False, dry_run: bool = False, echo: Echo = quiet,
                   progress: Progress | None = None) -> RestoreResult:
    """``restore --storages IDS`` with a shared repository: the storages of
    this host restored at the point every host computes alike
    (:func:`shared_plan`), as ``restore --plan FILE`` does
    (:func:`apply_plan`).  With ``dry_run``, the plan only."""
    from .common import restrict_storages

    planned, data = shared_plan(config, ids, at=at, window=window, jobs=jobs,
                                force_cut=force_cut, echo=echo, progress=progress)
    if dry_run:
        return planned
    result = apply_plan(restrict_storages(config, ids), data, output_dir=output_dir,
                        force=force, jobs=jobs, echo=echo, progress=progress)
    result.plan = planned.plan
    return result


def _recorded_date(config: Config, sid: str, date: str) -> str | None:
    """The backup recorded in this host's ``timestamp_file`` whose chain of
    ``sid`` ends with the repozo file ``date`` (None: not recorded here)."""
    st = config.storages[sid]
    for stamp in read_timestamps(config.backup.timestamp_file):
        if stamp < date:
            continue
        try:
            files = rz.verified_chain(st.backup_dir, stamp)
        except rz.RepositoryError:
            return None
        return stamp if files and rz.file_date(files[-1]) == date else None
    return None


def apply_plan(config: Config, plan: dict, *, output_dir: Path | None = None,
               force: bool = False, jobs: int | None = None, echo: Echo = quiet,
               progress: Progress | None = None) -> RestoreResult:
    """``restore --plan FILE``: restore the storages of ``config`` (this
    host's: ``--storages``) as a plan made by :func:`plan_hosts` says, each
    from the backup the plan names (its repozo chain ending with that file),
    cut exactly at the plan's cut TID.  Refused, nothing changed, when the
    plan is another set's, lacks one of these storages, or when this host's
    backups cannot hold the plan's point (the backup was removed, or its
    files end before the cut TID); a storage with blobs needs that backup
    recorded in this host's ``timestamp_file`` (its blob snapshot)."""
    from ..formats.filestorage import find_cut, truncate_at
    from .pitr import chain_last_tid

    require_storages(config)
    for st in config.storages.values():
        require(st.backup_dir, f"storages.{st.name}.backup_dir", "restore --plan")
        if output_dir is None:
            require(st.data_fs, f"storages.{st.name}.data_fs", "restore (or --output-dir)")
    set_id = check_identities(config, for_what="restore --plan")
    cuts, backups, context = plan_cuts(plan, sorted(config.storages), set_id)
    dates, errors = {}, []
    for sid, date in backups.items():
        st = config.storages[sid]
        try:
            files = rz.verified_chain(st.backup_dir, date)
            if not files or rz.file_date(files[-1]) != date:
                raise rz.RepositoryError(f"{st.backup_dir}: no backup {date} (removed by "
                                         "cleanup?)")
            _, last = chain_last_tid(st.backup_dir, files)
        except (OSError, rz.RepositoryError, rz.DatError) as exc:
            errors.append(f"storage {sid}: this host cannot restore the plan's backup "
                          f"{date}: {exc}")
            continue
        if cuts[sid] >= 0 and (last is None or last < cuts[sid]):
            errors.append(f"storage {sid}: this host's backup {date} ends at "
                          f"{verify.format_tid(last)}, before the plan's cut "
                          f"{verify.format_tid(cuts[sid])}: it cannot hold the plan's point")
            continue
        dates[sid] = date
        if st.blob_dir is not None:
            recorded = _recorded_date(config, sid, date)
            if recorded is None:
                errors.append(f"storage {sid}: backup {date} is not recorded in this host's "
                              f"{config.backup.timestamp_file}: its blob snapshot is unknown")
                continue
            dates[sid] = recorded
    if errors:
        raise ToolError("\n".join(errors + ["restore --plan refused; nothing was changed"]))
    if output_dir is not None and output_dir.is_dir():
        migrate_output_names(output_dir, config.storages, echo)
    plans = _plan_each(config, dates, cuts, output_dir, None)
    _refuse_overwrite(plans, force)
    result = RestoreResult(date=max(dates.values()), tidlog=None, storages=plans,
                           point=dict(context))
    echo(f"restoring {len(plans)} storage(s) as the plan says (point "
         f"{context.get('point')})")
    locks = []
    try:
        if output_dir is None:
            for r in plans.values():
                r.target.parent.mkdir(parents=True, exist_ok=True)
                locks.append(Lock(Path(f"{r.target}.lock"),
                                  f"storage {r.id}: {r.target} is in use, stop its server "
                                  "first"))
        try:
            _recover_all(plans, "", jobs, progress)
            for s, r in plans.items():
                point = find_cut(r.tmp, cuts[s])
                if point.offset < r.tmp.stat().st_size:
                    truncate_at(r.tmp, point.offset)
                echo(f"storage {s}: cut after {verify.format_tid(point.last_tid)} as planned "
                     f"({point.dropped} transaction(s) dropped)")
                r.size = r.tmp.stat().st_size
                if r.blob_tmp is not None and r.blob_tmp.exists():
                    r.pruned_blobs = len(blobs.prune(r.blob_tmp, point.last_tid).files)
        except BaseException as exc:
            for r in plans.values():
                _cleanup(r)
            if isinstance(exc, (OSError, ScanError)):
                text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
                raise ToolError(f"restore failed: {text}; nothing was changed") from None
            raise
        for r in plans.values():
            _install(r)
            echo(f"storage {r.id}: restored {r.target}")
    finally:
        for lock in locks:
            lock.release()
    result.coherent = True
    return result
