"""Backup identities (issue 9.2): a repository or a TID log copy of another
set or of another storage is refused; legacy backups are adopted once;
restore never lowers a cut without bound, and never replaces a live file
without keeping it."""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest
from ZODB.FileStorage import FileStorage

from support.fsfixtures import Site, digest, raw_commit, read_counters, run_cli, tree_state
from tidstorage.formats.durable import sha256_file as file_sha256
from tidstorage.tools.backup import run_backup
from tidstorage.tools.common import tidlog_copies
from tidstorage.tools.identity import IDENTITY_FILE, TIDLOG_IDENTITY_SUFFIX
from tidstorage.config import load_config
from tidstorage.core.stamps import stamp_value
from tidstorage.core.tids import tid_at


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


def _site(root, n=2):
    site = Site(root, ("a", "b"), blobs=False)
    with site:
        for _ in range(n):
            site.commit()
            site.commit(["a"])
        site.publish()
        assert run_backup(load_config(site.config)).ok
    return site


@pytest.fixture
def two(tmp_path):
    """Two deployments with the same storage ids, each backed up."""
    return _site(tmp_path / "x"), _site(tmp_path / "y", 3)


def _ident(path):
    return json.loads(path.read_text())


def _set_config(site, **backup_dirs):
    text = site.config.read_text()
    for sid in backup_dirs:
        text = text.replace(f'backup_dir = "backups/{sid}"', f'backup_dir = "@{sid}@"')
    for sid, where in backup_dirs.items():
        text = text.replace(f'"@{sid}@"', f'"{where}"')
    site.config.write_text(text)


