"""What the daemon reads from the storages themselves (blocking, via ZEO).

The daemon trusts reports, but three situations need the truth from the
files (see ``storage.py`` for the stamps the ZODB integration writes):

* **bootstrap** and **re-check** (``LOST`` reports): commit a no-op on the
  storages (when it has finished everywhere, every older transaction has
  ended), then look for *split* multi-storage transactions among what was
  committed since the last published point: such a point must never be
  published (:func:`noop_and_check`);
* **in-doubt** transactions (their client vanished between BEGIN and
  COMMIT, or said it does not know): where is this coherency id recorded?
  (:func:`locate`).

These run in worker threads; nothing here touches the tracker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

from .stamps import Split, find_splits, stamp_of
from .tids import shift_tid, tid_at
from .zeo import ZeoSpec, commit_noop, scan_extensions

#: How far before the last published TID a scan starts (seconds of TID
#: time). The parts of one transaction get TIDs within moments of each other
#: on its storages; the margin makes sure a transaction just below one
#: storage's published point is seen on every storage.
SCAN_MARGIN = 30.0
#: With nothing published yet, how far back a scan looks (seconds).
SCAN_LOOKBACK = 3600.0
#: How long a ZEO connection may take.
CONNECT_TIMEOUT = 10.0


def scan_start(published: int | None, now: float | None = None) -> int:
    """Where a stamp scan of a storage starts (exclusive)."""
    if published is None:
        return tid_at((time.time() if now is None else now) - SCAN_LOOKBACK)
    return shift_tid(published, -SCAN_MARGIN)


@dataclass
class CheckResult:
    tids: dict[str, int]  # the no-op's TID on each storage
    splits: list[Split]
    scanned: int  # transactions read


def noop_and_check(
    specs: Mapping[str, ZeoSpec], since: Mapping[str, int], coherency_id: str
) -> CheckResult:
    """Commit a no-op on ``specs``, then find splits committed before it."""
    tids = commit_noop(specs, CONNECT_TIMEOUT, coherency_id=coherency_id)
    txns = {}
    scanned = 0
    for storage, spec in specs.items():
        records = scan_extensions(spec, since[storage], tids[storage], CONNECT_TIMEOUT, storage)
        scanned += len(records)
        txns[storage] = [(tid, stamp_of(ext)) for tid, ext in records]
    return CheckResult(tids, find_splits(txns, horizon=since), scanned)


def locate(specs: Mapping[str, ZeoSpec], since: Mapping[str, int], coherency_id: str) -> dict[str, int]:
    """Storage -> TID of the transaction stamped ``coherency_id``, where found."""
    found: dict[str, int] = {}
    for storage, spec in specs.items():
        for tid, ext in scan_extensions(spec, since[storage], None, CONNECT_TIMEOUT, storage):
            stamp = stamp_of(ext)
            if stamp is not None and stamp.id == coherency_id:
                found[storage] = tid
                break
    return found
