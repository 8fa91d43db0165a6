"""tidstorage repair: in-place cut of live files after a (hand-made) crash."""

from __future__ import annotations

import json
import sys

import pytest
import transaction
import zc.lockfile
from support.fsfixtures import (
    Site,
    digest,
    fsize_limit,
    read_counters,
    run_cli,
    tree_state,
)
from ZODB import DB
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage
from ZODB.utils import u64

from tidstorage.formats import blobs, filestorage


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


def _crash_site(tmp_path, *, publish_t=False, torn=True):
    """a and b with blobs; T commits on both (with a blob each), then b loses
    T: its Data.fs ends in the middle of T's record (``torn``) or just before
    it.  T's blob file stays in b's blob directory.  The TID log publishes
    the TIDs before T (what the daemon does: T never ended for it), or T's
    own TIDs with ``publish_t`` (a wrong or stale log)."""
    site = Site(tmp_path / "site", ("a", "b"))
    with site:
        for _ in range(3):
            site.commit(blob=True)
            site.commit(["a"], blob=True)
        site.publish()
        t = site.commit(blob=True, stamp_id="T-crash")
        if publish_t:
            site.publish()
    b = site.data_fs("b")
    cut = filestorage.find_cut(b, t["b"] - 1)
    size = b.stat().st_size
    with open(b, "r+b") as f:
        f.truncate(size - 10 if torn else cut.offset)
    b.with_name("Data.fs.index").unlink()
    return site, t


def _blob_tids(blob_dir):
    return sorted(tid for _, _, tid in blobs.blob_files(blob_dir))


def test_repair_cuts_at_the_published_tids(tmp_path):
    site, t = _crash_site(tmp_path)
    originals = {s: digest(site.data_fs(s)) for s in site.ids}
    assert t["b"] in _blob_tids(site.blob_dir("b"))
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backward scan failed" in r.stdout   # b's torn tail
    assert "cut LOWERED" not in r.stdout
    for s in site.ids:
        safety = site.data_fs(s).with_name("Data.fs.before-repair")
        assert digest(safety) == originals[s]
        assert f"storage {s}: safety copy {safety}" in r.stdout
        assert filestorage.last_tid(site.data_fs(s)) < t[s]
        # T's blob file moved aside, not lost
        assert t[s] not in _blob_tids(site.blob_dir(s))
        assert t[s] in _blob_tids(f"{site.blob_dir(s)}.before-repair")
    assert "verify: coherent" in r.stdout and "Server behind client" in r.stdout
    counts = {s: read_counters(site.data_fs(s), site.blob_dir(s)) for s in site.ids}
    assert counts["a"]["multi"] == counts["b"]["multi"] == 3
    assert len(counts["a"]["blobs"]) == 6 and len(counts["b"]["blobs"]) == 3
    # Re-running is safe: nothing to do, the safety copies are kept as they are.
    state = tree_state(site.root)
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 0, r.stderr
    assert "nothing to repair" in r.stdout
    assert "Data.fs.before-repair is left from an earlier repair" in r.stdout
    assert tree_state(site.root) == state

    # The repaired storages open and commit normally.
    with site:
        site.commit(blob=True)
    assert run_cli("verify", "-c", site.config).returncode == 0


def test_a_wrong_log_is_lowered_to_the_largest_coherent_cut(tmp_path):
    site, t = _crash_site(tmp_path, publish_t=True, torn=False)
    size_b = site.data_fs("b").stat().st_size
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "'T-crash'" in r.stdout and "missing in b" in r.stdout
    assert "storage a: cut LOWERED" in r.stdout
    assert filestorage.last_tid(site.data_fs("a")) < t["a"]
    assert site.data_fs("b").stat().st_size == size_b   # b ends where it should
    assert not site.data_fs("b").with_name("Data.fs.before-repair").exists()
    assert t["b"] not in _blob_tids(site.blob_dir("b"))  # b's orphan blob pruned
    counts = {s: read_counters(site.data_fs(s), site.blob_dir(s)) for s in site.ids}
    assert counts["a"]["multi"] == counts["b"]["multi"] == 3


