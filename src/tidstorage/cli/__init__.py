"""The ``tidstorage`` command (click): one group; the commands live in
``daemon.py`` (serve, dump, admin, log, demo) and ``tools.py`` (backup,
restore, repair, verify, cleanup, adopt) and ``config.py`` (config check,
config from-zope); ``common.py`` has the shared
options and the one place errors become exit codes (``errors.py``)."""

from __future__ import annotations

import click

from . import config, daemon, heal, standby, tools


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tidstorage")
def main() -> None:
    """Coherent backups and crash repair for a set of ZODB storages."""


daemon.register(main)
tools.register(main)
config.register(main)
heal.register(main)
standby.register(main)


if __name__ == "__main__":  # pragma: no cover
    main()
