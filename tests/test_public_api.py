"""The public API: the package's names, the ZConfig section, the command.

What README's "Python API" section promises, checked: ``tidstorage.wrap``,
``TIDStorage``, ``TidstorageError``, ``__version__`` and ``__all__``; the
``<tidstorage>`` ZConfig section (``%import tidstorage``) opened with
``ZODB.config.databaseFromString``; ``tidstorage --help`` and ``python -m
tidstorage --help``. The daemon is down throughout (nothing listens on its
port): the wrapper must commit without it.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import ZConfig
import ZODB
import ZODB.config
import ZODB.FileStorage

import tidstorage
from tidstorage.demo.cluster import free_port

PORT = free_port()  # nothing listens there: the daemon is down
#: Commands README documents; the help must list them (and every command
#: the group has).
DOCUMENTED_COMMANDS = {"serve", "dump", "admin", "log", "backup", "restore", "repair",
                       "verify", "cleanup", "adopt", "demo"}
SCRIPT = Path(sys.executable).with_name("tidstorage")


# -- names ------------------------------------------------------------------

def test_all_lists_exactly_the_public_names():
    assert sorted(tidstorage.__all__) == ["TIDStorage", "TidstorageError", "__version__", "wrap"]
    for name in tidstorage.__all__:
        assert getattr(tidstorage, name) is not None
        assert name in dir(tidstorage)


def test_star_import_gives_the_public_names():
    namespace: dict = {}
    exec("from tidstorage import *", namespace)  # noqa: S102 (the statement under test)
    assert {"wrap", "TIDStorage", "TidstorageError", "__version__"} <= set(namespace)
    assert namespace["wrap"] is tidstorage.wrap


def test_names_are_the_implementations():
    from tidstorage import errors
    from tidstorage.zodb import storage

    assert tidstorage.wrap is storage.wrap
    assert tidstorage.TIDStorage is storage.TIDStorage
    assert tidstorage.TidstorageError is errors.TidstorageError
    assert issubclass(tidstorage.TidstorageError, Exception)
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type):
            assert issubclass(value, tidstorage.TidstorageError), name


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        tidstorage.no_such_name  # noqa: B018


def test_version_is_the_package_metadata():
    assert tidstorage.__version__ == importlib.metadata.version("tidstorage")
    assert tidstorage.__version__ != "0+unknown"


def test_import_is_cheap():
    """``import tidstorage`` (the CLI, ZConfig's %import) loads no ZODB."""
    code = "import sys, tidstorage; print(sorted(m for m in ('ZODB', 'ZEO') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# -- wrap -------------------------------------------------------------------

def test_wrap_commits_with_the_daemon_down(tmp_path):
    path = str(tmp_path / "Data.fs")
    storage = tidstorage.wrap(ZODB.FileStorage.FileStorage(path), "main",
                              server=f"127.0.0.1:{PORT}", timeout=0.05)
    assert isinstance(storage, tidstorage.TIDStorage)
    assert storage.storage_id == "main"
    assert storage.reporter.address == ("127.0.0.1", PORT)
    db = ZODB.DB(storage)
    try:
        with db.transaction() as conn:
            conn.root()["answer"] = 42
    finally:
        db.close()
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path, read_only=True))
    try:
        with db.transaction() as conn:
            assert conn.root()["answer"] == 42
    finally:
        db.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"server": "no-port"}, "invalid daemon address"),
    ({"server": "::1:9001"}, "brackets"),
    ({"server": "127.0.0.1:0"}, "out of range"),
    ({"timeout": 0}, "invalid timeout"),
    ({"timeout": -1.0}, "invalid timeout"),
])
def test_wrap_refuses_bad_arguments(kwargs, match):
    base = ZODB.DB(None).storage  # a MappingStorage
    with pytest.raises(ValueError, match=match):
        tidstorage.wrap(base, "main", **kwargs)


def test_wrap_needs_a_name_for_a_storage_that_is_not_zeo():
    base = ZODB.DB(None).storage
    with pytest.raises(ValueError, match="name is required"):
        tidstorage.wrap(base, server=f"127.0.0.1:{PORT}")


def test_wrap_refuses_an_mvcc_storage():
    import zope.interface
    from ZODB.interfaces import IMVCCStorage

    base = ZODB.DB(None).storage
    zope.interface.alsoProvides(base, IMVCCStorage)
    with pytest.raises(TypeError, match="IMVCCStorage"):
        tidstorage.wrap(base, "main", server=f"127.0.0.1:{PORT}")


# -- ZConfig ----------------------------------------------------------------

def _zodb_section(name: str, path: Path, extra: str = "") -> str:
    return f"""
<zodb {name}>
  <tidstorage>
    name {name}
    server 127.0.0.1:{PORT}
    timeout 0.05
    {extra}
    <filestorage>
      path {path}
    </filestorage>
  </tidstorage>
</zodb>
"""


