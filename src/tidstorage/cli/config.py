"""``tidstorage config check`` and ``config from-zope``: one source of truth."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import CONFIG, EXIT_FAILURE, errors, fail, load

_FILES = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("config")
def config_group() -> None:
    """Compare the TOML with zope.conf / zeo.conf, or write it from them."""


@config_group.command("check")
@CONFIG
@click.option("--zope-conf", "zope_confs", multiple=True, type=_FILES,
              help="A zope.conf (or ZODB config) whose databases use the daemon (repeatable).")
@click.option("--zeo-conf", "zeo_confs", multiple=True, type=_FILES,
              help="A zeo.conf of the site (repeatable).")
@click.option("--no-probe", is_flag=True,
              help="Do not ask the ZEO servers for their last transaction.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check(config_path, zope_confs, zeo_confs, no_probe, as_json) -> None:
    """Check that the TOML, zope.conf and zeo.conf say the same (storage
    ids, ZEO addresses, Data.fs paths, the daemon's address) and that each
    data_fs is the file its ZEO server serves (its last TID). Exit 1 on any
    error.

    \\b
    Examples:
      tidstorage config check -c tidstorage.toml \\
          --zope-conf etc/zope.conf --zeo-conf zeo1/etc/zeo.conf --zeo-conf zeo2/etc/zeo.conf
    """
    from ..tools.zope_config import ERROR
    from ..tools.zope_config import check as run_check

    config = load(config_path)
    with errors():
        findings = run_check(config, list(zope_confs), list(zeo_confs), probe=not no_probe)
    if as_json:
        click.echo(json.dumps([f.to_json() for f in findings], indent=1))
    else:
        for f in findings:
            click.echo(f"{f.severity.upper()}: {f.text}")
    if any(f.severity == ERROR for f in findings):
        raise SystemExit(EXIT_FAILURE)


@config_group.command("from-zope")
@click.option("--zope-conf", "zope_confs", multiple=True, required=True, type=_FILES,
              help="A zope.conf (repeatable).")
@click.option("--zeo-conf", "zeo_confs", multiple=True, type=_FILES,
              help="A zeo.conf (repeatable): gives each storage its data_fs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("tidstorage.toml"), show_default=True, help="The TOML to write.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def from_zope(zope_confs, zeo_confs, output, force) -> None:
    """Write a TOML config from zope.conf and zeo.conf (zope.conf is read
    without Zope's schema). Review it, then run `config check`.

    \\b
    Examples:
      tidstorage config from-zope --zope-conf etc/zope.conf \\
          --zeo-conf zeo/etc/zeo.conf -o /etc/tidstorage.toml
    """
    import tomli_w

    from ..config import load_config
    from ..formats.durable import atomic_write
    from ..tools.zope_config import from_zope as build

    if output.exists() and not force:
        fail(f"{output} exists: use --force to replace it", 2)
    with errors():
        data = build(list(zope_confs), list(zeo_confs), output=output)
        text = ("# Written by tidstorage config from-zope from "
                + ", ".join(map(str, (*zope_confs, *zeo_confs))) + "\n" + tomli_w.dumps(data))
        atomic_write(output, text)
        load_config(output)  # what was written must load
    click.echo(f"wrote {output}: {len(data['storages'])} storage(s): "
               + ", ".join(sorted(data["storages"])))


def register(main: click.Group) -> None:
    main.add_command(config_group)
