#!/usr/bin/env python
"""Benchmark: a writer killed mid-commit under load; heal vs repair, side by
side on the same run's files.

One run of the demo's cluster (2 runzeo servers, storages main, catalog,
archive, the daemon with all_writers_stamp, 3 writers with a cross-storage
invariant). A 4th writer kills itself between the ``tpc_finish`` calls of a
multi-storage commit; once the daemon has proven the split:

* the ZEO servers are frozen (SIGSTOP) for the time of a copy of the three
  ``Data.fs`` and the TID log: the *repair* side works on that copy, i.e. the
  very files the heal starts from (the writers only pause);
* **heal**: ``tidstorage heal`` runs online while the writers go on; lost =
  the transactions undone (the split), downtime = 0 (the writers never
  stop; their errors are counted), and the seconds it took;
* **repair**: on the copy, the site as it would be stopped then: ZEO servers
  stop (measured on the live ones at the end), ``tidstorage repair`` at the
  copied TID log's point, servers start again (measured); lost = the
  transactions the cut drops.

``--delay``: how long after the split the operator acts (heal, or the copy
that repair works on): the split's storages stay frozen meanwhile, so what a
repair loses grows with it; a heal loses the split transaction whatever it.

Run: .venv/bin/python bench/heal.py [--seconds 20] [--delay 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from tidstorage.config import load_config  # noqa: E402
from tidstorage.demo import STORAGES, Cluster  # noqa: E402
from tidstorage.tools.heal import run_heal  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--delay", type=float, default=5.0,
                    help="seconds between the split and the operator's action (the split's"
                         " storages stay frozen meanwhile; the writers go on)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tidstorage-bench-heal-"))
    cluster = Cluster(work / "site")
    try:
        cluster.start()
        config = load_config(cluster.config_path)
        writers = [cluster.start_writer(w, seconds=args.seconds, pause=0.002) for w in (1, 2, 3)]
        time.sleep(args.seconds * 0.4)
        victim = cluster.start_writer(9, seconds=args.seconds, kill_after=3)
        victim.wait(timeout=args.seconds + 30)
        deadline = time.monotonic() + 60
        while "SPLIT transaction" not in cluster.daemon.log():
            if time.monotonic() > deadline:
                sys.exit("the daemon found no split")
            time.sleep(0.1)
        time.sleep(args.delay)  # the operator notices
        # The same files for the repair side: a consistent copy (ZEO frozen).
        copy = work / "copy"
        copy.mkdir()
        procs = [s.process for s in cluster.servers.values()]
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        try:
            for sid in STORAGES:
                shutil.copy2(config.storages[sid].data_fs, copy / f"{sid}.fs")
            shutil.copy2(config.server.status_file, copy / "tidstorage.tid")
        finally:
            for p in procs:
                p.send_signal(signal.SIGCONT)
        t = time.perf_counter()
        healed = run_heal(config)
        heal_seconds = time.perf_counter() - t
        undone = sum(1 for h in healed.heals if h.state == "healed")
        errors = 0
        for proc in writers:
            out, _ = proc.communicate(timeout=args.seconds + 60)
            errors += json.loads(out.strip().splitlines()[-1])["errors"] + (proc.returncode != 0)
        cluster.daemon.stop()
        t = time.perf_counter()
        cluster.stop_servers()
        stop_seconds = time.perf_counter() - t
        t = time.perf_counter()
        for server in cluster.servers.values():
            server.start()
        start_seconds = time.perf_counter() - t
        cluster.stop_servers()
        toml = copy / "t.toml"
        toml.write_text(f'[server]\nstatus_file = "{copy / "tidstorage.tid"}"\n'
                        + "".join(f'[storages.{sid}]\ndata_fs = "{copy / (sid + ".fs")}"\n'
                                  for sid in STORAGES))
        from tidstorage.tools.repair import run_repair

        t = time.perf_counter()
        repaired = run_repair(load_config(toml))
        repair_seconds = time.perf_counter() - t
        dropped = sum(c.point.dropped for c in repaired.cuts.values())
        print(f"split healed online: {undone} (writer errors during the heal: {errors})")
        print(f"{'':8} {'transactions lost':>18} {'downtime (s)':>13} {'tool (s)':>9}")
        print(f"{'heal':8} {undone:>18} {0.0:>13.2f} {heal_seconds:>9.2f}")
        down = stop_seconds + repair_seconds + start_seconds
        print(f"{'repair':8} {dropped:>18} {down:>13.2f} {repair_seconds:>9.2f}"
              f"   (stop {stop_seconds:.2f} + repair {repair_seconds:.2f}"
              f" + start {start_seconds:.2f})")
        print(f"ratio lost repair/heal: {dropped / max(undone, 1):.0f}x")
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
