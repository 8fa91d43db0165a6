#!/usr/bin/env python
"""Benchmark: point-in-time restore (``restore --at``) against a restore of
the latest backup.

Generates N FileStorages (default 3 x 100 MiB, the record mix of
``bench/cut_point.py``), then ``--backups`` rounds of: ``--commits``
stamped multi-storage transactions, each followed by a TID log record (a
long history of points), then ``tidstorage backup`` (the first full, the
others incremental).  Then, each round running the contenders back to back
(order rotating), each timing including an fsync of what it wrote:

* ``restore --output-dir`` (the latest backup, cut at its TID log copy);
* ``restore --at latest`` (the same files and cut, plus the inventory:
  every TID log copy read, every chain's end found);
* ``restore --at TIME`` with TIME in the middle of the history (a point
  of the middle backup: a shorter chain, a cut that drops more);
* ``restore --list-points`` (the inventory alone).

The ratios are per round; the median is the figure to quote.

Example::

    .venv/bin/python bench/pitr.py --size-mb 100 --backups 6 --commits 500
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cut_point  # noqa: E402  (the record-mix generator)
import restore as bench_restore  # noqa: E402  (run, fsync, wait_quiet)
from ZODB.Connection import TransactionMetaData  # noqa: E402
from ZODB.FileStorage import FileStorage  # noqa: E402
from ZODB.utils import u64, z64  # noqa: E402

from tidstorage.core.stamps import stamp_value  # noqa: E402
from tidstorage.core.tids import tid_seconds  # noqa: E402
from tidstorage.formats import tidlog  # noqa: E402

MB = 1 << 20
TIDSTORAGE = [sys.executable, "-m", "tidstorage"]


def build(workdir: Path, ids, size_mb: float, backups: int, commits: int):
    """Storages, a history of points and backups; returns (config, middle time)."""
    var = workdir / "var"
    var.mkdir(parents=True, exist_ok=True)
    for i, sid in enumerate(ids):
        path = var / f"{sid}.fs"
        print(f"generating {path} ({size_mb:g} MiB) ...", flush=True)
        cut_point.generate(str(path), int(size_mb * MB), seed=i)
    config = workdir / "tidstorage.toml"
    lines = ["[server]", 'status_file = "var/tidstorage.tid"', "port = 1", ""]
    for sid in ids:
        lines += [f"[storages.{sid}]", f'data_fs = "var/{sid}.fs"',
                  f'backup_dir = "backups/{sid}"', ""]
    lines += ["[backup]", 'timestamp_file = "backups/timestamps.log"',
              'status_file_backup_dir = "backups/tidlog"', ""]
    config.write_text("\n".join(lines))
    log = var / "tidstorage.tid"
    fsmod = sys.modules["ZODB.FileStorage.FileStorage"]
    saved, fsmod.fsync = fsmod.fsync, None
    times = []
    t_last = time.time()
    try:
        for b in range(backups):
            storages = {sid: FileStorage(str(var / f"{sid}.fs")) for sid in ids}
            try:
                for k in range(commits):
                    ext = {"tidstorage": stamp_value(f"bench-{b}-{k}", ids)}
                    tids = {}
                    for sid, fs in storages.items():
                        t = TransactionMetaData(b"", b"bench multi", ext)
                        fs.tpc_begin(t)
                        fs.store(fs.new_oid(), z64, b"x" * (200 + k % 700), "", t)
                        fs.tpc_vote(t)
                        tids[sid] = u64(fs.tpc_finish(t))
                    t_last = max(time.time(), t_last + 1e-6)
                    with open(log, "ab") as f:
                        f.write(tidlog.encode_record(t_last, tidlog.KIND_FULL, tids))
                    times.append(max(tid_seconds(t) for t in tids.values()))
            finally:
                for fs in storages.values():
                    fs.close()
            p = subprocess.run(TIDSTORAGE + ["backup", "-c", str(config)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"backup failed: {p.stdout}{p.stderr}")
            print(f"backup {b + 1}/{backups}: {p.stdout.strip().splitlines()[-1]}", flush=True)
    finally:
        fsmod.fsync = saved
    middle = times[len(times) // 2] + 1e-6
    return config, middle


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=100, help="size of each storage")
    ap.add_argument("--storages", type=int, default=3)
    ap.add_argument("--backups", type=int, default=6)
    ap.add_argument("--commits", type=int, default=500,
                    help="multi-storage commits (and TID log records) per backup")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="work directory (kept)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS")
    args = ap.parse_args(argv)
    ids = [f"s{i}" for i in range(args.storages)]
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="bench_pitr_"))
    try:
        config, middle = build(workdir, ids, args.size_mb, args.backups, args.commits)
        at = datetime.datetime.fromtimestamp(middle, datetime.timezone.utc).isoformat()
        if args.wait_quiet > 0:
            print(f"machine {bench_restore.wait_quiet(args.wait_quiet):.0%} busy at the start")
        load0 = os.getloadavg()[0]
        total = sum((workdir / "var" / f"{s}.fs").stat().st_size for s in ids)
        listing = json.loads(subprocess.run(
            TIDSTORAGE + ["restore", "-c", str(config), "--list-points", "--json"],
            capture_output=True, text=True, check=True).stdout)
        print(f"{len(ids)} storages, {total / MB:.0f} MiB in all; {len(listing['backups'])} "
              f"backups; {len(listing['points'])} points; --at {at}")
        out = workdir / "out"
        times: dict[str, list[float]] = {"latest": [], "at-latest": [], "at-middle": [],
                                         "list": []}
        argvs = {
            "latest": ["restore", "-c", str(config), "--output-dir", str(out)],
            "at-latest": ["restore", "-c", str(config), "--at", "latest", "--output-dir",
                          str(out)],
            "at-middle": ["restore", "-c", str(config), "--at", at, "--output-dir", str(out)],
            "list": ["restore", "-c", str(config), "--list-points"],
        }
        sizes = {}
        for rnd in range(args.repeat):
            order = list(argvs)
            order = order[rnd % len(order):] + order[:rnd % len(order)]
            for name in order:
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                bench_restore.sync()
                dt, p = bench_restore.run(TIDSTORAGE + argvs[name], out)
                text = p.stdout.decode()
                if name != "list":
                    assert "verify: coherent" in text, text
                    sizes[name] = sum((out / f"{s}.fs").stat().st_size for s in ids)
                times[name].append(dt)

        def fmt(xs):
            return f"best {min(xs):6.2f} s  median {statistics.median(xs):6.2f} s"

        def ratio(xs, ys):
            r = sorted(x / y for x, y in zip(xs, ys, strict=True))
            return f"median {statistics.median(r):.2f}x ({r[0]:.2f} - {r[-1]:.2f})"

        print()
        for name, xs in times.items():
            extra = f"  restored {sizes[name] / MB:.1f} MiB" if name in sizes else ""
            print(f"  {name:10s} {fmt(xs)}{extra}")
        print(f"  at-latest / latest: {ratio(times['at-latest'], times['latest'])}")
        print(f"  at-middle / latest: {ratio(times['at-middle'], times['latest'])}")
        print(f"  list / latest:      {ratio(times['list'], times['latest'])}")
        print(f"load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
        return 0
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
