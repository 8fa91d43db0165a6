"""The daemon as a real subprocess, spoken to over real sockets."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from tidstorage.demo.cluster import DaemonProcess

from tidstorage.daemon.client import Client, ClientError
from tidstorage.formats.tidlog import check_log, read_log


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess(tmp_path / "daemon").start()
    d.wait_bootstrapped()
    yield d
    d.kill()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


class LegacyClient:
    """The legacy ExchangeProtocol, field by field, one send per field."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=5)
        self.buf = b""

    def send_field(self, text: str) -> None:
        self.sock.send(text.encode() + b"\n")

    def send_list(self, items) -> None:
        self.send_field(str(len(items)))
        for item in items:
            self.send_field(item)

    def send_dict(self, d) -> None:
        keys = list(d)
        self.send_list(keys)
        for k in keys:
            self.send_field(str(d[k]))

    def recv_field(self) -> str:
        while b"\n" not in self.buf:
            data = self.sock.recv(1)  # the legacy client read one byte at a time
            if not data:
                raise ConnectionError
            self.buf += data
        field, self.buf = self.buf.split(b"\n", 1)
        return field.decode()

    def begin(self, txn, storages):
        self.send_field("begin"); self.send_field(txn); self.send_list(storages)

    def commit(self, txn, tids):
        self.send_field("commit"); self.send_field(txn); self.send_dict(tids)

    def abort(self, txn):
        self.send_field("abort"); self.send_field(txn)

    def dump(self, prefix=""):
        self.send_field("dump")
        n = int(self.recv_field())
        keys = [self.recv_field() for _ in range(n)]
        values = [int(self.recv_field()) for _ in range(n)]
        return {k[len(prefix):]: v for k, v in zip(keys, values) if k.startswith(prefix)}

    def bootstraped(self):
        self.send_field("bootstraped")
        return int(self.recv_field())


def test_legacy_scenarios_over_the_wire(daemon):
    c = LegacyClient(daemon.address)
    assert c.bootstraped() == 1
    # Scenario 3 of the legacy suite, with a reconnect between BEGIN and COMMIT.
    c.begin("t1", ["x_s1", "x_s2"])
    c.begin("t2", ["x_s1", "x_s3"])
    c.commit("t2", {"x_s1": 2, "x_s3": 1})
    assert c.dump("x_") == {}
    c.sock.close()
    c = LegacyClient(daemon.address)
    c.commit("t1", {"x_s1": 1, "x_s2": 1})
    assert c.dump("x_") == {"s1": 2, "s2": 1, "s3": 1}
    # Disjoint groups publish independently.
    c.begin("t3", ["y_s1"])
    c.begin("t4", ["y_s2"])
    c.commit("t3", {"y_s1": 7})
    assert c.dump("y_") == {"s1": 7}
    c.abort("t4")
    assert c.dump("y_") == {"s1": 7}


def test_malformed_input_affects_only_its_connection(daemon):
    good = daemon.client()
    good.begin("t1", ["a", "b"], sync=True)
    before = good.dump()
    bad_inputs = [
        b"FROB\n",
        b"BEGIN\nt9\nnotanumber\n",
        b"COMMIT\nt1\n2\na\nb\n1\nxx\n",  # would end t1 if applied
        b"\x00\xff\xfe garbage \x80\n",
        b"BEGIN\n" + b"x" * 20000,
        b"COMMIT\nt1\n2\na\nb\n5\n",  # half a message, then disconnect
    ]
    for data in bad_inputs:
        s = socket.create_connection(daemon.address)
        s.sendall(data)
        if data.endswith(b"5\n"):
            s.close()
            continue
        s.settimeout(5)
        # The daemon closes a connection that sent garbage.
        assert s.recv(100) == b""
        s.close()
    good.sync()
    assert good.dump() == before
    # t1 is still in flight: the half COMMIT was not applied.
    good.commit("t1", {"a": 3, "b": 4})
    assert good.dump() == {"a": 3, "b": 4}
    deadline = time.monotonic() + 5
    while "in the middle of a command" not in daemon.log():  # logged at EOF
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    log = daemon.log()
    assert "unknown command" in log and "not an integer" in log


def test_refused_reports_are_logged_and_change_nothing(daemon):
    with daemon.client() as c:
        c.commit("never", {"a": 1})
        c.abort("never")
        c.begin("t1", ["a"])
        c.begin("t1", ["b"])  # already in flight
        c.commit("t1", {"b": 1})  # wrong storages
        assert c.dump() == {}
        c.commit("t1", {"a": 5})
        assert c.dump() == {"a": 5}
    log = daemon.log()
    assert "never began" in log
    assert "already in flight" in log
    assert "BEGIN named" in log


