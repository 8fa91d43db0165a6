"""The daemon's reads of its storages (blocking; run in worker threads).

``coordinator.py`` asks for three kinds of I/O; this module does them:

* :class:`ZeoReader` / :class:`FileReader` read every committed transaction
  after a TID, with its stamp (``Scan``). ZEO: a read-only ``ClientStorage``
  kept open, iterating transaction headers on the server (no object data is
  sent). File: the ``Data.fs`` itself, read-only, following its tail (the
  position after the last record read is kept, so a read costs what was
  committed since); an unfinished (``c``) or torn last record is not
  committed and is not returned; a pack (a new file) is found again by TID.
* :func:`commit_noop` (``Noop``): ``zeo.commit_noop`` over some storages.
* :func:`lock_owner` (``CheckOwner``): which process holds ``Data.fs.lock``,
  found without taking the lock (taking it would make a starting
  application fail): the pid written in the file, confirmed by
  ``/proc/locks`` where it exists, and that process's start time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ZODB.utils import p64, u64

from ..core.coordinator import OwnerInfo
from ..core.stamps import Stamp, stamp_of
from ..formats import filestorage
from .zeo import ZeoSpec, ZeoUnavailable, open_client

log = logging.getLogger("tidstorage.server")

#: Most transactions returned by one read: a first read of a big storage is
#: delivered in batches (the coordinator asks again at once).
SCAN_BATCH = 20_000
#: How long a ZEO connection may take (seconds).
CONNECT_TIMEOUT = 10.0


def stamp_from(extension) -> Stamp | None:
    return stamp_of(extension) if isinstance(extension, dict) else None


class ZeoReader:
    """Reads one ZEO storage's transactions (one thread at a time)."""

    def __init__(self, storage_id: str, spec: ZeoSpec) -> None:
        self.storage_id = storage_id
        self.spec = spec
        self._client = None

    def read(self, since: int) -> tuple[list[tuple[int, Stamp | None]], bool]:
        if self._client is None:
            self._client = open_client(self.spec, CONNECT_TIMEOUT, read_only=True,
                                       storage_id=self.storage_id)
        client = self._client
        try:
            start = p64(since + 1) if since >= 0 else None
            out: list[tuple[int, Stamp | None]] = []
            for record in client.iterator(start, None):
                out.append((u64(record.tid), stamp_from(record.extension)))
                if len(out) >= SCAN_BATCH:
                    return out, True
            return out, False
        except ZeoUnavailable:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise ZeoUnavailable(f"cannot read the transactions of storage {self.storage_id!r}"
                                 f" ({self.spec}): {type(exc).__name__}: {exc}",
                                 self.storage_id, self.spec.address) from exc

    def last_tid(self) -> int | None:
        client = self._client
        if client is None:
            return None
        try:
            return u64(client.lastTransaction())
        except Exception:
            return None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover
                log.debug("closing the ZEO reader of %s", self.storage_id, exc_info=True)


class FileReader:
    """Follows one ``Data.fs``'s tail, read-only."""

    def __init__(self, storage_id: str, path: Path) -> None:
        self.storage_id = storage_id
        self.path = Path(path)
        self._file_id: tuple[int, int] | None = None
        self._pos: int | None = None  # just after the record at _frontier
        self._frontier: int | None = None

    def read(self, since: int) -> tuple[list[tuple[int, Stamp | None]], bool]:
        path = self.path
        try:
            st = os.stat(path)
        except OSError as exc:
            raise OSError(f"cannot read {path} (storage {self.storage_id!r}):"
                          f" {exc.strerror}") from None
        file_id = (st.st_dev, st.st_ino)
        if (self._file_id != file_id or self._frontier != since or self._pos is None
                or st.st_size < self._pos):
            # First read, a pack (a new file), or a truncation: find the
            # record after ``since`` again.
            self._file_id = file_id
            if st.st_size <= 4:
                self._pos, self._frontier = 4, since
                return [], False
            self._pos = 4 if since < 0 else filestorage.find_cut(path, since).offset
            self._frontier = since
        out: list[tuple[int, Stamp | None]] = []
        try:
            for header in filestorage.iter_forward(path, self._pos):
                if not header.finished:
                    break  # voted, not finished: not committed (yet)
                try:
                    stamp = stamp_from(header.ext())
                except filestorage.ScanError as exc:
                    log.warning("%s: unreadable transaction extension at %d (%s): read as"
                                " unstamped", path, header.pos, exc.reason)
                    stamp = None
                out.append((header.tid, stamp))
                self._pos = header.end
                self._frontier = header.tid
                if len(out) >= SCAN_BATCH:
                    return out, True
        except filestorage.ScanError as exc:
            if not out:
                raise OSError(f"{exc} (storage {self.storage_id!r})") from None
        return out, False

    def last_tid(self) -> int | None:
        return self._frontier

    def close(self) -> None:
        pass


def lock_owner(data_fs: Path) -> OwnerInfo:
    """Who holds ``<data_fs>.lock`` (see the module docstring)."""
    lock = Path(f"{data_fs}.lock")
    try:
        text = lock.read_text(encoding="ascii", errors="replace")
        st = os.stat(lock)
    except FileNotFoundError:
        return OwnerInfo(None)
    except OSError as exc:
        raise OSError(f"cannot read {lock}: {exc.strerror}") from None
    holders = _flock_holders(st.st_ino)
    digits = "".join(ch for ch in text.strip().split()[0] if ch.isdigit()) if text.strip() else ""
    pid = int(digits) if digits else None
    if holders is not None:
        if not holders:
            return OwnerInfo(None)  # nobody holds the lock
        if pid is None or pid not in holders:
            pid = min(holders)
    if pid is None:
        return OwnerInfo(None)
    start = _start_time(pid)
    if start is None:
        return OwnerInfo(pid, alive=False)
    return OwnerInfo(pid, alive=True, ident=start)


def _flock_holders(inode: int) -> set[int] | None:
    """Pids holding a FLOCK on ``inode`` per /proc/locks (None: unknown)."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    pids = set()
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:123456 0 EOF" ("->" for waiters)
        if len(parts) < 6 or parts[1] == "->":
            continue
        if parts[1] != "FLOCK":
            continue
        try:
            pid = int(parts[4])
            ino = int(parts[5].rsplit(":", 1)[1])
        except (ValueError, IndexError):
            continue
        if ino == inode:
            pids.add(pid)
    return pids


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat), or None if it is
    gone; where /proc does not exist, "" for a live pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
