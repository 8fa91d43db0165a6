"""tidstorage cleanup: keep the newest N full backups and what they need."""

from __future__ import annotations

import sys

import pytest
import zc.lockfile

from fsfixtures import Site, read_counters, run_cli, tree_state
from tidstorage import blobs
from tidstorage.backup import BACKUP_LOCK, data_files, run_backup, tidlog_copies
from tidstorage.config import load_config


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
    assert r.returncode == 0 and "no full backup: keeping everything" in r.stdout
