"""A writer with a cross-storage invariant, for the demo, tests and benchmarks.

Every storage's root holds, for each writer ``w``, a mapping ``pairs-w``:
``root_a["pairs-w"][b]`` counts the transactions of writer ``w`` that wrote
to both ``a`` and ``b``. A transaction over storages ``S`` increments
``pairs-w[y]`` in every ``x`` of ``S`` for every other ``y`` of ``S``. So in
any coherent set of files, for every writer and every pair of storages::

    root_a["pairs-w"][b] == root_b["pairs-w"][a]

and a cut that splits a transaction breaks it. Writers own their keys, so
they never conflict with each other.

Run as ``python -m tidstorage.demo.workload --config FILE --writer N ...`` (see
``main``); ``--kill-after-first-finish K`` makes the process SIGKILL itself
between the ``tpc_finish`` calls of its K-th multi-storage transaction
(fault injection for the crash tests; it wraps the base storage of this
process only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from typing import Iterable, Mapping

import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError

from ..zodb.storage import TIDStorage


def open_databases(
    zeo: Mapping[str, tuple[tuple[str, int], str]],
    server: tuple[str, int],
    *,
    timeout: float = 1.0,
    wrap: bool = True,
    files: Mapping[str, str] | None = None,
) -> dict[str, ZODB.DB]:
    """One ZODB multi-database over ZEO storages (and local FileStorages),
    each wrapped for tidstorage.

    ``zeo``: storage id -> ((host, port), zeo storage name); ``files``:
    storage id -> ``Data.fs`` path, opened by this process.
    """
    from ZEO.ClientStorage import ClientStorage
    from ZODB.FileStorage import FileStorage

    bases = {name: ClientStorage(address, storage=zeo_storage, wait_timeout=30)
             for name, (address, zeo_storage) in zeo.items()}
    for name, path in (files or {}).items():
        bases[name] = FileStorage(str(path))
    databases: dict[str, ZODB.DB] = {}
    for name, base in sorted(bases.items()):
        storage = TIDStorage(base, name, server=server, timeout=timeout) if wrap else base
        for attempt in range(50):
            try:
                ZODB.DB(storage, databases=databases, database_name=name)
                break
            except ConflictError:  # another process created the root first
                databases.pop(name, None)
                time.sleep(0.05 * random.random())
    return databases


def prepare(databases: Mapping[str, ZODB.DB], writer: int) -> None:
    """Create this writer's counter mappings (one transaction per storage)."""
    key = f"pairs-{writer}"
    tm = transaction.TransactionManager()
    for name in sorted(databases):
        for attempt in range(20):
            conn = databases[name].open(tm)
            try:
                root = conn.root()
                if key not in root:
                    root[key] = PersistentMapping()
                    tm.commit()
                break
            except ConflictError:
                tm.abort()
                time.sleep(random.random() * 0.05)
            finally:
                conn.close()


def write_one(databases: Mapping[str, ZODB.DB], tm, writer: int, storages: Iterable[str]) -> None:
    """One transaction over ``storages`` keeping the invariant."""
    names = sorted(storages)
    key = f"pairs-{writer}"
    first = databases[names[0]].open(tm)
    try:
        for x in names:
            conn = first if x == names[0] else first.get_connection(x)
            pairs = conn.root()[key]
            for y in names:  # pairs[x] itself counts every transaction on x
                pairs[y] = pairs.get(y, 0) + 1
        tm.get().note(f"writer {writer}: {'+'.join(names)}")
        tm.commit()
    finally:
        first.close()


def check_invariant(roots: Mapping[str, Mapping]) -> list[str]:
    """Problems in a set of roots (storage id -> root mapping); [] if coherent."""
    problems = []
    keys = {k for root in roots.values() for k in root if str(k).startswith("pairs-")}
    for key in sorted(keys):
        for a in sorted(roots):
            for b in sorted(roots):
                if a >= b:
                    continue
                ab = roots[a].get(key, {}).get(b, 0)
                ba = roots[b].get(key, {}).get(a, 0)
                if ab != ba:
                    problems.append(f"{key}: {a}->{b} = {ab} but {b}->{a} = {ba}")
    return problems


def inject_kill_after_first_finish(databases: Mapping[str, ZODB.DB], nth: int) -> None:
    """SIGKILL this process between the tpc_finish calls of the nth
    multi-storage transaction (fault injection, test-only)."""
    state = {"multi": 0}
    for db in databases.values():
        storage = db.storage
        if not isinstance(storage, TIDStorage):
            continue
        base = storage.base
        real = base.tpc_finish

        def tpc_finish(txn, func=lambda tid: None, real=real):
            tid = real(txn, func)
            stamp = txn.extension.get("tidstorage")
            if stamp and stamp.get("id") != state.get("last"):
                state["last"] = stamp.get("id")
                state["multi"] += 1
                if state["multi"] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return tid

        base.tpc_finish = tpc_finish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zeo", default="{}", help='JSON {"id": ["host", port, "storage"], ...}')
    parser.add_argument("--files", default="{}", help='JSON {"id": "path/to/Data.fs", ...}')
    parser.add_argument("--server", required=True, help="daemon HOST:PORT")
    parser.add_argument("--writer", type=int, required=True)
    parser.add_argument("--transactions", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--kill-after-first-finish", type=int, default=None)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between transactions")
    parser.add_argument("--stop-file", default=None,
                        help="stop (cleanly) as soon as this file exists")
    args = parser.parse_args(argv)
    from ..core.addresses import parse_host_port

    spec = json.loads(args.zeo)
    zeo = {k: ((v[0], int(v[1])), str(v[2])) for k, v in spec.items()}
    databases = open_databases(zeo, parse_host_port(args.server, "daemon address"), timeout=args.timeout,
                               files=json.loads(args.files))
    rng = random.Random(args.seed if args.seed is not None else args.writer)
    names = sorted(databases)
    prepare(databases, args.writer)
    if args.kill_after_first_finish:
        inject_kill_after_first_finish(databases, args.kill_after_first_finish)
    tm = transaction.TransactionManager()
    done = conflicts = errors = 0
    deadline = time.monotonic() + args.seconds if args.seconds else None
    while ((deadline is None and done < args.transactions) or (
        deadline is not None and time.monotonic() < deadline
    )) and not (args.stop_file and os.path.exists(args.stop_file)):
        subset = rng.sample(names, rng.randint(1, len(names)))
        try:
            write_one(databases, tm, args.writer, subset)
            done += 1
        except ConflictError:
            tm.abort()
            conflicts += 1
        except Exception as exc:  # a ZEO restart: retry, count
            tm.abort()
            errors += 1
            print(f"writer {args.writer}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.1)
        if args.pause:
            time.sleep(args.pause)
    print(json.dumps({"writer": args.writer, "done": done, "conflicts": conflicts, "errors": errors}),
          flush=True)
    for db in databases.values():
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
