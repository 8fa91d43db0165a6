"""tidstorage backup: TID log copy, real repozo per storage, blob snapshots."""

from __future__ import annotations

import json
import os
import sys

import pytest
import zc.lockfile
from support.fsfixtures import Site, run_cli

from tidstorage.formats import blobs
from tidstorage.formats.repozo import data_files
from tidstorage.tools.common import BACKUP_LOCK, tidlog_copies
from tidstorage.tools.identity import IDENTITY_FILE


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


def _backup(site, *args):
    r = run_cli("backup", "-c", site.config, "--json", *args)
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def _timestamps(site):
    if not site.timestamp_file.exists():
        return []
    return [ln for ln in site.timestamp_file.read_text().splitlines() if ln.strip()]


def test_full_then_incremental_backup_of_three_storages(tmp_path):
    site = Site(tmp_path / "site")
    with site:
        for _ in range(3):
            site.commit(blob=True)
            site.commit(["a"], blob=True)
        site.publish()
        r, out = _backup(site)
        assert r.returncode == 0, r.stderr
        assert out["ok"] and {s: v["mode"] for s, v in out["storages"].items()} == \
            {"a": "full", "b": "full", "c": "full"}
        # the TID log copy, named by the backup's start, identical to the log
        copy = tidlog_copies(site.root / "backups" / "tidlog", "tidstorage.tid")
        assert [p for _, p in copy] == [site.root / "backups" / "tidlog" /
                                        f"tidstorage.tid-{out['started']}"]
        assert copy[0][1].read_bytes() == site.tidlog.read_bytes()
        assert _timestamps(site) == [out["timestamp"]]
        for s in site.ids:
            files = data_files(site.repo(s))
            assert len(files) == 1 and files[0].endswith(".fs")
            assert files[0][:19] <= out["timestamp"]  # restorable as of the timestamp
            snap = blobs.latest_snapshot(site.repo(s).with_name(f"{s}.blobs"))
            assert snap.name == out["started"]
            assert sorted(p.name for p, _, _ in blobs.blob_files(snap)) == \
                sorted(p.name for p, _, _ in blobs.blob_files(site.blob_dir(s)))
        first_snap = site.repo("a").with_name("a.blobs") / out["started"]

        site.commit(["a", "b"], blob=True)   # c does not change
        site.publish()
        r, out2 = _backup(site)
    assert r.returncode == 0, r.stderr
    modes = {s: v["mode"] for s, v in out2["storages"].items()}
    assert modes == {"a": "incremental", "b": "incremental", "c": "unchanged"}
    assert out2["started"] > out["timestamp"]
    assert _timestamps(site) == [out["timestamp"], out2["timestamp"]]
    a = out2["storages"]["a"]
    assert a["blob_copied"] == 1 and a["blob_linked"] == 7  # 6 blobs + .layout; 1 new
    # unchanged blob files are hard links to the previous snapshot
    snap2 = site.repo("a").with_name("a.blobs") / out2["started"]
    for path, _oid, _tid in blobs.blob_files(first_snap):
        other = snap2 / path.relative_to(first_snap)
        assert os.stat(other).st_ino == os.stat(path).st_ino
    # only the newest .index is kept per repository
    for s in ("a", "b"):
        indexes = sorted(p.name for p in site.repo(s).glob("*.index"))
        newest = sorted(f for f in data_files(site.repo(s)))[-1][:19]
        assert indexes == [f"{newest}.index"]
    assert out2["storages"]["a"]["removed_indexes"]


def test_full_gzip_quick_are_passed_to_repozo(tmp_path):
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    with site:
        site.commit()
        site.publish()
        r, out = _backup(site, "--gzip")
        assert r.returncode == 0, r.stderr
        assert all(data_files(site.repo(s))[-1].endswith(".fsz") for s in "ab")
        site.commit()
        r, out = _backup(site, "--quick", "--gzip")
        assert r.returncode == 0, r.stderr
        assert [data_files(site.repo(s))[-1][-9:] for s in "ab"] == [".deltafsz"] * 2
        r, out = _backup(site, "--full")
        assert r.returncode == 0, r.stderr
        assert {v["mode"] for v in out["storages"].values()} == {"full"}
        assert all(data_files(site.repo(s))[-1].endswith(".fs") for s in "ab")


