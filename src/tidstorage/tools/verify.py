"""Checking that a set of ``Data.fs`` files holds no split transaction.

Reads the coherency stamps (see :mod:`tidstorage.core.stamps`) from the *tails*
of the files, walking backward with :func:`tidstorage.formats.filestorage.iter_backward`,
so that the cost grows with the window read, not with the file size.

The window
----------

Each storage ``s`` is read from its end back to ``anchor(s) - window``
(TID time; ``window`` defaults to one hour, ``--window SECONDS``), where the
anchor is the last transaction kept by the cut being checked (the end of the
file when checking the files as they are).  Transactions older than every
window are assumed fine: a coherent point published by the daemon only
splits transactions that were in flight around it.

Two rules extend a window when needed, until nothing changes:

* a stamped transaction *dropped* from storage ``s`` (after its cut) that
  names storage ``a`` makes ``a`` be read back to that transaction's time
  minus ``window`` -- its record in ``a`` is near that time and must be
  found to tell whether ``a`` keeps it (a stale TID log: one storage cut
  long before the others);
* with ``compute``, lowering a storage's cut moves its anchor, hence its
  window, down.

A stamp absent from storage ``m``'s window is declared *missing* from ``m``
only if it is newer than ``m``'s horizon: the start of ``m``'s window plus
half the window (commits of one transaction on several storages get TIDs a
few seconds apart at most), or, if the window contains transactions a pack
marked ``p``, the oldest unpacked transaction after them (a pack removes
transactions whose records all became garbage: their absence proves
nothing).  Otherwise it is reported as unknown for ``m``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..core.stamps import (
    MAX_TID,
    STAMP_KEY,
    Split,
    Stamp,
    find_splits,
    healed_splits,
    largest_coherent_cut,
    stamp_of,
)
from ..core.tids import shift_tid, tid_at, tid_time
from ..formats import filestorage
from ..formats.filestorage import ScanError

__all__ = [
    "DEFAULT_WINDOW",
    "StorageWindow",
    "TailScan",
    "VerifyReport",
    "check",
    "describe_split",
    "format_tid",
    "shift_tid",
    "tid_at",
]

logger = logging.getLogger(__name__)

#: Default window, in seconds of TID time, read before each storage's anchor.
DEFAULT_WINDOW = 3600.0

_STAMP_KEY_BYTES = STAMP_KEY.encode("ascii")


def _stamp(h: filestorage.TxnHeader) -> Stamp | None:
    if _STAMP_KEY_BYTES not in h.extension:
        return None  # cheap test: most transactions carry no stamp
    try:
        return stamp_of(h.ext())
    except ScanError as exc:
        logger.debug("%s", exc)
        return None


class TailScan:
    """Reads one ``Data.fs`` backward, lazily, keeping ``(tid, stamp)``.

    :meth:`extend_to` reads further back on demand.  If the backward walk
    meets damage, the whole file is read forward instead (once), as
    :func:`filestorage.find_cut` does, and :attr:`warning` says so.
    """

    def __init__(self, storage_id: str, path) -> None:
        self.id = storage_id
        self.path = os.fspath(path)
        self.items: list[tuple[int, Stamp | None]] = []  # newest first
        self.exhausted = False
        self.warning: str | None = None
        #: TID of the oldest unpacked transaction newer than the newest one
        #: marked "p" by a pack (None: no packed transaction seen)
        self.packed: int | None = None
        self._it = filestorage.iter_backward(self.path)
        self._newer: int | None = None  # tid of the last item added

    @property
    def last_tid(self) -> int | None:
        return self.items[0][0] if self.items else None

    @property
    def floor(self) -> int:
        """Every transaction with a TID >= floor has been read."""
        if self.exhausted:
            return 0
        return self.items[-1][0] if self.items else MAX_TID + 1

    def __len__(self) -> int:
        return len(self.items)

    def _add(self, h: filestorage.TxnHeader) -> None:
        if not h.finished:
            return  # an unfinished trailing record: not a transaction
        if h.status == b"p" and self.packed is None:
            self.packed = self._newer if self._newer is not None else MAX_TID
        self.items.append((h.tid, _stamp(h)))
        self._newer = h.tid

    def extend_to(self, bound: int) -> None:
        """Read until every transaction with ``tid > bound`` has been read."""
        while not self.exhausted and self.floor > bound:
            try:
                h = next(self._it)
            except StopIteration:
                self.exhausted = True
                break
            except ScanError as exc:
                self._forward(exc)
                break
            self._add(h)

    def _forward(self, exc: ScanError) -> None:
        self.warning = (f"{self.path}: backward scan failed ({exc}); read the "
                        "whole file forward instead")
        logger.warning("%s", self.warning)
        self.items.clear()
        self.packed = None
        self._newer = None
        headers = [h for h in filestorage.iter_forward(self.path) if h.finished]
        for h in reversed(headers):
            self._add(h)
        self.exhausted = True

    def ascending(self) -> list[tuple[int, Stamp | None]]:
        return self.items[::-1]

    def count_after(self, tid: int) -> int:
        """Transactions read with a TID > ``tid``."""
        n = 0
        for t, _ in self.items:
            if t <= tid:
                break
            n += 1
        return n

    def kept_last(self, cut: int) -> int | None:
        """The newest TID read that is <= ``cut`` (None if not read)."""
        for t, _ in self.items:
            if t <= cut:
                return t
        return None


@dataclass
class StorageWindow:
    """What was read of one storage."""

    id: str
    path: str
    last_tid: int | None
    bound: int               #: every transaction with tid > bound was read
    transactions: int        #: transactions read
    stamped: int             #: of which stamped
    exhausted: bool          #: the whole file was read
    horizon: int | None      #: see the module docstring
    warning: str | None = None


@dataclass
class VerifyReport:
    """Result of :func:`check`."""

    #: split transactions under ``cut`` (or in the files as they are)
    splits: list[Split]
    #: the cut checked (None: the files as they are)
    cut: dict[str, int] | None
    #: with ``compute``: the largest coherent cut <= ``cut`` (or the ends)
    coherent: dict[str, int] | None
    windows: dict[str, StorageWindow]
    window: float
    scans: dict[str, TailScan] = field(repr=False, default_factory=dict)
    horizon: dict[str, int] = field(repr=False, default_factory=dict)
    #: splits an operator accepted as they are (never reported as splits)
    accepted: frozenset[str] = frozenset()
    #: splits the cut (or the files) keep healed: id -> {storage: heal TID}
    healed: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.splits

    def splits_at(self, cut: Mapping[str, int] | None) -> list[Split]:
        """The split transactions under another ``cut``, from what was read.

        Only meaningful for cuts whose windows were read (e.g. ``coherent``).
        """
        txns = {s: scan.ascending() for s, scan in self.scans.items()}
        return find_splits(txns, cut, horizon=self.horizon, accepted=self.accepted)

    def kept_last(self, storage: str, cut: int) -> int | None:
        return self.scans[storage].kept_last(cut)

    def dropped(self, storage: str, cut: int) -> int:
        """Transactions of ``storage`` after ``cut`` (within what was read)."""
        return self.scans[storage].count_after(cut)

    def lowered(self) -> dict[str, tuple[int, int]]:
        """Storages whose coherent cut keeps fewer transactions than ``cut``:
        storage -> (transactions kept under cut, transactions dropped more)."""
        out = {}
        if self.coherent is None:
            return out
        for s, scan in self.scans.items():
            start = MAX_TID if self.cut is None else self.cut.get(s, MAX_TID)
            extra = scan.count_after(self.coherent[s]) - scan.count_after(start)
            if extra > 0:
                out[s] = (start, extra)
        return out


def _horizon(scan: TailScan, bound: int, edge: float) -> int | None:
    h = None if scan.exhausted else shift_tid(bound, edge) if bound > 0 else 0
    if scan.packed is not None:
        h = scan.packed if h is None else max(h, scan.packed)
    return h


def check(paths: Mapping[str, os.PathLike | str], cut: Mapping[str, int] | None = None, *,
          window: float = DEFAULT_WINDOW, compute: bool = False,
          accepted: Iterable[str] = ()) -> VerifyReport:
    """Look for split transactions in the tails of ``paths`` (storage id ->
    ``Data.fs``), under ``cut`` (storage id -> TID; None: the files as they
    are).  With ``compute``, also the largest coherent cut ``<= cut``.
    A split healed under the cut (``tidstorage heal``) is not a split (see
    ``report.healed``); ``accepted`` splits (``heal --accept``, from the TID
    log) are ignored (see ``report.accepted``).

    Raises :class:`filestorage.ScanError` for a file that cannot be read as a
    FileStorage (damage before its tail), ``OSError`` for a missing file.
    """
    if window <= 0:
        raise ValueError(f"window must be positive, not {window}")
    accepted = frozenset(accepted)
    edge = window / 2
    scans = {s: TailScan(s, p) for s, p in paths.items()}
    start = {s: (MAX_TID if cut is None else cut.get(s, MAX_TID)) for s in scans}
    for scan in scans.values():
        scan.extend_to(MAX_TID)  # the last transaction: the anchor
    need: dict[str, int] = {}
    for s, scan in scans.items():
        last = scan.last_tid
        anchor = None if last is None else min(last, start[s])
        need[s] = 0 if anchor is None else shift_tid(anchor, -window)

    while True:
        for s, scan in scans.items():
            scan.extend_to(need[s])
        txns = {s: scan.ascending() for s, scan in scans.items()}
        horizon = {s: h for s, scan in scans.items()
                   if (h := _horizon(scan, need[s], edge)) is not None}
        current = (largest_coherent_cut(txns, start, horizon=horizon, accepted=accepted)
                   if compute else start)
        changed = False

        def want(storage: str, bound: int) -> None:
            nonlocal changed
            if bound < need[storage] and not scans[storage].exhausted:
                need[storage] = bound
                changed = True

        for s, scan in scans.items():
            c = current[s]
            if compute and c < start[s]:
                kept = scan.kept_last(c)
                want(s, shift_tid(kept if kept is not None else c, -window))
            for tid, stamp in scan.items:
                if tid <= c:
                    break
                if stamp is None:
                    continue
                for a in stamp.storages:
                    if a in scans and a != s:
                        want(a, shift_tid(tid, -window))
        if not changed:
            break

    splits = find_splits(txns, None if cut is None else start, horizon=horizon,
                         accepted=accepted)
    healed = healed_splits(txns, None if cut is None else start)
    windows = {
        s: StorageWindow(
            id=s, path=scan.path, last_tid=scan.last_tid, bound=need[s],
            transactions=len(scan), stamped=sum(1 for _, st in scan.items if st),
            exhausted=scan.exhausted, horizon=horizon.get(s), warning=scan.warning)
        for s, scan in scans.items()
    }
    return VerifyReport(
        splits=splits,
        cut=None if cut is None else dict(start),
        coherent=dict(current) if compute else None,
        windows=windows, window=window, scans=scans, horizon=horizon,
        accepted=accepted, healed=healed)


def describe_split(split: Split) -> str:
    """One line describing a split transaction."""
    present = ", ".join(f"{s} (tid {t:#018x}, {tid_time(t)} UTC)"
                        for s, t in sorted(split.present.items()))
    text = (f"transaction {split.id!r} on {', '.join(split.storages)}: "
            f"kept in {present}; missing in {', '.join(split.missing)}")
    if split.unknown:
        text += f"; unknown in {', '.join(split.unknown)}"
    return text


def format_tid(tid: int | None) -> str:
    if tid is None:
        return "none"
    if tid >= MAX_TID:
        return "end"
    if tid < 0:
        return "nothing"
    return f"{tid:#018x} ({tid_time(tid)} UTC)"

