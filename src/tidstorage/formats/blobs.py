"""Blob directories: incremental snapshots, pruning after a cut, copies.

A FileStorage blob directory holds one file per blob *revision*, named after
the revision's TID (``ZODB.blob.FilesystemHelper``; layout ``bushy`` by
default, ``lawn`` for old ones, recorded in the ``.layout`` marker file), plus
a ``tmp`` directory for uploads in progress.  A committed blob file is never
modified, only created (by a commit) or removed (by a pack).

* :func:`snapshot` backs a blob directory up as a complete directory tree in
  which files unchanged since the previous snapshot are hard links to it (as
  collective.recipe.backup does with ``rsync --link-dest``): each snapshot is
  self-contained, and deleting an old one frees only what no other uses.
* :func:`prune` removes (or moves aside) the blob files of the revisions a
  ``Data.fs`` cut dropped: those whose TID is after the last kept one.
* :func:`copy_tree` copies a snapshot back (never hard links: the restored
  directory must not share inodes with the backup).

Symbolic links inside a blob directory (a subdirectory moved to another disk
and linked back, say) are **followed**, wherever they point: their files are
backed up, restored and pruned like the others (a snapshot holds real
directories and files).  A link that leads to a directory already walked (a
loop, or two links to one directory), a dangling link, or an entry that is
neither a file nor a directory raises :class:`BlobTreeError` naming the path:
nothing is ever left out silently.

Every file written is fsync'ed, and so is every directory created.
"""

from __future__ import annotations

import errno
import filecmp
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ZODB.blob import FilesystemHelper
from ZODB.utils import u64

from ..errors import TidstorageError
from .durable import fsync_dir, fsync_file
from .repozo import TIMESTAMP_RE

__all__ = [
    "SNAPSHOT_NAME",
    "BlobTreeError",
    "PruneResult",
    "SnapshotResult",
    "blob_files",
    "copy_tree",
    "latest_snapshot",
    "list_snapshots",
    "prune",
    "snapshot",
]

#: Snapshot directory names: the backup's UTC timestamp (repozo's format).
SNAPSHOT_NAME = TIMESTAMP_RE
#: Suffix of a snapshot being written (renamed when complete).
PARTIAL_SUFFIX = ".partial"
_TMP_DIR = "tmp"  # FilesystemHelper.temp_dir: uploads in progress
_LAYOUT_MARKER = ".layout"


def _copy_file(src: str, dst: str, fsync: bool) -> int:
    """Copy a file with its mtime/mode (exclusive create); return its size."""
    shutil.copyfile(src, dst)
    if fsync:
        fsync_file(dst)
    shutil.copystat(src, dst)
    return os.path.getsize(dst)


class BlobTreeError(TidstorageError, OSError):
    """A blob directory that cannot be walked whole (see the module
    docstring); ``filename`` is the path."""


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    """(relative dir, sorted file names) of every directory of ``root``,
    top down, in sorted order, skipping the top ``tmp``.  Symbolic links to
    directories and files are followed; see :class:`BlobTreeError`.  An
    entry that vanishes meanwhile (a pack) is skipped."""
    root = os.fspath(root)
    seen: dict[tuple[int, int], str] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise BlobTreeError(errno.ELOOP, "directory reached twice through symbolic links "
                                f"(a loop, or two links to one directory; first seen as "
                                f"{seen[key]})", path)
        seen[key] = path
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        files, dirs = [], []
        for entry in entries:
            if not rel and entry.name == _TMP_DIR:
                continue
            if entry.is_dir():  # follows symbolic links
                dirs.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
            elif entry.is_symlink() and os.path.lexists(entry.path):
                raise BlobTreeError(errno.ENOENT, "dangling symbolic link in a blob directory",
                                    entry.path)
            elif os.path.lexists(entry.path):
                raise BlobTreeError(errno.EINVAL, "neither a file nor a directory in a blob "
                                    "directory", entry.path)
        yield rel, files
        stack.extend(os.path.join(rel, d) for d in reversed(dirs))


# ---------------------------------------------------------------------------
# Snapshots (backup)
# ---------------------------------------------------------------------------


