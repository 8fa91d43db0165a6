"""The TID log ("status file") of the tidstorage coherency daemon.

The daemon tracks, for a set of ZODB storages, the newest *published* TID of
each storage (a storage id ``str`` mapped to the ``int`` value of ZODB's 8-byte
tid).  It appends records of that published state to an append-only file, the
TID log.  Backups copy the log; restore reads it to know where to cut each
``Data.fs``.

Record format
-------------
One record per line.  A line is a JSON object followed by ``\\n``, written
with ``json.dumps(obj, sort_keys=True, separators=(",", ":"))`` (so it is
pure ASCII), for example::

    {"crc":"1a2b3c4d","kind":"full","tids":{"main":5},"time":1700000000.5,"v":1}

``v``
    format version, always ``1``.
``time``
    unix time (float) at which the record was written.
``kind``
    ``"full"``: ``tids`` holds the whole published state;
    ``"incremental"``: ``tids`` holds only the storages that changed since
    the previous record.
``tids``
    storage id -> tid, each tid an int in ``[0, 2**64)``.
``crc``
    ``zlib.crc32`` of the canonical JSON (same ``dumps`` settings) of the
    object *without* the ``crc`` key, as 8 lowercase hex digits.

The state a log describes is obtained by folding its records in order (see
`LogContents.final_tids`): tids only ever move up.

Crash safety
------------
Each record is appended with a single ``os.write`` followed by ``os.fsync``;
a record counts only once it has been fsync'd.  A crash can therefore leave,
at worst, an incomplete last line (a *torn tail*).  Readers recognise it
(no trailing newline, or a last line that fails to decode: the CRC makes a
truncated or garbled record detectable -- a large record spans several
pages, and a crash can keep a later page without an earlier one) and ignore
it with a warning; it is never misread as a record.  Ignoring it is safe:
the state before it is a point the daemon published.  When a writer opens a
log ending with a torn tail, it truncates the torn bytes away (they never
counted) before appending, and a failed append is truncated away too, so a
torn line never ends up in the middle of the file.

A bad line anywhere *else* is corruption (a bit flip, a bad edit): the
records after it fold onto a wrong state (an incremental record updates only
some storages), so reading **stops**: :func:`read_log` raises
:class:`TidLogError` naming the file and the line, and the daemon refuses to
start.  :func:`recover_log` (``tidstorage log recover``) keeps the valid
prefix, atomically, and keeps the original file.

Legacy compatibility
--------------------
The legacy TIDStorage daemon (Python 2) wrote lines
``'%.02f %s %r\\n' % (time, code, dict)`` with ``code`` ``f`` (full) or
``d`` (incremental), e.g.::

    1196179931.55 f {"((('127.0.0.1', 8100),), '1')": 270462919574233856L, 'main': 5L}

Such lines are still readable (never written): the dict repr is parsed
without ``eval``, by dropping Python 2 long suffixes with `tokenize` and
handing the result to `ast.literal_eval`.  Legacy lines carry no checksum,
and their timestamps have only 1/100 s resolution.
"""

from __future__ import annotations

import ast
import errno
import io
import json
import logging
import math
import os
import re
import time as _time
import tokenize
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Self

from ..core.tids import MAX_TID
from ..errors import TidLogError
from .durable import atomic_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND_FULL = "full"
KIND_INCREMENTAL = "incremental"
KINDS = frozenset({KIND_FULL, KIND_INCREMENTAL})
#: An operator accepted a split as it is (``tidstorage heal --accept``): a
#: record ``{"v", "time", "kind": "accept", "split": <id>, "crc"}``, no tids.
KIND_ACCEPT = "accept"
#: Longest split id in an accept record.
MAX_SPLIT_ID = 16 * 1024

#: Smallest amount by which a writer bumps a timestamp that would otherwise
#: not be strictly greater than the previous one.
TIMESTAMP_STEP = 1e-6

#: Permissions of a newly created log file (before umask).
FILE_MODE = 0o644

