"""``tidstorage standby``: a warm standby kept up to date from the backups.

A standby directory ``DIR`` holds, per storage, ``<id>.fs`` (the repozo
chain recovered: the same bytes as ``repozo -R``), ``<id>.blobs/`` (a copy of
the newest blob snapshot), ``<id>.standby.json`` (the state), and
``tidlog/`` (copies of the backups' TID log copies, with their identity
sidecars); ``tidstorage-standby.json`` names the backup set; the lock is
``.tidstorage-standby.lock``.  (``<id>``: the storage id quoted into a file
name, as ``restore --output-dir`` does.)

Sync (:func:`run_sync`)
-----------------------

The state of a storage records its chain (the full backup and its ``.dat``)
and the last data file applied (name, byte range, md5 as listed in the
``.dat``).  Each sync, per storage, checks cheaply that the standby is still
what the state says and the repository still the chain it applied: the
``.dat`` lists the last applied file with the same range and checksum, the
standby file is at least that long, and the md5 of the last applied
increment's bytes in it is the ``.dat``'s (when the last file applied is the
full backup itself, a SHA-256 of the file's last 64 KiB recorded in the state
instead: never a read of the whole file).  Then it appends only the files
the ``.dat`` lists after it (decompressing ``.deltafsz``), each one's size
and md5 verified against the ``.dat`` *before* anything is appended (every
storage's new files are read first: a corrupt increment fails the sync with
the file named, and the standby is left unchanged), fsyncs, and records it
in the state (temporary file, fsync, rename).  A sync interrupted at any
point leaves the file longer than its state says at most: the next sync
truncates it back to the recorded end (O(1): the last whole increment) and
goes on.  A new full backup (a pack: repozo starts a new chain when the
front of the file changed; also ``backup --full``), or a standby that fails
the check, is recovered fully (into a temporary file, verified, renamed) and
the result says so.  Sync never cuts anything: the files hold whatever the
repositories hold, split transactions included; promote cuts.

Blobs: the newest blob snapshot is mirrored into ``<id>.blobs`` (new files
copied through its ``tmp/`` directory and renamed; files the snapshot no
longer has, packed away, removed); its name is recorded once complete.

TID log copies: the new copies are copied into ``DIR/tidlog`` (with their
sidecars).  **Pruning**: the window a standby can be promoted to starts at
its chains (a point older than a full backup may predate a pack), so the
copies kept are the newest one at or before the oldest full backup the
standby files were recovered from (that backup's own copy: a backup copies
the TID log before repozo runs) and every later one; older copies are
deleted from ``DIR/tidlog`` (never from the backups).

The backups are read without their lock (a standby is often on another
host): only files the ``.dat`` lists are read, and a ``.dat`` line is written
by repozo after its file is complete.

Promote (:func:`run_promote`)
-----------------------------

The point: the newest point of the newest TID log copy in ``DIR/tidlog``
that the standby holds -- every storage's standby file reaches its TID, and
the copy is no newer than the blob snapshots mirrored (a backup snapshots
blobs after its repozo run: an older copy's point has its blobs).  ``--at``
takes ``restore --at``'s syntax and rule (:func:`tidstorage.tools.pitr.parse_at`):
a time keeps the points whose every TID's own time is at or before it
(:func:`~tidstorage.tools.pitr.tid_bound`), ``latest``, or a point id
``<copy timestamp>:<line>``; with ``--at`` the stamps' raise is not applied
(it could keep transactions newer than the time asked).  The files are then cut as
restore cuts (:func:`tidstorage.tools.cut.decide_cuts`: the TID log's point,
lowered if it splits a transaction, raised to the stamps' point with
``all_writers_stamp``), either **in place** (``truncate_at``: O(tail); the
standby is then consumed: a marker file says so and sync refuses it) or
into ``--output-dir`` (a copy of each file's kept prefix: costs the copy;
the standby stays).  Blob files past the cut are pruned, stale ``.index``
files removed, the cut files verified (:func:`~tidstorage.tools.cut.confirm_cuts`),
and a TID log holding one full record of the cut point is written beside
them, for the daemon of the promoted set.  An interrupted in-place promote
is resumed by running it again (the marker records the cut decided).

``--plan FILE`` (storages on several hosts) takes the cut from a plan made
by ``restore --plan --json`` where every repository is visible, checked as
``restore --plan FILE`` checks it (:func:`tidstorage.tools.cut.plan_cuts`:
this set's, naming every storage of this host): each standby file is cut
exactly at the plan's ``cut_tid``, refused (nothing changed) when the file
ends before it or lacks that transaction.  Then as above.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import ToolError
from ..formats import blobs, filestorage
from ..formats import repozo as rz
from ..formats.durable import atomic_write, fsync_dir
from ..formats.filestorage import ScanError
from ..formats.tidlog import KIND_FULL, TidLogError, encode_record, read_log
from . import verify
from .common import (
    Echo,
    Lock,
    Progress,
    blob_backup_dir,
    os_error_text,
    quiet,
    require,
    require_storages,
    set_tidlog_copies,
    tidlog_copies,
)
from .cut import CutDecision, confirm_cuts, decide_cuts, describe_cut, plan_cuts
from .identity import check_identities, check_tidlog_identity, tidlog_identity_path
from .restore import output_paths

__all__ = [
    "PROMOTED_FILE",
    "PromoteResult",
    "StandbyState",
    "StorageSync",
    "SyncResult",
    "choose_point",
    "run_promote",
    "run_sync",
    "standby_paths",
]

STATE_FORMAT = 1
STATE_SUFFIX = ".standby.json"
SET_FILE = "tidstorage-standby.json"
LOCK_FILE = ".tidstorage-standby.lock"
TIDLOG_DIR = "tidlog"
#: Written by an in-place promote: the standby is consumed.
PROMOTED_FILE = "tidstorage-promoted.json"
_TMP = ".standby-tmp"
_CHUNK = 1 << 20
#: Bytes at the end of a file fingerprinted in the state (SHA-256).
_TAIL = 64 << 10
#: TID log written by promote when the config names no status_file.
DEFAULT_TIDLOG = "tidstorage.tid"


# -- paths and state ----------------------------------------------------------


def standby_paths(directory: Path, sid: str) -> tuple[Path, Path, Path]:
    """``DIR/<id>.fs``, ``DIR/<id>.blobs`` and ``DIR/<id>.standby.json``."""
    fs, blob_dir = output_paths(directory, sid)
    return fs, blob_dir, fs.with_name(fs.name[:-3] + STATE_SUFFIX)


@dataclass
class StandbyState:
    """What a storage's standby file holds (``<id>.standby.json``)."""

    storage: str
    repository: str
    full: str                 #: the chain's full backup (file name)
    last: rz.DatEntry         #: the last data file applied
    files: int                #: data files applied (the full backup included)
    tail_sha256: str          #: of the file's last min(end, 64 KiB) bytes
    blob_snapshot: str | None = None

    @property
    def end(self) -> int:
        return self.last.end

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "storage": self.storage,
                "repository": self.repository, "full": self.full,
                "dat": rz.file_date(self.full) + ".dat",
                "last": dataclasses.asdict(self.last), "files": self.files,
                "tail_sha256": self.tail_sha256, "blob_snapshot": self.blob_snapshot}

    @classmethod
    def from_json(cls, data: dict) -> StandbyState:
        return cls(storage=data["storage"], repository=data["repository"],
                   full=data["full"], last=rz.DatEntry(**data["last"]),
                   files=int(data["files"]), tail_sha256=data["tail_sha256"],
                   blob_snapshot=data.get("blob_snapshot"))


