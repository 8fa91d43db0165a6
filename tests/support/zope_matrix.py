"""Real Zope instances over tidstorage, one per supported version line.

Used by ``tests/test_zope_matrix.py``. For each line of the matrix
(:data:`LINES`) a virtualenv is built once with ``Zope[wsgi]`` at that line
and tidstorage installed from the working tree (editable) under the line's
constraints file (``contrib/constraints/``) and pins, and cached outside the
repository: ``$XDG_CACHE_HOME/tidstorage-test/<line>-<hash>`` (default
``~/.cache``), the hash covering the constraints, the pins, ``pyproject.toml``
and the working tree's path. A venv whose build did not complete (no
``.complete`` marker) is rebuilt; builds are serialised by a lock file.

Everything of a line runs from its venv: the ``runzeo`` servers, the
tidstorage daemon, ``addzopeuser``, ``runwsgi`` (Zope on waitress) and the
backup/verify tools, so the line's ZODB/ZEO/transaction versions are the ones
exercised on both sides of every socket.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path

from tidstorage.demo.cluster import DaemonProcess, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "contrib" / "constraints"


@dataclass(frozen=True)
class Line:
    name: str
    constraints: str       #: file in contrib/constraints/
    extra: str             #: tidstorage extra pulling Zope in
    pins: tuple[str, ...]  #: what this row pins beyond the constraints
    expect: dict           #: distribution -> version prefix the venv must hold


LINES = {
    # Zope 5 (Plone 6.0/6.1) with the lowest versions tidstorage claims.
    "zope5-zodb58": Line("zope5-zodb58", "zope5.txt", "zope5",
                         ("ZODB==5.8.1", "ZEO==6.0.0", "transaction==5.0"),
                         {"Zope": "5.", "ZODB": "5.8.", "ZEO": "6.0.", "transaction": "5.0"}),
    # Zope 5 with the newest ZODB its ZConfig schema accepts below 6.3.
    "zope5-zodb60": Line("zope5-zodb60", "zope5.txt", "zope5", ("ZODB==6.0.1",),
                         {"Zope": "5.", "ZODB": "6.0."}),
    # Zope 6 with the newest ZODB (6.4 adds class-factory to <zodb>).
    "zope6-zodb64": Line("zope6-zodb64", "zope6.txt", "zope6", ("ZODB==6.4",),
                         {"Zope": "6.", "ZODB": "6.4"}),
}

#: Installed in every line: the mounted database of the test site.
COMMON_PINS = ("Products.ZODBMountPoint",)

PIP_TIMEOUT = 900


class Unavailable(Exception):
    """The venv cannot be built here for a reason outside tidstorage
    (no route to PyPI): the caller skips."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "tidstorage-test"


def line_key(line: Line) -> str:
    h = hashlib.sha256()
    h.update((CONSTRAINTS / line.constraints).read_bytes())
    h.update((REPO / "pyproject.toml").read_bytes())
    h.update(repr((COMMON_PINS, line.pins, line.extra, str(REPO), sys.version_info[:2])).encode())
    return h.hexdigest()[:12]


