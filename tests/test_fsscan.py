"""Tests for tidstorage.formats.filestorage with real FileStorage files written by ZODB."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import transaction
from persistent.mapping import PersistentMapping
from ZODB import DB
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.FileStorage.FileStorage import FileIterator
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64, z64

from tidstorage.formats import filestorage
from tidstorage.formats.filestorage import (
    CutPoint,
    ScanError,
    TxnHeader,
    UnsafeExtensionError,
)

MAXTID = (1 << 64) - 1


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    """FileStorage fsyncs every commit; not needed to build test files."""
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"],
                        "fsync", None)


# ---------------------------------------------------------------------------
# Building real storages
# ---------------------------------------------------------------------------


def _commit(storage, tids, user="", desc="", ext=None, raw_ext=None):
    t = transaction.get()
    if user:
        t.user = user
    if desc:
        t.note(desc)
    for k, v in (ext or {}).items():
        t.setExtendedInfo(k, v)
    for k, v in (raw_ext or {}).items():
        t.extension[k] = v
    t.commit()
    tids.append(u64(storage.lastTransaction()))


def _storage_txn(storage, tids, stores=(), user=b"", desc=b"", ext=b""):
    """Commit directly through the storage API (no DB): exact control."""
    t = TransactionMetaData(user, desc, ext)
    storage.tpc_begin(t)
    for oid, serial, data in stores:
        storage.store(oid, serial, data, "", t)
    storage.tpc_vote(t)
    tid = storage.tpc_finish(t)
    tids.append(u64(tid))
    return tid


def build_rich_storage(path, seed=0):
    """A FileStorage with varied transactions; returns the list of tids.

    Small and big (> 1 MiB) records, user/description/extension metadata, a
    long description, an empty transaction, an undo (back pointers), a
    transaction with many objects.  Closed cleanly, so a .index is saved.
    """
    import random
    rnd = random.Random(seed)
    storage = FileStorage(str(path))
    db = DB(storage)
    tids = [u64(storage.lastTransaction())]  # "initial database creation"
    conn = db.open()
    root = conn.root()

    root["a"] = PersistentMapping(n=0)
    _commit(storage, tids, "alice", "first object",
            {"request": "/app/edit", "n": 1})
    root["big"] = PersistentMapping(blob=rnd.randbytes(2_500_000))
    _commit(storage, tids, "bob", "a 2.5 MB object")
    for i in range(12):
        root["a"]["n"] = i
        root[f"o{i}"] = PersistentMapping(data=rnd.randbytes(
            rnd.choice([0, 10, 300, 5_000, 70_000, 400_000])))
        _commit(storage, tids, f"user{i}", f"step {i}", {"i": i})
    root["many"] = PersistentMapping(
        {f"m{j}": PersistentMapping(j=j) for j in range(60)})
    _commit(storage, tids, "carol", "sixty objects",
            raw_ext={"nested": {"list": [1, 2.5, None, True, False],
                                "tuple": ("x", b"\x00\xff"),
                                "unicode": "\u00e9\u4e2d"},
                     "n": -7})
    root["a"]["n"] = 100
    _commit(storage, tids, "dave", "x" * 3000, {"long": "y" * 2000})
    _storage_txn(storage, tids, user=b"eve", desc=b"empty transaction",
                 ext=TransactionMetaData(extension={"empty": 1})
                 .extension_bytes)
    root["a"]["n"] = 101
    _commit(storage, tids, "frank", "to be undone")
    undo_id = db.undoLog(0, 1)[0]["id"]
    db.undo(undo_id)
    _commit(storage, tids, "frank", "undo it")
    root["big"]["blob"] = rnd.randbytes(1_200_000)
    _commit(storage, tids, "gina", "another big one")
    for i in range(5):
        root["a"]["n"] = 200 + i
        _commit(storage, tids, desc=f"tail {i}")
    conn.close()
    db.close()
    return tids


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """(path of a pristine Data.fs + .index, tids, reference records)."""
    d = tmp_path_factory.mktemp("rich")
    path = d / "Data.fs"
    tids = build_rich_storage(path)
    assert os.path.exists(str(path) + ".index")
    refs = reference_records(path)
    assert [r[0] for r in refs] == tids
    return str(path), tids, refs


def reference_records(path):
    """[(tid, tpos, end)] from ZODB's own forward FileIterator."""
    it = FileIterator(str(path))
    try:
        return [(u64(rec.tid), rec._tpos, rec._tend + 8) for rec in it]
    finally:
        it.close()


