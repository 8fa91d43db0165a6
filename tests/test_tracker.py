"""The coherency rules (tracker.py), with the legacy suite's scenarios and a
hypothesis model of ZODB two-phase commit over per-storage commit locks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from tidstorage.core.tracker import Refused, Tracker


@pytest.fixture
def t() -> Tracker:
    tracker = Tracker()
    tracker.set_bootstrapped()
    return tracker


# -- the legacy testTIDServer scenarios ------------------------------------


def test_simple_commit(t):
    t.begin("t1", ["s1"])
    assert t.published() == {}
    pub = t.commit("t1", {"s1": 1})
    assert pub.published == {"s1": 1}
    assert t.published() == {"s1": 1}


def test_simple_abort(t):
    t.begin("t1", ["s1"])
    pub = t.abort("t1")
    assert pub.published == {}
    assert t.published() == {}
    assert t.in_flight() == {}


def test_overlap_second_commits_first(t):
    t.begin("t1", ["s1", "s2"])
    t.begin("t2", ["s1", "s3"])
    t.commit("t2", {"s1": 2, "s3": 1})
    assert t.published() == {}
    t.commit("t1", {"s1": 1, "s2": 1})
    assert t.published() == {"s1": 2, "s2": 1, "s3": 1}


def test_chain_through_three_transactions(t):
    # The example: T3 on s3 alone is held because s3 is linked to s1
    # through T2, and s1 is held by T1.
    t.begin("t1", ["s1", "s2"])
    t.begin("t2", ["s1", "s3"])
    t.commit("t2", {"s1": 2, "s3": 1})
    t.begin("t3", ["s3"])
    t.commit("t3", {"s3": 2})
    assert t.published() == {}
    t.commit("t1", {"s1": 1, "s2": 2})
    assert t.published() == {"s1": 2, "s2": 2, "s3": 2}


def test_chain_released_by_abort(t):
    t.begin("t1", ["s1", "s2"])
    t.begin("t2", ["s1", "s3"])
    t.commit("t2", {"s1": 2, "s3": 1})
    t.begin("t3", ["s3"])
    t.commit("t3", {"s3": 1})
    assert t.published() == {}
    pub = t.abort("t1")
    assert pub.published == {"s1": 2, "s3": 1}
    assert t.published() == {"s1": 2, "s3": 1}


def test_overlap_first_commits_first(t):
    t.begin("t1", ["s1"])
    t.begin("t2", ["s1", "s2"])
    t.commit("t1", {"s1": 2})
    assert t.published() == {}
    t.commit("t2", {"s1": 1, "s2": 1})
    assert t.published() == {"s1": 2, "s2": 1}


def test_disjoint_groups_publish_independently(t):
    t.begin("t1", ["s1"])
    t.begin("t2", ["s2"])
    t.commit("t1", {"s1": 1})
    assert t.published() == {"s1": 1}
    t.commit("t2", {"s2": 1})
    assert t.published() == {"s1": 1, "s2": 1}


def test_merge_of_two_groups_waits_for_all(t):
    t.begin("t1", ["s1"])
    t.begin("t2", ["s2"])
    t.begin("t3", ["s1", "s2"])
    t.commit("t1", {"s1": 1})
    t.commit("t2", {"s2": 2})
    assert t.published() == {}
    t.commit("t3", {"s1": 2, "s2": 2})
    assert t.published() == {"s1": 2, "s2": 2}


def test_increasing_values(t):
    for value in (1, 2, 3):
        t.begin("t1", ["s1"])
        assert t.published() == ({"s1": value - 1} if value > 1 else {})
        t.commit("t1", {"s1": value})
        assert t.published() == {"s1": value}


def test_group_dissolves_after_publication(t):
    t.begin("t1", ["s1", "s2"])
    t.commit("t1", {"s1": 1, "s2": 1})
    assert t.groups() == []
    # s1 and s2 are no longer linked: s2 publishes alone.
    t.begin("t2", ["s1"])
    t.begin("t3", ["s2"])
    t.commit("t3", {"s2": 5})
    assert t.published() == {"s1": 1, "s2": 5}


# -- bounds: busy groups still publish ---------------------------------------


def test_bounds_let_a_busy_group_publish_below_them(t):
    # T1 is in flight on s1,s2 and will commit above s1=10, s2=20.
    t.begin("t1", ["s1", "s2"], {"s1": 10, "s2": 20})
    t.begin("t2", ["s1", "s3"])
    pub = t.commit("t2", {"s1": 9, "s3": 5})  # below T1's bound on s1
    assert pub.published == {"s1": 9, "s3": 5}
    t.begin("t3", ["s1", "s3"])
    t.commit("t3", {"s1": 11, "s3": 6})  # above the bound: held, with s3
    t.begin("t4", ["s3"])
    t.commit("t4", {"s3": 7})  # after T3 on s3: held too
    assert t.published() == {"s1": 9, "s3": 5}
    t.commit("t1", {"s1": 10, "s2": 21})
    assert t.published() == {"s1": 11, "s2": 21, "s3": 7}


def test_exclusion_propagates_to_every_storage_of_a_held_transaction(t):
    t.begin("t1", ["s1"], {"s1": 10})
    t.begin("t2", ["s1", "s2"], {"s1": 0, "s2": 0})
    t.commit("t2", {"s1": 12, "s2": 5})  # above t1's bound on s1: held
    t.begin("t3", ["s2"], {"s2": 5})
    pub = t.commit("t3", {"s2": 6})
    # publishing s2=6 would keep t2 on s2 but not on s1
    assert pub.published == {}
    assert t.published() == {}
    t.abort("t1")
    assert t.published() == {"s1": 12, "s2": 6}


def test_without_bounds_a_busy_group_publishes_nothing(t):
    t.begin("t1", ["s1", "s2"])
    t.begin("t2", ["s1", "s3"], {"s1": 0, "s3": 0})
    t.commit("t2", {"s1": 9, "s3": 5})
    assert t.published() == {}


def test_bounds_must_name_the_storages(t):
    with pytest.raises(Refused, match="bounds"):
        t.begin("t1", ["s1", "s2"], {"s1": 1})
    assert t.in_flight() == {}


def test_busy_group_under_continuous_load_keeps_publishing(t):
    """Overlapping transactions never leave the group quiet; with bounds
    the published point still follows the commits."""
    last = {"s1": 0, "s2": 0, "s3": 0}
    t.begin("t0", ["s1", "s2"], dict(s1=0, s2=0))
    for i in range(1, 50):
        names = [["s1", "s2"], ["s2", "s3"], ["s1", "s3"]][i % 3]
        t.begin(f"t{i}", names, {s: last[s] for s in names})
        prev = f"t{i - 1}"
        prev_names = list(t.in_flight()[prev])
        tids = {}
        for s in prev_names:
            last[s] += 1
            tids[s] = last[s]
        t.commit(prev, tids)
    assert len(t.in_flight()) == 1  # never quiet
    assert min(t.published().values()) >= 30


# -- refusals leave the state unchanged -------------------------------------


def _snapshot(t: Tracker):
    return (t.published(), t.in_flight(), sorted(map(repr, t.groups())))


def test_commit_without_begin_refused(t):
    before = _snapshot(t)
    with pytest.raises(Refused, match="never began"):
        t.commit("nope", {"s1": 1})
    with pytest.raises(Refused, match="never began"):
        t.abort("nope")
    assert _snapshot(t) == before


def test_double_begin_refused(t):
    t.begin("t1", ["s1"])
    before = _snapshot(t)
    with pytest.raises(Refused, match="already in flight"):
        t.begin("t1", ["s2"])
    assert _snapshot(t) == before


def test_commit_with_other_storages_refused(t):
    t.begin("t1", ["s1", "s2"])
    before = _snapshot(t)
    with pytest.raises(Refused, match="BEGIN named"):
        t.commit("t1", {"s1": 1})
    with pytest.raises(Refused, match="BEGIN named"):
        t.commit("t1", {"s1": 1, "s3": 1})
    with pytest.raises(Refused, match="BEGIN named"):
        t.commit("t1", {"s1": 1, "s2": 1, "s3": 1})
    assert _snapshot(t) == before
    t.commit("t1", {"s1": 1, "s2": 1})
    assert t.published() == {"s1": 1, "s2": 1}


def test_empty_begin_refused(t):
    with pytest.raises(Refused):
        t.begin("t1", [])
    assert t.in_flight() == {}


def test_decrease_refused_and_reported(t):
    t.begin("t1", ["s1", "s2"])
    t.commit("t1", {"s1": 10, "s2": 10})
    t.begin("t2", ["s1", "s2"])
    pub = t.commit("t2", {"s1": 5, "s2": 11})
    assert pub.published == {"s2": 11}
    assert pub.decreases == (("s1", 5, 10),)
    assert t.published() == {"s1": 10, "s2": 11}


def test_ended_transaction_id_can_be_reused(t):
    t.begin("t1", ["s1"])
    t.commit("t1", {"s1": 1})
    with pytest.raises(Refused):
        t.commit("t1", {"s1": 2})
    t.begin("t1", ["s1"])
    t.commit("t1", {"s1": 2})
    assert t.published() == {"s1": 2}


# -- bootstrap --------------------------------------------------------------


def test_nothing_published_before_bootstrap():
    t = Tracker({"s1": 3})
    assert t.published() == {"s1": 3}  # reloaded state is served
    t.begin("t1", ["s1", "s2"])
    pub = t.commit("t1", {"s1": 4, "s2": 4})
    assert pub.published == {}
    assert t.published() == {"s1": 3}
    t.set_bootstrapped()
    t.begin("t2", ["s2"])
    t.commit("t2", {"s2": 5})
    # t1's values were dropped, not published late.
    assert t.published() == {"s1": 3, "s2": 5}


def test_bootstrap_transaction_holds_its_group():
    t = Tracker()
    t.begin("boot", ["s1", "s2"])
    t.begin("t1", ["s1"])
    t.commit("t1", {"s1": 1})
    t.set_bootstrapped()
    assert t.published() == {}
    t.commit("boot", {"s1": 2, "s2": 2})
    assert t.published() == {"s1": 2, "s2": 2}


def test_reloaded_state_never_moves_backward():
    t = Tracker({"s1": 100})
    t.set_bootstrapped()
    t.begin("t1", ["s1", "s2"])
    pub = t.commit("t1", {"s1": 50, "s2": 7})
    assert pub.decreases == (("s1", 50, 100),)
    assert t.published() == {"s1": 100, "s2": 7}


def test_late_single_storage_report_is_ignored_quietly(t):
    t.begin("t1", ["s1"])
    t.commit("t1", {"s1": 10})
    t.begin("late", ["s1"])
    pub = t.commit("late", {"s1": 9})  # finished before t1, reported after
    assert pub.published == {} and pub.decreases == ()
    assert t.published() == {"s1": 10}
    assert t.in_flight() == {} and t.groups() == []


# -- the property: a cut at the published TIDs never splits a transaction ---

STORAGES = ["s0", "s1", "s2", "s3"]


class TwoPhaseCommitModel(RuleBasedStateMachine):
    """Transactions over per-storage commit locks, reported as ZODB does.

    A transaction locks its storages in sorted order at vote (ZEO gives the
    TID then, increasing per storage), then finishes them one at a time,
    releasing each lock. The integration's contract: BEGIN reaches the
    tracker before the first finish; COMMIT after the last finish, with any
    delay; a client may crash between finishes and never report. A
    single-storage transaction may report BEGIN and COMMIT only after its
    finish. At every step, cutting every storage at its published TID must
    keep each transaction whole or drop it whole.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tracker = Tracker()
        self.tracker.set_bootstrapped()
        self.next_tid = {s: 1 for s in STORAGES}
        self.last_finished = {s: 0 for s in STORAGES}
        self.lock_owner: dict[str, int] = {}
        self.txns: dict[int, dict] = {}
        self.counter = 0
        self.last_published: dict[str, int] = {}

    def _txns(self, state):
        return [n for n, x in self.txns.items() if x["state"] == state]

    @precondition(lambda self: len(self._txns("new")) + len(self._txns("voted")) < 4)
    @rule(storages=st.sets(st.sampled_from(STORAGES), min_size=1, max_size=4),
          late=st.booleans())
    def start(self, storages, late):
        self.counter += 1
        late = late and len(storages) == 1
        self.txns[self.counter] = {
            "storages": sorted(storages), "state": "new", "tids": {},
            "finished": [], "late": late, "begun": False,
        }

    def _can_begin(self):
        return [n for n, x in self.txns.items()
                if not x["begun"] and not x["late"] and x["state"] in ("new", "voted")]

    def _can_vote(self):
        return [n for n in self._txns("new")
                if all(s not in self.lock_owner for s in self.txns[n]["storages"])]

    def _can_finish(self):
        return [n for n in self._txns("voted") + self._txns("finishing")
                if self.txns[n]["begun"] or self.txns[n]["late"]]

    @precondition(lambda self: self._can_begin())
    @rule(data=st.data(), with_bounds=st.booleans(), slack=st.integers(0, 3))
    def report_begin(self, data, with_bounds, slack):
        cands = self._can_begin()
        n = data.draw(st.sampled_from(cands))
        x = self.txns[n]
        bounds = None
        if with_bounds:
            # What the client knows: the storage's last finished TID (or
            # less, when its view lags): the commit will get a greater TID.
            bounds = {s: max(0, self.last_finished[s] - slack) for s in x["storages"]}
        self.tracker.begin(f"t{n}", x["storages"], bounds)
        x["begun"] = True

    @precondition(lambda self: self._can_vote())
    @rule(data=st.data())
    def vote(self, data):
        cands = self._can_vote()
        n = data.draw(st.sampled_from(cands))
        x = self.txns[n]
        for s in x["storages"]:
            self.lock_owner[s] = n
            x["tids"][s] = self.next_tid[s]
            self.next_tid[s] += 1
        x["state"] = "voted"

    @precondition(lambda self: self._txns("voted") + self._txns("new"))
    @rule(data=st.data())
    def abort_before_finish(self, data):
        cands = self._txns("voted") + self._txns("new")
        n = data.draw(st.sampled_from(cands))
        x = self.txns[n]
        for s in x["storages"]:
            if self.lock_owner.get(s) == n:
                del self.lock_owner[s]
        x["state"] = "aborted"
        if x["begun"]:
            self.tracker.abort(f"t{n}")

    @precondition(lambda self: self._can_finish())
    @rule(data=st.data())
    def finish_one(self, data):
        # The first finish requires a registered BEGIN (unless "late").
        cands = self._can_finish()
        n = data.draw(st.sampled_from(cands))
        x = self.txns[n]
        s = x["storages"][len(x["finished"])]
        x["finished"].append(s)
        self.last_finished[s] = max(self.last_finished[s], x["tids"][s])
        del self.lock_owner[s]
        x["state"] = "finished" if len(x["finished"]) == len(x["storages"]) else "finishing"

    @precondition(lambda self: self._txns("finishing"))
    @rule(data=st.data())
    def crash_mid_finish(self, data):
        cands = self._txns("finishing")
        n = data.draw(st.sampled_from(cands))
        x = self.txns[n]
        for s in x["storages"]:
            if self.lock_owner.get(s) == n:
                del self.lock_owner[s]  # the server aborts the rest
        x["state"] = "crashed"  # never reports again

    @precondition(lambda self: self._txns("finished"))
    @rule(data=st.data())
    def report_commit(self, data):
        cands = self._txns("finished")
        n = data.draw(st.sampled_from(cands))
        x = self.txns[n]
        if x["late"]:
            self.tracker.begin(f"t{n}", x["storages"])
        pub = self.tracker.commit(f"t{n}", x["tids"])
        x["state"] = "reported"
        if not x["late"]:
            # Reports that respect the BEGIN-before-finish contract never
            # make a published TID go down. (A late single-storage report
            # may: harmless, its TID is already below the cut.)
            assert pub.decreases == (), pub.decreases

    @invariant()
    def published_cut_is_coherent(self):
        published = self.tracker.published()
        for s, tid in self.last_published.items():
            assert published.get(s, 0) >= tid, "published TID decreased"
        self.last_published = published
        for n, x in self.txns.items():
            present = x["finished"]  # what the storages hold of it
            if not present:
                continue
            kept = [s for s in present if x["tids"][s] <= published.get(s, 0)]
            if not kept:
                continue
            # Kept somewhere: must be complete and kept everywhere.
            assert len(present) == len(x["storages"]), f"t{n} split: only in {present}, kept {kept}"
            assert kept == present, f"t{n} split by the cut: kept on {kept} of {present}"


