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

The stamps' point (``[server] all_writers_stamp = true``)
---------------------------------------------------------

The point found so far, ``L`` (the TID log's point, or its lowering), is
the *starting point*.  When every writer stamps its multi-storage commits,
the files prove more: the cut is then *raised* to the largest coherent cut
``>= L`` that keeps, of the transactions above ``L``, only those that are
whole (:func:`tidstorage.core.stamps.largest_cut_above`).  Each storage's
tail is read from its end down to exactly ``L[s]`` (nothing more is
needed), and a stamped transaction read there is whole iff a record with
its id is in the tail of every storage it names; else it is missing and
dropped everywhere, with what follows it on each storage (a cut keeps a
prefix).  No horizon and no time window: for a transaction that ``L`` does
not split, a part ``<= L[m]`` on ``m`` cannot go with a part ``> L[s]`` on
``s``, so absent from ``m``'s tail means absent from ``m``.

Soundness: every transaction the raised cut splits, ``L`` splits too (proof
in ``largest_cut_above``): the raised cut is coherent whenever ``L`` is, and
never keeps less than ``L``.  ``L`` is exactly coherent when it is the
daemon's published point, every storage was readable by the daemon and
every writer stamps (rules R1-R3 of :mod:`tidstorage.core.gate`, no time windows, and the files
hold at least what was published: a backup of ``s`` is taken after the TID
log is copied, a live file holds what the daemon read).  A lowered ``L`` is
coherent as far as :func:`verify.check` sees, which follows a dropped part
to the storages it names within its window; whatever it missed stays split
exactly as under ``L`` (and :func:`confirm_cuts` then fails as it would with
``L``), never worse.  The raise needs every writer to stamp: a legacy
client's multi-storage transaction carries no stamp and would be kept on
one storage while lost on another, so with ``all_writers_stamp = false``
(the default) the TID log's point stays the only rule.  A packed tail (a
pack removes transactions whose records became garbage) can only make a
whole transaction look missing: it is then dropped, as under ``L``.

:class:`CutPlan` is what ``--dry-run`` prints (per storage: the TID log's
TID, the cut, the rule, the transactions dropped and why); its
:meth:`CutPlan.to_json` is the JSON form.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.stamps import largest_cut_above
from ..core.tids import tid_seconds
from ..errors import ToolError
from ..formats import filestorage
from ..formats import repozo as rz
from ..formats.filestorage import CutPoint
from ..formats.tidlog import read_log
from . import verify
from .common import Echo, quiet

__all__ = [
    "CACHE_NOTE",
    "MAX_CUT_LOWERING",
    "PLAN_FORMAT",
    "CutDecision",
    "CutPlan",
    "DroppedTxn",
    "RULE_LOG",
    "RULE_LOWERED",
    "RULE_STAMPS",
    "StoragePlan",
    "make_plan",
    "plan_cuts",
    "read_plan",
    "confirm_cuts",
    "decide_cuts",
    "describe_cut",
    "post_check",
    "tidlog_accepted",
    "tidlog_tids",
]

CACHE_NOTE = (
    "ZEO clients that were connected to these storages hold newer data than the "
    "server now has: stop them, delete their persistent caches (*.zec files) and "
    "blob caches, then restart them (otherwise they fail with \"Server behind client\")."
)


#: The rules a storage's cut follows (``CutDecision.rule``).
RULE_LOG = "log"          #: at the TID log's point
RULE_LOWERED = "lowered"  #: below it: the log's point splits a transaction
RULE_STAMPS = "stamps"    #: above it: whole transactions the stamps prove


@dataclass
class CutDecision:
    """Where one storage's Data.fs is cut."""

    id: str
    path: Path
    size: int
    tid: int                  #: the TID log's TID
    final_tid: int            #: after lowering (or raising, by the stamps)
    point: CutPoint           #: find_cut(path, final_tid)
    log_point: CutPoint       #: find_cut(path, tid)
    rule: str = RULE_LOG      #: RULE_LOG, RULE_LOWERED or RULE_STAMPS
    #: the starting point's TID (the log's, or its lowering), None: the log's
    start_tid: int | None = None

    @property
    def lowered(self) -> bool:
        return self.point.offset < self.log_point.offset

    @property
    def raised(self) -> bool:
        """Keeps more than the TID log's point (the stamps' rule)."""
        return self.point.offset > self.log_point.offset

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
                echo: Echo = quiet, force_cut: bool = False, all_writers_stamp: bool = False,
                accepted: Iterable[str] = (),
                ) -> tuple[dict[str, CutDecision], verify.VerifyReport]:
    """Cut points at ``tids``, lowered to the largest coherent cut if needed,
    then, with ``all_writers_stamp``, raised to the stamps' point (see the
    module docstring).

    Raises :class:`ToolError` if the lowering lowers a cut by more than
    :data:`MAX_CUT_LOWERING` (unless ``force_cut``; the bound is checked on
    the starting point, before any raise).  Also returns the verification
    report (splits at ``tids``, what was read).
    """
    report = verify.check(paths, cut=tids, window=window, compute=True, accepted=accepted)
    _report_healed(report, echo)
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
        start = tids[s] if final >= tids[s] else final
        d = CutDecision(s, path, path.stat().st_size, tids[s], start, point, log_point,
                        RULE_LOWERED if point.offset < log_point.offset else RULE_LOG, start)
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
    if all_writers_stamp:
        _raise_to_stamps(out, report, echo)
    return out, report


