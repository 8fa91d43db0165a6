"""The crash torture test, short: real ZEO servers, a real daemon, writers,
and at random moments (seeded; round 0 has every kind once): a writer killed
between its tpc_finish calls, the daemon killed and restarted, a ZEO server
restarted, a backup. After each round the latest backup set is restored and
the live files are repaired in place; both must be coherent (stamps) and keep
the writers' invariant, and the next round continues on the repaired files.
The long variant is ``bench/torture.py``; the logic is ``tests/support/torture.py``."""

from __future__ import annotations

import json
import warnings

from support.torture import run_torture

#: Whether a published point that splits a transaction (the restore/repair
#: had to lower a cut below the TID log's point; the result is still
#: coherent) fails the test. It once did (a LOST re-check's no-op excluded
#: by a busy group capped its storages at ``tid - 1``; now such *barrier*
#: commits cap at the published TID, see ``tracker.py``).
STRICT_PUBLISHED_POINT = True


def test_torture_rounds_stay_coherent(tmp_path):
    report = run_torture(tmp_path / "torture", rounds=3, seconds=8, writers=3, seed=20261126,
                         events=4, grace=1.0)
    print(report.table())
    print(json.dumps(report.as_dict()))
    assert report.incoherent == 0, report.problems
    assert report.problems == []
    assert report.rounds == 3
    assert report.restores == 3 and report.repairs == 3
    # every kind of event happened at least once
    assert report.writer_kills >= 1
    assert report.daemon_kills >= 1
    assert report.zeo_restarts >= 1
    assert report.backups >= 3
    # each killed writer left a split in the live files: healed online, or
    # still there at the round's end, reported by the daemon
    assert report.splits_found + report.heals >= report.writer_kills
    assert report.splits_unseen == 0
    # splits are healed online (issue 12), or undone by repair --heal
    assert report.heals >= 1, report.problems
    assert report.transactions > 0
    assert len(report.dropped_repair) == 3 and len(report.dropped_restore) == 3
    if report.lowered:
        if STRICT_PUBLISHED_POINT:
            raise AssertionError(report.lowered_cuts)
        warnings.warn(f"published point incoherent (cut lowered): {report.lowered_cuts}")