def test_thousands_of_connections_one_loop(daemon):
    n = 2000
    socks = []
    try:
        for i in range(n):
            s = socket.create_connection(daemon.address)
            socks.append(s)
        for i, s in enumerate(socks):
            s.sendall(b"BEGIN\nc%d\n1\ns%d\nCOMMIT\nc%d\n1\ns%d\n%d\n" % (i, i % 50, i, i % 50, i + 1))
        with daemon.client() as c:
            deadline = time.monotonic() + 20
            while True:
                tids = c.dump()
                if len(tids) == 50 and all(tids[f"s{k}"] == n - 50 + k + 1 for k in range(50)):
                    break
                assert time.monotonic() < deadline, tids
                time.sleep(0.05)
    finally:
        for s in socks:
            s.close()
    # no thread per connection: the daemon process has few threads
    pid = daemon.proc.pid
    with open(f"/proc/{pid}/status") as f:
        threads = int(next(line for line in f if line.startswith("Threads:")).split()[1])
    assert threads < 10


def test_tid_log_survives_kill_and_reload(tmp_path):
    d = DaemonProcess(tmp_path / "d").start()
    d.wait_bootstrapped()
    with d.client() as c:
        for i in range(1, 30):
            c.begin(f"t{i}", ["a", "b"])
            c.commit(f"t{i}", {"a": i, "b": 100 + i})
        c.sync()
    # > burst_period: the last values reach the log by themselves
    wait_for(lambda: read_log(d.status_file).final_tids() == {"a": 29, "b": 129})
    d.kill()  # SIGKILL: nothing flushed at exit
    contents = read_log(d.status_file)
    assert contents.final_tids() == {"a": 29, "b": 129}
    assert check_log(d.status_file).ok
    d.start()
    with d.client() as c:
        assert c.dump() == {"a": 29, "b": 129}  # reloaded
    d.stop()


def test_sigterm_flushes_and_exits_zero(tmp_path):
    d = DaemonProcess(tmp_path / "d", server={"burst_period": 3600, "full_dump_period": 3600}).start()
    d.wait_bootstrapped()
    with d.client() as c:
        c.begin("t1", ["a"])
        c.commit("t1", {"a": 42})
        c.sync()
    assert d.stop() == 0
    assert read_log(d.status_file).final_tids() == {"a": 42}


def test_sighup_starts_a_new_log_with_a_full_record(tmp_path):
    d = DaemonProcess(tmp_path / "d", server={"burst_period": 0.1, "full_dump_period": 3600}).start()
    d.wait_bootstrapped()
    with d.client() as c:
        c.begin("t1", ["a", "b"])
        c.commit("t1", {"a": 1, "b": 2})
        c.sync()
        wait_for(lambda: read_log(d.status_file).final_tids() == {"a": 1, "b": 2})
        rotated = d.status_file.with_suffix(".1")
        d.status_file.rename(rotated)
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not d.status_file.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c.begin("t2", ["a"])
        c.commit("t2", {"a": 3})
        c.sync()
        wait_for(lambda: read_log(d.status_file).final_tids() == {"a": 3, "b": 2})
    records = read_log(d.status_file).records
    assert records[0].kind == "full" and records[0].tids == {"a": 1, "b": 2}
    assert read_log(d.status_file).final_tids() == {"a": 3, "b": 2}
    assert read_log(rotated).final_tids() == {"a": 1, "b": 2}
    d.signal(signal.SIGUSR1)
    wait_for(lambda: "bootstrapped=True" in d.log())
    assert d.stop() == 0


def test_auth_token(tmp_path):
    token_file = tmp_path / "secret"
    token_file.write_text("s3cret-s3cret-s3cret\n")
    token_file.chmod(0o600)  # secret files: owner only (issue 9.19)
    d = DaemonProcess(tmp_path / "d", server={"auth_token_file": str(token_file)}).start()
    try:
        with Client(d.address, auth_token="s3cret-s3cret-s3cret") as c:
            c.begin("t1", ["a"])
            c.commit("t1", {"a": 9})
            assert c.dump() == {"a": 9}
        with pytest.raises(ClientError):
            Client(d.address, auth_token="wrong")
        # A legacy client (no AUTH) is disconnected before any command runs.
        s = socket.create_connection(d.address, timeout=5)
        s.sendall(b"BEGIN\nx\n1\na\nCOMMIT\nx\n1\na\n99\nDUMP\n")
        assert s.recv(100) == b""
        with Client(d.address, auth_token="s3cret-s3cret-s3cret") as c:
            assert c.dump() == {"a": 9}
        assert "authentication failed" in d.log()
    finally:
        d.kill()