def _raise_to_stamps(cuts: dict[str, CutDecision], report: verify.VerifyReport,
                     echo: Echo) -> None:
    """Raise each cut to the stamps' point above its starting point."""
    floor = {s: d.start_tid for s, d in cuts.items()}
    for s, scan in report.scans.items():
        scan.extend_to(floor[s])  # every transaction above the starting point
    tails = {s: scan.ascending() for s, scan in report.scans.items()}
    raised = largest_cut_above(tails, floor, accepted=report.accepted)
    for s, d in sorted(cuts.items()):
        if raised[s] <= floor[s]:
            continue
        point = filestorage.find_cut(d.path, raised[s])
        if point.offset <= d.point.offset:
            continue
        before = d.point
        d.final_tid, d.point, d.rule = raised[s], point, RULE_STAMPS
        echo(f"storage {s}: cut RAISED to the stamps' point: keeps up to "
             f"{verify.format_tid(point.last_tid)} instead of "
             f"{verify.format_tid(before.last_tid)} "
             f"({before.dropped - point.dropped} more whole transaction(s) kept)")


# ---------------------------------------------------------------------------
# The plan (--dry-run)
# ---------------------------------------------------------------------------

#: Dropped transactions listed per storage in a plan (the count is exact).
MAX_LISTED = 1000


@dataclass
class DroppedTxn:
    """A transaction the cut drops."""

    tid: int
    stamp: str | None         #: its coherency id, if stamped
    reason: str

    def to_json(self) -> dict:
        return {"tid": self.tid, "tid_hex": f"{self.tid:#018x}", "stamp": self.stamp,
                "reason": self.reason}


@dataclass
class StoragePlan:
    """One storage's cut, as planned."""

    id: str
    path: str                 #: the file that will be cut (restore: its destination)
    size: int
    log_tid: int              #: the TID log's TID
    start_tid: int            #: the starting point: the log's TID, or its lowering
    cut_tid: int | None       #: last transaction kept (None: none)
    offset: int               #: the file is truncated to this size
    rule: str                 #: RULE_LOG, RULE_LOWERED or RULE_STAMPS
    why: str
    dropped: int              #: transactions dropped (find_cut's count)
    log_dropped: int          #: what the TID log's point alone would drop
    transactions: list[DroppedTxn] = field(default_factory=list)  #: up to MAX_LISTED

    @property
    def changes(self) -> bool:
        return self.offset != self.size

    def to_json(self) -> dict:
        return {"id": self.id, "path": self.path, "size": self.size,
                "log_tid": self.log_tid, "start_tid": self.start_tid,
                "cut_tid": self.cut_tid, "offset": self.offset,
                "bytes_dropped": self.size - self.offset, "rule": self.rule,
                "why": self.why, "dropped": self.dropped, "log_dropped": self.log_dropped,
                "transactions": [t.to_json() for t in self.transactions],
                "transactions_listed": len(self.transactions)}


