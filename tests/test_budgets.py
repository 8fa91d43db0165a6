"""What peers can make the daemon hold, whatever they send (issue 9.12-9.14).

Real sockets; the daemon runs in a subprocess (to watch its memory and file
descriptors), or in this process on its own event loop thread when a limit
is lowered for the test.
"""

from __future__ import annotations

import asyncio

import resource
import socket
import threading
import time
from pathlib import Path

from tidstorage.demo.cluster import DaemonProcess

from tidstorage.daemon import connection as connection_mod
from tidstorage.core import coordinator as co
from tidstorage.core import protocol as p
from tidstorage.daemon import server as server_mod
from tidstorage.daemon.client import Client
from tidstorage.config import parse_config


class LocalDaemon:
    """A ``server.Daemon`` on an event loop in a thread of this process."""

    def __init__(self, tmp_path: Path, **server) -> None:
        config = parse_config({"server": {"port": 0, **server}}, tmp_path / "c.toml")
        self.daemon = server_mod.Daemon(config)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.daemon.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(20)
        self.address = ("127.0.0.1", self.daemon.port)

    def call(self, func, *args):
        result = {}
        done = threading.Event()

        def run():
            result["value"] = func(*args)
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(20)
        return result["value"]

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.daemon.stop(), self.loop)
        fut.result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(20)


def closed_within(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("a-long-enough-secret-token\n")
    path.chmod(0o600)
    return path


def test_unauthenticated_connections_are_bounded_in_bytes_time_and_number(tmp_path, monkeypatch):
    monkeypatch.setattr(server_mod, "UNAUTHENTICATED_IDLE", 0.5)
    monkeypatch.setattr(server_mod, "MAX_UNAUTHENTICATED", 5)
    d = LocalDaemon(tmp_path, auth_token_file=str(token_file(tmp_path)))
    try:
        # bytes: a stranger cannot make the daemon buffer a command
        s = socket.create_connection(d.address)
        s.sendall(b"BEGIN\nt\n4096\n" + b"x" * (connection_mod.MAX_PREAUTH_BYTES + 10))
        assert closed_within(s, 10)
        # time: silent strangers are closed
        s = socket.create_connection(d.address)
        assert closed_within(s, 10)
        # number: beyond the cap, new strangers are closed at once
        held = [socket.create_connection(d.address) for _ in range(5)]
        extra = socket.create_connection(d.address)
        assert closed_within(extra, 10)
        for sock in held:
            sock.close()
        # and an authenticated client still works
        with Client(d.address, auth_token="a-long-enough-secret-token") as c:
            assert c.dump() == {}
    finally:
        d.stop()


def test_a_failed_auth_is_slow_and_logged_once_per_interval(tmp_path, caplog):
    d = LocalDaemon(tmp_path, auth_token_file=str(token_file(tmp_path)))
    try:
        started = time.monotonic()
        sockets = []
        for _ in range(20):
            s = socket.create_connection(d.address)
            s.sendall(p.encode_auth("wrong-wrong-wrong-wrong"))
            sockets.append(s)
        for s in sockets:
            assert closed_within(s, 20)
        # closed no sooner than the delay (a lower bound holds on any machine)
        assert time.monotonic() - started >= server_mod.AUTH_FAILURE_DELAY * 0.9
        lines = [r for r in caplog.records if "authentication failed" in r.getMessage()]
        assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    finally:
        d.stop()


def test_the_number_of_connections_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 8)
    d = LocalDaemon(tmp_path)
    try:
        held = [Client(d.address) for _ in range(8)]
        for c in held:
            c.sync()
        extra = socket.create_connection(d.address)
        assert closed_within(extra, 10)
        held.pop().close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client(d.address) as c:
                    assert c.dump() == {}
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for c in held:
            c.close()
    finally:
        d.stop()


def test_an_error_while_applying_bulk_commands_costs_only_that_connection(tmp_path, monkeypatch):
    d = LocalDaemon(tmp_path)
    try:
        real_apply = d.daemon.apply
        victims = set()

        def apply(conn, events):
            if conn.peer.name in victims:
                raise RuntimeError("injected fault")
            return real_apply(conn, events)

        monkeypatch.setattr(d.daemon, "apply", apply)
        bad = socket.create_connection(d.address)
        bad.sendall(p.SYNC_REQUEST)
        bad.recv(10)
        victims.add("127.0.0.1:%d" % bad.getsockname()[1])
        bulk = b"".join(p.encode_begin(f"t{i}", ["x"]) + p.encode_commit(f"t{i}", {"x": i})
                        for i in range(1, 3000))
        bad.sendall(bulk)  # a bulk read: applied by the bulk queue, which fails
        assert closed_within(bad, 20)
        with Client(d.address) as good:
            good.send_raw(bulk)  # the bulk queue still works for others
            good.sync()
            assert good.dump() == {"x": 2999}
    finally:
        d.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_dump_flood_does_not_grow_the_daemon_nor_delay_others(tmp_path):
    d = DaemonProcess(tmp_path / "daemon", server={"burst_period": 60}).start()
    try:
        many = {f"storage-{i:05d}": 1_000 + i for i in range(getattr(p, "MAX_STORAGES", 4096) - 1)}
        with d.client() as c:
            c.begin("t", list(many))
            c.commit("t", many)
            c.sync()
            assert len(c.dump()) == len(many)
        before = rss_kib(d.proc.pid)
        flood = socket.create_connection(d.address)
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood.sendall(p.DUMP_REQUEST * 6000)  # never read: ~700 MB of replies
        time.sleep(0.5)
        with d.client(timeout=20) as other:
            started = time.monotonic()
            assert len(other.dump()) == len(many)
            waited = time.monotonic() - started
        grown = rss_kib(d.proc.pid) - before
        assert grown < 64 * 1024, f"the daemon grew by {grown} KiB"
        assert waited < 10, waited  # generous: it is answered, not queued behind the flood
        flood.close()
    finally:
        d.kill()


def test_running_out_of_file_descriptors_neither_floods_the_log_nor_stops_the_daemon(tmp_path):
    d = DaemonProcess(tmp_path / "daemon").start()
    try:
        with d.client() as c:
            c.sync()
        soft, hard = 64, 64
        resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
        size_before = d.log_path.stat().st_size
        held = []
        for _ in range(200):
            try:
                held.append(socket.create_connection(d.address, timeout=2))
            except OSError:
                break
        time.sleep(2)
        for s in held:
            s.close()
        grown = d.log_path.stat().st_size - size_before
        assert grown < 64 * 1024, f"{grown} bytes of log"
        deadline = time.monotonic() + 30
        while True:
            try:
                with d.client(timeout=5) as c:
                    assert c.dump() == {}
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        d.kill()


def test_sessions_and_transactions_are_budgeted(monkeypatch):
    monkeypatch.setattr(co, "MAX_PEERS_PER_SESSION", 2)
    monkeypatch.setattr(co, "MAX_TXNS_PER_SESSION", 3)
    c = co.Coordinator({}, {}, clock=lambda: 0.0, daemon_id="d")
    c.start()
    peers = [co.Peer(f"p{i}") for i in range(3)]
    replies = [c.apply(peer, [(p.HELLO, "s1", "secret", 1, "h"), (p.SYNC,)]) for peer in peers]
    assert replies[:2] == [b"d\n1\n"] * 2 and replies[2] == b"-\n0\n"
    events = [(p.BEGIN, f"ts:s1-{i}", ["x", "y"], None) for i in range(5)] + [(p.SYNC,)]
    assert c.apply(peers[0], events) == b"0\n"
    assert len(c.in_flight()) == 3



