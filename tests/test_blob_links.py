"""Symbolic links inside blob directories (issue 9.4): followed, or a clear
error naming the path; never a backup or restore that exits 0 without some
blobs."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from support.fsfixtures import Site, read_counters, run_cli

from tidstorage.formats import blobs


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


def _site(tmp_path, n=30):
    site = Site(tmp_path / "site", ("a",))
    with site:
        for _ in range(n):
            site.commit(blob=True)
        site.publish()
    return site


def _move_out_and_link(site, elsewhere):
    """Move every top-level 0x.. directory of a's blob dir elsewhere (another
    "disk") and link it back, absolute and relative links alike."""
    blob_dir = site.blob_dir("a")
    elsewhere.mkdir()
    tops = sorted(p for p in blob_dir.iterdir() if p.name.startswith("0x"))
    assert tops
    for i, top in enumerate(tops):
        shutil.move(top, elsewhere / top.name)
        target = elsewhere / top.name
        os.symlink(target if i % 2 else os.path.relpath(target, blob_dir), top)
    return tops


def test_symlinked_blob_directories_are_backed_up_and_restored(tmp_path):
    site = _site(tmp_path)
    _move_out_and_link(site, tmp_path / "other-disk")
    assert len(list(blobs.blob_files(site.blob_dir("a")))) == 30
    r = run_cli("backup", "-c", site.config, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["storages"]["a"]
    assert out["blob_files"] == 31  # 30 blobs + .layout
    snap = blobs.latest_snapshot(site.repo("a").with_name("a.blobs"))
    assert len(list(blobs.blob_files(snap))) == 30
    assert not any(os.path.islink(os.path.join(d, n)) for d, ds, fs in os.walk(snap)
                   for n in ds + fs)  # the snapshot holds real files
    dest = tmp_path / "restored"
    r = run_cli("restore", "-c", site.config, "--output-dir", dest)
    assert r.returncode == 0, r.stdout + r.stderr
    got = read_counters(dest / "a.fs", dest / "a.blobs")
    assert got["blobs"] == site.blob_data["a"]


def test_prune_follows_symlinked_directories(tmp_path):
    site = _site(tmp_path, 6)
    tids = sorted(tid for _, _, tid in blobs.blob_files(site.blob_dir("a")))
    _move_out_and_link(site, tmp_path / "other-disk")
    res = blobs.prune(site.blob_dir("a"), tids[2], move_to=tmp_path / "aside")
    assert len(res.files) == 3
    assert sorted(t for _, _, t in blobs.blob_files(site.blob_dir("a"))) == tids[:3]
    assert sorted(t for _, _, t in blobs.blob_files(tmp_path / "aside")) == tids[3:]


@pytest.mark.parametrize("damage", ["loop", "twice", "dangling", "fifo"])
def test_unwalkable_blob_directories_fail_naming_the_path(tmp_path, damage):
    site = _site(tmp_path, 3)
    blob_dir = site.blob_dir("a")
    top = sorted(p for p in blob_dir.iterdir() if p.name.startswith("0x"))[0]
    bad = top / "0xzz"
    if damage == "loop":
        os.symlink("..", bad)
    elif damage == "twice":
        os.symlink(top, blob_dir / "0xff")
        bad = blob_dir / "0xff"
    elif damage == "dangling":
        os.symlink(tmp_path / "nowhere", bad)
    else:
        os.mkfifo(bad)
    r = run_cli("backup", "-c", site.config)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "storage a:" in r.stderr and (str(bad) in r.stderr or str(top) in r.stderr), r.stderr
    assert "backup FAILED for storage(s) a" in r.stderr
    assert not site.timestamp_file.exists()
