"""Storages on several hosts (issue 13), on real parts: runzeo, a real
daemon, real repozo.

Two "hosts" are two working directories holding the same config text
(relative paths: each host's timestamp_file and TID log copies are its
own; the repositories are in one shared directory).  Host A runs the
daemon (its status_file resolves to the daemon's TID log); on host B the
same relative path does not exist, so its backup asks the daemon for the
TID log (ADMIN ``tidlog``).  A backs up a1, a2 (``--storages``), B backs
up b1 later; one plan (``restore --plan --json``) is computed where the
shared repositories are visible, each host applies it to its storages, and
the restored set is coherent: every storage cut at the same
multi-storage transaction.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import transaction

from tidstorage.demo import workload
from tidstorage.demo.cluster import DaemonProcess
from tidstorage.formats.filestorage import last_tid
from tidstorage.formats.tidlog import read_log
from test_storage import wait_published


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tidstorage", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.fixture
def hosts(tmp_path, two_zeo_servers):
    a, b = two_zeo_servers
    zeo = {"a1": (a, "1"), "a2": (a, "2"), "b1": (b, "1")}
    storages = {
        name: {"zeo": f"127.0.0.1:{srv.address[1]}", "zeo_storage": st,
               "data_fs": str(srv.data_fs(st)),
               "backup_dir": str(tmp_path / "shared" / name)}
        for name, (srv, st) in zeo.items()}
    host_a, host_b = tmp_path / "hostA", tmp_path / "hostB"
    d = DaemonProcess(host_a / "daemon", storages=storages).start()
    d.wait_bootstrapped()
    lines = ["[server]", 'address = "127.0.0.1"', f"port = {d.port}",
             'status_file = "daemon/tidstorage.tid"']
    for name, values in storages.items():
        lines.append(f"\n[storages.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    lines += ["\n[backup]", 'timestamp_file = "backups/timestamps"',
              'status_file_backup_dir = "backups/tidlog"']
    text = "\n".join(lines) + "\n"
    for h in (host_a, host_b):
        h.mkdir(exist_ok=True)
        (h / "site.toml").write_text(text)  # the same config on every host

    class Hosts:
        daemon = d
        a, b = host_a, host_b
        spec = {name: (srv.address, st) for name, (srv, st) in zeo.items()}
        tmp = tmp_path

        def commit(self, i):
            """One transaction over a1, a2 and b1 (a multi-storage, and
            multi-host, commit); returns each storage's last TID."""
            dbs = workload.open_databases(self.spec, d.address, timeout=5)
            try:
                tm = transaction.TransactionManager()
                conns = {n: db.open(transaction_manager=tm) for n, db in dbs.items()}
                tm.begin()
                for n, conn in conns.items():
                    conn.root()["round"] = i
                tm.commit()
                for conn in conns.values():
                    conn.close()
                tids = {n: int.from_bytes(db.storage.lastTransaction(), "big")
                        for n, db in dbs.items()}
            finally:
                for db in dbs.values():
                    db.close()
            wait_published(d, lambda t: all(t.get(s, -1) >= v for s, v in tids.items()))
            return tids

    yield Hosts()
    d.kill()


def cfg(host):
    return str(host / "site.toml")


def backup(host, *args):
    r = run("backup", "-c", cfg(host), "--json", *args)
    assert r.stdout.strip().startswith("{"), r.stdout + r.stderr
    return r, json.loads(r.stdout)


