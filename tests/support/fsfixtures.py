"""Real multi-storage FileStorage sites with blobs, for the operator tools' tests.

:class:`Site` writes a tidstorage TOML config and opens several FileStorages
(with blob directories) as one ZODB multi-database, so that one transaction
commits to several ``Data.fs`` at once, stamped exactly as tidstorage's
wrapper stamps it (``transaction.get().extension["tidstorage"]``).  It also
writes the TID log as the daemon would (:meth:`Site.publish`).

The invariant checked after restores and repairs: every multi-storage
transaction commits to *all* the storages and increments ``root["multi"]``
in each, so a coherent set of files has the same ``multi`` everywhere.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import transaction
from ZODB import DB
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64, u64, z64

from tidstorage.formats import tidlog
from tidstorage.core.stamps import stamp_value

PYTHON = sys.executable
TIDSTORAGE = [PYTHON, "-m", "tidstorage"]


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(*args, cwd=None, preexec_fn=None, timeout=120) -> subprocess.CompletedProcess:
    """Run ``tidstorage ARGS`` in a subprocess (text output)."""
    return subprocess.run(TIDSTORAGE + [str(a) for a in args], capture_output=True, text=True,
                          cwd=cwd, preexec_fn=preexec_fn, timeout=timeout)


class Site:
    """Storages ``ids`` under ``root``: ``var/<id>/Data.fs``, ``var/<id>/blobs``,
    backups in ``backups/<id>``; config ``root/tidstorage.toml``."""

    def __init__(self, root: Path, ids=("a", "b", "c"), *, blobs: bool = True,
                 keep_full_backups: int = 2) -> None:
        self.root = Path(root)
        self.ids = tuple(ids)
        self.blobs = blobs
        self.config = self.root / "tidstorage.toml"
        self.tidlog = self.root / "var" / "tidstorage.tid"
        lines = ["[server]", 'status_file = "var/tidstorage.tid"', ""]
        for sid in self.ids:
            lines += [f"[storages.{sid}]", f'data_fs = "var/{sid}/Data.fs"',
                      f'backup_dir = "backups/{sid}"']
            if blobs:
                lines.append(f'blob_dir = "var/{sid}/blobs"')
            lines.append("")
        lines += ["[backup]", 'timestamp_file = "backups/timestamps.log"',
                  'status_file_backup_dir = "backups/tidlog"',
                  f"keep_full_backups = {keep_full_backups}", ""]
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join(lines))
        for sid in self.ids:
            (self.root / "var" / sid).mkdir(parents=True, exist_ok=True)
        self.storages: dict[str, FileStorage] = {}
        self.dbs: dict[str, DB] = {}
        self.conn = None
        self._tm = None
        self.blob_data: dict[str, dict[str, bytes]] = {sid: {} for sid in self.ids}

    # -- paths -------------------------------------------------------------

    def data_fs(self, sid: str) -> Path:
        return self.root / "var" / sid / "Data.fs"

    def blob_dir(self, sid: str) -> Path:
        return self.root / "var" / sid / "blobs"

    def repo(self, sid: str) -> Path:
        return self.root / "backups" / sid

    @property
    def timestamp_file(self) -> Path:
        return self.root / "backups" / "timestamps.log"

    # -- the multi-database ------------------------------------------------

    def open(self) -> Site:
        self.dbs = {}
        for sid in self.ids:
            kw = {"blob_dir": str(self.blob_dir(sid))} if self.blobs else {}
            self.storages[sid] = FileStorage(str(self.data_fs(sid)), **kw)
            DB(self.storages[sid], database_name=sid, databases=self.dbs)
        self._tm = transaction.TransactionManager()
        self.conn = self.dbs[self.ids[0]].open(self._tm)
        return self

    def close(self) -> None:
        if self.conn is not None:
            self._tm.abort()
            self.conn.close()
            self.conn = None
        for db in self.dbs.values():
            db.close()
        self.dbs = {}
        self.storages = {}

    def __enter__(self) -> Site:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def root_of(self, sid: str):
        return self.conn.get_connection(sid).root()

    def last_tids(self) -> dict[str, int]:
        return {sid: u64(st.lastTransaction()) for sid, st in self.storages.items()}

    def commit(self, storages=None, *, blob: bool = False, stamp: bool = True,
               stamp_id: str | None = None) -> dict[str, int]:
        """One transaction on ``storages`` (default: all).  On all storages it
        increments ``multi`` everywhere; on a subset, ``single`` in each.
        With ``blob``, adds a blob in each storage.  Returns the new TIDs."""
        storages = tuple(storages or self.ids)
        everywhere = set(storages) == set(self.ids)
        txn = self._tm.get()
        for sid in storages:
            root = self.root_of(sid)
            key = "multi" if everywhere else "single"
            root[key] = root.get(key, 0) + 1
            if blob:
                name = f"blob{len(self.blob_data[sid])}"
                data = os.urandom(64) + name.encode()
                root[name] = Blob(data)
                self.blob_data[sid][name] = data
        if stamp and len(storages) > 1:
            txn.extension["tidstorage"] = stamp_value(stamp_id or uuid.uuid4().hex, storages)
        before = self.last_tids()
        txn.commit()
        after = self.last_tids()
        return {sid: after[sid] for sid in storages if after[sid] != before[sid]}

    def publish(self, tids: dict[str, int] | None = None, path: Path | None = None) -> dict:
        """Append a full record of ``tids`` (default: the storages' last TIDs)
        to the TID log, as the daemon does."""
        tids = dict(self.last_tids() if tids is None else tids)
        path = path or self.tidlog
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(tidlog.encode_record(time.time(), tidlog.KIND_FULL, tids))
        return tids


def read_counters(path: Path, blob_dir: Path | None = None) -> dict:
    """``multi``/``single`` counters and blob contents of one Data.fs (read only)."""
    kw = {"blob_dir": str(blob_dir)} if blob_dir is not None else {}
    storage = FileStorage(str(path), read_only=True, **kw)
    db = DB(storage)
    try:
        conn = db.open()
        root = conn.root()
        out = {"multi": root.get("multi", 0), "single": root.get("single", 0), "blobs": {}}
        for key in root.keys():
            if key.startswith("blob"):
                with root[key].open() as f:
                    out["blobs"][key] = f.read()
        conn.close()
        return out
    finally:
        db.close()


def raw_commit(storage: FileStorage, tid: int, extension: dict | None = None,
               oid: int = 1) -> int:
    """Commit through the storage API with an explicit TID (for window tests).
    Stores a new revision of object ``oid`` (the data need not unpickle)."""
    t = TransactionMetaData(b"", b"", extension or {})
    storage.tpc_begin(t, p64(tid))
    try:
        prev = storage.load(p64(oid))[1]
    except Exception:
        prev = z64
    storage.store(p64(oid), prev, b"x" * 20, "", t)
    storage.tpc_vote(t)
    storage.tpc_finish(t)
    return tid


def fsize_limit(nbytes: int):
    """A ``preexec_fn``: a file-size limit of ``nbytes`` (RLIMIT_FSIZE) with
    SIGXFSZ ignored, so writes beyond it fail with EFBIG ("disk full")."""
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def tree_state(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (a snapshot)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            if p.name.endswith(".lock"):
                continue
            out[str(p.relative_to(root))] = digest(p)
    return out