def expected_cut(refs, tid):
    """(offset, last_tid, dropped) computed from the forward reference."""
    kept = [r for r in refs if r[0] <= tid]
    if not kept:
        return 4, None, len(refs)
    return kept[-1][2], kept[-1][0], len(refs) - len(kept)


def candidate_tids(tids):
    cands = {0, 1, MAXTID, tids[0] - 1, tids[-1] + 1}
    for t in tids:
        cands.update((t - 1, t, t + 1))
    return sorted(c for c in cands if 0 <= c <= MAXTID)


def copy_data_fs(src, dst_dir, with_index=False):
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(str(dst_dir), "Data.fs")
    shutil.copyfile(src, dst)
    if with_index:
        shutil.copyfile(src + ".index", dst + ".index")
    return dst


def legacy_size(path, tid):
    """The legacy cut: FileStorage(stop=) (stop is exclusive)."""
    fs = FileStorage(path, read_only=True, stop=p64(tid + 1))
    try:
        return fs.getSize()
    finally:
        fs.close()


def all_oids(storage):
    oids, nxt = [], None
    while True:
        oid, _tid, _data, nxt = storage.record_iternext(nxt)
        oids.append(oid)
        if nxt is None:
            return oids


@pytest.fixture(params=["default-blocks", "tiny-blocks"])
def blocks(request, monkeypatch):
    """Run with the real read windows and with absurdly small ones."""
    if request.param == "tiny-blocks":
        monkeypatch.setattr(filestorage, "_BLOCK_FIRST", 64)
        monkeypatch.setattr(filestorage, "_BLOCK_BACK", 40)
        monkeypatch.setattr(filestorage, "_BLOCK_FWD", 50)
        monkeypatch.setattr(filestorage, "_BIG_RECORD", 100)
        monkeypatch.setattr(filestorage, "_HDR_AHEAD", 0)
    return request.param


# ---------------------------------------------------------------------------
# find_cut against independent references
# ---------------------------------------------------------------------------


def test_find_cut_matches_forward_reference_for_every_tid(rich, tmp_path,
                                                           blocks):
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path)  # no .index
    for tid in candidate_tids(tids):
        cut = filestorage.find_cut(path, tid)
        offset, kept, dropped = expected_cut(refs, tid)
        assert isinstance(cut, CutPoint)
        assert (cut.offset, cut.last_tid, cut.dropped) == \
            (offset, kept, dropped), hex(tid)
        assert cut.method == "backward" and cut.warning is None
    # tid given as 8 bytes works too
    assert filestorage.find_cut(path, p64(tids[3])).last_tid == tids[3]


def test_find_cut_matches_legacy_filestorage_stop_without_index(rich,
                                                                tmp_path):
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path)
    assert not os.path.exists(path + ".index")
    for tid in candidate_tids(tids):
        if tid == MAXTID:
            continue
        assert filestorage.find_cut(path, tid).offset == legacy_size(path, tid)
    # read-only opens do not write an index
    assert not os.path.exists(path + ".index")