def test_bootstrap_waits_for_zeo_and_then_publishes(tmp_path, zeo_factory):
    zeo = zeo_factory(["1", "2"], name="zeo")  # not started yet
    storages = {
        "one": {"zeo": f"127.0.0.1:{zeo.address[1]}", "zeo_storage": "1"},
        "two": {"zeo": f"127.0.0.1:{zeo.address[1]}", "zeo_storage": "2"},
    }
    d = DaemonProcess(tmp_path / "d", storages=storages).start()
    try:
        with d.client() as c:
            c.begin("t1", ["one"])
            c.commit("t1", {"one": 5})
            time.sleep(1.0)
            assert c.bootstrapped() is False
            assert c.dump() == {}  # nothing before bootstrap
            zeo.start()
            d.wait_bootstrapped()
            tids = c.dump()
            assert set(tids) == {"one", "two"}
            assert tids["one"] > 5
        assert "bootstrap started" in d.log()
        assert "bootstrap complete" in d.log()
        # the TID log is written at the next tick: wait for it before the kill
        deadline = time.monotonic() + 20
        while read_log(d.status_file).final_tids() != tids:
            assert time.monotonic() < deadline, (read_log(d.status_file).final_tids(), tids)
            time.sleep(0.05)
    finally:
        d.kill()
    # After a restart the reloaded state is served, but nothing new is
    # published before the new bootstrap.
    zeo.stop()
    d.start()
    try:
        with d.client() as c:
            assert c.dump() == tids
            assert c.bootstrapped() is False
            c.begin("t2", ["one"])
            c.commit("t2", {"one": tids["one"] + 1})
            c.sync()
            assert c.dump() == tids
    finally:
        d.kill()


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tidstorage", *args],
                          capture_output=True, text=True, timeout=60, **kw)


def test_dump_command(daemon):
    with daemon.client() as c:
        c.begin("t1", ["main", "other"])
        c.commit("t1", {"main": 0x03C5A5B2E5F0A000, "other": 7})
        c.sync()
    r = run_cli("dump", "--server", f"127.0.0.1:{daemon.port}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"main": 0x03C5A5B2E5F0A000, "other": 7}
    r = run_cli("dump", "-c", str(daemon.config_path))
    assert r.returncode == 0, r.stderr
    assert "03c5a5b2e5f0a000" in r.stdout and "main" in r.stdout
    r = run_cli("dump", "--server", "127.0.0.1:1")
    assert r.returncode == 1 and "cannot connect" in r.stderr


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("[server]\nprot = 1\n", "server.prot: unknown key"),
        ("[server]\nport = \"x\"\n", "server.port: must be an integer"),
        ("[storages.main]\nzeo = \"nonsense\"\n", "storages.main.zeo"),
        ("[storages.main]\ndata_fs = 3\n", "storages.main.data_fs"),
        ("[bakup]\n", "bakup: unknown section"),
        ("[server\n", "invalid TOML"),
    ],
)
def test_config_errors_exit_2_naming_the_key(tmp_path, toml, expected):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    r = run_cli("serve", "-c", str(cfg))
    assert r.returncode == 2
    assert expected in r.stderr and str(cfg) in r.stderr


def test_log_check_and_full_commands(tmp_path):
    legacy = tmp_path / "legacy.log"
    legacy.write_text(
        "1196179931.55 f {'a': 5L, \"b\": 7L}\n"
        "1196179932.00 d {'a': 6L}\n"
        "1196179933.00 d {'b': 3L}\n"  # decreasing: line 3
    )
    r = run_cli("log", "check", str(legacy), "--json")
    assert r.returncode == 1
    assert "legacy.log:3" in r.stderr
    good = tmp_path / "good.log"
    good.write_text(legacy.read_text().splitlines(True)[0] + "1196179932.00 d {'a': 6L}\n")
    r = run_cli("log", "check", str(good), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"a": 6, "b": 7}
    r = run_cli("log", "full", str(good), "-o", str(tmp_path / "full.log"))
    assert r.returncode == 0, r.stderr
    records = read_log(tmp_path / "full.log").records
    assert [rec.kind for rec in records] == ["full", "full"]
    assert records[-1].tids == {"a": 6, "b": 7}


