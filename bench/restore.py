#!/usr/bin/env python
"""Benchmark: tidstorage backup/restore against plain repozo, side by side.

Generates N FileStorages (default 3 x 400 MiB, the realistic record mix of
``bench/cut_point.py``), then appends to all of them 1,000 stamped
multi-storage transactions and publishes a TID log 200 transactions before
their end (so the restore really cuts).  Then, in one run, alternating the
contenders and keeping the best of ``--repeat`` rounds (warm page cache for
both):

Every timing includes an fsync of the files the command wrote (what it left
dirty in the page cache is charged to it); the page cache is warm for both.
The machine may be shared: each round runs the contenders back to back
(alternating the order) and the ratio is taken per round; the median of
the per-round ratios is the figure to quote.

* backup:  ``tidstorage backup --full`` (storages in parallel, one per core)
  vs ``repozo -B -F`` of each storage one after the other;
* restore: ``tidstorage restore --output-dir`` (repozo -R -w per storage,
  then find_cut, verify of the tails, truncation, verify again) vs plain
  ``repozo -R -o`` of each storage one after the other, from the same
  repositories; with ``--jobs 1`` (same serial work + cut) and with the
  default parallelism.

Example::

    .venv/bin/python bench/restore.py --size-mb 400
"""

from __future__ import annotations

import argparse
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
from ZODB.Connection import TransactionMetaData  # noqa: E402
from ZODB.FileStorage import FileStorage  # noqa: E402
from ZODB.utils import u64, z64  # noqa: E402

from tidstorage.formats import tidlog  # noqa: E402
from tidstorage.formats.repozo import repozo_argv  # noqa: E402
from tidstorage.core.stamps import stamp_value  # noqa: E402

MB = 1 << 20
TIDSTORAGE = [sys.executable, "-m", "tidstorage"]


def build(workdir: Path, ids, size_mb: float, tail: int, published_back: int):
    """Generate the storages, the stamped tail and the TID log; return config."""
    var = workdir / "var"
    var.mkdir(parents=True, exist_ok=True)
    for i, sid in enumerate(ids):
        path = var / f"{sid}.fs"
        if path.exists():
            print(f"reusing {path}")
            continue
        print(f"generating {path} ({size_mb:g} MiB) ...", flush=True)
        t0 = time.perf_counter()
        cut_point.generate(str(path), int(size_mb * MB), seed=i)
        print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    log = var / "tidstorage.tid"
    if not log.exists():
        fsmod = sys.modules["ZODB.FileStorage.FileStorage"]
        saved, fsmod.fsync = fsmod.fsync, None
        storages = {sid: FileStorage(str(var / f"{sid}.fs")) for sid in ids}
        published = {}
        try:
            for k in range(tail):
                ext = {"tidstorage": stamp_value(f"bench-{k}", ids)}
                for sid, fs in storages.items():
                    t = TransactionMetaData(b"", b"bench multi", ext)
                    fs.tpc_begin(t)
                    fs.store(fs.new_oid(), z64, b"x" * (200 + k % 700), "", t)
                    fs.tpc_vote(t)
                    tid = fs.tpc_finish(t)
                    if k == tail - published_back - 1:
                        published[sid] = u64(tid)
        finally:
            for fs in storages.values():
                fs.close()
            fsmod.fsync = saved
        log.write_bytes(tidlog.encode_record(time.time(), tidlog.KIND_FULL, published))
    config = workdir / "tidstorage.toml"
    lines = ["[server]", 'status_file = "var/tidstorage.tid"', ""]
    for sid in ids:
        lines += [f"[storages.{sid}]", f'data_fs = "var/{sid}.fs"',
                  f'backup_dir = "backups/{sid}"', ""]
    lines += ["[backup]", 'timestamp_file = "backups/timestamps.log"',
              'status_file_backup_dir = "backups/tidlog"', ""]
    config.write_text("\n".join(lines))
    return config


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def run(argv, outputs: Path, **kw):
    """Run, then fsync every file under ``outputs``: the time includes
    writing back what the command left dirty in the page cache (repozo -R
    does not fsync its output; the restore does).  Not os.sync(): that would
    also charge other processes' writes."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    fsync_tree(outputs)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"FAILED: {' '.join(map(str, argv))}\n{p.stdout.decode()}{p.stderr.decode()}")
    return dt, p


def sync():
    os.sync()


def _cpu():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def busy(seconds: float = 3.0) -> float:
    """Fraction of the machine's CPU time busy over ``seconds``."""
    b0, a0 = _cpu()
    time.sleep(seconds)
    b1, a1 = _cpu()
    return (b1 - b0) / max(a1 - a0, 1)