@pytest.mark.parametrize("which", ["all", "between"])
def test_truncated_copy_opens_at_expected_tid(rich, tmp_path, which):
    src, tids, refs = rich
    original = FileStorage(src, read_only=True)
    try:
        orig_oids = all_oids(original)
        targets = tids if which == "all" else [t + 1 for t in tids[:-1]]
        for n, tid in enumerate(targets):
            path = copy_data_fs(src, tmp_path / f"{which}{n}",
                                with_index=(n % 2 == 0))
            cut = filestorage.find_cut(path, tid)
            filestorage.truncate_at(path, cut.offset)
            assert os.path.getsize(path) == cut.offset
            # a stale index is removed when the size changes
            assert not os.path.exists(path + ".index") or cut.dropped == 0
            expected_last = max(t for t in tids if t <= tid)
            assert cut.last_tid == expected_last

            fs = FileStorage(path, read_only=True)
            try:
                assert u64(fs.lastTransaction()) == expected_last
                assert fs.getSize() == cut.offset
                for oid in orig_oids:
                    before = original.loadBefore(oid, p64(expected_last + 1))
                    if before is None:
                        with pytest.raises(POSKeyError):
                            fs.load(oid)
                        continue
                    data, serial = fs.load(oid)
                    assert (data, serial) == before[:2]
            finally:
                fs.close()

            # Opening for writing needs no repair (no .trN file) and the
            # application objects load through a DB.
            fs = FileStorage(path)
            db = DB(fs)
            try:
                assert fs.getSize() == cut.offset
                conn = db.open()
                root = conn.root()
                for value in root.values():
                    value._p_activate()
                    for sub in value.values():
                        if isinstance(sub, PersistentMapping):
                            sub._p_activate()
                conn.close()
            finally:
                db.close()
            assert not [f for f in os.listdir(os.path.dirname(path))
                        if ".tr" in f]
    finally:
        original.close()


def test_index_present_legacy_is_wrong_find_cut_is_right(rich, tmp_path):
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path, with_index=True)
    size = os.path.getsize(path)
    middle = tids[len(tids) // 2]
    offset, kept, dropped = expected_cut(refs, middle)
    assert offset < size
    # The legacy approach ignores stop= when an index exists: full size.
    assert legacy_size(path, middle) == size
    cut = filestorage.find_cut(path, middle)
    assert (cut.offset, cut.last_tid, cut.dropped) == (offset, kept, dropped)
    # and without the index the legacy approach agrees with us
    os.remove(path + ".index")
    assert legacy_size(path, middle) == offset


# ---------------------------------------------------------------------------
# Unfinished ('c') records and damaged tails
# ---------------------------------------------------------------------------


CRASH_AT_VOTE = textwrap.dedent("""
    import os, sys
    from ZODB.FileStorage import FileStorage
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import z64
    fs = FileStorage(sys.argv[1])
    t = TransactionMetaData(b"crash", b"voted, never finished")
    fs.tpc_begin(t)
    fs.store(fs.new_oid(), z64, b"x" * 5000, "", t)
    fs.store(fs.new_oid(), z64, b"y" * 100, "", t)
    fs.tpc_vote(t)
    os._exit(0)   # like a kill -9 between vote and finish
""")


@pytest.fixture
def crashed(rich, tmp_path):
    """A copy of the rich storage killed between tpc_vote and tpc_finish."""
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path)
    good_size = os.path.getsize(path)
    subprocess.run([sys.executable, "-c", CRASH_AT_VOTE, path], check=True)
    assert os.path.getsize(path) > good_size
    return path, good_size, tids, refs


def test_trailing_checkpoint_record_is_dropped(crashed):
    path, good_size, tids, refs = crashed
    # what a crash at vote leaves behind
    assert os.path.exists(path + ".tmp") and os.path.exists(path + ".lock")
    back = list(filestorage.iter_backward(path))
    assert back[0].status == b"c" and back[0].pos == good_size
    assert back[0].end == os.path.getsize(path)
    assert back[0].tid > tids[-1] and back[0].user == b"crash"
    assert [h.tid for h in back[1:]][::-1] == tids
    fwd = list(filestorage.iter_forward(path))
    assert fwd[-1].status == b"c" and fwd[:-1] == back[1:][::-1]

    for tid in (tids[-1], back[0].tid, MAXTID):
        cut = filestorage.find_cut(path, tid)
        assert cut == CutPoint(good_size, tids[-1], 1, "backward", None)
    cut = filestorage.find_cut(path, tids[-3])
    assert (cut.offset, cut.dropped) == (refs[-3][2], 3)

    assert filestorage.last_tid(path) == tids[-1]
    assert [h.tid for h in filestorage.tail_transactions(path)] == tids
    assert [h.tid for h in filestorage.tail_transactions(path, limit=2)] == \
        tids[-2:]

    # A read-only FileStorage stops its scan before the 'c' record too, but
    # (read_index quirk) reports the unfinished transaction as the last one.
    fs = FileStorage(path, read_only=True)
    assert fs.getSize() == good_size
    assert u64(fs.lastTransaction()) == back[0].tid != tids[-1]
    fs.close()

    # the 'c' record is no place to cut, the end of the last finished one is
    with pytest.raises(ScanError):
        filestorage.truncate_at(path, os.path.getsize(path) - 1)
    filestorage.truncate_at(path, good_size)
    fs = FileStorage(path)  # writable: nothing left to repair
    assert u64(fs.lastTransaction()) == tids[-1]
    fs.close()
    assert not os.path.exists(path + ".tr0")


