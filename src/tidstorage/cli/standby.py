"""``tidstorage standby sync`` and ``tidstorage standby promote`` (see
:mod:`tidstorage.tools.standby`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import CONFIG as _CONFIG
from .common import EXIT_USAGE, human_size
from .common import errors as _errors
from .common import fail as _fail
from .tools import STORAGES, TRANSFERS, load_for, load_hosts
from .common import progress as _common_progress

_DIR = click.option("--dir", "directory", required=True,
                    type=click.Path(file_okay=False, path_type=Path),
                    help="The standby directory (DIR/<id>.fs, DIR/<id>.blobs, state files, "
                         "DIR/tidlog).")


class _Bars:
    """Per-storage bars (rich, on stderr) of the bytes checked and applied."""

    def __init__(self, ids):
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 DownloadColumn(), TextColumn("{task.fields[phase]}"),
                                 console=Console(stderr=True))
        self.tasks = {s: self.progress.add_task(s, total=None, phase="waiting") for s in ids}

    def __call__(self, sid, phase, done, total):
        task = self.tasks[sid]
        if phase == "done":
            t = max(self.progress.tasks[task].total or 0, 1)
            self.progress.update(task, completed=t, total=t, phase="done")
        else:
            self.progress.update(task, completed=done, total=total or None, phase=phase)


class _Lines:
    """Outside a terminal: a line per storage and phase on stderr."""

    def __init__(self) -> None:
        self.shown: set[tuple[str, str]] = set()

    def __call__(self, sid, phase, done, total):
        if (sid, phase) in self.shown:
            return
        self.shown.add((sid, phase))
        what = {"check": "checking new files against the .dat",
                "apply": "appending", "done": "done", **TRANSFERS}.get(phase, phase)
        click.echo(f"{sid}: {what}" + (f" ({human_size(total)})" if total else ""), err=True)


def _progress(config):
    return _common_progress(config, _Bars, _Lines)


@click.group()
def standby() -> None:
    """A warm standby of every storage, kept up to date from the backups.

    \b
    Examples:
      tidstorage standby sync -c site.toml --dir /srv/standby
      tidstorage standby promote -c site.toml --dir /srv/standby
    """


@standby.command()
@_CONFIG
@_DIR
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@STORAGES
def sync(config_path, directory, as_json, storage_ids):
    """Apply the repozo increments not yet applied to the standby.

    Per storage, checks cheaply that the standby is what its state says
    (its size, the md5 of the last increment applied against the .dat),
    verifies every new file against the .dat, appends them, fsyncs and
    records them. A new full backup (a pack) recovers that storage fully.
    Never cuts: promote does. An interrupted sync is rolled back to the last
    whole increment and completed by the next one. Mirrors the newest blob
    snapshots and copies the TID log copies into DIR/tidlog, keeping those
    from the oldest chain's full backup on.

    \b
    Examples:
      tidstorage standby sync -c site.toml --dir /srv/standby
      tidstorage standby sync -c site.toml --dir /srv/standby --json   # from cron
      tidstorage standby sync -c site.toml --dir /srv/standby --storages main
    """
    from ..tools.standby import run_sync

    config = load_for(config_path, storage_ids)
    echo = (lambda t: click.echo(t, err=True)) if as_json else click.echo
    with _errors(), _progress(config) as progress:
        from ..tools.objectstore import pull_if_target  # issue 13: the store's copy
        pull_if_target(config, echo=echo, progress=progress)
        result = run_sync(config, directory.resolve(), echo=echo, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
        return
    for sid, r in sorted(result.storages.items()):
        text = {"unchanged": "up to date", "incremental":
                f"{len(r.applied)} increment(s) applied ({human_size(r.bytes)})"}.get(
                    r.mode, f"recovered fully ({human_size(r.bytes)}): {r.reason}")
        if r.blob_snapshot:
            text += (f"; blobs of {r.blob_snapshot}: {r.blobs_copied} copied, "
                     f"{r.blobs_removed} removed")
        click.echo(f"{sid}: {text}; {r.path} is {human_size(r.size)}")
    click.echo(f"TID log copies: {len(result.tidlogs_copied)} copied, "
               f"{len(result.tidlogs_pruned)} pruned (older than the oldest chain), "
               f"{len(result.tidlogs_kept)} kept; {result.seconds:.1f} s")


@standby.command()
@_CONFIG
@_DIR
@click.option("--at", "at", metavar="TIME|ID|latest", help="The newest coherent point "
              "whose every TID is at or before TIME (ISO 8601, UTC unless it has an offset, "
              "or yyyy-mm-dd-hh-mm-ss), or the point ID (<copy timestamp>:<line>); default: "
              "the newest one the standby holds.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the cut set into OUT (a copy; the standby stays) instead of "
                   "cutting the standby in place (which consumes it).")
@click.option("--window", type=click.FloatRange(min=1.0), default=3600.0, show_default=True,
              help="Seconds of TID time read before each storage's cut.")
@click.option("--force-cut", is_flag=True, help="Cut even if the stamp check lowers a cut "
              "by more than an hour of commits (see restore).")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Cut exactly at the cut TIDs of this plan (the JSON of `tidstorage "
                   "restore --plan --json`, computed where every repository is visible): "
                   "storages on several hosts. Not with --at.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@STORAGES
def promote(config_path, directory, at, output_dir, window, force_cut, plan_file, as_json,
            storage_ids):
    """Cut the standby at a coherent point: a set ready to start.

    In place (O(tail): the standby is consumed, and sync refuses it
    afterwards), or into --output-dir (a copy of each kept prefix). Blob
    files past the cut are pruned, stale .index files removed, the cut
    verified, and a TID log with the cut point written for the new daemon.

    \b
    Examples:
      tidstorage standby promote -c site.toml --dir /srv/standby
      tidstorage standby promote -c site.toml --dir /srv/standby --at 2026-11-30T12:00 \\
          --output-dir /srv/pitr
      tidstorage standby promote -c site.toml --dir /srv/standby --storages main \\
          --at 2026-11-30T12:00      # several hosts: the same --at on each
      tidstorage restore -c site.toml --plan --json > plan.json   # where all repos are
      tidstorage standby promote -c site.toml --dir /srv/standby --storages main \\
          --plan plan.json           # several hosts: the same plan on each
    """
    from ..tools.cut import CACHE_NOTE
    from ..tools.pitr import parse_at
    from ..tools.standby import run_promote

    if at is not None:
        try:
            parse_at(at)
        except ValueError as exc:
            _fail(str(exc), EXIT_USAGE)
    if plan_file is not None and (at is not None or force_cut):
        _fail("--plan gives the cut: not with --at nor --force-cut", EXIT_USAGE)
    config, full, some = load_hosts(config_path, storage_ids)
    echo = (lambda t: click.echo(t, err=True)) if as_json else click.echo
    cut_plan = None
    if plan_file is not None:
        from ..tools.cut import read_plan
        with _errors():
            cut_plan = read_plan(plan_file)
    elif some and full.backup.target is not None:
        # A shared repository: every host computes the same plan from it.
        from ..tools.restore import shared_plan
        with _errors():
            _planned, cut_plan = shared_plan(full, sorted(config.storages), at=at,
                                             window=window, force_cut=force_cut, blobs=False,
                                             echo=echo)
        at = None
    elif some and at is None:
        _fail("--storages: give the same --plan FILE (or --at TIME) on every host (the "
              "newest point each standby holds differs from host to host), or use a shared "
              "repository (backup.target)", EXIT_USAGE)
    with _errors():
        result = run_promote(config, directory.resolve(), at=at,
                             output_dir=output_dir.resolve() if output_dir else None,
                             window=window, force_cut=force_cut, cut_plan=cut_plan,
                             echo=echo)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
        return
    if result.in_place:
        click.echo(f"promoted in place: {directory} is consumed (no longer a standby; "
                   "sync refuses it)")
    else:
        click.echo(f"promoted into {result.output_dir}; the standby {directory} is unchanged")
    click.echo("start, for each storage, a ZEO server (or Zope) on:")
    for sid, path in sorted(result.files.items()):
        bd = result.blob_dirs.get(sid)
        click.echo(f"  {sid}: data_fs = {path}" + (f", blob_dir = {bd}" if bd else ""))
    click.echo(f"then the tidstorage daemon with server.status_file = {result.new_tidlog} "
               "(it holds the cut point); point the config's data_fs/blob_dir at these files")
    click.echo(CACHE_NOTE)


def register(main: click.Group) -> None:
    """Add the ``standby`` group to the ``tidstorage`` group."""
    main.add_command(standby)
