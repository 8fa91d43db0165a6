"""The operator commands: ``backup``, ``restore``, ``repair``, ``verify``,
``cleanup`` (registered on the ``tidstorage`` group by :func:`register`).

Exit codes: 0 success, 1 operational failure (the message names the storage
and/or file), 2 bad configuration or usage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .common import CONFIG as _CONFIG
from .common import CONFIG_OPTIONAL, EXIT_FAILURE, EXIT_USAGE
from .common import errors as _Errors
from .common import fail as _fail
from .common import load as _load
from .common import progress as _common_progress

_WINDOW = click.option("--window", type=click.FloatRange(min=1.0), default=3600.0,
                       show_default=True,
                       help="Seconds of TID time read before each storage's cut.")
_FORCE_CUT = click.option("--force-cut", is_flag=True,
                          help="Cut even if the stamp check lowers a cut by more than "
                               "cut.MAX_CUT_LOWERING (1 hour of commits) below the TID "
                               "log's point (refused by default: a sign of a foreign or "
                               "swapped repository or TID log).")


#: ``--storages a,b``: act on these storages only (the storages of this host
#: when the ZEO servers run on several machines; see README "Storages on
#: several hosts")
STORAGES = click.option("--storages", "storage_ids", metavar="ID,ID",
                        help="Act on these storages only (a comma list of storage ids: "
                             "the storages of this host, when they run on several hosts); "
                             "the rest of the config is shared.")


def load_for(config_path, storage_ids):
    """The config, restricted to ``--storages`` (exit 2 naming unknown ids)."""
    from ..config import ConfigError
    from ..tools.common import parse_storage_list, restrict_storages

    config = _load(config_path)
    try:
        return restrict_storages(config, parse_storage_list(storage_ids))
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", EXIT_USAGE)


def load_hosts(config_path, storage_ids):
    """``(config restricted to --storages, the whole config, some)``: *some*
    is true when ``--storages`` names only some of the storages (this
    host's, of several hosts)."""
    config = load_for(config_path, storage_ids)
    full = _load(config_path) if storage_ids is not None else config
    return config, full, set(config.storages) != set(full.storages)


# -- backup ----------------------------------------------------------------


class _BackupProgress:
    """Per-storage progress bars (rich) on a terminal (backup, restore)."""

    def __init__(self, ids):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TextColumn("{task.fields[phase]}"), TimeElapsedColumn(),
            console=Console(stderr=True), transient=False)
        self.tasks = {s: self.progress.add_task(s, total=None, phase="waiting") for s in ids}

    def __call__(self, sid, phase, done, total):
        task = self.tasks[sid]
        if phase == "repozo":
            self.progress.update(task, completed=done, total=total or None, phase="repozo")
        elif phase == "blobs":
            self.progress.update(task, phase=f"blobs: {done} bytes copied")
        elif phase == "done":
            t = max(self.progress.tasks[task].total or 0, done, 1)
            self.progress.update(task, completed=t, total=t, phase=f"done, {done} bytes written")
        elif phase in TRANSFERS:
            self.progress.update(task, completed=done, total=total or None,
                                 phase=TRANSFERS[phase])
        else:
            self.progress.update(task, phase="FAILED")


class _PlainProgress:
    """Progress outside a terminal (cron mail, journald) of a backup or a
    restore: on stderr, a line per storage when it starts, at each quarter
    of its estimated size, and when it ends."""

    def __init__(self) -> None:
        self.shown: dict[str, int] = {}
        self.transfers: set[tuple[str, str]] = set()

    def __call__(self, sid, phase, done, total):
        from .common import human_size

        if phase == "repozo":
            quarter = int(4 * done / total) if total else 0
            if sid not in self.shown:
                self.shown[sid] = 0
                click.echo(f"{sid}: repozo started"
                           + (f" (~{human_size(total)} to copy)" if total else ""), err=True)
            elif 0 < quarter < 4 and quarter > self.shown[sid]:
                self.shown[sid] = quarter
                click.echo(f"{sid}: {25 * quarter}% ({human_size(done)})", err=True)
        elif phase == "done":
            click.echo(f"{sid}: done, {human_size(done)} written", err=True)
        elif phase == "failed":
            click.echo(f"{sid}: FAILED", err=True)
        elif phase in TRANSFERS and (sid, phase) not in self.transfers:
            self.transfers.add((sid, phase))
            click.echo(f"{sid}: {TRANSFERS[phase]}"
                       + (f" (~{human_size(total)})" if total else ""), err=True)


