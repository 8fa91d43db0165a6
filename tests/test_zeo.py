"""Tests for tests/servers.py (real runzeo processes) and tidstorage.daemon.zeo."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileIterator
from ZODB.utils import u64, z64

from tidstorage.core.addresses import format_address
from tidstorage.core.addresses import parse_zeo_address as parse_address
from tidstorage.daemon.zeo import (
    BOOTSTRAP_EXTENSION,
    ZeoSpec,
    ZeoUnavailable,
    commit_noop,
    is_bootstrap_extension,
    last_transaction,
)
from tidstorage.demo.cluster import ZeoServer, ZeoServerError, free_port

# -- helpers ----------------------------------------------------------------

def client(address, storage="1", **kw) -> ClientStorage:
    kw.setdefault("wait_timeout", 5)
    return ClientStorage(address, storage=storage, **kw)


def root_pickle() -> bytes:
    # A ZODB record is two concatenated pickles: class metadata and state.
    return (pickle.dumps((PersistentMapping, None), 3)
            + pickle.dumps({"data": {"x": 1}}, 3))


def begin_and_vote(cs: ClientStorage, description="other"):
    """Start a transaction that stores one object and vote it: after this
    returns the server holds the storage's commit lock for it."""
    txn = TransactionMetaData(description=description)
    cs.tpc_begin(txn)
    cs.store(cs.new_oid(), z64, root_pickle(), "", txn)
    cs.tpc_vote(txn)
    return txn


def commit_one(address, storage="1") -> int:
    cs = client(address, storage)
    try:
        txn = begin_and_vote(cs)
        return u64(cs.tpc_finish(txn))
    finally:
        cs.close()


def transactions(path: Path):
    it = FileIterator(str(path))
    try:
        return [(t, list(t)) for t in it]
    finally:
        it.close()


def port_refuses(address) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        try:
            sock.connect(address)
        except OSError:
            return True
        return False


def specs_for(a: ZeoServer, b: ZeoServer) -> dict[str, ZeoSpec]:
    return {"x": ZeoSpec(a.address, "1"), "y": ZeoSpec(a.address, "2"),
            "z": ZeoSpec(b.address, "1")}


def run_in_thread(func, *args, **kw):
    result = {}

    def target():
        try:
            result["value"] = func(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


# -- the ZeoServer helper ---------------------------------------------------

def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_server_start_connect_stop_restart(zeo_factory):
    server = zeo_factory(["1"])
    assert not server.running
    assert (server.directory / "zeo.conf").exists()
    server.start()
    assert server.running
    cs = client(server.address)
    try:
        assert cs.lastTransaction() == z64
    finally:
        cs.close()
    tid = commit_one(server.address)

    server.stop()
    assert not server.running
    assert "closing storage '1'" in server.log()  # graceful shutdown
    assert port_refuses(server.address)
    with socket.socket() as sock:  # the port really is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(server.address)

    port = server.port
    server.restart()
    assert server.port == port and server.running
    cs = client(server.address)
    try:
        assert u64(cs.lastTransaction()) == tid  # data survived
    finally:
        cs.close()
    assert transactions(server.data_fs("1"))[-1][0].tid == tid.to_bytes(8, "big")
    assert "opening storage '1'" in server.log()


def test_server_restart_while_running_keeps_port(zeo_factory):
    server = zeo_factory(["1"], start=True)
    pid, address = server.pid, server.address
    server.restart()
    assert server.pid != pid and server.address == address
    assert commit_one(server.address) > 0


def test_server_kill_is_a_crash(zeo_factory):
    server = zeo_factory(["1", "2"], start=True)
    commit_one(server.address, "2")
    pid = server.pid
    server.kill()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert port_refuses(server.address)
    # SIGKILL leaves no clean shutdown behind (ZEO never closed storages) ...
    last_run = server.log().rsplit("===== starting runzeo", 1)[-1]
    assert "listening on" in last_run
    assert "terminated by SIGTERM" not in last_run
    assert "closing storage" not in last_run
    # ... but the storage can be served again.
    server.start()
    assert commit_one(server.address, "2") > 0


def test_server_multiple_storages_blob_and_explicit_paths(zeo_factory, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "Other.fs"
    server = zeo_factory({"1": elsewhere, "main": tmp_path / "m" / "Data.fs"},
                         blob=True, start=True)
    assert server.data_fs("1") == elsewhere
    assert server.blob_dir("main").is_dir()
    commit_one(server.address, "1")
    commit_one(server.address, "main")
    assert elsewhere.exists()
    assert len(transactions(server.data_fs("main"))) == 1


def test_server_context_manager(tmp_path):
    with ZeoServer(tmp_path / "s", ["1"]) as server:
        assert server.running
        address = server.address
        commit_one(address)
    assert not server.running
    assert port_refuses(address)


def test_server_start_failure_reports_log(zeo_factory):
    server = zeo_factory(["1"])
    server.config_path.write_text("<zeo>\n  address nonsense:port:x\n</zeo>\n")
    with pytest.raises(ZeoServerError, match="exited with"):
        server.start(timeout=10)
    assert not server.running


def test_server_refuses_busy_port(zeo_factory):
    a = zeo_factory(["1"], start=True)
    b = zeo_factory(["1"], port=a.port)
    with pytest.raises(ZeoServerError, match="already in use"):
        b.start(timeout=0.2)
    assert a.running


def test_two_zeo_servers_fixture(two_zeo_servers):
    a, b = two_zeo_servers
    assert a.running and b.running and a.address != b.address
    assert set(a.storages) == {"1", "2"} and set(b.storages) == {"1"}


# -- parse_address / ZeoSpec ------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8100", ("127.0.0.1", 8100)),
    ("localhost:1", ("localhost", 1)),
    ("zeo.example.com:65535", ("zeo.example.com", 65535)),
    ("[::1]:8100", ("::1", 8100)),
    ("[fe80::1%eth0]:9000", ("fe80::1%eth0", 9000)),
    ("  db1:8100 ", ("db1", 8100)),
    ("/path/to/socket", "/path/to/socket"),
    ("./var/zeo.sock", "./var/zeo.sock"),
])
def test_parse_address_good(text, expected):
    assert parse_address(text) == expected
    if isinstance(expected, tuple):
        assert parse_address(format_address(expected)) == expected


