"""``tidstorage heal`` (issue 12) on real parts: runzeo servers, a real
daemon (with an admin token), writer processes, a writer killed for real
between its ``tpc_finish`` calls, the CLI as a subprocess.

No assertion waits on a short clock: states are polled with generous
deadlines.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict

import pytest
import transaction
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileIterator
from ZODB.utils import u64

from tidstorage.demo import workload
from tidstorage.demo.cluster import DaemonProcess
from tidstorage.tools.heal import HEAL_PREFIX, heal_stamp

ADMIN_TOKEN = "an-admin-token-of-enough-length"


@pytest.fixture
def site(tmp_path, two_zeo_servers):
    """a1, a2 (server a) and b1 (server b), a daemon with an admin token."""
    a, b = two_zeo_servers
    zeo = {"a1": (a.address, "1", a.data_fs("1")), "a2": (a.address, "2", a.data_fs("2")),
           "b1": (b.address, "1", b.data_fs("1"))}
    admin = tmp_path / "admin-token"
    admin.write_text(ADMIN_TOKEN + "\n")
    admin.chmod(0o600)
    d = DaemonProcess(tmp_path / "daemon", storages={
        n: {"zeo": f"127.0.0.1:{addr[1]}", "zeo_storage": st, "data_fs": str(path)}
        for n, (addr, st, path) in zeo.items()},
        server={"in_doubt_grace": 1.0, "admin_token_file": str(admin)}).start()
    d.wait_bootstrapped()

    class Site:
        daemon = d
        config = str(d.config_path)
        files = {n: v[2] for n, v in zeo.items()}
        spec = {n: (v[0], v[1]) for n, v in zeo.items()}

    yield Site
    d.kill()


def writer_cmd(site, writer: int, **options) -> list[str]:
    """A ``demo.workload`` writer process over the site's three storages."""
    zeo = json.dumps({name: [*address, st] for name, (address, st) in site.spec.items()})
    args = ["--zeo", zeo, "--server", f"127.0.0.1:{site.daemon.port}", "--writer", str(writer)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return [sys.executable, "-m", "tidstorage.demo.workload", *args]


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "tidstorage", *args], capture_output=True,
                          text=True, timeout=timeout)


def status(site) -> dict:
    with site.daemon.client() as c:
        answer = c.admin({"verb": "status"})
    assert answer["ok"], answer
    return answer


