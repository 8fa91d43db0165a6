"""The ZODB integration on real ZEO servers and a real daemon."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from pathlib import Path

import pytest
import transaction
import ZODB
import ZODB.config
from ZEO.ClientStorage import ClientStorage
from ZODB.FileStorage import FileIterator
from ZODB.utils import u64

from tidstorage.demo import workload
from tidstorage.daemon.client import Client
from tidstorage.zodb.storage import TIDStorage, legacy_storage_id
from tidstorage.demo.workload import check_invariant

STORAGES = ["a1", "a2", "b1"]


def close_all(dbs):
    for db in dbs.values():
        db.close()


def records(path: Path):
    """(tid, extension) of every transaction in a Data.fs (server stopped or not)."""
    it = FileIterator(str(path))
    try:
        return [(u64(t.tid), t.extension) for t in it]
    finally:
        it.close()


def wait_published(daemon, predicate, timeout=20):
    deadline = time.monotonic() + timeout
    with daemon.client() as c:
        while True:
            tids = c.dump()
            if predicate(tids):
                return tids
            assert time.monotonic() < deadline, f"not published in time: {tids}\n{daemon.log()}"
            time.sleep(0.05)


def open_connected(cluster, timeout: float = 10):
    """``cluster.open()``, then wait until the reporter is connected."""
    dbs = cluster.open()
    reporter = next(iter(dbs.values())).storage.reporter
    deadline = time.monotonic() + timeout
    while not reporter.connected:
        assert time.monotonic() < deadline, "the reporter did not connect"
        time.sleep(0.01)
    return dbs


def test_zconfig_and_reporting(cluster, tmp_path):
    a = cluster.servers["a"]
    db = ZODB.config.databaseFromString(f"""
%import tidstorage
<zodb main>
  <tidstorage>
    name a1
    server 127.0.0.1:{cluster.daemon.port}
    timeout 1.0
    <zeoclient>
      server 127.0.0.1:{a.address[1]}
      storage 1
    </zeoclient>
  </tidstorage>