def _transactions(path: Path) -> list:
    storage = ZODB.FileStorage.FileStorage(str(path), read_only=True)
    try:
        return [(txn.tid, txn.extension) for txn in storage.iterator()]
    finally:
        storage.close()


def test_zconfig_section_wraps_and_commits(tmp_path):
    path = tmp_path / "main.fs"
    db = ZODB.config.databaseFromString("%import tidstorage\n" + _zodb_section("main", path))
    try:
        storage = db.storage
        assert isinstance(storage, tidstorage.TIDStorage)
        assert isinstance(storage.base, ZODB.FileStorage.FileStorage)
        assert storage.storage_id == "main"
        assert storage.reporter.address == ("127.0.0.1", PORT)
        with db.transaction() as conn:
            conn.root()["answer"] = 42
    finally:
        db.close()
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=True))
    try:
        with db.transaction() as conn:
            assert conn.root()["answer"] == 42
    finally:
        db.close()


def test_zconfig_multi_database_commit_is_stamped_in_both_files(tmp_path):
    """Two ``<tidstorage>`` sections, one transaction over both: the same
    stamp in both records, naming both storages."""
    paths = {"a": tmp_path / "a.fs", "b": tmp_path / "b.fs"}
    db = ZODB.config.databaseFromString(
        "%import tidstorage\n" + "".join(_zodb_section(n, p) for n, p in paths.items()))
    try:
        assert set(db.databases) == {"a", "b"}
        with db.transaction() as conn:
            conn.root()["x"] = 1
            conn.get_connection("b").root()["y"] = 2
    finally:
        for each in list(db.databases.values()):
            each.close()
    stamps = [_transactions(p)[-1][1].get("tidstorage") for p in paths.values()]
    assert stamps[0] is not None and stamps[0] == stamps[1]
    assert sorted(stamps[0]["storages"]) == ["a", "b"]


@pytest.mark.parametrize("line, match", [
    ("server 127.0.0.1:{PORT}:1", "invalid daemon address"),
    ("timeout 0", "invalid timeout"),
])
def test_zconfig_refuses_bad_values_when_read(tmp_path, line, match):
    line = line.format(PORT=PORT)
    text = "%import tidstorage\n" + _zodb_section("main", tmp_path / "x.fs").replace(
        f"server 127.0.0.1:{PORT}" if line.startswith("server") else "timeout 0.05", line)
    with pytest.raises(ZConfig.ConfigurationError, match=match):
        ZODB.config.databaseFromString(text)
    assert not (tmp_path / "x.fs").exists()  # refused before any storage opened


def test_zconfig_token_file_errors_are_config_errors(tmp_path):
    from tidstorage.errors import ConfigError

    token = tmp_path / "token"
    token.write_text("x" * 32 + "\n")
    token.chmod(0o644)  # readable by others: refused
    text = "%import tidstorage\n" + _zodb_section("main", tmp_path / "x.fs",
                                                  extra=f"auth-token-file {token}")
    with pytest.raises(ConfigError, match="0644|mode") as info:
        ZODB.config.databaseFromString(text)
    assert isinstance(info.value, tidstorage.TidstorageError)
    token.chmod(0o600)
    db = ZODB.config.databaseFromString(text)
    try:
        assert db.storage.reporter.session.auth_token == "x" * 32
    finally:
        db.close()


def test_zconfig_without_name_closes_the_base(tmp_path):
    """No name around a FileStorage: a ValueError, and the FileStorage is
    closed again (its lock file released: it can be opened at once)."""
    path = tmp_path / "x.fs"
    text = "%import tidstorage\n" + _zodb_section("main", path).replace("name main\n", "")
    with pytest.raises(ValueError, match="name is required"):
        ZODB.config.databaseFromString(text)
    ZODB.FileStorage.FileStorage(str(path)).close()  # would raise LockError


# -- the command --------------------------------------------------------------

def _listed_commands(help_text: str) -> set[str]:
    lines = help_text.split("Commands:", 1)[1].splitlines()
    return {line.split()[0] for line in lines if line.startswith("  ") and line.split()}


@pytest.mark.parametrize("argv", [[str(SCRIPT)], [sys.executable, "-m", "tidstorage"]],
                         ids=["script", "python -m"])
def test_help_lists_the_commands(argv):
    from tidstorage.cli import main

    result = subprocess.run(argv + ["--help"], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    listed = _listed_commands(result.stdout)
    assert DOCUMENTED_COMMANDS <= listed
    assert listed == set(main.commands)


def test_version_option_prints_the_version():
    result = subprocess.run([str(SCRIPT), "--version"], check=False, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert tidstorage.__version__ in result.stdout