def _read_state(path: Path) -> StandbyState | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ToolError(f"standby state {path} cannot be read ({exc}): delete it to "
                        "recover that storage fully at the next sync") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise ToolError(f"standby state {path}: unknown format")
    try:
        return StandbyState.from_json(data)
    except (KeyError, TypeError, ValueError):
        raise ToolError(f"standby state {path} is malformed: delete it to recover that "
                        "storage fully at the next sync") from None


def _write_state(path: Path, state: StandbyState) -> None:
    atomic_write(path, json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n")


def _md5_range(path: Path, start: int, end: int) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _tail_sha256(path: Path, end: int) -> str:
    start = max(0, end - _TAIL)
    with open(path, "rb") as f:
        f.seek(start)
        return hashlib.sha256(f.read(end - start)).hexdigest()


def _open_data_file(path: Path):
    """A repository data file, decompressed if gzipped (as repozo -R)."""
    return gzip.open(path, "rb") if path.name.endswith("z") else open(path, "rb")


def _copy_data_file(repo: Path, entry: rz.DatEntry, out, sid: str,
                    progress: Progress | None, done: int, total: int) -> int:
    """Stream ``entry``'s data file into ``out`` (None: only read it);
    ToolError unless its size and md5 are the ``.dat``'s.  Returns its size."""
    path = repo / entry.name
    h = hashlib.md5(usedforsecurity=False)
    n = 0
    try:
        with _open_data_file(path) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
                n += len(chunk)
                if progress is not None:
                    progress(sid, "apply" if out is not None else "check", done + n, total)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        text = os_error_text(exc) if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ToolError(f"storage {sid}: cannot read repository file {path}: {text}") from None
    want = entry.end - entry.start
    if n != want:
        raise ToolError(f"storage {sid}: repository file {path} holds {n} bytes, its .dat "
                        f"says {want}: corrupt or truncated")
    if h.hexdigest() != entry.checksum:
        raise ToolError(f"storage {sid}: repository file {path} has md5 {h.hexdigest()}, "
                        f"its .dat says {entry.checksum}: corrupt")
    return n


# -- sync ---------------------------------------------------------------------


@dataclass
class StorageSync:
    """What a sync did to one storage."""

    id: str
    path: Path
    #: "incremental" (new files appended), "unchanged", "full" (recovered
    #: fully: a new chain or a standby that failed its check), "new"
    mode: str = "unchanged"
    reason: str = ""
    applied: list[str] = field(default_factory=list)
    bytes: int = 0            #: bytes written to the standby file
    rolled_back: int = 0      #: bytes of an interrupted sync truncated away
    size: int = 0
    blob_snapshot: str | None = None
    blobs_copied: int = 0
    blobs_removed: int = 0
    seconds: float = 0.0
    # the plan (not in the JSON)
    _state: StandbyState | None = None
    _chain: list[rz.DatEntry] = field(default_factory=list)
    _new: list[rz.DatEntry] = field(default_factory=list)
    _snapshot: Path | None = None
    _repo: Path | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "path": str(self.path), "mode": self.mode,
                "reason": self.reason, "applied": list(self.applied), "bytes": self.bytes,
                "rolled_back": self.rolled_back, "size": self.size,
                "blob_snapshot": self.blob_snapshot, "blobs_copied": self.blobs_copied,
                "blobs_removed": self.blobs_removed, "seconds": round(self.seconds, 3)}


