"""Point-in-time restore: the coherent points a backup set can restore to.

``tidstorage restore --at TIME`` restores every storage to the newest
coherent point at or before ``TIME`` that the backups hold;
``tidstorage restore --list-points`` shows the backups and the points each
can restore to, with the gaps.

Points
------
Every TID log copy in ``status_file_backup_dir`` (and the live TID log,
``server.status_file``) is a history of published points: folding its
records in order, the state after each record is a coherent point the
daemon published.  The same state read from several copies (each copy
repeats the history before it) is one point; its id is
``<source>:<line>`` of the first record that produced it, the source being
the copy's timestamp (or ``live`` for the live log, whose ids last only as
long as that file is not rewritten); it stays the same while that copy is
kept (cleanup deletes the oldest copies: the id then moves to the next
copy holding that line).  A later record giving the same state is accepted
as an alias.  A state that lacks one of the configured storages is not a
point of this set (it cannot be cut).  Each copy is decoded only beyond
the lines it shares with the previous one (:class:`_History`), so listing
N copies costs about one read of the newest.

Points are ordered by their record's time.  A point ``P`` is *at or before*
``T`` when every ``P[s]`` is a TID whose own time (the storage's clock,
:func:`tidstorage.core.tids.tid_seconds`) is ``<= T``: the restored files
then hold no transaction committed after ``T``, and the newest such point is
the state of the set at ``T`` as far as it was published.  (The record's
time is when the daemon wrote the point, up to ``burst_period`` after its
TIDs; comparing it would refuse points whose data all predates ``T``.)

Which backup
------------
A recorded backup ``B`` (``timestamp_file``) *holds* ``P`` when its repozo
chain, recovered as of ``B``, ends at or beyond every ``P[s]``.  How far a
chain goes is exact and cheap: the chain's ``.dat`` gives the end offset
``E`` of the recovered ``Data.fs``, and the 8 bytes before ``E`` in the
chain's last file are the redundant length of the last transaction, whose
header (and TID) is right before it (:func:`chain_last_tid`: three small
reads; a gzipped last file is decompressed up to there, once per process).
``P`` is restored from the *first* recorded, restorable backup that holds it
(the shortest chain): recovered with ``repozo -R`` as of that backup, cut at
``P`` exactly as a restore cuts at the TID log's point
(:func:`tidstorage.tools.cut.decide_cuts`), verified after cutting
(:func:`tidstorage.tools.cut.confirm_cuts`).

With ``[server] all_writers_stamp = true`` the stamps prove more points than
the log holds: the cut is raised above ``P`` to keep every whole transaction
the files hold, but never beyond ``T``: the recovered files are first cut at
the last TID at or before ``T`` (a transaction split by that is missing one
part, so the stamps' rule drops it everywhere).  The backup is then the
first one holding ``P`` whose files also hold everything up to ``T`` on
every storage (a transaction after ``T`` on each, or taken after ``T``);
failing that, the newest one holding ``P``.

Gaps: the points no restorable backup holds (after the newest backup's
files: points of the live log, of copies of failed backups, or whose
backups' files were deleted or damaged) and the time before the first
point.  ``--at`` on such a point fails, naming the nearest restorable points
before and after it.

Packs
-----
A pack rewrites history: the file keeps only the revisions current at the
pack time, in transactions marked ``"p"`` (packed).  A chain whose full
backup was taken after a pack cannot be cut to a state older than the pack.
Its *pack boundary*, per storage, is the TID of the last ``"p"``
transaction at the start of the full backup's file (:func:`pack_boundary`:
the transaction headers are walked forward until the first one that is not
packed; headers only, a gzipped file is decompressed as it passes, once per
process).  A chain holds ``P`` only if also every ``P[s]`` is *above* its
boundary (the boundary transaction itself is packed).  A point older than
the pack is then restored from an older chain, or refused ("before the pack
of <storage> at <time>") with the nearest restorable points; a full backup
whose headers cannot be read is taken as packed up to its last transaction
(a warning says so).
"""

from __future__ import annotations

import datetime
import gzip
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..core.tids import tid_at, tid_seconds, tid_time
from ..errors import ToolError
from ..formats import repozo as rz
from ..formats.tidlog import TidLogError, fold_record
from .common import (
    Echo,
    backup_problems,
    human_size,
    quiet,
    read_timestamps,
    set_tidlog_copies,
)

__all__ = [
    "BackupInfo",
    "HostsTarget",
    "Inventory",
    "Point",
    "Target",
    "chain_last_tid",
    "pack_boundary",
    "choose_hosts_target",
    "choose_target",
    "inventory",
    "read_points",
    "repository_backups",
    "parse_at",
    "tid_bound",
]