def _damage(path, kind, refs):
    """Damage the tail of ``path``; return the reference records kept."""
    size = os.path.getsize(path)
    last_tid, last_pos, last_end = refs[-1]
    assert last_end == size
    with open(path, "r+b") as f:
        if kind == "garbage":
            f.seek(0, 2)
            f.write(os.urandom(1000))
            return refs
        if kind == "zeros":          # size extended, data never written
            f.seek(0, 2)
            f.write(b"\0" * 4096)
            return refs
        if kind == "few-bytes":
            f.seek(0, 2)
            f.write(b"\x01\x02\x03\x04\x05")
            return refs
        if kind == "fake-trailer":   # ends with a length pointing at a header
            f.seek(0, 2)
            junk = b"j" * 100
            f.write(junk + struct.pack(">Q", len(junk) + (size - last_pos)))
            return refs
        if kind == "torn-last":      # last record only half written
            f.truncate(last_pos + (last_end - last_pos) // 2)
            return refs[:-1]
        if kind == "torn-header":
            f.truncate(last_pos + 10)
            return refs[:-1]
        if kind == "bad-trailer":    # redundant length of the last record
            f.seek(size - 8)
            f.write(struct.pack(">Q", last_end - last_pos - 8 + 16))
            return refs[:-1]
        if kind == "bad-status":
            f.seek(last_pos + 16)
            f.write(b"X")
            return refs[:-1]
    raise AssertionError(kind)


DAMAGES = ["garbage", "zeros", "few-bytes", "fake-trailer", "torn-last",
           "torn-header", "bad-trailer", "bad-status"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_tail_falls_back_to_forward_scan(rich, tmp_path, kind, caplog,
                                                 blocks):
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path)
    kept_refs = _damage(path, kind, refs)
    size = os.path.getsize(path)
    with pytest.raises(ScanError) as exc_info:
        list(filestorage.iter_backward(path))
    assert path in str(exc_info.value)
    assert exc_info.value.offset is not None

    assert [(h.tid, h.pos, h.end) for h in filestorage.iter_forward(path)] == \
        kept_refs

    for tid in (tids[-1], MAXTID, tids[-4], tids[0] - 1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tidstorage.formats.filestorage"):
            cut = filestorage.find_cut(path, tid)
        offset, kept, dropped = expected_cut(kept_refs, tid)
        tail = size - kept_refs[-1][2]
        assert tail > 0
        assert (cut.offset, cut.last_tid, cut.dropped) == \
            (offset, kept, dropped + 1)
        assert cut.method == "forward"
        assert "forward scan" in cut.warning and str(tail) in cut.warning
        assert any("forward scan" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING)

    assert filestorage.last_tid(path) == kept_refs[-1][0]
    assert [h.tid for h in filestorage.tail_transactions(path, tids[-4])] == \
        [r[0] for r in kept_refs if r[0] > tids[-4]]
    assert [h.tid for h in filestorage.tail_transactions(path, limit=3)] == \
        [r[0] for r in kept_refs[-3:]]

    # after truncation at the cut the file is clean again
    cut = filestorage.find_cut(path, MAXTID)
    filestorage.truncate_at(path, cut.offset)
    assert filestorage.find_cut(path, MAXTID).method == "backward"
    fs = FileStorage(path, read_only=True)
    assert u64(fs.lastTransaction()) == kept_refs[-1][0]
    fs.close()


def test_crash_during_vote_write_torn_checkpoint(crashed):
    """The 'c' record itself torn (the crash hit while it was written)."""
    path, good_size, tids, refs = crashed
    os.truncate(path, good_size + 3000)
    cut = filestorage.find_cut(path, MAXTID)
    assert (cut.offset, cut.last_tid, cut.dropped, cut.method) == \
        (good_size, tids[-1], 1, "forward")


@pytest.mark.parametrize("how", ["trailer", "header-length", "status"])
def test_mid_file_corruption_is_not_skipped(rich, tmp_path, how):
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path)
    k = len(refs) // 2
    _tid, pos, end = refs[k]
    with open(path, "r+b") as f:
        if how == "trailer":            # record k's redundant length
            f.seek(end - 8)
            f.write(struct.pack(">Q", 12345))
        elif how == "header-length":    # now runs past the end of the file
            f.seek(pos + 8)
            f.write(struct.pack(">Q", 1 << 40))
        else:
            f.seek(pos + 16)
            f.write(b"?")
    # cuts after the damage never look at it
    for tid in tids[k + 1:]:
        cut = filestorage.find_cut(path, tid)
        assert (cut.offset, cut.method) == (expected_cut(refs, tid)[0],
                                            "backward")
    # a cut before it cannot be trusted: the forward scan refuses too
    # instead of taking the rest of the file for a damaged tail
    with pytest.raises(ScanError) as exc_info:
        filestorage.find_cut(path, tids[k - 1])
    assert exc_info.value.offset == pos
    with pytest.raises(ScanError):
        list(filestorage.iter_forward(path))
    with pytest.raises(ScanError):
        list(filestorage.iter_backward(path))
    with pytest.raises(ScanError):
        filestorage.tail_transactions(path, since_tid=tids[k - 1])
    assert [h.tid for h in filestorage.tail_transactions(path, tids[k + 1])] == \
        tids[k + 2:]


def test_torn_at_every_kind_of_position(rich, tmp_path):
    """Cut the file short anywhere in its last records, or append junk of
    any length: find_cut always lands on the last complete record."""
    import random
    rnd = random.Random(1)
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path)
    first = refs[-4][1]
    cuts = set(rnd.sample(range(first, refs[-1][2]), 60))
    for _tid, pos, end in refs[-4:]:    # around each header and trailer
        cuts.update(range(pos, pos + 60))
        cuts.update(range(end - 12, end))
    for size in sorted(cuts, reverse=True):
        os.truncate(path, size)
        complete = [r for r in refs if r[2] <= size]
        cut = filestorage.find_cut(path, MAXTID)
        assert (cut.offset, cut.last_tid) == \
            (complete[-1][2], complete[-1][0]), size
        assert cut.method == ("backward" if size == complete[-1][2]
                              else "forward")
        assert cut.dropped == (0 if size == complete[-1][2] else 1)
    path = copy_data_fs(src, tmp_path)
    for n in list(range(1, 80)) + [500, 5000]:
        with open(path, "ab") as f:
            f.write(rnd.randbytes(n))
        cut = filestorage.find_cut(path, MAXTID)
        assert (cut.offset, cut.last_tid, cut.method) == \
            (refs[-1][2], tids[-1], "forward"), n
        os.truncate(path, refs[-1][2])