@dataclass
class SyncResult:
    directory: Path
    storages: dict[str, StorageSync]
    tidlogs_copied: list[str] = field(default_factory=list)
    tidlogs_pruned: list[str] = field(default_factory=list)
    tidlogs_kept: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"directory": str(self.directory), "seconds": round(self.seconds, 3),
                "storages": {s: r.to_json() for s, r in sorted(self.storages.items())},
                "tidlogs": {"copied": self.tidlogs_copied, "pruned": self.tidlogs_pruned,
                            "kept": self.tidlogs_kept}}


def _check_config(config: Config, for_what: str) -> None:
    require_storages(config)
    for st in config.storages.values():
        require(st.backup_dir, f"storages.{st.name}.backup_dir", for_what)


def _check_set(config: Config, directory: Path, set_id: str | None, *, create: bool) -> None:
    path = directory / SET_FILE
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = None
    except (OSError, ValueError) as exc:
        raise ToolError(f"{path} cannot be read: {exc}") from None
    if known is None:
        if not create:
            raise ToolError(f"{directory} is not a standby directory (no {SET_FILE}): "
                            "run `tidstorage standby sync` first")
        atomic_write(path, json.dumps({"format": STATE_FORMAT, "set_id": set_id,
                                       "storages": sorted(config.storages)}, indent=1) + "\n")
        return
    if set_id is not None and known.get("set_id") not in (None, set_id):
        raise ToolError(f"{directory} is a standby of another backup set "
                        f"({known.get('set_id')}, this set is {set_id}); nothing was changed")


def _refuse_promoted(directory: Path) -> None:
    marker = directory / PROMOTED_FILE
    if marker.exists():
        raise ToolError(f"{directory} was promoted (see {marker}): its files are a live set "
                        "now, not a standby; make a new standby in an empty directory")


def _chain(sid: str, repo: Path) -> tuple[str, list[rz.DatEntry]]:
    """The repository's newest chain: its full backup and the ``.dat``
    entries whose files are present and of the size listed."""
    fulls = rz.full_files(repo)
    if not fulls:
        raise ToolError(f"storage {sid}: no full backup in {repo}")
    full = fulls[-1]
    if len(fulls) > 1 and not rz.dat_path(repo, full).exists():
        full = fulls[-2]  # a full backup being written (its .dat comes last): not yet
    try:
        entries = rz.read_dat(rz.dat_path(repo, full))
        names = rz.verified_chain(repo, rz.file_date(entries[-1].name) if entries else
                                  rz.file_date(full))
    except FileNotFoundError:
        raise ToolError(f"storage {sid}: {rz.dat_path(repo, full)} is missing (is a full "
                        "backup being written? sync again once it is done)") from None
    except (rz.DatError, rz.RepositoryError) as exc:
        raise ToolError(f"storage {sid}: {exc}") from None
    if not entries or entries[0].name != full or entries[0].start != 0:
        raise ToolError(f"storage {sid}: {rz.dat_path(repo, full)} does not start with "
                        f"{full}")
    chain = [e for e in entries if e.name in set(names)]
    return full, chain


def _plan(sid: str, repo: Path, fs: Path, state_path: Path) -> StorageSync:
    r = StorageSync(id=sid, path=fs)
    full, chain = _chain(sid, repo)
    r._chain = chain
    state = _read_state(state_path)
    if state is not None and state.storage != sid:
        raise ToolError(f"standby state {state_path} is storage {state.storage!r}'s, "
                        f"not {sid!r}")
    r._state = state
    if state is None or not fs.exists():
        r.mode, r.reason = "new", "first sync"
        return r
    if state.full != full:
        r.mode = "full"
        r.reason = (f"new full backup {full} (a pack, or backup --full): recovered fully "
                    f"instead of the chain of {state.full}")
        return r
    listed = {e.name: e for e in chain}
    if listed.get(state.last.name) != state.last:
        r.mode = "full"
        r.reason = (f"the .dat no longer lists {state.last.name} as applied "
                    f"({state.last.start}..{state.last.end}, md5 {state.last.checksum}): "
                    "recovered fully")
        return r
    size = fs.stat().st_size
    if size < state.end:
        r.mode, r.reason = "full", (f"{fs} is {size} bytes, shorter than the {state.end} "
                                    "its state records: recovered fully")
        return r
    if rz.is_full(state.last.name):
        ok = _tail_sha256(fs, state.end) == state.tail_sha256
    else:
        ok = _md5_range(fs, state.last.start, state.last.end) == state.last.checksum
    if not ok:
        r.mode, r.reason = "full", (f"{fs} does not hold {state.last.name} where its state "
                                    "says: recovered fully")
        return r
    r.rolled_back = size - state.end
    r._new = [e for e in chain if e.start >= state.end]
    if r._new and r._new[0].start != state.end:
        raise ToolError(f"storage {sid}: the chain continues at {r._new[0].start}, the "
                        f"standby ends at {state.end}")
    r.mode = "incremental" if r._new else "unchanged"
    return r