NEWLINE = b"\n"
_JSON_SEPARATORS = (",", ":")
_RECORD_KEYS = frozenset({"v", "time", "kind", "tids", "crc"})
_ACCEPT_KEYS = frozenset({"v", "time", "kind", "split", "crc"})
_CRC_PATTERN = re.compile(r"[0-9a-f]{8}")

#: Legacy line: "<time> <code> <dict repr>", printable ASCII only.
_LEGACY_LINE = re.compile(r"(?P<time>[0-9]+(?:\.[0-9]+)?) (?P<code>[fd]) (?P<tids>\{[\x20-\x7e]*\})")
_LEGACY_KINDS = {"f": KIND_FULL, "d": KIND_INCREMENTAL}
#: Python 2 long integer suffix, tokenized as a NAME right after a NUMBER.
_LEGACY_LONG_SUFFIX = "L"

#: How far back from the end of an existing log a writer looks for the last
#: complete record (to keep timestamps increasing across restarts).
_TAIL_SCAN_LIMIT = 1 << 20
_TAIL_SCAN_BLOCK = 1 << 16

PathLike = str | os.PathLike[str]


class TidLogCorruptError(TidLogError, OSError):
    """A log holds a corrupt line that is not its last one (see `read_log`).

    Also an OSError, like :class:`gzip.BadGzipFile`: a file that cannot be
    read as what it should be, so that callers that report unreadable files
    (the daemon's start) report it as one.
    """


@dataclass(frozen=True)
class Record:
    """One record of the TID log."""

    time: float
    kind: str  # KIND_FULL or KIND_INCREMENTAL
    tids: dict[str, int]
    lineno: int = 0  # 1-based line in the file it was read from (0 if not from a file)
    legacy: bool = False
    split: str | None = None  # KIND_ACCEPT: the split accepted


# ---------------------------------------------------------------------------
# Encoding and decoding of single lines
# ---------------------------------------------------------------------------


def _canonical_json(obj: Mapping[str, object]) -> str:
    return json.dumps(obj, sort_keys=True, separators=_JSON_SEPARATORS)


def _crc(obj: Mapping[str, object]) -> str:
    """CRC of the canonical JSON of `obj` (which must not hold "crc")."""
    return format(zlib.crc32(_canonical_json(obj).encode("ascii")), "08x")


def _is_tid(value: object) -> bool:
    # bool is a subclass of int: refuse it explicitly.
    return type(value) is int and 0 <= value <= MAX_TID


def _tids_problem(tids: object) -> str | None:
    """Why `tids` is not a valid storage id -> tid mapping, or None if it is."""
    if not isinstance(tids, dict):
        return f"tids must be a mapping, not {type(tids).__name__}"
    for storage_id, tid in tids.items():
        if not isinstance(storage_id, str):
            return f"storage id {storage_id!r} is not a string"
        if not _is_tid(tid):
            return f"tid {tid!r} of storage {storage_id!r} is not an integer in [0, 2**64)"
    return None


