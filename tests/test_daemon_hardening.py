"""The daemon against forged reports, poisoned state and failing files
(issue "close the data-loss, integrity and denial-of-service holes").

Real ``tidstorage serve`` processes, real sockets, real signals and file
system failures (a directory moved away, a file size limit set on the live
process with ``prlimit``).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import time

import pytest
from tidstorage.demo.cluster import DaemonProcess
from test_storage_faults import wait_for_log

from tidstorage.core import protocol as p
from tidstorage.formats.tidlog import read_log
from tidstorage.core.tids import tid_at


class Raw:
    """A client speaking the protocol byte by byte (optionally as a session)."""

    def __init__(self, daemon, session: tuple[str, str] | None = None) -> None:
        self.sock = socket.create_connection(daemon.address, timeout=10)
        self.reader = p.ReplyReader()
        if session is not None:
            self.send(p.encode_hello(session[0], session[1], os.getpid(), "here"))
            assert self.field() not in (None, "-")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _wait(self, read):
        while (value := read()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.reader.feed(data)
        return value

    def field(self) -> str:
        return self._wait(self.reader.read_field)

    def sync(self) -> int:
        self.send(p.SYNC_REQUEST)
        return self._wait(self.reader.read_int)

    def dump(self) -> dict:
        self.send(p.DUMP_REQUEST)
        return self._wait(self.reader.read_dict)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def configured(tmp_path):
    """A daemon whose config names storages a and b (local files it reads)."""
    from ZODB.FileStorage import FileStorage

    storages = {}
    for name in ("a", "b"):
        path = tmp_path / name / "Data.fs"
        path.parent.mkdir()
        FileStorage(str(path)).close()
        storages[name] = {"data_fs": str(path)}
    d = DaemonProcess(tmp_path / "daemon", storages=storages).start()
    d.wait_bootstrapped()
    yield d
    d.kill()


def test_reports_are_bound_to_the_session_that_began_the_transaction(configured):
    """A coherency id read from a Data.fs does not let a stranger end it."""
    owner = Raw(configured, ("s-owner", "owner-secret"))
    owner.send(p.encode_begin("ts:s-owner-1", ["a", "b"], {"a": 0, "b": 0}))
    assert owner.sync() == 1
    stranger = Raw(configured, ("s-stranger", "other-secret"))
    stranger.send(p.encode_abort("ts:s-owner-1") + p.encode_in_doubt("ts:s-owner-1")
                  + p.encode_commit("ts:s-owner-1", {"a": 5, "b": 5}))
    assert stranger.sync() == 1  # refused reports do not fail a SYNC ...
    log = wait_for_log(configured, "not the session that began it")
    assert "ts:s-owner-1" in log
    state = describe(configured)
    assert "in flight ts:s-owner-1" in state  # ... and changed nothing
    # nor can a stranger take the session over without its secret
    with pytest.raises(AssertionError):
        Raw(configured, ("s-owner", "guessed"))
    owner.send(p.encode_abort("ts:s-owner-1"))
    assert owner.sync() == 1
    assert "in flight ts:s-owner-1" not in describe(configured)


def describe(daemon) -> str:
    start = len(daemon.log())
    daemon.signal(signal.SIGUSR1)
    text = wait_for_log(daemon, r"in_flight=\d+", start)
    return text[text.index("state:"):]


def test_unknown_storage_ids_are_refused_and_remembered(configured):
    c = Raw(configured, ("s-typo", "typo-secret"))
    c.send(p.encode_begin("ts:s-typo-1", ["a", "secnd"], {"a": 0, "secnd": 0}))
    assert c.sync() == 0  # not registered: the client knows
    c.send(p.encode_begin("legacy", ["secnd"]) + p.encode_commit("legacy", {"secnd": 9}))
    c.sync()
    assert "secnd" not in c.dump()
    log = wait_for_log(configured, "not in the configuration")
    assert "secnd" in log


def test_a_tid_far_in_the_future_is_refused_and_cannot_freeze_a_storage(tmp_path):
    d = DaemonProcess(tmp_path / "daemon").start()  # no [storages]: any id
    try:
        with d.client() as c:
            c.begin("poison", ["x"])
            c.commit("poison", {"x": 2**64 - 1})
            c.begin("far", ["x"])
            c.commit("far", {"x": tid_at(time.time() + 7200)})
            now = tid_at(time.time())
            c.begin("real", ["x"])
            c.commit("real", {"x": now})
            c.sync()
            assert c.dump() == {"x": now}
        assert "implausibly far ahead" in d.log()
    finally:
        d.kill()


def test_shutdown_exits_nonzero_when_the_last_records_cannot_be_written(tmp_path):
    """A failing final flush is reported: exit code 1 and what is missing."""
    d = DaemonProcess(tmp_path / "daemon", server={"burst_period": 60,
                                                    "full_dump_period": None}).start()
    # a first record bigger than the daemon's own log will ever be, so the
    # size limit set below stops the TID log but not the daemon's log
    many = {f"pad{i:04d}": 100 for i in range(600)}
    with d.client() as c:
        c.begin("t1", ["x", *many])
        c.commit("t1", {"x": 100, **many})  # the first change is written at once
        c.sync()
        deadline = time.monotonic() + 20
        while read_log(d.status_file).final_tids() != {"x": 100, **many}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        size = d.status_file.stat().st_size
        # the TID log may not grow any more (EFBIG for the daemon)
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (size, size))
        c.begin("t2", ["x"])
        c.commit("t2", {"x": 350})  # pending: the burst period has not passed
        c.sync()
    assert d.stop() == 1
    log = d.log()
    assert "could not write the last published TIDs" in log and "x=0x15e" in log, log[-2000:]
    assert read_log(d.status_file).final_tids()["x"] == 100


def test_a_failed_sighup_reopen_keeps_the_old_file_and_the_timer(tmp_path):
    d = DaemonProcess(tmp_path / "daemon", server={
        "status_file": str(tmp_path / "logs" / "tidstorage.tid")}).start()
    try:
        moved = tmp_path / "logs-moved"
        with d.client() as c:
            c.begin("t1", ["x"])
            c.commit("t1", {"x": 1})
            c.sync()
            shutil.move(str(tmp_path / "logs"), moved)  # the new path cannot be created
            start = len(d.log())
            d.signal(signal.SIGHUP)
            wait_for_log(d, "cannot reopen the TID log", start)
            c.begin("t2", ["x"])
            c.commit("t2", {"x": 2})
            c.sync()
            # still written, to the file that was open (now moved), by the timer
            deadline = time.monotonic() + 20
            while read_log(moved / "tidstorage.tid").final_tids() != {"x": 2}:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert "works again" not in d.log()[start:]
            (tmp_path / "logs").mkdir()
            d.signal(signal.SIGHUP)
            wait_for_log(d, "reopened TID log", start)
            deadline = time.monotonic() + 20
            while read_log(tmp_path / "logs" / "tidstorage.tid").final_tids() != {"x": 2}:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.dump() == {"x": 2}
    finally:
        d.kill()


def test_legacy_clients_can_be_refused(tmp_path):
    d = DaemonProcess(tmp_path / "daemon", server={"legacy_clients": False}).start()
    try:
        with d.client() as c:
            c.send_raw(p.encode_begin("legacy", ["x"]) + p.encode_commit("legacy", {"x": 5}))
            c.send_raw(p.SYNC_REQUEST)
            assert c._read(c._reader.read_int) == 0
            assert c.dump() == {}
        assert "legacy clients are refused" in d.log()
    finally:
        d.kill()


def test_a_strangers_lost_does_not_block_storages_it_never_reported(tmp_path):
    d = DaemonProcess(tmp_path / "daemon").start()  # x is unreadable (legacy mode)
    try:
        with d.client() as c:
            c.begin("t1", ["x"])
            c.commit("t1", {"x": 5})
            c.sync()
        stranger = Raw(d, ("s-stranger", "secret-stranger"))
        stranger.send(p.encode_lost(["x"]))
        assert stranger.sync() == 1
        with d.client() as c:
            c.begin("t2", ["x"])
            c.commit("t2", {"x": 6})
            c.sync()
            assert c.dump() == {"x": 6}
    finally:
        d.kill()





def test_what_one_message_costs_is_bounded(cluster):
    """Log amplification: a LOST naming thousands of long ids makes one
    bounded line; hundreds of LOSTs and INDOUBTs commit no no-op and write
    little log; a 16 KiB transaction id never makes a 16 KiB line."""
    from test_storage import records

    daemon = cluster.daemon
    before = {n: len(records(cluster.data_fs(n))) for n in ("a1", "b1")}
    size = daemon.log_path.stat().st_size
    c = Raw(daemon)
    ids = [f"{'x' * 100}-{i}" for i in range(4000)]
    c.send(p.encode_begin("legacy-long-ids", ids) + p.encode_lost(ids))
    for i in range(300):
        c.send(p.encode_lost(["a1", "b1"]) + p.encode_in_doubt(f"ts:s-flood-{i}"))
    c.send(p.encode_begin("y" * 16000, ["a1"]) + p.encode_begin("y" * 16000, ["a1"]))
    c.sync()
    c.close()
    time.sleep(1.0)  # let any re-read run (nothing to wait for otherwise)
    grown = daemon.log_path.stat().st_size - size
    lines = daemon.log()[size:].splitlines()
    assert max(len(line) for line in lines) < 9000, max(len(line) for line in lines)
    assert grown < 64 * 1024, grown
    for server in cluster.servers.values():
        server.stop()
    after = {n: len(records(cluster.data_fs(n))) for n in ("a1", "b1")}
    assert after == before  # no no-op commit for LOSTs


def run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tidstorage", *args], capture_output=True,
                          text=True, timeout=60)


def test_an_operator_corrects_a_poisoned_point_through_the_daemon(tmp_path):
    """A legacy daemon's log published a TID from the future (before
    max_tid_ahead existed): the operator lowers it and forgets a forged id,
    with the admin token; without it, nothing changes."""
    from tidstorage.formats.tidlog import encode_record

    admin = tmp_path / "admin-token"
    admin.write_text("an-admin-token-of-enough-length\n")
    admin.chmod(0o600)
    directory = tmp_path / "daemon"
    directory.mkdir()
    poisoned = {"x": 2**64 - 2, "forged": 7}
    (directory / "tidstorage.tid").write_bytes(encode_record(1.0, "full", poisoned))
    d = DaemonProcess(directory, server={"admin_token_file": str(admin)}).start()
    try:
        with d.client() as c:
            assert c.dump() == poisoned
            refused = c.admin({"verb": "set-tid", "storage": "x", "tid": 5, "token": "wrong"})
            assert refused == {"ok": False, "error": "wrong admin token"}
        config = str(d.config_path)
        no = run_cli("admin", "set-tid", "-c", config, "x", "5")
        assert no.returncode == 2 and "--yes" in no.stderr
        done = run_cli("admin", "set-tid", "-c", config, "x", "5", "--yes")
        assert done.returncode == 0, done.stderr
        assert "x: 0xfffffffffffffffe -> 0x5" in done.stdout and "before-correction" in done.stdout
        done = run_cli("admin", "forget", "-c", config, "forged", "--yes")
        assert done.returncode == 0, done.stderr
        with d.client() as c:
            assert c.dump() == {"x": 5}
            c.begin("t", ["x"])
            c.commit("t", {"x": tid_at(time.time())})  # real commits publish again
            c.sync()
            assert c.dump()["x"] > 5
        kept = [read_log(f).final_tids()
                for f in directory.glob("tidstorage.tid.before-correction-*")]
        assert sorted(kept, key=str) == sorted([poisoned, {"x": 5, "forged": 7}], key=str)
        deadline = time.monotonic() + 20
        while read_log(d.status_file).final_tids().get("x", 0) <= 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "forged" not in read_log(d.status_file).final_tids()
        log = d.log()
        assert "ADMIN: published TID of x set to 0x5 by the operator" in log
    finally:
        d.kill()
    # after a restart the corrected point is what is served
    d.start()
    try:
        with d.client() as c:
            assert "forged" not in c.dump() and c.dump()["x"] < 2**63
    finally:
        d.kill()
