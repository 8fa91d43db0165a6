"""One source of truth (issue 10, item 4): ``config check`` against a real
cluster's zeo.conf files and ZEO servers; ``config from-zope``; the daemon
logs an unknown storage id once."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import tomli_w
import transaction

from test_storage import open_connected


def run(*args):
    return subprocess.run([sys.executable, "-m", "tidstorage", *args], capture_output=True,
                          text=True, timeout=120)


def zope_conf(tmp_path, cluster, names=("a1", "a2", "b1"), rename=None, dbnames=None):
    spec = cluster.zeo_spec()
    port = cluster.daemon.port
    lines = ["%define INSTANCE " + str(tmp_path), "%import tidstorage"]
    for i, name in enumerate(names):
        (host, zport), storage = spec[name]
        lines += [f"<zodb_db {(dbnames or {}).get(name, name)}>", f"  mount-point {'/' if i == 0 else '/' + name}",
                  "  <tidstorage>", f"    name {(rename or {}).get(name, name)}",
                  f"    server localhost:{port}", "    <zeoclient>",
                  f"      server {host}:{zport}", f"      storage {storage}",
                  "      blob-dir $INSTANCE/var/blobcache-" + name, "    </zeoclient>",
                  "  </tidstorage>", "</zodb_db>"]
    path = tmp_path / "zope.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def zeo_confs(cluster):
    return [str(s.config_path) for s in cluster.servers.values()]


def commit_each(cluster):
    dbs = open_connected(cluster)
    try:
        for i, name in enumerate(("a1", "a2", "a2", "b1")):  # a1 and a2 end at other TIDs
            conn = dbs[name].open()
            conn.root()[f"k{i}"] = i
            transaction.commit()
            conn.close()
    finally:
        for db in dbs.values():
            db.close()


def zeo_args(cluster):
    out = []
    for conf in zeo_confs(cluster):
        out += ["--zeo-conf", conf]
    return out


def test_check_agrees_then_finds_a_name_typo(tmp_path, cluster):
    commit_each(cluster)
    toml = str(cluster.daemon.config_path)
    zc = zope_conf(tmp_path, cluster)
    r = run("config", "check", "-c", toml, "--zope-conf", str(zc), *zeo_args(cluster))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: 4 storage(s)" in r.stdout
    assert "storages.elsewhere" in r.stdout  # configured, used by no database: a warning
    typo = zope_conf(tmp_path, cluster, rename={"a2": "a2x"})
    r = run("config", "check", "-c", toml, "--zope-conf", str(typo), *zeo_args(cluster))
    assert r.returncode == 1
    assert "storage id 'a2x' is not in" in r.stdout and "did you mean 'a2'" in r.stdout


def test_check_finds_swapped_data_fs_from_zeo_conf_and_from_the_servers(tmp_path, cluster):
    commit_each(cluster)
    data = tomllib.loads(cluster.daemon.config_path.read_text())
    a1, a2 = data["storages"]["a1"]["data_fs"], data["storages"]["a2"]["data_fs"]
    data["storages"]["a1"]["data_fs"], data["storages"]["a2"]["data_fs"] = a2, a1
    swapped = tmp_path / "swapped.toml"
    swapped.write_text(tomli_w.dumps(data))
    zc = zope_conf(tmp_path, cluster)
    r = run("config", "check", "-c", str(swapped), "--zope-conf", str(zc), *zeo_args(cluster))
    assert r.returncode == 1
    assert "storages.a1.data_fs" in r.stdout and "serves storage '1'" in r.stdout
    # Without zeo.conf: the servers' last TIDs tell it.
    r = run("config", "check", "-c", str(swapped))
    assert r.returncode == 1
    assert "not the file that server serves" in r.stdout, r.stdout
    # ...and --no-probe cannot.
    r = run("config", "check", "-c", str(swapped), "--no-probe")
    assert r.returncode == 0, r.stdout


def test_from_zope_writes_a_toml_that_checks(tmp_path, cluster):
    commit_each(cluster)
    zc = zope_conf(tmp_path, cluster)
    out = tmp_path / "etc" / "tidstorage.toml"
    out.parent.mkdir()
    r = run("config", "from-zope", "--zope-conf", str(zc), *zeo_args(cluster), "-o", str(out))
    assert r.returncode == 0, r.stderr
    data = tomllib.loads(out.read_text())
    assert data["server"]["port"] == cluster.daemon.port
    for name in ("a1", "a2", "b1"):
        assert data["storages"][name]["data_fs"] == str(cluster.data_fs(name))
    r = run("config", "check", "-c", str(out), "--zope-conf", str(zc), *zeo_args(cluster))
    assert r.returncode == 0, r.stdout
    # never replaced without --force
    before = out.read_text()
    r = run("config", "from-zope", "--zope-conf", str(zc), "-o", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and out.read_text() == before


def test_database_names_for_heal(tmp_path, cluster):
    """A zodb_db name that is not the table name: check says to set
    ``database`` (heal maps cross-database references with it), from-zope
    writes it, and a name given to the wrong storage is an error."""
    commit_each(cluster)
    toml = str(cluster.daemon.config_path)
    zc = zope_conf(tmp_path, cluster, dbnames={"a2": "catalog"})
    r = run("config", "check", "-c", toml, "--zope-conf", str(zc), *zeo_args(cluster))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "set storages.a2.database = 'catalog'" in r.stdout
    out = tmp_path / "from-zope.toml"
    r = run("config", "from-zope", "--zope-conf", str(zc), *zeo_args(cluster), "-o", str(out))
    assert r.returncode == 0, r.stderr
    data = tomllib.loads(out.read_text())
    assert data["storages"]["a2"]["database"] == "catalog"
    assert "database" not in data["storages"]["a1"]
    r = run("config", "check", "-c", str(out), "--zope-conf", str(zc), *zeo_args(cluster))
    assert r.returncode == 0 and ".database" not in r.stdout, r.stdout
    data["storages"]["a1"]["database"] = "catalog"
    del data["storages"]["a2"]["database"]
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(tomli_w.dumps(data))
    r = run("config", "check", "-c", str(wrong), "--zope-conf", str(zc), *zeo_args(cluster))
    assert r.returncode == 1, r.stdout
    assert "database 'catalog'" in r.stdout and "is storages.a2" in r.stdout
    data["storages"]["a2"]["database"] = "catalog"
    wrong.write_text(tomli_w.dumps(data))
    r = run("config", "check", "-c", str(wrong), "--no-probe")
    assert r.returncode != 0 and "storages.a2: database name 'catalog' is also storages.a1's" \
        in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_legacy_id_is_derived_like_the_wrapper_does(tmp_path):
    from tidstorage.formats.zopeconf import read_zope_conf

    conf = tmp_path / "zope.conf"
    conf.write_text("%import tidstorage\n<zodb_db main>\n <tidstorage>\n  <zeoclient>\n"
                    "   server localhost:8100\n   storage 1\n  </zeoclient>\n </tidstorage>\n"
                    "</zodb_db>\n")
    (db,) = read_zope_conf(conf)
    assert db.wire_id == "((('localhost', 8100),), '1')"


def test_the_daemon_logs_an_unknown_storage_id_once(cluster):
    for _ in range(3):
        with cluster.daemon.client() as c:
            c.begin("x-1", ["secnd"])
            c.dump()
    log = cluster.daemon.log()
    assert log.count("reports storage id 'secnd', which is not configured") == 1, log[-2000:]
