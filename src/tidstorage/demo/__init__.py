"""``tidstorage demo``: the whole system, live, on local processes.

1. Two ``runzeo`` servers serve three storages (``main`` and ``catalog`` on
   one, ``archive`` on the other); the daemon is configured with them.
2. Writer processes commit transactions over random subsets of the storages
   through the tidstorage wrapper, keeping a cross-storage invariant (see
   ``workload.py``: per-pair counters that must agree).
3. While they write: a full backup, then an incremental one.
4. A writer is killed (SIGKILL) between the ``tpc_finish`` calls of a
   multi-storage commit: the live files now hold half of it. The daemon sees
   the BEGIN in doubt, finds the split from the stamps and publishes nothing
   past it on the split's storages.
5. ``tidstorage heal`` undoes the split's part online, through ZEO, while
   the other writers go on: one transaction undone, nothing dropped (a
   repair would have cut everything after the split); the daemon publishes
   past the heal.
6. The latest backup set is restored into ``restored/`` and cut at its
   point (raised to the stamps' point: every writer stamps); the ZEO servers
   are stopped and the live files are verified and repaired in place (after
   the heal there is nothing split to cut). Every result is verified: no
   split transaction (stamps) and the invariant holds.

Everything it starts is stopped at the end, even on error. The directory
keeps a ``tidstorage.toml`` that works with every other command.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..tools.common import id_filename
from .cluster import DaemonProcess, ZeoServer

STORAGES = {"main": ("a", "1"), "catalog": ("a", "2"), "archive": ("b", "1")}
#: A file marking a directory made by the demo (a new run may wipe it).
MARKER = ".tidstorage-demo"


@dataclass
class Cluster:
    """Local ZEO servers, the daemon, and writer processes, in one directory."""

    directory: Path
    grace: float = 2.0
    servers: dict[str, ZeoServer] = field(default_factory=dict)
    daemon: DaemonProcess | None = None
    writers: dict[int, subprocess.Popen] = field(default_factory=dict)

    def start(self) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        for name, names in (("a", ["1", "2"]), ("b", ["1"])):
            server = ZeoServer(d / f"zeo-{name}", names, blob=True)
            server.start()
            self.servers[name] = server
        storages = {}
        for sid, (server, zname) in STORAGES.items():
            zeo = self.servers[server]
            storages[sid] = {
                "data_fs": os.path.relpath(zeo.data_fs(zname), d),
                "blob_dir": os.path.relpath(zeo.blob_dir(zname), d),
                "backup_dir": f"backups/{sid}",
                "zeo": f"127.0.0.1:{zeo.port}",
                "zeo_storage": zname,
            }
        backup = {
            "timestamp_file": "backups/timestamps.log",
            "status_file_backup_dir": "backups/tidlog",
            "keep_full_backups": 3,
        }
        token = d / "admin-token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        self.daemon = DaemonProcess(
            d,
            storages=storages,
            backup=backup,
            server={
                "status_file": "var/tidstorage.tid",
                "burst_period": 0.2,
                "full_dump_period": 5,
                "in_doubt_grace": self.grace,
                "admin_token_file": "admin-token",
                "all_writers_stamp": True,
            },
        )
        self.daemon.start()
        self.daemon.wait_bootstrapped()

    @property
    def config_path(self) -> Path:
        return self.daemon.config_path

    def zeo_spec(self) -> dict[str, list]:
        return {
            sid: ["127.0.0.1", self.servers[server].port, zname]
            for sid, (server, zname) in STORAGES.items()
        }

    def start_writer(self, writer: int, *, seconds: float, kill_after: int | None = None,
                     pause: float = 0.0, timeout: float = 1.0,
                     seed: int | None = None) -> subprocess.Popen:
        cmd = [
            sys.executable, "-m", "tidstorage.demo.workload",
            "--zeo", json.dumps(self.zeo_spec()),
            "--server", f"127.0.0.1:{self.daemon.port}",
            "--writer", str(writer), "--seconds", str(seconds), "--pause", str(pause),
            "--timeout", str(timeout),
        ]
        if kill_after:
            cmd += ["--kill-after-first-finish", str(kill_after)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        log = open(self.directory / f"writer-{writer}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL, text=True)
        log.close()
        self.writers[writer] = proc
        return proc

    def stop_servers(self) -> None:
        for server in self.servers.values():
            server.stop()

    def stop(self) -> None:
        for proc in self.writers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.daemon is not None and self.daemon.proc is not None:
            self.daemon.stop()
        self.stop_servers()


def read_roots(paths: dict[str, Path]) -> dict[str, dict]:
    """The invariant's counters of each Data.fs, opened read-only."""
    import ZODB
    from ZODB.FileStorage import FileStorage

    roots = {}
    for sid, path in paths.items():
        storage = FileStorage(str(path), read_only=True)
        db = ZODB.DB(storage)
        try:
            conn = db.open()
            roots[sid] = {k: dict(v) for k, v in conn.root().items() if str(k).startswith("pairs-")}
            conn.close()
        finally:
            db.close()
    return roots


