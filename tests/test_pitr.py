"""tidstorage restore --at / --list-points: point-in-time restore from real
repozo repositories.

The shared backup set (built once, copied for each test), storages a and b
with blobs; P1..P5 are published points, S1..S5 the application data then:

* P1 (a multi-storage commit with blobs, one on a), then backup B1 (full);
* P2 (multi), P3 (one on b), then X: a stamped multi-storage commit that
  is never published; then backup B2 (incremental: holds P2, P3 and X);
* P4 (multi), then backup B3 (--full);
* P5 (multi): only in the live TID log, in no backup.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys

import pytest
from support.fsfixtures import Site, read_counters, run_cli

from tidstorage.config import load_config
from tidstorage.core.tids import tid_seconds
from tidstorage.tools.backup import run_backup


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


def _state(site):
    out = {}
    for s in site.ids:
        root = site.root_of(s)
        out[s] = {"multi": root.get("multi", 0), "single": root.get("single", 0),
                  "blobs": dict(site.blob_data[s])}
    return out


def _first(tids: dict) -> float:
    return min(tid_seconds(t) for t in tids.values())


def _last(tids: dict) -> float:
    return max(tid_seconds(t) for t in tids.values())


@pytest.fixture(scope="module")
def pitr_set(tmp_path_factory):
    fsmod = sys.modules["ZODB.FileStorage.FileStorage"]
    saved, fsmod.fsync = fsmod.fsync, None
    root = tmp_path_factory.mktemp("pitr") / "site"
    site = Site(root, ids=("a", "b"))
    info = {"P": {}, "S": {}, "commits": {}, "B": {}}

    def point(k):
        info["P"][k] = site.publish()
        info["S"][k] = _state(site)

    def backup(k, **kw):
        r = run_backup(load_config(site.config), **kw)
        assert r.ok, r.storages
        info["B"][k] = r.timestamp
        return r

    try:
        with site:
            c = info["commits"]
            c[1] = site.commit(blob=True)
            site.commit(["a"], blob=True)
            point(1)
            r = backup(1)
            assert {s: x.mode for s, x in r.storages.items()} == {"a": "full", "b": "full"}
            c[2] = site.commit(blob=True)
            point(2)
            c[3] = site.commit(["b"], blob=True)
            point(3)
            c["X"] = site.commit(blob=True, stamp_id="X-unpublished")
            info["S"]["X"] = _state(site)
            r = backup(2)
            assert {s: x.mode for s, x in r.storages.items()} == \
                {"a": "incremental", "b": "incremental"}
            c[4] = site.commit()
            point(4)
            backup(3, full=True)
            c[5] = site.commit()
            point(5)
    finally:
        fsmod.fsync = saved
    return root, info


@pytest.fixture
def copy(pitr_set, tmp_path):
    root, info = pitr_set
    dest = tmp_path / "site"
    shutil.copytree(root, dest)
    return Site(dest, ids=("a", "b")), info


def _iso(seconds: float, tz=datetime.timezone.utc) -> str:
    return datetime.datetime.fromtimestamp(seconds, tz).isoformat()


def _between(earlier: dict, later: dict) -> float:
    """A time after every TID of ``earlier`` and before every one of ``later``."""
    lo, hi = _last(earlier), _first(later)
    assert hi > lo
    return (lo + hi) / 2


def _restored(site, out):
    return {s: read_counters(out / f"{s}.fs", out / f"{s}.blobs") for s in site.ids}


def _points(site) -> dict:
    r = run_cli("restore", "-c", site.config, "--list-points", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _id_of(listing, tids) -> str:
    [p] = [p for p in listing["points"] if p["tids"] == tids]
    return p["id"]


def test_at_times_between_backups(copy, tmp_path):
    site, info = copy
    P, S, c, B = info["P"], info["S"], info["commits"], info["B"]
    cases = [
        ("P1", _iso(_between(P[1], c[2])), S[1], B[1]),
        # an offset: the same kind of instant, written in another zone
        ("P2", _iso(_between(P[2], c[3]), datetime.timezone(datetime.timedelta(hours=2))),
         S[2], B[2]),
        # naive: UTC
        ("P3", _iso(_between(P[3], c["X"])).removesuffix("+00:00"), S[3], B[2]),
        # X was never published: without the stamps' rule, P3 is the point
        ("P3 (X unpublished)", _iso(_between(c["X"], c[4])), S[3], B[2]),
        ("P4", _iso(_between(P[4], c[5])), S[4], B[3]),
    ]
    for n, (name, at, expected, backup) in enumerate(cases):
        out = tmp_path / f"out{n}"
        r = run_cli("restore", "-c", site.config, "--at", at, "--output-dir", out)
        assert r.returncode == 0, (name, r.stdout, r.stderr)
        assert f"restoring backup {backup}" in r.stdout, (name, r.stdout)
        assert "verify: coherent" in r.stdout, (name, r.stdout)
        got = _restored(site, out)
        assert got == expected, name
        # the restore cut the files exactly at the point
        assert got["a"]["multi"] == got["b"]["multi"]


def test_point_ids_and_latest(copy, tmp_path):
    site, info = copy
    P, S = info["P"], info["S"]
    listing = _points(site)
    pid = _id_of(listing, P[2])
    r = run_cli("restore", "-c", site.config, "--at", pid, "--output-dir", tmp_path / "p2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _restored(site, tmp_path / "p2") == S[2]
    r = run_cli("restore", "-c", site.config, "--at", "latest", "--output-dir",
                tmp_path / "latest")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _restored(site, tmp_path / "latest") == S[4]
    # the same as a plain restore of the latest backup
    r = run_cli("restore", "-c", site.config, "--output-dir", tmp_path / "plain")
    assert r.returncode == 0, r.stderr
    assert _restored(site, tmp_path / "plain") == S[4]


def test_list_points(copy):
    site, info = copy
    P, B = info["P"], info["B"]
    listing = _points(site)
    backups = listing["backups"]
    assert [b["timestamp"] for b in backups] == [B[1], B[2], B[3]]
    assert [{s: x["mode"] for s, x in b["storages"].items()} for b in backups] == [
        {"a": "full", "b": "full"}, {"a": "incremental", "b": "incremental"},
        {"a": "full", "b": "full"}]
    assert all(x["bytes"] > 0 for b in backups for x in b["storages"].values())
    # each backup's files end with the last transaction it holds
    assert backups[1]["storages"]["a"]["last_tid"] == info["commits"]["X"]["a"]
    by_tids = {tuple(sorted(p["tids"].items())): p for p in listing["points"]}
    owner = {k: by_tids[tuple(sorted(P[k].items()))]["backup"] for k in P}
    assert owner == {1: B[1], 2: B[2], 3: B[2], 4: B[3], 5: None}
    assert [(r["restorable"], r["points"]) for r in listing["ranges"]] == [(True, 4),
                                                                          (False, 1)]
    text = run_cli("restore", "-c", site.config, "--list-points")
    assert text.returncode == 0, text.stderr
    assert "GAP:" in text.stdout and "4 restorable" in text.stdout
    assert f"{B[2]}: a incremental" in text.stdout


def test_uncoverable_point_names_the_nearest(copy, tmp_path):
    site, info = copy
    P, c = info["P"], info["commits"]
    listing = _points(site)
    p4, p1 = _id_of(listing, P[4]), _id_of(listing, P[1])
    # P5 is only in the live TID log: no backup holds it
    r = run_cli("restore", "-c", site.config, "--at", _iso(_last(P[5]) + 1),
                "--output-dir", tmp_path / "out")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot be restored" in r.stderr
    assert f"before: {p4}" in r.stderr and "after: none" in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # before the first point
    r = run_cli("restore", "-c", site.config, "--at", _iso(_first(c[1]) - 60),
                "--output-dir", tmp_path / "out")
    assert r.returncode == 1
    assert "no coherent point at or before" in r.stderr and p1 in r.stderr
    # an id that is no point
    r = run_cli("restore", "-c", site.config, "--at", "2000-01-01-00-00-00:1")
    assert r.returncode == 1 and "no point 2000-01-01-00-00-00:1" in r.stderr


def test_usage_errors(copy):
    site, _ = copy
    r = run_cli("restore", "-c", site.config, "--at", "latest", "--date", "2026-01-01")
    assert r.returncode == 2 and "--at" in r.stderr
    r = run_cli("restore", "-c", site.config, "--at", "yesterday-ish")
    assert r.returncode == 2 and "bad --at" in r.stderr
    r = run_cli("restore", "-c", site.config, "--list-points", "--at", "latest")
    assert r.returncode == 2


def test_stamps_keep_whole_transactions_up_to_time(copy, tmp_path):
    site, info = copy
    S, c, B = info["S"], info["commits"], info["B"]
    text = site.config.read_text()
    site.config.write_text(text.replace("[server]\n", "[server]\nall_writers_stamp = true\n", 1))
    # before X: the recovered files are cut at TIME first, X is not kept
    r = run_cli("restore", "-c", site.config, "--at", _iso(_between(c[3], c["X"])),
                "--output-dir", tmp_path / "before")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"restoring backup {B[2]}" in r.stdout
    assert _restored(site, tmp_path / "before") == S[3]
    # after X (whole in every storage, never published): the stamps keep it
    at = _iso(_between(c["X"], c[4]))
    r = run_cli("restore", "-c", site.config, "--at", at, "--output-dir", tmp_path / "after")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RAISED" in r.stdout
    assert _restored(site, tmp_path / "after") == S["X"]
    # the plan: nothing written
    r = run_cli("restore", "-c", site.config, "--at", at, "--dry-run", "--json",
                "--output-dir", tmp_path / "dry")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["context"]["at"] == at and "stamps_bound" in plan["context"]
    assert {s: p["cut_tid"] for s, p in plan["storages"].items()} == c["X"]
    assert not (tmp_path / "dry").exists()


def test_gzipped_chain_and_a_damaged_backup(tmp_path):
    """repozo -z files: how far each chain goes is read through gzip; a
    backup whose file is gone restores nothing, and says why."""
    site = Site(tmp_path / "gz", ids=("a", "b"), blobs=False)
    states, stamps = [], []
    with site:
        for _ in range(2):
            site.commit()
            site.commit(["a"])
            tids = site.publish()
            states.append(_state(site))
            r = run_backup(load_config(site.config), gzip=True)
            assert r.ok, r.storages
            stamps.append(r.timestamp)
        after = site.commit()
    listing = _points(site)
    last_a = [b["storages"]["a"]["last_tid"] for b in listing["backups"]]
    assert last_a[1] == tids["a"] and last_a[0] < tids["a"]
    assert all(f.endswith("z") for b in listing["backups"]
               for f in b["storages"]["a"]["files"] if not f.endswith(".index"))
    at = _iso(_between(tids, after))
    r = run_cli("restore", "-c", site.config, "--at", at, "--output-dir", tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {s: read_counters(tmp_path / "out" / f"{s}.fs")["single"] for s in site.ids} == \
        {s: states[1][s]["single"] for s in site.ids}
    # the second backup's incremental file of a is lost
    [delta] = [f for f in listing["backups"][1]["storages"]["a"]["files"]
               if f.endswith(".deltafsz")]
    (site.repo("a") / delta).unlink()
    text = run_cli("restore", "-c", site.config, "--list-points")
    assert f"{stamps[1]}: " in text.stdout and "NOT RESTORABLE" in text.stdout
    r = run_cli("restore", "-c", site.config, "--at", at, "--output-dir", tmp_path / "out2")
    assert r.returncode == 1 and "cannot be restored" in r.stderr
    assert f"before: {listing['points'][0]['id']}" in r.stderr


def test_a_chain_after_a_pack_holds_no_older_point(tmp_path):
    """A full backup taken after a pack keeps only the revisions current at
    the pack: cutting it at an older point gives a wrong state.  Here the
    pre-pack chain is removed by ``tidstorage cleanup --keep 1`` (the real
    tool), so only the post-pack chain is left: a point before the pack is
    refused, naming the pack; a point after it restores exactly."""
    import ZODB
    from ZODB.FileStorage import FileStorage

    site = Site(tmp_path / "packed", ids=("a", "b"), blobs=False)
    states = {}
    with site:
        site.commit()
        site.commit(["a"])
        p1 = site.publish()
        states[1] = _state(site)
        assert run_backup(load_config(site.config)).ok
        c2 = site.commit()
        p2 = site.publish()
        states[2] = _state(site)
        c3 = site.commit(["b"])
        p3 = site.publish()
    # the pack, with the site stopped: every transaction so far is packed
    for s in site.ids:
        db = ZODB.DB(FileStorage(str(site.data_fs(s))))
        try:
            db.pack()
        finally:
            db.close()
    with site:
        c4 = site.commit()
        p4 = site.publish()
        states[4] = _state(site)
        r = run_backup(load_config(site.config), full=True)
        assert r.ok and {s: x.mode for s, x in r.storages.items()} == {"a": "full", "b": "full"}
        after = site.commit()
    cleaned = run_cli("cleanup", "-c", site.config, "--keep", "1")
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    for s in site.ids:  # the pre-pack chain is gone
        assert len([f for f in os.listdir(site.repo(s)) if f.endswith(".fs")]) == 1
    listing = _points(site)
    [b] = listing["backups"]
    assert {s: x["pack_tid"] for s, x in b["storages"].items()} == \
        {"a": c2["a"], "b": c3["b"]}  # the last transaction each kept
    owner = {k: next(p["backup"] for p in listing["points"] if p["tids"] == tids)
             for k, tids in {1: p1, 2: p2, 3: p3, 4: p4}.items()}
    assert owner == {1: None, 2: None, 3: None, 4: b["timestamp"]}
    text = run_cli("restore", "-c", site.config, "--list-points")
    assert text.returncode == 0, text.stderr
    assert "before the pack of a at" in text.stdout, text.stdout
    # before the pack: refused, the pack named, the nearest restorable point too
    p4_id = _id_of(listing, p4)
    # (cutting the packed files there would give empty storages at P1, and
    # at P2 a split transaction)
    for n, at in enumerate([_iso(_between(p1, c2)), _iso(_between(c2, c3))]):
        out = tmp_path / f"before{n}"
        r = run_cli("restore", "-c", site.config, "--at", at, "--output-dir", out)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "before the pack of" in r.stderr and f"after: {p4_id}" in r.stderr, r.stderr
        assert not out.exists() or not any(out.iterdir())
    # after the pack: the application data of then
    r = run_cli("restore", "-c", site.config, "--at", _iso(_between(c4, after)),
                "--output-dir", tmp_path / "after")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: coherent" in r.stdout
    got = {s: read_counters(tmp_path / "after" / f"{s}.fs") for s in site.ids}
    assert got == {s: {**states[4][s], "blobs": {}} for s in site.ids}