def test_cost_grows_with_transactions_after_the_cut(tmp_path, monkeypatch):
    """Bytes read depend on what follows the cut, not on the file size."""
    path = str(tmp_path / "Data.fs")
    fs = FileStorage(path)
    tids = []
    payload = os.urandom(200_000)
    oids = [fs.new_oid() for _ in range(4)]
    serials = [z64] * 4
    for i in range(150):                       # ~30 MB
        j = i % 4
        tid = _storage_txn(fs, tids, [(oids[j], serials[j],
                                       payload[i:] + payload[:i])],
                           desc=b"big %d" % i)
        serials[j] = tid
    for i in range(300):                       # then small transactions
        j = i % 4
        tid = _storage_txn(fs, tids, [(oids[j], serials[j], b"s%d" % i)])
        serials[j] = tid
    fs.close()
    size = os.path.getsize(path)
    assert size > 30_000_000

    counted = []
    real_pread = os.pread

    def counting_pread(fd, n, pos):
        data = real_pread(fd, n, pos)
        counted.append(len(data))
        return data

    monkeypatch.setattr(filestorage, "_pread", counting_pread)

    def cost(tid):
        counted.clear()
        cut = filestorage.find_cut(path, tid)
        assert cut.method == "backward"
        return cut, len(counted), sum(counted)

    cut, reads, nbytes = cost(tids[-10])
    assert cut.dropped == 9
    assert reads == 2 and nbytes <= 2**20 + 4     # magic + the last MiB
    cut, reads, nbytes = cost(tids[-300])          # all small ones
    assert cut.dropped == 299 and reads == 2
    cut, reads, nbytes = cost(tids[-350])          # 50 big ones too
    assert cut.dropped == 349
    # ~10 MB of records skipped, only a small block read around each header
    assert reads < 60 and nbytes < 1.5 * 2**20
    cut, reads, nbytes = cost(0)                   # whole file, still cheap
    assert cut.offset == 4 and cut.dropped == len(tids)
    assert reads < 200 and nbytes < 2 * 2**20 < size / 10


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------