def _apply_incremental(r: StorageSync, repo: Path, state_path: Path,
                       progress: Progress | None) -> None:
    state = r._state
    total = sum(e.end - e.start for e in r._new)
    with open(r.path, "r+b") as out:
        if r.rolled_back:
            out.truncate(state.end)
            os.fsync(out.fileno())
        for e in r._new:
            out.seek(state.end)
            try:
                r.bytes += _copy_data_file(repo, e, out, r.id, progress, r.bytes, total)
            except BaseException:
                out.truncate(state.end)  # the last whole increment
                raise
            out.flush()
            os.fsync(out.fileno())
            state = dataclasses.replace(state, last=e, files=state.files + 1,
                                        tail_sha256=_tail_sha256(r.path, e.end))
            _write_state(state_path, state)
            r.applied.append(e.name)
    r._state = state


def _recover_full(r: StorageSync, repo: Path, progress: Progress | None) -> Path:
    """The whole chain into a temporary file beside the standby file,
    verified and fsync'ed (the standby file itself is not touched)."""
    tmp = r.path.with_name(f".{r.path.name}{_TMP}")
    total = r._chain[-1].end
    done = 0
    try:
        with open(tmp, "wb") as out:
            for e in r._chain:
                done += _copy_data_file(repo, e, out, r.id, progress, done, total)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _install_full(r: StorageSync, tmp: Path, state_path: Path, blob_snapshot) -> None:
    last = r._chain[-1]
    for suffix in (".index", ".index.index_tmp"):
        Path(f"{r.path}{suffix}").unlink(missing_ok=True)
    os.replace(tmp, r.path)
    fsync_dir(r.path.parent)
    state = StandbyState(storage=r.id, repository=str(r._repo), full=r._chain[0].name,
                         last=last, files=len(r._chain),
                         tail_sha256=_tail_sha256(r.path, last.end),
                         blob_snapshot=blob_snapshot)
    _write_state(state_path, state)
    r._state = state
    r.applied = [e.name for e in r._chain]
    r.bytes = last.end


def _copy_file(src: str, dst: str, tmp_dir: str) -> None:
    tmp = os.path.join(tmp_dir, f".{os.path.basename(dst)}{_TMP}")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, _CHUNK)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(tmp, dst)


def _mirror_blobs(snapshot: Path, dst: Path) -> tuple[int, int]:
    """Make ``dst`` hold the files of ``snapshot`` (blob files are never
    modified: a file of the same name and size is the same).  Returns
    (copied, removed)."""
    tmp_dir = dst / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    touched: set[str] = set()
    copied = removed = 0
    for dirpath, dirnames, filenames in os.walk(snapshot):
        rel = os.path.relpath(dirpath, snapshot)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != "tmp"]
        out_dir = dst / rel
        if not out_dir.is_dir():
            out_dir.mkdir(parents=True)
            touched.add(str(out_dir.parent))
        for name in filenames:
            relf = os.path.normpath(os.path.join(rel, name))
            seen.add(relf)
            src = os.path.join(dirpath, name)
            target = os.path.join(dst, relf)
            try:
                if os.stat(target).st_size == os.stat(src).st_size:
                    continue
            except FileNotFoundError:
                pass
            _copy_file(src, target, str(tmp_dir))
            touched.add(str(out_dir))
            copied += 1
    for dirpath, dirnames, filenames in os.walk(dst):
        rel = os.path.relpath(dirpath, dst)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != "tmp"]
        for name in filenames:
            relf = os.path.normpath(os.path.join(rel, name))
            if relf not in seen:
                os.unlink(os.path.join(dirpath, name))
                touched.add(dirpath)
                removed += 1
    for d in sorted(touched):
        fsync_dir(d)
    return copied, removed


def _copy_with_sidecar(src: Path, dst: Path) -> None:
    for a, b in ((src, dst), (tidlog_identity_path(src), tidlog_identity_path(dst))):
        if a.exists():
            _copy_file(str(a), str(b), str(dst.parent))


