"""tidstorage restore: real repozo repositories holding a split transaction.

The shared backup set (built once, copied for each test):

* backup 1 (full): a coherent state, ``multi == M1`` everywhere;
* backup 2 (incremental, storages one at a time): the TID log is copied,
  ``a`` is backed up, then transaction ``T`` commits on a, b and c (with a
  blob in each), then ``b`` and ``c`` are backed up.  The repozo files of
  backup 2 hold ``T`` in b and c but not in a: a split, which the cut at the
  TID log copy (taken before ``T``) removes.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from support.fsfixtures import (
    Site,
    digest,
    fsize_limit,
    read_counters,
    run_cli,
    tree_state,
)

from tidstorage.config import load_config
from tidstorage.formats import filestorage
from tidstorage.formats.repozo import format_timestamp, timestamp_seconds
from tidstorage.tools import verify
from tidstorage.tools.backup import run_backup
from tidstorage.tools.restore import run_restore


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


@pytest.fixture(scope="module")
def backup_set(tmp_path_factory):
    fsmod = sys.modules["ZODB.FileStorage.FileStorage"]
    saved, fsmod.fsync = fsmod.fsync, None
    root = tmp_path_factory.mktemp("restore") / "site"
    site = Site(root)
    info = {}
    try:
        with site:
            for _ in range(3):
                site.commit(blob=True)
                site.commit(["b"], blob=True)
            site.publish()
            r1 = run_backup(load_config(site.config))
            assert r1.ok, r1.storages
            info["ts1"], info["M1"] = r1.timestamp, 3
            for _ in range(2):
                site.commit(blob=True)
                site.commit(["a", "c"], blob=True)
            site.publish()
            info["M2"] = 5
            info["blobs_before_T"] = {s: dict(site.blob_data[s]) for s in site.ids}

            def after(r):
                if r.id == "a":
                    info["T"] = site.commit(blob=True, stamp_id="T-split")
                    site.publish()

            r2 = run_backup(load_config(site.config), jobs=1, after_storage=after)
            assert r2.ok and {s: x.mode for s, x in r2.storages.items()} == \
                {"a": "incremental", "b": "incremental", "c": "incremental"}
            info["ts2"] = r2.timestamp
            site.commit()   # the live site moves on
            site.publish()
    finally:
        fsmod.fsync = saved
    return root, info


@pytest.fixture
def copy(backup_set, tmp_path):
    root, info = backup_set
    dest = tmp_path / "site"
    shutil.copytree(root, dest)
    site = Site(dest)
    return site, info


def _wipe_live(site):
    for s in site.ids:
        shutil.rmtree(site.root / "var" / s)


def _counters(site, paths=None):
    out = {}
    for s in site.ids:
        path, blob_dir = (paths[s] if paths else (site.data_fs(s), site.blob_dir(s)))
        out[s] = read_counters(path, blob_dir)
    return out


def test_split_backup_is_restored_coherent(copy, tmp_path):
    site, info = copy
    # Without the cut, the backup set is split: T is in b and c, not in a.
    r = run_cli("restore", "-c", site.config, "--no-cut", "--output-dir", tmp_path / "raw")
    assert r.returncode == 0, r.stderr
    assert "restored without cutting: the files hold split transactions" in r.stdout
    raw = run_cli("verify", *[f"--files={tmp_path / 'raw' / f'{s}.fs'}" for s in site.ids])
    assert raw.returncode == 1 and "'T-split'" in raw.stdout and "missing in a" in raw.stdout
    raw_counts = _counters(site, {s: (tmp_path / "raw" / f"{s}.fs",
                                      tmp_path / "raw" / f"{s}.blobs") for s in site.ids})
    assert [raw_counts[s]["multi"] for s in site.ids] == [info["M2"], info["M2"] + 1,
                                                          info["M2"] + 1]

    # The disaster: the live files are gone.  Restore in place, cut.
    _wipe_live(site)
    r = run_cli("restore", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"as of {info['ts2']}" in r.stdout
    assert "verify: coherent" in r.stdout
    assert "Server behind client" in r.stdout and "*.zec" in r.stdout
    counts = _counters(site)
    assert {s: c["multi"] for s, c in counts.items()} == {s: info["M2"] for s in site.ids}
    for s in site.ids:
        # every blob committed before T is back, T's blob files were pruned
        assert counts[s]["blobs"] == info["blobs_before_T"][s]
        assert not [p for p, _, tid in fsscan_blob_files(site.blob_dir(s))
                    if tid >= info["T"].get(s, 1 << 64)]
        assert filestorage.last_tid(site.data_fs(s)) < info["T"][s]
    assert run_cli("verify", "-c", site.config).returncode == 0


def fsscan_blob_files(blob_dir):
    from tidstorage.formats.blobs import blob_files

    return list(blob_files(blob_dir))


def test_log_newer_than_backup_lowers_the_cut(copy, tmp_path):
    """-t with the live TID log (published after T): the cut would keep T in
    b and c, which a lacks: it is lowered to the largest coherent cut."""
    site, info = copy
    out = tmp_path / "out"
    r = run_cli("restore", "-c", site.config, "-t", site.tidlog, "--output-dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "splits 1 multi-storage transaction" in r.stdout and "'T-split'" in r.stdout
    assert "storage b: cut LOWERED" in r.stdout and "storage c: cut LOWERED" in r.stdout
    assert "storage a: cut LOWERED" not in r.stdout
    assert "note: the cut was lowered for b, c" in r.stdout
    counts = _counters(site, {s: (out / f"{s}.fs", out / f"{s}.blobs") for s in site.ids})
    assert {s: c["multi"] for s, c in counts.items()} == {s: info["M2"] for s in site.ids}


def test_existing_files_need_force_and_the_stale_index_goes(copy):
    site, info = copy
    before = tree_state(site.root / "var")
    r = run_cli("restore", "-c", site.config)
    assert r.returncode == 1
    for s in site.ids:
        assert f"storage {s}: {site.data_fs(s)} exists (use --force" in r.stderr
    assert "nothing was changed" in r.stderr
    assert tree_state(site.root / "var") == before
    # the live Data.fs.index describes the longer live file
    assert all(site.data_fs(s).with_name("Data.fs.index").exists() for s in site.ids)
    r = run_cli("restore", "-c", site.config, "--force")
    assert r.returncode == 0, r.stderr
    from ZODB.FileStorage import FileStorage
    from ZODB.utils import u64

    # a was not cut: repozo's index of the backup is right; b and c were cut:
    # no index (FileStorage rebuilds it), certainly not the live file's one
    newest_a = sorted(site.repo("a").glob("*.index"))[-1]
    assert site.data_fs("a").with_name("Data.fs.index").read_bytes() == newest_a.read_bytes()
    assert not site.data_fs("b").with_name("Data.fs.index").exists()
    assert not site.data_fs("c").with_name("Data.fs.index").exists()
    for s in site.ids:
        fs = FileStorage(str(site.data_fs(s)), read_only=True)
        try:  # an index left from the live file would claim its last TID
            assert u64(fs.lastTransaction()) == filestorage.last_tid(site.data_fs(s))
        finally:
            fs.close()
    assert {s: c["multi"] for s, c in _counters(site).items()} == \
        {s: info["M2"] for s in site.ids}
    assert not list(site.root.glob("var/*/.*tidstorage-restore*"))


def test_check_compares_and_touches_nothing(copy):
    site, info = copy
    before = tree_state(site.root / "var")
    r = run_cli("restore", "-c", site.config, "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    for s in site.ids:
        assert f"storage {s}: restored " in r.stdout
    assert r.stdout.count("shorter than the live file by") == 3
    assert r.stdout.count("identical") == 3
    assert "nothing was changed" in r.stdout
    assert tree_state(site.root / "var") == before
    assert not list(site.root.glob("var/*/.tidstorage-check-*"))
    # a live file shorter than the backup (cut since): reported, exit 1
    filestorage.truncate_at(site.data_fs("a"), 4)
    r = run_cli("restore", "-c", site.config, "--check")
    assert r.returncode == 1 and "LONGER than the live file" in r.stdout
    assert not list(site.root.glob("var/*/.tidstorage-check-*"))


def test_date_selects_an_older_backup(copy, tmp_path):
    site, info = copy
    out = tmp_path / "old"
    r = run_cli("restore", "-c", site.config, "--date", info["ts1"], "--output-dir", out)
    assert r.returncode == 0, r.stderr
    assert f"as of {info['ts1']}" in r.stdout
    counts = _counters(site, {s: (out / f"{s}.fs", out / f"{s}.blobs") for s in site.ids})
    assert {s: c["multi"] for s, c in counts.items()} == {s: info["M1"] for s in site.ids}
    # any date before the second backup's timestamp restores the first one
    before_ts2 = format_timestamp(timestamp_seconds(info["ts2"]) - 1)
    r = run_cli("restore", "-c", site.config, "--date", before_ts2, "--output-dir",
                tmp_path / "mid")
    assert r.returncode == 0, r.stderr
    assert f"as of {info['ts1']}" in r.stdout
    if before_ts2 != info["ts1"]:
        assert f"last complete backup at or before {before_ts2}: {info['ts1']}" in r.stdout


def _fails_cleanly(site, args, message, tmp_path):
    out = tmp_path / "out"
    before = tree_state(site.root)
    r = run_cli("restore", "-c", site.config, "--output-dir", out, *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert tree_state(site.root) == before
    assert not out.exists() or not any(out.iterdir())
    return r


def test_bad_inputs_fail_and_change_nothing(copy, tmp_path):
    site, info = copy
    # a storage missing from the TID log
    partial = tmp_path / "partial.tid"
    site.publish({"a": 1, "b": 2}, path=partial)
    _fails_cleanly(site, ["-t", partial], f"TID log {partial} has no identity", tmp_path)
    r = run_cli("adopt", "-c", site.config, "--tidlog", partial)
    assert r.returncode == 0, r.stdout + r.stderr
    _fails_cleanly(site, ["-t", partial], "storage(s) c missing from TID log", tmp_path)
    # no backup before --date
    _fails_cleanly(site, ["--date", "2001-01-01"], "no backup at or before 2001-01-01-00-00-00",
                   tmp_path)
    # a TID log that does not exist
    _fails_cleanly(site, ["-t", tmp_path / "nope.tid"], "nope.tid does not exist", tmp_path)
    # bad usage: exit 2
    r = run_cli("restore", "-c", site.config, "--date", "yesterday")
    assert r.returncode == 2 and "bad date 'yesterday'" in r.stderr
    r = run_cli("restore", "-c", site.config, "--no-cut", "-t", site.tidlog)
    assert r.returncode == 2


def test_missing_and_corrupt_repository_files(copy, tmp_path):
    site, info = copy
    repo = site.repo("b")
    delta = sorted(repo.glob("*.deltafs"))[-1]
    data = bytearray(delta.read_bytes())
    data[len(data) // 2] ^= 0xFF
    delta.write_bytes(bytes(data))          # same size, other content
    _fails_cleanly(site, [], f"storage b: repozo -R failed ({repo} as of {info['ts2']}): "
                   f"{delta} has checksum", tmp_path)
    delta.unlink()
    _fails_cleanly(site, [], f"storage b: repository file {delta} is missing", tmp_path)
    dat = sorted(site.repo("c").glob("*.dat"))[-1]
    dat.unlink()
    r = _fails_cleanly(site, [], f"storage c: {dat} is missing", tmp_path)
    assert "storage b:" in r.stderr  # every problem is reported at once
    shutil.rmtree(site.repo("a").with_name("a.blobs"))
    _fails_cleanly(site, [], "storage a: no blob backup at or before", tmp_path)


def test_a_damaged_dat_is_reported_not_a_traceback(copy, tmp_path):
    """Regression: a ``.dat`` that is not text (a bit flip, a disk error)
    made restore and cleanup die with a UnicodeDecodeError traceback."""
    site, _info = copy
    dat = sorted(site.repo("c").glob("*.dat"))[-1]
    text = dat.read_bytes()
    dat.write_bytes(b"\xff\xfe" + text)
    r = _fails_cleanly(site, [], f"storage c: {dat}: not a text file", tmp_path)
    assert "Traceback" not in r.stderr
    r = run_cli("cleanup", "-c", site.config, "--dry-run")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"{dat}: not a text file" in r.stdout
    dat.write_bytes(text + b"only three fields\n")
    _fails_cleanly(site, [], f"storage c: {dat}: malformed line 'only three fields'", tmp_path)


def test_restore_in_place_refused_while_the_storage_is_open(copy):
    site, info = copy
    before = digest(site.data_fs("a"))
    with site:  # holds Data.fs.lock, as a ZEO server would
        r = run_cli("restore", "-c", site.config, "--force")
    assert r.returncode == 1
    assert f"storage a: {site.data_fs('a')} is in use" in r.stderr and "is held" in r.stderr
    assert digest(site.data_fs("a")) == before


def test_disk_full_during_restore_loses_nothing(copy):
    """Writes beyond 3 KB fail (RLIMIT_FSIZE, like a full disk) while repozo
    recovers the (bigger) Data.fs files over the live ones (--force)."""
    site, info = copy
    assert all(site.data_fs(s).stat().st_size > 3000 for s in site.ids)
    before = tree_state(site.root)
    r = run_cli("restore", "-c", site.config, "--force", preexec_fn=fsize_limit(3000))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "repozo -R failed" in r.stderr and "File too large" in r.stderr
    assert "nothing was changed" in r.stderr
    assert tree_state(site.root) == before  # live files, backups, no temporary files


def test_api_reports_the_cut(copy, tmp_path):
    site, info = copy
    res = run_restore(load_config(site.config), output_dir=tmp_path / "api")
    assert res.coherent and res.date == info["ts2"] and res.lowered() == []
    assert {s: r.cut.changes for s, r in res.storages.items()} == \
        {"a": False, "b": True, "c": True}
    for s in ("b", "c"):
        cut = res.storages[s].cut
        assert cut.point.dropped == 1 and cut.point.last_tid < info["T"][s]
        assert res.storages[s].pruned_blobs == 1
    assert verify.check({s: tmp_path / "api" / f"{s}.fs" for s in site.ids}).ok


def test_dry_run_prints_the_cut_plan_and_changes_nothing(copy):
    site, info = copy
    before = tree_state(site.root)
    r = run_cli("restore", "-c", site.config, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_state(site.root) == before
    assert not list(site.root.rglob(".tidstorage-dry-run-*"))
    assert "restore plan (dry run: nothing is changed), rule: the TID log's point" in r.stdout
    assert f"backup: {info['ts2']}" in r.stdout
    # T is in b's and c's backups only: dropped there by the log's point
    assert "[T-split]: after the TID log's point" in r.stdout
    assert "restore would refuse: storage a:" in r.stdout  # the live files exist
    r = run_cli("restore", "-c", site.config, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert {s: (p["rule"], p["dropped"]) for s, p in plan["storages"].items()} == \
        {"a": ("log", 0), "b": ("log", 1), "c": ("log", 1)}
    assert tree_state(site.root) == before
    for args in (["--no-cut"], ["--check"]):
        r = run_cli("restore", "-c", site.config, "--dry-run", *args)
        assert r.returncode == 2 and "--dry-run" in r.stderr
    assert tree_state(site.root) == before
