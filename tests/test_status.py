"""``tidstorage status`` (issue 10, item 1) on a real cluster: runzeo
servers, a real daemon process, the CLI as a subprocess; each state gives
its monitoring-plugin exit code. ``dump`` shows the lag; ``dump --json``
exits 1 while the bootstrap is not complete.

No assertion waits on a short clock: states are polled with generous
deadlines, and the thresholds are set so that the state asked for is the
only one reachable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import transaction

from tidstorage.core import health
from tidstorage.demo.cluster import DaemonProcess, free_port
from support.rawzeo import raw_commit
from test_storage import open_connected, wait_published

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


def status(config, *args, env=None):
    r = subprocess.run([sys.executable, "-m", "tidstorage", "status", "-c", str(config), *args],
                       capture_output=True, text=True, timeout=60, env=env)
    return r


def status_json(config, *args):
    r = status(config, "--json", *args)
    return r.returncode, json.loads(r.stdout)


def poll_status(config, code, *args, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        got, data = status_json(config, *args)
        if got == code:
            return data
        assert time.monotonic() < deadline, (code, got, data.get("findings"))
        time.sleep(0.2)


def commit(db, key="k"):
    conn = db.open()
    try:
        conn.root()[key] = conn.root().get(key, 0) + 1
        transaction.commit()
    finally:
        conn.close()


def test_healthy_then_lagging_then_critical_then_ok(cluster):
    config = cluster.daemon.config_path
    dbs = open_connected(cluster)
    try:
        for db in dbs.values():
            commit(db)
        lasts = {name: int.from_bytes(db.storage.lastTransaction(), "big")
                 for name, db in dbs.items()}
        wait_published(cluster.daemon, lambda t: all(t.get(s, -1) >= v for s, v in lasts.items()))
        # Healthy and idle: lag 0 everywhere, OK.
        data = poll_status(config, OK)
        assert data["state"] == "OK"
        lags = {s: i["lag"] for s, i in data["status"]["storages"].items()}
        assert lags == {"a1": 0.0, "a2": 0.0, "b1": 0.0, "elsewhere": 0.0}
        r = status(config)
        assert r.returncode == OK and r.stdout.startswith("TIDSTORAGE OK")
        assert "lag_a1=0.000s" in r.stdout  # perfdata

        # A legacy client's transaction over a1 stays in flight: a1 is held
        # below it, and what commits on a1 after it is not published.
        with cluster.daemon.client() as legacy:
            legacy.begin("legacy-1", ["a1", "elsewhere"], sync=True)
            commit(dbs["a1"], "late")
            data = poll_status(config, WARNING, "--warn", "0.5", "--crit", "100000")
            a1 = data["status"]["storages"]["a1"]
            assert a1["lag"] >= 0.5 and a1["oldest_unpublished"] is not None
            assert any("storage a1: lag" in f["text"] for f in data["findings"])
            assert data["status"]["storages"]["b1"]["lag"] == 0.0
            poll_status(config, CRITICAL, "--warn", "0.5", "--crit", "1")
            # dump shows the same lag
            r = subprocess.run([sys.executable, "-m", "tidstorage", "dump", "-c", str(config)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            row = next(line for line in r.stdout.splitlines() if line.startswith("a1\t"))
            assert float(row.split("\t")[-1].split()[0]) >= 1.0
            legacy.commit("legacy-1", {"a1": a1["published"] or 0, "elsewhere": 1})
            legacy.sync()
        # Nothing held any more: back to OK, lag 0.
        data = poll_status(config, OK)
        assert data["status"]["storages"]["a1"]["lag"] == 0.0
    finally:
        for db in dbs.values():
            db.close()


def test_a_frozen_split_is_critical_and_an_unknown_id_a_warning(cluster):
    config = cluster.daemon.config_path
    # A stamped transaction over a1 and a2 written on a1 only, never
    # reported (a writer that died between its finishes): a real split.
    address, storage = cluster.zeo_spec()["a1"]
    raw_commit(address, storage, {"id": "ts:deadbeef-1", "storages": ["a1", "a2"]})
    data = poll_status(config, CRITICAL)
    assert data["status"]["split_count"] == 1
    assert any("split" in f["text"] and "ts:deadbeef-1" in f["text"] for f in data["findings"])
    problems = data["status"]["storages"]["a1"]["problems"]
    assert any(p.startswith("frozen") for p in problems)

    # An id nobody configured (a name typo in zope.conf): WARNING among the
    # findings (the split keeps the state CRITICAL).
    with cluster.daemon.client() as c:
        c.begin("typo-1", ["secnd"])  # refused (not configured)
        c.dump()  # applied
    data = poll_status(config, CRITICAL)
    assert any(f["state"] == "WARNING" and "secnd" in f["text"] for f in data["findings"])


def test_daemon_down_is_critical_bad_config_unknown(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text(f"[server]\nport = {free_port()}\n")
    r = status(config)
    assert r.returncode == CRITICAL and "unreachable" in r.stdout
    config.write_text("[server]\nprot = 1\n")
    r = status(config)
    assert r.returncode == UNKNOWN and "server.prot" in r.stdout
    r = status(tmp_path / "missing.toml")
    assert r.returncode == UNKNOWN
    # the config from the environment
    config.write_text(f"[server]\nport = {free_port()}\n")
    env = dict(os.environ, TIDSTORAGE_CONFIG=str(config))
    r = subprocess.run([sys.executable, "-m", "tidstorage", "status"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == CRITICAL, r.stdout + r.stderr


def test_not_bootstrapped_warns_and_dump_json_exits_1(tmp_path):
    # A ZEO server that never answers: the bootstrap cannot complete.
    d = DaemonProcess(tmp_path / "d", storages={
        "a": {"zeo": f"127.0.0.1:{free_port()}"}}).start()
    try:
        data = poll_status(d.config_path, WARNING)
        assert data["status"]["bootstrapped"] is False
        assert any("bootstrap not complete" in f["text"] for f in data["findings"])
        assert data["status"]["storages"]["a"]["lag"] is None
        r = subprocess.run([sys.executable, "-m", "tidstorage", "dump", "-c", str(d.config_path),
                            "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stdout == ""
        assert "bootstrap" in r.stderr
    finally:
        d.kill()


def test_assess_rules():
    base = {"bootstrapped": True, "storages": {"a": {"kind": "zeo", "lag": 0.0, "problems": []}}}
    assert health.assess(base).code == OK
    lagging = {**base, "storages": {"a": {"kind": "zeo", "lag": 61.0, "problems": []}}}
    assert health.assess(lagging).code == WARNING
    assert health.assess(lagging, warn=10, crit=60).code == CRITICAL
    failing = {**base, "tidlog": {"path": "x", "failing": True, "unwritten": 1,
                                  "last_record_age": 1.0}}
    assert health.assess(failing).code == CRITICAL
    stale = {**base, "tidlog": {"path": "x", "failing": False, "unwritten": 0,
                                "last_record_age": 1000.0}}
    assert health.assess(stale, full_dump_period=300).code == WARNING
    assert health.assess(stale).code == OK  # no periodic records: age says nothing


def test_the_lag_of_a_storage_the_daemon_cannot_read_comes_from_the_reports(cluster):
    config = cluster.daemon.config_path
    with cluster.daemon.client() as holder, cluster.daemon.client() as writer:
        writer.begin("w-0", ["elsewhere"])
        writer.commit("w-0", {"elsewhere": 0x03C5A5B2E5F0A000})
        writer.sync()
        poll_status(config, OK)
        holder.begin("h-1", ["elsewhere", "a2"], sync=True)  # in flight: holds both
        writer.begin("w-1", ["elsewhere"])
        writer.commit("w-1", {"elsewhere": 0x03C5A5B2E5F0B000})  # held back
        writer.sync()
        data = poll_status(config, CRITICAL, "--warn", "1", "--crit", "2")
        info = data["status"]["storages"]["elsewhere"]
        assert info["oldest_unpublished"] == 0x03C5A5B2E5F0B000 and info["lag"] > 2
        holder.abort("h-1")
        holder.sync()
        data = poll_status(config, OK)
        assert data["status"]["storages"]["elsewhere"]["lag"] == 0.0
