"""A real ``tidstorage serve`` subprocess for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from servers import free_port, wait_for_port

from tidstorage.client import Client


class DaemonProcess:
    """``tidstorage serve -c DIR/tidstorage.toml`` on a free port."""

    def __init__(self, directory: Path, *, storages: dict[str, dict] | None = None,
                 server: dict | None = None, port: int | None = None) -> None:
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
        lines = ["[server]"]
        lines += [f"{k} = {_toml(v)}" for k, v in settings.items() if v is not None]
        for name, values in (storages or {}).items():
            lines.append(f"[storages.{_toml(name)}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 20) -> "DaemonProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidstorage", "serve", "-c", str(self.config_path), "-v"],
            stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon died at start:\n{self.log()}")
            if wait_for_port(self.address, timeout=0.2):
                return self
        raise RuntimeError(f"daemon did not listen within {timeout}s:\n{self.log()}")

    def client(self, **kw) -> Client:
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
