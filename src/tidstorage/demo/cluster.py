"""Local server processes: ``runzeo`` servers and the daemon.

Used by ``tidstorage demo``, the torture test and the test suite. Every
started process is remembered and killed at interpreter exit, so a crash of
the caller never leaks servers.

Usage::

    with ZeoServer(directory, ["1", "2"]) as server:
        storage = ClientStorage(server.address, storage="1")
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

from ..errors import TidstorageError

__all__ = ["ZeoServer", "ZeoServerError", "DaemonProcess", "free_port", "wait_for_port"]

POLL_INTERVAL = 0.02

_running: "weakref.WeakSet[ZeoServer]" = weakref.WeakSet()


class ZeoServerError(TidstorageError, RuntimeError):
    """The ZEO server process could not be started."""


#: ``K/N`` in the environment: :func:`free_ports` hands out only ports P with
#: (P >> 1) % N == K, so that N test workers running side by side
#: (pytest-xdist: ``tests/conftest.py`` sets it from the worker id) never
#: pick one port.  (Not P % N: Linux gives bind() odd ports.)
PORT_SLICE_ENV = "TIDSTORAGE_PORT_SLICE"
#: Most ports bound (and held) while looking for ports of the slice.
MAX_PORT_PROBES = 4096


def _port_slice() -> tuple[int, int]:
    text = os.environ.get(PORT_SLICE_ENV, "")
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        return 0, 1
    return (k % n, n) if n > 0 else (0, 1)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports on *host* that are currently free (of this
    process's slice, :data:`PORT_SLICE_ENV`)."""
    k, mod = _port_slice()
    socks, ports = [], []
    try:
        while len(ports) < n:
            if len(socks) >= MAX_PORT_PROBES:
                raise OSError(f"no free port of slice {k}/{mod} after {len(socks)} tries")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            if (port >> 1) % mod == k:
                ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on *host* that is currently free."""
    return free_ports(1, host)[0]


def _can_connect(address: tuple[str, int] | str) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


def wait_for_port(address: tuple[str, int] | str, timeout: float = 10.0,
                  free: bool = False) -> bool:
    """Poll until *address* accepts connections (or refuses them if *free*).

    Returns whether the wanted state was reached before *timeout*.
    """
    deadline = time.monotonic() + timeout
    while True:
        if _can_connect(address) != free:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


class ZeoServer:
    """One ``runzeo`` process serving one or more FileStorages.

    *storages* maps ZEO storage names to Data.fs paths, or is a list of names
    whose Data.fs default to ``directory/<name>/Data.fs``.  With *blob*, each
    storage gets a blob directory ``directory/<name>/blobs``.  With
    *unix_socket*, the server listens on ``directory/zeo.sock`` instead of
    TCP (*directory* must then be short: the AF_UNIX limit is 107 bytes).
    """

    def __init__(self, directory: Path, storages: dict[str, Path] | list[str],
                 port: int | None = None, blob: bool = False,
                 unix_socket: bool = False,
                 transaction_timeout: float | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if isinstance(storages, dict):
            self.storages = {str(k): Path(v) for k, v in storages.items()}
        else:
            self.storages = {str(name): self.directory / str(name) / "Data.fs"
                             for name in storages}
        if not self.storages:
            raise ValueError("a ZeoServer needs at least one storage")
        self.blob = blob
        self.transaction_timeout = transaction_timeout
        self.address: tuple[str, int] | str
        if unix_socket:
            path = str(self.directory / "zeo.sock")
            if len(path.encode()) > 107:
                raise ValueError(f"unix socket path too long: {path}")
            self.address = path
        else:
            self.address = ("127.0.0.1", port if port else free_port())
        self.config_path = self.directory / "zeo.conf"
        self.log_path = self.directory / "zeo.log"
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._write_config()

    # -- configuration -----------------------------------------------------

    @property
    def port(self) -> int | None:
        return None if isinstance(self.address, str) else self.address[1]

    def data_fs(self, name: str) -> Path:
        return self.storages[str(name)]

    def blob_dir(self, name: str) -> Path | None:
        if not self.blob:
            return None
        return self.storages[str(name)].parent / "blobs"

    def _write_config(self) -> None:
        if isinstance(self.address, str):
            address = self.address
        else:
            address = "%s:%d" % self.address
        lines = ["<zeo>", f"  address {address}"]
        if self.transaction_timeout is not None:
            lines.append(f"  transaction-timeout {self.transaction_timeout}")
        lines.append("</zeo>")
        for name, path in self.storages.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            lines.append(f"<filestorage {name}>")
            lines.append(f"  path {path}")
            if self.blob:
                blob_dir = self.blob_dir(name)
                blob_dir.mkdir(parents=True, exist_ok=True)
                lines.append(f"  blob-dir {blob_dir}")
            lines.append("</filestorage>")
        self.config_path.write_text("\n".join(lines) + "\n")

    # -- process control ---------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30) -> None:
        if self.running:
            raise ZeoServerError(f"ZEO server on {self.address} already running")
        self._close_log()
        if isinstance(self.address, str):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass
        elif not wait_for_port(self.address, timeout=min(timeout, 5), free=True):
            raise ZeoServerError(f"port {self.address} is already in use")
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"===== starting runzeo at {time.ctime()}\n".encode())
        self._log_file.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ZEO.runzeo", "-C", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, cwd=str(self.directory), env=env,
            start_new_session=True)
        _running.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                rc = self.process.returncode
                self._forget()
                raise ZeoServerError(
                    f"runzeo for {self.address} exited with {rc} during "
                    f"startup; log:\n{self.log()}")
            if _can_connect(self.address):
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise ZeoServerError(
                    f"runzeo for {self.address} did not accept connections "
                    f"within {timeout}s; log:\n{self.log()}")
            time.sleep(POLL_INTERVAL)

    def stop(self, timeout: float = 10) -> None:
        """Graceful shutdown: SIGTERM, wait, then SIGKILL."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._forget()
        self._wait_released()

    def kill(self) -> None:
        """Crash the server: SIGKILL, no cleanup by ZEO."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            try:
                process.kill()
            except ProcessLookupError:
                pass
        process.wait()
        self._forget()
        self._wait_released()

    def restart(self, timeout: float = 30) -> None:
        self.stop()
        self.start(timeout=timeout)

    def _wait_released(self) -> None:
        # The listening socket dies with the process; make sure the kernel
        # agrees before a test relies on the port being free.
        if not isinstance(self.address, str):
            wait_for_port(self.address, timeout=5, free=True)

    def _forget(self) -> None:
        _running.discard(self)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> "ZeoServer":
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (f"<ZeoServer {self.address} storages={list(self.storages)} "
                f"{state}>")


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        process = server.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


_daemons: "weakref.WeakSet[DaemonProcess]" = weakref.WeakSet()


@atexit.register
def _kill_daemons() -> None:
    for daemon in list(_daemons):
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


class DaemonProcess:
    """``tidstorage serve -c DIR/tidstorage.toml`` on a free port."""

    def __init__(self, directory: Path, *, storages: dict[str, dict] | None = None,
                 server: dict | None = None, backup: dict | None = None,
                 port: int | None = None, verbose: bool = True) -> None:
        self.verbose = verbose
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.status_file = self.directory / "tidstorage.tid"
        self.log_path = self.directory / "daemon.log"
        self.config_path = self.directory / "tidstorage.toml"
        self.proc: subprocess.Popen | None = None
        settings = {
            "address": "127.0.0.1",
            "port": self.port,
            "status_file": str(self.status_file),
            "burst_period": 0.2,
            "full_dump_period": 2,
        }
        settings.update(server or {})
        self.status_file = self.directory / str(settings["status_file"])  # relative to the config
        lines = ["[server]"]
        lines += [f"{k} = {_toml(v)}" for k, v in settings.items() if v is not None]
        for name, values in (storages or {}).items():
            lines.append(f"\n[storages.{_toml(name)}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        if backup:
            lines.append("\n[backup]")
            lines += [f"{k} = {_toml(v)}" for k, v in backup.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 20) -> "DaemonProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidstorage", "serve", "-c", str(self.config_path)]
            + (["-v"] if self.verbose else []),
            stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _daemons.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon died at start:\n{self.log()}")
            if wait_for_port(self.address, timeout=0.2):
                return self
        raise RuntimeError(f"daemon did not listen within {timeout}s:\n{self.log()}")

    def client(self, **kw):
        from ..daemon.client import Client

        return Client(self.address, **kw)

    def wait_bootstrapped(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while not c.bootstrapped():
                if time.monotonic() > deadline:
                    raise AssertionError(f"no bootstrap within {timeout}s:\n{self.log()}")
                time.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM; return the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self._log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
