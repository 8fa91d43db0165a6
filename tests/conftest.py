"""Shared pytest fixtures: real ZEO servers (see ``servers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from servers import ZeoServer  # noqa: E402


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
