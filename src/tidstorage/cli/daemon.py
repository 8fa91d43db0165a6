"""The daemon's commands: ``serve``, ``dump``, ``status``, ``admin``, ``log``, and ``demo``."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path

import click

from ..config import Config, ConfigError
from .common import CONFIG, CONFIG_OPTIONAL, EXIT_USAGE, fail, load

log = logging.getLogger("tidstorage")


class _ReopenableFileHandler(logging.FileHandler):
    """A file handler that SIGHUP can reopen (for logrotate)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


#: Longest log line the daemon writes (characters of its message): what a
#: peer sends (ids of 16 KiB, lists of 4096 storages) never makes a long line.
LOG_LINE_MAX = 8000


class _BoundedLines(logging.Filter):
    """Cut every message to LOG_LINE_MAX characters (one bounded line each)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > LOG_LINE_MAX:
            record.msg = message[:LOG_LINE_MAX] + f"... ({len(message)} characters)"
            record.args = None
        return True


def _setup_logging(log_file: Path | None, verbose: bool) -> logging.Handler:
    if log_file is not None:
        handler: logging.Handler = _ReopenableFileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_BoundedLines())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # ZEO/ZODB chatter (connection attempts) stays out of the daemon's log.
    for name in ("ZEO", "ZODB", "txn"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


# -- serve -----------------------------------------------------------------


@click.command()
@CONFIG_OPTIONAL
@click.option("--address", help="Listen address (default: config, else 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Listen port (default: config, else 9001).")
@click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path), help="The TID log.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def serve(config_path, address, port, status_file, verbose) -> None:
    """Run the coherency daemon in the foreground.

    Signals: SIGHUP reopens the server log and the TID log (the new TID log
    starts with a full record); SIGUSR1 logs the internal state;
    SIGTERM/SIGINT flush, fsync and exit 0.

    \b
    Examples:
      tidstorage serve -c /etc/tidstorage.toml
      TIDSTORAGE_CONFIG=/etc/tidstorage.toml tidstorage serve -v
    """
    config = load(config_path)
    handler = _setup_logging(config.server.log_file, verbose)
    from ..config import check_daemon, resolve_parent
    from ..daemon.server import Daemon

    try:
        for warning in check_daemon(config, address):
            log.warning("%s", warning)
        daemon = Daemon(
            config,
            address=address,
            port=port,
            status_file=resolve_parent(status_file) if status_file else None,
        )
    except (ConfigError, OSError) as exc:
        fail(f"cannot start: {exc}", EXIT_USAGE)
    try:
        asyncio.run(_serve(daemon, handler))
    except ConfigError as exc:
        fail(f"cannot start: {exc}", EXIT_USAGE)
    except OSError as exc:
        fail(f"cannot listen on {daemon.listen.address}:{daemon.listen.port}: {exc.strerror or exc}")
    if daemon.exit_code:
        sys.exit(daemon.exit_code)


async def _serve(daemon, handler: logging.Handler) -> None:
    loop = asyncio.get_running_loop()
    started = False
    pending: list[str] = []

    def on_stop(signame: str) -> None:
        log.info("received %s, stopping", signame)
        if started:
            asyncio.ensure_future(daemon.stop())
        else:
            pending.append(signame)  # stopped as soon as the start is complete

    def on_hup() -> None:
        if isinstance(handler, _ReopenableFileHandler):
            handler.reopen()
        log.info("received SIGHUP, reopening logs")
        daemon.reopen_logs()

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("state:\n%s", daemon.describe()))
    # The handlers are in place before the port opens: a SIGTERM sent as
    # soon as it accepts connections flushes the TID log like any other.
    await daemon.start()
    started = True
    if pending:
        await daemon.stop()
    await daemon.wait_stopped()


# -- dump ------------------------------------------------------------------


@click.command()
@CONFIG_OPTIONAL
@click.option("--server", "server", help="HOST:PORT of the daemon (instead of -c).")
@click.option("--json", "as_json", is_flag=True, help='Print {"storage id": tid, ...}.')
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the daemon.")
def dump(config_path, server, as_json, timeout) -> None:
    """Print the TIDs the daemon has published, with each storage's lag.

    \b
    Examples:
      tidstorage dump -c site.toml
      tidstorage dump --server 127.0.0.1:9001 --json
    """
    from ..core.addresses import parse_host_port
    from ..daemon.client import ClientError

    config = load(config_path)
    if server:
        try:
            address = parse_host_port(server, "daemon address")
        except ValueError as exc:
            fail(str(exc), EXIT_USAGE)
    else:
        address = (config.server.address, config.server.port)
    lags: dict[str, float | None] = {}
    try:
        with _client(config, address, timeout, own=not server) as client:
            tids = client.dump()
            bootstrapped = client.bootstrapped()
            if not as_json:
                try:
                    status = client.admin({"verb": "status"})
                    lags = {s: i.get("lag") for s, i in status.get("storages", {}).items()}
                except ClientError:
                    pass  # an older daemon: no lag column
    except ClientError as exc:
        fail(str(exc))
    where = f"{address[0]}:{address[1]}"
    if as_json:
        if not bootstrapped:
            # The shape stays {"id": tid}; a script must not take a point
            # that is not the daemon's yet for its current one.
            fail(f"the daemon at {where} has not completed its bootstrap: its published TIDs"
                 " are the TID log's, not current")
        click.echo(json.dumps(tids, sort_keys=True))
        return
    _print_tids(tids, title=f"published TIDs at {where}"
                + ("" if bootstrapped else " (bootstrap not complete)"), lags=lags)


@click.command()
@click.option("-c", "--config", "config_path", envvar="TIDSTORAGE_CONFIG",
              type=click.Path(dir_okay=False), required=True,
              help="TOML config file (default: $TIDSTORAGE_CONFIG).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings and the status as JSON.")
@click.option("--warn", type=click.FloatRange(0), default=60.0, show_default=True,
              help="WARNING when a storage's lag reaches this many seconds.")
@click.option("--crit", type=click.FloatRange(0), default=300.0, show_default=True,
              help="CRITICAL when a storage's lag reaches this many seconds.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the daemon.")
def status(config_path, as_json, warn, crit, timeout) -> None:
    """Health check of the published point, for monitoring (exit codes of
    the monitoring plugins: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).

    The lag of a storage is the age of the oldest committed transaction
    that the published point does not cover (0 when it covers everything).

    \b
    Examples:
      tidstorage status -c /etc/tidstorage.toml
      tidstorage status -c site.toml --warn 30 --crit 120 --json
    """
    from ..config import load_config
    from ..core import health
    from ..daemon.client import ClientError

    def out(code: int, summary: str, lines: list[str], data: dict) -> None:
        if as_json:
            click.echo(json.dumps({"state": health.NAMES[code], "code": code,
                                   "summary": summary, **data}, sort_keys=True, indent=1))
        else:
            click.echo(summary)
            for line in lines:
                click.echo(line)
        sys.exit(code)

    if crit < warn:
        out(health.UNKNOWN, f"TIDSTORAGE UNKNOWN - --crit {crit:g} is below --warn {warn:g}",
            [], {})
    try:
        config = load_config(config_path)
        token = config.auth_token()
    except (ConfigError, OSError) as exc:
        out(health.UNKNOWN, f"TIDSTORAGE UNKNOWN - configuration error: {exc}", [], {})
    address = (config.server.address, config.server.port)
    where = f"{address[0]}:{address[1]}"
    try:
        with _client(config, address, timeout, token=token) as client:
            answer = client.admin({"verb": "status"})
    except ClientError as exc:
        out(health.CRITICAL, f"TIDSTORAGE CRITICAL - daemon at {where} unreachable: {exc}",
            [], {"findings": [], "status": None})
    if not answer.get("ok"):
        out(health.UNKNOWN, f"TIDSTORAGE UNKNOWN - the daemon at {where} refused the status"
            f" request: {answer.get('error')}", [], {"status": answer})
    h = health.assess(answer, warn=warn, crit=crit,
                      full_dump_period=config.server.full_dump_period)
    lags = {s: i.get("lag") for s, i in answer.get("storages", {}).items()}
    lines = [f"{health.NAMES[c]}: {t}" for c, t in h.findings]
    out(h.code, h.summary(lags), lines,
        {"findings": [{"state": health.NAMES[c], "text": t} for c, t in h.findings],
         "status": answer})


def _client(config: Config, address: tuple[str, int], timeout: float, own: bool = True,
            token: str | None = None):
    """A connected client of the daemon (its token; its TLS certificate as
    the trust anchor, for self-signed setups, when it is the config's daemon)."""
    from ..daemon.client import Client

    if token is None:
        try:
            token = config.auth_token()
        except ConfigError as exc:
            fail(f"configuration error: {exc}", EXIT_USAGE)
    ssl_context = None
    if config.server.tls_cert is not None and own:
        import ssl

        ssl_context = ssl.create_default_context(cafile=str(config.server.tls_cert))
    return Client(address, auth_token=token, timeout=timeout, ssl_context=ssl_context)


# -- admin -----------------------------------------------------------------


@click.group()
def admin() -> None:
    """Correct the daemon's published state (needs [server] admin_token_file).

    The TID log's records only move up: a correction starts a new TID log
    holding the corrected state, and keeps the old file beside it
    (``<status_file>.before-correction-<time>``).

    \b
    Examples:
      tidstorage admin set-tid -c site.toml main 285212541829464917 --yes
      tidstorage admin forget -c site.toml bogus-id --yes
    """


def _admin_request(config_path: str, request: dict, yes: bool, what: str) -> None:
    from ..daemon.client import ClientError

    config = load(config_path)
    if not yes:
        fail(f"{what}: add --yes to confirm (a backup taken after this holds the corrected"
              " point)", EXIT_USAGE)
    try:
        token = config.admin_token()
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_USAGE)
    if token is None:
        fail("no [server] admin_token_file in the configuration", EXIT_USAGE)
    address = (config.server.address, config.server.port)
    try:
        with _client(config, address, 10.0) as client:
            answer = client.admin({**request, "token": token})
    except ClientError as exc:
        fail(str(exc))
    if not answer.get("ok"):
        fail(f"the daemon refused: {answer.get('error')}")
    old, new = answer.get("old"), answer.get("new")
    click.echo(f"{answer['storage']}: {'none' if old is None else f'{old:#x}'} ->"
               f" {'none' if new is None else f'{new:#x}'}"
               + (f"; old TID log kept as {answer['kept']}" if answer.get("kept") else ""))