#: The object store's phases (tools/objectstore.py) as the displays name them.
TRANSFERS = {"upload": "uploading to the object store",
             "download": "downloading from the object store"}


def _progress(config):
    return _common_progress(config, _BackupProgress, _PlainProgress)


@click.command()
@_CONFIG
@click.option("--full", is_flag=True, help="Full repozo backups (-F).")
@click.option("--gzip", is_flag=True, help="Compress repozo files (-z).")
@click.option("--quick", is_flag=True, help="repozo's quick incremental check (-Q).")
@click.option("--jobs", type=click.IntRange(min=1), help="Storages backed up at once "
              "(default: the number of cores).")
@click.option("--max-lag", type=click.FloatRange(min=0), metavar="S",
              help="Fail (back up nothing) if the daemon's published point lags more than S"
                   " seconds, is not bootstrapped, or cannot be reached.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@STORAGES
def backup(config_path, full, gzip, quick, jobs, max_lag, as_json, storage_ids):
    """Back up every storage: TID log copy, repozo, blob snapshots.

    The backup asks the daemon for its point first: the TID log copy ends
    at the daemon's point at backup time (the log's last record may be up to
    burst_period older); it warns when the point lags, and --max-lag makes
    that an error. The backup's timestamp is appended to
    backup.timestamp_file only if every storage succeeded.

    \b
    Examples:
      tidstorage backup -c /etc/tidstorage.toml --max-lag 60
      tidstorage backup -c site.toml --full --gzip --json
      tidstorage backup -c site.toml --storages main,catalog   # this host's storages
    """
    from ..tools.backup import run_backup
    from .common import human_size

    config = load_for(config_path, storage_ids)
    with _Errors(), _progress(config) as progress:
        result = run_backup(config, full=full, gzip=gzip, quick=quick, jobs=jobs,
                            progress=progress, max_lag=max_lag)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        source = {"daemon": "the daemon's point at backup time",
                  "tidlog": "the TID log's last record"}.get(result.point_source or "", "?")
        click.echo(f"TID log copied to {result.tidlog_copy} (restore point: {source})")
        for sid, r in sorted(result.storages.items()):
            if not r.ok:
                continue
            text = (f"{sid}: {r.mode}, {len([f for f in r.files if not f.endswith('.index')])} "
                    f"new file(s), {human_size(r.bytes)}, {r.seconds:.1f} s")
            if r.blob_snapshot:
                text += (f"; blobs: {r.blob_files} file(s), {r.blob_linked} linked, "
                         f"{r.blob_copied} copied ({human_size(r.blob_bytes_copied)})")
            click.echo(text)
    failed = [r for r in result.storages.values() if not r.ok]
    for r in sorted(failed, key=lambda r: r.id):
        click.echo(f"tidstorage: {r.error}", err=True)
    if failed:
        _fail(f"backup FAILED for storage(s) {', '.join(sorted(r.id for r in failed))}: "
              "no timestamp appended")
    if not as_json:
        click.echo(f"backup {result.timestamp} recorded in {config.backup.timestamp_file}")


# -- restore ---------------------------------------------------------------


@click.command()
@_CONFIG
@click.option("--date", help="Restore the last backup at or before this UTC date "
              "(yyyy-mm-dd[-hh[-mm[-ss]]]); default: the last backup.")
@click.option("-t", "--tidlog", type=click.Path(dir_okay=False, path_type=Path),
              help="Cut at the TIDs of this TID log (default: the copy saved by the backup).")
@click.option("--no-cut", is_flag=True, help="Do not cut (plain repozo restore + blobs).")
@click.option("--check", is_flag=True, help="Restore into a temporary directory, compare "
              "with the live files, delete: touch nothing live.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Restore as DIR/<storage id>.fs and DIR/<storage id>.blobs/ (the id "
                   "quoted into a safe file name: letters, digits, -_. stay, the rest %XX).")
@click.option("--force", is_flag=True, help="Replace existing files (each is kept as "
              "<file>.before-restore, and so is a replaced blob directory).")
@click.option("--jobs", type=click.IntRange(min=1), help="Storages recovered at once.")
@_WINDOW
@_FORCE_CUT
@click.option("--dry-run", is_flag=True, help="Print the cut plan (per storage: cut TID, "
              "transactions dropped, why) and change nothing (recovers into a temporary "
              "directory, deleted).")
@click.option("--at", "at", metavar="TIME", help="Point-in-time restore: the newest "
              "coherent point at or before TIME (ISO 8601, UTC unless it has an offset; "
              "compared with the TIDs' own times), a point id as --list-points prints it, "
              "or 'latest'; from the first backup that holds it.")
@click.option("--list-points", is_flag=True, help="List the backups and the points they "
              "can restore to (with the gaps); change nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run, --plan or "
              "--list-points: JSON.")
@click.option("--plan", "plan", metavar="[FILE]", is_flag=False, flag_value="",
              help="Storages on several hosts: --plan alone (with --json, and --at) "
                   "computes the plan every host applies (where every storage's repository "
                   "is visible; changes nothing); --plan FILE applies the plan in FILE to "
                   "the storages of this host (--storages).")
@STORAGES
def restore(config_path, date, tidlog, no_cut, check, output_dir, force, jobs, window,
            force_cut, dry_run, at, list_points, as_json, plan, storage_ids):
    """Restore every storage from its backups, cut coherently.

    \b
    Examples:
      tidstorage restore -c site.toml --dry-run          # the plan; nothing changed
      tidstorage restore -c site.toml --output-dir /srv/restored
      tidstorage restore -c site.toml --date 2026-11-30 --check
      tidstorage restore -c site.toml --list-points      # what --at can restore to
      tidstorage restore -c site.toml --at 2026-11-30T14:05:00Z --output-dir /srv/pitr
      tidstorage restore -c site.toml --plan --json > plan.json   # several hosts
      tidstorage restore -c site.toml --plan plan.json --storages main --force
    """
    from ..formats.repozo import parse_date
    from ..tools.cut import CACHE_NOTE
    from ..tools.restore import run_restore

    if list_points:
        if any([date, tidlog, no_cut, check, output_dir, force, dry_run, at]):
            _fail("--list-points only lists: not with other restore options", EXIT_USAGE)
        config = _load(config_path)
        with _Errors(), _progress(config) as progress:  # issue 13: the store's copy
            from ..tools.objectstore import pull_if_target
            pull_if_target(config, echo=lambda t: click.echo(t, err=True), progress=progress)
        _list_points(config, as_json)
        return
    if plan is not None:
        _restore_plan(config_path, storage_ids, plan, at, date, tidlog, no_cut, check,
                      dry_run, output_dir, force, jobs, window, force_cut, as_json)
        return
    if at is not None:
        from ..tools.pitr import parse_at

        if date is not None or tidlog is not None or no_cut:
            _fail("--at chooses the backup and the point: not with --date, -t/--tidlog "
                  "nor --no-cut", EXIT_USAGE)
        try:
            parse_at(at)
        except ValueError as exc:
            _fail(str(exc), EXIT_USAGE)
    if date is not None:
        try:
            parse_date(date)
        except ValueError as exc:
            _fail(str(exc), EXIT_USAGE)
    if check and output_dir is not None:
        _fail("--check and --output-dir cannot be used together", EXIT_USAGE)
    if as_json and not dry_run:
        _fail("--json goes with --dry-run, --plan or --list-points", EXIT_USAGE)
    config, full, some = load_hosts(config_path, storage_ids)
    if some and _restore_some(full, sorted(config.storages), at, date, tidlog, no_cut, check,
                              output_dir, force, jobs, window, force_cut, dry_run, as_json):
        return
    with _Errors(), _progress(config) as progress:
        from ..tools.objectstore import pull_if_target  # issue 13: the store's copy
        pull_if_target(config, echo=lambda t: click.echo(t, err=True), progress=progress)
        result = run_restore(
            config, at=at, date=date, tidlog=tidlog.resolve() if tidlog else None, no_cut=no_cut,
            output_dir=output_dir.resolve() if output_dir else None, force=force,
            check=check, window=window, jobs=jobs, force_cut=force_cut, dry_run=dry_run,
            echo=_plan_echo(as_json), progress=progress)
    if dry_run:
        _print_plan(result.plan, as_json)
        return
    if check:
        if not result.ok:
            _fail("check FAILED: a restored file is longer than, or differs from, the live one")
        click.echo("check: every restored file is a prefix of the live one; nothing was changed")
        return
    if result.lowered():
        click.echo(f"note: the cut was lowered for {', '.join(result.lowered())} (see above)")
    if output_dir is None:
        click.echo(CACHE_NOTE)
    else:
        click.echo("note: if these files replace live storages: " + CACHE_NOTE)


def _restore_some(full, ids, at, date, tidlog, no_cut, check, output_dir, force, jobs, window,
                  force_cut, dry_run, as_json) -> bool:
    """restore --storages (some of the storages, without --plan): every host
    must cut at one point.  A shared repository (backup.target) gives every
    host the same inputs: the plan is computed from it here and applied to
    these storages (True: done).  Without one, an explicit TID log (-t, the
    same file on every host), --no-cut or --dry-run go on as a restore of
    these storages (False); anything else is refused."""
    from ..tools.cut import CACHE_NOTE
    from ..tools.objectstore import enabled
    from ..tools.restore import restore_shared

    if not enabled(full) or tidlog is not None or no_cut:
        if tidlog is None and not no_cut and not dry_run:
            _fail("restore --storages (some of the storages: several hosts) needs one point"
                  " for every host: --plan FILE (computed where every repository is visible:"
                  " restore --plan --json), -t TIDLOG (the same file on every host), or a"
                  " shared repository (backup.target)", EXIT_USAGE)
        return False
    if date is not None or check:
        _fail("restore --storages from a shared repository: the plan chooses the backups (use"
              " --at, the same on every host); not with --date nor --check", EXIT_USAGE)
    with _Errors(), _progress(full) as progress:
        result = restore_shared(full, ids, at=at,
                                output_dir=output_dir.resolve() if output_dir else None,
                                force=force, jobs=jobs, window=window, force_cut=force_cut,
                                dry_run=dry_run, echo=_plan_echo(as_json), progress=progress)
    if dry_run:
        _print_plan(result.plan, as_json)
    else:
        click.echo(CACHE_NOTE if output_dir is None
                   else "note: if these files replace live storages: " + CACHE_NOTE)
    return True


def _restore_plan(config_path, storage_ids, plan, at, date, tidlog, no_cut, check, dry_run,
                  output_dir, force, jobs, window, force_cut, as_json):
    """restore --plan (compute) and --plan FILE (apply): storages on
    several hosts."""
    from ..tools.cut import CACHE_NOTE
    from ..tools.restore import apply_plan, plan_hosts

    if any([date, tidlog, no_cut, check, dry_run]):
        _fail("--plan chooses the backups and the point: not with --date, -t/--tidlog, "
              "--no-cut, --check nor --dry-run", EXIT_USAGE)
    if at is not None:
        from ..tools.pitr import parse_at
        try:
            parse_at(at)
        except ValueError as exc:
            _fail(str(exc), EXIT_USAGE)
    config = load_for(config_path, storage_ids)
    echo = _plan_echo(as_json)
    with _Errors(), _progress(config) as progress:  # issue 13: the store's copy
        from ..tools.objectstore import pull_if_target
        pull_if_target(config, echo=lambda t: click.echo(t, err=True), progress=progress)
    if plan == "":  # compute
        if output_dir is not None or force:
            _fail("--plan (to compute a plan) changes nothing: not with --output-dir nor "
                  "--force", EXIT_USAGE)
        with _Errors():
            result = plan_hosts(config, at=at, window=window, jobs=jobs,
                                force_cut=force_cut, echo=echo)
        _print_plan(result.plan, as_json)
        return
    if at is not None or as_json:
        _fail("--plan FILE applies a plan: --at and --json go with --plan alone (computing "
              "it)", EXIT_USAGE)
    from ..errors import ToolError
    from ..tools.cut import read_plan

    try:
        data = read_plan(Path(plan))
    except ToolError as exc:
        _fail(str(exc), EXIT_USAGE)
    with _Errors(), _progress(config) as progress:
        apply_plan(config, data, output_dir=output_dir.resolve() if output_dir else None,
                   force=force, jobs=jobs, echo=click.echo, progress=progress)
    click.echo(CACHE_NOTE)


def _list_points(config, as_json):
    from ..tools.common import require, require_storages
    from ..tools.identity import check_identities
    from ..tools.pitr import inventory

    with _Errors():
        require_storages(config)
        require(config.backup.timestamp_file, "backup.timestamp_file", "restore --list-points")
        check_identities(config, for_what="restore --list-points")
        inv = inventory(config)
    if as_json:
        click.echo(json.dumps(inv.to_json(), indent=2, sort_keys=True))
    else:
        for line in inv.lines():
            click.echo(line)


def _plan_echo(as_json):
    """With --json, the tool's messages go to stderr (stdout: the JSON only)."""
    if as_json:
        return lambda text: click.echo(text, err=True)
    return click.echo


def _print_plan(plan, as_json):
    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2, sort_keys=True))
    else:
        for line in plan.lines():
            click.echo(line)