def test_a_failing_storage_fails_the_backup_and_appends_no_timestamp(tmp_path):
    site = Site(tmp_path / "site", ("a", "b", "c"), blobs=False)
    with site:
        site.commit()
        site.publish()
    assert _backup(site)[0].returncode == 0
    before = _timestamps(site)
    site.data_fs("b").write_bytes(b"FS30" + b"\xff" * 100)  # repozo cannot read it
    r, out = _backup(site)
    assert r.returncode == 1
    assert "storage b: repozo -B failed" in r.stderr
    assert "backup FAILED for storage(s) b: no timestamp appended" in r.stderr
    assert out["ok"] is False and out["storages"]["a"]["ok"] and not out["storages"]["b"]["ok"]
    assert _timestamps(site) == before
    site.data_fs("c").unlink()
    r, _ = _backup(site)
    assert r.returncode == 1 and f"storage c: {site.data_fs('c')} does not exist" in r.stderr
    assert _timestamps(site) == before


def test_no_tid_log_no_backup(tmp_path):
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    with site:
        site.commit()
    r, _ = _backup(site)
    assert r.returncode == 1
    assert f"TID log {site.tidlog} (server.status_file) does not exist" in r.stderr
    assert not site.timestamp_file.exists()
    assert data_files(site.repo("a")) == []


def test_a_corrupt_tid_log_is_not_backed_up(tmp_path):
    """A corrupt record in the middle of the daemon's TID log (issue 9.9):
    the backup refuses, naming the file and the line, and leaves no copy."""
    site = Site(tmp_path / "site", ("a",), blobs=False)
    with site:
        site.commit()
        site.publish()
        site.publish()
    lines = site.tidlog.read_bytes().splitlines(keepends=True)
    site.tidlog.write_bytes(lines[0][:-10] + b"0" * 9 + b"\n" + lines[1])
    r, _ = _backup(site)
    assert r.returncode == 1
    assert f"TID log {site.tidlog} (server.status_file) is corrupt: corrupt record" in r.stderr
    assert "(line 1)" in r.stderr and "tidstorage log recover" in r.stderr
    assert tidlog_copies(site.root / "backups" / "tidlog") == []
    assert not site.timestamp_file.exists()


def test_bad_config_exits_2(tmp_path):
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    text = site.config.read_text()
    site.config.write_text(text.replace('timestamp_file = "backups/timestamps.log"\n', ""))
    r, _ = _backup(site)
    assert r.returncode == 2 and "backup.timestamp_file: required by backup" in r.stderr
    site.config.write_text(text.replace('backup_dir = "backups/b"', 'backup_dir = "backups/a"'))
    r, _ = _backup(site)
    assert r.returncode == 2 and "storages.b.backup_dir: same directory" in r.stderr
    site.config.write_text(text + "\n[oops]\n")
    r, _ = _backup(site)
    assert r.returncode == 2 and "oops" in r.stderr


def test_concurrent_backup_is_refused(tmp_path):
    site = Site(tmp_path / "site", ("a",), blobs=False)
    with site:
        site.commit()
        site.publish()
    lock_dir = site.root / "backups" / "tidlog"
    lock_dir.mkdir(parents=True)
    lock = zc.lockfile.LockFile(str(lock_dir / BACKUP_LOCK))
    try:
        r, _ = _backup(site)
    finally:
        lock.close()
    assert r.returncode == 1 and "another backup or cleanup is running" in r.stderr
    assert data_files(site.repo("a")) == []


def test_disk_full_during_backup(tmp_path):
    """Writes beyond 3 KB fail (RLIMIT_FSIZE): repozo fails, its debris is
    removed, no timestamp is appended."""
    from support.fsfixtures import fsize_limit

    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    with site:
        for _ in range(20):
            site.commit()
        site.publish()
    assert site.data_fs("a").stat().st_size > 3000
    r = run_cli("backup", "-c", site.config, preexec_fn=fsize_limit(3000))
    assert r.returncode == 1
    assert "storage a: repozo -B failed" in r.stderr and "File too large" in r.stderr
    assert not site.timestamp_file.exists()
    for s in "ab":  # only the repository's identity, written before repozo ran
        assert sorted(p.name for p in site.repo(s).iterdir()) == [IDENTITY_FILE]
