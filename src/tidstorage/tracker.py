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

Refusals
--------
These leave the state exactly as it was and raise :class:`Refused`, whose
message is meant for the log:

* ``begin`` of an id already in flight, or with no storage;
* ``commit``/``abort`` of an id not in flight (never began, or ended already);
* ``commit`` whose storages differ from those given at ``begin``.

Published TIDs never decrease. A group that would publish a TID lower than
the one already published for a storage keeps the old value for that storage
and reports it in :attr:`Publication.decreases` (the daemon logs it at
CRITICAL: a backup taken now may hold part of a transaction).

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

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

__all__ = ["Tracker", "Refused", "Publication"]


class Refused(Exception):
    """A report that breaks the rules; the tracker state did not change."""


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


class _Group:
    """Storages linked by in-flight or held transactions."""

    __slots__ = ("storages", "in_flight", "held")

    def __init__(self) -> None:
        self.storages: set[str] = set()
        self.in_flight = 0
        #: storage -> newest committed TID not yet published
        self.held: dict[str, int] = {}


class Tracker:
    """The sans-io coherency tracker (one per daemon, single-threaded)."""

    def __init__(self, initial: Mapping[str, int] | None = None) -> None:
        #: storage -> published TID
        self._published: dict[str, int] = dict(initial or {})
        #: transaction id -> its storages (as given at begin)
        self._in_flight: dict[str, frozenset[str]] = {}
        #: storage -> its group, for storages in a non-quiet group
        self._group_of: dict[str, _Group] = {}
        self._bootstrapped = False

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

    def groups(self) -> list[tuple[frozenset[str], int, dict[str, int]]]:
        """The live groups as (storages, in-flight count, held TIDs)."""
        seen: dict[int, _Group] = {id(g): g for g in self._group_of.values()}
        return [
            (frozenset(g.storages), g.in_flight, dict(g.held))
            for g in seen.values()
        ]

    # -- reports ---------------------------------------------------------

    def begin(self, txn: str, storages: Iterable[str]) -> None:
        members = frozenset(storages)
        if not members:
            raise Refused(f"BEGIN {txn!r} names no storage")
        if txn in self._in_flight:
            raise Refused(f"BEGIN {txn!r}: this transaction is already in flight")
        self._in_flight[txn] = members
        group_of = self._group_of
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
        target.in_flight += 1

    def commit(self, txn: str, tids: Mapping[str, int]) -> Publication:
        members = self._in_flight.get(txn)
        if members is None:
            raise Refused(f"COMMIT {txn!r} received, but it never began (or ended already)")
        if len(tids) != len(members) or not members.issuperset(tids):
            raise Refused(
                f"COMMIT {txn!r} names storages {sorted(tids)} but BEGIN named {sorted(members)}"
            )
        del self._in_flight[txn]
        group = self._group_of[next(iter(members))]
        held = group.held
        for storage, tid in tids.items():
            if tid > held.get(storage, -1):
                held[storage] = tid
        return self._end(group)

    def abort(self, txn: str) -> Publication:
        members = self._in_flight.pop(txn, None)
        if members is None:
            raise Refused(f"ABORT {txn!r} received, but it never began (or ended already)")
        return self._end(self._group_of[next(iter(members))])

    def set_bootstrapped(self) -> None:
        """Allow publication from now on (see Bootstrap above)."""
        self._bootstrapped = True

    # -- internals -------------------------------------------------------

    def _merge(self, source: _Group, target: _Group) -> None:
        group_of = self._group_of
        for storage in source.storages:
            group_of[storage] = target
        target.storages |= source.storages
        target.in_flight += source.in_flight
        held = target.held
        for storage, tid in source.held.items():
            if tid > held.get(storage, -1):
                held[storage] = tid

    def _end(self, group: _Group) -> Publication:
        group.in_flight -= 1
        if group.in_flight:
            return NOTHING
        # Quiet: dissolve the group and publish what it held.
        group_of = self._group_of
        for storage in group.storages:
            del group_of[storage]
        if not group.held or not self._bootstrapped:
            return NOTHING
        return self._publish(group.held)

    def _publish(self, tids: dict[str, int]) -> Publication:
        published = self._published
        changed: dict[str, int] = {}
        decreases: list[tuple[str, int, int]] = []
        for storage, tid in tids.items():
            old = published.get(storage)
            if old is None or tid > old:
                published[storage] = changed[storage] = tid
            elif tid < old:
                decreases.append((storage, tid, old))
        if not changed and not decreases:
            return NOTHING
        return Publication(changed, tuple(decreases))
