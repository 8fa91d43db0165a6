"""The publication gate: no published point splits a stamped transaction.

Theory of operation
===================

The tracker (``tracker.py``) publishes from what clients *report*. Reports
can be lost: a client that cannot reach the daemon commits anyway (commits
never wait for the daemon for long), a daemon that restarts forgets what was
in flight, a process dies between its ``tpc_finish`` calls. No rule about
reports alone can be sound under such faults: a transaction whose client
never got through is invisible to the daemon, and a single-storage commit
reported by another client would move the point past it on one storage.

So the daemon also *reads* its storages. Every multi-storage commit of a
tidstorage writer carries a stamp (coherency id + storage ids) in its
transaction record, identical in each storage (``stamps.py``). For each
storage it can read (through ZEO, or its ``Data.fs``), the daemon keeps a
*verified frontier* ``V[s]``: every transaction committed on ``s`` with a TID
``<= V[s]`` has been read, with its stamp. A point ``P`` is published only if

(R1) ``P[s] <= limit[s]``: the tracker's report-based bound (transactions of
     legacy clients, which do not stamp, are only known from reports; see
     "Limits" below);
(R2) ``P[s] <= V[s]`` for every readable storage;
(R3) ``P`` splits no known transaction: for each stamped transaction read so
     far (and each reported multi-storage commit), either every part is kept
     (``tid <= P[s]`` on each of its storages) or none is.

Why (R2)+(R3) are exact, whatever the clocks, lock delays or lost reports.
A storage commits serially in TID order: its TID is chosen under its commit
lock (ZEO: at vote; FileStorage: at ``tpc_begin``), which is held until
``tpc_finish``. So when the transaction at ``V[s]`` has finished, every
transaction with a smaller TID on ``s`` has finished (or aborted), and all of
them have been read. Take a stamped transaction ``T`` over ``a`` and ``b``.
If it was read on ``a`` but not on ``b``, its part on ``b`` either does not
exist or has a TID ``> V[b] >= P[b]``: ``T`` is not kept on ``b``, so (R3)
drops it on ``a``. If it was read on neither, its TIDs are above both
frontiers, so ``P`` keeps it nowhere. No TID is compared across storages and
no time window is involved: a part is "missing" only because the frontier
of its storage is known to be below it.

The largest point satisfying (R1)-(R3) is computed as in
``stamps.largest_coherent_cut``: start from the bounds; while a known
transaction is split, lower each storage where it is kept to the TID just
before it there; repeat. Each part flips from kept to dropped at most once,
and a per-storage index finds the parts a lowering drops, so a computation
costs O(parts log parts). The result is never below the point already
published: the published point is coherent for everything known when it was
published, and what is learnt later (frontiers only grow; new parts lie
above the old frontiers) cannot make it split anything. A violation of that
(only possible when reports from a legacy client or about an unreadable
storage arrive late, see below) is reported, never acted on by moving back.

Limits
------
Storages the daemon cannot read (no ``zeo`` nor ``data_fs`` configured) have
no frontier: for them the gate takes the tracker's published TID as given,
and a stamped transaction not reported for such a storage counts as not kept
there. Such storages, and legacy clients' transactions, are only as safe as
their reports: this is the legacy trust model, and ``server.py`` says so at
start.

A *split* (a transaction kept on some storages that can never appear on the
others) needs no special rule here: its missing parts stay missing, so it is
dropped for ever, and with it whatever later transaction links its storages
to others. ``mark_split`` only records it for reports.

Heals. ``tidstorage heal`` undoes a split's parts in one new transaction
stamped ``heals: <split id>`` over the storages that hold them (a stamp even
on one storage). A point keeping a part of the split and its heal on a
storage keeps the split *in effect absent* there (``KnownTxn.kept``): a
point between a split and its heal is still split (the part is lowered
away as before); a point at or past the heal on every storage holding the
split splits nothing, so the split stops freezing its storages once the
heal has been read on all of them (the heal itself, over several
storages, is a stamped transaction kept whole like any other). An operator
may instead *accept* a split as it is (``accept``): it is then ignored.

This module does no I/O and no logging.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .stamps import Stamp

__all__ = ["Gate", "NONE", "KnownTxn", "Violation"]

#: A frontier or cut below every TID: nothing read / nothing kept.
NONE = -1
#: Transactions published whole remembered after they are forgotten (for
#: in-doubt resolutions that finish after the publication).
MAX_WHOLE = 10_000
#: Heals remembered (split id -> where its heal was read), and splits
#: healed since the start, at most.
MAX_HEALS = 10_000


@dataclass(slots=True)
class KnownTxn:
    """A multi-storage transaction the gate knows of."""

    id: str
    storages: frozenset[str]
    #: storage -> TID where its record was read (or reported)
    parts: dict[str, int] = field(default_factory=dict)
    #: proven never to appear on these storages (a split)
    never: set[str] = field(default_factory=set)
    #: its split under the published point cannot be undone (see Violation)
    violated: bool = False
    #: storage -> TID of its heal there (an undo stamped ``heals: id``)
    healed: dict[str, int] = field(default_factory=dict)

    def kept(self, cut: Mapping[str, int]) -> int:
        """How many of its parts ``cut`` keeps in effect (a part whose heal
        ``cut`` also keeps is undone: not kept)."""
        healed = self.healed
        n = 0
        for s, t in self.parts.items():
            c = cut.get(s, NONE)
            if t <= c and not (healed and t < healed.get(s, t) <= c):
                n += 1
        return n

    def undone(self, cut: Mapping[str, int]) -> bool:
        """Is every part undone by its heal, which ``cut`` keeps?"""
        healed = self.healed
        return bool(healed) and all(
            t < healed.get(s, t) <= cut.get(s, NONE) for s, t in self.parts.items())

    @property
    def complete(self) -> bool:
        return len(self.parts) == len(self.storages)


@dataclass(frozen=True, slots=True)
class Violation:
    """The published point splits ``txn`` (learnt after publication)."""

    txn: str
    storages: tuple[str, ...]
    parts: dict[str, int]


class Gate:
    """Verified frontiers, known transactions, and the publishable point."""

    def __init__(self, readable: Iterable[str], published: Mapping[str, int] | None = None) -> None:
        published = dict(published or {})
        #: the published point (what DUMP and the TID log show)
        self.published: dict[str, int] = published
        #: readable storage -> verified frontier
        self.verified: dict[str, int] = {s: published.get(s, NONE) for s in readable}
        #: readable storage -> ascending TIDs read in (published, verified]
        self._tids: dict[str, list[int]] = {s: [] for s in self.verified}
        self._txns: dict[str, KnownTxn] = {}
        #: storage -> ascending (tid, txn id) of known parts above published
        self._parts: dict[str, list[tuple[int, str]]] = {}
        #: transactions whose split was proven (kept after they leave _txns)
        self.splits: dict[str, KnownTxn] = {}
        #: transactions published whole and forgotten since (bounded): an
        #: in-doubt resolution may still ask where they were found
        self._whole: collections.OrderedDict[str, dict[str, int]] = collections.OrderedDict()
        #: unreadable storage -> the tracker's published TID offered
        self._offered: dict[str, int] = {}
        #: unreadable storages whose offer is above their published TID
        self._behind: set[str] = set()
        #: split id -> {storage: TID of its heal there} (read before or
        #: after the split's parts; at most MAX_HEALS, the oldest dropped)
        self.heals: collections.OrderedDict[str, dict[str, int]] = collections.OrderedDict()
        #: storage -> ascending (heal TID, split id): a point lowered below a
        #: heal keeps its split again
        self._heal_index: dict[str, list[tuple[int, str]]] = {}
        #: split ids an operator accepted as they are: ignored
        self.accepted: set[str] = set()
        #: splits healed and published past since the start (bounded), and
        #: how many in all
        self.healed: collections.OrderedDict[str, dict[str, int]] = collections.OrderedDict()
        self.healed_total = 0

    # -- queries ---------------------------------------------------------

    def readable(self, storage: str) -> bool:
        return storage in self.verified

    def known(self, txn: str) -> KnownTxn | None:
        return self._txns.get(txn)

    def parts(self, txn: str) -> dict[str, int]:
        """Where ``txn`` was found (or reported), also shortly after it was
        published whole and forgotten."""
        known = self._txns.get(txn)
        if known is not None:
            return dict(known.parts)
        return dict(self._whole.get(txn, {}))

    def incomplete(self) -> list[KnownTxn]:
        """Known transactions with some parts read and others not (yet)."""
        return [t for t in self._txns.values() if t.parts and not t.complete and not t.never]

    def __len__(self) -> int:
        return len(self._txns)

    def oldest_unpublished(self, storage: str) -> int | None:
        """The lowest TID read on ``storage`` above its published TID."""
        tids = self._tids.get(storage)
        if not tids:
            return None
        i = bisect.bisect_right(tids, self.published.get(storage, NONE))
        return tids[i] if i < len(tids) else None

    def held(self, storage: str) -> int:
        """How many transactions read on ``storage`` lie above its published TID."""
        return len(self._tids.get(storage, ()))

    # -- what the daemon learns ------------------------------------------

    def feed(self, storage: str, records: Iterable[tuple[int, Stamp | None]]) -> None:
        """Transactions read on ``storage``, ascending, all above its frontier.

        The frontier moves to the last TID: the reader returns every
        committed transaction after the old frontier, in order.
        """
        tids = self._tids[storage]
        frontier = self.verified[storage]
        for tid, stamp in records:
            if tid <= frontier:
                continue  # overlap with an earlier read (a re-read after a pack)
            frontier = tid
            tids.append(tid)
            if stamp is not None:
                if stamp.heals is not None:
                    self._heal(stamp.heals, storage, tid)
                if len(stamp.storages) > 1:
                    self._add_part(stamp.id, stamp.storages, storage, tid, scanned=True)
        self.verified[storage] = frontier

    def report(self, txn: str, tids: Mapping[str, int]) -> None:
        """A multi-storage commit reported by its client (or proven whole).

        Reported parts of readable storages never override what was read
        there (the files are the truth); they matter for legacy clients'
        unstamped transactions and for unreadable storages.
        """
        if len(tids) < 2:
            return
        verified = self.verified
        for storage in tids:
            if storage in verified:
                break
        else:
            return  # no readable storage: the tracker keeps it whole (see Limits)
        published = self.published
        if txn not in self._txns and all(t <= published.get(s, NONE) for s, t in tids.items()):
            return  # a late report of something already published whole
        storages = frozenset(tids)
        for storage, tid in tids.items():
            self._add_part(txn, storages, storage, tid, scanned=False)

    def correct(self, storage: str, tid: int | None) -> None:
        """An operator's correction: the published TID of ``storage`` is
        ``tid`` (None: not published), even lower than it was. A readable
        storage is then read again from there."""
        if tid is None or tid < 0:
            self.published.pop(storage, None)
        else:
            self.published[storage] = tid
        self._offered.pop(storage, None)
        self._behind.discard(storage)
        if storage in self.verified:
            self.verified[storage] = NONE if tid is None else tid
            self._tids[storage] = []
            for txn in {t for _, t in self._parts.get(storage, [])}:
                known = self._txns[txn]
                self._unindex(storage, known.parts.pop(storage), txn)
                if not known.parts:
                    del self._txns[txn]

    def _heal(self, split: str, storage: str, tid: int) -> None:
        heals = self.heals.get(split)
        if heals is None:
            heals = self.heals[split] = {}
            if len(self.heals) > MAX_HEALS:
                self.heals.popitem(last=False)
        if storage not in heals:
            heals[storage] = tid
            index = self._heal_index.setdefault(storage, [])
            if not index or index[-1][0] < tid:
                index.append((tid, split))
            else:
                bisect.insort(index, (tid, split))
        known = self._txns.get(split)
        if known is not None:
            known.healed = heals

    def accept(self, txn: str) -> KnownTxn | None:
        """An operator accepts split ``txn`` as it is: it is ignored from now
        on (its parts constrain no point)."""
        self.accepted.add(txn)
        known = self._txns.get(txn)
        if known is not None:
            self._forget(known)
        return self.splits.pop(txn, known)

    def mark_split(self, txn: str, missing: Iterable[str]) -> KnownTxn | None:
        """Record a proven split (its missing parts can never appear)."""
        known = self._txns.get(txn)
        if known is None:
            return None
        known.never.update(missing)
        self.splits[txn] = known
        return known

    def _add_part(self, txn: str, storages: Iterable[str], storage: str, tid: int,
                  *, scanned: bool) -> None:
        if txn in self.accepted:
            return
        known = self._txns.get(txn)
        if known is None:
            known = self._txns[txn] = KnownTxn(txn, frozenset(storages) | {storage})
            heals = self.heals.get(txn)
            if heals is not None:
                known.healed = heals
        elif storage not in known.storages:
            known.storages = known.storages | {storage}
        old = known.parts.get(storage)
        if old is not None:
            if old == tid or not scanned:
                return  # the first record (or the one read) stays
            self._unindex(storage, old, txn)
        known.parts[storage] = tid
        index = self._parts.setdefault(storage, [])
        if not index or index[-1][0] < tid:
            index.append((tid, txn))
        else:
            bisect.insort(index, (tid, txn))

    def _unindex(self, storage: str, tid: int, txn: str) -> None:
        index = self._parts.get(storage, [])
        i = bisect.bisect_left(index, (tid, txn))
        if i < len(index) and index[i] == (tid, txn):
            del index[i]

    def _forget(self, known: KnownTxn) -> None:
        del self._txns[known.id]
        for storage, tid in known.parts.items():
            self._unindex(storage, tid, known.id)
        if known.complete:
            self._whole[known.id] = known.parts
            if len(self._whole) > MAX_WHOLE:
                self._whole.popitem(last=False)

    # -- publication -----------------------------------------------------

    def compute(
        self, limits: Mapping[str, int], offers: Mapping[str, int] | None = None
    ) -> tuple[dict[str, int], list[Violation]]:
        """Publish the largest point allowed by (R1)-(R3); return what moved.

        ``limits``: readable storage -> the tracker's bound (absent: none).
        ``offers``: unreadable storage -> the tracker's new published TID
        (only what changed since the last call; the gate remembers).
        """
        published = self.published
        offered = self._offered
        behind = self._behind
        if offers:
            for storage, tid in offers.items():
                if storage in self.verified:
                    continue
                if tid > offered.get(storage, NONE):
                    offered[storage] = tid
                    if tid > published.get(storage, NONE):
                        behind.add(storage)
        if not self._txns and not behind and not self.verified:
            return {}, []
        cut: dict[str, int] = {}
        for storage, frontier in self.verified.items():
            bound = frontier
            limit = limits.get(storage)
            if limit is not None and limit < bound:
                bound = limit
            old = published.get(storage, NONE)
            cut[storage] = bound if bound > old else old
        for storage in behind:
            cut[storage] = offered[storage]
        if self._txns:
            # Unreadable storages not offered now still bound what the known
            # transactions may keep there: their published TID.
            for known in self._txns.values():
                for storage in known.parts:
                    if storage not in cut:
                        cut[storage] = published.get(storage, NONE)
        violations = self._lower(cut)
        changed = {}
        for storage, tid in cut.items():
            if tid > published.get(storage, NONE):
                changed[storage] = published[storage] = tid
        for storage in list(behind):
            if published.get(storage, NONE) >= offered[storage]:
                behind.discard(storage)
        if changed:
            self._prune(changed)
        return changed, violations

    def _lower(self, cut: dict[str, int]) -> list[Violation]:
        """Lower ``cut`` until no known transaction is split (see the doc)."""
        published = self.published
        work = collections.deque(t for t in self._txns.values() if not t.violated)
        violations: list[Violation] = []
        while work:
            known = work.popleft()
            if known.violated:
                continue
            kept = known.kept(cut)
            if kept == 0 or kept == len(known.storages):
                continue
            healed = known.healed
            for storage, tid in list(known.parts.items()):
                if tid > cut.get(storage, NONE):
                    continue
                if healed and tid < healed.get(storage, tid) <= cut[storage]:
                    continue  # undone by its heal, also kept
                below = self._before(storage, tid)
                floor = published.get(storage, NONE)
                if below < floor:
                    # The published point already keeps this part while
                    # another is missing: it cannot be taken back.
                    known.violated = True
                    violations.append(Violation(known.id, tuple(sorted(known.storages)),
                                                dict(known.parts)))
                    break
                old = cut[storage]
                cut[storage] = below
                index = self._parts.get(storage, [])
                lo = bisect.bisect_right(index, below, key=_tid_of)
                hi = bisect.bisect_right(index, old, key=_tid_of)
                for _, other in index[lo:hi]:
                    work.append(self._txns[other])
                heals = self._heal_index.get(storage)
                if heals:  # below a heal: its split is kept again there
                    lo = bisect.bisect_right(heals, below, key=_tid_of)
                    hi = bisect.bisect_right(heals, old, key=_tid_of)
                    for _, split in heals[lo:hi]:
                        again = self._txns.get(split)
                        if again is not None:
                            work.append(again)
        return violations

    def _before(self, storage: str, tid: int) -> int:
        """The largest TID on ``storage`` below ``tid`` (or the published one)."""
        tids = self._tids.get(storage)
        if tids is None:  # unreadable: no list of TIDs, any value below will do
            return tid - 1
        i = bisect.bisect_left(tids, tid)
        if i:
            return tids[i - 1]
        return self.published.get(storage, NONE)

    def _prune(self, changed: Mapping[str, int]) -> None:
        published = self.published
        for storage, tid in changed.items():
            tids = self._tids.get(storage)
            if tids:
                del tids[: bisect.bisect_right(tids, tid)]
            heals = self._heal_index.get(storage)
            if heals:  # the point never goes back below them
                del heals[: bisect.bisect_right(heals, tid, key=_tid_of)]
        done = [
            t for t in self._txns.values()
            if t.complete and t.kept(published) == len(t.storages)
        ]
        for known in done:
            self._forget(known)
        if self.splits:
            for txn, known in list(self.splits.items()):
                if known.complete and known.kept(published) == len(known.storages):
                    # Its "missing" part appeared after all (a heal completed
                    # by a re-run writes the heal's id there): whole now.
                    del self.splits[txn]
                    continue
                if known.undone(published):
                    # Healed, and published past the heal wherever it is kept.
                    del self.splits[txn]
                    if txn in self._txns:
                        self._forget(known)
                    self.healed[txn] = dict(known.healed)
                    self.healed_total += 1
                    if len(self.healed) > MAX_HEALS:
                        self.healed.popitem(last=False)


def _tid_of(entry: tuple[int, str]) -> int:
    return entry[0]
