#!/usr/bin/env python
"""Benchmark: warm standby sync and promote (issue 13), one run.

For each file size (default 256 MiB and 1024 MiB per storage), three
FileStorages of that size are built fast (big stamped multi-storage
transactions, 8 MiB each, appended through the storage API), the TID log is
published and a full backup made (``run_backup``, real repozo).  Then:

* ``standby sync`` of the new standby (a full recovery: the baseline);
* one "day": ``--day-mb`` (default 10.24 MiB, 1 % of 1 GiB) of stamped
  multi-storage transactions appended to every storage, the point
  published two transactions before the end, an incremental backup; then
  timed, back to back: ``standby sync`` (the one increment per storage)
  and plain ``repozo -R`` of the three storages one after the other (the
  full recovery a standby saves; its output fsync'ed, as sync fsyncs);
* five more days, backed up one by one, then one ``standby sync`` (five
  increments per storage);
* ``standby promote --output-dir`` (a copy of every kept prefix: costs the
  copy), then ``standby promote`` in place (find the cut backward, read the
  stamps in the tails, truncate, verify again, write the new TID log).

Every timing is of the command's in-process function (``run_sync``,
``run_promote``) or of the repozo subprocesses, warm page cache for all.
The sync time must grow with the increments, not the files; promote in
place must not grow with the file size.

Example::

    .venv/bin/python bench/standby.py --sizes-mb 256,1024
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.utils import u64, z64

from tidstorage.config import load_config
from tidstorage.core.stamps import stamp_value
from tidstorage.formats import tidlog
from tidstorage.formats.repozo import repozo_argv
from tidstorage.tools.backup import run_backup
from tidstorage.tools.standby import run_promote, run_sync

MB = 1 << 20
IDS = ("s0", "s1", "s2")


class Set:
    """Three FileStorages, a config and a TID log under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.var = root / "var"
        self.var.mkdir(parents=True)
        self.log = self.var / "tidstorage.tid"
        lines = ["[server]", 'status_file = "var/tidstorage.tid"', ""]
        for sid in IDS:
            lines += [f"[storages.{sid}]", f'data_fs = "var/{sid}.fs"',
                      f'backup_dir = "backups/{sid}"', ""]
        lines += ["[backup]", 'timestamp_file = "backups/timestamps.log"',
                  'status_file_backup_dir = "backups/tidlog"', "keep_full_backups = 9", ""]
        self.config_path = root / "tidstorage.toml"
        self.config_path.write_text("\n".join(lines))
        self.rnd = random.Random(1)
        self.pool = self.rnd.randbytes(16 * MB)
        self.n = 0

    def append(self, total: int, txn_size: int, record: int, publish_back: int = 0) -> None:
        """About ``total`` bytes per storage in stamped multi-storage
        transactions of ``txn_size``; publish the point ``publish_back``
        transactions before the end."""
        fsmod = sys.modules["ZODB.FileStorage.FileStorage"]
        saved, fsmod.fsync = fsmod.fsync, None
        storages = {s: FileStorage(str(self.var / f"{s}.fs")) for s in IDS}
        try:
            count = max(1, total // txn_size)
            publish_back = min(publish_back, count - 1)
            published = {}
            for k in range(count):
                self.n += 1
                ext = {"tidstorage": stamp_value(f"bench-{self.n}", IDS)}
                for sid, fs in storages.items():
                    t = TransactionMetaData(b"", b"bench", ext)
                    fs.tpc_begin(t)
                    for _ in range(max(1, txn_size // record)):
                        start = self.rnd.randrange(len(self.pool) - record)
                        fs.store(fs.new_oid(), z64, self.pool[start:start + record], "", t)
                    fs.tpc_vote(t)
                    tid = fs.tpc_finish(t)
                    if k == count - 1 - publish_back:
                        published[sid] = u64(tid)
            with open(self.log, "ab") as f:
                f.write(tidlog.encode_record(time.time(), tidlog.KIND_FULL, published))
        finally:
            for fs in storages.values():
                fs.close()
            fsmod.fsync = saved

    def backup(self) -> None:
        r = run_backup(load_config(self.config_path), ask_daemon=False)
        if not r.ok:
            sys.exit(f"backup failed: {r.storages}")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repozo_recover_all(s: Set, out: Path) -> float:
    """``repozo -R`` of every storage, one after the other, outputs fsync'ed."""
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for sid in IDS:
        target = out / f"{sid}.fs"
        subprocess.run(repozo_argv() + ["-R", "-r", str(s.root / "backups" / sid),
                                        "-o", str(target)], check=True, capture_output=True)
        fsync_path(target)
    dt = time.perf_counter() - t0
    shutil.rmtree(out)
    return dt


def timed(func, *args, **kw):
    t0 = time.perf_counter()
    result = func(*args, **kw)
    return time.perf_counter() - t0, result


def one_size(workdir: Path, size_mb: int, day_mb: float) -> dict:
    root = workdir / f"set{size_mb}"
    s = Set(root)
    t0 = time.perf_counter()
    print(f"== {size_mb} MiB per storage: building ...", flush=True)
    s.append(size_mb * MB, 8 * MB, 1 * MB)
    s.backup()
    print(f"  built and backed up in {time.perf_counter() - t0:.1f} s", flush=True)
    config = load_config(s.config_path)
    standby = root / "standby"
    out = {"size_mb": size_mb}
    out["initial_sync"], _ = timed(run_sync, config, standby)
    # one day
    s.append(int(day_mb * MB), 1 * MB, 64 << 10, publish_back=2)
    s.backup()
    out["day_bytes"] = sum((root / "var" / f"{sid}.fs").stat().st_size for sid in IDS)
    out["sync1"], r = timed(run_sync, config, standby)
    out["sync1_bytes"] = sum(x.bytes for x in r.storages.values())
    assert all(x.mode == "incremental" and len(x.applied) == 1 for x in r.storages.values())
    out["repozo_R"] = repozo_recover_all(s, root / "ref")
    # five days
    for _ in range(5):
        s.append(int(day_mb * MB), 1 * MB, 64 << 10, publish_back=2)
        s.backup()
    out["sync5"], r = timed(run_sync, config, standby)
    out["sync5_bytes"] = sum(x.bytes for x in r.storages.values())
    assert all(len(x.applied) == 5 for x in r.storages.values())
    out["total_bytes"] = sum((standby / f"{sid}.fs").stat().st_size for sid in IDS)
    out["promote_copy"], _ = timed(run_promote, config, standby, output_dir=root / "copy")
    shutil.rmtree(root / "copy")
    out["promote_in_place"], r = timed(run_promote, config, standby)
    out["dropped"] = sum(c["size"] - c["offset"] for c in r.cuts.values())
    shutil.rmtree(root)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", default="256,1024", help="file sizes per storage (MiB)")
    ap.add_argument("--day-mb", type=float, default=10.24,
                    help="bytes appended per storage per day (default 1 %% of 1 GiB)")
    ap.add_argument("--dir", help="work directory (default: a temporary one, deleted)")
    args = ap.parse_args(argv)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="bench_standby_"))
    results = []
    try:
        for size in (int(x) for x in args.sizes_mb.split(",")):
            results.append(one_size(workdir, size, args.day_mb))
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores")
    print("| per storage | set | initial sync (full) | sync, 1 day | repozo -R x3 | ratio |"
          " sync, 5 days | promote copy | promote in place |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for o in results:
        print(f"| {o['size_mb']} MiB | {o['total_bytes'] / MB:.0f} MiB "
              f"| {o['initial_sync']:.2f} s "
              f"| {o['sync1']:.3f} s ({o['sync1_bytes'] / MB:.1f} MiB) "
              f"| {o['repozo_R']:.2f} s | {o['sync1'] / o['repozo_R']:.3f}x "
              f"| {o['sync5']:.3f} s ({o['sync5_bytes'] / MB:.1f} MiB) "
              f"| {o['promote_copy']:.2f} s | {o['promote_in_place']:.3f} s "
              f"({o['dropped'] / MB:.1f} MiB cut) |")


if __name__ == "__main__":
    main()