def wait_quiet(limit: float, threshold: float = 0.10) -> float:
    """Wait (at most ``limit`` s) until the machine is < ``threshold`` busy."""
    deadline = time.monotonic() + limit
    while True:
        b = busy()
        if b < threshold or time.monotonic() > deadline:
            return b
        print(f"  machine {b:.0%} busy, waiting ...", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=400, help="size of each storage")
    ap.add_argument("--storages", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="work directory (generated files are reused)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="first wait (at most SECONDS) until the machine is < 10%% busy "
                         "over 3 s (other processes disturb the timings)")
    args = ap.parse_args(argv)
    ids = [f"s{i}" for i in range(args.storages)]
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="bench_restore_"))
    try:
        config = build(workdir, ids, args.size_mb, tail=1000, published_back=200)
        if args.wait_quiet > 0:
            print(f"machine {wait_quiet(args.wait_quiet):.0%} busy before the start")
        load0 = os.getloadavg()[0]
        total = sum((workdir / "var" / f"{s}.fs").stat().st_size for s in ids)
        print(f"{len(ids)} storages, {total / MB:.0f} MiB in all; {os.cpu_count()} cores")
        repozo = repozo_argv()

        backup_ours, backup_seq = [], []
        for rnd in range(args.repeat):
            for contender in ("seq", "ours") if rnd % 2 == 0 else ("ours", "seq"):
                shutil.rmtree(workdir / "backups", ignore_errors=True)
                shutil.rmtree(workdir / "seqrepo", ignore_errors=True)
                sync()
                if contender == "ours":
                    dt, _ = run(TIDSTORAGE + ["backup", "-c", str(config), "--full"],
                                workdir / "backups")
                    backup_ours.append(dt)
                else:
                    dt = 0.0
                    for s in ids:
                        repo = workdir / "seqrepo" / s
                        repo.mkdir(parents=True)
                        d, _ = run(repozo + ["-B", "-F", "-r", str(repo), "-f",
                                             str(workdir / "var" / f"{s}.fs")], repo)
                        dt += d
                    backup_seq.append(dt)
        if not (workdir / "backups").exists():
            run(TIDSTORAGE + ["backup", "-c", str(config), "--full"], workdir / "backups")

        plain, ours_jobs1, ours_par = [], [], []
        out = workdir / "out"
        cut_bytes = 0
        for rnd in range(args.repeat):
            order = ["plain", "ours1", "ourspar"]
            order = order[rnd % 3:] + order[:rnd % 3]
            for contender in order:
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                sync()
                if contender == "plain":
                    dt = 0.0
                    for s in ids:
                        d, _ = run(repozo + ["-R", "-r", str(workdir / "backups" / s), "-o",
                                             str(out / f"{s}.fs")], out)
                        dt += d
                    plain.append(dt)
                else:
                    jobs = ["--jobs", "1"] if contender == "ours1" else []
                    dt, p = run(TIDSTORAGE + ["restore", "-c", str(config), "--output-dir",
                                              str(out)] + jobs, out)
                    (ours_jobs1 if contender == "ours1" else ours_par).append(dt)
                    text = p.stdout.decode()
                    assert "verify: coherent" in text, text
                    cut_bytes = sum((workdir / "var" / f"{s}.fs").stat().st_size
                                    - (out / f"{s}.fs").stat().st_size for s in ids)

        def fmt(xs):
            return f"best {min(xs):7.2f} s  median {statistics.median(xs):7.2f} s"

        def ratios(xs, ys):
            r = sorted(x / y for x, y in zip(xs, ys))
            return (f"median {statistics.median(r):.2f}x  (per round: "
                    + ", ".join(f"{x:.2f}" for x in r) + ")")

        print()
        print(f"backup of {len(ids)} storages ({total / MB:.0f} MiB, full), {args.repeat} rounds:")
        print(f"  sequential repozo -B -F     {fmt(backup_seq)}")
        print(f"  tidstorage backup --full    {fmt(backup_ours)}")
        print(f"  ours / sequential: {ratios(backup_ours, backup_seq)}")
        print(f"restore of the same set (the cut drops 200 transactions per storage, "
              f"{cut_bytes / 1024:.0f} KiB in all), {args.repeat} rounds:")
        print(f"  plain repozo -R, sequential {fmt(plain)}")
        print(f"  tidstorage restore --jobs 1 {fmt(ours_jobs1)}")
        print(f"  tidstorage restore          {fmt(ours_par)}")
        print(f"  ours --jobs 1 / plain: {ratios(ours_jobs1, plain)}")
        print(f"  ours parallel / plain: {ratios(ours_par, plain)}")
        print(f"load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
        return 0
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for d in ("backups", "seqrepo", "out"):
                shutil.rmtree(workdir / d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