@dataclass
class CutPlan:
    """What restore or repair would cut (``--dry-run``); also the object a
    multi-host ``restore --plan`` prints (:meth:`to_json`)."""

    command: str              #: "restore" or "repair"
    tidlog: str | None
    #: "stamps" (all_writers_stamp: the stamps' point above the log's) or "log"
    rule: str
    all_writers_stamp: bool
    storages: dict[str, StoragePlan]
    #: the multi-storage transactions the TID log's point splits
    log_splits: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    context: dict = field(default_factory=dict)  #: e.g. restore's backup date

    @property
    def dropped(self) -> int:
        return sum(p.dropped for p in self.storages.values())

    @property
    def log_dropped(self) -> int:
        return sum(p.log_dropped for p in self.storages.values())

    def to_json(self) -> dict:
        return {"command": self.command, "tidlog": self.tidlog, "rule": self.rule,
                "all_writers_stamp": self.all_writers_stamp,
                "dropped": self.dropped, "log_dropped": self.log_dropped,
                "log_splits": list(self.log_splits), "notes": list(self.notes),
                "context": dict(self.context),
                "storages": {s: p.to_json() for s, p in sorted(self.storages.items())}}

    def lines(self) -> list[str]:
        """The plan, for people."""
        out = [f"{self.command} plan (dry run: nothing is changed), rule: "
               + ("the stamps' point above the TID log's (all_writers_stamp = true)"
                  if self.rule == RULE_STAMPS else
                  "the TID log's point (all_writers_stamp = false: legacy writers "
                  "may not stamp)")]
        for k, v in sorted(self.context.items()):
            out.append(f"  {k}: {v}")
        if self.tidlog:
            out.append(f"  TID log: {self.tidlog}")
        for sid, p in sorted(self.storages.items()):
            out.append(f"storage {sid}: {p.path}: TID log {verify.format_tid(p.log_tid)}; "
                       f"cut after {verify.format_tid(p.cut_tid)} (offset {p.offset} of "
                       f"{p.size}); rule {p.rule}: {p.why}")
            out.append(f"  {p.dropped} transaction(s) dropped "
                       f"({p.log_dropped} at the TID log's point)")
            for t in p.transactions[:20]:
                out.append(f"    {verify.format_tid(t.tid)}"
                           + (f" [{t.stamp}]" if t.stamp else "") + f": {t.reason}")
            if p.dropped > min(len(p.transactions), 20):
                out.append(f"    ... {p.dropped - min(len(p.transactions), 20)} more")
        out.append(f"total: {self.dropped} transaction(s) dropped ({self.log_dropped} at the "
                   "TID log's point)")
        out += [f"note: {n}" for n in self.notes]
        return out


#: ``context["plan"]`` of a plan for several hosts (``restore --plan --json``)
PLAN_FORMAT = "tidstorage-hosts-plan-1"


