"""tidstorage standby sync / promote (issue 13): real FileStorages, real
repozo repositories made by ``run_backup``, a sync killed for real."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from persistent.mapping import PersistentMapping
from support.fsfixtures import TIDSTORAGE, Site, digest, read_counters, run_cli, tree_state

from tidstorage.config import load_config
from tidstorage.errors import ToolError
from tidstorage.formats import filestorage
from tidstorage.formats.repozo import format_timestamp, repozo_argv
from tidstorage.formats.tidlog import read_log
from tidstorage.tools import verify
from tidstorage.tools.backup import run_backup
from tidstorage.tools.restore import run_restore
from tidstorage.tools.standby import (
    PROMOTED_FILE,
    run_promote,
    run_sync,
    standby_paths,
)


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


def _backup(site: Site, **kw):
    r = run_backup(load_config(site.config), ask_daemon=False, **kw)
    assert r.ok, r.storages
    return r


def _recovered(site: Site, sid: str, tmp: Path) -> str:
    """sha256 of ``repozo -R`` of storage ``sid``'s repository (the reference)."""
    out = tmp / f"ref-{sid}.fs"
    out.unlink(missing_ok=True)
    subprocess.run(repozo_argv() + ["-R", "-r", str(site.repo(sid)), "-o", str(out)],
                   check=True, capture_output=True)
    return digest(out)


def _assert_mirrors_repozo(site: Site, standby: Path, tmp: Path) -> None:
    for sid in site.ids:
        fs = standby_paths(standby, sid)[0]
        assert digest(fs) == _recovered(site, sid, tmp), sid
        assert not Path(f"{fs}.index").exists()


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def test_sync_after_1_5_and_20_increments(tmp_path):
    site = Site(tmp_path / "site")
    standby = tmp_path / "standby"
    config = load_config(site.config)
    with site:
        for sid in site.ids:  # a big first full backup: 4 MiB per storage
            site.root_of(sid)["big"] = PersistentMapping(data=b"x" * (4 << 20))
        site.commit(blob=True)
        site.publish()
        _backup(site)
        first = run_sync(config, standby)
        assert {r.mode for r in first.storages.values()} == {"new"}
        _assert_mirrors_repozo(site, standby, tmp_path)
        for batch, gzip in ((1, False), (5, True), (20, False)):
            for _ in range(batch):
                site.commit(blob=True)
                site.commit(["b"])
                site.publish()
                _backup(site, gzip=gzip)
            before = _rchar()
            result = run_sync(config, standby)
            read = _rchar() - before
            for sid, r in result.storages.items():
                assert r.mode == "incremental", (sid, r.mode, r.reason)
                assert len(r.applied) == batch
                assert all(n.endswith(".deltafsz" if gzip else ".deltafs") for n in r.applied)
                assert r.blob_snapshot is not None
            # cheap: the increments and the last one's check, never a whole file
            assert read < 4 << 20, read
            _assert_mirrors_repozo(site, standby, tmp_path)
            for sid in site.ids:  # the blobs too
                bd = standby_paths(standby, sid)[1]
                assert len(list(bd.rglob("*.blob"))) == len(site.blob_data[sid])
        again = run_sync(config, standby)
        assert {r.mode for r in again.storages.values()} == {"unchanged"}
        assert all(r.bytes == 0 for r in again.storages.values())


def test_sync_after_pack_recovers_that_storage_fully_and_prunes_tidlog_copies(tmp_path):
    from ZODB.serialize import referencesf  # noqa: F401  (the pack's default)

    site = Site(tmp_path / "site", keep_full_backups=5)
    standby = tmp_path / "standby"
    config = load_config(site.config)
    with site:
        for _ in range(3):
            site.commit(blob=True)
        site.publish()
        _backup(site)
        site.commit()
        site.publish()
        _backup(site)
        run_sync(config, standby)
        site.dbs["a"].pack(time.time() + 1)
        site.commit()
        site.publish()
        r = _backup(site)
        assert r.storages["a"].mode == "full" and r.storages["b"].mode == "incremental"
        result = run_cli("standby", "sync", "-c", site.config, "--dir", standby, "--json")
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        a = out["storages"]["a"]
        assert a["mode"] == "full" and "new full backup" in a["reason"], a
        assert out["storages"]["b"]["mode"] == "incremental"
        assert out["tidlogs"]["pruned"] == []  # b and c still on their first chain
        _assert_mirrors_repozo(site, standby, tmp_path)
        # every storage on a new chain: the copies before it are no longer needed
        site.commit()
        site.publish()
        full = _backup(site, full=True)
        result = run_sync(config, standby)
        assert {r.mode for r in result.storages.values()} == {"full"}
        assert len(result.tidlogs_pruned) == 3
        assert result.tidlogs_kept == [Path(full.tidlog_copy).name]
        assert sorted(p.name for p in (standby / "tidlog").iterdir()) == sorted(
            [Path(full.tidlog_copy).name, Path(full.tidlog_copy).name
             + ".tidstorage-identity.json"])
        _assert_mirrors_repozo(site, standby, tmp_path)


