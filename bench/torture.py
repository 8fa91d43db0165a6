#!/usr/bin/env python
"""Torture: random crashes on a live cluster; every restore and repair must be coherent.

The long variant of ``tests/test_torture.py`` (the logic is
``tests/support/torture.py``): two real ``runzeo`` servers (three storages), the
real daemon, ``--writers`` writer processes committing over random subsets
of the storages with a cross-storage invariant, and during each round of
``--seconds`` seconds, at random moments (``--seed``): a writer killed
between its ``tpc_finish`` calls, the daemon killed (SIGKILL) and restarted,
a ZEO server restarted, a backup (``--events`` events per round, at least
one backup; round 0 has every kind). After each round: the latest backup set
is restored and the live files are repaired in place; both are verified
(stamps, invariant), then the next round continues on the repaired files
(``--fresh``: a new cluster every round).

Prints the counts and, last, one JSON line. Exit code 0 only if every result
was coherent and nothing else went wrong.

Example::

    .venv/bin/python bench/torture.py --rounds 10 --seconds 20 --writers 3 --seed 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.torture import run_torture  # noqa: E402  (test support, not the product)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="default 10")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="seconds the writers run per round (default 20)")
    ap.add_argument("--writers", type=int, default=3, help="regular writers (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="random seed of the schedule (default 1)")
    ap.add_argument("--events", type=int, default=6, help="events per round (default 6)")
    ap.add_argument("--grace", type=float, default=1.0,
                    help="the daemon's in_doubt_grace, seconds (default 1)")
    ap.add_argument("--pause", type=float, default=0.01,
                    help="writers' pause between commits, seconds (default 0.01)")
    ap.add_argument("--fresh", action="store_true",
                    help="a new cluster every round (default: continue on the repaired files)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="working directory (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the restored files of every round (and the temporary directory)")
    ap.add_argument("--quiet", action="store_true", help="no per-round lines")
    args = ap.parse_args(argv)

    directory = args.dir or Path(tempfile.mkdtemp(prefix="tidstorage-torture-"))
    echo = (lambda _text: None) if args.quiet else (lambda text: print(text, flush=True))
    try:
        report = run_torture(directory, rounds=args.rounds, seconds=args.seconds,
                             writers=args.writers, seed=args.seed, events=args.events,
                             grace=args.grace, pause=args.pause, fresh=args.fresh,
                             keep=args.keep, echo=echo)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print()
    print(report.table())
    for text in report.lowered_cuts:
        print(f"published point incoherent: {text}")
    for text in report.problems:
        print(f"problem: {text}")
    params = {k: v for k, v in vars(args).items() if k not in ("dir", "quiet")}
    print(json.dumps({"params": params, **report.as_dict()}))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
