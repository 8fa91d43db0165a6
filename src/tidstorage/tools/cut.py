"""The cut shared by restore and repair.

Each ``Data.fs`` is cut just after its last transaction whose TID is <= the
storage's TID in a TID log (:func:`tidstorage.formats.filestorage.find_cut`: a backward
walk from the end).  Then the stamps in the files' tails are checked
(:func:`tidstorage.tools.verify.check`): if the TID log's point splits a
multi-storage transaction (a stale or damaged log), the cut is lowered to the
largest coherent one, and the output says so -- by at most
:data:`MAX_CUT_LOWERING` without ``--force-cut``.  After cutting, the files
are checked again (:func:`confirm_cuts`).  Blob files of the revisions
dropped by the cut are pruned (by the callers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..core.tids import tid_seconds
from ..errors import ToolError
from ..formats import filestorage
from ..formats.filestorage import CutPoint
from ..formats.tidlog import read_log
from . import verify
from .common import Echo, quiet

__all__ = [
    "CACHE_NOTE",
    "MAX_CUT_LOWERING",
    "CutDecision",
    "confirm_cuts",
    "decide_cuts",
    "describe_cut",
    "post_check",
    "tidlog_tids",
]

CACHE_NOTE = (
    "ZEO clients that were connected to these storages hold newer data than the "
    "server now has: stop them, delete their persistent caches (*.zec files) and "
    "blob caches, then restart them (otherwise they fail with \"Server behind client\")."
)


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
    raise ToolError("\n".join([*lines, (
        f"that is more than the {MAX_CUT_LOWERING / 3600:g} hour(s) a TID log of these files "
        "can be off by: the TID log or a repository is probably not this set's (another "
        "deployment's, or two storages' swapped); nothing was changed. Check, then use "
        "--force-cut to cut that low anyway")]))


def decide_cuts(paths: dict[str, Path], tids: dict[str, int], *, window: float,
                echo: Echo = quiet, force_cut: bool = False,
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
                 echo: Echo = quiet) -> None:
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


def post_check(paths: dict[str, Path], window: float, echo: Echo) -> bool:
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


def tidlog_tids(path: Path, storages, echo: Echo = quiet) -> dict[str, int]:
    """The TIDs of ``storages`` (ids) in the TID log ``path`` (its final
    state), warning through ``echo`` about a torn last line.  Raises
    :class:`ToolError` if the file does not exist or lacks a storage, and
    TidLogError if it is corrupt."""
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


def describe_cut(d: CutDecision, shown: Path | None = None) -> str:
    p = d.point
    shown = shown or d.path
    if not d.changes:
        return (f"storage {d.id}: {shown}: nothing after {verify.format_tid(p.last_tid)}, "
                "not cut")
    return (f"storage {d.id}: {shown}: cut at offset {p.offset} of {d.size} after "
            f"{verify.format_tid(p.last_tid)}: {p.dropped} transaction(s), "
            f"{d.size - p.offset} bytes dropped")