def _backed_up_apart(hosts):
    """Round 1, host A backs up a1, a2; round 2, host B backs up b1;
    round 3 (in no backup).  Returns the TIDs of rounds 1 and 2."""
    r1 = hosts.commit(1)
    r, out = backup(hosts.a, "--storages", "a1,a2")
    assert r.returncode == 0, r.stderr
    assert sorted(out["storages"]) == ["a1", "a2"]  # this host's storages only
    assert out["tidlog_source"] == "file"  # host A holds the daemon's TID log
    # One backup set: host B takes the set's identity before its first backup.
    (hosts.b / "backups" / "tidlog").mkdir(parents=True)
    shutil.copy(hosts.a / "backups" / "tidlog" / "tidstorage-identity.json",
                hosts.b / "backups" / "tidlog")
    r2 = hosts.commit(2)
    r, out = backup(hosts.b, "--storages", "b1")
    assert r.returncode == 0, r.stderr
    assert sorted(out["storages"]) == ["b1"]
    assert out["tidlog_source"] == "daemon"  # no TID log on host B: asked from the daemon
    copy = read_log(out["tidlog_copy"])
    assert all(copy.final_tids()[s] >= r2[s] for s in r2)
    # the copy holds the daemon's history (the point of round 1 too)
    live = (hosts.a / "daemon" / "tidstorage.tid").read_bytes()
    assert live[:200] == open(out["tidlog_copy"], "rb").read()[:200]
    for h in (hosts.a, hosts.b):  # each host records its own backup, once
        assert len((h / "backups" / "timestamps").read_text().split()) == 1
    hosts.commit(3)  # after every backup: in no plan
    return r1, r2