def read_plan(path: Path) -> dict:
    """The JSON of a plan file (``restore --plan --json`` output);
    ToolError if it cannot be read or is not JSON."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ToolError(f"cannot read the plan {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ToolError(f"the plan {path} is not JSON: {exc}") from None


def plan_cuts(plan: dict, ids, set_id: str | None) -> tuple[dict[str, int], dict[str, str], dict]:
    """Check a plan's JSON (made by ``restore --plan --json``) for the
    storages ``ids`` of the backup set ``set_id``, and return the cut TID
    (-1: nothing kept) and the backup date of each of ``ids``, and the
    plan's context.  ToolError (nothing changed) if it is not such a plan,
    is another set's, or lacks one of ``ids``.  Used by ``restore --plan
    FILE`` and ``standby promote --plan FILE``."""
    context = plan.get("context") if isinstance(plan, dict) else None
    if not isinstance(context, dict) or context.get("plan") != PLAN_FORMAT:
        raise ToolError("not a plan made by restore --plan --json (no context.plan "
                        f"{PLAN_FORMAT!r}); nothing was changed")
    if context.get("set_id") not in (None, set_id):
        raise ToolError(f"the plan is for backup set {context.get('set_id')}, this host's is "
                        f"{set_id}; nothing was changed")
    storages, backups = plan.get("storages") or {}, context.get("backups") or {}
    missing = [s for s in ids if s not in storages or s not in backups]
    if missing:
        raise ToolError(f"the plan has no cut for storage(s) {', '.join(missing)} (it was "
                        "made with another storage list?); nothing was changed")
    try:
        cuts = {s: -1 if storages[s].get("cut_tid") is None else int(storages[s]["cut_tid"])
                for s in ids}
        dates = {s: rz.parse_date(backups[s]) for s in ids}
    except (AttributeError, TypeError, ValueError) as exc:
        raise ToolError(f"the plan is malformed ({exc}); nothing was changed") from None
    return cuts, dates, context


def _why(d: CutDecision, rule: str) -> str:
    if d.rule == RULE_STAMPS:
        return ("keeps every transaction above the TID log's point that is whole in the "
                "files (every writer stamps)")
    if d.rule == RULE_LOWERED:
        return "the TID log's point splits a multi-storage transaction: lowered to coherent"
    if d.point.offset == d.size:
        return "nothing after the TID log's point"
    if rule == RULE_STAMPS:
        return "no transaction above the TID log's point is whole in every storage it names"
    return "at the TID log's point (legacy writers may not stamp: nothing above it is proven)"


def make_plan(command: str, cuts: dict[str, CutDecision], report: verify.VerifyReport, *,
              tidlog: Path | None, all_writers_stamp: bool,
              shown: dict[str, Path] | None = None) -> CutPlan:
    """The plan of ``cuts`` (from :func:`decide_cuts` with its ``report``):
    per storage, every transaction dropped and why.  ``shown``: the paths
    to name (restore: the destinations, not the temporary files)."""
    rule = RULE_STAMPS if all_writers_stamp else RULE_LOG
    scans = report.scans
    final = {s: -1 if d.point.last_tid is None else d.point.last_tid for s, d in cuts.items()}
    for s, d in cuts.items():
        scans[s].extend_to(d.point.last_tid if d.point.last_tid is not None else 0)
    # where each stamp id lies, to say why a stamped transaction goes
    where: dict[str, dict[str, int]] = {}
    for s, scan in scans.items():
        for tid, st in scan.items:
            if st is not None:
                where.setdefault(st.id, {}).setdefault(s, tid)
    storages = {}
    for s, d in sorted(cuts.items()):
        kept = d.point.last_tid
        listed: list[DroppedTxn] = []
        first = None
        for tid, st in scans[s].ascending():
            if kept is not None and tid <= kept:
                continue
            if first is None:
                first = tid
            if len(listed) >= MAX_LISTED:
                break
            listed.append(DroppedTxn(tid, st.id if st else None,
                                     _reason(s, tid, st, d, rule, first, where, cuts, final)))
        storages[s] = StoragePlan(
            id=s, path=str((shown or {}).get(s, d.path)), size=d.size, log_tid=d.tid,
            start_tid=d.start_tid if d.start_tid is not None else d.tid,
            cut_tid=kept, offset=d.point.offset, rule=d.rule, why=_why(d, rule),
            dropped=d.point.dropped, log_dropped=d.log_point.dropped, transactions=listed)
    notes = []
    short = [s for s, d in cuts.items()
             if (last := filestorage.last_tid(d.path)) is not None and d.tid > last]
    if short:
        notes.append(f"the TID log's TID is after the end of the file of {', '.join(sorted(short))}")
    return CutPlan(command=command, tidlog=None if tidlog is None else str(tidlog),
                   rule=rule, all_writers_stamp=all_writers_stamp, storages=storages,
                   log_splits=[verify.describe_split(sp) for sp in report.splits],
                   notes=notes)


def _reason(s, tid, st, d: CutDecision, rule, first, where, cuts, final) -> str:
    if d.rule == RULE_LOWERED and tid <= d.tid:
        return "below the TID log's point: dropped to undo a split (stale or damaged TID log)"
    if rule != RULE_STAMPS:
        return "after the TID log's point"
    if st is not None:
        parts = where.get(st.id, {})
        missing = [m for m in st.storages if m not in parts]
        if missing:
            outside = [m for m in missing if m not in cuts]
            text = f"split: no part in {', '.join(missing)}"
            if outside:
                text += f" ({', '.join(outside)} not in this set)"
            return text
        gone = [m for m in st.storages if m != s and m in cuts and parts[m] > final[m]]
        if gone:
            return f"its part in {', '.join(gone)} is dropped there"
    if tid == first:
        return "after the TID log's point"
    return "after a dropped transaction of this storage (a cut keeps a prefix)"


def _report_healed(report: verify.VerifyReport, echo: Echo) -> None:
    for split, heals in sorted(report.healed.items()):
        echo(f"healed: split transaction {split} is undone by its heal on "
             + ", ".join(f"{s} ({verify.format_tid(t)})" for s, t in sorted(heals.items())))
    for split in sorted(report.accepted):
        echo(f"accepted: split transaction {split} was accepted as it is by the operator"
             " (tidstorage heal --accept): not cut for")


def confirm_cuts(cuts: dict[str, CutDecision], *, window: float,
                 echo: Echo = quiet, accepted: Iterable[str] = ()) -> None:
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
    after = verify.check({s: d.path for s, d in cuts.items()}, window=window,
                         accepted=accepted)
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


def tidlog_accepted(path: Path | None) -> frozenset[str]:
    """The splits the TID log ``path`` says an operator accepted."""
    if path is None or not path.exists():
        return frozenset()
    return frozenset(read_log(path).accepted())


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
