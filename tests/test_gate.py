"""The publication gate (``gate.py``): its rules, and a model check.

The hypothesis test builds random storages that commit serially (some
transactions over several storages, stamped; some interrupted between their
finishes), reads them in random increments, and checks after every step
that the gate publishes exactly the largest coherent point of what was read
(``stamps.largest_coherent_cut`` over the read prefixes, missing parts
counting as missing), that it never goes down, and that it never keeps part
of a transaction of the ground truth -- including the parts not read yet.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tidstorage.core.gate import NONE, Gate
from tidstorage.core.stamps import Stamp, largest_coherent_cut


def stamp(txn: str, *storages: str) -> Stamp:
    return Stamp(txn, tuple(sorted(storages)))


def test_a_transaction_seen_on_one_storage_only_holds_that_storage_below_it():
    g = Gate(["a", "b"], {"a": 10, "b": 10})
    g.feed("a", [(11, None), (12, stamp("T", "a", "b")), (13, None)])
    g.feed("b", [(11, None)])
    changed, _ = g.compute({})
    assert changed == {"a": 11, "b": 11}  # a stops just before T's part
    g.feed("b", [(14, stamp("T", "a", "b"))])
    changed, _ = g.compute({})
    assert changed == {"a": 13, "b": 14}  # T whole: both move past it
    assert len(g) == 0  # published whole: forgotten
    assert g.parts("T") == {"a": 12, "b": 14}  # ... but still answerable


def test_a_split_holds_its_storages_and_what_links_them_for_ever():
    g = Gate(["a", "b", "c"], {})
    g.feed("a", [(1, stamp("T", "a", "b")), (2, stamp("U", "a", "c")), (3, None)])
    g.feed("b", [(5, None)])
    g.feed("c", [(7, stamp("U", "a", "c")), (8, None)])
    g.mark_split("T", ["b"])
    changed, _ = g.compute({})
    # a below T; U is then dropped on a, so on c too; b is free
    assert changed == {"b": 5}
    assert "a" not in g.published and "c" not in g.published
    assert list(g.splits) == ["T"]


def test_the_trackers_limits_bound_the_point():
    g = Gate(["a"], {"a": 1})
    g.feed("a", [(2, None), (3, None)])
    changed, _ = g.compute({"a": 2})
    assert changed == {"a": 2}
    changed, _ = g.compute({})
    assert changed == {"a": 3}


def test_unreadable_storages_take_the_trackers_point_and_late_reports_are_violations():
    g = Gate(["a"], {})
    g.feed("a", [(5, None)])
    changed, _ = g.compute({}, {"u": 7})
    assert changed == {"a": 5, "u": 7}
    # a report learnt after publication: T kept on u (7 >= 6) and not on a
    g.report("T", {"a": 9, "u": 6})
    changed, violations = g.compute({}, {})
    assert changed == {} and [v.txn for v in violations] == ["T"]
    assert g.published == {"a": 5, "u": 7}  # never moved back


def test_a_late_report_of_what_is_already_published_whole_is_ignored():
    g = Gate(["a", "b"], {"a": 10, "b": 10})
    g.report("old", {"a": 3, "b": 4})
    assert len(g) == 0


# -- the model check -------------------------------------------------------------


@st.composite
def histories(draw):
    names = ["a", "b", "c"][: draw(st.integers(2, 3))]
    clock = {s: 0 for s in names}
    files: dict[str, list[tuple[int, Stamp | None]]] = {s: [] for s in names}
    truth: dict[str, set[str]] = {}
    for i in range(draw(st.integers(1, 25))):
        members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names),
                                unique=True))
        txn = f"T{i}"
        # interrupted between finishes: only a prefix of its parts exists
        done = members
        if len(members) > 1 and draw(st.integers(0, 5)) == 0:
            done = members[: draw(st.integers(1, len(members) - 1))]
        truth[txn] = set(members)
        for s in sorted(done):
            clock[s] += draw(st.integers(1, 3))
            files[s].append((clock[s], stamp(txn, *members) if len(members) > 1 else None))
    steps = draw(st.lists(st.tuples(st.sampled_from(names), st.integers(0, 4)), max_size=30))
    return names, files, truth, steps


@settings(max_examples=300, deadline=None)
@given(histories())
def test_the_gate_publishes_the_largest_coherent_point_of_what_it_read(history):
    names, files, truth, steps = history
    g = Gate(names, {})
    read = {s: 0 for s in names}
    previous: dict[str, int] = {}
    for storage, count in steps + [(s, 99) for s in names]:
        new = files[storage][read[storage]: read[storage] + count]
        read[storage] += len(new)
        g.feed(storage, new)
        g.compute({})
        published = dict(g.published)
        # never down
        assert all(published.get(s, NONE) >= t for s, t in previous.items())
        previous = published
        # exactly the largest coherent point of the read prefixes
        prefixes = {s: files[s][: read[s]] for s in names}
        start = {s: (prefixes[s][-1][0] if prefixes[s] else NONE) for s in names}
        best = largest_coherent_cut(prefixes, start)
        expected = {}
        for s in names:
            kept = [t for t, _ in prefixes[s] if t <= best[s]]
            if kept:
                expected[s] = kept[-1]
        assert {s: t for s, t in published.items() if t != NONE} == expected
        # never keeps part of a transaction of the ground truth
        where: dict[str, dict[str, int]] = {}
        for s in names:
            for tid, sp in files[s]:
                if sp is not None:
                    where.setdefault(sp.id, {})[s] = tid
        for txn, parts in where.items():
            kept = {s for s, t in parts.items() if t <= published.get(s, NONE)}
            assert not kept or (kept == truth[txn] and set(parts) == truth[txn]), (
                txn, parts, published)


def test_what_a_split_holds_back_is_bounded(monkeypatch):
    """A split freezes its storage while writers go on: the daemon stops
    reading it beyond a named bound instead of growing for ever."""
    from tidstorage.core import coordinator as co
    monkeypatch.setattr(co, "MAX_HELD_TIDS", 50)
    c = co.Coordinator({"a": "file", "b": "file"}, {"a": 0, "b": 0}, clock=lambda: 0.0,
                       daemon_id="d")
    c.start()
    scans = [a for a in c.take_actions() if isinstance(a, co.Scan)]
    first = {a.storage: a for a in scans}
    # T is on a only (a split); then a keeps being written
    records = [(1, stamp("T", "a", "b"))] + [(i, None) for i in range(2, 200)]
    c.scan_result("a", first["a"].seq, records)
    c.scan_result("b", first["b"].seq, [(1, None)])
    actions = c.take_actions()
    assert "a" in c.status()["held_back"]
    assert not any(isinstance(x, co.Scan) and x.storage == "a" for x in actions)
    assert c.published().get("a", 0) == 0 and c.published()["b"] == 1


# -- heals (issue 12) --------------------------------------------------------------


def heal_stamp(txn: str, split: str, *storages: str) -> Stamp:
    return Stamp(txn, tuple(sorted(storages)), split)


def test_a_heal_frees_the_storages_of_its_split():
    g = Gate(["a", "b"], {})
    g.feed("a", [(1, stamp("T", "a", "b")), (2, None)])
    g.feed("b", [(5, None)])
    g.mark_split("T", ["b"])
    changed, _ = g.compute({})
    assert changed == {"b": 5} and "a" not in g.published  # frozen below T
    g.feed("a", [(3, heal_stamp("H", "T", "a")), (4, None)])
    changed, _ = g.compute({})
    assert changed == {"a": 4}  # past the heal: T is undone on a
    assert "T" not in g.splits and g.healed == {"T": {"a": 3}}


def test_a_point_between_a_split_and_its_heal_is_still_split():
    g = Gate(["a", "b"], {})
    g.feed("a", [(1, stamp("T", "a", "b")), (2, None), (3, heal_stamp("H", "T", "a"))])
    g.feed("b", [(5, None)])
    g.mark_split("T", ["b"])
    changed, _ = g.compute({"a": 2})  # the tracker bounds a below the heal
    assert "a" not in changed and "T" in g.splits
    changed, _ = g.compute({})
    assert changed == {"a": 3}


def test_an_accepted_split_constrains_nothing_and_is_forgotten():
    g = Gate(["a", "b"], {})
    g.feed("a", [(1, stamp("T", "a", "b")), (2, None)])
    g.feed("b", [(5, None)])
    g.mark_split("T", ["b"])
    g.compute({})
    g.accept("T")
    changed, _ = g.compute({})
    assert changed == {"a": 2} and not g.splits and len(g) == 0
    g.feed("a", [(6, stamp("T", "a", "b"))])  # read again (a pack, a correction): ignored
    assert g.known("T") is None


@st.composite
def healed_histories(draw):
    names = ["a", "b", "c"][: draw(st.integers(2, 3))]
    clock = {s: 0 for s in names}
    files: dict[str, list[tuple[int, Stamp | None]]] = {s: [] for s in names}
    truth: dict[str, set[str]] = {}
    splits: list[tuple[str, list[str]]] = []
    for i in range(draw(st.integers(1, 20))):
        if splits and draw(st.integers(0, 3)) == 0:
            # heal one split: one transaction over the storages holding it,
            # stamped "heals"; it too may be interrupted between finishes
            split, holders = splits.pop(draw(st.integers(0, len(splits) - 1)))
            txn = f"H{i}"
            done = holders
            if len(holders) > 1 and draw(st.integers(0, 4)) == 0:
                done = holders[: draw(st.integers(1, len(holders) - 1))]
            truth[txn] = set(holders)
            for s in sorted(done):
                clock[s] += draw(st.integers(1, 3))
                files[s].append((clock[s], heal_stamp(txn, split, *holders)))
            continue
        members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names),
                                unique=True))
        txn = f"T{i}"
        done = members
        if len(members) > 1 and draw(st.integers(0, 3)) == 0:
            done = members[: draw(st.integers(1, len(members) - 1))]
            splits.append((txn, sorted(done)))
        truth[txn] = set(members)
        for s in sorted(done):
            clock[s] += draw(st.integers(1, 3))
            files[s].append((clock[s], stamp(txn, *members) if len(members) > 1 else None))
    steps = draw(st.lists(st.tuples(st.sampled_from(names), st.integers(0, 4)), max_size=30))
    return names, files, truth, steps


def _effectively_kept(files, cut):
    """txn -> storages where ``cut`` keeps its part and not its heal."""
    parts: dict[str, dict[str, int]] = {}
    heals: dict[str, dict[str, int]] = {}
    for s, items in files.items():
        for tid, sp in items:
            if sp is None:
                continue
            parts.setdefault(sp.id, {})[s] = tid
            if sp.heals:
                heals.setdefault(sp.heals, {})[s] = tid
    out = {}
    for txn, where in parts.items():
        h = heals.get(txn, {})
        out[txn] = ({s for s, t in where.items() if t <= cut.get(s, NONE)
                     and not (t < h.get(s, t) <= cut.get(s, NONE))}, where)
    return out


@settings(max_examples=300, deadline=None)
@given(healed_histories())
def test_no_published_or_computed_cut_ever_splits_an_unhealed_transaction(history):
    names, files, truth, steps = history
    g = Gate(names, {})
    read = {s: 0 for s in names}
    for storage, count in steps + [(s, 99) for s in names]:
        new = files[storage][read[storage]: read[storage] + count]
        read[storage] += len(new)
        g.feed(storage, new)
        g.compute({})
        published = dict(g.published)
        prefixes = {s: files[s][: read[s]] for s in names}
        start = {s: (prefixes[s][-1][0] if prefixes[s] else NONE) for s in names}
        computed = largest_coherent_cut(prefixes, start)
        expected = {s: max((t for t, _ in prefixes[s] if t <= computed[s]), default=NONE)
                    for s in names}
        assert {s: t for s, t in published.items() if t != NONE} == \
            {s: t for s, t in expected.items() if t != NONE}
        # neither keeps a part of a transaction (of the ground truth, parts
        # not read yet included) unless whole, or undone by its heal
        for cut in (published, computed):
            for txn, (kept, where) in _effectively_kept(files, cut).items():
                assert not kept or (kept == truth[txn] and set(where) == truth[txn]), (
                    txn, where, cut)


def test_a_split_whose_missing_part_appears_later_is_whole_again():
    # An interrupted heal over a and c, completed on c by a re-run.
    g = Gate(["a", "c"], {})
    g.feed("a", [(1, stamp("H", "a", "c")), (2, None)])
    g.feed("c", [(1, None)])
    g.mark_split("H", ["c"])
    g.compute({})
    assert "H" in g.splits and "a" not in g.published
    g.feed("c", [(3, stamp("H", "a", "c"))])
    changed, _ = g.compute({})
    assert changed == {"a": 2, "c": 3} and not g.splits


def test_healed_splits_are_counted_past_the_bound(monkeypatch):
    import tidstorage.core.gate as gate_module

    monkeypatch.setattr(gate_module, "MAX_HEALS", 1)
    g = Gate(["a", "b"], {})
    g.feed("b", [(9, None)])
    for n, (t, h) in enumerate([(1, 2), (3, 4)]):
        g.feed("a", [(t, stamp(f"T{n}", "a", "b")), (h, heal_stamp(f"H{n}", f"T{n}", "a"))])
        g.mark_split(f"T{n}", ["b"])
        g.compute({})
    assert g.healed_total == 2 and list(g.healed) == ["T1"]  # the coordinator logs each
