"""The recovery paths on real processes: runzeo, the daemon, writers, kills.

Each scenario of the issue "sound and live recovery paths" is played with
real parts: writer processes driven line by line (``scripted.py``), a TCP
proxy that cuts or refuses their daemon connection (``proxy.py``), SIGKILL.
Published points are sampled all along and checked against the stamps in
the ``Data.fs`` files at the end: no sample may keep part of a transaction.
Nothing here waits for a fixed time to pass before asserting; waits poll
with generous limits.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tidstorage.demo.cluster import DaemonProcess
from support.proxy import Proxy
from tidstorage.demo.cluster import ZeoServer
from test_storage import records, wait_published
from test_storage_faults import Sampler, file_stamps, splits_at, wait_for_log
from ZODB.FileStorage import FileStorage

from tidstorage.formats import filestorage
from tidstorage.formats.tidlog import read_log

SCRIPTED = str(Path(__file__).parent / "support" / "scripted.py")
ZEO_STORAGES = ["a1", "a2", "b1"]


class Writer:
    """A ``scripted.py`` process."""

    def __init__(self, spec: dict, name: str = "writer") -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPTED, json.dumps(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._err: list[str] = []
        threading.Thread(target=self._read_err, daemon=True).start()
        assert self.expect() == "ok ready"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self._err.append(line)

    def expect(self, timeout: float = 60) -> str | None:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no answer in {timeout}s\n{self.stderr()}")
        return line

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def do(self, line: str):
        self.send(line)
        answer = self.expect()
        assert answer is not None and answer.startswith("ok"), (line, answer, self.stderr())
        rest = answer[2:].strip()
        return json.loads(rest) if rest and rest[0] in "{[" else rest

    def stderr(self) -> str:
        return "".join(self._err[-60:])

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def writers():
    made: list[Writer] = []

    def make(spec: dict, name: str = "writer") -> Writer:
        w = Writer(spec, name)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def zeo_spec(cluster, server: tuple[str, int] | None = None, timeout: float = 0.5) -> dict:
    address = server or cluster.daemon.address
    return {
        "server": f"{address[0]}:{address[1]}",
        "timeout": timeout,
        "zeo": {k: [v[0][0], v[0][1], v[1]] for k, v in cluster.zeo_spec().items()},
    }


def zeo_lasts(cluster) -> dict[str, int]:
    from tidstorage.daemon.zeo import ZeoSpec, last_transaction

    return {name: last_transaction(ZeoSpec(address, st))
            for name, (address, st) in cluster.zeo_spec().items()}


def covers(lasts: dict[str, int]):
    return lambda t: all(t.get(n, -1) >= v for n, v in lasts.items())


def stopped_files(cluster) -> dict[str, list]:
    for server in cluster.servers.values():
        server.stop()
    return {n: records(cluster.data_fs(n)) for n in ZEO_STORAGES}


def split_id(log: str) -> str:
    line = next(x for x in log.splitlines() if "SPLIT transaction" in x)
    return line.split("SPLIT transaction ", 1)[1].split(" ", 1)[0]


def assert_never_published_past(samples, files, txn: str) -> None:
    stamps = file_stamps(files)
    names, where = stamps[txn]
    assert 0 < len(where) < len(names), (txn, where)  # a real split
    for sample in samples:
        for storage, tid in where.items():
            assert sample.get(storage, -1) < tid, (sample, txn, where)


# -- no clean exit leaves anything in doubt ---------------------------------------


def test_clean_exit_right_after_the_last_commit(cluster, writers):
    w = writers(zeo_spec(cluster))
    w.do("commit a1,b1")
    w.do("commit a2")
    w.do("commit a1,a2,b1")
    lasts = w.do("last")
    w.send("exit")
    assert w.expect() == "ok bye" and w.wait() == 0
    wait_published(cluster.daemon, covers(lasts), timeout=60)
    log = cluster.daemon.log()
    assert " quit" in log and "in-doubt" not in log and "in doubt" not in log, log[-3000:]
    assert "disconnected without QUIT" not in log


def local_daemon(tmp_path, names=("a", "b"), **server):
    files = {n: tmp_path / n / "Data.fs" for n in names}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        FileStorage(str(path)).close()
    d = DaemonProcess(tmp_path / "daemon",
                      storages={n: {"data_fs": str(p)} for n, p in files.items()},
                      server={"in_doubt_grace": 1.0, **server}).start()
    d.wait_bootstrapped()
    return d, files


def file_lasts(files) -> dict[str, int]:
    return {n: filestorage.last_tid(p) for n, p in files.items()}


def local_spec(d, files, server=None) -> dict:
    address = server or d.address
    return {"server": f"{address[0]}:{address[1]}", "timeout": 0.5,
            "files": {n: str(p) for n, p in files.items()}}


def test_clean_exits_with_local_filestorages_one_process_after_the_other(tmp_path, writers):
    d, files = local_daemon(tmp_path)
    try:
        for name, single in (("first", "a"), ("second", "b")):
            w = writers(local_spec(d, files), name)
            w.do("commit a,b")
            w.do(f"commit {single}")
            w.send("exit")
            assert w.expect() == "ok bye" and w.wait() == 0
            wait_published(d, covers(file_lasts(files)), timeout=60)
        log = d.log()
        assert "in doubt" not in log and "in-doubt" not in log, log[-3000:]
        assert log.count(" quit") >= 2
    finally:
        d.kill()


def zconfig_text(cluster, servers: dict[str, str], timeouts: dict[str, float]) -> str:
    sections = []
    for name, (address, st) in cluster.zeo_spec().items():
        if name not in servers:
            continue
        sections.append(f"""
