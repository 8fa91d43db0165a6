"""Fresh, checked backups (issue 10, item 3), on a real cluster: runzeo,
a real daemon whose TID log lags by its burst_period, real repozo.

The backup asks the daemon for its point: the TID log copy ends at the
daemon's point at backup time, not at the log's last record; it warns when
the point lags, ``--max-lag`` makes it fail (nothing backed up), and an
unreachable daemon falls back to the log with a warning.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import transaction

from tidstorage.demo import workload
from tidstorage.demo.cluster import DaemonProcess
from tidstorage.formats.tidlog import read_log
from test_storage import wait_published


def run(*args):
    return subprocess.run([sys.executable, "-m", "tidstorage", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def site(tmp_path, two_zeo_servers):
    a, b = two_zeo_servers
    zeo = {"a1": (a, "1"), "a2": (a, "2"), "b1": (b, "1")}
    storages = {
        name: {"zeo": f"127.0.0.1:{srv.address[1]}", "zeo_storage": st,
               "data_fs": str(srv.data_fs(st)), "backup_dir": str(tmp_path / "backups" / name)}
        for name, (srv, st) in zeo.items()}
    backup = {"timestamp_file": str(tmp_path / "backups" / "timestamps"),
              "status_file_backup_dir": str(tmp_path / "backups" / "tidlog")}
    # Records at most once an hour: the log's last record stays behind.
    d = DaemonProcess(tmp_path / "daemon", storages=storages, backup=backup,
                      server={"burst_period": 3600, "full_dump_period": 3600}).start()
    d.wait_bootstrapped()

    class Site:
        daemon = d
        servers = {"a": a, "b": b}
        spec = {name: (srv.address, st) for name, (srv, st) in zeo.items()}
        tmp = tmp_path

        def commit(self, n=1):
            dbs = workload.open_databases(self.spec, d.address, timeout=5)
            try:
                for i in range(n):
                    for name in ("a1", "a2", "b1"):
                        conn = dbs[name].open()
                        conn.root()[f"k{i}"] = time.time()
                        transaction.commit()
                        conn.close()
                return {name: int.from_bytes(db.storage.lastTransaction(), "big")
                        for name, db in dbs.items()}
            finally:
                for db in dbs.values():
                    db.close()

    yield Site()
    d.kill()


def backup(site, *args):
    r = run("backup", "-c", str(site.daemon.config_path), "--json", *args)
    out = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    return r, out


def test_the_copy_ends_at_the_daemons_point_not_the_logs_last_record(site):
    site.commit()
    lasts = site.commit()  # after the first change: only in the daemon, not in its log
    point = wait_published(site.daemon, lambda t: all(t.get(s, -1) >= v for s, v in lasts.items()))
    live = read_log(site.daemon.status_file).final_tids()
    assert any(live.get(s, -1) < point[s] for s in lasts), (live, point)  # the log lags
    r, out = backup(site)
    assert r.returncode == 0, r.stderr
    assert out["point_source"] == "daemon"
    copy = read_log(out["tidlog_copy"]).final_tids()
    assert all(copy[s] >= point[s] for s in lasts), (copy, point)
    assert read_log(site.daemon.status_file).final_tids() == live  # the live log untouched
    # The restore keeps every transaction committed before the backup.
    outdir = site.tmp / "restored"
    r = run("restore", "-c", str(site.daemon.config_path), "--output-dir", str(outdir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a1: done" in r.stderr  # progress lines outside a terminal
    from tidstorage.formats.filestorage import last_tid
    for s, tid in lasts.items():
        assert last_tid(outdir / f"{s}.fs") == tid


def test_max_lag_fails_before_the_bootstrap_and_the_default_warns(site):
    site.commit()
    site.daemon.stop()
    site.servers["b"].stop()  # the restarted daemon cannot bootstrap
    site.daemon.start()
    r, out = backup(site, "--max-lag", "60")
    assert r.returncode == 1 and "bootstrap" in r.stderr and "no backup made" in r.stderr
    assert not (site.tmp / "backups" / "timestamps").exists()
    assert not list((site.tmp / "backups" / "tidlog").glob("tidstorage.tid-*"))
    r, out = backup(site)
    assert r.returncode == 0, r.stderr
    assert any("bootstrap" in w for w in out["warnings"])


def test_lagging_point_warns_and_max_lag_fails(site):
    site.commit()
    with site.daemon.client() as legacy:
        legacy.begin("legacy-1", ["a1", "a2"], sync=True)  # holds a1 and a2
        site.commit()
        deadline = time.monotonic() + 60
        while True:  # until the lag is over 1 s (it only grows while held)
            r = run("status", "-c", str(site.daemon.config_path), "--json", "--warn", "1",
                    "--crit", "100000")
            if r.returncode == 1:
                break
            assert time.monotonic() < deadline, r.stdout
            time.sleep(0.2)
        r, out = backup(site, "--max-lag", "1")
        assert r.returncode == 1 and "lags" in r.stderr and "a1" in r.stderr
        assert not (site.tmp / "backups" / "timestamps").exists()
        legacy.abort("legacy-1")
        legacy.sync()


def test_an_unreachable_daemon_falls_back_to_the_log(site):
    site.commit()
    site.daemon.stop()
    r, out = backup(site, "--max-lag", "60")
    assert r.returncode == 1 and "cannot ask the daemon" in r.stderr
    r, out = backup(site)
    assert r.returncode == 0, r.stderr
    assert out["point_source"] == "tidlog"
    assert any("cannot ask the daemon" in w for w in out["warnings"])
    # and the plain output (not a terminal) says where the point came from
    r = run("backup", "-c", str(site.daemon.config_path))
    assert r.returncode == 0, r.stderr
    assert "restore point: the TID log's last record" in r.stdout
    assert "a1: done" in r.stderr  # progress lines outside a terminal