def encode_record(time: float, kind: str, tids: Mapping[str, int]) -> bytes:
    """Return the line (including the trailing newline) recording `tids`.

    Raises ValueError on invalid arguments (a caller bug, not a log problem).
    """
    if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time):
        raise ValueError(f"time must be a finite number, not {time!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    tids = dict(tids)
    problem = _tids_problem(tids)
    if problem is not None:
        raise ValueError(problem)
    obj: dict[str, object] = {"v": FORMAT_VERSION, "time": float(time), "kind": kind, "tids": tids}
    obj["crc"] = _crc(obj)
    return _canonical_json(obj).encode("ascii") + NEWLINE


def encode_accept(time: float, split: str) -> bytes:
    """The line recording that an operator accepted split ``split``."""
    if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time):
        raise ValueError(f"time must be a finite number, not {time!r}")
    if not isinstance(split, str) or not split or len(split) > MAX_SPLIT_ID or "\n" in split:
        raise ValueError(f"not a split id: {split!r:.80}")
    obj: dict[str, object] = {"v": FORMAT_VERSION, "time": float(time), "kind": KIND_ACCEPT,
                              "split": split}
    obj["crc"] = _crc(obj)
    return _canonical_json(obj).encode("ascii") + NEWLINE


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return result


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _decode_json_record(text: str, fail: Callable[[str], TidLogError]
                        ) -> tuple[float, str, dict[str, int], str | None]:
    try:
        obj = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as exc:
        raise fail(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise fail("record is not a JSON object")
    split = None
    if obj.get("kind") == KIND_ACCEPT and obj.keys() == _ACCEPT_KEYS:
        split = obj["split"]
        if not isinstance(split, str) or not split or len(split) > MAX_SPLIT_ID:
            raise fail(f"accept record: split {split!r:.80} is not a split id")
        obj["tids"] = {}
    elif obj.keys() != _RECORD_KEYS:
        raise fail(f"record keys are {sorted(obj)}, expected {sorted(_RECORD_KEYS)}")
    version, time, kind, tids, crc = (obj[key] for key in ("v", "time", "kind", "tids", "crc"))
    if type(version) is not int or version != FORMAT_VERSION:
        raise fail(f"unsupported format version {version!r}")
    if type(time) not in (int, float) or not math.isfinite(time):
        raise fail(f"time {time!r} is not a finite number")
    if kind not in KINDS and split is None:
        raise fail(f"unknown record kind {kind!r}")
    problem = _tids_problem(tids)
    if problem is not None:
        raise fail(problem)
    if not isinstance(crc, str) or not _CRC_PATTERN.fullmatch(crc):
        raise fail(f"crc {crc!r} is not 8 lowercase hex digits")
    del obj["crc"]
    if split is not None:
        del obj["tids"]
    expected = _crc(obj)
    if crc != expected:
        raise fail(f"crc mismatch: recorded {crc}, computed {expected}")
    return float(time), kind, tids, split


def _strip_long_suffixes(source: str) -> str:
    """Drop the Python 2 ``L`` suffix of integer literals in `source`.

    `source` must be a single line.  Only a NAME token ``L`` glued to the end
    of a NUMBER token is dropped, so an ``L`` inside a string stays.
    """
    pieces: list[str] = []
    copied_up_to = 0
    previous: tokenize.TokenInfo | None = None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if (
            token.type == tokenize.NAME
            and token.string == _LEGACY_LONG_SUFFIX
            and previous is not None
            and previous.type == tokenize.NUMBER
            and previous.end == token.start
        ):
            # Single line: a token's column is its index in `source`.
            start, end = token.start[1], token.end[1]
            pieces.append(source[copied_up_to:start])
            copied_up_to = end
        previous = token
    pieces.append(source[copied_up_to:])
    return "".join(pieces)


def _decode_legacy_record(text: str, fail: Callable[[str], TidLogError]) -> tuple[float, str, dict[str, int]]:
    match = _LEGACY_LINE.fullmatch(text)
    if match is None:
        raise fail("neither a JSON record nor a legacy '<time> f|d {dict}' record")
    try:
        tids = ast.literal_eval(_strip_long_suffixes(match["tids"]))
    except (ValueError, TypeError, SyntaxError, tokenize.TokenError, MemoryError, RecursionError) as exc:
        raise fail(f"legacy tids are not a literal dict: {exc}") from None
    problem = _tids_problem(tids)
    if problem is not None:
        raise fail(problem)
    return float(match["time"]), _LEGACY_KINDS[match["code"]], tids


def decode_line(line: bytes, lineno: int = 0, path: str = "<tidlog>") -> Record:
    """Decode one line (new or legacy format, with its trailing newline).

    Raises TidLogError, naming `path` and `lineno`, if the line is invalid.
    """

    def fail(reason: str) -> TidLogError:
        return TidLogError(reason, path, lineno)

    if not line.endswith(NEWLINE):
        raise fail("incomplete line (no trailing newline)")
    body = line[: -len(NEWLINE)]
    if NEWLINE in body:
        raise fail("more than one line")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"invalid UTF-8: {exc}") from None
    legacy = not text.startswith("{")
    split = None
    if legacy:
        time, kind, tids = _decode_legacy_record(text, fail)
    else:
        time, kind, tids, split = _decode_json_record(text, fail)
    return Record(time=time, kind=kind, tids=tids, lineno=lineno, legacy=legacy, split=split)