LIVE = "live"
_ID_RE = re.compile(rf"({rz.TIMESTAMP_RE.pattern}|{LIVE}):(\d+)")


# -- TIME ------------------------------------------------------------------


def parse_at(text: str) -> tuple[str, object]:
    """``("latest", None)``, ``("id", id)`` or ``("time", unix seconds)``.

    A time is ISO 8601 (``2026-11-30T12:00:00.5``, ``2026-11-30 12:00``,
    with ``Z`` or ``+02:00``; UTC without an offset), or repozo's
    ``YYYY-MM-DD-HH-MM-SS``.  Raises ValueError.
    """
    text = text.strip()
    if text.lower() == "latest":
        return "latest", None
    if _ID_RE.fullmatch(text):
        return "id", text
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        try:
            return "time", float(rz.timestamp_seconds(rz.parse_date(text)))
        except ValueError:
            raise ValueError(f"bad --at {text!r}: expected an ISO 8601 time (UTC unless it "
                             "has an offset), a point id as --list-points prints it "
                             "(<copy timestamp>:<line>), or 'latest'") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return "time", moment.timestamp()


def tid_bound(seconds: float) -> int:
    """The largest TID whose time is ``<= seconds``."""
    t = tid_at(seconds)
    return t if tid_seconds(t) <= seconds else max(t - 1, 0)


