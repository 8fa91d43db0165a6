"""The supported Zope lines (README "Supported versions"), each in a real
Zope instance over tidstorage.

For each line a cached venv (``tests/support/zope_matrix.py``: Zope[wsgi] at
that line, tidstorage editable from this working tree, the line's
``contrib/constraints/`` file and pins); then two ``runzeo`` storages, the
tidstorage daemon, a ``mkwsgiinstance`` instance whose ``zope.conf`` wraps
both databases (main at ``/``, ``other`` mounted at ``/other`` through
Products.ZODBMountPoint) in ``<tidstorage>`` over ``<zeoclient>``, a user made
by ``addzopeuser``, Zope on waitress (``runwsgi``), and commits through HTTP
with basic auth: the mount point's creation and a DTML Method adding a folder
in each database. Checked: every such transaction is stamped identically in
both ``Data.fs``, the daemon publishes a point at or past it on both
storages, ``tidstorage verify`` finds the files coherent and ``tidstorage
backup`` succeeds, all from the line's venv.

Skipped (with the reason) only when a venv cannot be built because PyPI is
out of reach, or with ``TIDSTORAGE_SKIP_ZOPE_MATRIX=1``; a pip failure with
PyPI reachable (a resolution conflict, a bad bound) fails the test.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from support import zope_matrix
from support.zope_matrix import LINES, Unavailable, ZopeSite, ensure_venv
from tidstorage.core.stamps import stamp_of
from tidstorage.formats import filestorage

pytestmark = pytest.mark.skipif(
    os.environ.get("TIDSTORAGE_SKIP_ZOPE_MATRIX") == "1",
    reason="TIDSTORAGE_SKIP_ZOPE_MATRIX=1")

DEADLINE = 120  # seconds: generous; every wait polls

WRITE_BOTH = ('<dtml-call "manage_addFolder(\'a\' + n)">'
              '<dtml-call "other.manage_addFolder(\'b\' + n)">written <dtml-var n>')


def stamped(path) -> dict[str, tuple[int, tuple[str, ...], bytes]]:
    """coherency id -> (tid, storages, description) of the stamped
    transactions in ``path``."""
    out = {}
    for header in filestorage.iter_forward(path):
        stamp = stamp_of(header.ext())
        if stamp is not None:
            out[stamp.id] = (header.tid, stamp.storages, header.description)
    return out


@pytest.fixture(scope="module", autouse=True)
def _kill_leftovers():
    yield
    zope_matrix.kill_all()


@pytest.mark.parametrize("line", list(LINES.values()), ids=list(LINES))
def test_zope_line(line, tmp_path, record_property):
    try:
        venv, build_seconds = ensure_venv(line)
    except Unavailable as exc:
        pytest.skip(f"cannot build the {line.name} venv: {exc}")
    record_property("venv_build_seconds", round(build_seconds, 1))
    versions = venv.versions()
    for dist, prefix in line.expect.items():
        assert versions.get(dist, "").startswith(prefix), (dist, versions.get(dist), line)

    site = ZopeSite(venv, tmp_path)
    try:
        site.start_zeo()
        site.start_daemon()
        site.make_instance()
        site.start_zope()

        # One transaction over both databases: the mount point (a
        # MountedObject in main, the mounted folder in other).
        status, body = site.request("/manage_addProduct/ZODBMountPoint/manage_addMounts",
                                    {"paths:list": "/other", "create_mount_points": "1"})
        assert status == 200, body[-2000:]
        status, body = site.request("/manage_addProduct/OFSP/addDTMLMethod",
                                    {"id": "write_both", "file": WRITE_BOTH})
        assert status == 200, body[-2000:]
        for n in ("1", "2"):
            status, body = site.request(f"/write_both?n={n}")
            assert status == 200 and f"written {n}" in body, body[-2000:]
        # The folder added in the mounted database is reached through the mount.
        status, body = site.request("/other/b2/absolute_url")
        assert status == 200 and body.strip().endswith("/other/b2"), body[-2000:]

        main = stamped(site.data_fs["main"])
        other = stamped(site.data_fs["other"])
        # Every multi-database transaction is stamped in both files, with
        # the same storages.
        assert main.keys() == other.keys(), (main, other)
        for stamp_id, (_, storages, _) in main.items():
            assert storages == ("main", "other"), (stamp_id, storages)
            assert other[stamp_id][1] == storages
        writes = {i: v for i, v in main.items() if b"write_both" in v[2]}
        mounts = {i: v for i, v in main.items() if b"manage_addMounts" in v[2]}
        assert len(writes) == 2 and len(mounts) == 1, main
        last = max(writes, key=lambda i: writes[i][0])
        want = {"main": main[last][0], "other": other[last][0]}

        # The daemon publishes a point that keeps the last of them on both.
        deadline = time.monotonic() + DEADLINE
        while True:
            published = site.dump()
            if all(published.get(k, -1) >= v for k, v in want.items()):
                break
            assert time.monotonic() < deadline, (published, want, site.logs())
            time.sleep(0.2)

        # The files are coherent and a backup of the live set works, with the
        # line's ZODB (its repozo) and the line's tidstorage.
        verify = site.tool("verify")
        assert verify.returncode == 0 and re.search("coherent", verify.stdout), (
            verify.stdout, verify.stderr)
        backup = site.tool("backup", "--full")
        assert backup.returncode == 0, (backup.stdout, backup.stderr)
        assert list((tmp_path / "backups" / "main").glob("*.fs")), backup.stdout
        assert list((tmp_path / "backups" / "other").glob("*.fs")), backup.stdout

        # A clean Zope shutdown closes its databases: the daemon hears QUIT,
        # nothing is left in doubt, and it keeps running.
        assert site.zope.stop() in (0, -15), site.zope.log()
        assert "in doubt" not in site.daemon_proc.log(), site.daemon_proc.log()
        assert site.daemon_proc.alive()
    except BaseException:
        print(site.logs())
        raise
    finally:
        site.stop()
