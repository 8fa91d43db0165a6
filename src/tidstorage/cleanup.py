"""``tidstorage cleanup``: delete backups older than the newest N full ones.

For every storage, the newest ``N`` full repozo backups (``--keep``, default
``backup.keep_full_backups``) are kept with everything after them.  Deleted:

* repozo files (``.fs[z]``, ``.deltafs[z]``, ``.dat``, ``.index``) older than
  the oldest kept full backup -- backups that can no longer be restored
  without the full backup they build upon, or older full chains;
* blob snapshots older than the one taken with the oldest kept full backup
  (the newest snapshot named at or before it), and interrupted ones
  (``*.partial``);
* TID log copies older than the one saved with the oldest kept full backup
  of *any* storage (the oldest restorable backup still needs its copy).

A storage with no full backup keeps everything; then no TID log copy is
deleted either.  Runs under the backup lock, so never during a backup.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import blobs
from .backup import (
    BACKUP_LOCK,
    FULL_EXTS,
    Lock,
    TIMESTAMP_RE,
    blob_backup_dir,
    check_identities,
    data_files,
    require,
    tidlog_copies,
    tidlog_identity_path,
)
from .config import Config, ConfigError

__all__ = ["CleanupPlan", "plan_cleanup", "run_cleanup"]

_REPO_SUFFIXES = (".fs", ".fsz", ".deltafs", ".deltafsz", ".dat", ".index")


@dataclass
class CleanupPlan:
    keep: int
    #: storage id -> timestamp of its oldest kept full backup (None: keeps all)
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


def plan_cleanup(config: Config, keep: int | None = None) -> CleanupPlan:
    if not config.storages:
        raise ConfigError(f"{config.path}: storages: no storage configured")
    keep = config.backup.keep_full_backups if keep is None else keep
    if keep < 1:
        raise ConfigError(f"--keep must be at least 1, not {keep}")
    plan = CleanupPlan(keep=keep)
    for st in config.storages.values():
        require(st.backup_dir, f"storages.{st.name}.backup_dir", "cleanup")
    check_identities(config, for_what="cleanup")  # never another set's files
    for sid, st in sorted(config.storages.items()):
        repo = st.backup_dir
        fulls = [n for n in data_files(repo) if n.endswith(FULL_EXTS)]
        if not fulls:
            plan.oldest_kept[sid] = None
            continue
        oldest = fulls[-keep][:19] if len(fulls) > keep else fulls[0][:19]
        plan.oldest_kept[sid] = oldest
        for name in sorted(os.listdir(repo)):
            root, ext = os.path.splitext(name)
            if ext in _REPO_SUFFIXES and TIMESTAMP_RE.fullmatch(root) and root < oldest:
                plan.delete.append(repo / name)
        snaps_dir = blob_backup_dir(repo)
        snaps = blobs.list_snapshots(snaps_dir)
        anchor = [n for n in snaps if n <= oldest]
        if anchor:
            plan.delete += [snaps_dir / n for n in snaps if n < anchor[-1]]
        if snaps_dir.is_dir():
            plan.delete += sorted(p for p in snaps_dir.iterdir()
                                  if p.name.endswith(blobs.PARTIAL_SUFFIX) and p.is_dir())
    horizon = None
    if plan.oldest_kept and all(plan.oldest_kept.values()):
        horizon = min(plan.oldest_kept.values())
    if horizon is not None:
        base = config.server.status_file.name if config.server.status_file else None
        copies = tidlog_copies(config.backup.status_file_backup_dir, base)
        anchor = [ts for ts, _ in copies if ts <= horizon]
        if anchor:
            for ts, p in copies:
                if ts < anchor[-1]:
                    plan.delete.append(p)
                    if tidlog_identity_path(p).exists():
                        plan.delete.append(tidlog_identity_path(p))
    plan.bytes = sum(_size(p) for p in plan.delete)
    return plan


def run_cleanup(config: Config, keep: int | None = None, *, dry_run: bool = False,
                echo: Callable[[str], None] = lambda _: None) -> CleanupPlan:
    """Delete (or, with ``dry_run``, list) what :func:`plan_cleanup` finds."""
    lock_dir = config.backup.status_file_backup_dir
    lock = None
    if lock_dir is not None and lock_dir.is_dir() and not dry_run:
        lock = Lock(lock_dir / BACKUP_LOCK, "cleanup: a backup is running")
    try:
        plan = plan_cleanup(config, keep)
        verb = "would delete" if dry_run else "deleting"
        for path in plan.delete:
            echo(f"{verb} {path}")
            if dry_run:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for sid, oldest in sorted(plan.oldest_kept.items()):
            echo(f"storage {sid}: " + (f"keeping the full backups from {oldest} on"
                                       if oldest else "no full backup: keeping everything"))
        echo(f"{'would free' if dry_run else 'freed'} about {plan.bytes} bytes "
             f"({len(plan.delete)} file(s)/snapshot(s))")
    finally:
        if lock is not None:
            lock.release()
    return plan