def _plan(hosts):
    r = run("restore", "-c", cfg(hosts.b), "--plan", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    plan_file = hosts.tmp / "plan.json"
    plan_file.write_text(r.stdout)
    return json.loads(r.stdout), plan_file


def test_two_hosts_backed_up_apart_restore_one_plan_coherently(hosts):
    r1, r2 = _backed_up_apart(hosts)

    # The plan, where every repository is visible (the shared directory).
    plan, plan_file = _plan(hosts)
    assert plan["context"]["plan"] == "tidstorage-hosts-plan-1"
    cuts = {s: p["cut_tid"] for s, p in plan["storages"].items()}
    assert cuts == r1  # the newest point host A's backup (round 1) holds
    assert sorted(plan["context"]["backups"]) == ["a1", "a2", "b1"]
    # The same command on each host (as cron or configuration management would).
    for host, ids in ((hosts.a, "a1,a2"), (hosts.b, "b1")):
        r = run("restore", "-c", cfg(host), "--plan", str(plan_file), "--storages", ids,
                "--output-dir", str(host / "restored"))
        assert r.returncode == 0, r.stdout + r.stderr
    restored = {"a1": hosts.a / "restored" / "a1.fs", "a2": hosts.a / "restored" / "a2.fs",
                "b1": hosts.b / "restored" / "b1.fs"}
    assert {s: last_tid(p) for s, p in restored.items()} == r1  # one transaction everywhere
    assert not (hosts.a / "restored" / "b1.fs").exists()
    # The restored set, checked together: no split transaction.
    r = run("verify", "-c", cfg(hosts.a), *[f"--files={s}={p}" for s, p in restored.items()])
    assert r.returncode == 0, r.stdout + r.stderr

    # Cleanup is per host: its own timestamp_file, its own storages' repositories.
    r = run("cleanup", "-c", cfg(hosts.a), "--storages", "a1,a2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len((hosts.a / "backups" / "timestamps").read_text().split()) == 1  # still restorable

    # A host whose backups cannot hold the plan's point refuses, changing nothing.
    bad = json.loads(plan_file.read_text())
    bad["storages"]["b1"]["cut_tid"] = r2["b1"] + (1 << 32) * 3600  # past its backup
    bad_file = hosts.tmp / "bad-plan.json"
    bad_file.write_text(json.dumps(bad))
    before = (hosts.b / "restored" / "b1.fs").read_bytes()
    r = run("restore", "-c", cfg(hosts.b), "--plan", str(bad_file), "--storages", "b1",
            "--output-dir", str(hosts.b / "restored"), "--force")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot hold the plan's point" in r.stderr and "nothing was changed" in r.stderr
    assert (hosts.b / "restored" / "b1.fs").read_bytes() == before


def test_two_hosts_promote_their_standbys_at_one_plan(hosts):
    """Each host's standby, synced from its own backups, promoted at the
    cut TIDs of one plan: the promoted files of both hosts are one coherent
    set, though host B's standby holds round 2 (its TID log copies reach
    further than host A's)."""
    r1, r2 = _backed_up_apart(hosts)
    ids = {hosts.a: "a1,a2", hosts.b: "b1"}
    for host, sids in ids.items():
        r = run("standby", "sync", "-c", cfg(host), "--dir", str(host / "standby"),
                "--storages", sids)
        assert r.returncode == 0, r.stdout + r.stderr
    files = {"a1": hosts.a / "standby" / "a1.fs", "a2": hosts.a / "standby" / "a2.fs",
             "b1": hosts.b / "standby" / "b1.fs"}
    assert last_tid(files["b1"]) == r2["b1"]  # host B's standby holds more
    plan, plan_file = _plan(hosts)
    cuts = {s: p["cut_tid"] for s, p in plan["storages"].items()}
    assert cuts == r1

    # Plans this standby cannot use are refused, the standby unchanged.
    before = files["b1"].read_bytes()
    bad = json.loads(plan_file.read_text())
    bad["storages"]["b1"]["cut_tid"] = r2["b1"] + (1 << 32) * 3600  # past its end
    lacking = json.loads(plan_file.read_text())
    del lacking["storages"]["b1"]
    other = json.loads(plan_file.read_text())
    other["context"]["set_id"] = "another-set"
    for name, data, text in (("bad", bad, "does not hold the plan's point"),
                             ("lacking", lacking, "no cut for storage(s) b1"),
                             ("other", other, "the plan is for backup set another-set")):
        f = hosts.tmp / f"{name}-plan.json"
        f.write_text(json.dumps(data))
        r = run("standby", "promote", "-c", cfg(hosts.b), "--dir", str(hosts.b / "standby"),
                "--plan", str(f), "--storages", "b1")
        assert r.returncode == 1, (name, r.stdout + r.stderr)
        assert text in r.stderr and "nothing was changed" in r.stderr, (name, r.stderr)
        assert files["b1"].read_bytes() == before
        assert not (hosts.b / "standby" / "tidstorage-promoted.json").exists()
    r = run("standby", "promote", "-c", cfg(hosts.b), "--dir", str(hosts.b / "standby"),
            "--plan", str(plan_file), "--at", "latest", "--storages", "b1")
    assert r.returncode == 2, r.stdout + r.stderr

    # The same plan on each host, each promoting its own standby in place.
    for host, sids in ids.items():
        r = run("standby", "promote", "-c", cfg(host), "--dir", str(host / "standby"),
                "--plan", str(plan_file), "--storages", sids)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "promoted in place" in r.stdout
    assert {s: last_tid(p) for s, p in files.items()} == cuts  # each at the plan's TID
    r = run("verify", "-c", cfg(hosts.a), *[f"--files={s}={p}" for s, p in files.items()])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SPLIT" not in r.stdout


def test_unknown_storage_ids_are_a_usage_error(hosts):
    for cmd in (["backup"], ["restore", "--dry-run"], ["repair", "--dry-run"],
                ["standby", "sync", "--dir", str(hosts.tmp / "sb")], ["cleanup", "--dry-run"]):
        r = run(*cmd, "-c", cfg(hosts.a), "--storages", "a1,zz,yy")
        assert r.returncode == 2, (cmd, r.stdout + r.stderr)
        assert "zz, yy" in r.stderr and "not configured" in r.stderr, r.stderr


def test_the_tidlog_verb_pages_the_daemons_log(hosts):
    """The daemon sends its TID log over the authenticated protocol, in
    pages under the admin reply limit; what arrives is the file's bytes."""
    import base64

    from tidstorage.daemon.server import TIDLOG_PAGE

    for i in range(3):
        hosts.commit(i)
    live = (hosts.a / "daemon" / "tidstorage.tid").read_bytes()
    with hosts.daemon.client() as c:
        first = c.admin({"verb": "tidlog", "offset": 0})
        assert first["ok"] and first["size"] >= len(live)
        assert base64.b64decode(first["data"]).startswith(live[:min(len(live), TIDLOG_PAGE)])
        tail = c.admin({"verb": "tidlog", "offset": 10})
        assert base64.b64decode(tail["data"])[:20] == live[10:30]
        bad = c.admin({"verb": "tidlog", "offset": -1})
        assert not bad["ok"] and "offset" in bad["error"]