def test_metadata_and_ext_match_zodb(rich, blocks):
    src, tids, refs = rich
    ours = {h.tid: h for h in filestorage.iter_backward(src)}
    assert sorted(ours) == tids
    it = FileIterator(src)
    try:
        for rec in it:
            h = ours[u64(rec.tid)]
            assert isinstance(h, TxnHeader)
            assert h.user == rec.user
            assert h.description == rec.description
            assert h.extension == rec.extension_bytes
            assert h.ext() == rec.extension
            assert h.status == rec.status.encode() == b" "
            assert h.tid_bytes == rec.tid
            assert h.end == h.pos + h.length + 8
    finally:
        it.close()

    by_desc = {h.description: h for h in ours.values()}
    assert by_desc[b"first object"].ext() == {"request": "/app/edit", "n": 1}
    assert b"alice" in by_desc[b"first object"].user
    assert by_desc[b"sixty objects"].ext() == {
        "nested": {"list": [1, 2.5, None, True, False],
                   "tuple": ("x", b"\x00\xff"),
                   "unicode": "\u00e9\u4e2d"},
        "n": -7}
    assert by_desc[b"x" * 3000].ext() == {"long": "y" * 2000}
    assert by_desc[b"empty transaction"].ext() == {"empty": 1}
    assert by_desc[b"empty transaction"].length == \
        23 + len(b"eve") + len(b"empty transaction") + len(
            by_desc[b"empty transaction"].extension)
    assert by_desc[b"tail 0"].ext() == {}
    assert by_desc[b"initial database creation"].extension == b""
    assert by_desc[b"initial database creation"].ext() == {}


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _evil_extensions(marker):
    cmd = f"touch {marker}"
    return {
        "reduce-protocol-3": pickle.dumps({"x": _Evil(cmd)}, protocol=3),
        "reduce-protocol-2": pickle.dumps({"x": _Evil(cmd)}, protocol=2),
        "reduce-protocol-0": pickle.dumps(_Evil(cmd), protocol=0),
        "handmade-global": b"cos\nsystem\n(S'" + cmd.encode() + b"'\ntR.",
        "builtins-eval": b"c__builtin__\neval\n(S'__import__(\"os\")"
                         b".system(\"" + cmd.encode() + b"\")'\ntR.",
        "persistent-id": b"(dp0\nS'a'\nP42\ns.",
    }


