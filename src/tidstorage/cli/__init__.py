"""The ``tidstorage`` command (click): one group; the commands live in
``daemon.py`` (serve, dump, admin, log, demo) and ``tools.py`` (backup,
restore, repair, verify, cleanup, adopt); ``common.py`` has the shared
options and the one place errors become exit codes (``errors.py``)."""

from __future__ import annotations

import click

from . import daemon, tools


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tidstorage")
def main() -> None:
    """Coherent backups and crash repair for a set of ZODB storages."""


daemon.register(main)
tools.register(main)


if __name__ == "__main__":  # pragma: no cover
    main()
