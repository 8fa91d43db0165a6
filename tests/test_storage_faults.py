"""The ZODB integration under faults and with the rest of ZODB's features.

Real ``runzeo`` servers, a real daemon, real writer processes and real kills:

* the daemon SIGKILLed and restarted, then stopped for a while, under load;
* a ZEO server restarted under load;
* blobs, savepoints, non-ZODB data managers, explicit transaction managers
  in threads, read-only transactions;
* two fault injections that show reporting bugs (xfail, see their docstrings).

Published points are checked for coherency from the stamps in the
``Data.fs`` files themselves, after the servers are stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import transaction
import ZODB
import zope.interface
from tidstorage.demo.cluster import DaemonProcess
from persistent.mapping import PersistentMapping
from tidstorage.demo.cluster import free_port
from test_storage import final_roots, open_connected, records, wait_published
from transaction.interfaces import IDataManager
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZODB.blob import Blob
from ZODB.FileStorage import FileIterator
from ZODB.interfaces import IBlobStorage
from ZODB.utils import u64

from tidstorage.demo import workload
from tidstorage.daemon.client import Client, ClientError
from tidstorage.zodb.storage import TIDStorage
from tidstorage.core.tids import tid_seconds
from tidstorage.daemon.zeo import ZeoSpec, last_transaction

STORAGES = ["a1", "a2", "b1"]


# -- helpers -----------------------------------------------------------------


class Sampler(threading.Thread):
    """DUMP the daemon every ``period`` seconds, surviving its restarts."""

    def __init__(self, daemon, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.address = daemon.address
        self.period = period
        self.samples: list[tuple[float, dict]] = []  # (monotonic time, dump)
        self._halt = threading.Event()

    def run(self) -> None:
        client = None
        while not self._halt.is_set():
            try:
                if client is None:
                    client = Client(self.address, timeout=2)
                self.samples.append((time.monotonic(), client.dump()))
            except (ClientError, OSError):
                if client is not None:
                    try:
                        client.close()
                    except OSError:
                        pass
                client = None
            self._halt.wait(self.period)
        if client is not None:
            client.close()

    def stop(self) -> list[tuple[float, dict]]:
        self._halt.set()
        self.join(10)
        return self.samples


def file_stamps(files: dict[str, list]) -> dict[str, tuple[tuple, dict]]:
    """coherency id -> (its storages, {storage: tid where recorded})."""
    stamps: dict[str, tuple[tuple, dict]] = {}
    for name, recs in files.items():
        for tid, ext in recs:
            stamp = ext.get("tidstorage")
            if stamp and "id" in stamp:
                stamps.setdefault(stamp["id"], (tuple(stamp["storages"]), {}))[1][name] = tid
    return stamps


def splits_at(samples, files) -> list[str]:
    """Descriptions of the published points in ``samples`` that cut a
    stamped transaction in some of its storages and not in others."""
    stamps = file_stamps(files)
    problems = []
    distinct = {json.dumps(s, sort_keys=True): s for s in samples}
    for sample in distinct.values():
        if not set(files) <= set(sample):
            continue
        for sid, (names, where) in stamps.items():
            inside = {n for n in names if n in where and where[n] <= sample[n]}
            if inside and inside != set(names):
                problems.append(f"published point {sample} splits {sid} ({where})")
    return problems


def run_writers(cluster, writers, seconds):
    return [subprocess.Popen(cluster.writer_cmd(w, seconds=seconds), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for w in writers]


def writer_results(procs, timeout=60):
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, (proc.returncode, out, err[-3000:])
        summary = json.loads(out.strip().splitlines()[-1])
        results.append((summary, err))
    return results


def last_tids(cluster) -> dict[str, int]:
    """Each storage's last TID, asked to its ZEO server."""
    return {name: last_transaction(ZeoSpec(address, st))
            for name, (address, st) in cluster.zeo_spec().items()}


def wait_quiescent(cluster, timeout=20) -> dict[str, int]:
    """Nothing is being written: wait until every storage's last TID is published."""
    lasts = last_tids(cluster)
    return wait_published(cluster.daemon, lambda t: all(t.get(n) == v for n, v in lasts.items()),
                          timeout=timeout)


def check_invariant_ok(cluster) -> bool:
    problems = workload.check_invariant(final_roots(cluster))
    assert problems == [], problems
    return True