# -- repair ----------------------------------------------------------------


@click.command()
@_CONFIG
@click.option("-t", "--tidlog", type=click.Path(dir_okay=False, path_type=Path),
              help="TID log (default: server.status_file, the daemon's).")
@_WINDOW
@_FORCE_CUT
@click.option("--dry-run", is_flag=True, help="Print the cut plan (per storage: cut TID, "
              "transactions dropped, why) and change nothing (no lock, copy or plan file).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.option("--heal", "heal", is_flag=True,
              help="First undo, on the files, the split transactions their ends hold (as "
                   "tidstorage heal does online); cut only the splits that cannot be undone. "
                   "Needs [server] all_writers_stamp = true.")
@STORAGES
def repair(config_path, tidlog, window, force_cut, dry_run, as_json, heal, storage_ids):
    """Cut every live Data.fs at its published TID (after a crash).

    A checked safety copy (Data.fs.before-repair) is made before any cut and
    kept; pruned blob files are moved to <blob_dir>.before-repair. The plan
    is recorded first (Data.fs.repair-plan): an interrupted repair is
    resumed by running it again.

    \b
    Examples:
      tidstorage repair -c site.toml --dry-run           # the plan; nothing changed
      tidstorage repair -c site.toml
      tidstorage repair -c site.toml --heal              # undo the splits, cut the rest
      tidstorage repair -c site.toml --storages main     # this host's storages only
    """
    from ..tools.cut import CACHE_NOTE
    from ..tools.repair import heal_before_repair, run_repair

    if as_json and not dry_run:
        _fail("--json goes with --dry-run", EXIT_USAGE)
    if heal and dry_run:
        _fail("--heal and --dry-run cannot be used together (see tidstorage heal --dry-run)",
              EXIT_USAGE)
    config = load_for(config_path, storage_ids)
    if storage_ids is not None:
        if heal:
            _fail("--heal needs every storage of a split: not with --storages", EXIT_USAGE)
        with _Errors():
            config, tidlog = _hosts_repair(config, tidlog)
    with _Errors():
        heals = []
        if heal:
            heals = heal_before_repair(config, tidlog.resolve() if tidlog else None,
                                       window=window, echo=click.echo)
        result = run_repair(config, tidlog=tidlog.resolve() if tidlog else None,
                            window=window, force_cut=force_cut, dry_run=dry_run,
                            echo=_plan_echo(as_json))
    if dry_run:
        _print_plan(result.plan, as_json)
        return
    if result.changed:
        click.echo("safety copies kept (delete them once satisfied): "
                   + ", ".join(str(p) for p in list(result.safety_copies.values())
                               + list(result.pruned_to.values())))
        click.echo(CACHE_NOTE)
    if heal:
        undone = [h.split for h in heals if h.state in ("healed", "already healed")]
        kept = [h.split for h in heals if h.split not in undone]
        click.echo(f"healed: {len(undone)} split transaction(s) undone"
                   + (f" ({', '.join(undone)})" if undone else "")
                   + f"; {len(kept)} cut instead" + (f" ({', '.join(kept)})" if kept else ""))
    if not result.coherent:
        _fail("the repaired files still hold split transactions (see above)")