@admin.command("set-tid")
@CONFIG
@click.option("--yes", is_flag=True, help="Confirm the change.")
@click.argument("storage")
@click.argument("tid", type=int)
def admin_set_tid(config_path, yes, storage, tid) -> None:
    """Set STORAGE's published TID to TID (even lower than it is).

    \b
    Examples:
      tidstorage admin set-tid -c site.toml main 285212541829464917 --yes
    """
    _admin_request(config_path, {"verb": "set-tid", "storage": storage, "tid": tid}, yes,
                   f"set the published TID of {storage} to {tid:#x}")


@admin.command("forget")
@CONFIG
@click.option("--yes", is_flag=True, help="Confirm the change.")
@click.argument("storage")
def admin_forget(config_path, yes, storage) -> None:
    """Stop publishing STORAGE (an id a forged report made the daemon publish).

    \b
    Examples:
      tidstorage admin forget -c site.toml bogus-id --yes
    """
    _admin_request(config_path, {"verb": "forget", "storage": storage}, yes,
                   f"forget storage {storage}")


def _print_tids(tids: dict[str, int], title: str, lags: dict | None = None) -> None:
    from ..core.tids import tid_age, tid_time
    from .common import table

    columns = ["storage", "TID", "hex", "time (UTC)", "age"]
    if lags:
        columns.append("lag")
    rows = []
    now = time.time()
    for storage, tid in sorted(tids.items()):
        row = [storage, str(tid), f"{tid:016x}", tid_time(tid), tid_age(tid, now)]
        if lags:
            lag = lags.get(storage)
            row.append("unknown" if lag is None else f"{lag:.1f} s")
        rows.append(row)
    table(title, columns, rows)