</zodb>
""")
    try:
        assert isinstance(db.storage, TIDStorage) and db.storage.storage_id == "a1"
        conn = db.open()
        conn.root()["x"] = 1
        transaction.commit()
        last = u64(db.storage.lastTransaction())
        tids = wait_published(cluster.daemon, lambda t: t.get("a1") == last)
        assert tids["a1"] == last
        # a read-only transaction reports nothing and changes nothing
        conn.root()["x"]
        transaction.commit()
        assert u64(db.storage.lastTransaction()) == last
        conn.close()
    finally:
        db.close()


def test_legacy_id_without_name():
    class FakeZeo:
        _addr = ("127.0.0.1", 8100)
        _storage = "1"

    assert legacy_storage_id(FakeZeo()) == "((('127.0.0.1', 8100),), '1')"
    FakeZeo._addr = [("10.0.0.1", 8100), ("10.0.0.2", 8100)]
    assert legacy_storage_id(FakeZeo()) == "((('10.0.0.1', 8100), ('10.0.0.2', 8100)), '1')"
    with pytest.raises(ValueError, match="name is required"):
        TIDStorage(ZODB.DB(None).storage, None, server=("127.0.0.1", 1))


def test_multi_storage_commit_is_stamped_and_published(cluster):
    dbs = cluster.open()
    try:
        workload.prepare(dbs, 0)
        tm = transaction.TransactionManager()
        workload.write_one(dbs, tm, 0, ["a1", "b1"])
        lasts = {n: u64(dbs[n].storage.lastTransaction()) for n in ("a1", "b1")}
        tids = wait_published(cluster.daemon, lambda t: all(t.get(n) == v for n, v in lasts.items()))
        workload.write_one(dbs, tm, 0, ["a2"])  # single storage: no stamp
        last_a2 = u64(dbs["a2"].storage.lastTransaction())
        wait_published(cluster.daemon, lambda t: t.get("a2") == last_a2)
    finally:
        close_all(dbs)
    a1, b1, a2 = (records(cluster.data_fs(n)) for n in ("a1", "b1", "a2"))
    stamp_a1 = a1[-1][1]["tidstorage"]
    stamp_b1 = b1[-1][1]["tidstorage"]
    assert stamp_a1 == stamp_b1
    assert stamp_a1["storages"] == ["a1", "b1"] and stamp_a1["id"].startswith("ts:")
    assert a1[-1][0] == tids["a1"] and b1[-1][0] == tids["b1"]
    assert "tidstorage" not in a2[-1][1]


def test_begin_is_registered_before_the_first_tpc_finish(cluster):
    """The daemon knows the transaction before any storage holds part of it,
    and a TID reported by another client but absent from the files is never
    published (the gate: the daemon reads the storages).
    """
    from test_storage_faults import daemon_describe

    dbs = cluster.open()
    seen = {}
    try:
        workload.prepare(dbs, 0)
        other = Client(cluster.daemon.address)
        first = dbs["a1"].storage.base
        real = first.tpc_finish

        def tpc_finish(txn, func=lambda tid: None):
            seen["id"] = txn.extension["tidstorage"]["id"]
            seen["state"] = daemon_describe(cluster.daemon)
            other.begin("intruder", ["a1"])
            other.commit("intruder", {"a1": 2**63})
            other.sync()
            first.tpc_finish = real
            return real(txn, func)

        first.tpc_finish = tpc_finish
        workload.write_one(dbs, transaction.TransactionManager(), 0, ["a1", "a2"])
        assert seen["id"] in seen["state"], seen
        last = u64(dbs["a1"].storage.lastTransaction())
        tids = wait_published(cluster.daemon, lambda t: t.get("a1") == last)
        assert tids["a1"] < 2**63
        other.close()
    finally:
        close_all(dbs)


def test_daemon_down_commits_succeed_without_waiting(cluster, caplog):
    cluster.daemon.kill()
    caplog.set_level(logging.WARNING, logger="tidstorage")
    dbs = cluster.open(timeout=0.5)
    try:
        workload.prepare(dbs, 1)
        tm = transaction.TransactionManager()
        start = time.monotonic()
        for _ in range(30):
            workload.write_one(dbs, tm, 1, ["a1", "a2", "b1"])
        elapsed = time.monotonic() - start
        # at most one wait of `timeout`, not one per commit (30 * 0.5 s)
        assert elapsed < 5, elapsed
        lost_lines = [r for r in caplog.records if "daemon" in r.getMessage()]
        assert len(lost_lines) == 1, [r.getMessage() for r in lost_lines]
        # The daemon comes back: the reporter reconnects, reports LOST, and
        # the daemon re-checks the storages and publishes again.
        cluster.daemon.start()
        cluster.daemon.wait_bootstrapped()
        deadline = time.monotonic() + 10
        reporter = dbs["a1"].storage.reporter
        while not reporter.connected:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workload.write_one(dbs, tm, 1, ["a1", "b1"])
        lasts = {n: u64(dbs[n].storage.lastTransaction()) for n in ("a1", "b1")}
        wait_published(cluster.daemon, lambda t: all(t.get(n, 0) >= v for n, v in lasts.items()))
        assert any("is back" in r.getMessage() for r in caplog.records)
    finally:
        close_all(dbs)
    assert check_invariant(final_roots(cluster)) == []


def final_roots(cluster):
    """The roots of the three storages, read through fresh ZEO clients."""
    roots = {}
    for name, (address, st) in cluster.zeo_spec().items():
        db = ZODB.DB(ClientStorage(address, storage=st, wait_timeout=10))
        try:
            conn = db.open()
            roots[name] = {k: dict(v) for k, v in conn.root().items() if k.startswith("pairs-")}
            conn.close()
        finally:
            db.close()
    return roots


def test_lost_reports_make_the_daemon_read_and_block_only_unreadable_storages(cluster):
    """LOST: storages the daemon reads are read at once and keep publishing
    (the gate needs no report to stay coherent); a storage it cannot read
    (here: not configured) is blocked, and the log says what to configure."""
    dbs = open_connected(cluster)
    try:
        workload.prepare(dbs, 7)
        with cluster.daemon.client() as c:
            c.begin("legacy-1", ["elsewhere"])
            c.commit("legacy-1", {"elsewhere": 5})
            c.send_raw(b"LOST\n3\na1\nb1\nelsewhere\n")
            c.begin("legacy-2", ["elsewhere"])
            c.commit("legacy-2", {"elsewhere": 6})
            c.sync()
            workload.write_one(dbs, transaction.TransactionManager(), 7, ["a1", "b1"])
            lasts = {n: u64(dbs[n].storage.lastTransaction()) for n in ("a1", "b1")}
            tids = wait_published(cluster.daemon,
                                  lambda t: all(t.get(n) == v for n, v in lasts.items()))
            assert tids["elsewhere"] == 5  # blocked after the LOST
        log = cluster.daemon.log()
        assert "cannot read them: nothing more is published for them" in log
        assert "Configure zeo or data_fs for them" in log
    finally:
        close_all(dbs)


def test_writer_killed_between_finishes_is_never_published(cluster):
    """The writer SIGKILLs itself after the first tpc_finish of its 5th
    multi-storage transaction: the daemon resolves the in-doubt BEGIN from
    the stamps (split), never publishes past it, and a cut at the published
    TIDs leaves no split transaction."""
    proc = subprocess.run(
        cluster.writer_cmd(7, transactions=50, kill_after_first_finish=5),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    deadline = time.monotonic() + 30
    while "SPLIT transaction" not in cluster.daemon.log():
        assert time.monotonic() < deadline, cluster.daemon.log()
        time.sleep(0.1)
    with cluster.daemon.client() as c:
        published = c.dump()
    for server in cluster.servers.values():
        server.stop()
    # Cut copies of the files at the published TIDs: no split remains.
    stamps = {}
    for name in STORAGES:
        for tid, ext in records(cluster.data_fs(name)):
            stamp = ext.get("tidstorage")
            if stamp and "id" in stamp and tid <= published[name]:
                stamps.setdefault(stamp["id"], (stamp["storages"], set()))[1].add(name)
    split = [sid for sid, (names, present) in stamps.items() if set(names) != present]
    assert split == []
    # and the split transaction exists in the files, past the published point
    log = cluster.daemon.log()
    assert "Repair:" in log and "tidstorage repair" in log


def test_concurrent_writers_threads_and_processes(cluster):
    """Writers in threads and processes over random subsets; published
    points sampled during the run are coherent (checked from the stamps)."""
    procs = [subprocess.Popen(cluster.writer_cmd(w, seconds=6), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in (10, 11)]
    dbs = cluster.open()
    stop = threading.Event()
    errors = []

    def thread_writer(w):
        import random
        rng = random.Random(w)
        tm = transaction.TransactionManager()
        workload.prepare(dbs, w)
        while not stop.is_set():
            try:
                workload.write_one(dbs, tm, w, rng.sample(STORAGES, rng.randint(1, 3)))
            except Exception as exc:  # noqa: BLE001 - any error fails the test
                errors.append(exc)
                tm.abort()

    threads = [threading.Thread(target=thread_writer, args=(w,)) for w in (20, 21, 22)]
    for t in threads:
        t.start()
    samples = []
    with cluster.daemon.client() as c:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6:
            samples.append(c.dump())
            time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    close_all(dbs)
    assert errors == []
    for server in cluster.servers.values():
        server.stop()
    files = {n: records(cluster.data_fs(n)) for n in STORAGES}
    multi = 0
    distinct = {json.dumps(s, sort_keys=True) for s in samples if s}
    assert len(distinct) > 5  # the published point moved during the run
    for sample in samples:
        if set(sample) != set(STORAGES):
            continue
        present: dict[str, tuple[list, set]] = {}
        for name in STORAGES:
            for tid, ext in files[name]:
                stamp = ext.get("tidstorage")
                if stamp and "id" in stamp and tid <= sample[name]:
                    present.setdefault(stamp["id"], (stamp["storages"], set()))[1].add(name)
        for sid, (names, where) in present.items():
            assert set(names) == where, f"published point {sample} splits {sid}"
        multi = max(multi, len(present))
    assert multi > 20


def test_split_made_while_the_daemon_was_down_is_never_published(cluster):
    """The stamp check after a (re)start: a writer dies between its
    tpc_finish calls while the daemon is down; the restarted daemon finds
    the split in the storages during its bootstrap and never publishes a
    point at or past it."""
    with cluster.daemon.client() as c:
        before = c.dump()
    cluster.daemon.kill()
    proc = subprocess.run(
        cluster.writer_cmd(8, transactions=20, kill_after_first_finish=3, timeout=0.2),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    cluster.daemon.start()
    cluster.daemon.wait_bootstrapped()
    from test_storage_faults import wait_for_log

    log = wait_for_log(cluster.daemon, "SPLIT transaction")
    split_line = next(x for x in log.splitlines() if "SPLIT transaction" in x)
    split_id = split_line.split("SPLIT transaction ", 1)[1].split(" ", 1)[0]
    with cluster.daemon.client() as c:
        after = c.dump()
    # nothing newer than before the crash was published on the split's storages
    for server in cluster.servers.values():
        server.stop()
    found = 0
    for name in STORAGES:
        for tid, ext in records(cluster.data_fs(name)):
            stamp = ext.get("tidstorage") or {}
            if stamp.get("id") == split_id:
                found += 1
                assert after[name] < tid, (name, after, tid)
    assert 1 <= found < len(stamp_storages(log, split_id))
    assert all(after[n] >= before.get(n, 0) for n in after)


def stamp_storages(log: str, split_id: str) -> list[str]:
    line = next(x for x in log.splitlines() if f"SPLIT transaction {split_id} over" in x)
    return line.split(" over ", 1)[1].split(":", 1)[0].split(", ")
