"""Fast, read-mostly scanning of FileStorage (``Data.fs``) files from the tail.

A coherent restore (or a crash repair) of several FileStorages must cut each
``Data.fs`` just after the last transaction whose TID is <= the TID published
for that storage.  This module finds that cut point by reading the file
*backward* from its end, so the cost grows with the number of transactions
after the cut, not with the size of the file.  It also reads transaction
metadata (user, description, extension) from the tail of a file.

FileStorage format (see ``ZODB/FileStorage/format.py`` and ``FileStorage.py``)
------------------------------------------------------------------------------

* The file starts with a 4-byte magic, ``b"FS30"`` (``b"FS21"`` was written by
  Python-2 era ZODB; the transaction layout is the same, so both are accepted
  here for reading).
* Then transaction records follow each other, TIDs strictly increasing.  A
  record starting at ``tpos`` begins with a 23-byte header ``">8sQcHHH"``
  (``TRANS_HDR``): tid, ``tl``, status, user length, description length,
  extension length.  The user name, the description and the extension (a
  pickled dict, ``TransactionMetaData.extension_bytes``) follow, then the data
  records of the transaction, and finally 8 bytes repeating ``tl`` (``">Q"``).
  So the record spans ``[tpos, tpos + tl + 8)`` and, read from its *end*, the
  last 8 bytes give the distance back to its header: that redundant length is
  what makes a backward walk possible.
* Status ``b" "`` is a finished transaction, ``b"p"`` a finished transaction
  kept by a pack, ``b"u"`` a legacy "undone" marker.  ``b"c"`` (checkpoint) is
  written by ``tpc_vote`` and overwritten by ``tpc_finish``: a crash between
  the two leaves an unfinished ``c`` record at the end of the file, which
  FileStorage truncates away when it next opens the file for writing.
* Each data record starts with a 42-byte header ``">8s8sQQHQ"`` (oid, tid,
  prev, tloc, vlen, plen); its tid equals the transaction's and ``tloc`` is the
  offset of the transaction header.  The backward walk checks the first data
  record of each transaction against this, which rejects a trailing length
  that happens to point to plausible-looking bytes.

Why not ``FileStorage(path, read_only=True, stop=tid)``
-------------------------------------------------------

That is the "legacy" way to find the end of the data at a TID (note that
``stop`` is *exclusive*: it keeps TIDs < stop).  It is wrong or slow:

* without ``Data.fs.index`` it runs ``read_index`` from offset 4, which reads
  every transaction header *and every data record header* of the whole file
  and builds a full in-memory index -- seconds to minutes for a big file, just
  to learn one offset;
* with a ``Data.fs.index`` present it starts from the position saved in the
  index, which is (normally) the end of the file, so ``stop`` is silently
  ignored and ``getSize()`` returns the full size -- the wrong cut.
* (and with an unfinished ``c`` record at the end, a read-only FileStorage
  stops before it but reports its TID as ``lastTransaction()``.)

This module never reads the ``.index`` file, so its answers do not depend on
it.

Reading strategy
----------------

The backward walk reads the file with ``os.pread`` into a window -- the last
1 MiB of the file first -- and walks inside it.  When the next header lies
before the window, it reads the 4 KiB that end just after that header (plus a
little for its user/description/extension): they also hold the redundant
length of the previous record and, when transactions are small, several more
records.  So small transactions cost a fraction of a read each and a big one
costs one small read, and object data is never copied.  (Measured on a 1 GiB
file, 1,000 transactions from the end: about 2 ms from the page cache, ~4 MiB
read; larger windows were no faster and read up to 10x more.)  The forward
scan reads 1 MiB blocks.

Damage at the tail (garbage appended, a record torn by a crash while it was
being written, a bad trailing length) stops the backward walk with a
:class:`ScanError`; :func:`find_cut` then falls back to a forward scan from the
start of the file, which stops at the first incomplete/damaged record at the
tail, and says so in :attr:`CutPoint.warning` (and with ``logging.warning``).
Damage *before* the tail is never skipped silently: the forward scan raises
:class:`ScanError`.

The file must not be written to while it is being scanned (the size is taken
once, when the file is opened).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import zodbpickle.pickle
from ZODB.FileStorage.format import DATA_HDR, DATA_HDR_LEN, TRANS_HDR, TRANS_HDR_LEN

from ..core.tids import MAX_TID
from ..errors import ScanError
from .durable import fsync_dir

__all__ = [
    "MAGICS",
    "CutPoint",
    "ScanError",
    "TxnHeader",
    "UnsafeExtensionError",
    "find_cut",
    "iter_backward",
    "iter_forward",
    "last_tid",
    "tail_transactions",
    "truncate_at",
]

logger = logging.getLogger(__name__)

#: File magics accepted for reading ("FS30" is written by ZODB on Python 3).
MAGICS = (b"FS30", b"FS21")
_MAGIC_LEN = 4

_FINISHED = (b" ", b"p", b"u")
_CHECKPOINT = b"c"
_STATUSES = frozenset(_FINISHED + (_CHECKPOINT,))

# Smallest possible record: a header without user/description/extension and
# without data records, plus the redundant length.
_MIN_RECORD = TRANS_HDR_LEN + 8

_unpack_trans_hdr = struct.Struct(TRANS_HDR).unpack
_unpack_trans_hdr_from = struct.Struct(TRANS_HDR).unpack_from
_unpack_u64 = struct.Struct(">Q").unpack
_unpack_u64_from = struct.Struct(">Q").unpack_from
# tid and tloc of a data record header (DATA_HDR: oid, tid, prev, tloc, ...)
_unpack_data_tid_tloc = struct.Struct(">8x8s8xQ").unpack_from
assert DATA_HDR == ">8s8sQQHQ"

# Read-window sizes (module attributes so tests can shrink them).
_BLOCK_FIRST = 1 << 20    # the first read: the last MiB of the file
_BLOCK_BACK = 4 << 10     # later reads walking backward
_BLOCK_FWD = 1 << 20      # reads walking forward (sequential, readahead)
_BIG_RECORD = 256 << 10   # forward: skip such a record with a small read
# Bytes read past a header when a header is fetched walking backward: enough
# for a typical user/description/extension and the first data record header.
_HDR_AHEAD = 512

_pread = os.pread  # indirection so tests can count the bytes read


# ---------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------


class UnsafeExtensionError(ScanError, pickle.UnpicklingError):
    """A transaction extension pickle refers to a global we do not load."""


@dataclass(frozen=True, slots=True)
class TxnHeader:
    """Metadata of one transaction record, as found in the file."""

    pos: int            #: offset of the transaction header
    tid: int            #: transaction id as an unsigned 64-bit integer
    length: int         #: ``tl``: the record spans ``[pos, pos + tl + 8)``
    status: bytes       #: b" ", b"p", b"u" (finished) or b"c" (unfinished)
    end: int            #: ``pos + tl + 8``: offset just after this record
    user: bytes
    description: bytes
    extension: bytes    #: raw, still pickled
    path: str | None = field(default=None, compare=False, repr=False)

    @property
    def tid_bytes(self) -> bytes:
        """The TID as the 8-byte string used by ZODB APIs."""
        return self.tid.to_bytes(8, "big")

    @property
    def finished(self) -> bool:
        return self.status != _CHECKPOINT

    def ext(self) -> dict:
        """The unpickled extension dict (``{}`` if there is none).

        ZODB itself unpickles extensions with an unrestricted unpickler
        (``ZODB._compat.loads``, used by ``TransactionMetaData.extension``);
        this uses the same pickle flavour (zodbpickle, ``encoding="ASCII"``,
        ``errors="bytes"`` for Python-2 strings) but refuses every global
        except ``set``/``frozenset``: a dict of str/bytes/int/float/bool/
        None/list/tuple needs none.  Raises :class:`UnsafeExtensionError`
        (without running anything) for any other global, and
        :class:`ScanError` for an unreadable pickle or a non-dict.
        """
        if not self.extension:
            return {}
        try:
            value = _RestrictedUnpickler(
                io.BytesIO(self.extension), self.path, self.pos).load()
        except UnsafeExtensionError:
            raise
        except Exception as exc:
            raise ScanError(self.path, self.pos,
                            f"unreadable transaction extension: {exc!r}"
                            ) from exc
        if not isinstance(value, dict):
            raise ScanError(self.path, self.pos,
                            "transaction extension is a "
                            f"{type(value).__name__}, not a dict")
        return value


@dataclass(frozen=True)
class CutPoint:
    """Where to truncate a FileStorage to keep the TIDs <= a given TID."""

    offset: int             #: truncate the file to this size
    last_tid: int | None    #: tid of the last kept transaction
    dropped: int            #: transactions after the cut (see find_cut)
    method: str             #: "backward" or "forward"
    warning: str | None     #: e.g. why it fell back to a forward scan


_SAFE_GLOBALS = frozenset({
    ("builtins", "set"), ("builtins", "frozenset"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"),
})


class _RestrictedUnpickler(zodbpickle.pickle.Unpickler):
    """zodbpickle unpickler that resolves no global outside _SAFE_GLOBALS."""

    def __init__(self, file, path, pos):
        super().__init__(file, encoding="ASCII", errors="bytes")
        self._path = path
        self._pos = pos

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return set if name == "set" else frozenset
        raise UnsafeExtensionError(
            self._path, self._pos,
            f"transaction extension refers to {module}.{name}; refused")

    def persistent_load(self, pid):
        raise UnsafeExtensionError(
            self._path, self._pos,
            "transaction extension contains a persistent reference; refused")


# ---------------------------------------------------------------------------
# Low-level reading
# ---------------------------------------------------------------------------


class _Bad(Exception):
    """Internal: the record at this offset is invalid."""


class _Torn(_Bad):
    """Internal: the record at this offset runs past the end of the file."""


class _Reader:
    """A file opened for reading, with one read window ``buf`` at ``start``.

    Walking backward, a miss reads the block that *ends* just after the
    wanted bytes (plus ``_HDR_AHEAD`` for a header's variable part), so the
    preceding records come along: the first read takes the last MiB of the
    file, later ones ``_BLOCK_BACK`` bytes.  When transactions are small one
    such read still covers several of them; when they are big, reading more
    than the area around the next header would only copy object data we do
    not need.  (Measured on a 1 GiB file, 1,000 transactions: 4 KiB reads
    were as fast as any larger size from the page cache and read 2-10x fewer
    bytes.)  Walking forward, blocks of ``_BLOCK_FWD`` bytes start at the
    wanted bytes.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            self.size = os.fstat(self.fd).st_size
            self.buf = b""
            self.start = 0
            self.block = _BLOCK_FIRST
            self.reads = 0
            self.bytes_read = 0
            magic = self._pread(0, _MAGIC_LEN)
            if len(magic) < _MAGIC_LEN:
                raise ScanError(self.path, 0,
                                f"file too small ({self.size} bytes) to be "
                                "a FileStorage")
            if magic not in MAGICS:
                raise ScanError(self.path, 0,
                                f"not a FileStorage: bad magic {magic!r}")
            self.magic = magic
        except BaseException:
            os.close(self.fd)
            raise

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _pread(self, pos, n):
        data = _pread(self.fd, n, pos)
        if len(data) < n and data:      # short read before EOF: finish it
            chunks = [data]
            while n > len(data):
                more = _pread(self.fd, n - len(data), pos + len(data))
                if not more:
                    break
                chunks.append(more)
                data = b"".join(chunks)
        self.reads += 1
        self.bytes_read += len(data)
        return data

    def at_back(self, pos, n, ahead=0):
        """Offset of file position ``pos`` in ``buf``, with ``n`` bytes there
        (fewer only at EOF); a refill keeps what precedes ``pos``."""
        off = pos - self.start
        if off >= 0 and off + n <= len(self.buf):
            return off
        end = min(self.size, pos + n + ahead)
        start = max(0, min(pos, end - self.block))
        self.buf = self._pread(start, end - start)
        self.start = start
        self.block = _BLOCK_BACK
        return pos - start

    def at_fwd(self, pos, n):
        """Like :meth:`at_back`, but a refill keeps what follows ``pos``."""
        off = pos - self.start
        if off >= 0 and off + n <= len(self.buf):
            return off
        self.buf = self._pread(pos, min(self.size - pos, max(n, self.block)))
        self.start = pos
        self.block = _BLOCK_FWD
        return 0

    def back(self, pos, n, ahead=0):
        off = self.at_back(pos, n, ahead)
        return self.buf[off:off + n]

    def fwd(self, pos, n):
        off = self.at_fwd(pos, n)
        return self.buf[off:off + n]

    def peek(self, pos, n):
        """Bytes [pos, pos+n) without replacing the window on a miss."""
        off = pos - self.start
        if off >= 0 and off + n <= len(self.buf):
            return self.buf[off:off + n]
        return self._pread(pos, min(n, max(0, self.size - pos)))

    def error(self, offset, reason):
        return ScanError(self.path, offset, reason)


def _check_record(rd, pos, tidb, tl, status, hlen):
    """Validate a record header (``tl`` already checked against the
    trailing length and the file size); raise _Bad if invalid."""
    if status not in _STATUSES:
        raise _Bad(f"invalid transaction status {status!r}")
    if tl < hlen:
        raise _Bad(f"transaction length {tl} shorter than its header "
                   f"({hlen} bytes)")
    if tl > hlen and status != b"u":
        if tl - hlen < DATA_HDR_LEN:
            raise _Bad(f"{tl - hlen} bytes of data records: too short for a "
                       "data record header")
        dpos = pos + hlen
        off = dpos - rd.start
        if off >= 0 and off + DATA_HDR_LEN <= len(rd.buf):
            dtid, tloc = _unpack_data_tid_tloc(rd.buf, off)
        else:
            dtid, tloc = _unpack_data_tid_tloc(rd.peek(dpos, DATA_HDR_LEN))
        if dtid != tidb or tloc != pos:
            raise _Bad("first data record does not belong to this "
                       "transaction (tid or transaction offset mismatch)")


def _read_record(rd, pos, backward, trailer_tl=None):
    """Parse and validate the transaction record at ``pos``.

    ``trailer_tl`` is the redundant length at the end of the record when the
    caller has already read it (walking backward).  Raises _Torn if the
    record does not fit in the file, _Bad if it is invalid.  Does not check
    the TID order (the callers do).
    """
    if backward:
        raw = rd.back(pos, TRANS_HDR_LEN, _HDR_AHEAD)
    else:
        raw = rd.fwd(pos, TRANS_HDR_LEN)
    if len(raw) < TRANS_HDR_LEN:
        raise _Torn(f"incomplete transaction header "
                    f"({rd.size - pos} bytes left)")
    tidb, tl, status, ul, dl, el = _unpack_trans_hdr(raw)
    end = pos + tl + 8
    if end > rd.size:
        raise _Torn(f"transaction record (length {tl}) runs past the end "
                    f"of the file ({rd.size - pos} bytes left)")
    hlen = TRANS_HDR_LEN + ul + dl + el
    _check_record(rd, pos, tidb, tl, status, hlen)
    if not backward and tl >= _BIG_RECORD:
        rd.block = _BLOCK_BACK      # don't copy a big record's data
    if trailer_tl is not None:
        rtl = trailer_tl
    elif backward:
        (rtl,) = _unpack_u64(rd.peek(end - 8, 8))
    else:
        (rtl,) = _unpack_u64(rd.fwd(end - 8, 8))
    if rtl != tl:
        raise _Bad(f"redundant transaction length {rtl} at offset {end - 8} "
                   f"does not match the header's {tl}")
    return _make_header(rd, pos, tidb, tl, status, ul, dl, el)


def _make_header(rd, pos, tidb, tl, status, ul, dl, el):
    var = rd.peek(pos + TRANS_HDR_LEN, ul + dl + el)
    return TxnHeader(
        pos=pos,
        tid=int.from_bytes(tidb, "big"),
        length=tl,
        status=status,
        end=pos + tl + 8,
        user=var[:ul],
        description=var[ul:ul + dl],
        extension=var[ul + dl:],
        path=rd.path,
    )


def _scan_backward(rd):
    """Validated records from the end: (pos, tidb, tl, status, ul, dl, el).

    The hot loop of find_cut: no TxnHeader objects, unpacking in place in
    the read window; the checks are those of _check_record, inlined, which
    is called on failure to describe the problem.
    """
    size = rd.size
    end = size
    next_tidb = b"\xff" * 9        # sorts after every 8-byte tid
    buf, bstart = rd.buf, rd.start
    blen = len(buf)
    at_back = rd.at_back
    statuses = _STATUSES
    while end > _MAGIC_LEN:
        if end - _MAGIC_LEN < _MIN_RECORD:
            raise rd.error(end, f"{end - _MAGIC_LEN} bytes before this "
                                "offset: too few for a transaction record")
        off = end - 8 - bstart
        if off < 0 or off + 8 > blen:
            off = at_back(end - 8, 8)
            buf, bstart = rd.buf, rd.start
            blen = len(buf)
        (tl,) = _unpack_u64_from(buf, off)
        pos = end - 8 - tl
        if tl < TRANS_HDR_LEN or pos < _MAGIC_LEN:
            raise rd.error(end - 8, f"implausible redundant transaction "
                                    f"length {tl}")
        off = pos - bstart
        if off < 0 or off + TRANS_HDR_LEN > blen:
            off = at_back(pos, TRANS_HDR_LEN, _HDR_AHEAD)
            buf, bstart = rd.buf, rd.start
            blen = len(buf)
        tidb, htl, status, ul, dl, el = _unpack_trans_hdr_from(buf, off)
        hlen = TRANS_HDR_LEN + ul + dl + el
        if htl != tl:
            raise rd.error(pos, f"transaction length {htl} in the header "
                                f"does not match the redundant length {tl} "
                                f"(record ending at {end})")
        good = status in statuses and tl >= hlen
        if good and tl > hlen and status != b"u":
            doff = off + hlen
            if tl - hlen < DATA_HDR_LEN:
                good = False
            elif doff + DATA_HDR_LEN <= blen:
                good = _unpack_data_tid_tloc(buf, doff) == (tidb, pos)
            else:
                good = _unpack_data_tid_tloc(
                    rd.peek(pos + hlen, DATA_HDR_LEN)) == (tidb, pos)
        if not good:
            try:
                _check_record(rd, pos, tidb, tl, status, hlen)
                reason = "invalid transaction record"  # pragma: no cover
            except _Bad as exc:
                reason = str(exc)
            raise rd.error(pos, f"{reason} (record ending at {end})")
        if status == _CHECKPOINT and end != size:
            raise rd.error(pos, "unfinished ('c') transaction before the "
                                "end of the file")
        if tidb >= next_tidb:
            raise rd.error(pos, f"tid {tidb.hex()} is not lower than the "
                                f"next transaction's {next_tidb.hex()}")
        yield pos, tidb, tl, status, ul, dl, el
        next_tidb = tidb
        end = pos


def _walk_backward(rd) -> Iterator[TxnHeader]:
    for rec in _scan_backward(rd):
        yield _make_header(rd, *rec)


def _tail_is_damage(rd, pos):
    """True unless a valid record after ``pos`` ends at the end of file.

    Used when the forward scan meets an invalid record at ``pos``: if the
    file still ends with a sound record that starts after ``pos``, the damage
    is in the middle of the file and must not be skipped; otherwise
    everything from ``pos`` on is a damaged tail (what FileStorage's own
    ``read_index`` concludes, with the same test on the last 8 bytes).
    """
    if rd.size - pos < 2 * _MIN_RECORD:
        return True
    (rtl,) = _unpack_u64(rd.peek(rd.size - 8, 8))
    q = rd.size - 8 - rtl
    if rtl < TRANS_HDR_LEN or q <= pos:
        return True
    try:
        _read_record(rd, q, backward=True, trailer_tl=rtl)
    except _Bad:
        return True
    return False


def _walk_forward(rd, start=_MAGIC_LEN) -> Iterator[TxnHeader]:
    if start < _MAGIC_LEN or start > rd.size:
        raise rd.error(start, f"start offset outside the file "
                              f"(size {rd.size})")
    pos = start
    prev_tid = None
    while pos < rd.size:
        try:
            h = _read_record(rd, pos, backward=False)
            if prev_tid is not None and h.tid <= prev_tid:
                raise _Bad(f"tid {h.tid:#018x} is not greater than the "
                           f"previous transaction's {prev_tid:#018x}")
        except _Bad as exc:
            # Also for a record running past the end of the file (_Torn):
            # a corrupted length in the middle looks the same.
            if _tail_is_damage(rd, pos):
                logger.debug("%s: forward scan stops at damaged tail at %d: "
                             "%s", rd.path, pos, exc)
                return
            raise rd.error(pos, str(exc)) from None
        yield h
        if h.status == _CHECKPOINT:
            # Unfinished: FileStorage stops reading here too.
            return
        prev_tid = h.tid
        pos = h.end


def _as_tid(tid) -> int:
    if isinstance(tid, (bytes, bytearray)):
        if len(tid) != 8:
            raise ValueError(f"a TID is 8 bytes, got {len(tid)}")
        return int.from_bytes(tid, "big")
    tid = int(tid)
    if not 0 <= tid <= MAX_TID:
        raise ValueError(f"TID out of range: {tid}")
    return tid


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def iter_backward(path) -> Iterator[TxnHeader]:
    """Transaction records from the end of the file to its start.

    Follows the redundant length at the end of each record and validates each
    one (length sane, status valid, header length equals the trailing one,
    first data record belongs to it, TID lower than the next record's, a
    ``c`` status only for the last record).  Raises :class:`ScanError` at the
    first inconsistency -- typically damage at the tail; see
    :func:`iter_forward` for a scan that tolerates it.
    """
    with _Reader(path) as rd:
        yield from _walk_backward(rd)


def iter_forward(path, start: int = 4) -> Iterator[TxnHeader]:
    """Transaction records from ``start`` (a record boundary) to the end.

    Each record is validated like in :func:`iter_backward`, TIDs must
    increase.  Stops quietly at an incomplete or damaged tail (a torn last
    record, garbage after the last record) and after an unfinished (``c``)
    record, which it yields.  The damage is taken for a damaged tail unless
    the file still *ends* with a sound record starting after it (the test
    FileStorage's ``read_index`` makes); then it is corruption before the
    tail and :class:`ScanError` is raised.
    """
    with _Reader(path) as rd:
        yield from _walk_forward(rd, start)


def find_cut(path, tid) -> CutPoint:
    """Where to truncate ``path`` to keep exactly the transactions <= ``tid``.

    Walks backward from the end of the file until the first finished
    transaction whose TID is <= ``tid``; the cut is at the end of that record
    (or at 4, just after the magic, if there is none).  ``dropped`` counts the
    records after the cut, including a trailing unfinished (``c``) record, and
    one more for an incomplete or damaged tail.  If the backward walk meets an
    inconsistency, falls back to a forward scan from the start, with a
    ``warning`` (also logged); that scan raises :class:`ScanError` if the
    damage is not at the tail.  ``tid`` is an int (or 8 bytes).

    The cost of the backward walk grows with the number of transactions
    after the cut, not with the size of the file.  The ``.index`` file is
    never read.
    """
    tid = _as_tid(tid)
    with _Reader(path) as rd:
        dropped = 0
        try:
            tidb = tid.to_bytes(8, "big")
            for pos, htid, tl, status, _u, _d, _e in _scan_backward(rd):
                if status != _CHECKPOINT and htid <= tidb:
                    return CutPoint(pos + tl + 8, int.from_bytes(htid, "big"),
                                    dropped, "backward", None)
                dropped += 1
            return CutPoint(_MAGIC_LEN, None, dropped, "backward", None)
        except ScanError as exc:
            reason = f"at offset {exc.offset}: {exc.reason}"

        offset, kept, after, last_end = _MAGIC_LEN, None, 0, _MAGIC_LEN
        for h in _walk_forward(rd):
            if h.status != _CHECKPOINT and h.tid <= tid:
                offset, kept, after = h.end, h.tid, 0
            else:
                after += 1
            last_end = h.end
        tail = rd.size - last_end
        warning = (f"{rd.path}: backward scan failed {reason}; "
                   "fell back to a forward scan from the start of the file")
        if tail:
            after += 1
            warning += (f"; ignored {tail} bytes of incomplete or damaged "
                        f"data at offset {last_end}")
        logger.warning("%s", warning)
        return CutPoint(offset, kept, after, "forward", warning)


def tail_transactions(path, since_tid=None, limit=None) -> list[TxnHeader]:
    """Finished transactions with TID > ``since_tid``, oldest first.

    Read backward from the end of the file (an unfinished trailing ``c``
    record is skipped).  With ``limit``, at most the ``limit`` newest ones.
    A damaged tail makes it fall back to a forward scan (logged).
    """
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    since = None if since_tid is None else _as_tid(since_tid)
    if limit == 0:
        return []
    with _Reader(path) as rd:
        out = []
        sinceb = None if since is None else since.to_bytes(8, "big")
        try:
            for rec in _scan_backward(rd):
                if rec[3] == _CHECKPOINT:
                    continue
                if sinceb is not None and rec[1] <= sinceb:
                    break
                out.append(_make_header(rd, *rec))
                if limit is not None and len(out) >= limit:
                    break
            out.reverse()
            return out
        except ScanError as exc:
            logger.warning("%s; falling back to a forward scan of %s",
                           exc, rd.path)
        fwd = deque(maxlen=limit)
        for h in _walk_forward(rd):
            if h.status != _CHECKPOINT and (since is None or h.tid > since):
                fwd.append(h)
        return list(fwd)


def last_tid(path) -> int | None:
    """TID of the last finished transaction, or None for an empty storage."""
    tail = tail_transactions(path, limit=1)
    return tail[0].tid if tail else None


# Files FileStorage keeps next to Data.fs that describe its *content* and
# become stale when the file is truncated.  Not removed: ".lock" (a
# zc.lockfile that a live process may hold; its content is just a pid) and
# ".tmp" (the commit scratch file, reopened with "w+b" -- i.e. emptied -- by
# every writable FileStorage and never read at startup), nor ".old"/".pack"
# (pack leftovers that are whole files of their own).
_STALE_SUFFIXES = (".index", ".index.index_tmp")


def truncate_at(path, offset: int) -> None:
    """Truncate the FileStorage ``path`` to ``offset`` bytes, durably.

    Low level: the caller has made any safety copy.  ``offset`` must be a
    record boundary (4, or the end of a finished transaction record: this is
    checked).  When the size changes, the now stale ``path + ".index"`` (and
    a leftover ``.index.index_tmp``) is removed first, then the file is
    truncated and fsync'ed.  (FileStorage ignores an index whose saved
    position lies past the end of the file, but once new commits have grown
    the file past it again, only a sanity check of a few records stands
    between it and wrong object positions; without an index it simply
    rebuilds one.)  Does nothing if the file already has that size.
    """
    path = os.fspath(path)
    with _Reader(path) as rd:
        size = rd.size
        if not _MAGIC_LEN <= offset <= size:
            raise ValueError(f"{path}: cannot truncate a {size}-byte file to "
                             f"{offset} bytes")
        if offset == size:
            return
        if offset > _MAGIC_LEN:
            (tl,) = _unpack_u64(rd.peek(offset - 8, 8))
            pos = offset - 8 - tl
            if tl < TRANS_HDR_LEN or pos < _MAGIC_LEN:
                raise rd.error(offset, "not the end of a transaction record")
            try:
                h = _read_record(rd, pos, backward=True, trailer_tl=tl)
            except _Bad as exc:
                raise rd.error(offset, "not the end of a transaction record: "
                                       f"{exc}") from None
            if h.end != offset or h.status == _CHECKPOINT:
                raise rd.error(offset, "not the end of a finished transaction "
                                       "record")

    removed = []
    for suffix in _STALE_SUFFIXES:
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            continue
        removed.append(path + suffix)
    if removed:
        # Durable before the truncation: a crash must not leave a stale
        # index beside the cut file (raises OSError: then nothing is cut).
        fsync_dir(os.path.dirname(os.path.abspath(path)))

    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    logger.info("%s: truncated from %d to %d bytes%s", path, size, offset,
                f" (removed {', '.join(removed)})" if removed else "")
