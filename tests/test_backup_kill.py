"""Killing ``tidstorage backup`` (issue 9.1): repozo children must not
outlive it, the backup lock must be held while any of them lives, and the
next backup must deal with what the killed one left.  Real processes, a
real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import zc.lockfile
from persistent.mapping import PersistentMapping
from support.fsfixtures import TIDSTORAGE, Site, digest, run_cli

from tidstorage.formats.repozo import data_files, format_timestamp
from tidstorage.tools.backup import INTERRUPTED_DIR
from tidstorage.tools.common import BACKUP_LOCK

#: generous: a loaded machine
LIMIT = 60.0


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _lock_is_free(path) -> bool:
    try:
        lock = zc.lockfile.LockFile(str(path))
    except zc.lockfile.LockError:
        return False
    lock.close()
    return True


def _wait_for(cond, what):
    deadline = time.monotonic() + LIMIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _big_site(tmp_path):
    """One storage of about 120 MB (half of it incompressible, so that
    repozo -z takes a while)."""
    site = Site(tmp_path / "site", ("a",), blobs=False)
    with site:
        root = site.root_of("a")
        for i in range(60):
            root[f"k{i}"] = m = PersistentMapping()
            m["data"] = os.urandom(1 << 20) + bytes(1 << 20)
            site._tm.commit()
        site.publish()
    return site


def test_killed_backup_leaves_no_repozo_and_holds_the_lock_while_one_lives(tmp_path):
    site = _big_site(tmp_path)
    repo = site.repo("a")
    lock_path = site.root / "backups" / "tidlog" / BACKUP_LOCK
    proc = subprocess.Popen(TIDSTORAGE + ["backup", "-c", str(site.config), "--gzip"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (repo / "tmp.tmp").exists(), "repozo to start copying")
        kids = _children(proc.pid)
        assert len(kids) == 1, kids
        child = kids[0]
        # the child holds the lock too: it inherited the lock's descriptor
        fds = {os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")}
        assert str(lock_path) in fds
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # While the child lives, no second backup can take the lock.
        while _alive(child):
            assert not _lock_is_free(lock_path), "the lock is free while repozo still runs"
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    _wait_for(lambda: _lock_is_free(lock_path), "the lock to be free")
    # The child was killed with its parent: it did not finish a backup file
    # that nobody recorded (nor one that a second repozo would write over).
    assert data_files(repo) == []
    assert not site.timestamp_file.exists()
    assert (repo / "tmp.tmp").exists()  # the killed copy's scratch file

    # The next backup cleans up after the killed one, and is sound.
    r = run_cli("backup", "-c", site.config, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert any(f"removed {repo / 'tmp.tmp'}" in w for w in out["warnings"]), out["warnings"]
    assert not (repo / "tmp.tmp").exists()
    assert len(site.timestamp_file.read_text().split()) == 1
    restored = tmp_path / "restored"
    r = run_cli("restore", "-c", site.config, "--output-dir", restored)
    assert r.returncode == 0, r.stdout + r.stderr
    assert digest(restored / "a.fs") == digest(site.data_fs("a"))


def test_backup_moves_aside_files_of_an_interrupted_repozo_run(tmp_path):
    """repozo renames a data file, then records it in the .dat: killed in
    between, it leaves a file that repozo -R would splice in."""
    site = Site(tmp_path / "site", ("a",), blobs=False)
    with site:
        site.commit()
        site.publish()
        assert run_cli("backup", "-c", site.config).returncode == 0
        site.commit()
        site.publish()
    repo = site.repo("a")
    full = data_files(repo)[0]
    now = time.time()
    orphan = repo / f"{format_timestamp(now + 1)}.deltafs"
    orphan.write_bytes(b"junk")
    index = repo / f"{format_timestamp(now + 2)}.index"
    index.write_bytes(b"junk")
    r = run_cli("backup", "-c", site.config, "--json")
    assert r.returncode == 0, r.stderr
    warnings = "\n".join(json.loads(r.stdout)["warnings"])
    assert f"moved {orphan} (a data file not listed in {full[:19]}.dat" in warnings
    assert f"moved {index} (an index without its data file" in warnings
    assert (repo / INTERRUPTED_DIR / orphan.name).read_bytes() == b"junk"
    assert not orphan.exists()
    assert not index.exists() or index.read_bytes() != b"junk"  # (repozo may reuse the name)
    r = run_cli("restore", "-c", site.config, "--output-dir", tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert digest(tmp_path / "out" / "a.fs") == digest(site.data_fs("a"))