def test_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    d = DaemonProcess(tmp_path / "d", server={"tls_cert": str(cert), "tls_key": str(key)}).start()
    try:
        import ssl

        ctx = ssl.create_default_context(cafile=str(cert))
        with Client(d.address, ssl_context=ctx) as c:
            c.begin("t1", ["a"])
            c.commit("t1", {"a": 3})
            assert c.dump() == {"a": 3}
        # a plain-text client gets nothing it can use
        s = socket.create_connection(d.address, timeout=5)
        s.sendall(b"DUMP\n")
        assert not s.recv(100).startswith(b"1\n")
        s.close()
        r = run_cli("dump", "-c", str(d.config_path), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"a": 3}
    finally:
        d.kill()


def test_bulk_reports_then_disconnect_are_all_applied_in_order(daemon):
    """A flood (queued and applied in slices) followed at once by a close:
    nothing is lost, order is kept, and DUMP on another connection is served
    meanwhile."""
    from tidstorage.core import protocol as p
    n = 20000
    data = b"".join(
        p.encode_begin(f"b{i}", ["x", "y"]) + p.encode_commit(f"b{i}", {"x": i + 1, "y": 2 * i + 2})
        for i in range(n)
    )
    s = socket.create_connection(daemon.address)
    with daemon.client() as c:
        s.sendall(data)
        s.close()
        seen = c.dump()  # served while the flood is being applied
        deadline = time.monotonic() + 20
        while c.dump() != {"x": n, "y": 2 * n}:
            assert time.monotonic() < deadline, c.dump()
            time.sleep(0.02)
    assert seen.get("x", 0) <= n
    assert "refused" not in daemon.log() and "Decreasing" not in daemon.log()


def test_a_flood_of_refusals_is_logged_once_with_a_count(daemon):
    with daemon.client() as c:
        for i in range(500):
            c.commit(f"ghost{i}", {"a": i})
        c.sync()
    lines = [x for x in daemon.log().splitlines() if "refused" in x and "ghost" in x]
    assert 1 <= len(lines) <= 2, lines


def test_rate_limited_log_counts_what_it_holds_back(caplog):
    import logging

    from tidstorage.daemon.server import LOG_INTERVAL, RateLimitedLog

    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="t"):
        for i in range(5):
            limited.log(logging.ERROR, "k", "bad %d", i)
        limited.log(logging.ERROR, "other", "else")
        now[0] += LOG_INTERVAL + 1
        limited.log(logging.ERROR, "k", "bad %d", 99)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad 0", "else", f"bad 99 (4 similar lines held back in the last {LOG_INTERVAL:g} s)"]


def test_sync_answers_0_after_a_refused_begin(daemon):
    """A client must not believe a refused BEGIN is registered."""
    c = LegacyClient(daemon.address)
    c.begin("dup", ["x"])
    c.send_field("sync")
    assert c.recv_field() == "1"
    c.begin("dup", ["x"])  # refused: already in flight
    c.send_field("sync")
    assert c.recv_field() == "0"
    c.commit("dup", {"x": 3})  # a refused COMMIT or ABORT does not fail a SYNC
    c.commit("never-began", {"x": 4})
    c.send_field("sync")
    assert c.recv_field() == "1"


def test_hello_answers_the_daemons_id_and_binds_the_session(daemon):
    from tidstorage.core import protocol as p
    def hello(secret):
        sock = socket.create_connection(daemon.address, timeout=5)
        sock.sendall(p.encode_hello("s-test", secret, 123, "host") + p.SYNC_REQUEST)
        reader = p.ReplyReader()
        while True:
            reader.feed(sock.recv(4096))
            daemon_id = reader.read_field()
            sync = reader.read_int() if daemon_id is not None else None
            if sync is not None:
                return sock, daemon_id, sync

    first, ident, sync = hello("secret-1")
    assert ident and ident != "-" and sync == 1
    again, ident2, sync = hello("secret-1")
    assert ident2 == ident and sync == 1
    other, refused, sync = hello("not-the-secret")  # another process cannot take it
    assert refused == "-" and sync == 0
    for sock in (first, again, other):
        sock.close()


def test_a_sigterm_as_soon_as_the_port_opens_still_flushes_and_exits_0(tmp_path):
    """The signal handlers are installed before the port opens (a SIGTERM
    that arrived in between killed the daemon without its final flush)."""
    for i in range(15):
        d = DaemonProcess(tmp_path / f"d{i}").start()  # returns once the port accepts
        assert d.stop() == 0, d.log()[-2000:]