# -- demo ------------------------------------------------------------------


@click.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("tidstorage-demo"), show_default=True,
              help="Where the demo's servers, files and config live (must be empty or absent).")
@click.option("--seconds", type=click.FloatRange(5, 3600), default=20, show_default=True,
              help="How long the writers write.")
def demo(directory: Path, seconds: float) -> None:
    """Show it all live: ZEO servers, daemon, writers, backups, a crash,
    restore, repair, verify. Exit 0 only if every result is coherent."""
    from ..demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("ZEO", "ZODB", "txn", "tidstorage.reporter"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        ok = run_demo(directory, seconds)
    except FileExistsError as exc:
        fail(str(exc), EXIT_USAGE)
    sys.exit(0 if ok else 1)


# -- log -------------------------------------------------------------------


@click.group("log")
def log_group() -> None:
    """Inspect and rewrite TID logs (new and legacy formats)."""


@log_group.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the final TIDs as JSON.")
def log_check(file: Path, as_json: bool) -> None:
    """Check a TID log; print its final TIDs. Exit 1 naming the line on failure.

    A torn last line (left by a crash while appending) is a warning only.

    \b
    Examples:
      tidstorage log check var/tidstorage.tid
    """
    from ..formats.tidlog import check_log

    report = check_log(file)
    for lineno, message in report.warnings:
        click.echo(f"{file}:{lineno}: warning: {message}", err=True)
    for lineno, message in report.problems:
        click.echo(f"{file}:{lineno}: {message}", err=True)
    if as_json:
        click.echo(json.dumps(report.final_tids, sort_keys=True))
    else:
        _print_tids(report.final_tids, title=f"{file}: {report.records} records, final TIDs")
    if not report.ok:
        sys.exit(1)


@log_group.command("full")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here (default: replace FILE atomically).")
def log_full(file: Path, output: Path | None) -> None:
    """Rewrite a TID log as full records only."""
    from ..formats.tidlog import TidLogError, rewrite_full

    try:
        count = rewrite_full(file, output or file)
    except (TidLogError, OSError) as exc:
        fail(str(exc))
    click.echo(f"wrote {count} full records to {output or file}")


@log_group.command("recover")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the valid prefix here (must not exist; default: replace FILE "
                   "atomically, the original kept as FILE.corrupt-<time>).")
def log_recover(file: Path, output: Path | None) -> None:
    """Keep the records before the first corrupt line of a TID log.

    Stop the daemon first. The prefix is a state the daemon published (an
    older one): the daemon starts again from it.
    """
    from ..formats.tidlog import recover_log

    try:
        res = recover_log(file, output)
    except OSError as exc:
        fail(str(exc))
    if res.error is not None:
        click.echo(f"{res.error.path}:{res.error.lineno}: first corrupt line: {res.error.reason}")
    if output is None and res.original is None:
        click.echo(f"{file}: nothing to recover ({res.kept} valid records)")
        return
    click.echo(f"kept {res.kept} valid record(s), dropped {res.dropped_lines} line(s): "
               f"wrote {res.output}" + (f"; the original is kept as {res.original}"
                                        if res.original else ""))


def register(main: click.Group) -> None:
    """Add the daemon's commands to the ``tidstorage`` group."""
    for command in (serve, dump, status, admin, demo, log_group):
        main.add_command(command)
