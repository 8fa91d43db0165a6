"""The whole protocol under seeded fault schedules (see ``simulation.py``).

``test_simulation_holds`` runs :data:`SEEDS` seeds: every published point
keeps every transaction whole or drops it whole, the point reaches the
files' largest coherent point once the faults stop, and no SPLIT is
declared for a transaction that completes. A failing seed replays exactly:
``python bench/simulate.py --seed N --trace``.

The other tests put back, one at a time, the mechanisms the recovery paths
relied on before (reports alone, a verdict without its proof, a split
guessed by comparing TIDs across storages, one commit per configured
section): the simulation must find a violation for each within a few
hundred seeds, which shows it can see the failures those fixes prevent.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from unittest import mock

import pytest
from support import simulation as sim

from tidstorage.core import coordinator as co
from tidstorage.core import gate as gate_mod
#: Seeds run by the suite (``bench/simulate.py`` runs more).
SEEDS = int(os.environ.get("TIDSTORAGE_SIM_SEEDS", "2000"))
CHUNK = 50


@pytest.fixture(autouse=True)
def _logging_back_on():
    """The simulation silences logging (logging.disable, process-wide):
    turn it back on, or every later test in this process (a pytest-xdist
    worker runs other files after this one) logs nothing."""
    yield
    logging.disable(logging.NOTSET)


def _chunk(start: int) -> list[tuple[int, str]]:
    logging.disable(logging.CRITICAL)
    bad = []
    for seed in range(start, min(start + CHUNK, SEEDS)):
        result = sim.run(seed)
        if not result.ok:
            bad.append((seed, result.problem))
    return bad


def test_simulation_holds():
    workers = min(os.cpu_count() or 1, 4)
    starts = range(0, SEEDS, CHUNK)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_chunk, starts))
    else:
        results = [_chunk(s) for s in starts]
    bad = [b for chunk in results for b in chunk]
    assert not bad, "\n".join(
        f"seed {seed}: {problem}\n  replay: python bench/simulate.py --seed {seed} --trace"
        for seed, problem in bad[:10])


def test_a_seed_replays_exactly():
    logging.disable(logging.CRITICAL)
    one = sim.run(7, trace=True)
    two = sim.run(7, trace=True)
    assert one.trace == two.trace and one.stats == two.stats
    assert one.stats["transactions"] > 20 and one.stats["publications"] > 5


def _first_violation(limit: int, predicate=None) -> tuple[int, str] | None:
    logging.disable(logging.CRITICAL)
    for seed in range(limit):
        result = sim.run(seed)
        if not result.ok and (predicate is None or predicate(result.problem)):
            return seed, result.problem
    return None


# -- the mechanisms of before, put back --------------------------------------------


@contextmanager
def reports_only():
    """The daemon before the gate: it publishes what the reports allow."""
    original_begin = co.Coordinator._begin

    def begin(self, peer, txn, storages, bounds):
        kinds, self.kinds = self.kinds, {s: None for s in self.kinds}
        try:
            return original_begin(self, peer, txn, storages, bounds)
        finally:
            self.kinds = kinds

    def publish(self):
        self._dirty = False
        tracker = self.tracker
        if not tracker.bootstrapped:
            return
        wanted = tracker.published()
        published = self.gate.published
        changed = {s: t for s, t in wanted.items() if t > published.get(s, -1)}
        if changed:
            published.update(changed)
            self._actions.append(co.Publish(changed))

    with mock.patch.object(co.Coordinator, "_begin", begin), \
            mock.patch.object(co.Coordinator, "_publish", publish):
        yield


def test_reports_alone_publish_splits():
    """Scenarios 1 and 4 of the issue (a lost or unconfirmed BEGIN, a daemon
    restart while a transaction is between its finishes): without the gate,
    published points split transactions."""
    with reports_only():
        found = _first_violation(200, lambda p: "splits" in p)
    assert found is not None, "reports alone never published a split"


def test_a_verdict_without_its_proof_declares_false_splits():
    """Scenario 6: stamps read without a no-op (or an owner check) first."""

    def prove(self, res, storage):
        self._proven(res.txn, storage)

    with mock.patch.object(co.Coordinator, "_prove", prove):
        found = _first_violation(400, lambda p: "false SPLIT" in p)
    assert found is not None, "an unproven verdict never declared a false split"


def test_guessing_missing_parts_from_tids_declares_false_splits():
    """Scenarios 2 and 5: a part is "missing" because another storage's TIDs
    are past the transaction's (clocks differ, locks delay)."""

    def progress(self, res):
        if self._resolutions.get(res.txn) is not res:
            return
        if any(self._scan_done[s] < seq for s, seq in res.reads.items()):
            return
        known = self.gate.known(res.txn)
        parts = dict(known.parts) if known is not None else {}
        missing = set(res.storages) - set(parts)
        if parts and missing and all(
                self.gate.verified[m] >= min(parts.values()) for m in missing):
            return self._verdict(res, parts)
        return original(self, res)

    original = co.Coordinator._progress
    with mock.patch.object(co.Coordinator, "_progress", progress):
        found = _first_violation(400, lambda p: "false SPLIT" in p)
    assert found is not None, "comparing TIDs across storages never declared a false split"


def test_one_commit_per_section_publishes_splits(monkeypatch):
    """Scenario 3: two sections naming one daemon differently made one
    transaction two unstamped single-storage commits."""
    monkeypatch.setattr(sim.World, "mutant_sections", True)

    def draw(rng):
        params = original(rng)
        params.sections = True
        return params

    original = sim.draw
    monkeypatch.setattr(sim, "draw", draw)
    found = _first_violation(200, lambda p: "splits" in p)
    assert found is not None, "per-section commits never published a split"


def test_the_gate_is_what_keeps_a_point_coherent(monkeypatch):
    """Without the gate's rule (R3), the published point splits transactions."""
    monkeypatch.setattr(gate_mod.Gate, "_lower", lambda self, cut: [])
    found = _first_violation(200, lambda p: "splits" in p)
    assert found is not None


@pytest.mark.parametrize("seed", [3, 11])
def test_trace_names_the_faults(seed):
    logging.disable(logging.CRITICAL)
    result = sim.run(seed, trace=True)
    assert result.ok, result.problem
    assert any("publish" in line for line in result.trace)
