"""Storage ids are kept as they are, but every path built from one is quoted
(issue 9.5): an id never escapes --output-dir."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from support.fsfixtures import Site, read_counters, run_cli

from tidstorage.tools.common import MAX_ID_FILENAME, id_filename, id_from_filename

ESCAPING = "../../x"
LEGACY = "((('127.0.0.1', 8100),), '1')"


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


@pytest.mark.parametrize("sid", ["main", ESCAPING, LEGACY, ".", "..", ".hidden", "a/b", "%41",
                                 "é\u2028\n", "x" * 500, "\udcff"])
def test_id_filename_is_one_safe_name(sid):
    name = id_filename(sid)
    assert name and "/" not in name and name not in (".", "..") and not name.startswith(".")
    assert len(name.encode()) <= MAX_ID_FILENAME and name.isascii() and name.isprintable()
    if len(sid) < 100:
        assert id_from_filename(name) == sid
    assert id_filename("main") == "main"  # plain ids keep their old names


def _site(tmp_path):
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    text = site.config.read_text()
    text = text.replace('[storages.a]\n', f'[storages.a]\nid = "{ESCAPING}"\n')
    text = text.replace('[storages.b]\n', f'[storages.b]\nid = "{LEGACY}"\n')
    site.config.write_text(text)
    with site:
        for _ in range(3):
            site.commit(["a"])
            site.commit(["b"])
        tids = site.last_tids()
        site.publish({ESCAPING: tids["a"], LEGACY: tids["b"]})
    r = run_cli("backup", "-c", site.config)
    assert r.returncode == 0, r.stderr
    return site


def _files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _dirs, files in os.walk(root) for f in files)


def test_restore_output_dir_never_escapes(tmp_path):
    site = _site(tmp_path)
    out = tmp_path / "deep" / "er" / "out"
    out.mkdir(parents=True)
    before = set(_files_under(tmp_path))
    r = run_cli("restore", "-c", site.config, "--output-dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    new = set(_files_under(tmp_path)) - before
    assert all(p.startswith(os.path.join("deep", "er", "out") + os.sep) for p in new), new
    restored = sorted(os.listdir(out))
    assert restored == sorted([f"{id_filename(ESCAPING)}.fs", f"{id_filename(ESCAPING)}.fs.index",
                               f"{id_filename(LEGACY)}.fs", f"{id_filename(LEGACY)}.fs.index"])
    assert read_counters(out / f"{id_filename(ESCAPING)}.fs")["single"] == 3
    # verify --files finds the ids back from the quoted names
    r = run_cli("verify", "--files", out / f"{id_filename(ESCAPING)}.fs",
                "--files", out / f"{id_filename(LEGACY)}.fs", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(__import__("json").loads(r.stdout)["windows"]) == sorted([ESCAPING, LEGACY])


def test_old_style_names_are_renamed_and_still_protected(tmp_path):
    site = _site(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    old = out / f"{LEGACY}.fs"   # what an earlier restore wrote for the legacy id
    shutil.copy(site.data_fs("b"), old)
    old_blobs = out / f"{LEGACY}.blobs"
    old_blobs.mkdir()
    (old_blobs / "keep").write_text("x")
    r = run_cli("restore", "-c", site.config, "--output-dir", out)
    assert r.returncode == 1
    new = out / f"{id_filename(LEGACY)}.fs"
    assert f"note: renamed {old} (named the old way) to {new}" in r.stdout
    assert f"{new} exists (use --force" in r.stderr
    assert not old.exists() and new.exists()
    assert (out / f"{id_filename(LEGACY)}.blobs" / "keep").exists()
    r = run_cli("restore", "-c", site.config, "--output-dir", out, "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_counters(new)["single"] == 3