def pypi_reachable(timeout: float = 15) -> str | None:
    """None if PyPI answers, else why not."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/zope/", timeout=timeout) as r:
            r.read(1)
        return None
    except (OSError, urllib.error.URLError) as exc:
        return f"PyPI unreachable ({exc})"


class Venv:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.bin = path / "bin"
        self.python = self.bin / "python"

    def versions(self) -> dict[str, str]:
        out = subprocess.run(
            [str(self.python), "-c",
             "import json, importlib.metadata as m;"
             "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"],
            capture_output=True, text=True, check=True)
        return json.loads(out.stdout)


def ensure_venv(line: Line) -> tuple[Venv, float]:
    """The cached venv of ``line`` (built if needed) and the build time
    (0.0 when it was already there)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{line.name}-{line_key(line)}"
    venv = Venv(path)
    marker = path / ".complete"
    if marker.exists():
        return venv, 0.0
    with open(root / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return venv, 0.0
        why = pypi_reachable()
        if why is not None:
            raise Unavailable(why)
        started = time.monotonic()
        if path.exists():
            shutil.rmtree(path)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        cmd = [str(venv.python), "-m", "pip", "install", "-q",
               "-c", str(CONSTRAINTS / line.constraints),
               "-e", f"{REPO}[{line.extra}]", *COMMON_PINS, *line.pins]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
        if proc.returncode != 0:
            err = "\n".join(x for x in proc.stderr.splitlines()
                            if not x.startswith("WARNING: Location"))
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
        marker.write_text(json.dumps(venv.versions(), indent=1, sort_keys=True))
        return venv, time.monotonic() - started


# -- processes run from a line's venv ----------------------------------------

_procs: "weakref.WeakSet[Proc]" = weakref.WeakSet()


class Proc:
    """One process of the instance, its output in ``log_path``."""

    def __init__(self, cmd: list[str], log_path: Path, cwd: Path, env: dict | None = None):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, cwd=str(cwd),
                                      env=env, start_new_session=True)
        _procs.add(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        _procs.discard(self)
        return self.popen.returncode

    def wait_port(self, port: int, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{what} exited with {self.popen.returncode}:\n{self.log()}")
            if wait_for_port(("127.0.0.1", port), timeout=0.5):
                return
        raise AssertionError(f"{what} did not listen on {port} within {timeout}s:\n{self.log()}")


def kill_all() -> None:
    for proc in list(_procs):
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait()


ZOPE_INI = """\
[app:zope]
use = egg:Zope#main
zope_conf = %(here)s/zope.conf

[server:main]
use = egg:waitress#main
listen = 127.0.0.1:{port}
threads = 2

[pipeline:main]
pipeline =
    egg:Zope#httpexceptions
    zope

[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = INFO
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(asctime)s %(levelname)s [%(name)s] %(message)s
"""


def zope_conf(home: Path, daemon_port: int, zeo_port: int) -> str:
    """Two databases, each a <tidstorage> over a <zeoclient>: main at /
    and ``other`` mounted at /other (Products.ZODBMountPoint)."""
    dbs = []
    for name, storage, mount in (("main", "1", "/"), ("other", "2", "/other")):
        dbs.append(f"""\
<zodb_db {name}>
  <tidstorage>
    name {name}
    server 127.0.0.1:{daemon_port}
    timeout 5
    <zeoclient>
      server 127.0.0.1:{zeo_port}
      storage {storage}
      name {name}
      var $INSTANCE/var
    </zeoclient>
  </tidstorage>
  mount-point {mount}
</zodb_db>
""")
    return (f"%define INSTANCE {home}\ninstancehome $INSTANCE\n%import tidstorage\n\n"
            + "\n".join(dbs)
            + "\n<environment>\n  CHAMELEON_CACHE $INSTANCE/var/cache\n</environment>\n")


class ZopeSite:
    """ZEO (two storages), the daemon, a Zope instance on waitress; all
    from ``venv``, under ``directory``."""

    USER = ("admin", "tidstorage-matrix")

    def __init__(self, venv: Venv, directory: Path) -> None:
        self.venv = venv
        self.dir = directory
        self.procs: list[Proc] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.pop("PYTHONPATH", None)

    # -- ZEO -------------------------------------------------------------------

    def start_zeo(self) -> None:
        zeo = self.dir / "zeo"
        zeo.mkdir(parents=True)
        self.zeo_port = free_port()
        self.data_fs = {"main": zeo / "main" / "Data.fs", "other": zeo / "other" / "Data.fs"}
        lines = ["<zeo>", f"  address 127.0.0.1:{self.zeo_port}", "</zeo>"]
        for number, (name, path) in enumerate(self.data_fs.items(), 1):
            path.parent.mkdir()
            lines += [f"<filestorage {number}>", f"  path {path}", "</filestorage>"]
        (zeo / "zeo.conf").write_text("\n".join(lines) + "\n")
        proc = Proc([str(self.venv.bin / "runzeo"), "-C", str(zeo / "zeo.conf")],
                    zeo / "zeo.log", zeo, self.env)
        self.procs.append(proc)
        proc.wait_port(self.zeo_port, "runzeo")
        self.zeo = proc

    # -- daemon ----------------------------------------------------------------

    def start_daemon(self) -> None:
        backups = self.dir / "backups"
        storages = {
            name: {"zeo": f"127.0.0.1:{self.zeo_port}", "zeo_storage": str(number),
                   "data_fs": str(path), "backup_dir": str(backups / name)}
            for number, (name, path) in enumerate(self.data_fs.items(), 1)
        }
        # DaemonProcess writes the TOML config; the process itself runs
        # from the line's venv.
        self.daemon = DaemonProcess(
            self.dir / "daemon", storages=storages,
            backup={"timestamp_file": str(backups / "timestamps.log"),
                    "status_file_backup_dir": str(backups / "tidlog")})
        proc = Proc([str(self.venv.bin / "tidstorage"), "serve", "-c",
                     str(self.daemon.config_path), "-v"],
                    self.dir / "daemon" / "daemon.log", self.dir / "daemon", self.env)
        self.procs.append(proc)
        proc.wait_port(self.daemon.port, "tidstorage serve")
        self.daemon_proc = proc
        deadline = time.monotonic() + 120
        with self.daemon.client() as client:
            while not client.bootstrapped():
                assert proc.alive(), proc.log()
                assert time.monotonic() < deadline, f"no bootstrap:\n{proc.log()}"
                time.sleep(0.1)

    def dump(self) -> dict[str, int]:
        with self.daemon.client() as client:
            return client.dump()

    # -- Zope ------------------------------------------------------------------

    def make_instance(self) -> None:
        self.home = self.dir / "instance"
        subprocess.run([str(self.venv.bin / "mkwsgiinstance"), "-d", str(self.home),
                        "-u", "bootstrap:unused-password"],
                       check=True, capture_output=True, env=self.env, timeout=120)
        (self.home / "inituser").unlink()  # the user comes from addzopeuser below
        self.http_port = free_port()
        self.conf = self.home / "etc" / "zope.conf"
        self.conf.write_text(zope_conf(self.home, self.daemon.port, self.zeo_port))
        (self.home / "etc" / "zope.ini").write_text(ZOPE_INI.format(port=self.http_port))
        out = subprocess.run([str(self.venv.bin / "addzopeuser"), "-c", str(self.conf),
                              *self.USER], capture_output=True, text=True, env=self.env,
                             timeout=300, cwd=str(self.home))
        assert out.returncode == 0, f"addzopeuser failed:\n{out.stdout}\n{out.stderr}"

    def start_zope(self) -> None:
        proc = Proc([str(self.venv.bin / "runwsgi"), str(self.home / "etc" / "zope.ini")],
                    self.home / "var" / "runwsgi.log", self.home, self.env)
        self.procs.append(proc)
        proc.wait_port(self.http_port, "runwsgi")
        self.zope = proc

    def request(self, path: str, data: dict | None = None, timeout: float = 60) -> tuple[int, str]:
        """GET (or POST ``data``) ``path`` as the admin user: (status, body)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        body = None if data is None else urllib.parse.urlencode(data, doseq=True).encode()
        req = urllib.request.Request(url, data=body)
        token = base64.b64encode(":".join(self.USER).encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def tool(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv.bin / "tidstorage"), *args, "-c",
                               str(self.daemon.config_path)],
                              capture_output=True, text=True, env=self.env, timeout=300)

    def logs(self) -> str:
        return "\n".join(f"===== {p.log_path}\n{p.log()[-6000:]}" for p in self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
