"""What every ``tidstorage`` command shares: the config option, loading it,
and the one place where errors become messages and exit codes."""

from __future__ import annotations

import contextlib
import sys

import click

from ..config import Config, load_config
from ..errors import EXIT_FAILURE, EXIT_USAGE, ConfigError, TidstorageError
from ..tools.common import human_size  # noqa: F401  (the CLI's sizes: one home)

__all__ = ["CONFIG", "CONFIG_OPTIONAL", "fail", "load", "errors", "human_size", "progress", "table", "EXIT_FAILURE",
           "EXIT_USAGE"]

#: The TOML config, required (most commands) or optional (serve, dump);
#: both default to $TIDSTORAGE_CONFIG.
CONFIG = click.option("-c", "--config", "config_path", required=True, envvar="TIDSTORAGE_CONFIG",
                      type=click.Path(dir_okay=False),
                      help="TOML config file (default: $TIDSTORAGE_CONFIG).")
CONFIG_OPTIONAL = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                               envvar="TIDSTORAGE_CONFIG",
                               help="TOML config file (default: $TIDSTORAGE_CONFIG).")


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table: rich on a terminal; plain tab-separated lines otherwise (cron
    mail, journald, pipes: nothing wrapped or truncated)."""
    if not sys.stdout.isatty():
        click.echo(f"# {title}")
        click.echo("\t".join(columns))
        for row in rows:
            click.echo("\t".join(row))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for name in columns:
        t.add_column(name, overflow="fold")
    for row in rows:
        t.add_row(*row)
    Console().print(t)


def fail(message: str, code: int = EXIT_FAILURE):
    """Print ``message`` (each line prefixed) on stderr and exit ``code``."""
    for line in str(message).splitlines() or [""]:
        click.echo(f"tidstorage: {line}", err=True)
    sys.exit(code)


def load(path: str | None) -> Config:
    """The config at ``path`` (the defaults without one); exit 2 if bad."""
    if path is None:
        return Config()
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_USAGE)


@contextlib.contextmanager
def errors():
    """Turn tidstorage's errors (and the file system's) into a message and
    the error's exit code: the only place that maps them."""
    try:
        yield
    except ConfigError as exc:
        fail(f"configuration error: {exc}", exc.exit_code)
    except TidstorageError as exc:
        fail(str(exc), exc.exit_code)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        fail(f"{exc.strerror or exc}{where}")


@contextlib.contextmanager
def progress(config: Config, bars, lines):
    """A progress display for the storages of ``config``: ``bars(ids)`` on a
    terminal (a rich Progress as ``.progress``, started and stopped here),
    ``lines()`` otherwise (cron mail, journald)."""
    if not sys.stderr.isatty():
        yield lines()
        return
    shown = bars(sorted(config.storages))
    shown.progress.start()
    try:
        yield shown
    finally:
        shown.progress.stop()