# ---------------------------------------------------------------------------
# Reading, checking and rewriting whole logs
# ---------------------------------------------------------------------------


def fold_record(state: dict[str, int], record: Record) -> None:
    """Apply `record` to `state` in place: tids only move up.

    A full record sets its keys, an incremental one updates its keys; keys
    missing from a full record are kept (see `check_log` for why that is
    flagged).
    """
    for storage_id, tid in record.tids.items():
        state[storage_id] = max(tid, state.get(storage_id, tid))


@dataclass
class LogContents:
    """What `read_log` found in a log."""

    records: list[Record] = field(default_factory=list)
    #: (lineno, reason) if the last line is incomplete or corrupt (ignored).
    torn_tail: tuple[int, str] | None = None

    def accepted(self) -> set[str]:
        """The splits an operator accepted as they are."""
        return {r.split for r in self.records if r.split is not None}

    def final_tids(self) -> dict[str, int]:
        """The published state after the last record."""
        state: dict[str, int] = {}
        for record in self.records:
            fold_record(state, record)
        return state


def _split_lines(data: bytes) -> list[bytes]:
    """Split `data` into lines, each keeping its newline (except maybe the last)."""
    lines = [segment + NEWLINE for segment in data.split(NEWLINE)]
    lines[-1] = lines[-1][: -len(NEWLINE)]  # what follows the last newline
    if not lines[-1]:
        lines.pop()
    return lines


@dataclass
class _Scan:
    """A log read up to its first bad line (see `read_log`)."""

    contents: LogContents
    #: the first bad line that is not the last one (reading stopped there)
    error: TidLogError | None
    #: bytes of the valid prefix: the records in `contents`
    valid_size: int
    lines: int  # lines in the file