def _hosts_repair(config, tidlog):
    """repair --storages: the stamps' raise needs every storage's file, so
    the cut is the TID log's point (all_writers_stamp off); on a host
    without the daemon's TID log, it is asked from the daemon and kept
    beside the first storage's Data.fs (a resumed repair reads it again)."""
    import dataclasses
    import time

    from ..formats.durable import atomic_write
    from ..formats.repozo import format_timestamp
    from ..tools.backup import fetch_tidlog

    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, all_writers_stamp=False))
    live = config.server.status_file
    if tidlog is None and (live is None or not live.exists()):
        from ..errors import ClientError, ToolError
        try:
            data = fetch_tidlog(config)
        except (ClientError, OSError) as exc:
            raise ToolError(f"no TID log on this host ({live}) and the daemon did not send "
                            f"it: {exc}; give -t") from None
        first = config.storages[sorted(config.storages)[0]].data_fs
        name = (live.name if live is not None else "tidlog") + "-from-daemon-"
        tidlog = first.parent / (name + format_timestamp(time.time()))
        atomic_write(tidlog, data)
        click.echo(f"TID log asked from the daemon, kept as {tidlog}")
    return config, tidlog


# -- verify ----------------------------------------------------------------


def _parse_files(specs) -> dict[str, Path]:
    from ..tools.common import id_from_filename

    out = {}
    for spec in specs:
        if "=" in spec:
            sid, _, path = spec.partition("=")
        else:
            path = spec
            sid = id_from_filename(Path(spec).stem if Path(spec).suffix == ".fs"
                                   else Path(spec).name)
        if not sid or not path:
            raise click.BadParameter(f"{spec!r}: expected ID=PATH or PATH", param_hint="--files")
        if sid in out:
            raise click.BadParameter(f"storage id {sid!r} given twice", param_hint="--files")
        out[sid] = Path(path).resolve()
    return out