def _sync_tidlogs(config: Config, directory: Path, states: dict[str, StandbyState],
                  result: SyncResult) -> None:
    dst_dir = directory / TIDLOG_DIR
    dst_dir.mkdir(exist_ok=True)
    for _ts, src in set_tidlog_copies(config):
        dst = dst_dir / src.name
        if dst.exists() and dst.stat().st_size == src.stat().st_size:
            continue
        _copy_with_sidecar(src, dst)
        result.tidlogs_copied.append(src.name)
    fsync_dir(dst_dir)
    copies = tidlog_copies(dst_dir)
    starts = [rz.file_date(s.full) for s in states.values()]
    if starts and copies:
        oldest = min(starts)
        before = [i for i, (ts, _) in enumerate(copies) if ts <= oldest]
        first = before[-1] if before else 0
        for _ts, path in copies[:first]:
            path.unlink()
            tidlog_identity_path(path).unlink(missing_ok=True)
            result.tidlogs_pruned.append(path.name)
        copies = copies[first:]
        if result.tidlogs_pruned:
            fsync_dir(dst_dir)
    result.tidlogs_kept = [p.name for _, p in copies]


def run_sync(config: Config, directory: Path, *, echo: Echo = quiet,
             progress: Progress | None = None) -> SyncResult:
    """Bring the standby in ``directory`` up to date (see the module
    docstring).  Raises :class:`ToolError`: then the standby is as it was
    (or, if interrupted while appending, as the next sync rolls it back)."""
    t0 = time.monotonic()
    _check_config(config, "standby sync")
    set_id = check_identities(config, for_what="standby sync")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with Lock(directory / LOCK_FILE, f"standby {directory}: another sync or promote is "
                                     "running"):
        _refuse_promoted(directory)
        _check_set(config, directory, set_id, create=True)
        plans: dict[str, StorageSync] = {}
        paths = {}
        for sid, st in sorted(config.storages.items()):
            fs, blob_dir, state_path = standby_paths(directory, sid)
            paths[sid] = (st.backup_dir, blob_dir, state_path)
            r = _plan(sid, st.backup_dir, fs, state_path)
            r._repo = st.backup_dir
            if st.blob_dir is not None:
                r._snapshot = blobs.latest_snapshot(blob_backup_dir(st.backup_dir))
                if r._snapshot is None:
                    raise ToolError(f"storage {sid}: no blob backup in "
                                    f"{blob_backup_dir(st.backup_dir)}; nothing was changed")
            plans[sid] = r
        # 1. read every new file first: a corrupt one changes nothing
        for sid, r in plans.items():
            total = sum(e.end - e.start for e in r._new)
            done = 0
            for e in r._new:
                done += _copy_data_file(paths[sid][0], e, None, sid, progress, done, total)
        tmps: dict[str, Path] = {}
        try:
            for sid, r in plans.items():
                if r.mode in ("full", "new"):
                    tmps[sid] = _recover_full(r, paths[sid][0], progress)
            # 2. apply
            for sid, r in plans.items():
                t1 = time.monotonic()
                repo, blob_dir, state_path = paths[sid]
                if r.rolled_back:
                    echo(f"storage {sid}: rolled back {r.rolled_back} bytes of an "
                         f"interrupted sync (to {r._state.end})")
                if sid in tmps:
                    _install_full(r, tmps.pop(sid), state_path,
                                  r._state.blob_snapshot if r._state else None)
                    echo(f"storage {sid}: {r.reason} ({r.bytes} bytes, "
                         f"{len(r.applied)} file(s))")
                elif r._new:
                    _apply_incremental(r, repo, state_path, progress)
                    echo(f"storage {sid}: applied {len(r.applied)} increment(s), "
                         f"{r.bytes} bytes")
                elif r.rolled_back:
                    with open(r.path, "r+b") as f:
                        f.truncate(r._state.end)
                        os.fsync(f.fileno())
                for suffix in (".index", ".index.index_tmp"):
                    Path(f"{r.path}{suffix}").unlink(missing_ok=True)
                if r._snapshot is not None:
                    r.blobs_copied, r.blobs_removed = _mirror_blobs(r._snapshot, blob_dir)
                    r._state = dataclasses.replace(r._state, blob_snapshot=r._snapshot.name)
                    _write_state(state_path, r._state)
                    r.blob_snapshot = r._snapshot.name
                r.size = r.path.stat().st_size
                r.seconds = time.monotonic() - t1
                if progress is not None:
                    progress(sid, "done", r.bytes, None)
        finally:
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
        result = SyncResult(directory=directory, storages=plans)
        _sync_tidlogs(config, directory, {s: r._state for s, r in plans.items()}, result)
        result.seconds = time.monotonic() - t0
        return result


# -- promote ------------------------------------------------------------------