def _refused(site, args, message):
    before = tree_state(site.root)
    r = run_cli(*args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert tree_state(site.root) == before
    return r


def test_backups_carry_their_identity(two):
    x, y = two
    set_id = _ident(x.root / "backups" / "tidlog" / IDENTITY_FILE)["set_id"]
    assert set_id != _ident(y.root / "backups" / "tidlog" / IDENTITY_FILE)["set_id"]
    for s in x.ids:
        ident = _ident(x.repo(s) / IDENTITY_FILE)
        assert (ident["set_id"], ident["storage_id"]) == (set_id, s)
    (_, copy), = tidlog_copies(x.root / "backups" / "tidlog")
    side = _ident(copy.with_name(copy.name + TIDLOG_IDENTITY_SUFFIX))
    assert side["set_id"] == set_id and side["sha256"] == file_sha256(copy)
    # a second backup keeps the same identity
    with x:
        x.commit()
        x.publish()
    assert run_backup(load_config(x.config)).ok
    assert _ident(x.repo("a") / IDENTITY_FILE)["set_id"] == set_id


def test_another_deployments_repository_is_refused(two):
    x, y = two
    _set_config(x, a=str(y.repo("a")))
    msg = f"storage a: repository {y.repo('a')} belongs to another backup set"
    _refused(x, ["restore", "-c", x.config, "--force"], msg)
    _refused(x, ["backup", "-c", x.config], msg)
    _refused(x, ["cleanup", "-c", x.config], msg)
    assert read_counters(x.data_fs("a"))["multi"] == 2  # the live storage is intact


def test_swapped_repositories_are_refused(two):
    x, _ = two
    _set_config(x, a="backups/b", b="backups/a")
    r = _refused(x, ["restore", "-c", x.config, "--force"],
                 f"storage a: repository {x.repo('b')} belongs to storage 'b'")
    assert "swapped" in r.stderr and f"storage b: repository {x.repo('a')}" in r.stderr


def test_a_tid_log_of_another_deployment_is_refused(two):
    x, y = two
    (_, theirs), = tidlog_copies(y.root / "backups" / "tidlog")
    # given with -t
    _refused(x, ["restore", "-c", x.config, "-t", theirs, "--output-dir", x.root / "out"],
             f"TID log {theirs} belongs to another backup set")
    # slipped among this set's copies, with or without its identity
    (_, ours), = tidlog_copies(x.root / "backups" / "tidlog")
    sidecar = ours.with_name(ours.name + TIDLOG_IDENTITY_SUFFIX)
    shutil.copy(theirs, ours)
    _refused(x, ["restore", "-c", x.config, "--output-dir", x.root / "out"],
             f"TID log {ours} does not match its identity")
    sidecar.unlink()
    _refused(x, ["restore", "-c", x.config, "--output-dir", x.root / "out"],
             f"TID log {ours} has no identity")
    shutil.copy(theirs.with_name(theirs.name + TIDLOG_IDENTITY_SUFFIX), sidecar)
    _refused(x, ["restore", "-c", x.config, "--output-dir", x.root / "out"],
             f"TID log {ours} belongs to another backup set")


def test_legacy_backups_are_adopted_once(two):
    x, _ = two
    for p in list(x.root.glob("backups/**/*" + IDENTITY_FILE[-5:])):
        if p.name.endswith("identity.json"):
            p.unlink()   # backups made before identities
    _refused(x, ["backup", "-c", x.config], "has no identity")
    r = _refused(x, ["restore", "-c", x.config, "--output-dir", x.root / "out"],
                 "tidstorage adopt -c CONFIG")
    assert f"storage a: repository {x.repo('a')} has no identity" in r.stderr
    # adopting a swapped configuration is refused: the newest full backup
    # does not start like the live Data.fs
    good = x.config.read_text()
    _set_config(x, a="backups/b", b="backups/a")
    r = _refused(x, ["adopt", "-c", x.config], f"does not start with the first transaction "
                 f"of {x.data_fs('a')}")
    x.config.write_text(good)
    r = run_cli("adopt", "-c", x.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("adopted ") == 3 and "(new)" in r.stdout  # 2 repositories, 1 copy
    r = run_cli("adopt", "-c", x.config)
    assert r.returncode == 0 and "adopted" not in r.stdout  # once is enough
    r = run_cli("restore", "-c", x.config, "--output-dir", x.root / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert run_cli("backup", "-c", x.config).returncode == 0


def test_a_cut_lowered_beyond_the_bound_needs_force_cut(tmp_path):
    """Storage a holds stamped transactions, ten minutes apart over three
    hours of TID time, that b lacks (as if a's repository were another
    set's): the coherent cut would drop three hours of a. Refused without
    --force-cut."""
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    base = time.time() - 86400
    storages = {s: FileStorage(str(site.data_fs(s))) for s in site.ids}
    try:
        for s in site.ids:
            raw_commit(storages[s], tid_at(base))
        for i in range(20):
            t = base + 600 + i * 600
            raw_commit(storages["a"], tid_at(t), {"tidstorage": stamp_value(f"S{i}", ("a", "b"))})
            raw_commit(storages["b"], tid_at(t + 1))
        last = {s: int.from_bytes(storages[s].lastTransaction(), "big") for s in site.ids}
    finally:
        for st in storages.values():
            st.close()
    site.publish(last)
    assert run_backup(load_config(site.config)).ok
    out = tmp_path / "out"
    r = run_cli("restore", "-c", site.config, "--output-dir", out)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "storage a: the stamp check would lower the cut by 3.3 hours" in r.stderr
    assert "--force-cut" in r.stderr and "nothing was changed" in r.stderr
    assert not out.exists() or not any(out.iterdir())
    r = run_cli("restore", "-c", site.config, "--output-dir", out, "--force-cut")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "storage a: cut LOWERED" in r.stdout


def test_restore_in_place_keeps_what_it_replaces(tmp_path):
    site = Site(tmp_path / "site", ("a", "b"))
    with site:
        site.commit(blob=True)
        site.publish()
        assert run_backup(load_config(site.config)).ok
        site.commit(blob=True)   # the live files move on
    live = {s: digest(site.data_fs(s)) for s in site.ids}
    r = run_cli("restore", "-c", site.config, "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    for s in site.ids:
        kept = site.data_fs(s).with_name("Data.fs.before-restore")
        assert digest(kept) == live[s]
        assert read_counters(kept, site.blob_dir(s).with_name("blobs.before-restore"))["multi"] == 2
        assert read_counters(site.data_fs(s), site.blob_dir(s))["multi"] == 1
    # never overwritten: a second restore is refused until it is moved away
    r = run_cli("restore", "-c", site.config, "--force")
    assert r.returncode == 1 and "Data.fs.before-restore (the file an earlier restore " \
        "replaced) exists" in r.stderr