@click.command()
@CONFIG_OPTIONAL
@click.option("--files", "files", multiple=True, metavar="[ID=]PATH",
              help="Check these files instead (repeatable; ID defaults to the file name "
                   "without .fs, %XX unquoted, as restore --output-dir names them).")
@click.option("-t", "--tidlog", type=click.Path(dir_okay=False, path_type=Path),
              help="Check the cut at this TID log's TIDs instead of the files' ends.")
@click.option("--compute", is_flag=True, help="Print the largest coherent cut.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@_WINDOW
def verify(config_path, files, tidlog, compute, as_json, window):
    """Report multi-storage transactions split between the files.

    Exit 1 if a transaction is split (without --compute), 0 if coherent.

    \b
    Examples:
      tidstorage verify -c site.toml                   # the live files' ends
      tidstorage verify -c site.toml -t var/tidstorage.tid   # the published point
      tidstorage verify --files a=restored/a.fs --files b=restored/b.fs --compute
    """
    from ..formats.filestorage import find_cut
    from ..tools import verify as v
    from ..tools.cut import tidlog_accepted, tidlog_tids

    accepted_from = tidlog.resolve() if tidlog else None
    if files:
        paths = _parse_files(files)
    elif config_path:
        config = _load(config_path)
        if not config.storages:
            _fail(f"configuration error: {config.path}: no storage configured", EXIT_USAGE)
        missing = [st.name for st in config.storages.values() if st.data_fs is None]
        if missing:
            _fail(f"configuration error: storages.{missing[0]}.data_fs: required by verify",
                  EXIT_USAGE)
        paths = {sid: st.data_fs for sid, st in config.storages.items()}
        accepted_from = accepted_from or config.server.status_file
    else:
        _fail("give -c FILE or --files", EXIT_USAGE)
    msgs = []
    with _Errors():
        cut = tidlog_tids(tidlog.resolve(), paths, msgs.append) if tidlog else None
        report = v.check(paths, cut, window=window, compute=compute,
                         accepted=tidlog_accepted(accepted_from))
        coherent_cut = {}
        if compute:
            for s, path in sorted(paths.items()):
                tid = report.coherent[s]
                point = find_cut(path, max(tid, 0))
                coherent_cut[s] = {"tid": point.last_tid, "offset": point.offset,
                                   "size": path.stat().st_size, "dropped": point.dropped}
    for m in msgs:
        click.echo(m, err=True)
    if as_json:
        click.echo(json.dumps({
            "coherent": report.ok,
            "splits": [{"id": sp.id, "storages": list(sp.storages), "present": sp.present,
                        "missing": list(sp.missing), "unknown": list(sp.unknown)}
                       for sp in report.splits],
            "cut": report.cut,
            "healed": report.healed,
            "accepted": sorted(report.accepted),
            "coherent_cut": coherent_cut or None,
            "windows": {s: {"path": w.path, "last_tid": w.last_tid, "read_back_to": w.bound,
                            "transactions": w.transactions, "stamped": w.stamped,
                            "whole_file": w.exhausted, "warning": w.warning}
                        for s, w in sorted(report.windows.items())},
        }, indent=2, sort_keys=True))
    else:
        for s, w in sorted(report.windows.items()):
            back = "the whole file" if w.exhausted else f"back to {v.format_tid(w.bound)}"
            click.echo(f"{s}: {w.path}: {w.transactions} transaction(s) read ({w.stamped} "
                       f"stamped), {back}")
            if w.warning:
                click.echo(f"warning: {w.warning}")
        what = "the cut at the TID log's TIDs" if cut is not None else "the files"
        for split, heals in sorted(report.healed.items()):
            click.echo(f"healed: split transaction {split} is undone by its heal on "
                       + ", ".join(f"{s} ({v.format_tid(t)})" for s, t in sorted(heals.items())))
        for split in sorted(report.accepted):
            click.echo(f"accepted: split transaction {split} was accepted as it is by the"
                       " operator (not coherent: it stays split; not reported below)")
        if report.ok:
            click.echo(f"coherent: no multi-storage transaction is split in {what}")
        else:
            click.echo(f"{len(report.splits)} split transaction(s) in {what}:")
            for sp in report.splits:
                click.echo(f"  {v.describe_split(sp)}")
        if compute:
            click.echo("largest coherent cut:")
            for s, c in sorted(coherent_cut.items()):
                click.echo(f"  {s}: keep up to {v.format_tid(c['tid'])}: offset {c['offset']} "
                           f"of {c['size']}, {c['dropped']} transaction(s) dropped")
    if not report.ok and not compute:
        sys.exit(EXIT_FAILURE)


# -- cleanup ---------------------------------------------------------------


@click.command()
@_CONFIG
@click.option("--keep", type=click.IntRange(min=1),
              help="Keep the recorded backups from the N-th newest full recorded one on "
                   "(default: backup.keep_full_backups).")
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@STORAGES
def cleanup(config_path, keep, dry_run, storage_ids):
    """Delete what the newest recorded backups do not need; prune timestamp_file.

    \b
    Examples:
      tidstorage cleanup -c site.toml --dry-run
      tidstorage cleanup -c site.toml --keep 2
      tidstorage cleanup -c site.toml --storages main,catalog   # this host's backups
    """
    from ..tools.cleanup import run_cleanup

    config, _full, some = load_hosts(config_path, storage_ids)
    with _Errors():
        from ..tools.objectstore import after_cleanup, enabled, pull_if_target  # issue 13
        with _progress(config) as progress:
            pull_if_target(config, echo=click.echo, progress=progress)
        plan = run_cleanup(config, keep, dry_run=dry_run, echo=click.echo)
        if not dry_run:
            after_cleanup(config, plan, echo=click.echo, shared=not some)
        if enabled(config) and some:
            click.echo("note: the store's recorded backups (timestamps/) and TID log copies"
                       " (tidlog/) are every host's: a cleanup of every storage prunes them")


# -- adopt -----------------------------------------------------------------


@click.command()
@_CONFIG
@click.option("--tidlog", "tidlogs", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also adopt this TID log file (repeatable): restore -t accepts it then.")
@click.option("--force", is_flag=True, help="Adopt a repository whose newest full backup does "
              "not start like the live Data.fs (after a pack).")
@click.option("--dry-run", is_flag=True, help="Only say what would be adopted.")
def adopt(config_path, tidlogs, force, dry_run):
    """Give this set's existing backups an identity, once.

    Repositories and TID log copies made before identities existed (or by
    the legacy tool) are refused by backup, restore and cleanup until
    adopted. Refuses what already belongs to another set or storage.

    \b
    Examples:
      tidstorage adopt -c site.toml --dry-run
    """
    from ..tools.identity import adopt as run_adopt

    config = _load(config_path)
    with _Errors():
        res = run_adopt(config, tidlogs=[p.resolve() for p in tidlogs], force=force,
                        dry_run=dry_run)
    verb = "would adopt" if dry_run else "adopted"
    click.echo(f"backup set {res.set_id}" + (" (new)" if res.created_set else ""))
    for p in res.adopted:
        click.echo(f"{verb} {p}")
    for p in res.kept:
        click.echo(f"already this set's: {p}")


def register(main: click.Group) -> None:
    """Add the operator commands to the ``tidstorage`` group."""
    for command in (backup, restore, repair, verify, cleanup, adopt):
        main.add_command(command)
