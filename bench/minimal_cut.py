#!/usr/bin/env python
"""Benchmark: transactions dropped by restore and repair, at the TID log's
point vs the stamps' point (``[server] all_writers_stamp``), side by side.

A real set of FileStorages (``tests/support/fsfixtures.Site``: one ZODB
multi-database, every multi-storage commit stamped as tidstorage's wrapper
stamps it) under a load of ``--rate`` commits per second: 40 % on every
storage (each increments ``multi`` in every storage), 20 % on two, 40 % on
one.  The TID log is written as the daemon writes it: a record at most
every ``--burst-period`` seconds, so its last point lags by up to that much.

* **backup under load**: after ``--seconds``, ``tidstorage backup`` runs
  (storages one at a time, ``--jobs 1``) while the load goes on; then the
  same backup is restored twice, with the log's rule and with the stamps'
  rule (``restore --output-dir``);
* **power loss**: the load stops; one more transaction commits on every
  storage and one storage (chosen by ``--seed``) loses its record (its file
  ends in the middle of it); the live files are repaired twice (copies),
  with each rule.

For each: transactions dropped per storage, the transactions the files hold
above the log's point, and checks of the result: ``verify`` coherent and
the application invariant (``multi`` equal in every storage).

Example::

    .venv/bin/python bench/minimal_cut.py --seconds 20 --rate 50 --burst-period 5
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.fsfixtures import Site, read_counters  # noqa: E402  (test support)

from tidstorage.config import load_config  # noqa: E402
from tidstorage.formats import filestorage  # noqa: E402
from tidstorage.tools import verify  # noqa: E402
from tidstorage.tools.backup import run_backup  # noqa: E402
from tidstorage.tools.repair import run_repair  # noqa: E402
from tidstorage.tools.restore import run_restore  # noqa: E402

STAMPS_CONFIG = "stamps.toml"


def write_configs(site: Site) -> dict[str, Path]:
    """The site's config (the log's rule) and a copy saying every writer stamps."""
    text = site.config.read_text()
    stamps = site.config.with_name(STAMPS_CONFIG)
    stamps.write_text(text.replace("[server]\n", "[server]\nall_writers_stamp = true\n", 1))
    return {"log": site.config, "stamps": stamps}


class Load(threading.Thread):
    """Commits at ``rate`` per second; publishes every ``burst`` seconds."""

    def __init__(self, site: Site, rate: float, burst: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.site, self.rate, self.burst = site, rate, burst
        self.rnd = random.Random(seed)
        self.stop = threading.Event()
        self.commits = 0
        self.published = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ids = self.site.ids
            last_publish = time.monotonic()
            self.site.publish()
            nxt = time.monotonic()
            while not self.stop.is_set():
                r = self.rnd.random()
                if r < 0.4:
                    self.site.commit()
                elif r < 0.6:
                    self.site.commit(self.rnd.sample(ids, 2))
                else:
                    self.site.commit([self.rnd.choice(ids)])
                self.commits += 1
                now = time.monotonic()
                if now - last_publish >= self.burst:
                    self.site.publish()  # between commits: a coherent point
                    self.published += 1
                    last_publish = now
                nxt += 1.0 / self.rate
                time.sleep(max(0.0, nxt - time.monotonic()))
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def outcome(paths: dict[str, Path], dropped: dict[str, int]) -> dict:
    counters = {s: read_counters(p) for s, p in paths.items()}
    multi = {c["multi"] for c in counters.values()}
    report = verify.check(paths)
    return {"dropped": dropped, "total": sum(dropped.values()),
            "kept": {s: sum(1 for h in filestorage.iter_forward(p) if h.finished)
                     for s, p in paths.items()},
            "coherent": report.ok, "invariant": len(multi) == 1,
            "multi": sorted(multi)}


def restore_both(site: Site, configs: dict[str, Path], out: Path) -> dict[str, dict]:
    res = {}
    for rule, cfg in configs.items():
        dest = out / f"restore-{rule}"
        r = run_restore(load_config(cfg), output_dir=dest)
        assert r.coherent, rule
        dropped = {s: x.cut.point.dropped for s, x in r.storages.items()}
        res[rule] = outcome({s: dest / f"{s}.fs" for s in site.ids}, dropped)
        res[rule]["above_log"] = {s: p.log_dropped for s, p in r.plan.storages.items()}
    return res


def repair_both(site: Site, out: Path) -> dict[str, dict]:
    res = {}
    for rule in ("log", "stamps"):
        root = out / f"repair-{rule}"
        shutil.copytree(site.root, root, ignore=shutil.ignore_patterns("backups"))
        cfg = root / ("tidstorage.toml" if rule == "log" else STAMPS_CONFIG)
        r = run_repair(load_config(cfg))
        assert r.coherent, rule
        dropped = {s: d.point.dropped for s, d in r.cuts.items()}
        res[rule] = outcome({s: root / "var" / s / "Data.fs" for s in site.ids}, dropped)
        res[rule]["above_log"] = {s: d.log_point.dropped for s, d in r.cuts.items()}
    return res


def power_loss(site: Site, rnd: random.Random) -> str:
    """One more transaction on every storage; one storage loses its record."""
    with site:
        t = site.commit(stamp_id="lost-in-the-crash")
    victim = rnd.choice(site.ids)
    path = site.data_fs(victim)
    cut = filestorage.find_cut(path, t[victim] - 1)
    with open(path, "r+b") as f:  # the record half written: torn
        f.truncate(cut.offset + (path.stat().st_size - cut.offset) // 2)
    path.with_name("Data.fs.index").unlink(missing_ok=True)
    return victim


def show(title: str, res: dict[str, dict], ids) -> None:
    print(f"\n{title}")
    print(f"  {'storage':8} {'above log':>10} {'dropped (log)':>14} {'dropped (stamps)':>17}")
    for s in ids:
        print(f"  {s:8} {res['log']['above_log'][s]:>10} {res['log']['dropped'][s]:>14} "
              f"{res['stamps']['dropped'][s]:>17}")
    print(f"  {'total':8} {sum(res['log']['above_log'].values()):>10} "
          f"{res['log']['total']:>14} {res['stamps']['total']:>17}")
    for rule in ("log", "stamps"):
        r = res[rule]
        print(f"  {rule:6}: coherent={r['coherent']} invariant (multi equal)={r['invariant']} "
              f"multi={r['multi']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storages", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0, help="load before the backup")
    ap.add_argument("--rate", type=float, default=50.0, help="commits per second")
    ap.add_argument("--burst-period", type=float, default=5.0,
                    help="seconds between TID log records (the daemon's burst_period)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    logging.getLogger("tidstorage").setLevel(logging.ERROR)  # the torn tail's warnings
    fsmod = sys.modules["ZODB.FileStorage.FileStorage"]
    fsmod.fsync = None  # the page cache is enough here: this measures counts
    work = Path(tempfile.mkdtemp(prefix="tidstorage-minimal-cut-"))
    try:
        ids = tuple("abcdefgh"[:args.storages])
        site = Site(work / "site", ids, blobs=False)
        configs = write_configs(site)
        print(f"{len(ids)} storages, {args.rate:g} commits/s, TID log every "
              f"{args.burst_period:g} s, backup after {args.seconds:g} s of load "
              f"(seed {args.seed})")
        with site:
            load = Load(site, args.rate, args.burst_period, args.seed)
            load.start()
            time.sleep(args.seconds)
            backup = run_backup(load_config(site.config), jobs=1)
            load.stop.set()
            load.join()
        if load.error is not None:
            raise load.error
        assert backup.ok, backup.storages
        print(f"{load.commits} commits, {load.published + 1} TID log records; backup "
              f"{backup.timestamp}")
        show("backup under load, restored:", restore_both(site, configs, work), ids)
        victim = power_loss(site, random.Random(args.seed))
        show(f"power loss (storage {victim} lost the last all-storage transaction), "
             "repaired:", repair_both(site, work), ids)
    finally:
        if args.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