@dataclass
class Outcome:
    echo: Callable[[str], None]
    ok: bool = True

    def say(self, text: str) -> None:
        self.echo(text)

    def check(self, condition: bool, text: str) -> None:
        if not condition:
            self.ok = False
            self.echo(f"FAILED: {text}")


def _judge(outcome: Outcome, what: str, paths: dict[str, Path]) -> None:
    from ..tools import verify
    from .workload import check_invariant

    report = verify.check(paths)
    problems = check_invariant(read_roots(paths))
    outcome.check(report.ok, f"{what}: split transactions {[s.id for s in report.splits]}")
    outcome.check(not problems, f"{what}: invariant broken: {problems[:3]}")
    if report.ok and not problems:
        outcome.say(f"  {what}: coherent (no split transaction), invariant holds")


def _describe_cuts(outcome: Outcome, cuts: dict, what: str) -> int:
    from ..core.tids import tid_time

    total = 0
    for sid, cut in sorted(cuts.items()):
        point = cut.point
        total += point.dropped
        lowered = " (lowered to the largest coherent cut)" if cut.lowered else ""
        last = f"{point.last_tid:#018x} ({tid_time(point.last_tid)})" if point.last_tid else "-"
        outcome.say(f"  {what} {sid:8} cut after {last}: {point.dropped} transactions dropped{lowered}")
    return total