def choose_point(copies: list[tuple[str, Path]], holds: dict[str, int | None],
                 bound: int | None = None, line: int | None = None,
                 ) -> tuple[Path, int, float, dict[str, int]]:
    """The newest point of the newest TID log copy (of ``copies``) whose TID
    for every storage of ``holds`` is at most the last TID that storage's
    file holds and, with ``bound``, at most ``bound`` (the last TID at or
    before a time: every TID's own time is then at or before it, as
    ``restore --at`` counts).  With ``line``, only the point after that
    line of the (single) copy given.  Returns (copy, line, record time,
    TIDs).  Raises :class:`ToolError` if there is none."""
    for _ts, path in reversed(copies):
        try:
            records = read_log(path).records
        except (TidLogError, OSError) as exc:
            raise ToolError(f"TID log copy {path} cannot be read: {exc}") from None
        state: dict[str, int] = {}
        best = None
        for rec in records:
            if line is not None and rec.lineno > line:
                break
            for s, tid in rec.tids.items():
                state[s] = max(tid, state.get(s, tid))
            if any(s not in state for s in holds):
                continue
            if any(state[s] > (-1 if holds[s] is None else holds[s]) for s in holds):
                break  # TIDs only grow: no later record is held either
            if bound is not None and any(state[s] > bound for s in holds):
                break
            best = (path, rec.lineno, rec.time, {s: state[s] for s in holds})
        if line is not None and (best is None or best[1] != line):
            best = None
        if best is not None:
            return best
    raise ToolError("no point in the TID log copies that the standby holds"
                    + ("" if bound is None and line is None else " at or before --at")
                    + " (sync the standby, or choose a later --at); nothing was changed")


def _parse_at(at: str | None, directory: Path):
    """(bound TID, copies, line) for ``--at`` (tools.pitr's syntax: a time,
    ``latest``, or a point id ``<copy timestamp>:<line>``)."""
    from .pitr import parse_at, tid_bound

    copies = tidlog_copies(directory / TIDLOG_DIR)
    if at is None:
        return None, copies, None
    try:
        kind, value = parse_at(at)
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    if kind == "latest":
        return None, copies, None
    if kind == "time":
        return tid_bound(value), copies, None
    source, _, line = value.partition(":")
    chosen = [(ts, p) for ts, p in copies if ts == source]
    if not chosen:
        raise ToolError(f"--at {value}: no TID log copy {source} in the standby "
                        f"({directory / TIDLOG_DIR})")
    return None, chosen, int(line)


@dataclass
class PromoteResult:
    directory: Path
    output_dir: Path | None
    in_place: bool
    tidlog: Path | None = None          #: the TID log copy the point comes from
    point_id: str | None = None         #: ``<copy timestamp>:<line>`` (as restore's)
    point_time: float | None = None
    tids: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    blob_dirs: dict[str, Path | None] = field(default_factory=dict)
    cuts: dict[str, dict] = field(default_factory=dict)
    new_tidlog: Path | None = None      #: written for the promoted set's daemon
    resumed: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"directory": str(self.directory),
                "output_dir": None if self.output_dir is None else str(self.output_dir),
                "in_place": self.in_place, "consumed": self.in_place,
                "point_id": self.point_id,
                "tidlog": None if self.tidlog is None else str(self.tidlog),
                "point_time": self.point_time, "tids": self.tids,
                "files": {s: str(p) for s, p in sorted(self.files.items())},
                "blob_dirs": {s: None if p is None else str(p)
                              for s, p in sorted(self.blob_dirs.items())},
                "cuts": self.cuts, "new_tidlog": str(self.new_tidlog),
                "resumed": self.resumed, "seconds": round(self.seconds, 3)}


def _check_standby(config: Config, directory: Path, echo: Echo, *, resume: bool
                   ) -> dict[str, StandbyState]:
    states = {}
    for sid in sorted(config.storages):
        fs, _blob_dir, state_path = standby_paths(directory, sid)
        state = _read_state(state_path)
        if state is None or not fs.exists():
            raise ToolError(f"storage {sid}: not in the standby {directory} (never synced): "
                            "run `tidstorage standby sync` first; nothing was changed")
        states[sid] = state
        if resume:
            continue
        size = fs.stat().st_size
        ok = size >= state.end and (
            _tail_sha256(fs, state.end) == state.tail_sha256 if rz.is_full(state.last.name)
            else _md5_range(fs, state.last.start, state.last.end) == state.last.checksum)
        if not ok:
            raise ToolError(f"storage {sid}: {fs} does not match its state {state_path} "
                            "(run `tidstorage standby sync`); nothing was changed")
        if size > state.end:  # an interrupted sync: what the next sync would do
            with open(fs, "r+b") as f:
                f.truncate(state.end)
                os.fsync(f.fileno())
            echo(f"storage {sid}: rolled back {size - state.end} bytes of an interrupted "
                 "sync")
    return states


def _copy_prefix(src: Path, dst: Path, n: int) -> None:
    tmp = dst.with_name(f".{dst.name}{_TMP}")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            left = n
            while left > 0:
                chunk = fi.read(min(_CHUNK, left))
                if not chunk:
                    raise ToolError(f"{src} ended before {n} bytes")
                fo.write(chunk)
                left -= len(chunk)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plan_snapshot(config: Config, sid: str, date: str) -> str | None:
    """The blob snapshot made by the backup whose repozo file is ``date``:
    a backup names its snapshot by its start ``T`` and its repozo files
    ``>= T``, and the next backup starts after every name used, so it is
    the newest snapshot of the repository named ``<= date``."""
    snaps = [n for n in blobs.list_snapshots(blob_backup_dir(config.storages[sid].backup_dir))
             if n <= date]
    return snaps[-1] if snaps else None


