"""repozo's repositories: the rules of ``ZODB/scripts/repozo.py``, in one place.

A repository holds, for each backup, a *data file* named by the UTC time it
was made (``YYYY-MM-DD-HH-MM-SS``): a full backup (``.fs``, ``.fsz``
gzipped) or an incremental one (``.deltafs``, ``.deltafsz``).  A full backup
starts a *chain*; its ``.dat`` (same date) lists, one line each, every data
file of the chain: ``<path> <start> <end> <md5>`` (the byte range of the
``Data.fs`` it holds).  ``<date>.index`` is the FileStorage index saved with
a backup; ``tmp.tmp`` is where repozo copies before renaming.

The backup timestamps of the whole set (TID log copies, blob snapshots, the
timestamp file) use the same format.
"""

from __future__ import annotations

import calendar
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATA_FILE_RE",
    "FULL_EXTS",
    "SCRATCH_FILE",
    "TIMESTAMP_FORMAT",
    "TIMESTAMP_RE",
    "DatEntry",
    "DatError",
    "RepositoryError",
    "chain_start",
    "dat_path",
    "data_files",
    "file_date",
    "find_files",
    "format_timestamp",
    "full_files",
    "index_files",
    "is_data_file",
    "is_full",
    "is_index",
    "parse_date",
    "read_dat",
    "repository_file_date",
    "repozo_argv",
    "timestamp_seconds",
    "verified_chain",
]

TIMESTAMP_FORMAT = "%Y-%m-%d-%H-%M-%S"
TIMESTAMP_RE = re.compile(r"\d{4}(?:-\d\d){5}")
#: Length of a timestamp, the date prefix of every repository file name.
TIMESTAMP_LEN = 19
_DATE_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)(?:[-T ](\d\d)(?:[-:](\d\d)(?:[-:](\d\d))?)?)?Z?")

#: repozo's data files (``is_data_file`` in ``ZODB/scripts/repozo.py``)
DATA_FILE_RE = re.compile(r"(\d{4}(?:-\d\d){5})\.(?:delta)?fsz?")
FULL_EXTS = (".fs", ".fsz")
#: Where repozo copies a data file before renaming it.
SCRATCH_FILE = "tmp.tmp"
INDEX_SUFFIX = ".index"
#: The suffixes of the files repozo names by a backup's date.
REPOSITORY_SUFFIXES = (".fs", ".fsz", ".deltafs", ".deltafsz", ".dat", INDEX_SUFFIX)


# -- timestamps ---------------------------------------------------------------


def format_timestamp(seconds: float) -> str:
    """UTC ``YYYY-MM-DD-HH-MM-SS`` (repozo's file names)."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime(seconds))


def timestamp_seconds(stamp: str) -> int:
    return calendar.timegm(time.strptime(stamp, TIMESTAMP_FORMAT))


def parse_date(text: str) -> str:
    """A UTC date as repozo takes it (``yyyy-mm-dd[-hh[-mm[-ss]]]``, also with
    ``T``/space and ``:``), normalised to ``YYYY-MM-DD-HH-MM-SS``.

    Raises ValueError.
    """
    m = _DATE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad date {text!r}: expected UTC yyyy-mm-dd[-hh[-mm[-ss]]]")
    parts = [int(p) if p else 0 for p in m.groups()]
    try:
        stamp = "{:04d}-{:02d}-{:02d}-{:02d}-{:02d}-{:02d}".format(*parts)
        time.strptime(stamp, TIMESTAMP_FORMAT)
    except ValueError:
        raise ValueError(f"bad date {text!r}: no such day or time") from None
    return stamp


# -- file names ---------------------------------------------------------------


def is_data_file(name: str) -> bool:
    return DATA_FILE_RE.fullmatch(name) is not None


def is_full(name: str) -> bool:
    """A full backup's data file (the start of a chain)."""
    return name.endswith(FULL_EXTS)


def file_date(name: str) -> str:
    """The date (timestamp) a repository file is named by."""
    return name[:TIMESTAMP_LEN]


def is_index(name: str) -> bool:
    return name.endswith(INDEX_SUFFIX) and TIMESTAMP_RE.fullmatch(name[:-len(INDEX_SUFFIX)]) is not None


def repository_file_date(name: str) -> str | None:
    """The date of a file repozo names by a backup's date (data file,
    ``.dat``, ``.index``), None for any other file."""
    root, ext = os.path.splitext(name)
    if ext in REPOSITORY_SUFFIXES and TIMESTAMP_RE.fullmatch(root):
        return root
    return None


# -- listings -----------------------------------------------------------------


def _listdir(repository: Path) -> list[str]:
    try:
        return os.listdir(repository)
    except FileNotFoundError:
        return []