def test_malicious_extension_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "Data.fs")
    fs = FileStorage(path)
    tids = []
    evil = _evil_extensions(marker)
    for name, ext in evil.items():
        _storage_txn(fs, tids, desc=name.encode(), ext=ext)
    # legitimate Python-2 era extension pickle (protocol 0, str keys), a set
    py2 = b"(dp1\nS'user_name'\np2\nS'joe'\np3\nsS'n'\nI3\ns."
    _storage_txn(fs, tids, desc=b"py2", ext=py2)
    _storage_txn(fs, tids, desc=b"set",
                 ext=pickle.dumps({"s": {1, 2}}, protocol=2))
    _storage_txn(fs, tids, desc=b"list", ext=pickle.dumps([1], protocol=3))
    fs.close()

    headers = {h.description: h for h in filestorage.tail_transactions(path)}
    for name in evil:
        h = headers[name.encode()]
        with pytest.raises(UnsafeExtensionError) as exc_info:
            h.ext()
        assert isinstance(exc_info.value, ScanError)
        assert isinstance(exc_info.value, pickle.UnpicklingError)
        assert "refused" in str(exc_info.value)
        assert path in str(exc_info.value)
        assert not marker.exists()
    assert headers[b"py2"].ext() == {"user_name": "joe", "n": 3}
    assert headers[b"set"].ext() == {"s": {1, 2}}
    with pytest.raises(ScanError, match="not a dict"):
        headers[b"list"].ext()
    assert not marker.exists()


# ---------------------------------------------------------------------------
# tail_transactions / last_tid / iteration
# ---------------------------------------------------------------------------


def test_tail_transactions_and_last_tid(rich, blocks):
    src, tids, refs = rich
    assert filestorage.last_tid(src) == tids[-1]
    tail = filestorage.tail_transactions(src)
    assert [(h.tid, h.pos, h.end) for h in tail] == refs
    for k in (0, 5, len(tids) - 2, len(tids) - 1):
        got = filestorage.tail_transactions(src, since_tid=tids[k])
        assert [h.tid for h in got] == tids[k + 1:]
        got = filestorage.tail_transactions(src, since_tid=tids[k] + 1)
        assert [h.tid for h in got] == tids[k + 1:]
    assert filestorage.tail_transactions(src, since_tid=MAXTID) == []
    assert [h.tid for h in filestorage.tail_transactions(src, since_tid=0)] == tids
    assert [h.tid for h in filestorage.tail_transactions(src, limit=4)] == \
        tids[-4:]
    assert [h.tid for h in filestorage.tail_transactions(
        src, since_tid=tids[-3], limit=10)] == tids[-2:]
    assert filestorage.tail_transactions(src, limit=0) == []
    with pytest.raises(ValueError):
        filestorage.tail_transactions(src, limit=-1)


def test_iterators_agree(rich, blocks):
    src, tids, refs = rich
    back = list(filestorage.iter_backward(src))
    fwd = list(filestorage.iter_forward(src))
    assert back[::-1] == fwd
    assert [(h.tid, h.pos, h.end) for h in fwd] == refs
    start = refs[7][1]
    assert list(filestorage.iter_forward(src, start)) == fwd[7:]
    assert list(filestorage.iter_forward(src, refs[-1][2])) == []


def test_empty_storage(tmp_path):
    path = str(tmp_path / "Data.fs")
    FileStorage(path).close()
    assert os.path.getsize(path) == 4
    assert filestorage.last_tid(path) is None
    assert filestorage.tail_transactions(path) == []
    assert list(filestorage.iter_backward(path)) == []
    assert list(filestorage.iter_forward(path)) == []
    assert filestorage.find_cut(path, MAXTID) == CutPoint(4, None, 0, "backward",
                                                     None)


def test_fs21_magic_and_bad_files(rich, tmp_path):
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path)
    with open(path, "r+b") as f:
        f.write(b"FS21")
    assert filestorage.find_cut(path, tids[4]).offset == refs[4][2]
    assert filestorage.last_tid(path) == tids[-1]
    with open(path, "r+b") as f:
        f.write(b"XXXX")
    with pytest.raises(ScanError, match="magic"):
        filestorage.find_cut(path, tids[4])
    with pytest.raises(ScanError, match="magic"):
        list(filestorage.iter_forward(path))
    tiny = tmp_path / "tiny.fs"
    tiny.write_bytes(b"FS")
    with pytest.raises(ScanError, match="too small"):
        filestorage.last_tid(str(tiny))
    with pytest.raises(FileNotFoundError):
        filestorage.find_cut(str(tmp_path / "missing.fs"), 1)