def test_a_leftover_safety_copy_is_never_overwritten(tmp_path):
    site, t = _crash_site(tmp_path)
    leftover = site.data_fs("a").with_name("Data.fs.before-repair")
    leftover.write_bytes(b"an earlier safety copy")
    before = tree_state(site.root)
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 1
    assert f"storage a: a safety copy from an earlier repair exists: {leftover}" in r.stderr
    assert "delete or move it away, and run repair again" in r.stderr
    assert "nothing was changed" in r.stderr
    assert tree_state(site.root) == before


def test_refused_while_a_process_holds_the_lock(tmp_path):
    site, t = _crash_site(tmp_path)
    before = tree_state(site.root)
    lock = zc.lockfile.LockFile(str(site.data_fs("b")) + ".lock")
    try:
        r = run_cli("repair", "-c", site.config)
    finally:
        lock.close()
    assert r.returncode == 1
    assert f"storage b: {site.data_fs('b')} is in use by a running process" in r.stderr
    assert tree_state(site.root) == before


def test_bad_tid_logs(tmp_path):
    site, t = _crash_site(tmp_path)
    before = tree_state(site.root)
    partial = tmp_path / "partial.tid"
    site.publish({"a": t["a"]}, path=partial)
    r = run_cli("repair", "-c", site.config, "-t", partial)
    assert r.returncode == 1 and "storage(s) b missing from TID log" in r.stderr
    r = run_cli("repair", "-c", site.config, "-t", tmp_path / "none.tid")
    assert r.returncode == 1 and "none.tid does not exist" in r.stderr
    assert tree_state(site.root) == before
    site.config.write_text(site.config.read_text().replace(
        'status_file = "var/tidstorage.tid"', ""))
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 2 and "server.status_file: required by repair" in r.stderr


def test_disk_full_during_the_safety_copy_changes_nothing(tmp_path):
    site, t = _crash_site(tmp_path)
    before = tree_state(site.root)
    limit = site.data_fs("a").stat().st_size - 100
    r = run_cli("repair", "-c", site.config, preexec_fn=fsize_limit(limit))
    assert r.returncode == 1
    assert "cannot make the safety copy" in r.stderr and "File too large" in r.stderr
    assert "nothing was changed" in r.stderr
    assert tree_state(site.root) == before


def test_prune_lawn_layout(tmp_path):
    FileStorage(str(tmp_path / "Data.fs")).close()  # a new one would wipe blob_dir
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    (blob_dir / ".layout").write_text("lawn")
    db = DB(FileStorage(str(tmp_path / "Data.fs"), blob_dir=str(blob_dir)))
    tids = []
    try:
        conn = db.open()
        for i in range(4):
            conn.root()[f"b{i}"] = Blob(b"x" * i)
            transaction.commit()
            tids.append(u64(db.storage.lastTransaction()))
        conn.close()
    finally:
        db.close()
    assert _blob_tids(blob_dir) == tids
    assert all(len(p.relative_to(blob_dir).parts) == 2 for p, _, _ in blobs.blob_files(blob_dir))
    res = blobs.prune(blob_dir, tids[1], move_to=tmp_path / "aside")
    assert len(res.files) == 2 and _blob_tids(blob_dir) == tids[:2]
    assert _blob_tids(tmp_path / "aside") == tids[2:]
    with pytest.raises(FileExistsError):
        blobs.prune(blob_dir, tids[0], move_to=tmp_path / "aside")
    assert blobs.prune(blob_dir, None).files and _blob_tids(blob_dir) == []