def data_files(repository: Path) -> list[str]:
    """repozo data file names of a repository, oldest first."""
    return sorted(n for n in _listdir(repository) if is_data_file(n))


def full_files(repository: Path, at_most: str | None = None) -> list[str]:
    """The full backups of a repository (dated ``<= at_most``), oldest first."""
    return [n for n in data_files(repository)
            if is_full(n) and (at_most is None or file_date(n) <= at_most)]


def index_files(repository: Path) -> list[str]:
    """The ``<date>.index`` files of a repository, oldest first."""
    return sorted(n for n in _listdir(repository) if is_index(n))


def find_files(files: list[str], date: str) -> list[str]:
    """The data files (of ``files``, sorted) that recover the state as of
    ``date`` (repozo's ``find_files``): the newest full backup at or before
    ``date`` and the incrementals after it up to ``date``, oldest first.
    Starts with an incremental if no full backup precedes it."""
    needed = []
    for name in reversed(files):
        if file_date(name) <= date:
            needed.append(name)
            if is_full(name):
                break
    needed.reverse()
    return needed


def chain_start(repository: Path, date: str) -> str | None:
    """Date of the full backup the chain as of ``date`` starts with."""
    fulls = full_files(repository, at_most=date)
    return file_date(fulls[-1]) if fulls else None


# -- the .dat -----------------------------------------------------------------


def dat_path(repository: Path, full: str) -> Path:
    """The ``.dat`` of the chain starting with the full backup ``full``."""
    return repository / (file_date(full) + ".dat")


@dataclass(frozen=True)
class DatEntry:
    """One line of a ``.dat``: a data file and the byte range it holds."""

    name: str       #: file name (the ``.dat`` holds its path)
    start: int
    end: int
    checksum: str


class DatError(ValueError):
    """A ``.dat`` that cannot be parsed; the message names the file."""


def read_dat(path: Path) -> list[DatEntry]:
    """The entries of a ``.dat``, in order (blank lines skipped).

    Raises FileNotFoundError (no ``.dat``), OSError, or :class:`DatError`
    for a line that is not ``<path> <start> <end> <checksum>`` (or a file
    that is not text).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatError(f"{path}: not a text file") from None
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 4:
                raise ValueError
            start, end = int(fields[1]), int(fields[2])
        except ValueError:
            raise DatError(f"{path}: malformed line {' '.join(fields)!r}") from None
        out.append(DatEntry(os.path.basename(fields[0]), start, end, fields[3]))
    return out


# -- chains -------------------------------------------------------------------


class RepositoryError(ValueError):
    """A repository that cannot recover a date; the message says why."""


def verified_chain(repository: Path, date: str) -> list[str]:
    """The data files that recover ``repository`` as of ``date``
    (:func:`find_files`), after checking them against the chain's ``.dat``:
    each one listed, present, of the size listed (gzipped ones aside), the
    byte ranges continuous.  (Their checksums are checked by ``repozo -R
    -w`` as it reads them.)  Raises :class:`RepositoryError`.
    """
    repo = repository
    if not repo.is_dir():
        raise RepositoryError(f"backup directory {repo} does not exist")
    needed = find_files(data_files(repo), date)
    if not needed:
        raise RepositoryError(f"no backup at or before {date} in {repo}")
    if not is_full(needed[0]):
        raise RepositoryError(f"no full backup at or before {date} in {repo} "
                              f"(only incremental files: {needed[0]} ...)")
    dat = dat_path(repo, needed[0])
    try:
        entries = read_dat(dat)
    except FileNotFoundError:
        raise RepositoryError(f"{dat} is missing (repozo's list of the files of the backup "
                              f"chain starting at {needed[0]})") from None
    except DatError as exc:
        raise RepositoryError(str(exc)) from None
    listed = set()
    end = 0
    for e in entries:
        if file_date(e.name) > date:
            break
        if e.start != end:
            raise RepositoryError(f"{dat}: {e.name} starts at {e.start}, the previous file "
                                  f"ends at {end}: the chain is broken")
        end = e.end
        listed.add(e.name)
        path = repo / e.name
        if not path.exists():
            raise RepositoryError(f"repository file {path} is missing")
        if not e.name.endswith("z") and path.stat().st_size != e.end - e.start:
            raise RepositoryError(f"repository file {path} is {path.stat().st_size} bytes, "
                                  f"should be {e.end - e.start} (corrupt or truncated)")
    for name in needed:
        if name not in listed:
            raise RepositoryError(f"repository file {repo / name} is not listed in {dat}: "
                                  "cannot verify it")
    return needed


# -- running it ---------------------------------------------------------------


def repozo_argv() -> list[str]:
    """How to run repozo: the ``repozo`` script beside this Python, if any."""
    script = Path(sys.executable).with_name("repozo")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "ZODB.scripts.repozo"]