def test_parse_address_expands_home():
    assert parse_address("~/zeo.sock") == os.path.expanduser("~/zeo.sock")


@pytest.mark.parametrize("text", [
    "", "   ", "localhost", "8100", ":8100", "host:", "host:port",
    "host:0", "host:65536", "host:-1", "::1:8100", "[::1]", "[::1]8100",
    "a:b:c", "host:81 00",
])
def test_parse_address_bad(text):
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert repr(text) in str(info.value)


def test_parse_address_ipv6_hint():
    with pytest.raises(ValueError, match="brackets"):
        parse_address("::1:8100")


def test_zeospec_validation():
    assert ZeoSpec(["h", 1]).address == ("h", 1)  # lists from JSON
    assert ZeoSpec(("h", 1), 2).storage == "2"
    assert str(ZeoSpec(("::1", 8100))) == "[::1]:8100 storage 1"
    for bad in [("h",), ("h", "1"), (1, 2), ("h", True), "", 8100]:
        with pytest.raises(ValueError):
            ZeoSpec(bad)


def test_is_bootstrap_extension():
    meta = TransactionMetaData(extension=BOOTSTRAP_EXTENSION)
    assert is_bootstrap_extension(meta.extension)
    assert is_bootstrap_extension(meta.extension_bytes)
    assert not is_bootstrap_extension({})
    assert not is_bootstrap_extension(b"")
    assert not is_bootstrap_extension(b"garbage")
    assert not is_bootstrap_extension({"tidstorage": {"bootstrap": False}})


# -- commit_noop ------------------------------------------------------------

def test_commit_noop_empty():
    assert commit_noop({}) == {}


def test_commit_noop_three_storages_two_servers(two_zeo_servers):
    a, b = two_zeo_servers
    specs = specs_for(a, b)
    before = commit_one(a.address, "2")

    t0 = time.monotonic()
    tids = commit_noop(specs, timeout=5)
    elapsed = time.monotonic() - t0
    assert set(tids) == {"x", "y", "z"}
    assert all(type(t) is int for t in tids.values())
    assert tids["y"] > before
    assert elapsed < 5
    for sid, spec in specs.items():
        assert last_transaction(spec) == tids[sid]

    again = commit_noop(specs, timeout=5)
    assert all(again[sid] > tids[sid] for sid in specs)

    a.stop()
    b.stop()
    files = {"x": a.data_fs("1"), "y": a.data_fs("2"), "z": b.data_fs("1")}
    for sid, path in files.items():
        records = transactions(path)
        assert len(records) == (3 if sid == "y" else 2)
        for (txn, data), tid in zip(records[-2:], (tids[sid], again[sid])):
            assert u64(txn.tid) == tid
            assert txn.status == " "
            assert data == []  # a real, empty transaction record
            stamp = txn.extension["tidstorage"]
            assert stamp["bootstrap"] is True
            # the daemon's mark, but not a multi-storage stamp: an empty
            # transaction cannot make a cut incoherent (see gate.py)
            assert "id" not in stamp and "storages" not in stamp
            assert is_bootstrap_extension(txn.extension_bytes)
            assert txn.description == b"tidstorage bootstrap"
        assert not is_bootstrap_extension(records[0][0].extension) or sid != "y"


def test_commit_noop_custom_description(zeo_factory):
    server = zeo_factory(["1"], start=True)
    tids = commit_noop({"only": ZeoSpec(server.address)}, description="hello")
    server.stop()
    (txn, _), = transactions(server.data_fs("1"))
    assert u64(txn.tid) == tids["only"]
    assert txn.description == b"hello"


