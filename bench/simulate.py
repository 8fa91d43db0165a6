"""Run the whole-protocol simulation (``tests/simulation.py``) on many seeds.

    python bench/simulate.py --seeds 20000 [--start 0] [--jobs 2]
    python bench/simulate.py --seed 1234 --trace        # replay one seed

Prints how many seeds held, the faults injected and what the daemon did
(publications, verdicts, splits), and, for a failing seed, its problem and
the command that replays it.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import simulation as sim  # noqa: E402

CHUNK = 100


def _chunk(bounds: tuple[int, int]):
    logging.disable(logging.CRITICAL)
    stats: collections.Counter = collections.Counter()
    bad = []
    for seed in range(*bounds):
        result = sim.run(seed)
        stats.update(result.stats)
        if not result.ok:
            bad.append((seed, result.problem))
    return stats, bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, help="replay this seed")
    parser.add_argument("--trace", action="store_true", help="print the event trace")
    args = parser.parse_args(argv)
    if args.seed is not None:
        if args.trace:
            logging.basicConfig(level=logging.INFO, format="    log %(message)s")
        else:
            logging.disable(logging.CRITICAL)
        result = sim.run(args.seed, trace=args.trace)
        print(result.params)
        for line in result.trace:
            print(line)
        print("OK" if result.ok else f"VIOLATION: {result.problem}")
        print({k: v for k, v in sorted(result.stats.items())})
        return 0 if result.ok else 1
    started = time.perf_counter()
    bounds = [(s, min(s + CHUNK, args.start + args.seeds))
              for s in range(args.start, args.start + args.seeds, CHUNK)]
    total: collections.Counter = collections.Counter()
    bad: list = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for stats, failures in pool.map(_chunk, bounds):
            total.update(stats)
            bad.extend(failures)
    elapsed = time.perf_counter() - started
    print(f"{args.seeds - len(bad)} of {args.seeds} seeds held"
          f" ({args.start}..{args.start + args.seeds - 1}), {elapsed:.0f} s,"
          f" {args.seeds / elapsed:.0f} seeds/s with {args.jobs} jobs")
    for key in sorted(total):
        print(f"  {key:24} {total[key]:>12}  ({total[key] / args.seeds:.1f} per seed)")
    for seed, problem in bad[:20]:
        print(f"seed {seed}: {problem}\n  replay: python bench/simulate.py --seed {seed} --trace")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