def _plan_point(config: Config, cut_plan: dict, paths: dict[str, Path],
                states: dict[str, StandbyState], blob_dirs: dict[str, Path | None],
                set_id: str | None, result: PromoteResult,
                echo: Echo) -> tuple[dict[str, CutDecision], dict[str, int | None]]:
    """``promote --plan``: the cut of each standby file at the plan's cut
    TID (checked by :func:`tidstorage.tools.cut.plan_cuts`, as ``restore
    --plan FILE`` does); ToolError, nothing changed, if this standby does
    not hold it."""
    cut_tids, backups, context = plan_cuts(cut_plan, sorted(paths), set_id)
    errors, cuts = [], {}
    for s, p in sorted(paths.items()):
        want = cut_tids[s]
        last = filestorage.last_tid(p)
        if want >= 0 and (last is None or last < want):
            errors.append(f"storage {s}: the standby {p} ends at {verify.format_tid(last)}, "
                          f"before the plan's cut {verify.format_tid(want)}: it does not hold "
                          "the plan's point (sync it first)")
            continue
        point = filestorage.find_cut(p, max(want, 0))
        if point.last_tid != (want if want >= 0 else None):
            errors.append(f"storage {s}: the standby {p} has no transaction "
                          f"{verify.format_tid(want)} (the plan's cut): not the plan's files")
            continue
        snap = states[s].blob_snapshot
        need = _plan_snapshot(config, s, backups[s]) if blob_dirs[s] is not None else None
        if blob_dirs[s] is not None and (snap is None or snap < (need or backups[s])):
            errors.append(f"storage {s}: the standby's blobs ({snap or 'never synced'}) are "
                          f"older than the plan's backup {backups[s]} (its blob snapshot "
                          f"{need or 'is not in the repository'}): sync it first")
            continue
        log_tid = int(cut_plan["storages"][s].get("log_tid", want))
        cuts[s] = CutDecision(s, p, p.stat().st_size, log_tid, want, point, point,
                              cut_plan["storages"][s].get("rule", "log"), want)
        result.tids[s] = log_tid
    if errors:
        raise ToolError("\n".join(errors + ["standby promote --plan refused; nothing was "
                                             "changed"]))
    result.point_id = context.get("point_id")
    result.tidlog = Path(context["point_tidlog"]) if context.get("point_tidlog") else None
    echo(f"point: {context.get('point')} (the plan's; cut at its TIDs)")
    return cuts, {s: d.point.last_tid for s, d in cuts.items()}


