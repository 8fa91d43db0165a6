"""``tidstorage heal``: undo a split transaction's part online, or accept it
(the tool is ``tools/heal.py``)."""

from __future__ import annotations

import json

import click

from .common import CONFIG, EXIT_FAILURE, EXIT_USAGE, errors, fail, load


@click.command("heal")
@CONFIG
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--dry-run", is_flag=True, help="Print the plan (per split: holders, objects to"
              " undo, what is in the way) and change nothing (the undo is tried and aborted).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (messages go"
              " to stderr).")
@click.option("--accept", "accept_id", metavar="ID", help="Record through the daemon that you"
              " accept split ID as it is (it is no longer frozen; needs [server]"
              " admin_token_file).")
@click.option("--wait", type=click.FloatRange(min=0.0), default=30.0, show_default=True,
              help="Seconds to wait for the daemon to show each heal.")
def heal(config_path, ids, dry_run, as_json, accept_id, wait) -> None:
    """Heal split transactions: undo a split's part on the storages that
    hold it, as one new transaction stamped as its heal, through ZEO while
    the site runs (or on local Data.fs files that nothing uses).

    Without ID, heals every split the daemon has frozen. Each split is
    proven again from the files after a barrier first; nothing is changed
    when the undo is not possible (a later transaction changed the same
    objects, or refers to an object the split created): then choose
    `tidstorage repair` or `tidstorage heal --accept ID`.

    Exit codes: 0 healed (or nothing to do), 1 refused or failed, 2 bad
    usage or configuration.

    \b
    Examples:
      tidstorage heal -c site.toml --dry-run            # the plan; nothing changed
      tidstorage heal -c site.toml                      # heal the daemon's frozen splits
      tidstorage heal -c site.toml ts:0f3c...e1 --json  # one split, as JSON
      tidstorage heal -c site.toml --accept ts:0f3c...e1
    """
    from ..tools.heal import accept, run_heal

    config = load(config_path)
    if accept_id is not None:
        if ids or dry_run:
            fail("--accept takes one split id and goes without IDs nor --dry-run", EXIT_USAGE)
        with errors():
            answer = accept(config, accept_id)
        if as_json:
            click.echo(json.dumps(answer, indent=2, sort_keys=True))
        else:
            click.echo(f"split {accept_id}: accepted as it is (the daemon no longer freezes it)")
        return
    echo = (lambda text: click.echo(text, err=True)) if as_json else click.echo
    with errors():
        result = run_heal(config, ids, dry_run=dry_run, echo=echo, wait=wait)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        for line in result.lines():
            click.echo(line)
    if not result.ok:
        raise SystemExit(EXIT_FAILURE)


def register(main: click.Group) -> None:
    main.add_command(heal)
