"""The coherency rules: which TID of each storage may be published.

Theory of operation
===================

Application processes report every transaction that writes to the tracked
storages, in three steps (see ``protocol.py`` for the wire format):

``begin(txn, storages)``
    The transaction ``txn`` is in flight on ``storages``. The ZODB
    integration reports this before the first ``tpc_finish`` of any of its
    storages, so the tracker knows the transaction before any storage holds
    part of it.
``commit(txn, {storage: tid})``
    It finished on every storage, with these TIDs.
``abort(txn)``
    It failed; it left nothing in any storage.

Transactions are identified by the string the client chose, not by the
connection that sent them: ``begin`` on one connection and ``commit`` after a
reconnect is valid.

Groups
------
Storages that share a transaction that is in flight, or committed but not yet
published (*held*), directly or through a chain of such transactions, form a
*group*. Committed TIDs are held back in their group. When the last in-flight
transaction of a group ends, the group is *quiet*: the newest held TID of each
of its storages is published at once, all together, and the group dissolves.
Example: T1 begins on s1,s2; T2 begins on s1,s3 and commits; T3 begins and
commits on s3. Nothing is published until T1 ends; then s1, s2 and s3 are
published together. An aborted transaction publishes nothing of its own but
can make its group quiet.

Why this is coherent: a transaction is held in its group until that group is
quiet, so a published set never includes one storage's part of a transaction
without the others (it never exists in the published state at all before it
has ended everywhere). A later transaction that shares a storage with a held
one joins the held one's group, so it cannot be published on that storage
(moving the cut past the held transaction) while the held one is incomplete.

Because groups only ever merge while something is in flight and dissolve as a
whole, a group is a plain object shared by its storages (merge the smaller
into the larger): every operation costs O(number of storages it names), not
O(transactions in flight).

Bounds: busy groups publish too
-------------------------------
Under steady load a group may never be quiet (some transaction always links
its storages), and the rule above would publish nothing for ever. A BEGIN may
therefore carry, per storage, a *bound*: a TID the transaction's commit on
that storage is known to exceed (the ZODB integration sends the storage's
``lastTransaction()`` taken before the vote; TIDs are chosen under the
storage's commit lock at vote, so the commit's TID is greater). When a
transaction of a busy group ends, the group publishes the largest part of its
held commits that lies below every in-flight transaction: each storage is
capped at the smallest bound of the in-flight transactions on it (at the
published TID for a transaction without bounds: legacy clients get exactly
the group rule); a held transaction above a cap on one storage is excluded on
all its storages (each is capped just below it), until nothing changes; what
remains is wholly below every cap, so no in-flight or excluded transaction is
cut in two, and it is published. This relies on every multi-storage commit
having been reported; where reports were lost (the daemon's bootstrap and
re-check no-ops, committed as *barriers*), an excluded barrier caps its
storages at their published TIDs: nothing between the published point and
the barrier is ever published without the barrier itself.

Refusals
--------
These leave the state exactly as it was and raise :class:`Refused`, whose
message is meant for the log:

* ``begin`` of an id already in flight, or with no storage;
* ``commit``/``abort`` of an id not in flight (never began, or ended already);
* ``commit`` whose storages differ from those given at ``begin``;
* ``begin`` naming storage ids new to the tracker (neither published nor in
  a live group) when they would make it track more than
  ``protocol.MAX_STORAGES`` ids: every one may end up published, and a
  ``DUMP`` reply must fit what clients accept.

Published TIDs never decrease. A group that would publish a TID lower than
the one already published for a storage keeps the old value for that storage
and reports it in :attr:`Publication.decreases` (the daemon logs it at
CRITICAL: a backup taken now may hold part of a transaction). Exception: a
commit at or below the published TID of each of its storages is simply
ignored: single-storage commits are reported after the fact, and a client
re-sends reports that a lost connection may have swallowed, so they may
arrive late; they are already inside the published point and cannot be
split.

Bootstrap
---------
After a (re)start the tracker cannot know about transactions that began
before it: nothing is published until :meth:`Tracker.set_bootstrapped` is
called (the daemon calls it once its own no-op transaction has committed on
every storage it can reach, which proves that every older transaction has
ended). Groups that become quiet before that are dropped unpublished. The
published state reloaded from the TID log is served meanwhile (``initial``),
and never moves backward.

This module does no I/O and no logging: callers log what it returns or
raises.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from .protocol import MAX_STORAGES

__all__ = ["Tracker", "Refused", "Publication"]


class Refused(Exception):
    """A report that breaks the rules; the tracker state did not change.

    ``reason`` names the rule: ``"unknown"`` (COMMIT/ABORT of a transaction
    not in flight), ``"duplicate"`` (BEGIN of one in flight), ``"mismatch"``
    (COMMIT storages differ from BEGIN's), ``"empty"``, ``"bounds"``,
    ``"too-many-ids"`` (see :data:`~.protocol.MAX_STORAGES`).
    """

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Publication:
    """What one report changed in the published state.

    ``published``: storages whose published TID moved up, with the new TID.
    ``decreases``: (storage, refused tid, published tid) for refused moves
    down. Both empty when the report published nothing.
    """

    published: dict[str, int] = field(default_factory=dict)
    decreases: tuple[tuple[str, int, int], ...] = ()


NOTHING = Publication()

#: A busy group rescans its held commits once per len(held) / this many
#: commits (see ``Tracker._end``): constant amortised cost per commit.
PARTIAL_AMORTIZE = 16


class _Group:
    """Storages linked by in-flight or held transactions."""

    __slots__ = ("storages", "txns", "held", "unbounded", "since")

    def __init__(self) -> None:
        self.storages: set[str] = set()
        #: ids of its in-flight transactions
        self.txns: set[str] = set()
        #: committed, unpublished transactions: their {storage: tid}
        self.held: list[dict[str, int]] = []
        #: how many of its in-flight transactions have no bounds
        self.unbounded = 0
        #: commits since the last partial publication (amortisation)
        self.since = 0


class Tracker:
    """The sans-io coherency tracker (one per daemon, single-threaded)."""

    def __init__(self, initial: Mapping[str, int] | None = None) -> None:
        #: storage -> published TID
        self._published: dict[str, int] = dict(initial or {})
        #: transaction id -> its storages (as given at begin)
        self._in_flight: dict[str, frozenset[str]] = {}
        #: transaction id -> lower bounds of its TIDs (BEGIN2 only)
        self._bounds: dict[str, dict[str, int]] = {}
        #: storage -> its group, for storages in a non-quiet group
        self._group_of: dict[str, _Group] = {}
        #: storages of live groups never published (with the published
        #: ones: every id the tracker may publish, bounded by MAX_STORAGES)
        self._unpublished: set[str] = set()
        self._bootstrapped = False
        #: held commits examined by partial publications (a cost measure):
        #: each once per partial publication, plus each part reached again
        #: when an exclusion lowers the cap of its storage
        self.scanned = 0

    # -- queries ---------------------------------------------------------

    @property
    def bootstrapped(self) -> bool:
        return self._bootstrapped

    def published(self) -> dict[str, int]:
        """A copy of the published state: storage id -> TID."""
        return dict(self._published)

    def published_view(self) -> Mapping[str, int]:
        """A live read-only view of the published state (no copy)."""
        return MappingProxyType(self._published)

    def in_flight(self) -> dict[str, frozenset[str]]:
        """A copy of the in-flight transactions: id -> storages."""
        return dict(self._in_flight)

    def limits(self) -> dict[str, int]:
        """Storage -> the highest TID the reports allow publishing, for the
        storages of live groups (the others have no limit from reports).

        Used by the gate (``gate.py``), which publishes the largest point
        below these limits that the files prove coherent.
        """
        published = self._published
        return {s: published.get(s, -1) for s in self._group_of}

    def correct(self, storage: str, tid: int | None) -> None:
        """An operator's correction of the published TID (even downward;
        None: forget the storage)."""
        if tid is None or tid < 0:
            self._published.pop(storage, None)
        else:
            self._published[storage] = tid

    def observe_published(self, changes: Mapping[str, int]) -> None:
        """The daemon published ``changes`` (through the gate): the reported
        state moves up to them (never down)."""
        published = self._published
        for storage, tid in changes.items():
            if tid > published.get(storage, -1):
                published[storage] = tid
                self._unpublished.discard(storage)

    def groups(self) -> list[tuple[frozenset[str], int, dict[str, int]]]:
        """The live groups as (storages, in-flight count, newest held TIDs)."""
        seen: dict[int, _Group] = {id(g): g for g in self._group_of.values()}
        return [
            (frozenset(g.storages), len(g.txns), _newest(g.held))
            for g in seen.values()
        ]

    def oldest_held(self, storage: str) -> int | None:
        """The lowest committed TID of ``storage`` that is held back (above
        its published TID), or None. O(held transactions): for the status."""
        group = self._group_of.get(storage)
        if group is None:
            return None
        published = self._published.get(storage, -1)
        tids = [t[storage] for t in group.held if storage in t and t[storage] > published]
        return min(tids, default=None)

    # -- reports ---------------------------------------------------------

    def begin(
        self, txn: str, storages: Iterable[str], bounds: Mapping[str, int] | None = None
    ) -> None:
        """Register an in-flight transaction.

        ``bounds`` (optional, per storage): a TID its commit on that storage
        is known to be greater than (the storage's last TID seen by the
        client before the commit's vote). Without bounds, its storages
        publish nothing until it ends; with them, the group's committed
        transactions below the bounds can be published meanwhile.
        """
        members = frozenset(storages)
        if not members:
            raise Refused(f"BEGIN {txn!r} names no storage", "empty")
        if txn in self._in_flight:
            raise Refused(f"BEGIN {txn!r}: this transaction is already in flight", "duplicate")
        if bounds is not None and set(bounds) != members:
            raise Refused(f"BEGIN {txn!r}: bounds name {sorted(bounds)}, not {sorted(members)}", "bounds")
        published = self._published
        group_of = self._group_of
        new = [s for s in members if s not in published and s not in group_of]
        if new:
            known = len(published) + len(self._unpublished)
            if known + len(new) > MAX_STORAGES:
                raise Refused(
                    f"BEGIN {txn!r} names {len(new)} new storage ids ({_few(new)}) but"
                    f" {known} are known already (limit {MAX_STORAGES}, MAX_STORAGES)",
                    "too-many-ids")
            self._unpublished.update(new)
        self._in_flight[txn] = members
        if bounds is not None:
            self._bounds[txn] = dict(bounds)
        # The largest existing group absorbs the others (and new storages).
        target: _Group | None = None
        for storage in members:
            group = group_of.get(storage)
            if group is not None and (
                target is None or len(group.storages) > len(target.storages)
            ):
                target = group
        if target is None:
            target = _Group()
        for storage in members:
            group = group_of.get(storage)
            if group is target:
                continue
            if group is None:
                target.storages.add(storage)
                group_of[storage] = target
            else:
                self._merge(group, target)
        target.txns.add(txn)
        if bounds is None:
            target.unbounded += 1

    def commit(self, txn: str, tids: Mapping[str, int], *, barrier: bool = False) -> Publication:
        """End ``txn`` with its TIDs.

        ``barrier``: the daemon's own no-op commits (bootstrap, re-checks of
        LOST storages). Below their TIDs the storages may hold transactions
        the tracker never heard of; only the no-op proves that those have
        ended and are whole. So a point between the published TIDs and the
        barrier's may cut them: such a point is never published (see
        "Bounds"); the barrier is published whole or not at all.
        """
        members = self._in_flight.get(txn)
        if members is None:
            raise Refused(f"COMMIT {txn!r} received, but it never began (or ended already)", "unknown")
        if len(tids) != len(members) or not members.issuperset(tids):
            raise Refused(
                f"COMMIT {txn!r} names storages {sorted(tids)} but BEGIN named {sorted(members)}",
                "mismatch",
            )
        del self._in_flight[txn]
        bounded = self._bounds.pop(txn, None) is not None
        group = self._group_of[next(iter(members))]
        if len(tids) == 1:
            ((storage, tid),) = tids.items()
            if tid <= self._published.get(storage, -1):
                # A late single-storage report: already below the published
                # point, and a one-storage transaction cannot be split.
                return self._end(group, txn, bounded)
        elif _all_below(tids, self._published):
            # A late report of a transaction the published point already
            # keeps whole (re-sent after a reconnection): nothing to hold.
            return self._end(group, txn, bounded)
        if barrier:
            group.held.append(_Barrier(tids))
        else:
            group.held.append(tids if type(tids) is dict else dict(tids))  # noqa: E721
        return self._end(group, txn, bounded)

    def abort(self, txn: str) -> Publication:
        members = self._in_flight.pop(txn, None)
        if members is None:
            raise Refused(f"ABORT {txn!r} received, but it never began (or ended already)", "unknown")
        bounded = self._bounds.pop(txn, None) is not None
        return self._end(self._group_of[next(iter(members))], txn, bounded)

    def set_bootstrapped(self) -> None:
        """Allow publication from now on (see Bootstrap above)."""
        self._bootstrapped = True

    # -- internals -------------------------------------------------------

    def _merge(self, source: _Group, target: _Group) -> None:
        group_of = self._group_of
        for storage in source.storages:
            group_of[storage] = target
        target.storages |= source.storages
        target.txns |= source.txns
        target.held += source.held
        target.unbounded += source.unbounded

    def _end(self, group: _Group, txn: str, bounded: bool) -> Publication:
        group.txns.discard(txn)
        if not bounded:
            group.unbounded -= 1
        if group.txns:
            # Busy. With an unbounded transaction in flight the caps leave
            # nothing to publish (legacy semantics): skip the scan. Else
            # scan, amortised: a stuck transaction (a dead client, until the
            # in-doubt check) makes the held list grow, and one scan per
            # commit would be quadratic; one per len(held)/PARTIAL_AMORTIZE
            # commits keeps the cost per commit constant.
            if not group.held or not self._bootstrapped or group.unbounded:
                return NOTHING
            group.since += 1
            if group.since * PARTIAL_AMORTIZE < len(group.held):
                return NOTHING
            group.since = 0
            return self._publish_below_bounds(group)
        # Quiet: dissolve the group and publish what it held.
        group_of = self._group_of
        for storage in group.storages:
            del group_of[storage]
        self._unpublished.difference_update(group.storages)  # published, or gone
        held = group.held
        if not held or not self._bootstrapped:
            return NOTHING
        return self._publish(held[0] if len(held) == 1 else _newest(held))

    def _publish_below_bounds(self, group: _Group) -> Publication:
        """Publish the largest coherent part of a busy group's held commits.

        Every in-flight transaction will commit above its bounds (or, with
        none, above the published TID) on each of its storages: cap each
        storage there. A held transaction above the cap on one storage is
        excluded on all of them (cap those below it), until nothing changes.
        What remains is wholly below every cap: publish it.

        The exclusions are the least fixed point of a monotone rule (caps
        only go down, and a lower cap only excludes more), so the order in
        which they are found does not matter. A worklist finds them: a first
        pass checks every held commit against the caps of the in-flight
        transactions; each exclusion lowers caps, and a per-storage index of
        the held TIDs (sorted once, walked downwards from the old cap to the
        new one, never up again) yields exactly the commits the lowering
        excludes. Each part is reached at most once: O(parts log parts),
        not one pass over the held commits per exclusion (quadratic for a
        chain of exclusions, each found through the next one).
        """
        published = self._published
        cap = self._caps(group)
        held = group.held
        n = len(held)
        excluded = [False] * n
        work: list[int] = []
        for i, tids in enumerate(held):
            for s, t in tids.items():
                if t > cap.get(s, t):
                    excluded[i] = True
                    work.append(i)
                    break
        scanned = n
        if work:
            # Per storage: its held (tid, index) pairs (sorted ascending at
            # its first lowering), and how many of them lie at or below its
            # cap (those above were excluded already).
            parts: dict[str, list[tuple[int, int]]] = {}
            for i, tids in enumerate(held):
                for s, t in tids.items():
                    entries = parts.get(s)
                    if entries is None:
                        parts[s] = [(t, i)]
                    else:
                        entries.append((t, i))
            below: dict[str, int] = {}
            while work:
                tids = held[work.pop()]
                barrier = type(tids) is _Barrier
                for s, t in tids.items():
                    # nothing of a barrier: its storages stay at the published point
                    limit = published.get(s, -1) if barrier else t - 1
                    old = cap.get(s)
                    if old is not None and limit >= old:
                        continue
                    cap[s] = limit
                    entries = parts[s]
                    top = below.get(s)
                    if top is None:  # first lowering here: none reached yet
                        entries.sort()
                        top = len(entries)
                        if old is not None:
                            top = bisect.bisect_right(entries, (old, n))
                    start = bisect.bisect_right(entries, (limit, n), 0, top)
                    below[s] = start
                    scanned += top - start
                    for j in range(start, top):
                        k = entries[j][1]
                        if not excluded[k]:
                            excluded[k] = True
                            work.append(k)
        self.scanned += scanned
        included = [tids for i, tids in enumerate(held) if not excluded[i]]
        if not included:
            return NOTHING
        group.held = [tids for i, tids in enumerate(held) if excluded[i]]
        return self._publish(_newest(included))

    def _caps(self, group: _Group) -> dict[str, int]:
        """Storage -> the TID the in-flight transactions of ``group`` will
        commit above there (their smallest bound, or the published TID for
        one without bounds)."""
        published = self._published
        cap: dict[str, int] = {}
        for txn in group.txns:
            bounds = self._bounds.get(txn)
            for storage in self._in_flight[txn]:
                limit = bounds[storage] if bounds is not None else published.get(storage, -1)
                if limit < cap.get(storage, limit + 1):
                    cap[storage] = limit
        return cap

    def _publish(self, tids: dict[str, int]) -> Publication:
        published = self._published
        changed: dict[str, int] = {}
        decreases: list[tuple[str, int, int]] = []
        for storage, tid in tids.items():
            old = published.get(storage)
            if old is None:
                published[storage] = changed[storage] = tid
                self._unpublished.discard(storage)
            elif tid > old:
                published[storage] = changed[storage] = tid
            elif tid < old:
                decreases.append((storage, tid, old))
        if not changed and not decreases:
            return NOTHING
        return Publication(changed, tuple(decreases))


class _Barrier(dict):
    """Held TIDs of a barrier commit (see :meth:`Tracker.commit`)."""

    __slots__ = ()


def _few(names: list[str], most: int = 3) -> str:
    """Some names for a log line (each cut to 40 characters)."""
    shown = ", ".join(repr(n[:40]) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _newest(held: list[dict[str, int]]) -> dict[str, int]:
    newest: dict[str, int] = {}
    for tids in held:
        for storage, tid in tids.items():
            if tid > newest.get(storage, -1):
                newest[storage] = tid
    return newest


def _all_below(tids: Mapping[str, int], published: Mapping[str, int]) -> bool:
    """Every TID at or below its storage's published one (a plain loop: this
    runs for every multi-storage commit)."""
    get = published.get
    for storage, tid in tids.items():
        if tid > get(storage, -1):
            return False
    return True