def test_a_repair_killed_between_two_cuts_is_resumed(tmp_path):
    """A real SIGKILL of ``tidstorage repair`` after it cut a and before it
    cut b (the test hook only places the kill): the re-run replays the
    recorded plan (the same cut points; recomputing on the half-cut set
    would choose others), keeps the safety copies, and ends coherent."""
    import os
    import signal
    import subprocess
    import time

    from support.fsfixtures import TIDSTORAGE

    from tidstorage.tools.repair import PAUSE_AFTER_CUT_ENV, PLAN_SUFFIX

    site, t = _crash_site(tmp_path)
    originals = {s: digest(site.data_fs(s)) for s in site.ids}
    marker = tmp_path / "paused"
    proc = subprocess.Popen(TIDSTORAGE + ["repair", "-c", str(site.config)],
                            env={**os.environ, PAUSE_AFTER_CUT_ENV: str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "repair never reached its first cut"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert marker.read_text() == "a"
    plans = [site.data_fs(s).with_name("Data.fs" + PLAN_SUFFIX) for s in site.ids]
    assert all(p.exists() for p in plans)
    # half cut: a is cut, b is not
    assert filestorage.last_tid(site.data_fs("a")) < t["a"]
    assert digest(site.data_fs("b")) == originals["b"]

    # The daemon's TID log moves on meanwhile: the replay must not use it.
    with open(site.tidlog, "ab") as f:
        from tidstorage.formats import tidlog
        f.write(tidlog.encode_record(time.time(), tidlog.KIND_FULL, {"a": t["a"], "b": t["b"]}))
    # A dry run says the recorded plan would be resumed (its cut points), and
    # changes nothing.
    state = tree_state(site.root)
    r = run_cli("repair", "-c", site.config, "--dry-run", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    plan = json.loads(r.stdout)
    assert any("would resume it" in n for n in plan["notes"])
    assert {s: p["cut_tid"] < t[s] for s, p in plan["storages"].items()} == {"a": True,
                                                                             "b": True}
    assert tree_state(site.root) == state and all(p.exists() for p in plans)
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming the interrupted repair" in r.stdout
    assert f"storage a: {site.data_fs('a')} already cut" in r.stdout
    assert "made by the interrupted repair) checked" in r.stdout
    assert "verify: coherent" in r.stdout
    for s in site.ids:
        assert digest(site.data_fs(s).with_name("Data.fs.before-repair")) == originals[s]
        assert filestorage.last_tid(site.data_fs(s)) < t[s]
        assert t[s] not in _blob_tids(site.blob_dir(s))
    assert not any(p.exists() for p in plans)  # done: the plan is gone
    counts = {s: read_counters(site.data_fs(s), site.blob_dir(s)) for s in site.ids}
    assert counts["a"]["multi"] == counts["b"]["multi"] == 3
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 0 and "nothing to repair" in r.stdout


def test_a_plan_is_not_replayed_over_a_file_that_changed(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from support.fsfixtures import TIDSTORAGE

    from tidstorage.tools.repair import PAUSE_AFTER_CUT_ENV

    site, t = _crash_site(tmp_path)
    marker = tmp_path / "paused"
    proc = subprocess.Popen(TIDSTORAGE + ["repair", "-c", str(site.config)],
                            env={**os.environ, PAUSE_AFTER_CUT_ENV: str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    with open(site.data_fs("b"), "ab") as f:
        f.write(b"more")    # someone wrote to b since
    state = tree_state(site.root)
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 1
    assert f"storage b: {site.data_fs('b')} is " in r.stderr and "changed since the plan" in r.stderr
    assert "remove the plan files" in r.stderr
    assert tree_state(site.root) == state


def test_dry_run_of_a_wrong_log_shows_the_lowering_and_changes_nothing(tmp_path):
    """The default config (legacy writers may not stamp): the log's rule,
    lowered where the log's point splits T; the dry run changes nothing and
    the repair then cuts where the plan said."""
    site, t = _crash_site(tmp_path, publish_t=True, torn=False)
    before = tree_state(site.root)
    r = run_cli("repair", "-c", site.config, "--dry-run", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_state(site.root) == before
    assert not list(site.root.rglob("*.repair-plan"))
    plan = json.loads(r.stdout)
    assert plan["rule"] == "log" and plan["all_writers_stamp"] is False
    assert any("'T-crash'" in sp and "missing in b" in sp for sp in plan["log_splits"])
    a, b = plan["storages"]["a"], plan["storages"]["b"]
    assert a["rule"] == "lowered" and b["rule"] == "log"
    assert a["log_tid"] == t["a"] and a["cut_tid"] < t["a"]
    assert a["dropped"] == 1 and a["log_dropped"] == 0 and b["dropped"] == 0
    [txn] = a["transactions"]
    assert txn["tid"] == t["a"] and txn["stamp"] == "T-crash"
    assert txn["reason"].startswith("below the TID log's point")
    assert "cut LOWERED" in r.stderr  # the tool's messages: stderr with --json
    assert run_cli("repair", "-c", site.config, "--json").returncode == 2
    r = run_cli("repair", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert site.data_fs("a").stat().st_size == a["offset"]
    assert site.data_fs("b").stat().st_size == b["offset"] == b["size"]
