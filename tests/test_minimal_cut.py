"""Restore and repair cut only what they must (``[server] all_writers_stamp``).

With every writer stamping, the cut is raised from the TID log's point to
the stamps' point: every transaction above the log's point that is whole in
the files is kept (core/stamps.largest_cut_above, tools/cut.py).  Checked
here on the pure rule (against a brute-force search over every cut), then on
real repozo backups taken under load and on a real power-loss crash, against
the application data (the ``multi`` counter every all-storage transaction
increments in each storage, the ``single`` ones, the transactions kept).
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import sys

import pytest
from support.fsfixtures import Site, read_counters, run_cli, tree_state

from tidstorage.config import load_config
from tidstorage.core.stamps import Stamp, find_splits, largest_cut_above
from tidstorage.formats import filestorage
from tidstorage.tools.backup import run_backup


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


# -- the rule ----------------------------------------------------------------


def _st(i, *storages):
    return Stamp(f"T{i}", tuple(sorted(storages)))


def test_whole_transactions_above_the_floor_are_kept_split_ones_dropped():
    floor = {"a": 10, "b": 100}
    tails = {
        # 11: single; 12: whole on a+b; 13: its part on b is lost; 14: after it
        "a": [(5, _st(0, "a", "b")), (11, None), (12, _st(1, "a", "b")),
              (13, _st(2, "a", "b")), (14, None)],
        "b": [(101, _st(1, "a", "b")), (102, None)],
    }
    assert largest_cut_above(tails, floor) == {"a": 12, "b": 102}
    # nothing above the floor on b: a's stamped transactions over b are missing
    assert largest_cut_above({"a": tails["a"], "b": []}, floor) == {"a": 11, "b": 100}


def test_a_storage_outside_the_set_proves_nothing():
    tails = {"a": [(11, None), (12, _st(1, "a", "x"))], "b": []}
    assert largest_cut_above(tails, {"a": 10, "b": 0}) == {"a": 11, "b": 0}


def test_a_cascade_across_storages():
    # T1 a+b whole, then on b T2 (b+c) whose part on c is lost: b drops T2,
    # and a's T3 (a+b) after it on b goes too, so a is cut before T3.
    tails = {"a": [(1, _st(1, "a", "b")), (2, _st(3, "a", "b")), (3, None)],
             "b": [(1, _st(1, "a", "b")), (2, _st(2, "b", "c")), (3, _st(3, "a", "b"))],
             "c": [(1, None)]}
    assert largest_cut_above(tails, {"a": 0, "b": 0, "c": 0}) == {"a": 1, "b": 1, "c": 1}


def _brute_force(full, floor):
    """The largest coherent cut >= floor over the whole histories ``full``
    (every cut tried), or None if none is coherent."""
    choices = [[floor[s]] + [t for t, _ in full[s] if t > floor[s]] for s in sorted(full)]
    best = None
    for combo in itertools.product(*choices):
        cut = dict(zip(sorted(full), combo))
        if not find_splits(full, cut) and (best is None or all(
                cut[s] >= best[s] for s in cut)):
            best = cut
    return best


def test_the_rule_matches_a_brute_force_search_on_random_crashes():
    rnd = random.Random(7)
    ids = ("a", "b", "c")
    raised = dropped = 0
    for _round in range(300):
        full = {s: [] for s in ids}
        tid = {s: 0 for s in ids}
        for i in range(rnd.randint(1, 7)):
            where = rnd.sample(ids, rnd.choice((1, 1, 2, 3)))
            stamp = _st(i, *where) if len(where) > 1 else None
            for s in where:
                tid[s] += rnd.randint(1, 3)
                full[s].append((tid[s], stamp))
        # a coherent floor: the largest coherent cut under random bounds
        floor = {s: rnd.choice([0] + [t for t, _ in full[s]]) for s in ids}
        while (splits := find_splits(full, floor)):
            for sp in splits:
                for s, t in sp.present.items():
                    floor[s] = max([0] + [x for x, _ in full[s] if x < t])
        # the crash: each file loses a random tail above its floor
        end = {s: max(floor[s], rnd.choice([0] + [x for x, _ in full[s]])) for s in ids}
        files = {s: [(t, st) for t, st in full[s] if t <= end[s]] for s in ids}
        got = largest_cut_above({s: [x for x in files[s] if x[0] > floor[s]] for s in ids},
                                floor)
        assert got == _brute_force(files, floor), (full, files, floor)
        assert all(got[s] >= floor[s] for s in ids)
        raised += any(got[s] > floor[s] for s in ids)
        dropped += any(got[s] < end[s] for s in ids)
    assert raised > 60 and dropped > 30, (raised, dropped)  # both sides exercised


# -- a backup taken under load -------------------------------------------------


def _stamping(site: Site, on: bool = True) -> None:
    text = site.config.read_text()
    text = text.replace("[server]\n", f"[server]\nall_writers_stamp = {str(on).lower()}\n", 1)
    site.config.write_text(text)


def _kept(path) -> int:
    return sum(1 for h in filestorage.iter_forward(path) if h.finished)


@pytest.fixture(scope="module")
def loaded_backup(tmp_path_factory):
    """3 storages; the TID log lags (published, then 3 whole all-storage
    commits, 2 on a+b, 2 single ones on c, unpublished); the backup runs
    storage by storage while commits go on: after a is backed up, ``T1``
    commits on all three (in b and c's backup, not in a's: split) and one on
    b alone; after b, ``T2`` on b+c (in c's backup only: split)."""
    fsmod = sys.modules["ZODB.FileStorage.FileStorage"]
    saved, fsmod.fsync = fsmod.fsync, None
    root = tmp_path_factory.mktemp("minimal") / "site"
    site = Site(root, blobs=True)
    info = {}
    try:
        with site:
            for _ in range(4):
                site.commit(blob=True)
                site.commit(["c"])
            site.publish()
            info["published"] = {"multi": 4, "single_c": 4}
            for _ in range(3):
                site.commit(blob=True)
            for _ in range(2):
                site.commit(["a", "b"], blob=True)
                site.commit(["c"])

            def during(r):
                if r.id == "a":
                    info["T1"] = site.commit(stamp_id="T1-split")
                    site.commit(["b"])
                elif r.id == "b":
                    info["T2"] = site.commit(["b", "c"], stamp_id="T2-split")

            res = run_backup(load_config(site.config), jobs=1, after_storage=during)
            assert res.ok, res.storages
            site.commit()  # the live site moves on
    finally:
        fsmod.fsync = saved
    return root, info


@pytest.fixture
def loaded(loaded_backup, tmp_path):
    return Site(shutil.copytree(loaded_backup[0], tmp_path / "site")), loaded_backup[1]


def test_minimal_restore_of_a_backup_taken_under_load(loaded, tmp_path):
    site, info = loaded
    out_log, out_st = tmp_path / "log", tmp_path / "stamps"
    r = run_cli("restore", "-c", site.config, "--output-dir", out_log)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RAISED" not in r.stdout
    _stamping(site)
    r = run_cli("restore", "-c", site.config, "--output-dir", out_st)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cut RAISED to the stamps' point" in r.stdout and "verify: coherent" in r.stdout
    by_log = {s: read_counters(out_log / f"{s}.fs", out_log / f"{s}.blobs") for s in site.ids}
    by_st = {s: read_counters(out_st / f"{s}.fs", out_st / f"{s}.blobs") for s in site.ids}
    # the log's point: only what was published
    assert {s: c["multi"] for s, c in by_log.items()} == {s: 4 for s in site.ids}
    # the stamps' point: the 3 whole all-storage commits after it; not T1
    # (not in a's backup), nor T2 (not in b's)
    assert {s: c["multi"] for s, c in by_st.items()} == {s: 7 for s in site.ids}
    assert by_st["a"]["single"] == by_st["b"]["single"] == 2   # the a+b commits
    assert by_st["c"]["single"] == 4 + 2                      # its singles
    # b's single commit after T1 goes with T1 (a cut keeps a prefix); every blob of a kept transaction is there, none of a dropped one
    for s in site.ids:
        assert len(by_st[s]["blobs"]) == 4 + 3 + (2 if s in "ab" else 0)
        assert filestorage.last_tid(out_st / f"{s}.fs") < info["T1"][s]
    # transactions kept: the log's point + what the stamps prove whole
    kept_log = {s: _kept(out_log / f"{s}.fs") for s in site.ids}
    kept_st = {s: _kept(out_st / f"{s}.fs") for s in site.ids}
    assert {s: kept_st[s] - kept_log[s] for s in site.ids} == {"a": 5, "b": 5, "c": 5}
    assert run_cli("verify", *[f"--files={out_st / f'{s}.fs'}" for s in site.ids]
                   ).returncode == 0


def test_restore_dry_run_prints_the_plan_and_changes_nothing(loaded, tmp_path):
    site, info = loaded
    _stamping(site)
    before = tree_state(site.root)
    r = run_cli("restore", "-c", site.config, "--dry-run", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_state(site.root) == before
    assert not list(site.root.rglob(".tidstorage-dry-run-*"))
    plan = json.loads(r.stdout)
    assert plan["command"] == "restore" and plan["rule"] == "stamps"
    assert any("would refuse" in n and "exists (use --force" in n for n in plan["notes"])
    st = plan["storages"]
    assert {s: p["rule"] for s, p in st.items()} == {s: "stamps" for s in site.ids}
    assert {s: p["path"] for s, p in st.items()} == {s: str(site.data_fs(s)) for s in site.ids}
    # a: nothing dropped (T1 was not in its backup); b: T1 and its single
    # (T2 came after b's backup); c: T1, T2 (not in b's backup)
    assert {s: p["dropped"] for s, p in st.items()} == {"a": 0, "b": 2, "c": 2}
    assert {s: p["log_dropped"] for s, p in st.items()} == {"a": 5, "b": 7, "c": 7}
    b = st["b"]["transactions"]
    assert [t["stamp"] for t in b] == ["T1-split", None]
    assert b[0]["reason"] == "split: no part in a" and b[0]["tid"] == info["T1"]["b"]
    assert b[1]["reason"].startswith("after a dropped transaction")
    c = st["c"]["transactions"]
    assert [(t["stamp"], t["reason"]) for t in c] == [
        ("T1-split", "split: no part in a"), ("T2-split", "split: no part in b")]
    # the plan is what the restore does
    out = tmp_path / "out"
    r = run_cli("restore", "-c", site.config, "--output-dir", out)
    assert r.returncode == 0, r.stderr
    for s in site.ids:
        assert (out / f"{s}.fs").stat().st_size == st[s]["offset"]
    # the text form
    r = run_cli("restore", "-c", site.config, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "restore plan (dry run: nothing is changed)" in r.stdout
    assert "total: 4 transaction(s) dropped (19 at the TID log's point)" in r.stdout
    assert tree_state(site.root) == before


# -- a power-loss crash ------------------------------------------------------


def _power_loss_site(tmp_path, *, stamping=True):
    """a, b, c; published; then 2 all-storage commits, one on a+b, one on c
    alone, unpublished; then ``T`` commits on all three and the power goes:
    c's Data.fs ends in the middle of T's record (its fsync never made it),
    a and b hold T."""
    site = Site(tmp_path / "site")
    _stamping(site, stamping)
    with site:
        for _ in range(3):
            site.commit(blob=True)
            site.commit(["a"])
        site.publish()
        site.commit(blob=True)
        site.commit(blob=True)
        site.commit(["a", "b"])
        site.commit(["c"], blob=True)
        t = site.commit(blob=True, stamp_id="T-lost")
    c = site.data_fs("c")
    with open(c, "r+b") as f:
        f.truncate(c.stat().st_size - 25)
    c.with_name("Data.fs.index").unlink()
    return site, t


@pytest.mark.parametrize("stamping", [True, False])
def test_minimal_repair_of_a_power_loss_drops_only_what_is_split(tmp_path, stamping):
    site, t = _power_loss_site(tmp_path, stamping=stamping)
    kept_before = {s: _kept(site.data_fs(s)) for s in site.ids}
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: coherent" in r.stdout
    counts = {s: read_counters(site.data_fs(s), site.blob_dir(s)) for s in site.ids}
    kept = {s: _kept(site.data_fs(s)) for s in site.ids}
    if stamping:
        assert "cut RAISED" in r.stdout
        # only T goes: it is split (lost on c); everything before it stays
        assert {s: c["multi"] for s, c in counts.items()} == {s: 5 for s in site.ids}
        assert counts["a"]["single"] == 3 + 1 and counts["b"]["single"] == 1
        assert counts["c"]["single"] == 1
        assert kept == {"a": kept_before["a"] - 1, "b": kept_before["b"] - 1,
                        "c": kept_before["c"]}
        assert len(counts["c"]["blobs"]) == 3 + 2 + 1
    else:
        assert "RAISED" not in r.stdout
        assert {s: c["multi"] for s, c in counts.items()} == {s: 3 for s in site.ids}
        assert kept == {"a": kept_before["a"] - 4, "b": kept_before["b"] - 4,
                        "c": kept_before["c"] - 3}
    for s in site.ids:
        assert filestorage.last_tid(site.data_fs(s)) < t.get(s, 1 << 64)
    assert run_cli("verify", "-c", site.config).returncode == 0
    with site:  # the repaired set opens and commits
        site.commit()


def test_repair_dry_run_prints_the_plan_and_changes_nothing(tmp_path):
    site, t = _power_loss_site(tmp_path)
    before = tree_state(site.root)
    r = run_cli("repair", "-c", site.config, "--dry-run", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_state(site.root) == before
    assert not list(site.root.rglob("*.before-repair")) and \
        not list(site.root.rglob("*.repair-plan"))
    plan = json.loads(r.stdout)
    assert plan["command"] == "repair" and plan["all_writers_stamp"] is True
    st = plan["storages"]
    assert {s: p["dropped"] for s, p in st.items()} == {"a": 1, "b": 1, "c": 1}
    assert {s: p["log_dropped"] for s, p in st.items()} == {"a": 4, "b": 4, "c": 4}
    for s in "ab":
        [txn] = st[s]["transactions"]
        assert txn["stamp"] == "T-lost" and txn["reason"] == "split: no part in c"
        assert txn["tid"] == t[s] and st[s]["rule"] == "stamps"
    assert st["c"]["transactions"] == []   # its torn tail: counted, not a transaction
    assert any("blob file(s) newer than the cut would be moved" in n for n in plan["notes"])
    # the text form says the same; then the real repair does what it said
    r = run_cli("repair", "-c", site.config, "--dry-run")
    assert r.returncode == 0 and "repair plan (dry run" in r.stdout
    assert "split: no part in c" in r.stdout
    assert tree_state(site.root) == before
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    for s in site.ids:
        assert site.data_fs(s).stat().st_size == st[s]["offset"]


def test_a_log_that_splits_is_still_lowered_with_the_stamps_rule(tmp_path):
    """A wrong TID log publishing T (which c lost): the stamp check lowers a
    and b below T as without the stamps' rule; nothing above is whole."""
    import time

    from tidstorage.formats import tidlog

    site, t = _power_loss_site(tmp_path)
    with open(site.tidlog, "ab") as f:
        f.write(tidlog.encode_record(time.time(), tidlog.KIND_FULL, t))
    r = run_cli("repair", "-c", site.config, "--dry-run", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    st = json.loads(r.stdout)["storages"]
    assert {s: p["rule"] for s, p in st.items()} == {"a": "lowered", "b": "lowered",
                                                     "c": "log"}
    assert [x["tid"] for x in st["a"]["transactions"]] == [t["a"]]
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 0 and "verify: coherent" in r.stdout, r.stdout + r.stderr
    counts = {s: read_counters(site.data_fs(s), site.blob_dir(s)) for s in site.ids}
    assert {s: c["multi"] for s, c in counts.items()} == {s: 5 for s in site.ids}


@pytest.mark.parametrize("value, ok", [("true", True), ("false", True), ('"yes"', False)])
def test_the_config_key(tmp_path, value, ok):
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    text = site.config.read_text()
    site.config.write_text(text.replace("[server]\n", f"[server]\nall_writers_stamp = {value}\n"))
    if ok:
        assert load_config(site.config).server.all_writers_stamp is (value == "true")
    else:
        r = run_cli("repair", "-c", site.config, "--dry-run")
        assert r.returncode == 2 and "server.all_writers_stamp" in r.stderr
    site.config.write_text(text)
    assert load_config(site.config).server.all_writers_stamp is False  # the default
