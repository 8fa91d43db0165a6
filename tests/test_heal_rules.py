"""The coherency rules learn heals (issue 12), on a real daemon over real
runzeo servers: a split freezes its storages; the heal (an undo stamped
``heals``, committed here by hand through ZEO) frees them and the point
moves past it; ``verify`` says healed; an accepted split is recorded in
the TID log and survives a daemon restart. The ``heal`` command itself is
tested in test_heal.py."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from support.rawzeo import raw_commit
from tidstorage.core.stamps import stamp_value
from tidstorage.demo.cluster import DaemonProcess
from tidstorage.formats.tidlog import read_log

ADMIN = "an-admin-token-of-enough-length"


@pytest.fixture
def site(tmp_path, two_zeo_servers):
    a, b = two_zeo_servers
    zeo = {"a1": (a, "1"), "a2": (a, "2"), "b1": (b, "1")}
    admin = tmp_path / "admin"
    admin.write_text(ADMIN + "\n")
    admin.chmod(0o600)
    d = DaemonProcess(tmp_path / "d", storages={
        n: {"zeo": f"127.0.0.1:{srv.address[1]}", "zeo_storage": st,
            "data_fs": str(srv.data_fs(st))} for n, (srv, st) in zeo.items()},
        server={"admin_token_file": str(admin)}).start()
    d.wait_bootstrapped()
    d.spec = {n: (srv.address, st) for n, (srv, st) in zeo.items()}
    yield d
    d.kill()


def commit(site, name, stamp=None, undo=None) -> int:
    return raw_commit(*site.spec[name], stamp, undo)


def status(site) -> dict:
    with site.client() as c:
        return c.admin({"verb": "status"})


def until(site, predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        s = status(site)
        if predicate(s):
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.1)


def verify(site, *args):
    return subprocess.run([sys.executable, "-m", "tidstorage", "verify", "-c",
                           str(site.config_path), *args], capture_output=True, text=True,
                          timeout=120)


def test_a_heal_frees_the_split_storages_and_the_point_moves_past_it(site):
    split = commit(site, "a1", stamp_value("ts:dead-1", ["a1", "a2"]))
    s = until(site, lambda s: "ts:dead-1" in s["splits"])
    assert s["published"]["a1"] < split  # frozen below it
    later = commit(site, "a1")
    assert verify(site).returncode == 1  # the live files hold the split
    heal = commit(site, "a1", stamp_value("ts:heal-1", ["a1"], heals="ts:dead-1"), undo=split)
    s = until(site, lambda s: s["published"].get("a1", -1) >= heal)
    assert s["split_count"] == 0 and "ts:dead-1" in s["healed"]
    assert later < heal
    assert "HEALED" in site.log()
    r = verify(site)
    assert r.returncode == 0, r.stdout
    assert "healed: split transaction ts:dead-1 is undone by its heal on a1" in r.stdout
    # --compute: the largest coherent cut of the files keeps the healed
    # split (and its heal) in: it reaches the end of a1
    import json

    r = verify(site, "--compute", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["coherent"] is True and "ts:dead-1" in report["healed"], report
    cut = report["coherent_cut"]["a1"]
    assert cut["dropped"] == 0 and cut["offset"] == cut["size"] and cut["tid"] == heal, cut


def test_an_accepted_split_is_recorded_and_survives_a_restart(site):
    split = commit(site, "b1", stamp_value("ts:dead-2", ["b1", "a2"]))
    until(site, lambda s: "ts:dead-2" in s["splits"])
    with site.client() as c:
        refused = c.admin({"verb": "accept", "split": "ts:dead-2", "token": "wrong"})
        assert refused["ok"] is False
        ok = c.admin({"verb": "accept", "split": "ts:dead-2", "token": ADMIN})
    assert ok["ok"], ok
    s = until(site, lambda s: s["published"].get("b1", -1) >= split)
    assert s["split_count"] == 0 and s["accepted"] == ["ts:dead-2"]
    assert read_log(site.status_file).accepted() == {"ts:dead-2"}
    site.stop()
    site.start()
    site.wait_bootstrapped()
    s = until(site, lambda s: s["bootstrapped"])
    assert s["accepted"] == ["ts:dead-2"] and s["split_count"] == 0
    r = verify(site)
    assert r.returncode == 0, r.stdout
    assert "accepted: split transaction ts:dead-2" in r.stdout
    # repair (here its plan) honours the acceptance: the TID log's point,
    # which keeps the accepted split on b1, is not lowered below it
    r = subprocess.run([sys.executable, "-m", "tidstorage", "repair", "-c",
                        str(site.config_path), "--dry-run", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    plan = json.loads(r.stdout)
    b1 = next(sp for sp in plan["storages"] if sp["id"] == "b1") if isinstance(
        plan["storages"], list) else plan["storages"]["b1"]
    assert b1["rule"] != "lowered" and b1["cut_tid"] >= split, b1


@pytest.fixture
def backed_site(tmp_path, two_zeo_servers):
    a, b = two_zeo_servers
    zeo = {"a1": (a, "1"), "a2": (a, "2"), "b1": (b, "1")}
    d = DaemonProcess(tmp_path / "d", storages={
        n: {"zeo": f"127.0.0.1:{srv.address[1]}", "zeo_storage": st,
            "data_fs": str(srv.data_fs(st)), "backup_dir": str(tmp_path / "backups" / n)}
        for n, (srv, st) in zeo.items()},
        backup={"timestamp_file": str(tmp_path / "backups" / "timestamps"),
                "status_file_backup_dir": str(tmp_path / "backups" / "tidlog")}).start()
    d.wait_bootstrapped()
    d.spec = {n: (srv.address, st) for n, (srv, st) in zeo.items()}
    d.tmp = tmp_path
    yield d
    d.kill()


def test_backups_between_a_split_and_its_heal_and_after_both_restore_coherent(backed_site):
    from tidstorage.formats.filestorage import last_tid

    site = backed_site
    before = commit(site, "a1")
    split = commit(site, "a1", stamp_value("ts:dead-3", ["a1", "a2"]))
    until(site, lambda s: "ts:dead-3" in s["splits"])
    first = run_cli(site, "backup", "--json")
    heal = commit(site, "a1", stamp_value("ts:heal-3", ["a1"], heals="ts:dead-3"), undo=split)
    until(site, lambda s: s["published"].get("a1", -1) >= heal)
    second = run_cli(site, "backup", "--json")
    for backup, expected in ((first, before), (second, heal)):
        out = site.tmp / f"restored-{backup['timestamp']}"
        r = subprocess.run([sys.executable, "-m", "tidstorage", "restore", "-c",
                            str(site.config_path), "--date", backup["timestamp"],
                            "--output-dir", str(out)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verify: coherent" in r.stdout
        # the first cut below the split, the second past the heal
        assert last_tid(out / "a1.fs") == expected, (backup["timestamp"], r.stdout)
        if expected == heal:  # the healed split kept, and said so
            assert "healed: split transaction ts:dead-3" in r.stdout, r.stdout


def run_cli(site, *args):
    import json

    r = subprocess.run([sys.executable, "-m", "tidstorage", *args, "-c", str(site.config_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)