def poll(what, predicate, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if predicate(value):
            return value
        assert time.monotonic() < deadline, value
        time.sleep(0.2)


def records(path):
    it = FileIterator(str(path))
    try:
        return [(u64(t.tid), t.description, t.extension) for t in it]
    finally:
        it.close()


def lead_knows_heals() -> bool:
    """The daemon's part (core: stamps with ``heals``, ADMIN accept/healed)."""
    from tidstorage.core import stamps

    return "heals" in getattr(stamps.Stamp, "__dataclass_fields__", {})


def needs_lead(what: str):
    if not lead_knows_heals():
        pytest.skip(f"{what}: needs the daemon's heal rules (core/stamps.py Stamp.heals)")


def test_heal_stamp_and_id():
    assert heal_stamp("ts:heal-1", ["b", "a", "b"], "ts:x") == {
        "id": "ts:heal-1", "storages": ["a", "b"], "heals": "ts:x"}
    from tidstorage.tools.heal import heal_id

    one, two = heal_id(), heal_id()
    assert one.startswith(HEAL_PREFIX) and one != two and re.fullmatch(r"ts:heal-[0-9a-f]{32}", one)


def test_nothing_to_heal_and_bad_usage(site):
    r = cli("heal", "-c", site.config)
    assert r.returncode == 0, r.stderr
    assert "no split to heal" in r.stdout
    r = cli("heal", "-c", site.config, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["splits"] == []
    r = cli("heal", "-c", site.config, "--accept", "ts:x", "ts:y")
    assert r.returncode == 2
    # an id nobody wrote: refused, exit 1
    r = cli("heal", "-c", site.config, "ts:nobody-wrote-this")
    assert r.returncode == 1 and "no record of ts:nobody-wrote-this" in r.stdout


def _raw_commit(site, name, extension, oid=None, description=""):
    """One transaction on storage ``name`` through a raw ClientStorage
    (a new object, or a new revision of ``oid``). Returns (oid, tid)."""
    address, storage = site.spec[name]
    cs = ClientStorage(address, storage=storage, wait_timeout=10)
    try:
        serial = cs.load(oid)[1] if oid is not None else b"\0" * 8
        oid = oid if oid is not None else cs.new_oid()
        txn = TransactionMetaData(description=description, extension=extension)
        cs.tpc_begin(txn)
        cs.store(oid, serial, _record({"v": 1}), "", txn)
        cs.tpc_vote(txn)
        return oid, u64(cs.tpc_finish(txn))
    finally:
        cs.close()


def test_published_and_complete_transactions_are_not_splits(site):
    """Ids given by hand: a published transaction, and a whole one not
    published yet (a legacy client's transaction holds the point back):
    both refused, nothing undone."""
    dbs = workload.open_databases(site.spec, site.daemon.address)
    try:
        workload.prepare(dbs, 7)
        workload.write_one(dbs, transaction.TransactionManager(), 7, ["a1", "b1"])
    finally:
        for db in dbs.values():
            db.close()
    published = [e["tidstorage"]["id"] for _, _, e in records(site.files["a1"])
                 if "id" in e.get("tidstorage", {})][-1]
    last = records(site.files["a1"])[-1][0]
    poll(lambda: status(site)["published"], lambda p: (p.get("a1") or -1) >= last)
    r = cli("heal", "-c", site.config, published)
    assert r.returncode == 1 and "not a split" in r.stdout, r.stdout + r.stderr

    with site.daemon.client() as legacy:
        legacy.begin("legacy-1", ["a1", "a2"], sync=True)  # holds a1 and a2 back
        whole = {"tidstorage": {"id": "ts:whole-1", "storages": ["a1", "a2"]}}
        _raw_commit(site, "a1", whole)
        _raw_commit(site, "a2", whole)
        before = {n: records(site.files[n]) for n in ("a1", "a2")}
        r = cli("heal", "-c", site.config, "ts:whole-1", "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        (entry,) = json.loads(r.stdout)["splits"]
        assert entry["state"] == "refused" and "not a split" in entry["reason"]
        assert sorted(entry["holders"]) == ["a1", "a2"] and entry["missing"] == []
        assert {n: records(site.files[n]) for n in ("a1", "a2")} == before
        legacy.abort("legacy-1")


def _make_conflicting_split(site):
    """x written, then a split over a1/a2 (on a1 only) changing x, then a
    later transaction changing x again. Returns (split id, x's oid, later tid)."""
    db = workload.open_databases({"a1": site.spec["a1"]}, site.daemon.address, wrap=False)["a1"]
    try:
        conn = db.open()
        conn.root()["x"] = PersistentMapping(v=1)
        transaction.commit()
        oid = conn.root()["x"]._p_oid
        conn.close()
        address, storage = site.spec["a1"]
        cs = ClientStorage(address, storage=storage, wait_timeout=10)
        try:
            _data, serial = cs.load(oid)
            txn = TransactionMetaData(description="the split", extension={"tidstorage": {
                "id": "ts:conflict-1", "storages": ["a1", "a2"]}})
            cs.tpc_begin(txn)
            cs.store(oid, serial, _record({"v": 2}), "", txn)
            cs.tpc_vote(txn)
            split_tid = u64(cs.tpc_finish(txn))
        finally:
            cs.close()
        poll(lambda: status(site)["splits"], lambda s: "ts:conflict-1" in s)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        deadline = time.monotonic() + 60
        while conn.root()["x"]["v"] != 2:  # the split's change seen
            assert time.monotonic() < deadline
            time.sleep(0.05)
            tm.begin()
        conn.root()["x"]["v"] = 3
        tm.get().note("a later change of x")
        tm.commit()
        later = u64(db.storage.lastTransaction())
        conn.close()
    finally:
        db.close()
    assert later > split_tid
    return "ts:conflict-1", oid.hex(), later


def test_undo_conflict_refused_then_accepted(site):
    split, oid, later = _make_conflicting_split(site)
    before = records(site.files["a1"])
    for args in ((), ("--dry-run",)):
        r = cli("heal", "-c", site.config, "--json", *args)
        assert r.returncode == 1, r.stdout + r.stderr
        out = json.loads(r.stdout)
        (entry,) = out["splits"]
        assert entry["split"] == split and entry["state"] == "refused"
        assert list(entry["holders"]) == ["a1"] and entry["missing"] == ["a2"]
        (blocker,) = entry["blockers"]
        assert blocker["kind"] == "conflict" and blocker["oid"] == oid, blocker["text"]
        assert blocker["class"] == "persistent.mapping.PersistentMapping"
        assert [t["tid"] for t in blocker["transactions"]] == [later]
        assert blocker["transactions"][0]["description"] == "a later change of x"
    r = cli("heal", "-c", site.config, split)
    assert r.returncode == 1
    assert oid in r.stdout and f"{later:#018x}" in r.stdout and "a later change of x" in r.stdout
    assert "repair" in r.stdout and f"--accept {split}" in r.stdout
    # Nothing changed on the holder (the barrier was on a2, where it is missing).
    assert records(site.files["a1"]) == before
    assert split in status(site)["splits"]

    needs_lead("accept")
    r = cli("heal", "-c", site.config, "--accept", split)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "accepted" in r.stdout
    a1_last = before[-1][0]
    poll(lambda: status(site), lambda s: split not in s["splits"]
         and (s["published"].get("a1") or -1) >= a1_last)
    r = cli("verify", "-c", site.config)
    assert "accepted" in r.stdout + r.stderr, r.stdout + r.stderr


def _record(state: dict, refs: dict | None = None) -> bytes:
    """A PersistentMapping record; ``refs``: key -> oid of a persistent
    reference (to a PersistentMapping), ZODB's (oid, class) form."""
    refs = refs or {}
    marks = {key: type(f"ref_{key}", (), {})() for key in refs}
    by_id = {id(mark): (refs[key], PersistentMapping) for key, mark in marks.items()}
    f = io.BytesIO()
    p = pickle.Pickler(f, 3)
    p.dump((PersistentMapping, None))
    p = pickle.Pickler(f, 3)
    p.persistent_id = lambda obj: by_id.get(id(obj))
    p.dump({"data": {**state, **marks}})
    return f.getvalue()


def test_dangling_reference_refused(site):
    """The split created an object that a later transaction (of another
    object) refers to: refused, naming both, nothing changed."""
    db = workload.open_databases({"a1": site.spec["a1"]}, site.daemon.address, wrap=False)["a1"]
    try:
        conn = db.open()
        conn.root()["holder"] = PersistentMapping()
        transaction.commit()
        holder = conn.root()["holder"]._p_oid
        conn.close()
    finally:
        db.close()
    address, storage = site.spec["a1"]
    cs = ClientStorage(address, storage=storage, wait_timeout=10)
    try:
        new = cs.new_oid()
        txn = TransactionMetaData(extension={"tidstorage": {
            "id": "ts:dangling-1", "storages": ["a1", "b1"]}})
        cs.tpc_begin(txn)
        cs.store(new, b"\0" * 8, _record({"v": 1}), "", txn)
        cs.tpc_vote(txn)
        cs.tpc_finish(txn)
        _data, serial = cs.load(holder)
        txn = TransactionMetaData(description="refer to the new object")
        cs.tpc_begin(txn)
        cs.store(holder, serial, _record({}, {"ref": new}), "", txn)
        cs.tpc_vote(txn)
        later = u64(cs.tpc_finish(txn))
    finally:
        cs.close()
    poll(lambda: status(site)["splits"], lambda s: "ts:dangling-1" in s)
    before = records(site.files["a1"])
    r = cli("heal", "-c", site.config, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    (entry,) = json.loads(r.stdout)["splits"]
    kinds = {b["kind"]: b for b in entry["blockers"]}
    assert list(kinds) == ["dangling"], entry
    assert kinds["dangling"]["oid"] == new.hex() and holder.hex() in kinds["dangling"]["text"]
    assert [t["tid"] for t in kinds["dangling"]["transactions"]] == [later]
    assert entry["objects"]["a1"] == [{"oid": new.hex(), "class":
                                       "persistent.mapping.PersistentMapping", "created": True}]
    assert records(site.files["a1"]) == before


def _expected_pairs(files, exclude):
    """storage -> writer -> Counter: what the writers' transactions in the
    files add up to (``exclude``: storage -> TID not counted)."""
    out = defaultdict(lambda: defaultdict(Counter))
    for s, path in files.items():
        for tid, desc, _ext in records(path):
            m = re.fullmatch(r"writer (\d+): (.+)", desc.decode())
            if m and exclude.get(s) != tid:
                for y in m[2].split("+"):
                    out[s][int(m[1])][y] += 1
    return out


def test_heal_a_killed_writers_split_while_others_write(site):
    """A writer killed between its finishes while two others write: heal
    through ZEO while they go on; they never fail; the point moves past the
    heal; the files verify coherent; only the split's effect is gone."""
    stop = site.daemon.directory / "stop-writers"
    others = [subprocess.Popen(writer_cmd(site, w, seconds=600, pause=0.01, timeout=0.5,
                                          stop_file=stop),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for w in (1, 2)]
    try:
        killed = subprocess.run(writer_cmd(site, 9, transactions=1000, kill_after_first_finish=3,
                                                timeout=0.5),
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr
        splits = poll(lambda: status(site)["splits"], lambda s: len(s) == 1)
        (split, info), = splits.items()
        assert len(info["parts"]) == 1
        (holder, split_tid), = info["parts"].items()
        r = cli("heal", "-c", site.config, "--dry-run", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        (plan,) = json.loads(r.stdout)["splits"]
        assert plan["state"] == "healable" and plan["blockers"] == []
        assert plan["holders"] == {holder: {"tid": split_tid, "tid_hex": f"{split_tid:#018x}"}}
        assert plan["objects"][holder] and not any(o["created"] for o in plan["objects"][holder])
        assert split in status(site)["splits"]  # the dry run changed nothing

        needs_lead("the daemon unfreezing a healed split")
        r = cli("heal", "-c", site.config, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        (done,) = json.loads(r.stdout)["splits"]
        assert done["state"] == "healed" and done["daemon_ok"] is True
        hid = done["heal"]["id"]
        heal_tid = done["heal"]["tids"][holder]["tid"]
        assert hid.startswith(HEAL_PREFIX) and heal_tid > split_tid
        assert all(p.poll() is None for p in others), "the writers ended before the heal"
        # The heal record, stamped as the heal of the split, on the holder only.
        heal_records = [(t, e) for t, _, e in records(site.files[holder]) if t == heal_tid]
        assert heal_records == [(heal_tid, {"tidstorage": {
            "id": hid, "storages": [holder], "heals": split}})]
        assert status(site)["published"][holder] >= heal_tid
        # A second run: nothing frozen any more.
        r = cli("heal", "-c", site.config)
        assert r.returncode == 0 and "no split to heal" in r.stdout
    finally:
        stop.touch()  # the writers stop now, cleanly
        outs = [p.communicate(timeout=120) for p in others]
    for p, (out, err) in zip(others, outs):
        assert p.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["errors"] == 0 and result["done"] > 0, (result, err)
    # Every writer's last transactions published; the files coherent.
    lasts = {n: u64(_last(site, n)) for n in site.files}
    poll(lambda: status(site)["published"],
         lambda p: all((p.get(n) or -1) >= t for n, t in lasts.items()))
    r = cli("verify", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    # The application data: every other writer's transactions are there,
    # the killed writer's split is not (and its earlier ones are).
    expected = _expected_pairs(site.files, {holder: split_tid})
    dbs = workload.open_databases(site.spec, site.daemon.address, wrap=False)
    try:
        roots = {n: db.open().root() for n, db in dbs.items()}
        for s in site.files:
            for w in (1, 2, 9):
                got = Counter(dict(roots[s].get(f"pairs-{w}", {})))
                assert got == expected[s][w], (s, w, got, expected[s][w])
        assert workload.check_invariant(roots) == []
    finally:
        for db in dbs.values():
            db.close()


def _last(site, name) -> bytes:
    address, storage = site.spec[name]
    cs = ClientStorage(address, storage=storage, wait_timeout=10, read_only=True)
    try:
        return cs.lastTransaction()
    finally:
        cs.close()


KILL_HEAL_AFTER_FIRST_FINISH = """
import os, signal, sys
from ZEO.ClientStorage import ClientStorage

real = ClientStorage.tpc_finish

def tpc_finish(self, txn, *args, **kw):
    tid = real(self, txn, *args, **kw)
    if (txn.extension.get("tidstorage") or {}).get("heals"):
        os.kill(os.getpid(), signal.SIGKILL)  # between the heal's finishes
    return tid

ClientStorage.tpc_finish = tpc_finish
from tidstorage.cli import main
main(sys.argv[1:])
"""


def test_a_heal_killed_between_its_finishes_is_completed(site):
    """A split on two holders (a1, b1; missing from a2); its heal killed
    for real after its first finish: a re-run completes the heal (the same
    heal id) on the other holder."""
    stamp = {"tidstorage": {"id": "ts:three-1", "storages": ["a1", "a2", "b1"]}}
    parts = {n: _raw_commit(site, n, stamp)[1] for n in ("a1", "b1")}
    poll(lambda: status(site)["splits"], lambda s: "ts:three-1" in s)
    killed = subprocess.run([sys.executable, "-c", KILL_HEAL_AFTER_FIRST_FINISH, "heal", "-c",
                             site.config], capture_output=True, text=True, timeout=180)
    assert killed.returncode == -9, killed.stdout + killed.stderr

    def heals():
        return {n: [(t, e["tidstorage"]) for t, _, e in records(site.files[n])
                    if e.get("tidstorage", {}).get("heals") == "ts:three-1"] for n in parts}
    partial = heals()
    assert sorted(len(v) for v in partial.values()) == [0, 1], partial
    (first,) = [n for n, v in partial.items() if v]
    (other,) = [n for n in parts if n != first]
    hid = partial[first][0][1]["id"]
    assert partial[first][0][1] == {"id": hid, "storages": ["a1", "b1"], "heals": "ts:three-1"}

    needs_lead("the daemon unfreezing a completed heal")
    r = cli("heal", "-c", site.config, "--json")
    out = json.loads(r.stdout)
    entry = next(e for e in out["splits"] if e["split"] == "ts:three-1")
    assert entry["state"] == "healed" and entry["heal"]["completed"] == [other], entry
    assert entry["heal"]["id"] == hid
    done = heals()
    assert [e for _, e in done[other]] == [partial[first][0][1]]  # the same heal, now whole
    assert done[first] == partial[first]  # not undone twice
    assert r.returncode == 0, r.stdout + r.stderr
    poll(lambda: status(site)["splits"], lambda s: not s)


def test_local_storages_are_healed_only_when_nothing_uses_them(tmp_path):
    """Local FileStorages (data_fs only): refused while a process holds
    Data.fs.lock; healed on the files once it is released."""
    from ZODB.FileStorage import FileStorage

    files = {n: tmp_path / n / "Data.fs" for n in ("a", "b")}
    for path in files.values():
        path.parent.mkdir(parents=True)
        FileStorage(str(path)).close()
    admin = tmp_path / "admin-token"
    admin.write_text(ADMIN_TOKEN + "\n")
    admin.chmod(0o600)
    d = DaemonProcess(tmp_path / "daemon", storages={n: {"data_fs": str(p)}
                                                     for n, p in files.items()},
                      server={"in_doubt_grace": 1.0, "admin_token_file": str(admin)}).start()
    try:
        d.wait_bootstrapped()
        fs = FileStorage(str(files["a"]))
        txn = TransactionMetaData(extension={"tidstorage": {"id": "ts:local-1",
                                                            "storages": ["a", "b"]}})
        fs.tpc_begin(txn)
        fs.store(fs.new_oid(), b"\0" * 8, _record({"v": 1}), "", txn)
        fs.tpc_vote(txn)
        split_tid = u64(fs.tpc_finish(txn))
        fs.close()
        with d.client() as c:
            poll(lambda: c.admin({"verb": "status"})["splits"], lambda s: "ts:local-1" in s)
        held = FileStorage(str(files["a"]))  # a process using it
        try:
            r = cli("heal", "-c", str(d.config_path))
            assert r.returncode == 1
            assert "in use" in r.stdout and "stop the process using it or use ZEO" in r.stdout
        finally:
            held.close()
        assert [t for t, _, _ in records(files["a"])][-1] == split_tid  # nothing written
        needs_lead("the daemon unfreezing a healed split")
        r = cli("heal", "-c", str(d.config_path), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        (entry,) = json.loads(r.stdout)["splits"]
        assert entry["state"] == "healed" and entry["objects"]["a"][0]["created"] is True
        heal_tid = entry["heal"]["tids"]["a"]["tid"]
        assert records(files["a"])[-1][0] == heal_tid > split_tid
        assert records(files["a"])[-1][2]["tidstorage"]["heals"] == "ts:local-1"
        assert records(files["b"]) == []  # nothing on b, not even a barrier
    finally:
        d.kill()


def test_two_heals_of_one_split_undo_it_once(site, monkeypatch):
    """Two heals of one split, the second run whole between the first's
    checks and its undo: the first sees the second's heal with the commit
    locks held and writes nothing. The split changed a ``BTrees.Length``,
    whose conflict resolution would merge a second undo (the counter
    decremented twice)."""
    from BTrees.Length import Length

    from tidstorage.config import load_config
    from tidstorage.tools import heal as heal_tool

    db = workload.open_databases({"a1": site.spec["a1"]}, site.daemon.address, wrap=False)["a1"]
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()["count"] = Length(10)
        tm.commit()
        conn.root()["count"].change(5)
        tm.get().extension["tidstorage"] = {"id": "ts:count-1", "storages": ["a1", "a2"]}
        tm.commit()
        conn.close()
        poll(lambda: status(site)["splits"], lambda s: "ts:count-1" in s)

        real_undo, runs = heal_tool._undo, []

        def undo(stores, tids, stamp, split_id, finish):
            if finish and not runs:  # the other heal runs whole, here
                runs.append(cli("heal", "-c", site.config, "--json"))
            return real_undo(stores, tids, stamp, split_id, finish)

        monkeypatch.setattr(heal_tool, "_undo", undo)
        result = heal_tool.run_heal(load_config(site.config), wait=60)
        (other,) = runs
        assert other.returncode == 0, other.stdout + other.stderr
        (theirs,) = json.loads(other.stdout)["splits"]
        assert theirs["state"] == "healed", theirs
        (ours,) = result.heals
        assert ours.state == "already healed", (ours.state, ours.reason)
        assert ours.heal_id == theirs["heal"]["id"] and "while this one ran" in ours.reason
        heals = [e["tidstorage"]["id"] for _, _, e in records(site.files["a1"])
                 if e.get("tidstorage", {}).get("heals") == "ts:count-1"]
        assert heals == [theirs["heal"]["id"]]
        tm2 = transaction.TransactionManager()
        conn = db.open(tm2)
        poll(lambda: (tm2.begin(), conn.root()["count"]())[1], lambda v: v != 15)
        assert conn.root()["count"]() == 10  # undone once
        conn.close()
    finally:
        db.close()


def _split_creating(site, split_id: str, storages: list[str]) -> bytes:
    """A split on a1 only (stamped for ``storages``) that creates one
    object; returns its oid once the daemon lists the split."""
    address, storage = site.spec["a1"]
    cs = ClientStorage(address, storage=storage, wait_timeout=10)
    try:
        new = cs.new_oid()
        txn = TransactionMetaData(extension={"tidstorage": {"id": split_id,
                                                            "storages": storages}})
        cs.tpc_begin(txn)
        cs.store(new, b"\0" * 8, _record({"v": 1}), "", txn)
        cs.tpc_vote(txn)
        cs.tpc_finish(txn)
    finally:
        cs.close()
    poll(lambda: status(site)["splits"], lambda s: split_id in s)
    return new


def test_a_cross_database_reference_to_a_created_object_is_refused(site):
    """The split created an object on a1; a later transaction on b1 (a
    storage that does not hold the split) refers to it across databases:
    refused, naming b1's object, nothing changed."""
    new = _split_creating(site, "ts:xref-1", ["a1", "a2"])
    dbs = workload.open_databases({n: site.spec[n] for n in ("a1", "b1")},
                                  site.daemon.address, wrap=False)
    try:
        tm = transaction.TransactionManager()
        conn_b = dbs["b1"].open(tm)
        holder = PersistentMapping()
        conn_b.root()["holder"] = holder
        holder["far"] = conn_b.get_connection("a1").get(new)
        tm.get().note("refer across databases")
        tm.commit()
        holder_oid = holder._p_oid
        conn_b.close()
    finally:
        for db in dbs.values():
            db.close()
    before = {n: records(site.files[n]) for n in ("a1", "b1")}
    r = cli("heal", "-c", site.config, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    (entry,) = json.loads(r.stdout)["splits"]
    (blocker,) = entry["blockers"]
    assert blocker["kind"] == "dangling" and blocker["oid"] == new.hex(), blocker
    assert holder_oid.hex() in blocker["text"] and "on storage 'b1'" in blocker["text"]
    (later,) = blocker["transactions"]
    assert later["storage"] == "b1" and later["description"] == "refer across databases"
    assert {n: records(site.files[n]) for n in ("a1", "b1")} == before


def test_cross_database_references_elsewhere_do_not_block(site):
    """A cross-database reference to the created oid *in another database*
    (b1 refers to a2's object of the same oid): the heal goes through."""
    new = _split_creating(site, "ts:xref-2", ["a1", "b1"])
    dbs = workload.open_databases({n: site.spec[n] for n in ("a2", "b1")},
                                  site.daemon.address, wrap=False)
    try:
        tm = transaction.TransactionManager()
        conn_a2 = dbs["a2"].open(tm)
        target = None
        while target is None or target._p_oid < new:  # an a2 object with the same oid
            target = PersistentMapping()
            conn_a2.add(target)
            conn_a2.root().setdefault("objs", []).append(target)
            conn_a2.root()._p_changed = True
        assert target._p_oid == new, (target._p_oid, new)
        conn_a2.get_connection("b1").root()["far"] = target
        tm.commit()
        conn_a2.close()
    finally:
        for db in dbs.values():
            db.close()
    r = cli("heal", "-c", site.config, "--json")
    (entry,) = json.loads(r.stdout)["splits"]
    assert entry["state"] == "healed" and entry["blockers"] == [], entry
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_storage_without_undo_is_refused(tmp_path, zeo_factory):
    """A split whose part is on a storage that cannot undo (a ZEO
    MappingStorage, as a history-free RelStorage would be): refused, naming
    the storage, nothing written."""
    mapping = zeo_factory(["m"], name="m")
    mapping.config_path.write_text(f"<zeo>\n  address 127.0.0.1:{mapping.port}\n</zeo>\n"
                                   "<mappingstorage m>\n</mappingstorage>\n")
    mapping.start()
    files = zeo_factory(["1"], name="f", start=True)
    admin = tmp_path / "admin-token"
    admin.write_text(ADMIN_TOKEN + "\n")
    admin.chmod(0o600)
    d = DaemonProcess(tmp_path / "daemon", storages={
        "m": {"zeo": f"127.0.0.1:{mapping.port}", "zeo_storage": "m"},
        "f": {"zeo": f"127.0.0.1:{files.port}", "data_fs": str(files.data_fs("1"))}},
        server={"in_doubt_grace": 1.0, "admin_token_file": str(admin)}).start()
    try:
        d.wait_bootstrapped()
        cs = ClientStorage(("127.0.0.1", mapping.port), storage="m", wait_timeout=10)
        try:
            txn = TransactionMetaData(extension={"tidstorage": {"id": "ts:no-undo-1",
                                                                "storages": ["f", "m"]}})
            cs.tpc_begin(txn)
            cs.store(cs.new_oid(), b"\0" * 8, _record({"v": 1}), "", txn)
            cs.tpc_vote(txn)
            cs.tpc_finish(txn)
            last = cs.lastTransaction()
        finally:
            cs.close()
        r = cli("heal", "-c", str(d.config_path), "ts:no-undo-1", "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        (entry,) = json.loads(r.stdout)["splits"]
        assert entry["state"] == "refused" and list(entry["holders"]) == ["m"], entry
        (blocker,) = entry["blockers"]
        assert blocker["kind"] == "no-undo" and blocker["storage"] == "m"
        assert "does not support undo" in blocker["text"]
        cs = ClientStorage(("127.0.0.1", mapping.port), storage="m", wait_timeout=10,
                           read_only=True)
        try:
            assert cs.lastTransaction() == last  # nothing written
        finally:
            cs.close()
    finally:
        d.kill()


def test_a_split_packed_away_is_refused(site):
    """The storage holding the split was packed past it: the undo is
    refused (the pack), naming the storage, nothing written."""
    from ZODB.serialize import referencesf

    dbs = workload.open_databases({"a1": site.spec["a1"]}, site.daemon.address, wrap=False)
    try:
        conn = dbs["a1"].open()
        conn.root()["kept"] = PersistentMapping(v=0)
        transaction.commit()
        oid = conn.root()["kept"]._p_oid
        conn.close()
    finally:
        dbs["a1"].close()
    _raw_commit(site, "a1", {"tidstorage": {"id": "ts:packed-1", "storages": ["a1", "a2"]}},
                oid=oid)
    poll(lambda: status(site)["splits"], lambda s: "ts:packed-1" in s)
    address, storage = site.spec["a1"]
    cs = ClientStorage(address, storage=storage, wait_timeout=10)
    try:
        cs.pack(time.time() + 1, referencesf)
    finally:
        cs.close()
    before = records(site.files["a1"])
    assert any(e.get("tidstorage", {}).get("id") == "ts:packed-1" for _, _, e in before)
    r = cli("heal", "-c", site.config, "ts:packed-1", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    (entry,) = json.loads(r.stdout)["splits"]
    assert entry["state"] == "refused" and entry["blockers"], entry
    assert {b["kind"] for b in entry["blockers"]} == {"undo-error"}
    (blocker,) = entry["blockers"]
    assert blocker["storage"] == "a1"
    assert blocker["text"] == "the undo failed: UndoError: non-undoable transaction (packed" \
        " past it?)", blocker
    assert records(site.files["a1"]) == before