def test_corrupt_increment_clear_error_standby_unchanged(tmp_path):
    site = Site(tmp_path / "site")
    standby = tmp_path / "standby"
    with site:
        site.commit(blob=True)
        site.publish()
        _backup(site)
        run_sync(load_config(site.config), standby)
        site.commit(blob=True)
        site.publish()
        _backup(site)
    before = tree_state(standby)
    delta = sorted(site.repo("b").glob("*.deltafs"))[-1]
    data = bytearray(delta.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the md5 can tell
    delta.write_bytes(bytes(data))
    r = run_cli("standby", "sync", "-c", site.config, "--dir", standby)
    assert r.returncode == 1
    assert f"repository file {delta}" in r.stderr and "md5" in r.stderr, r.stderr
    assert tree_state(standby) == before  # a's and c's good increments not applied either


def _state_end(standby: Path, sid: str) -> int:
    return json.loads(standby_paths(standby, sid)[2].read_text())["last"]["end"]


def test_interrupted_sync_is_rolled_back_and_completed(tmp_path):
    site = Site(tmp_path / "site", blobs=False)
    standby = tmp_path / "standby"
    with site:
        site.commit()
        site.publish()
        _backup(site)
        run_sync(load_config(site.config), standby)
        # a 48 MiB increment for b (random bytes: real work to append)
        root = site.root_of("b")
        for i in range(48):
            root[f"chunk{i}"] = PersistentMapping(data=os.urandom(1 << 20))
        site.commit(["b"])
        site.commit()
        site.publish()
        _backup(site)
    fs_b = standby_paths(standby, "b")[0]
    end = _state_end(standby, "b")
    proc = subprocess.Popen(TIDSTORAGE + ["standby", "sync", "-c", str(site.config),
                                          "--dir", str(standby)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught = False
    try:
        while proc.poll() is None:
            if fs_b.stat().st_size > end:  # appending: stop it there, then kill -9
                os.kill(proc.pid, signal.SIGSTOP)
                caught = True
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert caught, "the sync ended before it could be stopped mid-append"
    killed_size = fs_b.stat().st_size
    assert killed_size > end and _state_end(standby, "b") == end  # mid-way, unrecorded
    out = run_cli("standby", "sync", "-c", site.config, "--dir", standby, "--json")
    assert out.returncode == 0, out.stderr
    b = json.loads(out.stdout)["storages"]["b"]
    assert b["mode"] == "incremental" and len(b["applied"]) == 1, b
    assert b["rolled_back"] == killed_size - end
    _assert_mirrors_repozo(site, standby, tmp_path)


def _split_site(root: Path):
    """Backup 1 coherent (multi == 3); backup 2 holds T in b and c, not a."""
    site = Site(root)
    info = {}
    with site:
        for _ in range(3):
            site.commit(blob=True)
        site.publish()
        info["t1"] = read_log(site.tidlog).records[-1].time
        info["r1"] = _backup(site)
        while time.time() < math.ceil(info["t1"]) + 0.2:
            time.sleep(0.05)
        site.commit(blob=True)
        site.commit(["a", "c"], blob=True)
        site.publish()

        def after(r):
            if r.id == "a":
                info["T"] = site.commit(blob=True, stamp_id="T-split")
                site.publish()

        info["r2"] = run_backup(load_config(site.config), jobs=1, after_storage=after,
                                ask_daemon=False)
        assert info["r2"].ok
    return site, info


def test_promote_into_a_copy_then_in_place(tmp_path):
    site, info = _split_site(tmp_path / "site")
    config = load_config(site.config)
    standby = tmp_path / "standby"
    run_sync(config, standby)
    # sync never cuts: T is in b and c, not in a
    paths = {s: standby_paths(standby, s)[0] for s in site.ids}
    assert verify.check(paths, window=3600).splits
    state = tree_state(standby)

    # into a copy: the same files as restore's
    out = tmp_path / "out"
    r = run_cli("standby", "promote", "-c", site.config, "--dir", standby,
                "--output-dir", out)
    assert r.returncode == 0, r.stderr
    assert "promoted into" in r.stdout and "data_fs = " in r.stdout
    assert tree_state(standby) == state  # the standby is unchanged
    ref = tmp_path / "restored"
    run_restore(config, output_dir=ref)
    for sid in site.ids:
        assert digest(out / f"{sid}.fs") == digest(ref / f"{sid}.fs"), sid
        c = read_counters(out / f"{sid}.fs", out / f"{sid}.blobs")
        assert c["multi"] == 4, (sid, c)  # backup 2's point: before T
        assert len(c["blobs"]) == len(list((ref / f"{sid}.blobs").rglob("*.blob")))
    tids = read_log(out / "tidstorage.tid").final_tids()
    assert tids == {s: filestorage.last_tid(out / f"{s}.fs") for s in site.ids}

    # --at the first backup's point: multi == 3
    at = format_timestamp(math.ceil(info["t1"]))
    pitr = tmp_path / "pitr"
    res = run_promote(config, standby, at=at, output_dir=pitr)
    assert all(read_counters(pitr / f"{s}.fs", pitr / f"{s}.blobs")["multi"] == 3
               for s in site.ids)
    assert res.tids == read_log(info["r1"].tidlog_copy).final_tids()
    with pytest.raises(ToolError, match="no point .* at or before --at"):
        run_promote(config, standby, at="2000-01-01", output_dir=tmp_path / "never")

    # in place: the same cut, O(tail), and the standby is consumed
    res = run_promote(config, standby)
    assert res.in_place
    for sid in site.ids:
        assert digest(paths[sid]) == digest(out / f"{sid}.fs")
        assert not Path(f"{paths[sid]}.index").exists()
        bd = standby_paths(standby, sid)[1]
        assert (sorted(p.name for p in bd.rglob("*.blob"))
                == sorted(p.name for p in (out / f"{sid}.blobs").rglob("*.blob")))
    assert json.loads((standby / PROMOTED_FILE).read_text())["status"] == "promoted"
    r = run_cli("standby", "sync", "-c", site.config, "--dir", standby)
    assert r.returncode == 1 and "was promoted" in r.stderr
    with pytest.raises(ToolError, match="was promoted"):
        run_promote(config, standby)


def test_interrupted_in_place_promote_is_resumed(tmp_path):
    site, _info = _split_site(tmp_path / "site")
    config = load_config(site.config)
    standby = tmp_path / "standby"
    run_sync(config, standby)
    copy = run_promote(config, standby, output_dir=tmp_path / "out")
    # as if killed after cutting b only
    marker = standby / PROMOTED_FILE
    b = standby_paths(standby, "b")[0]
    filestorage.truncate_at(b, copy.cuts["b"]["offset"])
    marker.write_text(json.dumps({"status": "promoting", "started": "x",
                                  "tidlog": str(copy.tidlog), "point_time": copy.point_time,
                                  "tids": copy.tids,
                                  "kept": {s: c["last_tid"] for s, c in copy.cuts.items()}}))
    res = run_promote(config, standby)
    assert res.resumed
    for sid in site.ids:
        assert digest(standby_paths(standby, sid)[0]) == digest(tmp_path / "out" / f"{sid}.fs")


def test_a_full_backup_being_written_is_not_used_yet(tmp_path):
    site = Site(tmp_path / "site", blobs=False)
    standby = tmp_path / "standby"
    config = load_config(site.config)
    with site:
        site.commit()
        site.publish()
        _backup(site)
        run_sync(config, standby)
        site.commit()
        site.publish()
        _backup(site)
    # repozo -F renamed its data file, its .dat line not written yet
    full = sorted(site.repo("a").glob("*.fs"))[-1]
    (site.repo("a") / "2999-01-01-00-00-00.fs").write_bytes(full.read_bytes())
    result = run_sync(config, standby)
    assert result.storages["a"].mode == "incremental", result.storages["a"].reason
    assert len(result.storages["a"].applied) == 1


def test_promote_at_a_plan_whose_backup_named_its_snapshot_before_its_repozo_file(tmp_path):
    """A backup names its blob snapshot by its start and its repozo files a
    moment later, so a second boundary may fall between them (as here, made
    certain by naming the snapshots a second earlier): promote --plan takes
    the backup's own snapshot, instead of refusing it as older than the
    plan's backup (it compared the snapshot's name with the repozo file's)."""
    from tidstorage.formats import blobs
    from tidstorage.formats.repozo import timestamp_seconds
    from tidstorage.tools.common import blob_backup_dir

    site = Site(tmp_path / "site", ids=("a", "b"))
    with site:
        site.commit(blob=True)
        site.commit(blob=True)
        site.publish()
    _backup(site)
    for sid in site.ids:
        snaps = blob_backup_dir(site.repo(sid))
        (name,) = blobs.list_snapshots(snaps)
        earlier = format_timestamp(timestamp_seconds(name) - 1)
        os.rename(snaps / name, snaps / earlier)
    r = run_cli("restore", "-c", site.config, "--plan", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    plan = tmp_path / "plan.json"
    plan.write_text(r.stdout)
    standby = tmp_path / "standby"
    r = run_cli("standby", "sync", "-c", site.config, "--dir", standby)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("standby", "promote", "-c", site.config, "--dir", standby, "--plan", plan,
                "--storages", "a")
    assert r.returncode == 0, r.stdout + r.stderr
    paths = standby_paths(standby, "a")
    assert read_counters(paths[0], paths[1])["blobs"] == site.blob_data["a"]
