"""``repair --heal`` (issue 12) on local FileStorages after a crash: the
split is undone on the files instead of cut, and everything whole after
the TID log's point is kept (the stamps' point); the splits that cannot be
undone are cut as before."""

from __future__ import annotations

import subprocess
import sys

import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from tidstorage.core.stamps import stamp_value
from tidstorage.formats import filestorage
from tidstorage.formats.tidlog import KIND_FULL, encode_record


def run(*args):
    return subprocess.run([sys.executable, "-m", "tidstorage", *args], capture_output=True,
                          text=True, timeout=180)


def build(tmp_path, conflict=False):
    """a, b; a split T2 on a only; later single-storage and whole commits."""
    paths = {n: tmp_path / n / "Data.fs" for n in ("a", "b")}
    for p in paths.values():
        p.parent.mkdir()
    dbs = {n: ZODB.DB(FileStorage(str(p)), database_name=n, databases={}) for n, p in
           paths.items()}
    multi = {}
    for n, db in dbs.items():
        db.databases = multi
        multi[n] = db
    tm = transaction.TransactionManager()
    conn = dbs["a"].open(tm)
    roots = {n: conn.get_connection(n).root() for n in paths}

    def commit(names, stamp_id=None, key="x"):
        for n in names:
            roots[n].setdefault(key, PersistentMapping())["n"] = roots[n].get(key, {}).get("n", 0) + 1
        if stamp_id:
            tm.get().extension["tidstorage"] = stamp_value(stamp_id, sorted(names))
        tm.commit()

    for n in paths:
        for key in ("x", "y", "z"):
            roots[n][key] = PersistentMapping({"n": 0})
    tm.get().extension["tidstorage"] = stamp_value("ts:t-0", ["a", "b"])
    tm.commit()
    commit(["a", "b"], "ts:t-1")
    log = {n: int.from_bytes(dbs[n].storage.lastTransaction(), "big") for n in paths}
    # T2: a writer killed between its finishes: its part is on a only
    roots["a"]["y"]["n"] = 100
    tm.get().extension["tidstorage"] = stamp_value("ts:t-2", ["a", "b"])
    tm.commit()  # (commits on b too in this process: remove b's part below)
    commit(["a"], key="z")          # later, single-storage
    commit(["b"], key="z")
    if conflict:
        roots["a"]["y"]["n"] = 200  # a later change of what the split wrote
        tm.commit()
    commit(["a", "b"], "ts:t-4")    # later, whole
    conn.close()
    for db in dbs.values():
        db.close()
    return paths, log


def drop_part(path, stamp_id):
    """Rewrite b without its record of ``stamp_id`` (the finish that never
    happened): copy the transactions before it, then the ones after."""
    from ZODB.FileStorage import FileIterator

    import os

    os.replace(path, str(path) + ".full")
    out = FileStorage(str(path), create=True)
    for txn in FileIterator(str(path) + ".full"):
        if txn.extension.get("tidstorage", {}).get("id") == stamp_id:
            continue
        out.tpc_begin(txn, txn.tid, txn.status)
        for rec in txn:
            out.restore(rec.oid, rec.tid, rec.data, "", rec.data_txn, txn)
        out.tpc_vote(txn)
        out.tpc_finish(txn)
    out.close()


def config(tmp_path, paths, log, stamp=True):
    tidlog = tmp_path / "tidstorage.tid"
    tidlog.write_bytes(encode_record(1.0, KIND_FULL, log))
    toml = tmp_path / "t.toml"
    toml.write_text(f'[server]\nstatus_file = "{tidlog}"\nall_writers_stamp = {str(stamp).lower()}\n'
                    + "".join(f'[storages.{n}]\ndata_fs = "{p}"\n' for n, p in paths.items()))
    return toml


def values(path, key):
    db = ZODB.DB(FileStorage(str(path), read_only=True))
    try:
        conn = db.open()
        return conn.root()[key]["n"]
    finally:
        db.close()


def test_repair_heal_undoes_the_split_and_keeps_what_is_whole(tmp_path):
    paths, log = build(tmp_path)
    drop_part(paths["b"], "ts:t-2")
    toml = config(tmp_path, paths, log)
    before = run("verify", "-c", str(toml))
    assert before.returncode == 1 and "ts:t-2" in before.stdout  # a real split
    r = run("repair", "-c", str(toml), "--heal")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "healed: 1 split transaction(s) undone (ts:t-2); 0 cut instead" in r.stdout
    # only the split's effect is gone; the later commits are all there
    assert values(paths["a"], "y") == 0          # T2 undone
    assert values(paths["a"], "z") == 1 and values(paths["b"], "z") == 1
    assert values(paths["a"], "x") == 2 and values(paths["b"], "x") == 2  # t-4 kept (cut: 1)
    after = run("verify", "-c", str(toml))
    assert after.returncode == 0, after.stdout
    assert "healed: split transaction ts:t-2" in after.stdout


def test_a_split_that_cannot_be_undone_is_cut(tmp_path):
    paths, log = build(tmp_path, conflict=True)
    drop_part(paths["b"], "ts:t-2")
    toml = config(tmp_path, paths, log)
    r = run("repair", "-c", str(toml), "--heal")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 split transaction(s) undone; 1 cut instead (ts:t-2)" in r.stdout
    assert filestorage.last_tid(paths["a"]) == log["a"]  # cut below the split
    assert run("verify", "-c", str(toml)).returncode == 0


def test_repair_heal_needs_every_writer_to_stamp(tmp_path):
    paths, log = build(tmp_path)
    toml = config(tmp_path, paths, log, stamp=False)
    r = run("repair", "-c", str(toml), "--heal")
    assert r.returncode == 2 and "all_writers_stamp" in r.stderr