def _utc(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


# -- how far a chain goes ----------------------------------------------------


_LAST_TID_CACHE: dict[tuple, int | None] = {}


def _read_range(repo: Path, entries: list[rz.DatEntry], offset: int, n: int) -> bytes:
    out = b""
    while n > 0:
        e = next((e for e in entries if e.start <= offset < e.end), None)
        if e is None:
            raise rz.DatError(f"offset {offset} is in no file of the chain")
        path = repo / e.name
        want = min(n, e.end - offset)
        if e.name.endswith("z"):
            with gzip.open(path, "rb") as f:
                f.seek(offset - e.start)
                data = f.read(want)
        else:
            with open(path, "rb") as f:
                f.seek(offset - e.start)
                data = f.read(want)
        if len(data) != want:
            raise rz.DatError(f"{path} is shorter than its .dat says")
        out += data
        offset += want
        n -= want
    return out


def chain_last_tid(repo: Path, files: list[str]) -> tuple[int, int | None]:
    """``(end, last TID)`` of what the chain ``files`` (from
    :func:`~tidstorage.formats.repozo.verified_chain`) recovers: the
    ``Data.fs`` size and the TID of its last transaction (None: no
    transaction).  Raises OSError or DatError."""
    entries = [e for e in rz.read_dat(rz.dat_path(repo, files[0]))
               if e.name in set(files)]
    if not entries:
        raise rz.DatError(f"{rz.dat_path(repo, files[0])} lists none of {files[0]} ...")
    last = entries[-1]
    end = last.end
    st = (repo / last.name).stat()
    key = (str(repo / last.name), st.st_size, st.st_mtime_ns, end)
    if key in _LAST_TID_CACHE:
        return end, _LAST_TID_CACHE[key]
    tid = None
    if end > 4:
        tlen = int.from_bytes(_read_range(repo, entries, end - 8, 8), "big")
        pos = end - 8 - tlen
        if pos < 4:
            raise rz.DatError(f"{repo / last.name}: its last transaction length {tlen} does "
                              "not fit in the chain")
        header = _read_range(repo, entries, pos, 16)
        if int.from_bytes(header[8:], "big") != tlen:
            raise rz.DatError(f"{repo / last.name}: the last transaction's lengths differ "
                              "(not a FileStorage transaction boundary)")
        tid = int.from_bytes(header[:8], "big")
    _LAST_TID_CACHE[key] = tid
    return end, tid


_PACK_CACHE: dict[tuple, int | None] = {}
_TRANS_HDR = struct.Struct(">8sQcHHH")  # ZODB.FileStorage.format.TRANS_HDR


def _gzip_pack_boundary(path: Path) -> int | None:
    """The last TID of the leading ``"p"`` transactions of a gzipped
    FileStorage file, decompressed as it is read (headers are parsed, the
    rest of each record skipped)."""
    last = None
    with gzip.open(path, "rb") as f:
        if f.read(4) not in (b"FS30", b"FS21"):
            raise rz.DatError(f"{path}: not a FileStorage (bad magic)")
        pos = 4
        while True:
            head = f.read(_TRANS_HDR.size)
            if len(head) < _TRANS_HDR.size:
                return last  # the end of the file
            tid, tl, status, ul, dl, el = _TRANS_HDR.unpack(head)
            if status != b"p":
                return last
            if tl < _TRANS_HDR.size + ul + dl + el:
                raise rz.DatError(f"{path}: bad transaction length {tl} at offset {pos}")
            f.seek(tl + 8 - _TRANS_HDR.size, os.SEEK_CUR)
            pos += tl + 8
            last = int.from_bytes(tid, "big")


def _unknown_pack(repo: Path, files: list[str], last: int | None) -> int | None:
    """The pack boundary assumed for a chain whose full backup's headers
    cannot be read: its full backup's last transaction (failing that, the
    chain's)."""
    try:
        return chain_last_tid(repo, files[:1])[1]
    except (OSError, rz.DatError):
        return last


def pack_boundary(repo: Path, full: str) -> int | None:
    """The TID of the last packed (``"p"``) transaction at the start of the
    full backup ``full`` of ``repo`` (None: not packed): the chain it starts
    holds no exact state at or before it.  Reads transaction headers only,
    from the start up to the first one that is not packed; cached per file
    in the process.  Raises OSError, ScanError or DatError."""
    from ..formats import filestorage

    path = repo / full
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _PACK_CACHE:
        return _PACK_CACHE[key]
    if full.endswith("z"):
        last = _gzip_pack_boundary(path)
    else:
        last = None
        for h in filestorage.iter_forward(path):
            if h.status != b"p":
                break
            last = h.tid
    _PACK_CACHE[key] = last
    return last


# -- the inventory -------------------------------------------------------------


@dataclass
class StorageBackupInfo:
    mode: str                   #: "full", "incremental", "unchanged" (or "" if broken)
    files: list[str]            #: files this backup added to the chain
    bytes: int                  #: their size
    chain_files: int
    chain_bytes: int
    end: int | None = None      #: size of the recovered Data.fs
    last_tid: int | None = None  #: its last transaction
    #: the chain's pack boundary (:func:`pack_boundary`; None: not packed)
    pack_tid: int | None = None

    def holds(self, tid: int) -> bool:
        return (self.pack_tid is None or tid > self.pack_tid) and tid <= (self.last_tid or 0)

    def to_json(self) -> dict:
        return {"mode": self.mode, "files": self.files, "bytes": self.bytes,
                "chain_files": self.chain_files, "chain_bytes": self.chain_bytes,
                "end": self.end, "last_tid": self.last_tid,
                "last_tid_time": None if self.last_tid is None else tid_time(self.last_tid),
                "pack_tid": self.pack_tid,
                "pack_time": None if self.pack_tid is None else tid_time(self.pack_tid)}


@dataclass
class BackupInfo:
    timestamp: str              #: as recorded in timestamp_file (restore --date)
    started: str | None         #: its TID log copy's timestamp (None: none)
    storages: dict[str, StorageBackupInfo]
    problems: list[str] = field(default_factory=list)
    first_points: list[Point] = field(default_factory=list)  #: restored from here
    holds: int = 0              #: points it holds (first here or not)

    @property
    def restorable(self) -> bool:
        return not self.problems

    def holds_point(self, p: Point) -> bool:
        return self.restorable and all(self.storages[s].holds(p.tids[s]) for s in p.tids)

    def packed_past(self, p: Point) -> dict[str, int]:
        """The storages (and their pack boundaries) where ``p`` is at or
        before this chain's pack boundary."""
        return {s: i.pack_tid for s, i in sorted(self.storages.items())
                if s in p.tids and i.pack_tid is not None and p.tids[s] <= i.pack_tid}

    def to_json(self) -> dict:
        fp = self.first_points
        return {"timestamp": self.timestamp, "started": self.started,
                "restorable": self.restorable, "problems": list(self.problems),
                "storages": {s: i.to_json() for s, i in sorted(self.storages.items())},
                "points_held": self.holds, "first_for_points": len(fp),
                "first_point": fp[0].id if fp else None,
                "last_point": fp[-1].id if fp else None}


@dataclass
class Point:
    id: str                     #: "<source>:<line>" of the first record giving it
    source: str                 #: the copy's timestamp, or "live"
    path: Path                  #: the TID log it was read from
    lineno: int
    time: float                 #: its record's time
    tids: dict[str, int]
    backup: BackupInfo | None = None  #: the first restorable backup holding it
    aliases: list[str] = field(default_factory=list)
    #: not restorable because the backups whose files reach it were all
    #: taken after a pack: storage -> that pack boundary (the first such)
    packed: dict[str, int] = field(default_factory=dict)

    def pack_reason(self) -> str:
        return ", ".join(f"before the pack of {s} at {tid_time(t)} UTC"
                         for s, t in sorted(self.packed.items()))

    @property
    def newest(self) -> int:
        return max(self.tids.values())

    @property
    def data_time(self) -> float:
        """The time of its newest TID: the data it restores is as of then."""
        return tid_seconds(self.newest)

    def label(self) -> str:
        return f"{self.id} (data as of {tid_time(self.newest)} UTC)"

    def to_json(self) -> dict:
        return {"id": self.id, "source": self.source, "tidlog": str(self.path),
                "line": self.lineno, "record_time": _utc(self.time),
                "data_time": tid_time(self.newest), "tids": dict(sorted(self.tids.items())),
                "restorable": self.backup is not None,
                "backup": None if self.backup is None else self.backup.timestamp,
                "before_pack": {s: tid_time(t) for s, t in sorted(self.packed.items())}}


@dataclass
class Inventory:
    """What the backup set can restore to (``--list-points``)."""

    backups: list[BackupInfo]
    points: list[Point]         #: ordered by record time
    by_id: dict[str, Point]     #: every id and alias
    incomplete: int = 0         #: states lacking a configured storage
    warnings: list[str] = field(default_factory=list)
    all_writers_stamp: bool = False

    def restorable(self) -> list[Point]:
        return [p for p in self.points if p.backup is not None]

    def runs(self) -> list[tuple[bool, list[Point]]]:
        """Consecutive points, grouped: (restorable, points); a gap of
        points older than a pack is a run of its own."""
        out: list[tuple[bool, list[Point]]] = []
        for p in self.points:
            ok = p.backup is not None
            if out and out[-1][0] == ok and bool(out[-1][1][-1].packed) == bool(p.packed):
                out[-1][1].append(p)
            else:
                out.append((ok, [p]))
        return out

    def nearest(self, p: Point) -> tuple[Point | None, Point | None]:
        """The restorable points just before and just after ``p``."""
        i = self.points.index(p)
        before = next((q for q in reversed(self.points[:i]) if q.backup), None)
        after = next((q for q in self.points[i + 1:] if q.backup), None)
        return before, after

    def to_json(self) -> dict:
        return {"backups": [b.to_json() for b in self.backups],
                "points": [p.to_json() for p in self.points],
                "ranges": [{"restorable": ok, "first": run[0].id, "last": run[-1].id,
                            "points": len(run), "from": tid_time(run[0].newest),
                            "to": tid_time(run[-1].newest),
                            "before_pack": bool(run[0].packed)} for ok, run in self.runs()],
                "incomplete_states": self.incomplete, "warnings": list(self.warnings),
                "all_writers_stamp": self.all_writers_stamp}

    def lines(self) -> list[str]:
        out = [f"backups: {len(self.backups)} recorded"]
        for b in self.backups:
            parts = []
            for s, i in sorted(b.storages.items()):
                where = ("?" if i.end is None else
                         f"to {tid_time(i.last_tid)}" if i.last_tid is not None else "empty")
                packed = ("" if i.pack_tid is None else
                          f", packed up to {tid_time(i.pack_tid)}: nothing older")
                parts.append(f"{s} {i.mode or 'BROKEN'} {human_size(i.bytes)} "
                             f"(chain {i.chain_files} file(s), {human_size(i.chain_bytes)}, "
                             f"data {where}{packed})")
            out.append(f"  {b.timestamp}: " + "; ".join(parts))
            if b.problems:
                out += [f"    NOT RESTORABLE: {p}" for p in b.problems]
            elif b.first_points:
                fp = b.first_points
                out.append(f"    restores {len(fp)} point(s) first: {fp[0].label()}"
                           + (f" .. {fp[-1].label()}" if len(fp) > 1 else "")
                           + f"; holds {b.holds} point(s) in all")
            else:
                out.append(f"    restores no point first (holds {b.holds}: an earlier "
                           "backup holds them too)")
        n_ok = len(self.restorable())
        out.append(f"points: {len(self.points)} coherent point(s), {n_ok} restorable"
                   + (f" ({self.incomplete} state(s) without every storage ignored)"
                      if self.incomplete else ""))
        if self.points:
            out.append(f"  nothing to restore before {tid_time(self.points[0].newest)} UTC "
                       "(the oldest point)")
        for ok, run in self.runs():
            span = run[0].label() + (f" .. {run[-1].label()}" if len(run) > 1 else "")
            if ok:
                out.append(f"  restorable: {span}: {len(run)} point(s)")
            elif run[-1].packed:
                out.append(f"  GAP: {span}: {len(run)} point(s) {run[-1].pack_reason()}: "
                           "the chains that reach them were all taken after the pack, "
                           "which removed the older revisions")
            else:
                out.append(f"  GAP: {span}: {len(run)} point(s) no restorable backup holds")
        if self.all_writers_stamp:
            out.append("  all_writers_stamp = true: --at TIME also keeps, above the point, "
                       "every whole transaction up to TIME the chosen backup holds")
        out += [f"warning: {w}" for w in self.warnings]
        return out


def _backup_infos(config: Config, warnings: list[str]) -> list[BackupInfo]:
    from ..errors import ScanError

    stamps = read_timestamps(config.backup.timestamp_file)
    copies = set_tidlog_copies(config)
    out, prev = [], None
    for stamp in stamps:
        problems = backup_problems(config, stamp, tidlog_copy=False)
        started = next((ts for ts, _ in reversed(copies) if ts <= stamp), None)
        infos = {}
        for sid, st in sorted(config.storages.items()):
            try:
                files = rz.verified_chain(st.backup_dir, stamp)
            except rz.RepositoryError:
                infos[sid] = StorageBackupInfo("", [], 0, 0, 0)
                continue  # named by backup_problems
            sizes = {f: (st.backup_dir / f).stat().st_size for f in files}
            new = [f for f in files if prev is None or rz.file_date(f) > prev]
            mode = ("full" if new and rz.is_full(new[0]) else
                    "incremental" if new else "unchanged")
            info = StorageBackupInfo(mode, new, sum(sizes[f] for f in new), len(files),
                                     sum(sizes.values()))
            try:
                info.end, info.last_tid = chain_last_tid(st.backup_dir, files)
            except (OSError, rz.DatError) as exc:
                problems.append(f"storage {sid}: cannot tell how far the chain goes: {exc}")
            else:
                try:
                    info.pack_tid = pack_boundary(st.backup_dir, files[0])
                except (OSError, ScanError, rz.DatError) as exc:
                    info.pack_tid = _unknown_pack(st.backup_dir, files, info.last_tid)
                    warnings.append(f"backup {stamp}, storage {sid}: cannot read whether "
                                    f"{files[0]} was packed ({exc}): taken as packed up to "
                                    "its last transaction (no older point is restored "
                                    "from this chain)")
            infos[sid] = info
        out.append(BackupInfo(stamp, started, infos, problems))
        prev = stamp
    return out


class _History:
    """The states of TID logs read one after the other, each decoded only
    beyond what it shares with the previous one: a copy repeats the history
    before it (the daemon's log is append-only), so the N copies of a set
    cost about one read of the newest, not N."""

    def __init__(self) -> None:
        self.data = b""
        #: (offset just after the line, the state after it) per line of data
        self.states: list[tuple[int, dict[str, int]]] = []

    def read(self, path: Path) -> tuple[list[tuple[int, float, dict[str, int]]], str | None]:
        """``(lineno, record time, state)`` of the lines of ``path`` new
        since the previous file, and a problem (the file is then skipped
        from its bad line on, like :func:`read_log` refuses it)."""
        from ..formats.tidlog import decode_line

        data = path.read_bytes()
        # the longest run of whole lines shared with the previous file
        lo, hi = 0, len(self.states)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            off = self.states[mid - 1][0]
            if memoryview(data)[:off] == memoryview(self.data)[:off]:
                lo = mid
            else:
                hi = mid - 1
        shared = self.states[:lo]
        state = dict(shared[-1][1]) if shared else {}
        pos = shared[-1][0] if shared else 0
        out, problem, lineno = [], None, lo
        while pos < len(data):
            nl = data.find(b"\n", pos)
            line_end = len(data) if nl < 0 else nl + 1
            lineno += 1
            try:
                rec = decode_line(data[pos:line_end], lineno, str(path))
            except TidLogError as exc:
                if line_end < len(data):
                    problem = (f"{path}:{lineno}: corrupt record ({exc.reason}): the records "
                               "after it were not read")
                break  # a torn last line never counted
            fold_record(state, rec)
            shared.append((line_end, dict(state)))
            out.append((lineno, rec.time, dict(state)))
            pos = line_end
        self.data, self.states = data[:pos], shared
        return out, problem


def _first_holders(points: list[Point], backups: list[BackupInfo]) -> None:
    """Set each point's first restorable backup holding it, and each
    backup's counts.  When the backups' ends and pack boundaries only grow
    (the usual case: a later backup holds everything an earlier one does
    but what a pack removed), the backups holding a point are a range,
    found by bisection; otherwise by a scan."""
    import bisect

    usable = [b for b in backups if b.restorable]
    ids = sorted(points[0].tids) if points else []
    ends = [tuple(b.storages[s].last_tid or 0 for s in ids) for b in usable]
    packs = [tuple(-1 if b.storages[s].pack_tid is None else b.storages[s].pack_tid
                   for s in ids) for b in usable]

    def grows(seq):
        return all(all(x <= y for x, y in zip(a, b, strict=True))
                   for a, b in zip(seq, seq[1:]))

    monotone = grows(ends) and grows(packs)
    counts = [0] * (len(usable) + 1)
    keys = range(len(usable))
    for p in points:
        tids = [p.tids[s] for s in ids]
        if monotone:
            # reaching p: from i on; above the pack: before j
            i = bisect.bisect_left(keys, True, key=lambda k: all(
                t <= e for t, e in zip(tids, ends[k], strict=True)))
            j = bisect.bisect_left(keys, True, key=lambda k: any(
                t <= x for t, x in zip(tids, packs[k], strict=True)))
            first = i if i < j else None
            if first is not None:
                counts[i] += 1
                counts[j] -= 1
        else:
            first = next((k for k, b in enumerate(usable) if b.holds_point(p)), None)
            if first is not None:
                for b in usable[first:]:
                    b.holds += b.holds_point(p)
        if first is not None:
            p.backup = usable[first]
            usable[first].first_points.append(p)
        else:
            reaching = next((b for b in usable if all(
                t <= (b.storages[s].last_tid or 0) for s, t in zip(ids, tids, strict=True))),
                None)
            if reaching is not None:
                p.packed = reaching.packed_past(p)
    if monotone:
        running = 0
        for k, b in enumerate(usable):
            running += counts[k]
            b.holds = running


def inventory(config: Config) -> Inventory:
    """The backups and the points (see the module docstring)."""
    inv = Inventory([], [], {}, all_writers_stamp=config.server.all_writers_stamp)
    inv.backups = _backup_infos(config, inv.warnings)
    read_points(config, inv)
    _first_holders(inv.points, inv.backups)
    return inv


def read_points(config: Config, inv: Inventory, *, live: bool = True) -> None:
    """The coherent points of the TID log copies (and, with ``live``, of the
    live TID log when it is on this host), into ``inv``: every storage of
    ``config``."""
    ids = sorted(config.storages)
    sources = list(set_tidlog_copies(config))
    log = config.server.status_file
    if live and log is not None and log.exists():
        sources.append((LIVE, log))
    seen: dict[tuple, Point] = {}
    incomplete: set[tuple] = set()
    history = _History()
    for name, path in sources:
        try:
            records, problem = history.read(path)
        except OSError as exc:
            inv.warnings.append(f"TID log {path} skipped: {exc}")
            continue
        if problem:
            inv.warnings.append(problem)
        for lineno, rtime, state in records:
            if any(s not in state for s in ids):
                incomplete.add(tuple(sorted(state.items())))
                continue
            tids = {s: state[s] for s in ids}
            key = tuple(tids[s] for s in ids)
            pid = f"{name}:{lineno}"
            p = seen.get(key)
            if p is None:
                p = seen[key] = Point(pid, name, path, lineno, rtime, tids)
            else:
                p.aliases.append(pid)
            inv.by_id.setdefault(pid, p)
    inv.incomplete = len(incomplete)
    inv.points = sorted(seen.values(), key=lambda p: (p.time, p.source == LIVE, p.id))


# -- several hosts (restore --plan) ---------------------------------------------


def repository_backups(config: Config) -> dict[str, list[tuple[str, int | None, int | None]]]:
    """Per storage, ``(date, last TID, pack boundary)`` of every backup its
    repository holds (each data file whose chain verifies against its
    ``.dat``; the pack boundary of its chain, :func:`pack_boundary`, None
    if not packed), oldest first: what a plan for several hosts chooses from, read from the
    repositories themselves (each host records its own backups in its own
    ``timestamp_file``, which the planner need not see)."""
    from ..errors import ScanError

    out: dict[str, list[tuple[str, int | None, int | None]]] = {}
    for sid, st in sorted(config.storages.items()):
        cands = []
        for name in rz.data_files(st.backup_dir):
            date = rz.file_date(name)
            try:
                files = rz.verified_chain(st.backup_dir, date)
                if not files or rz.file_date(files[-1]) != date:
                    continue
                last = chain_last_tid(st.backup_dir, files)[1]
            except (OSError, rz.RepositoryError, rz.DatError):
                continue  # not a restorable backup
            try:
                pack = pack_boundary(st.backup_dir, files[0])
            except (OSError, ScanError, rz.DatError):
                pack = _unknown_pack(st.backup_dir, files, last)
            cands.append((date, last, pack))
        out[sid] = cands
    return out


@dataclass
class HostsTarget:
    """What ``restore --plan`` chose: one point, and per storage the first
    backup (a repozo date) whose files hold it."""

    point: Point
    backups: dict[str, str]
    at: str | None
    bound: int | None = None

    def context(self) -> dict:
        out = {"at": self.at or "latest", "point": self.point.label(),
               "point_id": self.point.id, "point_tidlog": str(self.point.path),
               "point_tids": dict(sorted(self.point.tids.items())),
               "backups": dict(sorted(self.backups.items()))}
        if self.bound is not None:
            out["stamps_bound"] = f"{self.bound:#018x} ({tid_time(self.bound)} UTC)"
        return out


def choose_hosts_target(config: Config, at: str | None, echo: Echo = quiet, *,
                        live: bool = True) -> HostsTarget:
    """The point of a plan for storages on several hosts: every storage's
    repository must be visible here (a shared directory, the object store's
    staging copy, copies of the repositories).  The newest point of the TID
    log copies (at or before ``at``) that every storage has a backup holding
    (its chain's last TID >= the point's TID); per storage, the first such
    backup.  Raises ToolError (nothing changed), ValueError for a bad ``at``."""
    kind, value = parse_at(at or "latest")
    inv = Inventory([], [], {}, all_writers_stamp=config.server.all_writers_stamp)
    read_points(config, inv, live=live)
    for w in inv.warnings:
        echo(f"warning: {w}")
    cands = repository_backups(config)
    empty = [s for s, c in cands.items() if not c]
    if empty:
        raise ToolError(f"no restorable backup in the repository of storage(s) "
                        f"{', '.join(empty)}: a plan needs every storage's repository "
                        "visible here (see README, Storages on several hosts); nothing "
                        "was changed")

    def holds(last, pack, tid) -> bool:
        return last is not None and last >= tid and (pack is None or tid > pack)

    def holders(p: Point) -> dict[str, str] | None:
        out = {}
        for s, tid in p.tids.items():
            d = next((d for d, last, pack in cands[s] if holds(last, pack, tid)), None)
            if d is None:
                return None
            out[s] = d
        return out

    seconds = None
    if kind == "latest":
        chosen = next(((p, h) for p in reversed(inv.points) if (h := holders(p))), None)
        if chosen is None:
            raise ToolError("no point of the TID log copies is held by a backup of every "
                            "storage; nothing was changed")
        p, backups = chosen
    else:
        if kind == "id":
            p = inv.by_id.get(value)
            if p is None:
                raise ToolError(f"no point {value}; nothing was changed")
            seconds = p.data_time
        else:
            seconds = value
            before = [q for q in inv.points if q.newest <= tid_bound(seconds)]
            if not before:
                raise ToolError(f"no coherent point at or before {_utc(seconds)} UTC; "
                                "nothing was changed")
            p = before[-1]
        backups = holders(p)
        if backups is None:
            short = [s for s, tid in sorted(p.tids.items())
                     if not any(holds(last, pack, tid) for _, last, pack in cands[s])]
            packed = {s: pack for s in short for _, last, pack in reversed(cands[s])
                      if last is not None and last >= p.tids[s] and pack is not None}
            why = "".join(f"; {s} is before the pack at {tid_time(t)} UTC of every backup "
                          "that reaches it (the pack removed the older revisions)"
                          for s, t in sorted(packed.items()))
            raise ToolError(f"point {p.label()} cannot be restored: no backup of storage(s) "
                            f"{', '.join(short)} holds it{why}; nothing was changed")
    bound = None
    if config.server.all_writers_stamp and seconds is not None:
        bound = p.newest if kind == "id" else tid_bound(seconds)
    echo(f"point {p.label()}, published {_utc(p.time)} UTC, from {p.path}")
    for s, d in sorted(backups.items()):
        echo(f"storage {s}: backup {d}")
    return HostsTarget(p, backups, at, bound)


# -- choosing -------------------------------------------------------------------


@dataclass
class Target:
    """What ``restore --at`` restores."""

    point: Point
    backup: BackupInfo
    at: str                     #: as given
    #: with all_writers_stamp: the recovered files are first cut at this TID
    #: (the last TID at or before TIME); None: no such bound
    bound: int | None = None

    @property
    def tids(self) -> dict[str, int]:
        return dict(self.point.tids)

    def context(self) -> dict:
        out = {"at": self.at, "point": self.point.label(), "point_tidlog": str(self.point.path),
               "backup": self.backup.timestamp}
        if self.bound is not None:
            out["stamps_bound"] = f"{self.bound:#018x} ({tid_time(self.bound)} UTC)"
        return out


def _unrestorable(inv: Inventory, p: Point, why: str) -> ToolError:
    before, after = inv.nearest(p)
    newest = next((b for b in reversed(inv.backups) if b.restorable), None)
    ends = ("" if newest is None else
            f"; the newest restorable backup, {newest.timestamp}, holds data up to "
            + ", ".join(f"{s} {tid_time(i.last_tid) if i.last_tid else 'nothing'}"
                        for s, i in sorted(newest.storages.items())))
    return ToolError("\n".join([
        f"point {p.label()} cannot be restored: {why}{ends}",
        "nearest restorable points: before: "
        + (before.label() if before else "none")
        + "; after: " + (after.label() if after else "none")
        + " (give one with --at ID; see restore --list-points); nothing was changed"]))


def choose_target(config: Config, at: str, echo: Echo = quiet,
                  inv: Inventory | None = None) -> Target:
    """The point and the backup ``restore --at`` uses (see the module
    docstring).  Raises ToolError naming the nearest restorable points when
    the point is not restorable, ValueError for a bad ``at``."""
    kind, value = parse_at(at)
    inv = inv or inventory(config)
    for w in inv.warnings:
        echo(f"warning: {w}")
    ok = inv.restorable()
    seconds = None
    if kind == "latest":
        if not ok:
            raise ToolError("no restorable point: no recorded backup holds a point of the "
                            "TID log copies (see restore --list-points); nothing was changed")
        p = ok[-1]
    elif kind == "id":
        p = inv.by_id.get(value)
        if p is None:
            raise ToolError(f"no point {value} (see restore --list-points for the ids); "
                            "nothing was changed")
        seconds = p.data_time
    else:
        seconds = value
        bound = tid_bound(seconds)
        before = [q for q in inv.points if q.newest <= bound]
        if not before:
            first = ok[0].label() if ok else "none"
            raise ToolError(f"no coherent point at or before {_utc(seconds)} UTC: the oldest "
                            f"point is {inv.points[0].label() if inv.points else 'none'}; "
                            f"nearest restorable point: {first}; nothing was changed")
        p = before[-1]
    if p.backup is None and p.packed:
        raise _unrestorable(inv, p, f"it is {p.pack_reason()}: the backups whose files "
                                    "reach it were all taken after that pack, which removed "
                                    "the older revisions (the chains from before it are gone)")
    if p.backup is None:
        raise _unrestorable(inv, p, "no restorable recorded backup holds it (its TIDs are "
                                    "beyond their files)")
    backup, bound = p.backup, None
    if config.server.all_writers_stamp and seconds is not None:
        # an id: up to its own newest TID (its time, as a float, may round below it)
        bound = p.newest if kind == "id" else tid_bound(seconds)
        holding = [b for b in inv.backups if b.holds_point(p)]
        backup = next((b for b in holding if all(
            (i.last_tid or 0) > bound for i in b.storages.values())
            or (b.started is not None and rz.timestamp_seconds(b.started) >= seconds)),
            holding[-1])
    target = Target(p, backup, at, bound)
    if seconds is not None and kind == "time":
        echo(f"newest coherent point at or before {_utc(seconds)} UTC: {p.label()}, "
             f"published {_utc(p.time)} UTC, from {p.path}")
    else:
        echo(f"point {p.label()}, published {_utc(p.time)} UTC, from {p.path}")
    echo(f"restoring backup {backup.timestamp}: "
         + ("the first backup whose files hold it on every storage" if backup is p.backup
            else "the first whose files hold every transaction up to the time asked "
                 "(all_writers_stamp)"))
    return target


def cut_at_bound(bound: int, echo: Echo = quiet):
    """The step before the cut of ``--at`` with the stamps: each recovered
    file is first cut after its last transaction at or before ``bound`` (the
    last TID at or before TIME), so that the stamps' raise keeps nothing
    newer."""
    from ..formats import filestorage

    def cut(paths: dict[str, Path]) -> None:
        for s, path in sorted(paths.items()):
            point = filestorage.find_cut(path, bound)
            size = os.path.getsize(path)
            if point.offset < size:
                filestorage.truncate_at(path, point.offset)
                echo(f"storage {s}: {point.dropped} transaction(s) after "
                     f"{tid_time(bound)} UTC dropped first (nothing newer than the time "
                     "asked is kept)")
    return cut
