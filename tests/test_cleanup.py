"""tidstorage cleanup: keep the newest N full backups and what they need."""

from __future__ import annotations

import sys

import pytest
import zc.lockfile
from support.fsfixtures import Site, read_counters, run_cli, tree_state

from tidstorage.config import load_config
from tidstorage.formats import blobs
from tidstorage.formats.repozo import data_files
from tidstorage.tools.backup import run_backup
from tidstorage.tools.common import BACKUP_LOCK, tidlog_copies


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


def _listing(site):
    out = {}
    for s in site.ids:
        out[s] = (sorted(p.name for p in site.repo(s).iterdir()),
                  blobs.list_snapshots(site.repo(s).with_name(f"{s}.blobs")))
    out["tidlog"] = [ts for ts, _ in tidlog_copies(site.root / "backups" / "tidlog")]
    return out


def test_cleanup_keeps_the_newest_full_backups(tmp_path):
    site = Site(tmp_path / "site", ("a", "b"), keep_full_backups=2)
    backups = []
    with site:
        for full in (True, True, False, True):
            site.commit(blob=True)
            site.publish()
            r = run_backup(load_config(site.config), full=full)
            assert r.ok
            backups.append(r)
    started = [r.started for r in backups]
    before = _listing(site)
    assert before["tidlog"] == started
    assert all(len(before[s][1]) == 4 for s in "ab")

    # dry run: lists, deletes nothing
    state = tree_state(site.root)
    r = run_cli("cleanup", "-c", site.config, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert tree_state(site.root) == state
    full1 = [f for f in before["a"][0] if f.endswith(".fs")][0]
    assert f"would delete {site.repo('a') / full1}" in r.stdout
    assert f"would delete {site.repo('a').with_name('a.blobs') / started[0]}" in r.stdout

    # keep 2 (the config's default): backup 1 goes, 2 (full), 3 (incremental), 4 stay
    r = run_cli("cleanup", "-c", site.config)
    assert r.returncode == 0, r.stderr
    after = _listing(site)
    for s in "ab":
        files = data_files(site.repo(s))
        assert [f[-3:] for f in files] == [".fs", "afs", ".fs"]  # full, delta, full
        assert files[0][:19] >= started[1]
        assert not [f for f in after[s][0] if f[:19] < started[1]]  # no .dat/.index left
        assert after[s][1] == started[1:]
    assert after["tidlog"] == started[1:]

    # what is kept is restorable: backup 2 and backup 4
    for i, expected in ((1, 2), (3, 4)):
        out = tmp_path / f"r{i}"
        r = run_cli("restore", "-c", site.config, "--date", backups[i].timestamp,
                    "--output-dir", out)
        assert r.returncode == 0, r.stdout + r.stderr
        for s in "ab":
            assert read_counters(out / f"{s}.fs", out / f"{s}.blobs")["multi"] == expected

    # --keep 1: only the last full backup and what follows it stays
    r = run_cli("cleanup", "-c", site.config, "--keep", "1")
    assert r.returncode == 0, r.stderr
    after = _listing(site)
    for s in "ab":
        assert len(data_files(site.repo(s))) == 1
        assert after[s][1] == started[3:]
    assert after["tidlog"] == started[3:]


def test_cleanup_usage_and_lock(tmp_path):
    site = Site(tmp_path / "site", ("a",), blobs=False)
    r = run_cli("cleanup", "-c", site.config, "--keep", "0")
    assert r.returncode == 2
    lock_dir = site.root / "backups" / "tidlog"
    lock_dir.mkdir(parents=True)
    lock = zc.lockfile.LockFile(str(lock_dir / BACKUP_LOCK))
    try:
        r = run_cli("cleanup", "-c", site.config)
    finally:
        lock.close()
    assert r.returncode == 1 and "a backup is running" in r.stderr
    # nothing to clean: fine
    r = run_cli("cleanup", "-c", site.config)
    assert r.returncode == 0 and "no restorable recorded backup: keeping every file" in r.stdout


def _timestamps(site):
    return [ln for ln in site.timestamp_file.read_text().splitlines() if ln.strip()]


def test_cleanup_keeps_the_full_backup_the_recorded_backup_needs(tmp_path):
    """keep_full_backups = 1; a second ``backup --full`` fails on b after
    making a new full backup of a: the only recorded backup still needs a's
    older full backup (issue 9.3)."""
    site = Site(tmp_path / "site", ("a", "b"), blobs=False, keep_full_backups=1)
    with site:
        site.commit()
        site.publish()
        first = run_backup(load_config(site.config), full=True)
        assert first.ok
        site.commit()
        site.publish()
    hidden = site.data_fs("b").with_name("away")
    site.data_fs("b").rename(hidden)
    failed = run_backup(load_config(site.config), full=True, jobs=1)
    assert not failed.ok and failed.storages["a"].mode == "full"
    hidden.rename(site.data_fs("b"))
    assert len([f for f in data_files(site.repo("a")) if f.endswith(".fs")]) == 2
    r = run_cli("cleanup", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _timestamps(site) == [first.timestamp]
    out = tmp_path / "out"
    r = run_cli("restore", "-c", site.config, "--output-dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    for s in "ab":
        assert read_counters(out / f"{s}.fs")["multi"] == 1


def test_cleanup_prunes_the_timestamp_file_and_restore_says_why(tmp_path):
    site = Site(tmp_path / "site", ("a", "b"), keep_full_backups=1)
    stamps = []
    with site:
        for _ in range(2):
            site.commit(blob=True)
            site.publish()
            r = run_backup(load_config(site.config), full=True)
            assert r.ok
            stamps.append(r.timestamp)
    r = run_cli("cleanup", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"backup {stamps[0]}: will be removed from {site.timestamp_file}" in r.stdout
    assert _timestamps(site) == [stamps[1]]   # never lists a backup whose files are gone
    r = run_cli("restore", "-c", site.config, "--date", stamps[0], "--output-dir", tmp_path / "o")
    assert r.returncode == 1
    assert f"no backup at or before {stamps[0]} (the oldest in {site.timestamp_file} is " \
        f"{stamps[1]}; older ones were removed by cleanup" in r.stderr
    # an entry left by an older cleanup, whose files are gone
    site.timestamp_file.write_text(f"{stamps[0]}\n{stamps[1]}\n")
    r = run_cli("restore", "-c", site.config, "--date", stamps[0], "--output-dir", tmp_path / "o")
    assert r.returncode == 1
    assert f"backup {stamps[0]}, recorded in {site.timestamp_file}, cannot be restored" in r.stderr
    assert f"storage a: no backup at or before {stamps[0]}" in r.stderr
    assert f"restorable recorded backups: {stamps[1]} (use --date)" in r.stderr
    r = run_cli("cleanup", "-c", site.config, "--dry-run")
    assert r.returncode == 0 and f"backup {stamps[0]}: would be removed" in r.stdout
    assert "not restorable any more" in r.stdout
    assert len(_timestamps(site)) == 2
    r = run_cli("cleanup", "-c", site.config)
    assert r.returncode == 0 and _timestamps(site) == [stamps[1]]


def test_cleanup_refuses_when_a_backup_directory_is_missing(tmp_path):
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    with site:
        site.commit()
        site.publish()
        assert run_backup(load_config(site.config)).ok
    site.repo("b").rename(tmp_path / "unmounted")
    before = tree_state(site.root)
    r = run_cli("cleanup", "-c", site.config)
    assert r.returncode == 1 and f"backup directory {site.repo('b')} does not exist" in r.stderr
    assert tree_state(site.root) == before
