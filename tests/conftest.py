"""Shared pytest fixtures: real ZEO servers (see ``servers.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from tidstorage.demo.cluster import PORT_SLICE_ENV, ZeoServer  # noqa: E402

# pytest-xdist workers (README: pytest -n 2) run side by side: each takes its
# own slice of the free ports, inherited by the processes it starts.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault(PORT_SLICE_ENV, "{}/{}".format(
        int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")),
        int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture
def zeo_factory(tmp_path):
    """Create (not start) ``ZeoServer`` objects under ``tmp_path``.

    ``zeo_factory(["1", "2"])`` or ``zeo_factory({"1": path}, name="b",
    blob=True, start=True)``.  All servers created are stopped at teardown,
    whether the test passed or not.
    """
    created: list[ZeoServer] = []
    counter = iter(range(1_000_000))

    def factory(storages=("1",), name: str | None = None, *, start=False,
                **kw) -> ZeoServer:
        if name is None:
            name = f"zeo{next(counter)}"
        if not isinstance(storages, dict):
            storages = list(storages)
        server = ZeoServer(tmp_path / name, storages, **kw)
        created.append(server)
        if start:
            server.start()
        return server

    yield factory

    errors = []
    for server in reversed(created):
        try:
            server.stop()
        except Exception as exc:  # pragma: no cover - best effort
            errors.append(exc)
            server.kill()
    if errors:  # pragma: no cover
        raise errors[0]


@pytest.fixture
def two_zeo_servers(zeo_factory):
    """Two running servers: A serves storages "1" and "2", B serves "1".

    Returns ``(a, b)``.
    """
    a = zeo_factory(["1", "2"], name="a", start=True)
    b = zeo_factory(["1"], name="b", start=True)
    return a, b


@pytest.fixture
def cluster(tmp_path, two_zeo_servers):
    """Three storages (a1, a2 on server a; b1 on server b) and a daemon
    configured with their zeo addresses (in_doubt_grace 1 s), bootstrapped."""
    import json
    import sys

    from tidstorage.demo.cluster import DaemonProcess

    from tidstorage.demo import workload
    a, b = two_zeo_servers
    zeo = {
        "a1": (a.address, "1", a.data_fs("1")),
        "a2": (a.address, "2", a.data_fs("2")),
        "b1": (b.address, "1", b.data_fs("1")),
    }
    storages = {
        name: {"zeo": f"127.0.0.1:{addr[1]}", "zeo_storage": st, "data_fs": str(path)}
        for name, (addr, st, path) in zeo.items()
    }
    storages["elsewhere"] = {}  # configured, but the daemon cannot read it
    d = DaemonProcess(tmp_path / "daemon", storages=storages,
                      server={"in_doubt_grace": 1.0}).start()
    d.wait_bootstrapped()

    class Cluster:
        servers = {"a": a, "b": b}
        daemon = d

        @staticmethod
        def zeo_spec():
            return {k: (v[0], v[1]) for k, v in zeo.items()}

        @staticmethod
        def data_fs(name):
            return zeo[name][2]

        @staticmethod
        def open(timeout=1.0, wrap=True):
            return workload.open_databases(
                {k: (v[0], v[1]) for k, v in zeo.items()}, d.address, timeout=timeout, wrap=wrap)

        @staticmethod
        def writer_cmd(writer, **kw):
            spec = {k: [v[0][0], v[0][1], v[1]] for k, v in zeo.items()}
            cmd = [sys.executable, "-m", "tidstorage.demo.workload", "--zeo", json.dumps(spec),
                   "--server", f"127.0.0.1:{d.port}", "--writer", str(writer)]
            for key, value in kw.items():
                cmd += [f"--{key.replace('_', '-')}", str(value)]
            return cmd

    yield Cluster
    d.kill()