def _scan_log(name: str) -> _Scan:
    try:
        with open(name, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return _Scan(LogContents(), None, 0, 0)
    contents = LogContents()
    lines = _split_lines(data)
    size = 0
    for lineno, line in enumerate(lines, start=1):
        try:
            contents.records.append(decode_line(line, lineno, name))
        except TidLogError as exc:
            if lineno < len(lines):
                return _Scan(contents, exc, size, len(lines))
            contents.torn_tail = (lineno, exc.reason)
            break
        size += len(line)
    return _Scan(contents, None, size, len(lines))


def _corruption_error(exc: TidLogError, lines: int) -> TidLogCorruptError:
    """The error for a corrupt line in the middle of a log: it names the
    file and the line, and the way out."""
    return TidLogCorruptError(
        f"corrupt record: {exc.reason}; it is not the last line ({lines} lines), so the "
        "records after it cannot be trusted and reading stops there. Stop the daemon, "
        f"keep the file, and run `tidstorage log recover {exc.path}` (keeps the valid "
        "prefix, keeps the original)", exc.path, exc.lineno)


def read_log(path: PathLike) -> LogContents:
    """Read and decode a whole log.  A missing file reads as an empty log.

    The last line, if incomplete or invalid, is a torn tail (the trace of a
    crash while appending): it is ignored with a warning.  Any other invalid
    line raises :class:`TidLogError` naming the file and the line: the
    records after it would fold onto a wrong state (see the module
    docstring; `recover_log` keeps the valid prefix).
    """
    name = os.fspath(path)
    scan = _scan_log(name)
    if scan.error is not None:
        raise _corruption_error(scan.error, scan.lines)
    if scan.contents.torn_tail is not None:
        lineno, reason = scan.contents.torn_tail
        logger.warning("%s:%d: ignoring torn last line: %s", name, lineno, reason)
    return scan.contents


@dataclass
class CheckReport:
    """Result of `check_log`."""

    ok: bool
    problems: list[tuple[int, str]]  # (lineno, message)
    final_tids: dict[str, int]
    records: int
    #: (lineno, message): not failures (a torn last line, left by a crash)
    warnings: list[tuple[int, str]] = field(default_factory=list)


def _record_problems(record: Record, state: Mapping[str, int], previous_time: float | None) -> list[str]:
    """Why `record` is not a valid successor of `state` (empty if it is)."""
    problems = []
    if previous_time is not None and record.time < previous_time:
        problems.append(f"time {record.time!r} is before the previous record's {previous_time!r}")
    for storage_id, tid in record.tids.items():
        known = state.get(storage_id)
        if known is not None and tid < known:
            problems.append(f"tid of {storage_id!r} goes down from {known} to {tid}")
    if record.kind == KIND_FULL:
        for storage_id in sorted(state.keys() - record.tids.keys()):
            problems.append(f"full record lacks storage {storage_id!r} seen earlier")
    return problems


def check_log(path: PathLike) -> CheckReport:
    """Check the sanity of a log (the rules of the legacy ``check_tid_log``).

    Problems reported, each with its line number:

    * a line that does not decode and is not the last one: checking stops
      there (see `read_log`); a torn last line is only a *warning* (the
      trace of a crash: readers ignore it, the next writer truncates it);
    * a timestamp lower than the previous record's.  Equal timestamps are
      allowed: legacy records only have 1/100 s resolution (writers of the
      new format keep them strictly increasing);
    * a tid lower than the value known so far for its storage (equal is
      allowed), in an incremental or a full record;
    * a full record lacking a storage seen in an earlier record.

    A missing file is reported as a problem at line 0.
    """
    name = os.fspath(path)
    problems: list[tuple[int, str]] = []
    if not os.path.exists(name):
        problems.append((0, f"{name} does not exist"))
    scan = _scan_log(name)
    contents = scan.contents
    if scan.error is not None:
        problems.append((scan.error.lineno, (
            f"corrupt line: {scan.error.reason}; checking stops here (`tidstorage log "
            "recover` keeps the records before it)")))
    warnings: list[tuple[int, str]] = []
    state: dict[str, int] = {}
    previous_time: float | None = None
    for record in contents.records:
        problems.extend((record.lineno, problem) for problem in _record_problems(record, state, previous_time))
        fold_record(state, record)
        previous_time = record.time
    if contents.torn_tail is not None:
        lineno, reason = contents.torn_tail
        warnings.append((lineno, f"torn tail (incomplete last record, ignored): {reason}"))
    problems.sort(key=lambda problem: problem[0])  # stable: keeps a line's problems in order
    return CheckReport(
        ok=not problems, problems=problems, final_tids=state, records=len(contents.records),
        warnings=warnings,
    )


def rewrite_full(src: PathLike, dst: PathLike) -> int:
    """Rewrite the log `src` into `dst` as full records only, in the new format.

    Each input record (legacy or new) gives one full record with the same
    time, holding the folded state at that point, so the output has the same
    `LogContents.final_tids`.  A torn tail is dropped (and logged by
    `read_log`); a corrupt line elsewhere raises TidLogError (use
    `recover_log` first).  `dst` is replaced atomically (temporary file in
    its directory, fsync, rename), so `dst` may be `src`; `src` must not be
    appended to meanwhile.  Returns the number of records written.

    Raises FileNotFoundError if `src` does not exist.
    """
    src_name, dst_name = os.fspath(src), os.fspath(dst)
    if not os.path.exists(src_name):
        raise FileNotFoundError(f"TID log {src_name} does not exist")
    state: dict[str, int] = {}
    lines = []
    for record in read_log(src_name).records:
        if record.split is not None:
            lines.append(encode_accept(record.time, record.split))  # kept as it is
            continue
        fold_record(state, record)
        lines.append(encode_record(record.time, KIND_FULL, state))
    atomic_write(dst_name, b"".join(lines), mode=FILE_MODE)
    return len(lines)


@dataclass
class RecoverResult:
    """What `recover_log` did."""

    output: str
    kept: int  # records kept (the valid prefix)
    dropped_lines: int  # lines after the prefix, not in the output
    error: TidLogError | None  # the first bad line (None: only a torn tail, or nothing)
    original: str | None  # where the original is kept (None: not replaced)
    final_tids: dict[str, int] = field(default_factory=dict)


def recover_log(src: PathLike, dst: PathLike | None = None) -> RecoverResult:
    """Keep the valid prefix of the log `src`: the records before its first
    bad line (and before a torn tail), byte for byte.

    Written atomically to `dst` (which must not exist), or, without `dst`,
    over `src`, after the original is hard-linked to
    ``<src>.corrupt-<unix time>`` (never overwritten).  The prefix is a
    state the daemon once published: coherent, older than the lost records.
    In place, a log with nothing to drop is left alone (``original`` None).
    Raises FileNotFoundError, FileExistsError, OSError.
    """
    src_name = os.fspath(src)
    if not os.path.exists(src_name):
        raise FileNotFoundError(f"TID log {src_name} does not exist")
    dst_name = os.fspath(dst) if dst is not None else src_name
    in_place = os.path.abspath(dst_name) == os.path.abspath(src_name)
    if not in_place and os.path.lexists(dst_name):
        raise FileExistsError(f"{dst_name} exists: not overwritten")
    scan = _scan_log(src_name)
    with open(src_name, "rb") as file:
        prefix = file.read(scan.valid_size)
    result = RecoverResult(
        output=dst_name, kept=len(scan.contents.records),
        dropped_lines=scan.lines - len(scan.contents.records), error=scan.error,
        original=None, final_tids=scan.contents.final_tids())
    if in_place:
        if result.dropped_lines == 0:
            return result
        keep = f"{src_name}.corrupt-{int(_time.time())}"
        while os.path.lexists(keep):
            keep += "+"
        atomic_write(src_name, prefix, mode=FILE_MODE, keep=keep)
        result.original = keep
    else:
        atomic_write(dst_name, prefix, mode=FILE_MODE)
    return result


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _last_complete_line(file: io.BufferedReader, size: int) -> bytes | None:
    """The last newline-terminated line of `file` (of `size` bytes), if any.

    Reads backwards by blocks, giving up (None) after `_TAIL_SCAN_LIMIT` bytes.
    """
    tail = b""
    position = size
    while position > 0 and len(tail) < _TAIL_SCAN_LIMIT:
        step = min(_TAIL_SCAN_BLOCK, position)
        position -= step
        file.seek(position)
        tail = file.read(step) + tail
        end = tail.rfind(NEWLINE)
        if end == -1:
            continue
        start = tail.rfind(NEWLINE, 0, end) + 1  # 0 if no earlier newline
        if start > 0 or position == 0:
            return tail[start : end + 1]
    return None


def _inspect_tail(path: str) -> tuple[int | None, float | None]:
    """Return (offset of a torn last line or None, time of the last valid
    line or None).

    The last line is torn if it has no newline, or if it does not decode
    (as `read_log` sees it).
    """
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return None, None
        file.seek(size - 1)
        line = _last_complete_line(file, size)
        if file.seek(size - 1) >= 0 and file.read(1) != NEWLINE:
            return _line_start(file, size), _time_of(line, path)
        if line is None:
            return None, None  # a last line over _TAIL_SCAN_LIMIT: readers judge it
        last_time = _time_of(line, path)
        if last_time is not None:
            return None, last_time
        # A complete but bad last line: torn too (a crash that kept the page
        # of its newline but not an earlier one); the line before gives the time.
        start = size - len(line)
        return start, _time_of(_last_complete_line(file, start), path)


def _line_start(file: io.BufferedReader, size: int) -> int:
    """Offset just after the last newline of `file` (0 if none)."""
    position = size
    while position > 0:
        step = min(_TAIL_SCAN_BLOCK, position)
        position -= step
        file.seek(position)
        end = file.read(step).rfind(NEWLINE)
        if end != -1:
            return position + end + 1
    return 0


def _time_of(line: bytes | None, path: str) -> float | None:
    if line is None:
        return None
    try:
        return decode_line(line, path=path).time
    except TidLogError:
        return None  # not our business here: readers report it


class TidLogWriter:
    """Append records with the legacy burst_period / full_dump_period semantics, fsync'd.

    Not thread-safe; used from one asyncio loop.

    * A full record of the whole state is due immediately (written by the
      first `tick`), then every `full_dump_period` seconds.
    * Between full records, an incremental record of the storages that
      changed is written at most every `burst_period` seconds.  The first
      change after a quiet period is written at once (`published` ticks).
    * A due full record takes precedence over (and absorbs) the pending
      incremental one.
    * If both periods are None, every call to `published` writes a record
      at once (as if burst_period were 0).
    * Each record is written with one ``os.write`` and fsync'd before `tick`
      returns.  If writing fails, the OSError propagates and the pending
      changes are kept, so that the next `tick` retries.
    * Timestamps strictly increase, even if the clock goes back, including
      across restarts (the last record of an existing file is read at open).
      If the clock goes back, the next records stay at most one period away.
    * If the file ends with a torn line (a crash while appending), it is
      truncated away at open (it never counted).  If an append fails, what
      reached the file is truncated away before the next one (the append
      fails until that succeeds), so no bad line is left in the middle.
    * The file itself must not be a symbolic link (its directories may be):
      opening one raises OSError (ELOOP), at start and at `reopen`.

    `initial_state` is the state reloaded at start (e.g.
    ``read_log(path).final_tids()``), so that a full record written before
    any publication holds it.
    """

    def __init__(
        self,
        path: PathLike,
        burst_period: float | None,
        full_dump_period: float | None,
        clock: Callable[[], float] = _time.time,
        *,
        initial_state: Mapping[str, int] | None = None,
        accepted: Iterable[str] = (),
    ) -> None:
        self.path = os.fspath(path)
        #: accepted splits: written again at the top of each new file
        self._accepted: list[str] = list(accepted)
        if burst_period is None and full_dump_period is None:
            burst_period = 0.0
        self._burst_period = burst_period
        self._full_dump_period = full_dump_period
        self._clock = clock
        self._state: dict[str, int] = dict(initial_state or {})
        self._pending: dict[str, int] = {}
        self._last_time: float | None = None
        self._fd: int | None = None
        #: size to truncate the file back to before the next append (the
        #: end of its last good record: a failed append may have left part
        #: of a line), or None
        self._good_size: int | None = None
        self._open()
        now = clock()
        self._next_full_dump = now  # first full record due immediately
        self._next_burst = now

    # -- file handling -----------------------------------------------------

    def _open(self) -> None:
        try:  # never through a symbolic link (its directories may be links)
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP and os.path.islink(self.path):
                raise OSError(errno.ELOOP, f"the TID log {self.path} is a symbolic link: refusing"
                              " to write through it (name the file itself)") from None
            raise
        torn_at, last_time = _inspect_tail(self.path)
        if torn_at is not None:
            size = os.fstat(self._fd).st_size
            logger.warning(
                "%s: ends with a torn line (%d bytes from offset %d, the trace of a crash "
                "while appending): truncating it away", self.path, size - torn_at, torn_at
            )
            self._good_size = torn_at
            self._truncate_back()
        if last_time is not None and (self._last_time is None or last_time > self._last_time):
            self._last_time = last_time

    def _truncate_back(self) -> None:
        """Truncate what a failed append or a crash left after the last good
        record.  Raises OSError (then the next append tries again)."""
        if self._good_size is None:
            return
        os.ftruncate(self._fd, self._good_size)
        os.fsync(self._fd)
        self._good_size = None

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _append(self, data: bytes) -> None:
        """Append `data` (one or more whole lines) and fsync."""
        if self._fd is None:
            raise ValueError(f"TID log {self.path} is closed")
        self._truncate_back()
        size_before = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # short writes are rare on regular files
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError:
            # Part of the line may have reached the file: cut it off now or
            # before the next append.
            self._good_size = size_before
            try:
                self._truncate_back()
            except OSError:
                pass
            raise

    def _next_timestamp(self) -> float:
        now = self._clock()
        last = self._last_time
        if last is not None and now <= last:
            now = max(last + TIMESTAMP_STEP, math.nextafter(last, math.inf))
        return now

    def _write_record(self, kind: str, tids: Mapping[str, int]) -> None:
        timestamp = self._next_timestamp()
        self._append(encode_record(timestamp, kind, tids))
        self._last_time = timestamp

    # -- scheduling ----------------------------------------------------------

    def published(self, changes: Mapping[str, int], state: Mapping[str, int]) -> None:
        """Note that the published tids of `changes` changed (O(len(changes))).

        `state` is the full published state after the change.  The writer
        keeps its own copy (``initial_state`` updated with every change), so
        `state` is not read here; it is accepted for the daemon's convenience.
        """
        self._pending.update(changes)
        self._state.update(changes)
        self.tick()

    def tick(self) -> bool:
        """Write at most one record if one is due.  Returns True if one was written."""
        now = self._clock()
        self._clamp_deadlines(now)
        if self._full_dump_period is not None and now >= self._next_full_dump:
            wrote = bool(self._state)
            if wrote:
                self._write_record(KIND_FULL, self._state)
            self._after_full(now)
            return wrote
        if self._burst_period is not None and now >= self._next_burst and self._pending:
            self._write_record(KIND_INCREMENTAL, self._pending)
            self._pending.clear()
            self._next_burst = now + self._burst_period
            return True
        return False

    def _clamp_deadlines(self, now: float) -> None:
        """Keep deadlines at most one period ahead, should the clock go back."""
        if self._full_dump_period is not None:
            self._next_full_dump = min(self._next_full_dump, now + self._full_dump_period)
        if self._burst_period is not None:
            self._next_burst = min(self._next_burst, now + self._burst_period)

    def _after_full(self, now: float) -> None:
        self._pending.clear()
        if self._full_dump_period is not None:
            self._next_full_dump = now + self._full_dump_period
        if self._burst_period is not None:
            self._next_burst = now + self._burst_period

    def accept(self, split: str) -> None:
        """Record, at once and fsync'd, that an operator accepted ``split``."""
        timestamp = self._next_timestamp()
        self._append(encode_accept(timestamp, split))
        self._last_time = timestamp
        self._accepted.append(split)

    def write_full(self) -> None:
        """Write a full record of the state now (if the state is not empty)."""
        now = self._clock()
        if self._state:
            self._write_record(KIND_FULL, self._state)
        self._after_full(now)

    def flush(self) -> None:
        """Write an incremental record of the pending changes now, if any."""
        if self._pending:
            self._write_record(KIND_INCREMENTAL, self._pending)
            self._pending.clear()

    def reopen(self) -> None:
        """Reopen `path` (after logrotate, on SIGHUP) and write a full record to it.

        The new file is opened before the old one is closed: if that fails,
        the writer keeps writing to the old file and the error propagates.
        """
        old_fd, old_good, old_last = self._fd, self._good_size, self._last_time
        self._fd = None
        self._good_size = None
        try:
            self._open()
        except BaseException:
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._good_size, self._last_time = old_fd, old_good, old_last
            raise
        if old_fd is not None:
            os.close(old_fd)
        for split in self._accepted:  # a new file: the acceptances go with it
            timestamp = self._next_timestamp()
            self._append(encode_accept(timestamp, split))
            self._last_time = timestamp
        self.write_full()

    @property
    def unwritten(self) -> dict[str, int]:
        """Published TIDs not written to the file yet."""
        return dict(self._pending)

    @property
    def last_record_time(self) -> float | None:
        """The timestamp (Unix time) of the last record in the file."""
        return self._last_time

    def close(self) -> None:
        """Flush pending changes and close the file.  Idempotent."""
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            self._close_fd()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
