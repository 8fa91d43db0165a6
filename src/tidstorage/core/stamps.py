"""Coherency stamps: finding multi-storage transactions that are split.

Pure logic, no I/O: used by ``verify``, ``restore`` and ``repair`` (on
transaction headers read from ``Data.fs`` tails by :mod:`tidstorage.formats.filestorage`)
and by the daemon (on extensions read through ZEO).

The stamp
---------

Every transaction committed through tidstorage's ZODB wrapper on *several*
storages carries, in its transaction metadata extension (the pickled dict
stored in each storage's transaction record, identical in every storage)::

    extension["tidstorage"] = {"id": "<coherency id>", "storages": ["a", "b"]}

``id`` identifies the transaction across storages (each storage gives the
transaction its *own* TID, so TIDs cannot be matched); ``storages`` is the
sorted list of the storage ids (the wire ids, the keys of
``Config.storages``) the transaction was committed to.  The daemon's own
no-op transactions carry ``{"bootstrap": True}`` without ``id``: they write
no data, so they cannot make a cut incoherent and are not multi-storage
stamps (older versions added an ``id``, and those are read as stamps).
Single-storage transactions carry no stamp.

Splits
------

A set of storages, each cut at some TID (everything after the cut dropped),
is *coherent* when every stamped transaction is either kept in all of its
storages or dropped from all of them.  A stamped transaction kept in some of
its storages and missing from others is a :class:`Split`.

Only the *tails* of the files are read (the cost must grow with the tail, not
with the file), so the caller passes, for each scanned storage, the
transactions of a window at the end of the file.  A transaction absent from
a storage's window is then either really missing, or older than the window.
The caller tells which with ``horizon`` (see :func:`find_splits`): a stamp is
only declared missing from storage ``m`` if its present TIDs are all newer
than ``horizon[m]``, i.e. its record in ``m``, if it existed, would be in the
scanned window.  Otherwise its state in ``m`` is *unknown*, like a storage
named by the stamp that is not scanned at all.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "STAMP_KEY",
    "MAX_TID",
    "Stamp",
    "Split",
    "stamp_of",
    "stamp_value",
    "bootstrap_value",
    "is_bootstrap",
    "find_splits",
    "healed_splits",
    "largest_coherent_cut",
    "largest_cut_above",
]

#: The extension key of a stamp.
STAMP_KEY = "tidstorage"

from .tids import MAX_TID  # noqa: E402  (a cut at MAX_TID keeps everything)


@dataclass(frozen=True, slots=True)
class Stamp:
    """A multi-storage stamp: coherency id and the (sorted) storage ids;
    ``heals``: the id of the split this transaction heals (its undo)."""

    id: str
    storages: tuple[str, ...]
    heals: str | None = None


@dataclass(frozen=True)
class Split:
    """A stamped transaction kept in some storages and missing in others."""

    id: str
    #: every storage named by the stamp (sorted)
    storages: tuple[str, ...]
    #: storage -> TID, for the scanned storages where it is kept
    present: dict[str, int] = field(default_factory=dict)
    #: scanned storages where it is missing (sorted)
    missing: tuple[str, ...] = ()
    #: storages named by the stamp whose state is unknown: not scanned, or
    #: the transaction would lie below their scanned window (sorted)
    unknown: tuple[str, ...] = ()


def stamp_of(extension: Mapping) -> Stamp | None:
    """The multi-storage stamp in a transaction extension, or None.

    None when there is no stamp, when it is malformed (``id`` not a non-empty
    string, ``storages`` not a list of non-empty strings), or when it names
    fewer than two distinct storages (a single-storage transaction cannot be
    split) -- unless it is the heal of a split (``heals``: the split's id),
    which is a stamp even on one storage.  Never raises.
    """
    if not isinstance(extension, Mapping):
        return None
    value = extension.get(STAMP_KEY)
    if not isinstance(value, Mapping):
        return None
    stamp_id = value.get("id")
    storages = value.get("storages")
    if not isinstance(stamp_id, str) or not stamp_id:
        return None
    if not isinstance(storages, (list, tuple)):
        return None
    if not all(isinstance(s, str) and s for s in storages):
        return None
    names = tuple(sorted(set(storages)))
    heals = value.get("heals")
    if not isinstance(heals, str) or not heals or heals == stamp_id:
        heals = None
    if len(names) < (1 if heals else 2):
        return None
    return Stamp(stamp_id, names, heals)


def stamp_value(stamp_id: str, storages: Iterable[str], *, bootstrap: bool = False,
                heals: str | None = None) -> dict:
    """The value to store under ``extension[STAMP_KEY]`` (the inverse of
    :func:`stamp_of`): ``{"id": ..., "storages": [sorted ids]}``, with
    ``"heals": <split id>`` for the heal of a split."""
    value: dict = {"id": str(stamp_id), "storages": sorted(set(storages))}
    if bootstrap:
        value["bootstrap"] = True
    if heals:
        value["heals"] = str(heals)
    return value


def bootstrap_value(stamp_id: str | None = None, storages: Iterable[str] = ()) -> dict:
    """The mark of the daemon's own no-op commits: ``{"bootstrap": True}``,
    with an ``id`` and ``storages`` only when the no-op proves an in-doubt
    transaction over several storages (it is then also a stamp)."""
    if stamp_id is None:
        return {"bootstrap": True}
    return stamp_value(stamp_id, storages, bootstrap=True)


def is_bootstrap(value) -> bool:
    """Whether ``extension[STAMP_KEY]`` marks one of the daemon's no-ops."""
    return isinstance(value, Mapping) and bool(value.get("bootstrap"))


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def _index(txns: Mapping[str, Iterable[tuple[int, Stamp | None]]]):
    """(sorted tid lists, stamp id -> (Stamp, {storage: tid}), split id ->
    {storage: TID of its heal there})."""
    tids: dict[str, list[int]] = {}
    stamps: dict[str, tuple[Stamp, dict[str, int]]] = {}
    heals: dict[str, dict[str, int]] = {}
    for storage, items in txns.items():
        lst = []
        for tid, stamp in items:
            lst.append(tid)
            if stamp is None:
                continue
            if stamp.heals is not None:
                heals.setdefault(stamp.heals, {}).setdefault(storage, tid)
            entry = stamps.get(stamp.id)
            if entry is None:
                entry = stamps[stamp.id] = (stamp, {})
            # The same id twice in one storage is not something the wrapper
            # writes; keep the oldest record.
            entry[1].setdefault(storage, tid)
        lst.sort()
        tids[storage] = lst
    return tids, stamps, heals


def _splits(scanned, stamps, cut, horizon, heals=None, accepted=()) -> list[Split]:
    out = []
    for stamp_id, (stamp, where) in stamps.items():
        if stamp_id in accepted:
            continue  # the operator accepted this split as it is
        healed = heals.get(stamp_id) if heals else None
        # A stamp found in a storage it does not name is malformed; count
        # that storage in anyway, it holds the transaction.
        named = sorted(set(stamp.storages) | where.keys())
        present = {}
        absent = []
        for s in named:
            if s not in scanned:
                continue
            tid = where.get(s)
            if tid is not None and (cut is None or tid <= cut.get(s, MAX_TID)):
                undone = healed.get(s) if healed else None
                if undone is not None and undone > tid and (
                        cut is None or undone <= cut.get(s, MAX_TID)):
                    absent.append(s)  # kept, and its heal (undo) too: in effect absent
                    continue
                present[s] = tid
            else:
                absent.append(s)
        if not present or not absent:
            continue
        missing, unknown = [], [s for s in named if s not in scanned]
        oldest = min(present.values())
        for m in absent:
            if m in where:
                missing.append(m)  # its record is there, after the cut
            elif horizon is not None and m in horizon and oldest <= horizon[m]:
                unknown.append(m)  # may lie below m's scanned window
            else:
                missing.append(m)
        if missing:
            out.append(Split(stamp_id, tuple(named), present, tuple(missing),
                             tuple(sorted(unknown))))
    out.sort(key=lambda sp: (min(sp.present.values()), sp.id))
    return out


def find_splits(
    txns: Mapping[str, Iterable[tuple[int, Stamp | None]]],
    cut: Mapping[str, int] | None = None,
    *,
    horizon: Mapping[str, int] | None = None,
    accepted: Collection[str] = (),
) -> list[Split]:
    """Stamped transactions kept in some scanned storages and missing in others.

    ``txns`` maps each scanned storage id to its ``(tid, stamp)`` transactions
    in the scanned window (any order; ``stamp`` from :func:`stamp_of`).

    ``cut`` (storage -> TID, optional): only transactions with
    ``tid <= cut[storage]`` count as present (a storage without a cut keeps
    everything).  Without ``cut``, the files are taken as they are.

    ``horizon`` (storage -> TID, optional) says how far back each storage
    was scanned: a stamp that is *absent* from storage ``m``'s transactions is
    declared missing from ``m`` only if all of its present TIDs are greater
    than ``horizon[m]``; otherwise it is reported as unknown for ``m`` (its
    record may be older than the window, or may have been removed by a pack).
    A record of the stamp that *is* in ``m``'s transactions but after
    ``cut[m]`` is always missing.  Storages named by a stamp but absent from
    ``txns`` are unknown.

    A stamp is a split when it is present in at least one storage and
    missing (not merely unknown) in at least one.  Sorted by oldest present
    TID.

    **Heals.** A transaction whose stamp says ``heals: X`` undoes split
    ``X``'s part on the storages it is written to. A cut that keeps, on a
    storage, both a part of ``X`` and its heal there keeps ``X`` *in effect
    absent* on that storage: a point between a split and its heal is still
    split; a point at or past the heal on every storage holding the split
    is coherent (the heal is itself a stamped transaction over those
    storages, so it is kept on all of them or on none). ``accepted``: split
    ids an operator accepted as they are (``tidstorage heal --accept``):
    never reported, never cut for.
    """
    tids, stamps, heals = _index(txns)
    return _splits(tids, stamps, cut, horizon, heals, accepted)


def healed_splits(
    txns: Mapping[str, Iterable[tuple[int, Stamp | None]]],
    cut: Mapping[str, int] | None = None,
) -> dict[str, dict[str, int]]:
    """Splits a cut keeps healed: split id -> {storage: heal TID}, for the
    stamped transactions kept (under ``cut``) on some storages together with
    their heal there, and kept nowhere else without it."""
    _, stamps, heals = _index(txns)
    out = {}
    for split_id, healed in heals.items():
        entry = stamps.get(split_id)
        if entry is None:
            continue
        kept = {s: t for s, t in entry[1].items() if cut is None or t <= cut.get(s, MAX_TID)}
        if kept and all(healed.get(s, MAX_TID) <= (MAX_TID if cut is None else
                                                   cut.get(s, MAX_TID)) and healed[s] > t
                        for s, t in kept.items()):
            out[split_id] = {s: healed[s] for s in kept}
    return out


def largest_coherent_cut(
    txns: Mapping[str, Iterable[tuple[int, Stamp | None]]],
    start: Mapping[str, int],
    *,
    horizon: Mapping[str, int] | None = None,
    accepted: Collection[str] = (),
) -> dict[str, int]:
    """The greatest cut ``<= start`` (per storage) with no split transaction
    (heals and ``accepted`` as for :func:`find_splits`).

    ``txns`` and ``horizon`` as for :func:`find_splits`; ``start`` gives each
    storage's highest acceptable cut TID (a scanned storage missing from
    ``start`` starts at :data:`MAX_TID`).  Returns a cut for every storage of
    ``start`` and of ``txns``.

    Algorithm: starting from ``C = start``, while some stamped transaction
    ``T`` is split under ``C``, lower ``C[s]``, for every storage ``s`` where
    ``T`` is kept, to the TID of the transaction just before ``T`` in ``s``
    (``tid - 1`` if ``T`` is the oldest scanned one: the same cut, since TIDs
    are integers).  Repeat until no transaction is split.

    Why it is the largest: let ``C*`` be any coherent cut ``<= start``.
    Inductively ``C* <= C``.  If ``T`` is split under ``C``, missing in ``m``
    (dropped there: ``tid_m > C[m] >= C*[m]``, or not in ``m`` at all), ``T``
    is missing in ``m`` under ``C*`` too, so for ``C*`` to be coherent ``T``
    must be dropped from every ``s`` where it is kept under ``C``:
    ``C*[s] < tid_s(T)``, i.e. ``C*[s]`` keeps at most the transactions
    before ``T``, which is what the lowered ``C[s]`` keeps.  So ``C* <= C``
    still holds after the step.  Cuts only go down and there are finitely
    many transactions, so the loop ends, at a coherent cut that is ``>=``
    every coherent cut: the largest one.  (It is unique: the coherent cuts
    are closed under the per-storage maximum.)  The cost is
    O(rounds * transactions); in practice one or two rounds.

    With heals: a part of ``T`` on ``s`` counts as kept only while its heal
    there is not (``tid_s(T) <= C[s] < heal_s(T)``); lowering ``C[s]`` below
    ``tid_s(T)`` is then the only way to drop it (cuts only go down), and
    the argument above holds as it is: any coherent ``C* <= C`` with
    ``C*[s] < heal_s(T)`` must drop ``T`` on ``s``.
    """
    tids, stamps, heals = _index(txns)
    cut = {s: MAX_TID for s in tids}
    cut.update(start)
    while True:
        splits = _splits(tids, stamps, cut, horizon, heals, accepted)
        if not splits:
            return cut
        for split in splits:
            for s, tid in split.present.items():
                lst = tids[s]
                i = bisect.bisect_left(lst, tid)
                below = lst[i - 1] if i > 0 else tid - 1
                if below < cut[s]:
                    cut[s] = below


def largest_cut_above(
    tails: Mapping[str, Iterable[tuple[int, Stamp | None]]],
    floor: Mapping[str, int],
    *,
    accepted: Collection[str] = (),
) -> dict[str, int]:
    """The largest coherent cut ``>= floor`` that keeps only whole stamped
    transactions above ``floor`` (the *stamps' point*, used by restore and
    repair when every writer stamps).

    ``tails[s]`` must hold *every* transaction of storage ``s`` with a TID
    ``> floor[s]`` (those ``<= floor[s]`` are ignored); ``floor`` is a cut
    taken as coherent (the TID log's point, or its lowering).  Returns, for
    every storage of ``floor``, the TID of the last transaction to keep:
    ``floor[s]`` when nothing above it is kept.

    The rule, with no horizon and no time window: a stamped transaction read
    above ``floor`` on some storage is *whole* iff a record with its id is in
    the tail of every storage it names; otherwise it is missing there, and it
    is dropped everywhere (with, a cut keeping a prefix, everything after it
    on each storage, and so on: :func:`largest_coherent_cut` over the tails,
    starting from their ends).  A storage named by a stamp but absent from
    ``floor`` (not in this set) counts as missing: nothing proves the part
    there.  An unstamped transaction is kept: it is only safe when every
    writer stamps its multi-storage commits (a legacy client's are unstamped).

    Why it adds no split.  Let ``C`` be the result and ``T`` a stamped
    transaction split under ``C``.  If all of ``T``'s parts are above
    ``floor``, they are all in the tails, so ``T`` is present in every tail
    (and ``C``, coherent on the tails, keeps it everywhere or nowhere) or
    missing from one (and ``C`` keeps it nowhere): not split.  If all of
    them are ``<= floor``, ``C >= floor`` keeps them all: not split.  So
    ``T`` has parts on both sides of ``floor``: ``floor`` splits ``T`` too.
    Every transaction ``C`` splits, ``floor`` splits: ``C`` is coherent when
    ``floor`` is.  "Absent from the tail" does mean "missing" for any
    transaction ``floor`` does not split: a part ``<= floor[m]`` on ``m`` of
    a transaction with a part ``> floor[s]`` on ``s`` is a split of
    ``floor``.  And ``C >= floor``: ``floor`` keeps nothing of the tails, so
    it is coherent on them, and ``C`` is the largest such cut.
    """
    txns: dict[str, list[tuple[int, Stamp | None]]] = {s: [] for s in floor}
    for s, items in tails.items():
        if s in floor:
            txns[s] = [(t, st) for t, st in items if t > floor[s]]
    for items in list(txns.values()):
        for _, st in items:
            if st is not None:
                for m in st.storages:
                    txns.setdefault(m, [])  # outside the set: scanned, empty
    cut = largest_coherent_cut(txns, {s: MAX_TID for s in txns}, accepted=accepted)
    out = {}
    for s in floor:
        kept = [t for t, _ in txns[s] if t <= cut[s]]
        out[s] = max(kept) if kept else floor[s]
    return out
