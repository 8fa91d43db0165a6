"""tidstorage.core.stamps: stamp parsing, split detection, largest coherent cut."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tidstorage.core.stamps import (
    MAX_TID,
    Split,
    Stamp,
    find_splits,
    largest_coherent_cut,
    stamp_of,
    stamp_value,
)

AB = Stamp("t1", ("a", "b"))


def test_stamp_of_accepts_the_wrappers_stamp_and_the_bootstrap_one():
    assert stamp_of({"tidstorage": {"id": "x", "storages": ["b", "a"]}}) == Stamp("x", ("a", "b"))
    boot = {"tidstorage": {"id": "ts:1", "storages": ["a", "b", "c"], "bootstrap": True}}
    assert stamp_of(boot) == Stamp("ts:1", ("a", "b", "c"))
    assert stamp_of({"tidstorage": stamp_value("y", ["c", "a", "a"])}) == Stamp("y", ("a", "c"))


def test_stamp_of_rejects_absent_malformed_and_single_stamps():
    for ext in [
        {}, None, [], {"other": 1},
        {"tidstorage": {"bootstrap": True}},            # older bootstrap stamp: no id
        {"tidstorage": {"id": "", "storages": ["a", "b"]}},
        {"tidstorage": {"id": 3, "storages": ["a", "b"]}},
        {"tidstorage": {"id": "x", "storages": "ab"}},
        {"tidstorage": {"id": "x", "storages": ["a", 1]}},
        {"tidstorage": {"id": "x", "storages": ["a"]}},   # single storage
        {"tidstorage": {"id": "x", "storages": ["a", "a"]}},
        {"tidstorage": "x"},
    ]:
        assert stamp_of(ext) is None, ext


def test_stamp_value_round_trip():
    v = stamp_value("id", {"b", "a"}, bootstrap=True)
    assert v == {"id": "id", "storages": ["a", "b"], "bootstrap": True}


def test_no_split_when_kept_everywhere_or_nowhere():
    txns = {"a": [(10, AB), (11, None)], "b": [(20, AB)]}
    assert find_splits(txns) == []
    # dropped from both by the cut
    assert find_splits(txns, {"a": 9, "b": 19}) == []


def test_split_by_cut_and_by_absence():
    txns = {"a": [(10, AB)], "b": [(20, AB)]}
    [sp] = find_splits(txns, {"a": 10, "b": 19})
    assert sp == Split("t1", ("a", "b"), {"a": 10}, ("b",), ())
    # absent from b's transactions altogether (b lost it)
    [sp] = find_splits({"a": [(10, AB)], "b": [(5, None)]})
    assert sp.present == {"a": 10} and sp.missing == ("b",)


def test_unscanned_storage_is_unknown_not_missing():
    abc = Stamp("t", ("a", "b", "c"))
    assert find_splits({"a": [(10, abc)], "b": [(20, abc)]}) == []
    [sp] = find_splits({"a": [(10, abc)], "b": [(5, None)]})
    assert sp.missing == ("b",) and sp.unknown == ("c",)


def test_horizon_makes_old_absences_unknown():
    txns = {"a": [(10, AB)], "b": [(50, None)]}
    # b was read back to 30 (+ margin): the record of a 10-transaction in b
    # could be older than b's window.
    assert find_splits(txns, horizon={"b": 30}) == []
    # newer than b's horizon: it would have been read, so it is missing
    assert [sp.id for sp in find_splits(txns, horizon={"b": 5})] == ["t1"]
    # a record in b's window but after b's cut is missing whatever the horizon
    assert [sp.id for sp in find_splits({"a": [(10, AB)], "b": [(60, AB)]},
                                        {"b": 50}, horizon={"b": 100})] == ["t1"]


def test_largest_coherent_cut_lowers_to_the_previous_transaction():
    txns = {"a": [(8, None), (10, AB), (12, None)], "b": [(20, AB)]}
    cut = largest_coherent_cut(txns, {"a": 12, "b": 19})
    assert cut == {"a": 8, "b": 19}
    # T is the oldest transaction read in a: the cut goes to tid - 1
    assert largest_coherent_cut({"a": [(10, AB)], "b": [(1, None)]}, {"a": 10, "b": 1}) \
        == {"a": 9, "b": 1}


def test_largest_coherent_cut_cascades():
    """Lowering a to drop T1 splits T2 (kept in b): b goes down too."""
    t1, t2 = Stamp("t1", ("a", "c")), Stamp("t2", ("a", "b"))
    txns = {"a": [(1, None), (2, t1), (3, t2)], "b": [(5, None), (6, t2), (7, None)],
            "c": [(9, None)]}  # c lost t1
    cut = largest_coherent_cut(txns, {"a": MAX_TID, "b": MAX_TID, "c": MAX_TID})
    assert cut == {"a": 1, "b": 5, "c": MAX_TID}
    assert find_splits(txns, cut) == []


def _kept_cuts(tids):
    """Every cut of a storage, as the tid values that keep 0..n transactions."""
    return [tids[0] - 1 if tids else 0] + list(tids)


@st.composite
def _scenarios(draw):
    storages = ["a", "b", "c"]
    nstamps = draw(st.integers(0, 5))
    stamps = []
    for i in range(nstamps):
        names = draw(st.lists(st.sampled_from(storages), min_size=2, max_size=3, unique=True))
        stamps.append(Stamp(f"s{i}", tuple(sorted(names))))
    txns = {}
    for k, s in enumerate(storages):
        n = draw(st.integers(0, 5))
        mine = [sp for sp in stamps if s in sp.storages]
        items, used = [], set()
        for i in range(n):
            choice = draw(st.sampled_from([None] + mine)) if mine else None
            if choice is not None and choice.id in used:
                choice = None
            if choice is not None:
                used.add(choice.id)
            items.append((100 * k + 10 * (i + 1), choice))
        txns[s] = items
    start = {s: draw(st.sampled_from(_kept_cuts([t for t, _ in txns[s]]))) for s in storages}
    return txns, start


@settings(max_examples=300, deadline=None)
@given(_scenarios())
def test_largest_coherent_cut_is_the_greatest_coherent_cut(scenario):
    """Brute force: the result is coherent and >= every coherent cut <= start."""
    txns, start = scenario
    result = largest_coherent_cut(txns, start)
    assert find_splits(txns, result) == []
    assert all(result[s] <= start[s] for s in start)
    options = [[c for c in _kept_cuts([t for t, _ in txns[s]]) if c <= start[s]]
               for s in sorted(txns)]
    for combo in itertools.product(*options):
        cut = dict(zip(sorted(txns), combo))
        if not find_splits(txns, cut):
            for s in cut:
                kept = [t for t, _ in txns[s] if t <= cut[s]]
                kept_by_result = [t for t, _ in txns[s] if t <= result[s]]
                assert kept == kept_by_result[:len(kept)] and len(kept) <= len(kept_by_result)


# -- heals and accepted splits (issue 12) ------------------------------------


def test_a_heal_stamp_is_a_stamp_even_on_one_storage():
    from tidstorage.core.stamps import stamp_of, stamp_value

    value = stamp_value("ts:heal-1", ["a"], heals="ts:x-1")
    assert value == {"id": "ts:heal-1", "storages": ["a"], "heals": "ts:x-1"}
    st = stamp_of({"tidstorage": value})
    assert st is not None and st.heals == "ts:x-1" and st.storages == ("a",)
    assert stamp_of({"tidstorage": {"id": "x", "storages": ["a"]}}) is None
    assert stamp_of({"tidstorage": {"id": "x", "storages": ["a"], "heals": "x"}}) is None


def test_find_splits_and_the_largest_cut_honour_heals_and_acceptance():
    from tidstorage.core.stamps import Stamp, healed_splits

    T = Stamp("T", ("a", "b"))
    H = Stamp("H", ("a",), "T")
    txns = {"a": [(1, None), (2, T), (3, None), (4, H), (5, None)], "b": [(1, None), (9, None)]}
    assert [sp.id for sp in find_splits(txns)] == []  # the files end healed
    assert [sp.id for sp in find_splits(txns, {"a": 3, "b": 9})] == ["T"]  # between
    assert healed_splits(txns) == {"T": {"a": 4}}
    assert healed_splits(txns, {"a": 3, "b": 9}) == {}
    assert largest_coherent_cut(txns, {"a": 5, "b": 9}) == {"a": 5, "b": 9}
    assert largest_coherent_cut(txns, {"a": 3, "b": 9}) == {"a": 1, "b": 9}
    # accepted: never a split, never cut for
    unhealed = {"a": [(1, None), (2, T), (3, None)], "b": [(9, None)]}
    assert [sp.id for sp in find_splits(unhealed)] == ["T"]
    assert find_splits(unhealed, accepted={"T"}) == []
    assert largest_coherent_cut(unhealed, {"a": 3, "b": 9}, accepted={"T"}) == {"a": 3, "b": 9}
