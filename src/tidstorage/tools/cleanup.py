"""``tidstorage cleanup``: keep what the newest recorded backups need.

What counts are the backups *recorded* in ``timestamp_file`` (a backup is
recorded only when every storage succeeded), never the files a repository
happens to hold: a failed ``backup --full`` leaves a new full backup in some
repositories, and the recorded backups still need the older one.

* A recorded backup is **restorable** when every file it needs is there (see
  :func:`tidstorage.tools.common.backup_problems`: each storage's repozo chain as
  of it, checked against its ``.dat``, its blob snapshot, its TID log copy).
* It is **full** when every storage's chain starts after the previous
  restorable recorded backup (``backup --full``, or repozo's own full).
* ``--keep N`` (default ``backup.keep_full_backups``) keeps every restorable
  recorded backup from the N-th newest full one on (all of them if there are
  fewer), so N full chains with all their restore points stay restorable.

Deleted: for each storage, the repozo files (``.fs[z]``, ``.deltafs[z]``,
``.dat``, ``.index``) older than the oldest chain a kept backup needs; blob
snapshots older than the oldest one a kept backup needs, and interrupted
ones (``*.partial``); TID log copies (with their identity sidecars) older
than the oldest one a kept backup needs.  Files newer than that are kept,
even those of failed backups (the next incremental may build on them).

``timestamp_file`` is pruned first (rewritten atomically) of the entries
that are not kept: older than the oldest kept one, or not restorable any
more (their files were deleted or damaged); so it never lists a backup
whose files are gone, and ``restore --date`` says so for such a date.  With
no restorable recorded backup, nothing is deleted.  A missing backup
directory (an unmounted disk?) refuses the cleanup.  Runs under the backup
lock, so never during a backup.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError
from ..errors import ToolError
from ..formats import blobs
from ..formats import repozo as rz
from ..formats.durable import atomic_write
from .common import (
    BACKUP_LOCK,
    Echo,
    Lock,
    backup_problems,
    blob_backup_dir,
    quiet,
    read_timestamps,
    require,
    require_storages,
    set_tidlog_copies,
)
from .identity import check_identities, tidlog_identity_path

__all__ = ["CleanupPlan", "plan_cleanup", "run_cleanup"]

@dataclass
class CleanupPlan:
    keep: int
    #: recorded backups kept (restorable), oldest first
    kept: list[str] = field(default_factory=list)
    #: recorded backups removed from timestamp_file: timestamp -> why
    pruned: dict[str, str] = field(default_factory=dict)
    #: storage id -> timestamp of the oldest repozo chain kept (None: keeps all)
    oldest_kept: dict[str, str | None] = field(default_factory=dict)
    delete: list[Path] = field(default_factory=list)
    bytes: int = 0


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        total = 0
        for root, _dirs, files in os.walk(path):
            for f in files:
                try:
                    st = os.lstat(os.path.join(root, f))
                except OSError:
                    continue
                if st.st_nlink == 1:  # hard-linked files are shared: not freed
                    total += st.st_size
        return total
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _choose_kept(config: Config, stamps: list[str], keep: int,
                 plan: CleanupPlan) -> list[str]:
    good = []
    for ts in stamps:
        problems = backup_problems(config, ts)
        if problems:
            plan.pruned[ts] = "not restorable any more: " + "; ".join(problems)
        else:
            good.append(ts)
    fulls = []
    for i, ts in enumerate(good):
        previous = good[i - 1] if i else ""
        if all((rz.chain_start(st.backup_dir, ts) or "") > previous
               for st in config.storages.values()):
            fulls.append(ts)
    start = fulls[-keep] if len(fulls) >= keep else (good[0] if good else None)
    kept = [ts for ts in good if start is not None and ts >= start]
    for ts in good:
        if ts not in kept:
            plan.pruned[ts] = f"older than the {keep} newest full recorded backup(s)"
    return kept


def plan_cleanup(config: Config, keep: int | None = None) -> CleanupPlan:
    require_storages(config)
    keep = config.backup.keep_full_backups if keep is None else keep
    if keep < 1:
        raise ConfigError(f"--keep must be at least 1, not {keep}")
    require(config.backup.timestamp_file, "backup.timestamp_file",
            "cleanup (the recorded backups)")
    plan = CleanupPlan(keep=keep)
    stamps = read_timestamps(config.backup.timestamp_file)
    for st in config.storages.values():
        require(st.backup_dir, f"storages.{st.name}.backup_dir", "cleanup")
        if stamps and not st.backup_dir.is_dir():
            raise ToolError(f"storage {st.id}: backup directory {st.backup_dir} does not "
                            "exist (a disk not mounted?): cleanup refused, nothing changed")
    check_identities(config, for_what="cleanup")  # never another set's files
    plan.kept = kept = _choose_kept(config, stamps, keep, plan)
    if not kept:
        plan.oldest_kept = {sid: None for sid in config.storages}
        return plan
    for sid, st in sorted(config.storages.items()):
        repo = st.backup_dir
        oldest = min(rz.chain_start(repo, ts) for ts in kept)
        plan.oldest_kept[sid] = oldest
        for name in sorted(os.listdir(repo)):
            date = rz.repository_file_date(name)
            if date is not None and date < oldest:
                plan.delete.append(repo / name)
        snaps_dir = blob_backup_dir(repo)
        snaps = blobs.list_snapshots(snaps_dir)
        needed = [[n for n in snaps if n <= ts][-1:] for ts in kept]
        if st.blob_dir is not None and all(needed):
            anchor = min(n[0] for n in needed)
            plan.delete += [snaps_dir / n for n in snaps if n < anchor]
        if snaps_dir.is_dir():
            plan.delete += sorted(p for p in snaps_dir.iterdir()
                                  if p.name.endswith(blobs.PARTIAL_SUFFIX) and p.is_dir())
    copies = set_tidlog_copies(config)
    needed = [[c for c, _ in copies if c <= ts][-1:] for ts in kept]
    if copies and all(needed):
        anchor = min(n[0] for n in needed)
        for ts, p in copies:
            if ts < anchor:
                plan.delete.append(p)
                if tidlog_identity_path(p).exists():
                    plan.delete.append(tidlog_identity_path(p))
    plan.bytes = sum(_size(p) for p in plan.delete)
    return plan


def run_cleanup(config: Config, keep: int | None = None, *, dry_run: bool = False,
                echo: Echo = quiet) -> CleanupPlan:
    """Prune ``timestamp_file``, then delete (or, with ``dry_run``, list)
    what :func:`plan_cleanup` finds."""
    lock_dir = config.backup.status_file_backup_dir
    lock = None
    if lock_dir is not None and lock_dir.is_dir() and not dry_run:
        lock = Lock(lock_dir / BACKUP_LOCK, "cleanup: a backup is running")
    try:
        plan = plan_cleanup(config, keep)
        verb = "would" if dry_run else "will"
        for ts, why in sorted(plan.pruned.items()):
            echo(f"backup {ts}: {verb} be removed from {config.backup.timestamp_file} ({why})")
        if plan.pruned and not dry_run:
            # First, so that it never lists a backup whose files are gone.
            atomic_write(config.backup.timestamp_file, "".join(f"{ts}\n" for ts in plan.kept))
        verb = "would delete" if dry_run else "deleting"
        for path in plan.delete:
            echo(f"{verb} {path}")
            if dry_run:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if not plan.kept:
            echo("no restorable recorded backup: keeping every file")
        else:
            echo(f"keeping the recorded backups from {plan.kept[0]} on "
                 f"({len(plan.kept)} restorable)")
        for sid, oldest in sorted(plan.oldest_kept.items()):
            if oldest:
                echo(f"storage {sid}: keeping the repozo files from {oldest} on")
        echo(f"{'would free' if dry_run else 'freed'} about {plan.bytes} bytes "
             f"({len(plan.delete)} file(s)/snapshot(s))")
    finally:
        if lock is not None:
            lock.release()
    return plan
