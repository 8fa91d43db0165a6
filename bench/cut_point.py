#!/usr/bin/env python
"""Benchmark: find the restore cut point of a big Data.fs.

Generates a multi-GB FileStorage with the real ``ZODB.FileStorage`` (storage
API: tpc_begin/store/tpc_vote/tpc_finish; every record is a valid
PersistentMapping pickle), then times, side by side, finding the cut 1,000
transactions before the end:

* ours:   ``tidstorage.formats.filestorage.find_cut(path, tid)`` (backward walk);
* legacy: ``FileStorage(path, read_only=True, stop=tid + 1).getSize()`` with
  no ``Data.fs.index`` (``stop`` is exclusive, hence ``tid + 1``);

checks they agree, and shows that with a ``Data.fs.index`` present the legacy
approach returns the full file size (it ignores ``stop``).

The legacy cost grows with the number of *records* in the file (read_index
reads every data record header), ours with the transactions after the cut.
So the generated file mimics a real application database: mostly small
records (hundreds of bytes to a few KB) with a few big ones, and transactions
of one to a couple hundred records.

Example::

    .venv/bin/python bench/cut_point.py --size-gb 1
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

from persistent.mapping import PersistentMapping
from ZODB._compat import dumps
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from tidstorage.formats import filestorage
GB = 1 << 30
MB = 1 << 20


def record_size(rnd):
    """Object pickle sizes: mostly small objects and BTree buckets, some
    bigger documents, a few files/images (mean about 2.5 KB)."""
    r = rnd.random()
    if r < 0.82:
        return rnd.randint(60, 1_500)
    if r < 0.99:
        return rnd.randint(1_500, 8_000)
    return rnd.randint(20_000, 200_000)


def records_in_txn(rnd):
    r = rnd.random()
    if r < 0.85:
        return rnd.randint(1, 12)
    return rnd.randint(20, 200)


def generate(path, size_bytes, seed=42):
    """Write a FileStorage of about ``size_bytes``; return its tids."""
    fsmod = sys.modules["ZODB.FileStorage.FileStorage"]
    saved_fsync, fsmod.fsync = fsmod.fsync, None   # no fsync per commit
    rnd = random.Random(seed)
    pool = rnd.randbytes(8 * MB)
    class_pickle = dumps(PersistentMapping, 3)
    serials = []        # (oid, serial) of objects written so far
    tids = []
    nrecords = 0
    t0 = time.perf_counter()
    fs = FileStorage(path, create=True)
    try:
        n = 0
        while fs.getSize() < size_bytes:
            n += 1
            t = TransactionMetaData(
                b"/acl_users bench%d" % (n % 17),
                b"/app/page_%d/edit" % n,
                {"request": "/app/page_%d" % n, "n": n} if n % 3 else {})
            fs.tpc_begin(t)
            written = []
            touched = set()
            for _ in range(records_in_txn(rnd)):
                if serials and rnd.random() < 0.5:
                    i = rnd.randrange(len(serials))
                    if i in touched:
                        continue
                    touched.add(i)
                    oid, serial = serials[i]
                else:
                    i, oid, serial = None, fs.new_oid(), z64
                size = record_size(rnd)
                start = rnd.randrange(len(pool) - size)
                state = dumps({"data": {"payload": pool[start:start + size]}},
                              3)
                fs.store(oid, serial, class_pickle + state, "", t)
                written.append((i, oid))
                nrecords += 1
            fs.tpc_vote(t)
            tid = fs.tpc_finish(t)
            tids.append(u64(tid))
            for i, oid in written:
                if i is None:
                    serials.append((oid, tid))
                else:
                    serials[i] = (oid, tid)
            if n % 2000 == 0:
                print(f"  ... {fs.getSize() / MB:8.0f} MiB, {n} transactions",
                      file=sys.stderr)
    finally:
        fs.close()
        fsmod.fsync = saved_fsync
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return tids, time.perf_counter() - t0, nrecords


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def legacy_cut(path, tid):
    fs = FileStorage(path, read_only=True, stop=p64(tid + 1))
    try:
        return fs.getSize()
    finally:
        fs.close()


def timed(func, repeat, cold_path=None):
    times, result = [], None
    for _ in range(repeat):
        if cold_path:
            drop_cache(cold_path)
        t0 = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - t0)
    return result, times


def fmt(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds:8.2f} s "


def count_reads(func):
    counts = [0, 0]
    real = filestorage._pread

    def counting(fd, n, pos):
        data = real(fd, n, pos)
        counts[0] += 1
        counts[1] += len(data)
        return data

    filestorage._pread = counting
    try:
        func()
    finally:
        filestorage._pread = real
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0,
                    help="size of the generated Data.fs (default 2)")
    ap.add_argument("--dir", help="where to write Data.fs (default: a "
                    "temporary directory); an existing Data.fs there of "
                    "about the right size is reused")
    ap.add_argument("--keep", action="store_true",
                    help="keep the generated files")
    ap.add_argument("--from-end", type=int, default=1000,
                    help="transactions after the cut (default 1000)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="legacy runs (best is reported; ours runs 30x as "
                    "many)")
    ap.add_argument("--cold", action="store_true",
                    help="also time with Data.fs evicted from the page cache "
                    "(posix_fadvise DONTNEED) before each run")
    args = ap.parse_args(argv)

    workdir = args.dir or tempfile.mkdtemp(prefix="cut_point_")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "Data.fs")
    index = path + ".index"
    size_bytes = int(args.size_gb * GB)
    try:
        if (os.path.exists(path) and abs(os.path.getsize(path) - size_bytes)
                < 0.05 * size_bytes):
            print(f"reusing {path}")
            tids = [h.tid for h in filestorage.tail_transactions(
                path, limit=args.from_end + 1)]
            nrecords = None
        else:
            print(f"generating {args.size_gb:g} GiB FileStorage in {path} ...")
            for suffix in ("", ".index", ".lock", ".tmp"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
            tids, gen_time, nrecords = generate(path, size_bytes)
            print(f"generated in {gen_time:.1f} s")
        size = os.path.getsize(path)
        if len(tids) <= args.from_end:
            sys.exit(f"only {len(tids)} transactions: file too small")
        cut_tid = tids[-args.from_end - 1]
        print(f"Data.fs: {size / MB:.0f} MiB"
              + (f", {len(tids)} transactions, {nrecords} data records"
                 if nrecords else "")
              + f"; cut at tid {cut_tid:#018x}, {args.from_end} transactions"
                " before the end")

        saved_index = index + ".bench-saved"
        if os.path.exists(index):
            os.replace(index, saved_index)

        ours_repeat = max(30, args.repeat * 30)
        cut, ours_t = timed(lambda: filestorage.find_cut(path, cut_tid),
                            ours_repeat)
        reads, nbytes = count_reads(lambda: filestorage.find_cut(path, cut_tid))
        legacy, legacy_t = timed(lambda: legacy_cut(path, cut_tid),
                                 args.repeat)
        assert not os.path.exists(index), "read-only FileStorage wrote index"

        ours_best, legacy_best = min(ours_t), min(legacy_t)
        print()
        print("warm page cache, no Data.fs.index:")
        print(f"  ours   find_cut               best {fmt(ours_best)}"
              f"  median {fmt(statistics.median(ours_t))}  "
              f"({reads} reads, {nbytes / 1024:.0f} KiB read)")
        print(f"  legacy FileStorage(stop=)     best {fmt(legacy_best)}"
              f"  median {fmt(statistics.median(legacy_t))}")
        print(f"  speedup (best/best): {legacy_best / ours_best:,.0f}x"
              f"   (median/median: "
              f"{statistics.median(legacy_t) / statistics.median(ours_t):,.0f}"
              "x)")
        same = cut.offset == legacy
        print(f"  offsets: ours {cut.offset}, legacy {legacy} -> "
              f"{'SAME' if same else 'DIFFERENT'}; dropped {cut.dropped}, "
              f"method {cut.method}")
        ok = same and cut.dropped == args.from_end

        if args.cold:
            _, ours_c = timed(lambda: filestorage.find_cut(path, cut_tid),
                              args.repeat, cold_path=path)
            _, legacy_c = timed(lambda: legacy_cut(path, cut_tid),
                                args.repeat, cold_path=path)
            print("cold page cache (fadvise DONTNEED before each run):")
            print(f"  ours {fmt(min(ours_c))}   legacy {fmt(min(legacy_c))}"
                  f"   speedup {min(legacy_c) / min(ours_c):,.0f}x")

        # With an index, the legacy approach ignores stop=.
        if os.path.exists(saved_index):
            os.replace(saved_index, index)
        else:
            print("writing Data.fs.index (opening the storage for writing)")
            FileStorage(path).close()
        with_index, _ = timed(lambda: legacy_cut(path, cut_tid), 1)
        cut2 = filestorage.find_cut(path, cut_tid)
        print("with Data.fs.index present:")
        verdict = ("WRONG (ignores stop)" if with_index != cut.offset
                   else "ok")
        print(f"  legacy returns {with_index} (file size {size}) -> {verdict}")
        print(f"  ours   returns {cut2.offset} -> "
              f"{'ok' if cut2.offset == cut.offset else 'WRONG'}")
        ok = ok and cut2.offset == cut.offset
        if not ok:
            print("MISMATCH", file=sys.stderr)
            return 1
        return 0
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for suffix in ("", ".index", ".index.bench-saved", ".lock",
                           ".tmp"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)


if __name__ == "__main__":
    sys.exit(main())
