"""``tidstorage repair``: the cut in place, after a crash.

Each live ``Data.fs`` is cut at its published TID in the daemon's TID log
(or ``-t``; see :mod:`tidstorage.tools.cut`).  Refused while a process holds
a storage's ``Data.fs.lock``; the locks are held during the repair.  Before a
file is cut, it is copied to ``Data.fs.before-repair`` and the copy is
checked (size, SHA-256 read back from disk); pruned blob files are moved to
``<blob_dir>.before-repair``.  A leftover safety copy is never overwritten:
the repair refuses and says what to do.  Resumable: the plan is recorded
beside each ``Data.fs`` before anything changes, and a re-run replays it
(see :func:`run_repair`).  Re-running a finished repair changes nothing.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError, StorageConfig
from ..errors import ToolError
from ..formats import blobs, filestorage
from ..formats.durable import atomic_write, fsync_dir
from ..formats.filestorage import CutPoint, ScanError
from . import verify
from .common import (
    Echo,
    Lock,
    os_error_text,
    quiet,
    require,
    require_storages,
    safety_copy,
    same_bytes,
)
from .cut import (
    RULE_LOG,
    RULE_STAMPS,
    CutDecision,
    CutPlan,
    StoragePlan,
    confirm_cuts,
    decide_cuts,
    describe_cut,
    make_plan,
    tidlog_accepted,
    tidlog_tids,
)

__all__ = [
    "PAUSE_AFTER_CUT_ENV",
    "PLAN_SUFFIX",
    "SAFETY_SUFFIX",
    "RepairResult",
    "run_repair",
]

#: Suffix of repair's safety copy of a Data.fs (and of the pruned blobs dir).
SAFETY_SUFFIX = ".before-repair"

@dataclass
class RepairResult:
    tidlog: Path
    cuts: dict[str, CutDecision] = field(default_factory=dict)
    safety_copies: dict[str, Path] = field(default_factory=dict)
    pruned_blobs: dict[str, int] = field(default_factory=dict)
    pruned_to: dict[str, Path] = field(default_factory=dict)
    leftovers: list[Path] = field(default_factory=list)
    coherent: bool = True
    #: with ``dry_run``: what would be done (nothing was changed)
    plan: CutPlan | None = None

    @property
    def changed(self) -> bool:
        return bool(self.safety_copies or self.pruned_blobs)



def _repair_storages(config: Config) -> dict[str, StorageConfig]:
    require_storages(config)
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
            "log_point": dict(d.log_point.__dict__), "rule": d.rule,
            "start_tid": d.start_tid}


def _cut_from_json(data: dict) -> CutDecision:
    return CutDecision(data["id"], Path(data["path"]), data["size"], data["tid"],
                       data["final_tid"], CutPoint(**data["point"]), CutPoint(**data["log_point"]),
                       data.get("rule", RULE_LOG), data.get("start_tid"))


def _write_plans(plan: dict, paths: list[Path]) -> None:
    """The plan, durably, beside every Data.fs (temporary file, fsync,
    rename, fsync of the directory): a re-run finds it whatever survives."""
    data = json.dumps(plan, indent=1, sort_keys=True) + "\n"
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


def _pause_after_cut(sid: str) -> None:
    marker = os.environ.get(PAUSE_AFTER_CUT_ENV)
    if marker:
        Path(marker).write_text(sid)
        while True:
            time.sleep(3600)


def _make_plan(storages, tids, tidlog: Path, window: float, force_cut: bool, echo: Echo,
               result: RepairResult, *, all_writers_stamp: bool = False,
               dry_run: bool = False) -> dict | None:
    """Decide the cuts and what to prune; refuse leftovers; None: nothing to do.
    With ``dry_run``, sets ``result.plan`` and says what would be refused
    (in its notes) instead of refusing."""
    paths = {s: st.data_fs for s, st in storages.items()}
    try:
        cuts, report = decide_cuts(paths, tids, window=window, echo=echo, force_cut=force_cut,
                                   all_writers_stamp=all_writers_stamp,
                                   accepted=tidlog_accepted(tidlog))
        if dry_run:
            result.plan = make_plan("repair", cuts, report, tidlog=tidlog,
                                    all_writers_stamp=all_writers_stamp)
    except ScanError as exc:
        raise ToolError(f"cannot read {exc.path}: {exc}; nothing was changed") from None
    result.cuts = cuts
    entries: dict[str, dict] = {}
    refusals = []
    for s, d in sorted(cuts.items()):
        if not dry_run:
            echo(describe_cut(d))
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
            pruned = blobs.prune(blob_dir, d.point.last_tid, dry_run=True).files
            if pruned:
                entry.update(blob_dir=str(blob_dir), blobs_to=str(moved))
                if dry_run:
                    result.plan.notes.append(f"storage {s}: {len(pruned)} blob file(s) newer "
                                             f"than the cut would be moved to {moved}")
                if moved.exists():
                    refusals.append(
                        f"storage {s}: {moved} (blob files pruned by an earlier repair) "
                        "exists: check, then delete or move it away, and run repair again")
        entries[s] = entry
    if refusals and dry_run:
        result.plan.notes += [f"repair would refuse: {r}" for r in refusals]
    elif refusals:
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
        raise ToolError("\n".join([*problems, (
            "nothing more was changed; check these storages, then remove the plan files "
            f"(*{PLAN_SUFFIX} beside each Data.fs) to start a new repair")]))
    made: list[Path] = []
    for s in todo:  # safety copies: every one checked before any cut
        d = cuts[s]
        safety = Path(plan["storages"][s]["safety"])
        if safety.exists():
            if not same_bytes(safety, d.path):
                raise ToolError(f"storage {s}: {safety} exists and is not a copy of {d.path}: "
                                "it is never overwritten; nothing more was changed")
            echo(f"storage {s}: safety copy {safety} (made by the interrupted repair) checked")
        else:
            try:
                size, digest = safety_copy(d.path, safety)
            except (OSError, ToolError) as exc:
                why = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
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


def heal_before_repair(config: Config, tidlog: Path | None, *, window: float,
                       echo: Echo = quiet) -> list:
    """``repair --heal``: undo, on the files, every split their ends hold
    (as ``tidstorage heal`` does online), before the cut; returns the
    :class:`~tidstorage.tools.heal.SplitHeal` of each (healed or refused).

    Only with ``[server] all_writers_stamp``: the cut that follows is then
    raised to the stamps' point, which keeps the heals and every whole
    transaction after the TID log's point; without it the cut would drop
    them all, and healing would gain nothing (refused, ConfigError).
    The site must be down: the files are opened (their locks taken) here."""
    import dataclasses

    from .heal import run_heal

    if not config.server.all_writers_stamp:
        raise ConfigError("repair --heal needs [server] all_writers_stamp = true: without a"
                          " stamp on every writer's multi-storage commits the files cannot prove"
                          " what is whole after the TID log's point, and the cut there would"
                          " drop the heals with the rest (run repair without --heal)")
    storages = _repair_storages(config)
    if tidlog is None:
        tidlog = require(config.server.status_file, "server.status_file",
                         "repair (or give a TID log with -t)")
    published = tidlog_tids(tidlog, storages, echo)
    report = verify.check({s: st.data_fs for s, st in storages.items()}, window=window,
                          accepted=tidlog_accepted(tidlog))
    ids = [sp.id for sp in report.splits]
    if not ids:
        echo("repair --heal: no split transaction at the files' ends: nothing to heal")
        return []
    # The files themselves, whatever the config says of ZEO: the site is down.
    local = dataclasses.replace(config, storages={
        s: dataclasses.replace(st, zeo=None) for s, st in config.storages.items()})
    result = run_heal(local, ids, echo=echo, published=published)
    for heal in result.heals:
        echo(f"repair --heal: split {heal.split}: {heal.state}"
             + (f" ({heal.reason})" if heal.reason else "")
             + (": it will be cut" if heal.state not in ("healed", "already healed") else ""))
    return result.heals


def run_repair(config: Config, *, tidlog: Path | None = None,
               window: float = verify.DEFAULT_WINDOW, force_cut: bool = False,
               dry_run: bool = False, echo: Echo = quiet) -> RepairResult:
    """Cut every live Data.fs at its published TID (see the module docstring).

    Resumable: the plan (the cut points, what to prune) is written durably
    beside every Data.fs (``Data.fs.repair-plan``) before anything is
    changed, and removed when the repair is done.  A run that finds a plan
    replays it -- never a new plan over a half-cut set, which would choose
    another point -- checking at each step what is already done; a safety
    copy is never overwritten (an existing one must be the file's copy).

    With ``config.server.all_writers_stamp``, the cuts are raised to the
    stamps' point (:mod:`tidstorage.tools.cut`).  With ``dry_run``, only
    ``result.plan`` is computed: no lock taken, no safety copy, no plan
    file, nothing cut or moved.
    """
    storages = _repair_storages(config)
    missing = [f"storage {s}: {st.data_fs} does not exist" for s, st in sorted(storages.items())
               if not st.data_fs.exists()]
    if missing:
        raise ToolError("\n".join(missing + ["nothing was changed"]))
    if dry_run:
        return _dry_run(config, storages, tidlog, window, force_cut, echo)
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
            tids = tidlog_tids(tidlog, storages, echo)
            result = RepairResult(tidlog=tidlog)
            plan = _make_plan(storages, tids, tidlog, window, force_cut, echo, result,
                              all_writers_stamp=config.server.all_writers_stamp)
            if plan is not None:
                _write_plans(plan, [_plan_path(st.data_fs) for st in storages.values()])
        if plan is not None:
            _execute_plan(plan, [_plan_path(st.data_fs) for st in storages.values()], echo,
                          result)
            try:
                confirm_cuts(result.cuts, window=window, echo=echo,
                             accepted=tidlog_accepted(result.tidlog))
            except ToolError as exc:
                echo(f"ERROR: {exc}")
                result.coherent = False
            for st in storages.values():  # done: a new run plans anew
                _plan_path(st.data_fs).unlink(missing_ok=True)
                fsync_dir(st.data_fs.parent)
    finally:
        for lock in locks:
            lock.release()
    if not result.changed:
        echo("nothing to repair: every storage ends at its published TID")
    for p in result.leftovers:
        if p not in result.safety_copies.values() and p not in result.pruned_to.values():
            echo(f"note: {p} is left from an earlier repair: delete it once you are satisfied")
    return result


def _dry_run(config: Config, storages, tidlog: Path | None, window: float, force_cut: bool,
             echo: Echo) -> RepairResult:
    """The plan of a repair, changing nothing (see :func:`run_repair`)."""
    aws = config.server.all_writers_stamp
    pending = _read_plan(storages)
    if pending is not None:
        result = RepairResult(tidlog=Path(pending["tidlog"]))
        cuts = {s: _cut_from_json(e["cut"]) for s, e in sorted(pending["storages"].items())}
        result.cuts = cuts
        plans = {s: StoragePlan(
            id=s, path=str(d.path), size=d.size, log_tid=d.tid,
            start_tid=d.start_tid if d.start_tid is not None else d.tid,
            cut_tid=d.point.last_tid, offset=d.point.offset, rule=d.rule,
            why="the cut point of the interrupted repair (kept as it was planned)",
            dropped=d.point.dropped, log_dropped=d.log_point.dropped)
            for s, d in cuts.items()}
        result.plan = CutPlan(
            command="repair", tidlog=pending["tidlog"], rule=RULE_STAMPS if aws else RULE_LOG,
            all_writers_stamp=aws, storages=plans,
            notes=[f"an interrupted repair's plan exists ({PLAN_SUFFIX} beside each Data.fs): "
                   "repair would resume it, whatever the TID log says now"])
        return result
    if tidlog is None:
        tidlog = require(config.server.status_file, "server.status_file",
                         "repair (or give a TID log with -t)")
    tids = tidlog_tids(tidlog, storages, echo)
    result = RepairResult(tidlog=tidlog)
    todo = _make_plan(storages, tids, tidlog, window, force_cut, echo, result,
                      all_writers_stamp=aws, dry_run=True)
    if todo is None:
        result.plan.notes.append("nothing to repair: every storage ends at its cut point")
    result.plan.notes.append("the files were read as they are now, without taking their "
                             "locks: the repair itself refuses while a server holds one")
    result.cuts = {}  # nothing was cut
    return result