<zodb {name}>
  <tidstorage>
    name {name}
    server {servers[name]}
    timeout {timeouts[name]}
    <zeoclient>
      server {address[0]}:{address[1]}
      storage {st}
    </zeoclient>
  </tidstorage>
</zodb>""")
    return "%import tidstorage\n" + "\n".join(sections)


def test_two_sections_naming_one_daemon_differently_make_one_stamped_commit(cluster, writers):
    """Scenario 3: ``127.0.0.1:P`` and ``localhost:P`` (and two timeouts):
    one transaction over both is stamped in both files and published whole;
    and the process exits through atexit alone (no close) cleanly."""
    port = cluster.daemon.port
    text = zconfig_text(cluster, {"a1": f"127.0.0.1:{port}", "b1": f"localhost:{port}"},
                        {"a1": 0.4, "b1": 0.9})
    w = writers({"zconfig": text})
    w.do("wait-connected")
    assert w.do("reporters") == "1"  # one connection: the daemon's id, not the address
    tids = w.do("commit a1,b1")
    w.do("commit a1,b1")
    lasts = w.do("last")
    w.send("quit-open")  # no DB.close(): the atexit hook flushes and QUITs
    assert w.expect() == "ok bye" and w.wait() == 0
    wait_published(cluster.daemon, covers(lasts), timeout=60)
    files = stopped_files(cluster)
    a1 = {tid: ext.get("tidstorage") for tid, ext in files["a1"]}
    b1 = {tid: ext.get("tidstorage") for tid, ext in files["b1"]}
    assert a1[tids["a1"]] == b1[tids["b1"]] and a1[tids["a1"]]["storages"] == ["a1", "b1"]
    log = cluster.daemon.log()
    assert "disconnected without QUIT" not in log, log[-3000:]


def test_a_forked_child_commits_through_a_reporter_made_in_its_parent(tmp_path, writers):
    d, files = local_daemon(tmp_path)
    try:
        w = writers(local_spec(d, files))
        w.do("commit a,b")
        w.do("wait-connected")
        assert w.do("fork a,b") == "0"  # the child's exit status
        lasts = file_lasts(files)
        wait_published(d, covers(lasts), timeout=60)
        w.send("quit-open")
        assert w.expect() == "ok bye" and w.wait() == 0
        log = d.log()
        pids = {line.split("(pid ", 1)[1].split(")", 1)[0]
                for line in log.splitlines() if " quit" in line and "(pid " in line}
        assert len(pids) == 2, log[-3000:]  # the parent and the child, each its own session
        assert "in doubt" not in log and "in-doubt" not in log
    finally:
        d.kill()


def test_rolling_restarts_of_writers_under_load_keep_the_point_moving(cluster):
    close_all_dbs = cluster.open()
    for db in close_all_dbs.values():
        db.close()
    sampler = Sampler(cluster.daemon)
    sampler.start()
    deadline = time.monotonic() + 6
    running: list[subprocess.Popen] = []
    rounds = 0
    try:
        writer = 60
        while time.monotonic() < deadline:
            running = [p for p in running if p.poll() is None]
            while len(running) < 3:
                writer += 1
                rounds += 1
                running.append(subprocess.Popen(
                    cluster.writer_cmd(writer, transactions=15), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True))
            time.sleep(0.05)
        for p in running:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err[-2000:]
        lasts = zeo_lasts(cluster)
        wait_published(cluster.daemon, covers(lasts), timeout=60)
    finally:
        samples = [s for _, s in sampler.stop()]
        for p in running:
            if p.poll() is None:
                p.kill()
    assert rounds >= 6
    log = cluster.daemon.log()
    assert "in doubt" not in log and "in-doubt" not in log, log[-3000:]
    files = stopped_files(cluster)
    assert splits_at(samples, files) == []


# -- lost reports, dropped connections, kills ------------------------------------


def single_writer_thread(cluster, names, stop: threading.Event):
    """Commit single-storage transactions on ``names`` until ``stop``."""
    import transaction

    from tidstorage.demo import workload
    def run():
        dbs = workload.open_databases(cluster.zeo_spec(), cluster.daemon.address)
        tm = transaction.TransactionManager()
        try:
            workload.prepare(dbs, 99)
            i = 0
            while not stop.is_set():
                name = names[i % len(names)]
                conn = dbs[name].open(tm)
                conn.root()["pairs-99"]["self"] = i
                tm.commit()
                conn.close()
                i += 1
                time.sleep(0.01)
        finally:
            for db in dbs.values():
                db.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def check_split_never_published(cluster, samples, log) -> dict[str, int]:
    """Stop the servers; no sample (nor the final point) keeps the split the
    daemon logged, nor splits anything else. Returns the final point."""
    with cluster.daemon.client() as c:
        final = c.dump()
    files = stopped_files(cluster)
    assert_never_published_past(samples + [final], files, split_id(log))
    assert splits_at(samples + [final], files) == []
    return final


def cut_off(cluster, writers, proxy: Proxy) -> Writer:
    """A writer connected to the daemon through ``proxy``, then cut off (its
    connection reset, new ones refused)."""
    w = writers(zeo_spec(cluster, server=proxy.address))
    w.do("commit a1,b1")
    w.do("wait-connected")
    proxy.refuse()
    proxy.cut()
    w.do("wait-disconnected")
    return w


def test_a_writer_cut_off_the_daemon_and_killed_between_finishes_is_never_published(
        cluster, writers):
    proxy = Proxy(cluster.daemon.address)
    sampler = Sampler(cluster.daemon)
    sampler.start()
    stop = threading.Event()
    try:
        w = cut_off(cluster, writers, proxy)
        other = single_writer_thread(cluster, ["a1", "b1"], stop)
        w.send("commit a1,b1 kill=between")
        assert w.proc.wait(60) == -9
        log = wait_for_log(cluster.daemon, "SPLIT transaction", timeout=60)
        stop.set()
        other.join(30)
        lasts = zeo_lasts(cluster)
        time.sleep(0.2)
    finally:
        stop.set()
        samples = [s for _, s in sampler.stop()]
        proxy.close()
    final = check_split_never_published(cluster, samples, log)
    # storages not linked to the split moved on
    assert final["a2"] == lasts["a2"] or "a2" not in lasts


def test_a_begin_lost_at_seal_then_a_late_vote_never_publishes_the_split(cluster, writers):
    """Scenario 1: T's BEGIN cannot be sent when it is sealed; the reporter
    reconnects while T is still storing; T votes and is killed between its
    finishes while another client commits on its storages."""
    proxy = Proxy(cluster.daemon.address)
    sampler = Sampler(cluster.daemon)
    sampler.start()
    stop = threading.Event()
    try:
        w = cut_off(cluster, writers, proxy)
        w.send("commit a1,b1 pause=vote kill=between")
        assert w.expect() == "paused"  # sealed, BEGIN not sent, before any vote
        proxy.accept()  # the reporter reconnects while T is still storing
        deadline = time.monotonic() + 30
        while proxy.accepted < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # whatever the daemon does with the reconnection is done before T
        # votes: other commits on T's storages are published again
        other = single_writer_thread(cluster, ["a1", "b1"], stop)
        for _ in range(2):  # past commits made after the reconnection
            wait_published(cluster.daemon, covers(zeo_lasts(cluster)), timeout=60)
        w.send("go")
        assert w.proc.wait(60) == -9
        log = wait_for_log(cluster.daemon, "SPLIT transaction", timeout=60)
        stop.set()
        other.join(30)
    finally:
        stop.set()
        samples = [s for _, s in sampler.stop()]
        proxy.close()
    check_split_never_published(cluster, samples, log)


def test_an_in_doubt_writer_between_its_finishes_is_proven_not_guessed(cluster, writers):
    """Scenario 6: the connection of a writer between ``tpc_finish(a1)`` and
    ``tpc_finish(b1)`` drops; the daemon's no-op on b1 waits for the
    transaction's lock, so no SPLIT is declared however long the writer
    takes; it completes and is published whole."""
    proxy = Proxy(cluster.daemon.address)
    try:
        w = writers(zeo_spec(cluster, server=proxy.address))
        w.do("commit a1,b1")
        w.do("wait-connected")
        start = len(cluster.daemon.log())
        w.send("commit a1,b1 pause=between")
        assert w.expect() == "paused"
        proxy.refuse()
        proxy.cut()
        # the daemon sees the abrupt disconnect and starts resolving
        wait_for_log(cluster.daemon, "disconnected without QUIT", start, timeout=60)
        deadline = time.monotonic() + 3 * 1.0  # three times in_doubt_grace
        while time.monotonic() < deadline:
            assert "SPLIT" not in cluster.daemon.log()[start:]
            time.sleep(0.1)
        proxy.accept()
        w.send("go")
        tids = json.loads(w.expect()[2:])
        log = wait_for_log(cluster.daemon, "found in every storage: committed", start,
                           timeout=60)
        assert "SPLIT" not in log
        wait_published(cluster.daemon, covers(tids), timeout=60)
    finally:
        proxy.close()


def future_tid_zeo(directory: Path, name: str, seconds: float) -> ZeoServer:
    """A ZEO server whose storage once got a TID ``seconds`` in the future:
    FileStorage keeps issuing later TIDs (a clock that jumped, or a host
    whose clock is ahead)."""
    import transaction as txn_mod
    from ZODB.Connection import TransactionMetaData

    from tidstorage.core.tids import p64, tid_at

    server = ZeoServer(directory / name, ["1"])
    path = server.data_fs("1")
    path.parent.mkdir(parents=True, exist_ok=True)
    fs = FileStorage(str(path))
    try:
        meta = TransactionMetaData(description="clock ahead")
        fs.tpc_begin(meta, p64(tid_at(time.time() + seconds)))
        fs.tpc_vote(meta)
        fs.tpc_finish(meta)
    finally:
        fs.close()
    del txn_mod
    return server


def test_a_split_is_found_whatever_the_clocks(tmp_path, writers):
    """Scenario 2: one storage's TIDs 120 s ahead of the other's; a writer
    and the daemon both killed while the writer is between its finishes:
    the restarted daemon finds the split and never publishes past it."""
    a = ZeoServer(tmp_path / "a", ["1"])
    b = future_tid_zeo(tmp_path, "b", 120.0)
    a.start()
    b.start()
    try:
        storages = {"a1": {"zeo": f"127.0.0.1:{a.address[1]}", "data_fs": str(a.data_fs("1"))},
                    "b1": {"zeo": f"127.0.0.1:{b.address[1]}", "data_fs": str(b.data_fs("1"))}}
        d = DaemonProcess(tmp_path / "daemon", storages=storages,
                          server={"in_doubt_grace": 1.0}).start()
        d.wait_bootstrapped()
        spec = {"server": f"127.0.0.1:{d.port}", "timeout": 0.5,
                "zeo": {"a1": ["127.0.0.1", a.address[1], "1"],
                        "b1": ["127.0.0.1", b.address[1], "1"]}}
        w = writers(spec)
        w.do("commit a1,b1")
        w.do("commit b1,a1")
        w.send("commit a1,b1 pause=between")
        assert w.expect() == "paused"
        d.kill()
        w.kill()
        d.start()
        sampler = Sampler(d)
        sampler.start()
        log = wait_for_log(d, "SPLIT transaction", timeout=60)
        more = writers(spec, "more")
        more.do("commit a1")
        more.do("commit b1")
        lasts = more.do("last")
        more.do("exit")
        # the storage that holds T's part stays below it; the other moves on
        line = next(x for x in log.splitlines() if "SPLIT transaction" in x)
        free = line.split("proven missing in ", 1)[1].split(".", 1)[0]
        wait_published(d, lambda t: t.get(free, -1) >= lasts[free], timeout=60)
        samples = [s for _, s in sampler.stop()]
        with d.client() as c:
            final = c.dump()
        d.kill()
    finally:
        a.stop()
        b.stop()
    files = {"a1": records(a.data_fs("1")), "b1": records(b.data_fs("1"))}
    assert_never_published_past(samples + [final], files, split_id(log))


def test_a_daemon_restart_between_finishes_on_local_storages(tmp_path, writers):
    """Scenario 4: no ZEO; the daemon restarts while T is between its
    finishes; T completes after; later single commits on one storage never
    publish a point that keeps T on it and not on the other."""
    d, files = local_daemon(tmp_path)
    try:
        w = writers(local_spec(d, files))
        w.do("commit a,b")
        w.do("wait-connected")
        w.send("commit a,b pause=between")
        assert w.expect() == "paused"
        d.kill()
        start = len(d.log())
        d.start()
        sampler = Sampler(d)
        sampler.start()
        # the writer reconnects and re-declares T, which is between its finishes
        wait_for_log(d, r"session \S+ \(pid", start, timeout=60)
        w.send("go")
        assert w.expect().startswith("ok {")
        for _ in range(3):
            w.do("commit a")
        w.send("exit")
        assert w.expect() is not None
        wait_published(d, covers(file_lasts(files)), timeout=60)
        samples = [s for _, s in sampler.stop()]
        log = d.log()
        assert "SPLIT" not in log, log[-3000:]
        fs_records = {n: [(h.tid, h.ext()) for h in filestorage.iter_forward(p)]
                      for n, p in files.items()}
        assert splits_at(samples, fs_records) == []
    finally:
        d.kill()


def push_clock(address, storage: str, seconds: float) -> int:
    """Commit an empty transaction with a TID ``seconds`` ahead through ZEO
    (as ``copyTransactionsFrom`` does): the storage's later TIDs follow it,
    as after a clock jump."""
    from ZEO.ClientStorage import ClientStorage
    from ZODB.Connection import TransactionMetaData

    from tidstorage.core.tids import p64, tid_at, u64

    client = ClientStorage(address, storage=storage, wait_timeout=30)
    try:
        tid = p64(max(tid_at(time.time() + seconds), u64(client.lastTransaction()) + 1))
        meta = TransactionMetaData(description="clock jump")
        client.tpc_begin(meta, tid, " ")
        client.tpc_vote(meta)
        client.tpc_finish(meta)
        return u64(tid)
    finally:
        client.close()


def test_parts_of_a_transaction_far_apart_are_no_false_split(cluster, writers):
    """Scenario 5: T's TIDs on its two storages are far apart (a lock held
    for long, or clocks that differ); the daemon restarts when T's parts lie
    on either side of any time window before the published point. T is
    published whole and no SPLIT is declared, before or after the restart."""
    a, b = cluster.servers["a"], cluster.servers["b"]
    w = writers(zeo_spec(cluster))
    w.do("commit a1,b1")
    push_clock(b.address, "1", 25.0)  # b1's TIDs now run 25 s ahead
    tids = w.do("commit a1,b1")  # T: a1 at t, b1 at t + 25 s
    push_clock(a.address, "1", 31.0)  # a1's published point jumps past t + 30 s
    w.do("commit a1")
    lasts = zeo_lasts(cluster)
    wait_published(cluster.daemon, covers(lasts), timeout=60)
    deadline = time.monotonic() + 60
    while not covers(lasts)(read_log(cluster.daemon.status_file).final_tids()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = len(cluster.daemon.log())
    cluster.daemon.kill()
    cluster.daemon.start()
    cluster.daemon.wait_bootstrapped()
    w.do("commit a1,b1")
    more = zeo_lasts(cluster)
    wait_published(cluster.daemon, covers(more), timeout=60)
    log = cluster.daemon.log()[start:]
    assert "SPLIT" not in log, log[-3000:]
    assert tids["b1"] and tids["a1"]