def wait_for_log(daemon, pattern: str, start: int = 0, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = daemon.log()[start:]
        if re.search(pattern, text):
            return text
        assert time.monotonic() < deadline, f"{pattern!r} not logged:\n{text[-5000:]}"
        time.sleep(0.05)


def daemon_in_flight(daemon, timeout: float = 5) -> int:
    """The daemon's number of in-flight transactions, from its SIGUSR1 dump."""
    start = len(daemon.log())
    daemon.signal(signal.SIGUSR1)
    text = wait_for_log(daemon, r"in_flight=\d+", start, timeout)
    return int(re.search(r"in_flight=(\d+)", text).group(1))


def daemon_describe(daemon, timeout: float = 20) -> str:
    """The daemon's SIGUSR1 state dump (the lines after "state:")."""
    start = len(daemon.log())
    daemon.signal(signal.SIGUSR1)
    text = wait_for_log(daemon, r"in_flight=\d+", start, timeout)
    return text[text.index("state:"):]


def wait_no_in_flight(daemon, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while (n := daemon_in_flight(daemon)) != 0:
        assert time.monotonic() < deadline, f"in_flight={n} stays:\n{daemon.log()[-3000:]}"
        time.sleep(0.1)


def write_single(dbs, tm, writer: int, name: str) -> int:
    """A single-storage transaction that really writes (``workload.write_one``
    over one storage writes nothing); returns its TID."""
    conn = dbs[name].open(tm)
    try:
        pairs = conn.root()[f"pairs-{writer}"]
        pairs["self"] = pairs.get("self", 0) + 1  # not a storage id: invariant unchanged
        tm.get().note(f"writer {writer}: {name}")
        tm.commit()
    finally:
        conn.close()
    return u64(dbs[name].storage.lastTransaction())


def close_all(dbs) -> None:
    for db in dbs.values():
        db.close()


def lasts_of(dbs, names=None) -> dict[str, int]:
    return {n: u64(dbs[n].storage.lastTransaction()) for n in (names or sorted(dbs))}


class ReporterSpy:
    """Record the calls made to a reporter's public reporting methods, as
    ``begin``, ``commit``, ``abort``, ``in_doubt`` or ``single``."""

    METHODS = ("begin", "ended", "single")
    OUTCOMES = {"commit": "commit", "abort": "abort", "indoubt": "in_doubt"}

    def __init__(self, reporter, monkeypatch) -> None:
        self.calls: list[tuple] = []
        for name in self.METHODS:
            real = getattr(reporter, name)

            def spy(*args, _name=name, _real=real, **kw):
                if _name == "ended":
                    txn, outcome, *rest = args
                    self.calls.append((self.OUTCOMES[outcome], txn, *rest))
                else:
                    self.calls.append((_name,) + args)
                return _real(*args, **kw)

            monkeypatch.setattr(reporter, name, spy)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def transactions(path: Path):
    """(tid, description, extension) of every transaction of a Data.fs."""
    it = FileIterator(str(path))
    try:
        return [(u64(t.tid), t.description.decode(), t.extension) for t in it]
    finally:
        it.close()


class OwnCluster:
    """Like the ``cluster`` fixture, with chosen ZEO ports: a1 and a2 on
    server a, b1 on server b."""

    def __init__(self, tmp_path, zeo_factory, port_a, port_b):
        a = zeo_factory(["1", "2"], name="a", port=port_a, start=True)
        b = zeo_factory(["1"], name="b", port=port_b, start=True)
        self.servers = {"a": a, "b": b}
        self._zeo = {
            "a1": (a.address, "1", a.data_fs("1")),
            "a2": (a.address, "2", a.data_fs("2")),
            "b1": (b.address, "1", b.data_fs("1")),
        }
        storages = {
            name: {"zeo": f"127.0.0.1:{addr[1]}", "zeo_storage": st, "data_fs": str(path)}
            for name, (addr, st, path) in self._zeo.items()
        }
        self.daemon = DaemonProcess(tmp_path / "daemon", storages=storages,
                                    server={"in_doubt_grace": 1.0}).start()
        try:
            self.daemon.wait_bootstrapped()
        except BaseException:
            self.daemon.kill()
            raise

    def zeo_spec(self):
        return {k: (v[0], v[1]) for k, v in self._zeo.items()}

    def data_fs(self, name):
        return self._zeo[name][2]

    def open(self, timeout=1.0):
        return workload.open_databases(self.zeo_spec(), self.daemon.address, timeout=timeout)

    def writer_cmd(self, writer, **kw):
        spec = {k: [v[0][0], v[0][1], v[1]] for k, v in self._zeo.items()}
        cmd = [sys.executable, "-m", "tidstorage.demo.workload", "--zeo", json.dumps(spec),
               "--server", f"127.0.0.1:{self.daemon.port}", "--writer", str(writer)]
        for key, value in kw.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        return cmd


def zeo_sort_key(port: int) -> str:
    # ClientStorage.sortKey() is f"{storage}:{server address}"; the host part
    # is the same for both servers, so the order is the order of these.
    return f"1:{('localhost', port)}"


# -- 1. the daemon killed, restarted and stopped under load ------------------


def test_daemon_killed_restarted_and_stopped_under_load(cluster):
    """Writer processes never see an error while the daemon is SIGKILLed and
    restarted at once, then stopped (SIGTERM) for 3 s and started again.
    After each restart the daemon bootstraps (reading each storage from its
    published TID) and publishes again; every published point sampled
    during the run is coherent; the invariant holds at the end."""
    daemon = cluster.daemon
    # Create the roots first: writer processes that open fresh storages at the
    # same moment race to create them (ZODB.DB raises ReadConflictError).
    close_all(cluster.open())
    with daemon.client() as c:
        initial = c.dump()
    sampler = Sampler(daemon)
    sampler.start()
    procs = run_writers(cluster, (30, 31), seconds=16)
    try:
        wait_published(daemon, lambda t: all(t[n] > initial[n] for n in STORAGES))
        time.sleep(1)

        # SIGKILL and immediate restart.
        start = len(daemon.log())
        daemon.kill()
        daemon.start()
        daemon.wait_bootstrapped()
        with daemon.client() as c:
            boot1 = c.dump()
        log1 = wait_for_log(daemon, r"bootstrap complete", start)
        assert "bootstrap started" in log1
        moved1 = wait_published(daemon, lambda t: all(t[n] > boot1[n] for n in STORAGES))
        restarted1 = time.monotonic()
        time.sleep(1)

        # Stopped for a while.
        assert daemon.stop() == 0
        time.sleep(3)
        start = len(daemon.log())
        daemon.start()
        daemon.wait_bootstrapped()
        with daemon.client() as c:
            boot2 = c.dump()
        assert all(boot2[n] > moved1[n] for n in STORAGES)  # the bootstrap no-op
        wait_for_log(daemon, r"bootstrap complete", start)
        wait_published(daemon, lambda t: all(t[n] > boot2[n] for n in STORAGES))
        restarted2 = time.monotonic()

        results = writer_results(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for summary, err in results:
        assert summary["errors"] == 0 and summary["done"] > 50, (summary, err[-3000:])
    final = wait_quiescent(cluster)
    samples = [s for _, s in sampler.stop()]
    assert check_invariant_ok(cluster)
    after1 = {json.dumps(s, sort_keys=True) for t, s in sampler.samples if t > restarted1}
    after2 = {json.dumps(s, sort_keys=True) for t, s in sampler.samples if t > restarted2}
    assert len(after2) > 5 and len(after1) > len(after2)  # publication moved again
    for server in cluster.servers.values():
        server.stop()
    files = {n: records(cluster.data_fs(n)) for n in STORAGES}
    assert {n: files[n][-1][0] for n in STORAGES} == final
    assert splits_at(samples + [final], files) == []
    assert sum(len(w) > 1 for _, w in file_stamps(files).values()) > 50


# -- 2. a ZEO server restarted under load --------------------------------------


def test_zeo_server_restarted_under_load(tmp_path, zeo_factory, request):
    """Server b (storage b1) is restarted while two writer processes run.

    A ZEO restart can leave a *real* split in the files, which no wrapper can
    prevent (and after which the daemon rightly freezes publication for
    ever); the test avoids both ways it happens, to check the rest:

    * b1 is given the first place in ZODB's commit order (its port sorts
      first), so a commit failing on b1 fails before any other ``tpc_finish``;
    * the writers are SIGSTOPped (with their transactions and connections
      open) while the server restarts, and only then: the server is idle when
      it gets SIGTERM. Under full load runzeo's SIGTERM handler can interrupt
      ``FileStorage._finish`` after the data is written ("Failure in _finish"
      in zeo.log): b1 then holds the transaction, the client gets no reply,
      and the wrapper reports ABORT; see
      ``test_tpc_finish_error_after_the_server_committed`` (xfail).

    Writers retry, exit 0 and commit on b1 after the restart; the daemon
    publishes again; the sampled points are coherent; the invariant holds."""
    while True:
        port_a, port_b = free_port(), free_port()
        if port_a != port_b:
            break
    if zeo_sort_key(port_a) < zeo_sort_key(port_b):
        port_a, port_b = port_b, port_a
    c = OwnCluster(tmp_path, zeo_factory, port_a, port_b)
    request.addfinalizer(c.daemon.kill)
    daemon = c.daemon
    dbs = c.open()  # also creates the roots before the writers start (see above)
    try:  # the premise: b1 finishes first
        keys = {n: dbs[n].storage.sortKey() for n in STORAGES}
        assert min(keys, key=keys.get) == "b1", keys
    finally:
        close_all(dbs)
    with daemon.client() as cl:
        initial = cl.dump()
    sampler = Sampler(daemon)
    sampler.start()
    procs = run_writers(c, (40, 41), seconds=9)
    try:
        wait_published(daemon, lambda t: all(t[n] > initial[n] for n in STORAGES))
        time.sleep(1.5)
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.3)  # the server finishes what it has received
            before = time.monotonic()
            c.servers["b"].restart()
            restart_seconds = time.monotonic() - before
        finally:
            for proc in procs:
                os.kill(proc.pid, signal.SIGCONT)
        restarted_at = time.time()
        with daemon.client() as cl:
            after_restart = cl.dump()
        wait_published(daemon, lambda t: all(t[n] > after_restart[n] for n in STORAGES))
        results = writer_results(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    final = wait_quiescent(c)
    samples = [s for _, s in sampler.stop()]
    assert restart_seconds < 10
    assert check_invariant_ok(c)
    log = daemon.log()
    assert "SPLIT" not in log and "CRITICAL" not in log, log[-5000:]
    for server in c.servers.values():
        server.stop()
    txns = {n: transactions(c.data_fs(n)) for n in STORAGES}
    for summary, err in results:
        writer = summary["writer"]
        # progress after the restart, on the restarted server too
        for name in STORAGES:
            later = [t for t, desc, _ in txns[name]
                     if desc.startswith(f"writer {writer}:") and tid_seconds(t) > restarted_at]
            assert len(later) > 5, (name, summary, err[-3000:])
    files = {n: [(t, ext) for t, _, ext in txns[n]] for n in STORAGES}
    assert {n: files[n][-1][0] for n in STORAGES} == final
    assert splits_at(samples + [final], files) == []
    in_files = [sid for sid, (names, where) in file_stamps(files).items() if set(where) != set(names)]
    assert in_files == []  # the premise (see the docstring)


# -- 3. blobs ------------------------------------------------------------------


def test_blob_and_plain_object_in_one_transaction(tmp_path, zeo_factory):
    blob_server = zeo_factory(["1"], name="blobs", blob=True, start=True)
    plain_server = zeo_factory(["1"], name="plain", start=True)
    servers = {"blob": blob_server, "plain": plain_server}
    storages = {
        name: {"zeo": f"127.0.0.1:{s.port}", "zeo_storage": "1", "data_fs": str(s.data_fs("1"))}
        for name, s in servers.items()
    }
    daemon = DaemonProcess(tmp_path / "daemon", storages=storages).start()
    try:
        daemon.wait_bootstrapped()
        dbs: dict = {}
        base_blob = ClientStorage(blob_server.address, storage="1", wait_timeout=10,
                                  blob_dir=str(tmp_path / "cache"), shared_blob_dir=False)
        base_plain = ClientStorage(plain_server.address, storage="1", wait_timeout=10)
        wrapped = TIDStorage(base_blob, "blob", server=daemon.address)
        assert IBlobStorage.providedBy(wrapped)
        ZODB.DB(wrapped, databases=dbs, database_name="blob")
        ZODB.DB(TIDStorage(base_plain, "plain", server=daemon.address),
                databases=dbs, database_name="plain")
        payload = b"blob payload \x00\xff" * 1000
        try:
            tm = transaction.TransactionManager()
            conn = dbs["blob"].open(tm)
            blob = Blob()
            with blob.open("w") as f:
                f.write(payload)
            conn.root()["doc"] = blob
            conn.get_connection("plain").root()["meta"] = {"size": len(payload)}
            tm.commit()
            lasts = lasts_of(dbs)
            with conn.root()["doc"].open() as f:
                assert f.read() == payload
            conn.close()
            published = wait_published(daemon, lambda t: all(t.get(n) == v for n, v in lasts.items()))
        finally:
            close_all(dbs)
        # read back through a fresh client with an empty blob cache
        fresh = ZODB.DB(ClientStorage(blob_server.address, storage="1", wait_timeout=10,
                                      blob_dir=str(tmp_path / "cache2"), shared_blob_dir=False))
        try:
            conn = fresh.open()
            with conn.root()["doc"].open() as f:
                assert f.read() == payload
            conn.close()
        finally:
            fresh.close()
    finally:
        daemon.kill()
    for s in servers.values():
        s.stop()
    blob_recs = records(blob_server.data_fs("1"))
    plain_recs = records(plain_server.data_fs("1"))
    assert blob_recs[-1][0] == published["blob"] and plain_recs[-1][0] == published["plain"]
    stamp = blob_recs[-1][1]["tidstorage"]
    assert stamp == plain_recs[-1][1]["tidstorage"]
    assert stamp["storages"] == ["blob", "plain"] and stamp["id"].startswith("ts:")
    on_disk = [p for p in blob_server.blob_dir("1").rglob("*.blob") if p.read_bytes() == payload]
    assert len(on_disk) == 1


# -- 4. savepoints -----------------------------------------------------------------


def test_savepoints_and_rollback_across_two_storages(cluster):
    dbs = open_connected(cluster)
    try:
        tm = transaction.TransactionManager()
        conn = dbs["a1"].open(tm)
        ra, rb = conn.root(), conn.get_connection("b1").root()

        # savepoint, more changes, commit
        ra["sp"] = PersistentMapping(step=1)
        rb["sp"] = PersistentMapping(step=1)
        tm.savepoint()
        ra["sp"]["step"] = 2
        rb["sp2"] = "after the savepoint"
        tm.commit()
        first = lasts_of(dbs, ["a1", "b1"])
        wait_published(cluster.daemon, lambda t: all(t[n] == v for n, v in first.items()))

        # rollback of a savepoint (both connections joined before it)
        ra["rb"] = "kept"
        rb["rb"] = "kept"
        sp = tm.savepoint()
        ra["rb"] = "rolled back"
        rb["rb"] = "rolled back"
        rb["rb-extra"] = "rolled back"
        sp.rollback()
        rb["rb-after"] = "after the rollback"
        tm.commit()
        second = lasts_of(dbs, ["a1", "b1"])
        assert all(second[n] > first[n] for n in second)
        wait_published(cluster.daemon, lambda t: all(t[n] == v for n, v in second.items()))

        # b1 joins after the savepoint and is rolled back: ZODB unjoins it,
        # the commit is a single-storage one
        ra["single"] = 1
        sp = tm.savepoint()
        rb["gone"] = 1
        sp.rollback()
        tm.commit()
        third = lasts_of(dbs, ["a1", "b1"])
        assert third["b1"] == second["b1"] and third["a1"] > second["a1"]
        wait_published(cluster.daemon, lambda t: t["a1"] == third["a1"] and t["b1"] == third["b1"])
        conn.close()
    finally:
        close_all(dbs)

    dbs = cluster.open(wrap=False)
    try:
        conn = dbs["a1"].open()
        ra, rb = conn.root(), conn.get_connection("b1").root()
        assert dict(ra["sp"]) == {"step": 2} and dict(rb["sp"]) == {"step": 1}
        assert rb["sp2"] == "after the savepoint"
        assert ra["rb"] == "kept" and rb["rb"] == "kept"
        assert "rb-extra" not in rb and rb["rb-after"] == "after the rollback"
        assert ra["single"] == 1 and "gone" not in rb
        conn.close()
    finally:
        close_all(dbs)
    for server in cluster.servers.values():
        server.stop()
    a1 = {t: ext for t, ext in records(cluster.data_fs("a1"))}
    b1 = {t: ext for t, ext in records(cluster.data_fs("b1"))}
    for tids in (first, second):
        stamp = a1[tids["a1"]]["tidstorage"]
        assert stamp == b1[tids["b1"]]["tidstorage"] and stamp["storages"] == ["a1", "b1"]
    assert "tidstorage" not in a1[third["a1"]]


# -- 5. a non-ZODB data manager --------------------------------------------------


class VoteFailed(Exception):
    pass


@zope.interface.implementer(IDataManager)
class RecordingDataManager:
    """A minimal data manager that records its calls in a shared list."""

    def __init__(self, tm, key: str, events: list, fail_vote: bool = False) -> None:
        self.transaction_manager = tm
        self.key = key
        self.events = events
        self.fail_vote = fail_vote
        self.error = VoteFailed("the other resource refuses")

    def _record(self, what: str) -> None:
        self.events.append(("dm", what))

    def abort(self, txn) -> None:
        self._record("abort")

    def tpc_begin(self, txn) -> None:
        self._record("tpc_begin")

    def commit(self, txn) -> None:
        self._record("commit")

    def tpc_vote(self, txn) -> None:
        self._record("tpc_vote")
        if self.fail_vote:
            raise self.error

    def tpc_finish(self, txn) -> None:
        self._record("tpc_finish")

    def tpc_abort(self, txn) -> None:
        self._record("tpc_abort")

    def sortKey(self) -> str:
        return self.key


@pytest.mark.parametrize("position", ["before", "after"])
def test_non_zodb_data_manager(cluster, monkeypatch, position):
    """A data manager sorting before (or after) both ZODB connections joins a
    2-storage transaction: the commit succeeds, stamped and published. When
    it fails in tpc_vote the application gets its exception, the storages
    get nothing, the wrapper sends ABORT and nothing stays in flight."""
    dbs = open_connected(cluster)
    events: list[tuple] = []
    try:
        workload.prepare(dbs, 0)
        for name in ("a1", "b1"):
            base = dbs[name].storage.base
            for method in ("tpc_vote", "tpc_finish"):
                real = getattr(base, method)

                def spy(*args, _real=real, _what=(name, method), **kw):
                    events.append(_what)
                    return _real(*args, **kw)

                monkeypatch.setattr(base, method, spy)
        spy = ReporterSpy(dbs["a1"].storage.reporter, monkeypatch)
        keys = [dbs[n].storage.sortKey() for n in ("a1", "b1")]
        key = "0 before" if position == "before" else "~ after"
        assert (key < min(keys)) if position == "before" else (key > max(keys))

        def touch(tm, value, dm):
            conn = dbs["a1"].open(tm)
            conn.root()["pairs-0"]["dm"] = value
            conn.get_connection("b1").root()["pairs-0"]["dm"] = value
            tm.get().join(dm)
            return conn

        # success
        tm = transaction.TransactionManager()
        dm = RecordingDataManager(tm, key, events)
        conn = touch(tm, 1, dm)
        tm.commit()
        conn.close()
        assert [e for _, e in events if _ == "dm"] == ["tpc_begin", "commit", "tpc_vote", "tpc_finish"]
        order = [e for e in events if e[1] == "tpc_vote"]
        if position == "before":
            assert order[0] == ("dm", "tpc_vote"), events
        else:
            assert order[-1] == ("dm", "tpc_vote"), events
        lasts = lasts_of(dbs, ["a1", "b1"])
        published = wait_published(
            cluster.daemon, lambda t: all(t[n] == v for n, v in lasts.items()))
        assert spy.names() == ["begin", "commit"]

        # failure in the data manager's vote
        del events[:], spy.calls[:]
        dm = RecordingDataManager(tm, key, events, fail_vote=True)
        conn = touch(tm, 2, dm)
        with pytest.raises(VoteFailed) as info:
            tm.commit()
        assert info.value is dm.error
        tm.abort()
        assert ("dm", "tpc_abort") in events
        assert not any(e[1] == "tpc_finish" for e in events), events
        if position == "before":  # the storages stored, then never voted
            assert not any(e[1] == "tpc_vote" and e[0] != "dm" for e in events), events
        assert spy.names() == ["begin", "abort"], spy.calls
        assert spy.calls[0][1] == spy.calls[1][1]  # the same coherency id
        wait_no_in_flight(cluster.daemon)
        assert lasts_of(dbs, ["a1", "b1"]) == lasts
        assert conn.root()["pairs-0"]["dm"] == 1
        assert conn.get_connection("b1").root()["pairs-0"]["dm"] == 1
        conn.close()
        with cluster.daemon.client() as c:
            assert c.dump() == published
        assert "refused" not in cluster.daemon.log()
    finally:
        close_all(dbs)
    assert all(last_transaction(ZeoSpec(*cluster.zeo_spec()[n])) == lasts[n] for n in lasts)


# -- 6. explicit transaction managers in threads ---------------------------------


def test_explicit_transaction_managers_in_threads(cluster):
    dbs = open_connected(cluster)
    errors: list[BaseException] = []
    counts: dict[int, list[int]] = {}
    stop = threading.Event()

    def hammer(writer: int) -> None:
        import random

        rng = random.Random(writer)
        tm = transaction.TransactionManager()  # this thread's own
        single = multi = 0
        try:
            workload.prepare(dbs, writer)
            while not stop.is_set():
                if rng.random() < 0.5:
                    workload.write_one(dbs, tm, writer, ["a1", "b1"])
                    multi += 1
                else:
                    write_single(dbs, tm, writer, rng.choice(["a1", "b1"]))
                    single += 1
        except BaseException as exc:  # noqa: BLE001 - any error fails the test
            errors.append(exc)
        counts[writer] = [single, multi]

    try:
        threads = [threading.Thread(target=hammer, args=(w,)) for w in (50, 51, 52, 53, 54)]
        for t in threads:
            t.start()
        time.sleep(4)
        stop.set()
        for t in threads:
            t.join(30)
        assert errors == []
        assert all(multi > 10 and single > 10 for single, multi in counts.values()), counts
        final = wait_quiescent(cluster)
        assert dbs["a1"].storage.reporter.session.late_count == 0
    finally:
        close_all(dbs)
    assert check_invariant_ok(cluster)
    log = cluster.daemon.log()
    assert "refused" not in log and "may have been lost" not in log, log[-3000:]
    for server in cluster.servers.values():
        server.stop()
    files = {n: records(cluster.data_fs(n)) for n in ("a1", "b1")}
    stamps = {sid: v for sid, v in file_stamps(files).items() if v[0] == ("a1", "b1")}
    assert all(len(where) == 2 for _, where in stamps.values())
    # one stamp per multi-storage commit (and the bootstrap no-op elsewhere)
    assert len(stamps) == sum(multi for _, multi in counts.values())
    assert {n: files[n][-1][0] for n in files} == {n: final[n] for n in files}


# -- 7. read-only transactions ----------------------------------------------------


def test_read_only_transactions_report_nothing(cluster, monkeypatch):
    dbs = open_connected(cluster)
    try:
        workload.prepare(dbs, 0)
        workload.write_one(dbs, transaction.TransactionManager(), 0, STORAGES)
        published = wait_quiescent(cluster)
        lasts = lasts_of(dbs)
        spy = ReporterSpy(dbs["a1"].storage.reporter, monkeypatch)
        log_start = len(cluster.daemon.log())

        # explicit transaction manager, all three storages loaded
        tm = transaction.TransactionManager()
        conn = dbs["a1"].open(tm)
        seen = {n: dict(conn.get_connection(n).root()["pairs-0"]) for n in STORAGES}
        assert seen["a1"] == {"a1": 1, "a2": 1, "b1": 1}
        tm.commit()
        # a savepoint in a read-only transaction
        conn.root()["pairs-0"].get("a2")
        tm.savepoint()
        tm.commit()
        conn.close()
        # the default (thread-local) transaction manager
        conn = dbs["b1"].open()
        assert dict(conn.root()["pairs-0"]) == {"a1": 1, "a2": 1, "b1": 1}
        transaction.commit()
        conn.close()
        # a change rolled back to a savepoint taken before it: nothing written
        tm = transaction.TransactionManager()
        conn = dbs["a2"].open(tm)
        sp = tm.savepoint()
        conn.root()["pairs-0"]["x"] = 1
        sp.rollback()
        tm.commit()
        conn.close()

        assert spy.calls == []
        assert lasts_of(dbs) == lasts
        time.sleep(0.3)
        with cluster.daemon.client() as c:
            assert c.dump() == published
        assert daemon_in_flight(cluster.daemon) == 0
        new_log = cluster.daemon.log()[log_start:]
        assert "refused" not in new_log and "ERROR" not in new_log, new_log
    finally:
        close_all(dbs)
    assert last_tids(cluster) == lasts


# -- reporting bugs shown by fault injection --------------------------------------


def test_tpc_finish_error_after_the_server_committed(cluster):
    """The first storage's ``tpc_finish`` commits on the server, then the
    reply is lost (injected: the ZEO client raises ClientDisconnected after
    the real call). The transaction is in that storage and not in the other:
    the daemon must not publish past it (it should be reported INDOUBT and
    resolved from the stamps: a SPLIT)."""
    dbs = open_connected(cluster)
    try:
        workload.prepare(dbs, 0)
        tm = transaction.TransactionManager()
        keys = {n: dbs[n].storage.sortKey() for n in ("a1", "b1")}
        first = min(keys, key=keys.get)
        other = "b1" if first == "a1" else "a1"
        base = dbs[first].storage.base
        real = base.tpc_finish
        half = {}

        def tpc_finish(txn, func=lambda tid: None):
            base.tpc_finish = real
            tid = real(txn, func)
            half["tid"] = u64(tid)
            half["id"] = txn.extension["tidstorage"]["id"]
            raise ClientDisconnected("connection lost before the reply (injected)")

        base.tpc_finish = tpc_finish
        other_before = u64(dbs[other].storage.lastTransaction())
        with pytest.raises(ClientDisconnected):
            workload.write_one(dbs, tm, 0, ["a1", "b1"])
        tm.abort()
        assert u64(dbs[first].storage.lastTransaction()) == half["tid"]
        assert u64(dbs[other].storage.lastTransaction()) == other_before
        # later commits on the storage holding half of it
        later = write_single(dbs, tm, 0, first)
        deadline = time.monotonic() + 5
        with cluster.daemon.client() as c:
            while True:
                published = c.dump()
                if published[first] >= later or "SPLIT transaction" in cluster.daemon.log():
                    break
                assert time.monotonic() < deadline, cluster.daemon.log()[-3000:]
                time.sleep(0.05)
    finally:
        close_all(dbs)
    assert published[first] < half["tid"], (
        f"published {first}={published[first]:#x} is past the half-committed "
        f"{half['id']} ({first} tid {half['tid']:#x}), missing from {other}")
    assert f"SPLIT transaction {half['id']}" in cluster.daemon.log()


def test_daemon_restarted_between_begin_and_vote(cluster):
    """A 2-storage transaction has stored (its BEGIN is confirmed by the
    daemon) but not voted yet when the daemon is SIGKILLed and restarted;
    the restarted daemon bootstraps (its no-op commits before this
    transaction votes, so the no-op proves nothing about it) and the
    reporter reconnects. Between this transaction's two ``tpc_finish``
    another client commits on the first storage: the daemon must not publish
    that (a point cutting the transaction in two)."""
    daemon = cluster.daemon
    dbs = open_connected(cluster)
    keys = {n: dbs[n].storage.sortKey() for n in ("a1", "b1")}
    first = min(keys, key=keys.get)
    second = "b1" if first == "a1" else "a1"
    intruder_dbs = workload.open_databases({first: cluster.zeo_spec()[first]}, daemon.address)
    reporter = dbs["a1"].storage.reporter
    seen = {}
    try:
        workload.prepare(dbs, 0)
        workload.prepare(intruder_dbs, 1)
        wait_quiescent(cluster)
        base = dbs[first].storage.base
        real_vote, real_finish = base.tpc_vote, base.tpc_finish

        def tpc_vote(txn):
            base.tpc_vote = real_vote
            time.sleep(0.3)  # the SYNC reply has come: the BEGIN is confirmed
            daemon.kill()
            daemon.start()
            daemon.wait_bootstrapped()
            deadline = time.monotonic() + 10
            while not reporter.connected:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            return real_vote(txn)

        def tpc_finish(txn, func=lambda tid: None):
            base.tpc_finish = real_finish
            tid = real_finish(txn, func)
            seen["first"] = u64(tid)
            intruder = write_single(intruder_dbs, transaction.TransactionManager(), 1, first)
            deadline = time.monotonic() + 3
            with daemon.client() as c:
                while (published := c.dump())[first] < intruder and time.monotonic() < deadline:
                    time.sleep(0.05)
            seen["published"] = published
            return tid

        base.tpc_vote, base.tpc_finish = tpc_vote, tpc_finish
        workload.write_one(dbs, transaction.TransactionManager(), 0, ["a1", "b1"])
        seen["second"] = u64(dbs[second].storage.lastTransaction())
    finally:
        close_all(dbs)
        close_all(intruder_dbs)
    published = seen["published"]
    cut_first = published[first] >= seen["first"]
    cut_second = published[second] >= seen["second"]
    assert cut_first == cut_second, (
        f"published point {published} holds the transaction on {first} "
        f"(tid {seen['first']:#x}) but not on {second} (tid {seen['second']:#x})")


def test_late_single_storage_report_raises_no_alarm(cluster):
    """Two threads commit single-storage transactions on a2; the first one's
    report (sent after its ``tpc_finish``, without waiting, by design) reaches
    the daemon after the second one's, which has the later TID. Across
    processes, or between a thread's tpc_finish and its report, this happens
    under ordinary load. Nothing can be incoherent, so the daemon must not
    log CRITICAL "a backup taken now may hold part of a transaction"."""
    dbs = open_connected(cluster)
    try:
        workload.prepare(dbs, 0)
        workload.prepare(dbs, 1)
        base = dbs["a2"].storage.base
        real = base.tpc_finish
        tids = {}

        def tpc_finish(txn, func=lambda tid: None):
            base.tpc_finish = real
            raw = real(txn, func)
            tids["first"] = u64(raw)
            # another thread commits on a2 before this report is sent
            other = threading.Thread(target=lambda: tids.__setitem__(
                "second", write_single(dbs, transaction.TransactionManager(), 1, "a2")))
            other.start()
            other.join()
            wait_published(cluster.daemon, lambda t: t["a2"] == tids["second"])
            return raw

        base.tpc_finish = tpc_finish
        write_single(dbs, transaction.TransactionManager(), 0, "a2")
        # a 2-storage commit waits for a SYNC sent after the late report
        workload.write_one(dbs, transaction.TransactionManager(), 0, ["a1", "b1"])
        assert tids["first"] < tids["second"]
        with cluster.daemon.client() as c:
            assert c.dump()["a2"] == tids["second"]
    finally:
        close_all(dbs)
    log = cluster.daemon.log()
    assert "CRITICAL" not in log, log[-2000:]