def test_commit_noop_blob_storage(zeo_factory):
    server = zeo_factory(["1"], blob=True, start=True)
    tids = commit_noop({"1": ZeoSpec(server.address)}, timeout=5)
    assert last_transaction(ZeoSpec(server.address)) == tids["1"]


def test_commit_noop_waits_for_older_commits(two_zeo_servers):
    a, b = two_zeo_servers
    specs = specs_for(a, b)
    other = client(b.address, "1")
    try:
        txn = begin_and_vote(other)  # holds B/1's commit lock, not finished
        thread, result = run_in_thread(commit_noop, specs, timeout=5)
        thread.join(0.5)
        assert thread.is_alive(), result
        assert not result
        other_tid = u64(other.tpc_finish(txn))
    finally:
        other.close()
    thread.join(10)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    tids = result["value"]
    assert tids["z"] > other_tid
    # the other transaction is in the file before the bootstrap record
    b.stop()
    records = [u64(t.tid) for t, _ in transactions(b.data_fs("1"))]
    assert records == [other_tid, tids["z"]]


def test_commit_noop_server_down(two_zeo_servers):
    a, b = two_zeo_servers
    specs = specs_for(a, b)
    before = {sid: last_transaction(specs[sid]) for sid in ("x", "y")}
    b.kill()
    t0 = time.monotonic()
    with pytest.raises(ZeoUnavailable) as info:
        commit_noop(specs, timeout=2)
    elapsed = time.monotonic() - t0
    assert 1.5 < elapsed < 5
    assert info.value.storage_id == "z"
    assert "'z'" in str(info.value)
    assert format_address(b.address) in str(info.value)
    # nothing was committed on the reachable server
    assert {sid: last_transaction(specs[sid]) for sid in ("x", "y")} == before


def test_commit_noop_all_servers_down_costs_one_timeout(two_zeo_servers):
    a, b = two_zeo_servers
    specs = specs_for(a, b)
    a.kill()
    b.kill()
    t0 = time.monotonic()
    with pytest.raises(ZeoUnavailable) as info:
        commit_noop(specs, timeout=1)
    assert time.monotonic() - t0 < 3.5  # connects run concurrently
    for sid in specs:
        assert f"'{sid}'" in str(info.value)


def test_commit_noop_refuses_same_storage_twice(zeo_factory):
    server = zeo_factory(["1"], start=True)
    port = server.port
    specs = {"a": ZeoSpec(("127.0.0.1", port)), "b": ZeoSpec(["127.0.0.1", port])}
    with pytest.raises(ValueError, match="same ZEO storage"):
        commit_noop(specs, timeout=2)


def test_commit_noop_unknown_storage_name(zeo_factory):
    server = zeo_factory(["1"], start=True)
    with pytest.raises(ZeoUnavailable, match="'nine'"):
        commit_noop({"nine": ZeoSpec(server.address, "9")}, timeout=1)


def test_commit_noop_failure_mid_commit_aborts_the_rest(two_zeo_servers):
    """B dies after commit_noop voted there, while it waits for A/2's lock:
    the 2PC fails naming z and A/2 never gets a bootstrap record (aborted),
    and its commit lock is released."""
    a, b = two_zeo_servers
    specs = specs_for(a, b)
    other = client(a.address, "2")
    try:
        # "2:..." sorts after both "1:..." storages, so x and z are voted
        # (and their locks held) while commit_noop waits for y.
        txn = begin_and_vote(other)
        thread, result = run_in_thread(commit_noop, specs, timeout=3)
        thread.join(0.5)
        assert thread.is_alive(), result
        b.kill()
        time.sleep(0.2)
        other_tid = u64(other.tpc_finish(txn))
    finally:
        other.close()
    thread.join(15)
    assert not thread.is_alive()
    error = result.get("error")
    assert isinstance(error, ZeoUnavailable), result
    assert "'z'" in str(error)
    assert error.storage_id == "z"
    # y was aborted: its last transaction is the other client's one
    assert last_transaction(specs["y"]) == other_tid
    # and its lock is free again
    t0 = time.monotonic()
    tids = commit_noop({"y": specs["y"], "x": specs["x"]}, timeout=3)
    assert time.monotonic() - t0 < 3
    assert tids["y"] > other_tid


@pytest.fixture
def short_dir():
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be long.
    path = Path(tempfile.mkdtemp(prefix="tz", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_commit_noop_unix_socket(short_dir):
    with ZeoServer(short_dir / "s", ["1"], unix_socket=True) as server:
        address = parse_address(server.address)
        assert address == server.address
        tids = commit_noop({"u": ZeoSpec(address)}, timeout=5)
        assert last_transaction(ZeoSpec(address)) == tids["u"]