TwoPhaseCommitModel.TestCase.settings = settings(
    max_examples=400, stateful_step_count=80, deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
test_two_phase_commit_model = TwoPhaseCommitModel.TestCase


def test_an_excluded_barrier_caps_its_storages_at_the_published_point():
    """Found by the torture test. After LOST reports, the daemon's re-check
    no-op is the first point known coherent on its storages: commits the
    tracker never heard of may lie below it. A busy group must not publish a
    point between the published TIDs and the barrier."""
    t = Tracker({"a": 10, "b": 10, "c": 10})
    t.set_bootstrapped()
    t.begin("freeze", ["a", "b", "c"])
    t.begin("V0a", ["a", "c"], {"a": 15, "c": 15})
    t.commit("V0a", {"a": 20, "c": 20})
    t.begin("V0b", ["b", "c"], {"b": 15, "c": 20})
    t.commit("V0b", {"b": 20, "c": 21})
    t.begin("V", ["a", "b", "c"], {"a": 20, "b": 20, "c": 21})
    pub = t.commit("freeze", {"a": 30, "b": 30, "c": 30}, barrier=True)
    # an unreported transaction at a=19, b=21 would be split by a=20, b=20
    assert pub.published == {}
    assert t.published() == {"a": 10, "b": 10, "c": 10}
    t.commit("V", {"a": 31, "b": 31, "c": 31})
    assert t.published() == {"a": 31, "b": 31, "c": 31}


def test_a_barrier_below_the_bounds_is_published_whole():
    t = Tracker({"a": 10, "b": 10})
    t.set_bootstrapped()
    t.begin("freeze", ["a", "b"])
    t.begin("V", ["a", "b"], {"a": 40, "b": 40})
    pub = t.commit("freeze", {"a": 30, "b": 30}, barrier=True)
    assert pub.published == {"a": 30, "b": 30}


def test_busy_groups_cost_a_constant_amount_per_commit(t):
    """A stuck transaction (a dead client, until the in-doubt check) keeps
    its group busy while commits pile up behind it; legacy transactions in
    flight do too. The work per commit must not grow with the pile."""
    n = 5000
    # stuck bounded transaction: everything after it on s0 is held
    t.begin("stuck", ["s0", "s1"], {"s0": 0, "s1": 0})
    last = {"s0": 1, "s1": 1, "s2": 1}
    for i in range(n):
        names = ["s0", "s1"] if i % 2 else ["s1", "s2"]
        t.begin(f"t{i}", names, {s: last[s] for s in names})
        for s in names:
            last[s] += 1
        t.commit(f"t{i}", {s: last[s] for s in names})
    assert t.published() == {}  # nothing can pass the stuck transaction
    assert t.scanned < 40 * n  # amortised: not n * n / 2
    # legacy (unbounded) transactions in flight: no scans at all
    before = t.scanned
    t.begin("legacy", ["s5", "s6"])
    for i in range(n):
        t.begin(f"l{i}", ["s5"], {"s5": i})
        t.commit(f"l{i}", {"s5": i + 1})
    assert t.scanned == before
    t.commit("legacy", {"s5": n + 1, "s6": 1})
    assert t.published() == {"s5": n + 1, "s6": 1}


def test_a_chain_of_exclusions_costs_linear_work(t):
    """Issue 9.15: each held transaction is excluded only through the next
    one (h_j is above no cap until h_{j+1}'s exclusion lowers its storage),
    and they are held in the opposite order. One pass over the held
    commits per exclusion found (the old fixed-point loop) made every
    partial publication quadratic: about 8 n^2 examinations here."""
    n = 1000
    c = [f"c{j}" for j in range(n + 2)]
    for j in range(n + 1):  # all in flight, each on (c_j, c_j+1)
        t.begin(f"h{j}", [c[j], c[j + 1]], {c[j]: 0, c[j + 1]: 0})
    for j in range(n):
        # above h_j+1's bound on c_j+1 (still in flight): excluded, and
        # with it, one by one, every earlier one
        t.commit(f"h{j}", {c[j]: 1, c[j + 1]: 2})
    assert t.published() == {}
    assert t.scanned < 60 * n  # linear (amortised), not 8 * n * n
    t.commit(f"h{n}", {c[n]: 1, c[n + 1]: 2})
    assert t.published() == {s: (2 if j else 1) for j, s in enumerate(c)}


class _FixpointTracker(Tracker):
    """The tracker with the partial publication as first written: one pass
    over the held commits per round until no exclusion is found (quadratic,
    but plainly the rule of the module doc): the reference below."""

    def _publish_below_bounds(self, group):
        from tidstorage.core.tracker import NOTHING, _Barrier, _newest

        published = self._published
        cap = self._caps(group)
        held = group.held
        excluded = [False] * len(held)
        changed = True
        while changed:
            changed = False
            for i, tids in enumerate(held):
                if excluded[i] or not any(t > cap.get(s, t) for s, t in tids.items()):
                    continue
                excluded[i] = changed = True
                for s, t in tids.items():
                    limit = published.get(s, -1) if type(tids) is _Barrier else t - 1
                    cap[s] = min(limit, cap.get(s, limit))
        included = [tids for i, tids in enumerate(held) if not excluded[i]]
        if not included:
            return NOTHING
        group.held = [tids for i, tids in enumerate(held) if excluded[i]]
        return self._publish(_newest(included))


_S5 = ["a", "b", "c", "d", "e"]


@settings(max_examples=500, deadline=None)
@given(
    initial=st.dictionaries(st.sampled_from(_S5), st.integers(0, 3)),
    flying=st.lists(st.tuples(st.sets(st.sampled_from(_S5), min_size=1, max_size=3),
                              st.none() | st.lists(st.integers(0, 9), min_size=3, max_size=3)),
                    min_size=1, max_size=4),
    held=st.lists(st.tuples(st.sets(st.sampled_from(_S5), min_size=1, max_size=3),
                            st.lists(st.integers(1, 10), min_size=3, max_size=3),
                            st.booleans()),
                  max_size=12),
)
def test_exclusions_match_the_plain_fixed_point(initial, flying, held):
    """Issue 9.15: the worklist gives exactly what the plain fixed point
    gives, for in-flight transactions with or without bounds and held
    commits and barriers in any order."""
    trackers = Tracker(initial), _FixpointTracker(initial)
    for tr in trackers:  # not bootstrapped: commits are only held
        for k, (members, tids, _) in enumerate(held):
            tr.begin(f"h{k}", sorted(members))
        for k, (members, values) in enumerate(flying):
            members = sorted(members)
            tr.begin(f"f{k}", members, None if values is None else dict(zip(members, values)))
        for k, (members, tids, barrier) in enumerate(held):
            tr.commit(f"h{k}", dict(zip(sorted(members), tids)), barrier=barrier)
        tr.set_bootstrapped()
    fast, plain = ({frozenset(g.storages): g for g in tr._group_of.values()} for tr in trackers)
    assert fast.keys() == plain.keys()
    for storages, group in fast.items():
        assert trackers[0]._publish_below_bounds(group) == trackers[1]._publish_below_bounds(
            plain[storages])
        assert group.held == plain[storages].held
    assert trackers[0].published() == trackers[1].published()


# -- the number of storage ids is bounded (issue 9.17) --------------------------


def test_new_storage_ids_beyond_the_limit_are_refused():
    """Every id the tracker hears of may end up published, and a DUMP reply
    must fit what clients accept: a BEGIN that would make it track more than
    MAX_STORAGES ids is refused, with the state unchanged."""
    from tidstorage.core.protocol import MAX_STORAGES

    t = Tracker({f"old{i}": 1 for i in range(MAX_STORAGES - 3)})
    t.set_bootstrapped()
    t.begin("t1", ["old0", "new1", "new2"])
    t.begin("t2", ["new3"])  # the last one
    before = _snapshot(t)
    with pytest.raises(Refused, match="limit 4096") as info:
        t.begin("t3", ["old1", "new4"])
    assert info.value.reason == "too-many-ids"
    assert _snapshot(t) == before
    t.begin("t4", ["old1", "new1"])  # known ids: fine
    t.abort("t2")  # new3 was never published: forgotten
    t.begin("t3", ["old1", "new4"])
    t.commit("t1", {"old0": 2, "new1": 2, "new2": 2})
    t.commit("t4", {"old1": 2, "new1": 3})
    t.commit("t3", {"old1": 3, "new4": 1})
    assert len(t.published()) == MAX_STORAGES
    with pytest.raises(Refused, match="new storage ids"):
        t.begin("t5", ["new5"])
    t.begin("t5", ["new4"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["begin", "commit", "abort", "observe"]),
                          st.integers(0, 5), st.sets(st.integers(0, 9), min_size=1, max_size=3),
                          st.integers(1, 5)),
                max_size=60))
def test_the_tracker_never_names_more_ids_than_the_limit(ops):
    import tidstorage.core.tracker as tracker_module

    limit = 5
    saved, tracker_module.MAX_STORAGES = tracker_module.MAX_STORAGES, limit
    try:
        t = Tracker({"s0": 1})
        t.set_bootstrapped()
        for kind, n, ids, tid in ops:
            members = sorted(f"s{i}" for i in ids)
            before = set(t.published()) | set(t._group_of)
            try:
                if kind == "begin":
                    t.begin(f"t{n}", members, {s: 0 for s in members} if n % 2 else None)
                elif kind == "commit":
                    mine = t.in_flight().get(f"t{n}", members)
                    t.commit(f"t{n}", {s: tid for s in mine})
                elif kind == "abort":
                    t.abort(f"t{n}")
                else:
                    t.observe_published({members[0]: tid})
            except Refused:
                pass
            named = set(t.published()) | set(t._group_of)
            assert t._unpublished == named - set(t.published())
            if kind == "begin" and named != before:  # (the gate's publications are not refused)
                assert len(named) <= limit
    finally:
        tracker_module.MAX_STORAGES = saved