# ---------------------------------------------------------------------------
# truncate_at
# ---------------------------------------------------------------------------


def test_truncate_at_checks_boundaries_and_removes_stale_index(rich,
                                                               tmp_path):
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path, with_index=True)
    size = os.path.getsize(path)
    for suffix in (".index.index_tmp", ".lock", ".tmp"):
        with open(path + suffix, "wb") as f:
            f.write(b"leftover")

    with pytest.raises(ValueError):
        filestorage.truncate_at(path, size + 1)
    with pytest.raises(ValueError):
        filestorage.truncate_at(path, 3)
    for bad in (refs[5][2] - 1, refs[5][2] + 1, refs[5][1] + 23):
        with pytest.raises(ScanError):
            filestorage.truncate_at(path, bad)
    assert os.path.getsize(path) == size

    filestorage.truncate_at(path, size)           # no change: index kept
    assert os.path.exists(path + ".index")

    filestorage.truncate_at(path, refs[5][2])
    assert os.path.getsize(path) == refs[5][2]
    assert not os.path.exists(path + ".index")
    assert not os.path.exists(path + ".index.index_tmp")
    assert os.path.exists(path + ".lock") and os.path.exists(path + ".tmp")
    assert filestorage.last_tid(path) == tids[5]

    filestorage.truncate_at(path, 4)
    assert filestorage.last_tid(path) is None
    os.remove(path + ".lock")
    fs = FileStorage(path)
    assert fs.lastTransaction() == z64 and fs.getSize() == 4
    fs.close()


def test_commits_after_truncation(rich, tmp_path):
    """A truncated storage is usable: FileStorage appends after the cut."""
    src, tids, refs = rich
    path = copy_data_fs(src, tmp_path, with_index=True)
    cut = filestorage.find_cut(path, tids[-3])
    filestorage.truncate_at(path, cut.offset)
    assert not os.path.exists(path + ".index")
    fs = FileStorage(path)
    db = DB(fs)
    conn = db.open()
    conn.root()["after"] = PersistentMapping(x=1)
    transaction.commit()
    conn.close()
    db.close()
    fs = FileStorage(path, read_only=True)
    try:
        assert filestorage.last_tid(path) == u64(fs.lastTransaction())
        assert filestorage.find_cut(path, tids[-3]).offset == cut.offset
    finally:
        fs.close()


# ---------------------------------------------------------------------------
# packed storages ('p' status)
# ---------------------------------------------------------------------------


def test_packed_storage(tmp_path, blocks):
    path = str(tmp_path / "Data.fs")
    fs = FileStorage(path)
    db = DB(fs)
    conn = db.open()
    root = conn.root()
    tids = [u64(fs.lastTransaction())]
    for i in range(8):
        root["a"] = PersistentMapping(i=i, pad=b"p" * (i * 3000))
        _commit(fs, tids, desc=f"before pack {i}")
    time.sleep(0.05)
    db.pack()
    time.sleep(0.05)
    for i in range(4):
        root["b"] = PersistentMapping(i=i)
        _commit(fs, tids, desc=f"after pack {i}")
    conn.close()
    db.close()

    os.remove(path + ".index")
    refs = reference_records(path)
    statuses = [h.status for h in filestorage.iter_forward(path)]
    assert b"p" in statuses and b" " in statuses
    for tid in candidate_tids([r[0] for r in refs]):
        cut = filestorage.find_cut(path, tid)
        assert (cut.offset, cut.last_tid, cut.dropped, cut.method) == \
            expected_cut(refs, tid) + ("backward",)
        if tid != MAXTID:
            assert cut.offset == legacy_size(path, tid)