def run_demo(directory: Path, seconds: float = 20.0, echo: Callable[[str], None] = print) -> bool:
    """Run the demo; True when everything verified."""
    from ..config import load_config
    from ..tools.backup import run_backup
    from ..tools.heal import run_heal
    from ..tools.repair import run_repair
    from ..tools.restore import run_restore

    directory = directory.resolve()
    marker = directory / MARKER
    if directory.exists() and any(directory.iterdir()):
        if not marker.exists():
            raise FileExistsError(f"{directory} is not empty: choose another --dir or remove it")
        shutil.rmtree(directory)  # a previous demo's directory: start afresh
    directory.mkdir(parents=True)
    marker.write_text("made by `tidstorage demo`: the next demo run in this directory removes it\n")
    outcome = Outcome(echo)
    cluster = Cluster(directory)
    t0 = time.monotonic()

    def clock() -> str:
        return f"[{time.monotonic() - t0:5.1f}s]"

    try:
        cluster.start()
        echo(f"{clock()} 2 ZEO servers, storages {', '.join(STORAGES)}; daemon on"
             f" 127.0.0.1:{cluster.daemon.port}; config {cluster.config_path}")
        config = load_config(cluster.config_path)
        writers = [cluster.start_writer(w, seconds=seconds, pause=0.002) for w in (1, 2, 3)]
        echo(f"{clock()} 3 writers committing over random subsets of the storages for {seconds:g} s")
        time.sleep(seconds * 0.25)
        full = run_backup(config, full=True)
        outcome.check(full.ok, "full backup failed")
        echo(f"{clock()} full backup taken while writing")
        time.sleep(seconds * 0.25)
        victim = cluster.start_writer(9, seconds=seconds, kill_after=3)
        victim.wait(timeout=seconds + 30)
        outcome.check(victim.returncode == -signal.SIGKILL, "the victim writer was not killed")
        echo(f"{clock()} writer 9 killed between the tpc_finish calls of its 3rd multi-storage commit")
        deadline = time.monotonic() + cluster.grace + 30
        while "SPLIT transaction" not in cluster.daemon.log():
            if time.monotonic() > deadline:
                outcome.check(False, "the daemon did not find the split transaction")
                break
            time.sleep(0.2)
        else:
            line = next(x for x in cluster.daemon.log().splitlines() if "SPLIT transaction" in x)
            split = line.split("SPLIT transaction ", 1)[1].split(". No", 1)[0]
            echo(f"{clock()} daemon: the in-doubt BEGIN, checked in the storages, is split: {split};"
                 " nothing is published at or past it on its storages")
        would = run_repair(config, dry_run=True).plan
        healed = run_heal(config, echo=lambda _line: None)
        undone = [h for h in healed.heals if h.state == "healed"]
        outcome.check(len(undone) == 1 and healed.ok,
                      "heal did not undo the split: " + "; ".join(
                          line for h in healed.heals for line in h.lines()))
        echo(f"{clock()} tidstorage heal, online, while the writers go on:")
        outcome.say(f"  healed: {len(undone)} transaction undone, 0 dropped (a repair now would"
                    f" have dropped {would.dropped} transactions)")
        for h in undone:
            outcome.say(f"  {h.split}: undone on {', '.join(sorted(h.heal_tids))} by {h.heal_id};"
                        f" daemon: {h.daemon}")
        incremental = run_backup(config)
        outcome.check(incremental.ok, "incremental backup failed")
        echo(f"{clock()} incremental backup taken while writing")
        done = 0
        for proc in writers:
            out, _ = proc.communicate(timeout=seconds + 60)
            outcome.check(proc.returncode == 0, f"a writer failed: {out}")
            try:
                summary = json.loads(out.strip().splitlines()[-1])
                done += summary["done"]
                outcome.check(summary["errors"] == 0, f"writer errors: {summary}")
            except (ValueError, IndexError, KeyError):
                outcome.check(False, f"no writer summary: {out!r}")
        echo(f"{clock()} writers done: {done} transactions, none failed")

        restored = directory / "restored"
        result = run_restore(config, output_dir=restored)
        echo(f"{clock()} latest backup restored into {restored} and cut:")
        dropped = _describe_cuts(outcome, {s: r.cut for s, r in result.storages.items() if r.cut},
                                 "restore")
        outcome.say(f"  restore: {dropped} transactions past the published point dropped")
        _judge(outcome, "restore", {sid: restored / f"{id_filename(sid)}.fs" for sid in STORAGES})

        cluster.daemon.stop()
        cluster.stop_servers()
        live = {sid: s.data_fs for sid, s in config.storages.items()}
        from ..tools import verify
        before = verify.check(live)
        outcome.say(f"  live files after the heal: {len(before.splits)} split transaction(s),"
                    f" {len(before.healed)} healed")
        outcome.check(not before.splits and len(before.healed) == 1,
                      "the live files are not healed")
        echo(f"{clock()} servers stopped; repairing the live files in place (nothing split is"
             " left to cut):")
        repair = run_repair(config)
        dropped = _describe_cuts(outcome, repair.cuts, "repair ")
        outcome.say(f"  repair: {dropped} transactions dropped; safety copies kept:"
                    f" {', '.join(str(p.name) for p in repair.safety_copies.values()) or '-'}")
        _judge(outcome, "repair", live)
        echo(f"{clock()} {'OK: every result is coherent' if outcome.ok else 'FAILED'}")
        echo(f"config kept for reuse: {cluster.config_path}"
             f" (e.g. tidstorage verify -c {cluster.config_path})")
        return outcome.ok
    finally:
        cluster.stop()