@dataclass
class SnapshotResult:
    path: Path
    previous: Path | None
    files: int = 0
    linked: int = 0
    copied: int = 0
    bytes_copied: int = 0
    vanished: int = 0  # removed (packed) while the snapshot was taken


def list_snapshots(snapshots_dir) -> list[str]:
    """Names of the complete snapshots in ``snapshots_dir``, oldest first."""
    try:
        names = os.listdir(snapshots_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if SNAPSHOT_NAME.fullmatch(n)
                  and os.path.isdir(os.path.join(snapshots_dir, n)))


def latest_snapshot(snapshots_dir, at_most: str | None = None) -> Path | None:
    """The newest complete snapshot (with a name <= ``at_most``), or None."""
    names = [n for n in list_snapshots(snapshots_dir) if at_most is None or n <= at_most]
    return Path(snapshots_dir, names[-1]) if names else None


def snapshot(blob_dir, snapshots_dir, name: str, *, fsync: bool = True,
             progress: Callable[[int, int], None] | None = None) -> SnapshotResult:
    """Back ``blob_dir`` up into ``snapshots_dir/name``.

    Files present with the same size and mtime in the newest earlier
    snapshot are hard-linked to it; the others are copied.  Written as
    ``name.partial`` and renamed when complete, so an interrupted snapshot
    never looks complete.  ``progress(files, bytes_copied)`` is called as it
    goes.
    """
    blob_dir = os.fspath(blob_dir)
    snapshots_dir = Path(snapshots_dir)
    if not SNAPSHOT_NAME.fullmatch(name):
        raise ValueError(f"bad snapshot name {name!r}")
    if not os.path.isdir(blob_dir):
        raise FileNotFoundError(errno.ENOENT, "blob directory does not exist", blob_dir)
    snapshots_dir.mkdir(parents=True, exist_ok=True)
    final = snapshots_dir / name
    if final.exists():
        raise FileExistsError(errno.EEXIST, "snapshot already exists", str(final))
    previous = latest_snapshot(snapshots_dir, at_most=name)
    partial = snapshots_dir / (name + PARTIAL_SUFFIX)
    if partial.exists():
        shutil.rmtree(partial)
    result = SnapshotResult(path=final, previous=previous)
    created = []
    try:
        for rel, files in _walk(blob_dir):
            out_dir = os.path.join(partial, rel)
            os.makedirs(out_dir, exist_ok=True)
            created.append(out_dir)
            for fname in files:
                src = os.path.join(blob_dir, rel, fname)
                dst = os.path.join(out_dir, fname)
                try:
                    st = os.stat(src)
                except FileNotFoundError:
                    result.vanished += 1
                    continue
                if previous is not None:
                    old = os.path.join(previous, rel, fname)
                    try:
                        ost = os.stat(old)
                    except FileNotFoundError:
                        ost = None
                    if (ost is not None and ost.st_size == st.st_size
                            and ost.st_mtime_ns == st.st_mtime_ns):
                        os.link(old, dst)
                        result.linked += 1
                        result.files += 1
                        continue
                try:
                    result.bytes_copied += _copy_file(src, dst, fsync)
                except FileNotFoundError:
                    result.vanished += 1
                    continue
                result.copied += 1
                result.files += 1
                if progress is not None and result.files % 256 == 0:
                    progress(result.files, result.bytes_copied)
        if fsync:
            for d in reversed(created):
                fsync_dir(d)
        os.rename(partial, final)
        if fsync:
            fsync_dir(snapshots_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if progress is not None:
        progress(result.files, result.bytes_copied)
    return result


# ---------------------------------------------------------------------------
# Pruning (restore, repair)
# ---------------------------------------------------------------------------


@dataclass
class PruneResult:
    files: list[Path] = field(default_factory=list)  # as they were named in blob_dir
    bytes: int = 0
    moved_to: Path | None = None


def blob_files(blob_dir) -> Iterator[tuple[Path, int, int]]:
    """``(path, oid, tid)`` of every committed blob file of ``blob_dir``.

    The layout (bushy or lawn) is read from the ``.layout`` marker (or
    guessed, as ZODB does).  Files that are not committed blob files
    (uploads in progress, stray files) are skipped.
    """
    blob_dir = os.fspath(blob_dir)
    if not os.path.isdir(blob_dir):
        return
    helper = FilesystemHelper(blob_dir)
    # Not helper.listOIDs(): it does not follow symbolic links.
    for rel, names in _walk(blob_dir):
        path = os.path.join(blob_dir, rel) if rel else blob_dir
        try:
            helper.getOIDForPath(path)
        except ValueError:
            continue
        for fname in names:
            full = os.path.join(path, fname)
            try:
                oid, serial = helper.splitBlobFilename(full)
            except ValueError:
                continue
            if oid is None:
                continue
            yield Path(full), u64(oid), u64(serial)


def prune(blob_dir, last_tid: int | None, *, move_to=None, dry_run: bool = False,
          resume: bool = False) -> PruneResult:
    """Remove the blob files of revisions newer than ``last_tid``.

    ``last_tid`` is the TID of the last transaction kept in the cut
    ``Data.fs`` (None: the storage is empty, every blob file goes).  With
    ``move_to``, the files are moved there (same relative paths) instead of
    deleted -- nothing is lost; ``move_to`` must not exist yet, unless
    ``resume`` (an interrupted prune into it goes on; a file is never
    overwritten there).  With ``dry_run``, only lists them.
    """
    result = PruneResult()
    blob_dir = os.fspath(blob_dir)
    doomed = [(p, tid) for p, _oid, tid in blob_files(blob_dir)
              if last_tid is None or tid > last_tid]
    for path, _tid in doomed:
        result.files.append(path)
        result.bytes += path.stat().st_size
    if dry_run or not doomed:
        return result
    if move_to is not None:
        move_to = Path(move_to)
        if move_to.exists() and not resume:
            raise FileExistsError(errno.EEXIST, "already exists", str(move_to))
        result.moved_to = move_to
        move_to.mkdir(parents=True, exist_ok=resume)
        marker = os.path.join(blob_dir, _LAYOUT_MARKER)
        if os.path.exists(marker):  # keep it a readable blob directory
            _copy_file(marker, os.fspath(move_to / _LAYOUT_MARKER), True)
    touched = set()
    for path, _tid in doomed:
        rel = os.path.relpath(path, blob_dir)
        if move_to is not None:
            dst = move_to / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(dst):  # an interrupted copy (EXDEV below), or not ours
                if not filecmp.cmp(path, dst, shallow=False):
                    raise FileExistsError(errno.EEXIST, f"{path} was to be moved there, and "
                                          "differs: not overwritten", str(dst))
                os.unlink(path)
                touched.add(os.fspath(path.parent))
                continue
            try:
                if path.is_symlink():  # keep the data, not a link that may not resolve there
                    raise OSError(errno.EXDEV, "symbolic link")
                os.rename(path, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _copy_file(os.fspath(path), os.fspath(dst), True)
                os.unlink(path)
            touched.add(os.fspath(dst.parent))
        else:
            os.unlink(path)
        touched.add(os.fspath(path.parent))
    for d in sorted(touched):
        fsync_dir(d)
    if move_to is not None:
        fsync_dir(move_to.parent)
    return result


# ---------------------------------------------------------------------------
# Copies (restore)
# ---------------------------------------------------------------------------


def copy_tree(src, dst, *, fsync: bool = True, skip: Callable[[str], bool] | None = None
              ) -> tuple[int, int]:
    """Copy the tree ``src`` to the new directory ``dst`` (no hard links).

    ``skip(relative path)`` may exclude files.  Returns (files, bytes).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    os.makedirs(dst)
    files = nbytes = 0
    created = []
    for rel, names in _walk(src):
        out_dir = os.path.join(dst, rel)
        os.makedirs(out_dir, exist_ok=True)
        created.append(out_dir)
        for fname in names:
            relpath = os.path.join(rel, fname)
            if skip is not None and skip(relpath):
                continue
            nbytes += _copy_file(os.path.join(src, relpath), os.path.join(dst, relpath), fsync)
            files += 1
    if fsync:
        for d in reversed(created):
            fsync_dir(d)
    return files, nbytes