def run_promote(config: Config, directory: Path, *, at: str | None = None,
                output_dir: Path | None = None, window: float = verify.DEFAULT_WINDOW,
                force_cut: bool = False, cut_plan: dict | None = None,
                echo: Echo = quiet) -> PromoteResult:
    """Cut the standby in ``directory`` at a coherent point, in place (the
    standby is consumed) or into ``output_dir`` (see the module docstring).
    With ``cut_plan`` (the JSON of ``restore --plan --json``), at exactly
    the plan's cut TIDs (storages on several hosts; not with ``at``).
    Raises :class:`ToolError` (nothing changed, unless it says otherwise)."""
    t0 = time.monotonic()
    if cut_plan is not None and at is not None:
        raise ToolError("--plan gives the point: not with --at")
    _check_config(config, "standby promote")
    directory = Path(directory)
    if not (directory / SET_FILE).exists():
        raise ToolError(f"{directory} is not a standby directory (no {SET_FILE})")
    with Lock(directory / LOCK_FILE, f"standby {directory}: a sync or promote is running"):
        marker = directory / PROMOTED_FILE
        plan = None
        if marker.exists():
            plan = json.loads(marker.read_text(encoding="utf-8"))
            if plan.get("status") != "promoting" or output_dir is not None:
                _refuse_promoted(directory)
        set_id = json.loads((directory / SET_FILE).read_text(encoding="utf-8")).get("set_id")
        result = PromoteResult(directory=directory, output_dir=output_dir,
                               in_place=output_dir is None, resumed=plan is not None)
        states = _check_standby(config, directory, echo, resume=plan is not None)
        paths = {s: standby_paths(directory, s)[0] for s in states}
        blob_dirs = {s: standby_paths(directory, s)[1]
                     if config.storages[s].blob_dir is not None else None for s in states}
        if plan is None and cut_plan is not None:
            cuts, kept = _plan_point(config, cut_plan, paths, states, blob_dirs, set_id,
                                     result, echo)
        elif plan is None:
            bound, copies, line = _parse_at(at, directory)
            snaps = [st.blob_snapshot for s, st in states.items() if blob_dirs[s] is not None]
            if any(sn is None for sn in snaps):
                raise ToolError("a storage's blobs were never synced: run `tidstorage standby "
                                "sync`; nothing was changed")
            if snaps:
                copies = [(ts, p) for ts, p in copies if ts <= min(snaps)]
            holds = {s: filestorage.last_tid(p) for s, p in paths.items()}
            log, lineno, when, tids = choose_point(copies, holds, bound, line)
            check_tidlog_identity(config, log, set_id, chosen=True)
            result.tidlog, result.point_time, result.tids = log, when, tids
            result.point_id = f"{log.name[-rz.TIMESTAMP_LEN:]}:{lineno}"
            echo(f"point: {result.point_id} (TID log copy {log.name}, line {lineno}, "
                 f"written {rz.format_timestamp(when)} UTC)")
            stamps = config.server.all_writers_stamp
            if stamps and at is not None:
                stamps = False  # a raise could keep what is newer than --at
                echo("note: with --at the cut is the TID log's point (no stamps' raise)")
            try:
                cuts, _report = decide_cuts(paths, tids, window=window, echo=echo,
                                            force_cut=force_cut, all_writers_stamp=stamps)
            except ScanError as exc:
                raise ToolError(f"promote failed: {exc}; nothing was changed") from None
            kept = {s: d.point.last_tid for s, d in cuts.items()}
        else:
            result.tidlog = Path(plan["tidlog"])
            result.point_time, result.tids = plan["point_time"], plan["tids"]
            kept = plan["kept"]
            if cut_plan is not None:
                want = plan_cuts(cut_plan, sorted(paths), set_id)[0]
                if any((-1 if kept.get(s) is None else kept[s]) != t for s, t in want.items()):
                    raise ToolError(f"{directory}: an interrupted promote cut elsewhere than "
                                    "this plan: resume it without --plan; nothing was changed")
            echo(f"resuming the promote of {plan['started']} (cut decided then)")
            cuts = {}
            for s, p in paths.items():
                point = filestorage.find_cut(p, kept[s] if kept[s] is not None else 0)
                cuts[s] = _decision(s, p, result.tids[s], point)
        if output_dir is None:
            if plan is None:
                _mark(marker, "promoting", result, kept)
            targets = paths
            out_blobs = blob_dirs
            for s, d in sorted(cuts.items()):
                echo(describe_cut(d))
                if d.changes:
                    filestorage.truncate_at(d.path, d.point.offset)
                for suffix in (".index", ".index.index_tmp"):
                    Path(f"{d.path}{suffix}").unlink(missing_ok=True)
        else:
            output_dir.mkdir(parents=True, exist_ok=True)
            targets, out_blobs = {}, {}
            for s in cuts:
                fs, bd = output_paths(output_dir, s)
                targets[s], out_blobs[s] = fs, bd if blob_dirs[s] is not None else None
                for p in (fs, bd):
                    if os.path.lexists(p):
                        raise ToolError(f"storage {s}: {p} exists: not overwritten; nothing "
                                        "was changed")
            for s, d in sorted(cuts.items()):
                _copy_prefix(d.path, targets[s], d.point.offset)
                echo(describe_cut(d, targets[s]))
                cuts[s] = dataclasses.replace(d, path=targets[s])
            fsync_dir(output_dir)
        for s, d in cuts.items():
            result.cuts[s] = {"size": d.size, "offset": d.point.offset,
                              "last_tid": d.point.last_tid, "dropped": d.point.dropped,
                              "rule": d.rule}
        confirm_cuts(cuts, window=window, echo=echo)
        for s, d in cuts.items():
            if blob_dirs[s] is None:
                continue
            if output_dir is not None:
                tmp = out_blobs[s].with_name(f".{out_blobs[s].name}{_TMP}")
                if tmp.exists():
                    shutil.rmtree(tmp)
                blobs.copy_tree(blob_dirs[s], tmp)
                pruned = blobs.prune(tmp, d.point.last_tid)
                os.rename(tmp, out_blobs[s])
                fsync_dir(output_dir)
            else:
                pruned = blobs.prune(blob_dirs[s], d.point.last_tid)
            result.cuts[s]["blobs_pruned"] = len(pruned.files)
            if pruned.files:
                echo(f"storage {s}: pruned {len(pruned.files)} blob file(s) newer than "
                     f"{verify.format_tid(d.point.last_tid)}")
        where = output_dir if output_dir is not None else directory
        name = config.server.status_file.name if config.server.status_file else DEFAULT_TIDLOG
        result.new_tidlog = where / name
        point = {s: t for s, t in kept.items() if t is not None}
        atomic_write(result.new_tidlog, encode_record(time.time(), KIND_FULL, point))
        result.files, result.blob_dirs = targets, out_blobs
        if output_dir is None:
            data = json.loads(marker.read_text(encoding="utf-8"))
            data.update(status="promoted", finished=rz.format_timestamp(time.time()))
            atomic_write(marker, json.dumps(data, indent=1) + "\n")
        result.seconds = time.monotonic() - t0
        return result


def _mark(marker: Path, status: str, result: PromoteResult, kept) -> None:
    atomic_write(marker, json.dumps({
        "status": status, "started": rz.format_timestamp(time.time()),
        "tidlog": str(result.tidlog), "point_time": result.point_time,
        "point_id": result.point_id, "tids": result.tids, "kept": kept}, indent=1) + "\n")


def _decision(sid, path, tid, point):
    return CutDecision(sid, path, path.stat().st_size, tid, tid, point, point)
