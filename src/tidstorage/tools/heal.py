"""``tidstorage heal``: undo a split transaction's part, online (issue 12).

A writer killed between its ``tpc_finish`` calls leaves a **split**: a
stamped transaction on some of its storages (the *holders*) and missing from
the others.  The daemon proves it and freezes the split's storages; ``repair``
cuts everything after it, with the site stopped.  ``heal`` instead undoes the
split's part on its holders, as one new transaction over them, through ZEO
while the servers run (or on the files, when the storages are local and not
in use).  The undo is stamped as the heal of the split::

    extension["tidstorage"] = {"id": "ts:heal-<hex>", "storages": [holders],
                               "heals": "<split id>"}

even on a single holder (the common case: a two-storage split lives on one),
so the files alone say that the split is healed (``verify``, the daemon).

The steps, for each split (the daemon's frozen ones, or the ids given):

1. **Prove it again**, from the files, after a barrier.  A split that is
   false, or a transaction that can still finish where it is missing, must
   never be healed: undoing its part would make a real split.  On the ZEO
   storages where it is missing, a no-op two-phase commit
   (:func:`~tidstorage.daemon.zeo.commit_noop`): ZEO takes the commit lock
   at vote, so once the no-op has finished every transaction that was voting
   there has ended.  A local storage (``data_fs``, no ``zeo``) is only
   accepted when nothing uses it: its ``Data.fs.lock`` is taken (by opening
   it), so no transaction can be in progress.  Then each storage is read from
   its published TID to its end: a record of the split's id where it was
   missing means it is no split (refused); each holder must have the record
   at the TID the daemon said.
2. **Check that the undo can be done**, before anything changes: the objects
   the split's part wrote on each holder; the later transactions that
   changed them; the objects it created that a later record references (the
   undo would leave a dangling reference: a ``POSKeyError`` later); a
   storage without undo.  The undo itself is tried: the undo records are
   written at vote and an ``UndoError`` (a later change that conflict
   resolution cannot merge, a pack past the split) aborts the whole 2PC on
   every holder, so nothing changes.  What is in the way is reported (oids,
   classes, later transactions with their user and description) and the
   choice is the operator's: ``repair`` (the cut), or ``heal --accept ID``
   (keep the split as it is: the daemon records the operator's acceptance).
3. **Undo**: one 2PC over the holders (in ZODB's vote order, ``sortKey``),
   ``undo`` on each, vote on all, then finish; any error before the first
   finish aborts everywhere.  Then the daemon is told (ADMIN ``healed``, a
   hint: the daemon also reads the heal from the files) and the tool waits,
   bounded, until the daemon's status no longer lists the split as frozen and
   its published point has reached the heal on every holder.

A heal killed between its own finishes is a split of the heal transaction
(its stamp names every holder).  A re-run finds the heal's part on some
holders: after a barrier on the others, it *completes* the heal there (the
same heal id and storages, undoing the split's part), which makes the heal
whole.  (Undoing the partial heal instead is not done by the tool: the
completion is always possible when the first undo was, as nothing but the
heal's own part changed since on the holders still to heal -- otherwise it
refuses, naming what is in the way, like any heal.)

References: the holders' later records are read (their own references,
and cross-database ones to their database), and so are the other
storages' records from :data:`MAX_CLOCK_SKEW` before the split (their
cross-database references).  A cross-database reference names a ZODB
database (``<zodb_db NAME>``, ``DB(database_name=...)``): ``[storages.X]
database`` maps it to a storage (by default the table name), and a name
that maps to no storage is assumed to point into the holder (a refusal,
never a dangling reference).  The later transactions are read with their
data records (through ZEO: sent by the server), so a split frozen for long
costs a longer read.

Returns results; never prints nor imports click (``cli/heal.py`` does).
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ZODB.utils import p64, u64

from ..config import Config, ConfigError, StorageConfig
from ..core.addresses import parse_zeo_address
from ..core.stamps import STAMP_KEY
from ..errors import ClientError, ToolError, ZeoUnavailable
from .common import Echo, quiet

__all__ = [
    "HEAL_PREFIX",
    "Blocker",
    "Later",
    "Obj",
    "SplitHeal",
    "HealResult",
    "heal_id",
    "heal_stamp",
    "run_heal",
    "accept",
]

#: Heal transactions' coherency ids start with this.
HEAL_PREFIX = "ts:heal-"
#: Longest wait (seconds) for the daemon to show the heal (``--wait``).
DAEMON_WAIT = 30.0
#: Longest wait (seconds) for the barrier: a transaction holding a commit
#: lock longer than that can still finish, and is not healed.
BARRIER_TIMEOUT = 60.0
#: How long connecting to the daemon or a ZEO server may take (seconds).
CONNECT_TIMEOUT = 10.0
#: Most later transactions named per blocking object.
MAX_NAMED = 10

#: States of a split (``SplitHeal.state``).
HEALED, ALREADY, HEALABLE, REFUSED = "healed", "already healed", "healable", "refused"


def heal_id() -> str:
    """A new heal transaction's coherency id."""
    return f"{HEAL_PREFIX}{uuid.uuid4().hex}"


def heal_stamp(hid: str, holders: Iterable[str], split_id: str) -> dict:
    """The value stored under ``extension["tidstorage"]`` of a heal."""
    return {"id": str(hid), "storages": sorted(set(holders)), "heals": str(split_id)}


def _tid_hex(tid: int | None) -> str | None:
    return None if tid is None else f"{tid:#018x}"


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


@dataclass
class Later:
    """A transaction committed after the split on a holder."""

    storage: str
    tid: int
    user: str = ""
    description: str = ""

    def to_json(self) -> dict:
        return {"storage": self.storage, "tid": self.tid, "tid_hex": _tid_hex(self.tid),
                "user": self.user, "description": self.description}

    def __str__(self) -> str:
        what = f" {self.description!r}" if self.description else ""
        who = f" by {self.user!r}" if self.user else ""
        return f"{_tid_hex(self.tid)}{what}{who}"


@dataclass
class Obj:
    """An object the split's part wrote on a holder."""

    oid: str            #: hex
    cls: str | None     #: module.class, from the pickle
    created: bool       #: no revision before the split

    def to_json(self) -> dict:
        return {"oid": self.oid, "class": self.cls, "created": self.created}


@dataclass
class Blocker:
    """What stands in the way of the undo."""

    kind: str           #: "conflict", "dangling", "no-undo", "undo-error"
    storage: str
    text: str
    oid: str | None = None
    cls: str | None = None
    later: list[Later] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"kind": self.kind, "storage": self.storage, "oid": self.oid,
                "class": self.cls, "text": self.text,
                "transactions": [t.to_json() for t in self.later]}


@dataclass
class SplitHeal:
    """One split: what was found, what was (or would be) done."""

    split: str
    state: str = REFUSED
    reason: str = ""
    storages: list[str] = field(default_factory=list)     #: named by the stamp
    holders: dict[str, int] = field(default_factory=dict)  #: storage -> TID of the part
    missing: list[str] = field(default_factory=list)
    objects: dict[str, list[Obj]] = field(default_factory=dict)
    #: later transactions that changed the split's objects (merged by
    #: conflict resolution when the undo went through)
    later: dict[str, list[Later]] = field(default_factory=dict)
    blockers: list[Blocker] = field(default_factory=list)
    #: holder -> oids its part created (read by the analysis)
    created: dict[str, set[bytes]] = field(default_factory=dict, repr=False)
    heal_id: str | None = None
    heal_storages: list[str] = field(default_factory=list)
    #: storage -> TID of the heal's part (found, or written now)
    heal_tids: dict[str, int] = field(default_factory=dict)
    #: holders the heal was completed on (a partial heal found)
    completed: list[str] = field(default_factory=list)
    #: None: not asked; True: the daemon shows it healed, past the heal
    daemon_ok: bool | None = None
    daemon: str = ""

    @property
    def ok(self) -> bool:
        if self.state == HEALABLE:
            return True
        return self.state in (HEALED, ALREADY) and self.daemon_ok is not False

    def to_json(self) -> dict:
        return {
            "split": self.split, "state": self.state, "ok": self.ok, "reason": self.reason,
            "storages": self.storages,
            "holders": {s: {"tid": t, "tid_hex": _tid_hex(t)} for s, t in self.holders.items()},
            "missing": self.missing,
            "objects": {s: [o.to_json() for o in objs] for s, objs in self.objects.items()},
            "later": {oid: [t.to_json() for t in ts] for oid, ts in self.later.items()},
            "blockers": [b.to_json() for b in self.blockers],
            "heal": None if self.heal_id is None else {
                "id": self.heal_id, "storages": self.heal_storages,
                "tids": {s: {"tid": t, "tid_hex": _tid_hex(t)} for s, t in self.heal_tids.items()},
                "completed": self.completed},
            "daemon_ok": self.daemon_ok, "daemon": self.daemon,
        }

    def lines(self) -> list[str]:
        out = [f"split {self.split}: {self.state}" + (f": {self.reason}" if self.reason else "")]
        if self.storages:
            out.append(f"  storages: {', '.join(self.storages)}")
        for s, tid in sorted(self.holders.items()):
            objs = self.objects.get(s, [])
            out.append(f"  holder {s}: part at {_tid_hex(tid)}, {len(objs)} object(s)")
            for o in objs[:50]:
                out.append(f"    {o.oid} {o.cls or '?'}" + (" (created by it)" if o.created else ""))
        if self.missing:
            out.append(f"  missing from: {', '.join(self.missing)}")
        for oid, ts in sorted(self.later.items()):
            if not any(b.oid == oid for b in self.blockers):
                out.append(f"  {oid} changed later by {', '.join(map(str, ts))}"
                           " (merged by conflict resolution)")
        for b in self.blockers:
            out.append(f"  BLOCKED ({b.kind}) on {b.storage}: {b.text}")
            for t in b.later:
                out.append(f"    later transaction {t}")
        if self.heal_id:
            where = ", ".join(f"{s} at {_tid_hex(t)}" for s, t in sorted(self.heal_tids.items()))
            out.append(f"  heal {self.heal_id}" + (f": {where}" if where else ""))
            if self.completed:
                out.append(f"  completed a partial heal on {', '.join(self.completed)}")
        if self.daemon:
            out.append(f"  daemon: {self.daemon}")
        if self.state == REFUSED and self.blockers:
            out.append(f"  nothing changed; choose: `tidstorage repair` (the cut) or"
                       f" `tidstorage heal --accept {self.split}` (keep the split as it is)")
        return out


@dataclass
class HealResult:
    heals: list[SplitHeal] = field(default_factory=list)
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.heals)

    def to_json(self) -> dict:
        return {"dry_run": self.dry_run, "ok": self.ok, "notes": self.notes,
                "splits": [h.to_json() for h in self.heals]}

    def lines(self) -> list[str]:
        if not self.heals:
            return ["no split to heal"]
        out = []
        for h in self.heals:
            out += h.lines()
        return out


# -- the daemon ---------------------------------------------------------------


def _client(config: Config, timeout: float = CONNECT_TIMEOUT):
    from ..daemon.client import Client

    ssl_context = None
    if config.server.tls_cert is not None:
        import ssl

        ssl_context = ssl.create_default_context(cafile=str(config.server.tls_cert))
    return Client((config.server.address, config.server.port), auth_token=config.auth_token(),
                  timeout=timeout, ssl_context=ssl_context)


def _status(config: Config) -> dict:
    with _client(config) as client:
        answer = client.admin({"verb": "status"})
    if not answer.get("ok"):
        raise ClientError(f"the daemon refused the status request: {answer.get('error')}")
    return answer


def _admin_token(config: Config, required: bool) -> str | None:
    token = config.admin_token()
    if token is None and required:
        raise ConfigError("no [server] admin_token_file in the configuration: the daemon's"
                          " admin command needs it")
    return token


def accept(config: Config, split_id: str) -> dict:
    """Record through the daemon that the operator accepts ``split_id`` as
    it is (ADMIN ``accept``). Returns the daemon's answer; ToolError if it
    refuses, ClientError if it cannot be reached."""
    token = _admin_token(config, True)
    with _client(config) as client:
        answer = client.admin({"verb": "accept", "split": split_id, "token": token})
    if not answer.get("ok"):
        raise ToolError(f"the daemon refused to accept split {split_id}: {answer.get('error')}")
    return answer


# -- the storages -------------------------------------------------------------


class _Store:
    """One storage, through ZEO (read-only reader, writer for the undo) or
    its local ``Data.fs`` (one FileStorage holding its lock)."""

    def __init__(self, sid: str, st: StorageConfig) -> None:
        self.sid = sid
        self.spec = None
        self.path: Path | None = None
        if st.zeo:
            from ..daemon.zeo import ZeoSpec

            self.spec = ZeoSpec(parse_zeo_address(st.zeo), st.zeo_storage)
        elif st.data_fs is not None:
            self.path = Path(st.data_fs)
        self._reader = None
        self._writer = None
        self._fs = None

    @property
    def readable(self) -> bool:
        return self.spec is not None or self.path is not None

    @property
    def local(self) -> bool:
        return self.spec is None and self.path is not None

    def describe(self) -> str:
        return f"storage {self.sid!r} ({self.spec})" if self.spec else \
            f"storage {self.sid!r} ({self.path})"

    def lock(self) -> None:
        """Local: open the FileStorage (it takes Data.fs.lock), or refuse."""
        if self._fs is not None or not self.local:
            return
        import zc.lockfile
        from ZODB.FileStorage import FileStorage

        if not self.path.exists():
            raise ToolError(f"{self.describe()}: {self.path} does not exist")
        try:
            self._fs = FileStorage(str(self.path))
        except zc.lockfile.LockError:
            holder = ""
            try:
                pid = Path(f"{self.path}.lock").read_text().strip()
                holder = f" (process {pid})" if pid else ""
            except OSError:
                pass
            raise ToolError(f"{self.describe()}: {self.path} is in use{holder}: stop the"
                            " process using it or use ZEO (a local storage is only healed"
                            " when nothing uses it)") from None

    def reader(self):
        if self.local:
            self.lock()
            return self._fs
        if self._reader is None:
            from ..daemon.zeo import open_client

            self._reader = open_client(self.spec, CONNECT_TIMEOUT, read_only=True,
                                       storage_id=self.sid)
        return self._reader

    def writer(self):
        if self.local:
            self.lock()
            return self._fs
        if self._writer is None:
            from ..daemon.zeo import open_client

            self._writer = open_client(self.spec, CONNECT_TIMEOUT, storage_id=self.sid)
        return self._writer

    def headers(self, after: int) -> Iterable[tuple[int, dict, str, str]]:
        """(tid, extension, user, description) of every transaction with a
        TID > ``after`` (-1: all), read without taking any lock."""
        if self.local and self._fs is None:
            from ..formats import filestorage

            path = self.path
            if not path.exists() or path.stat().st_size <= 4:
                return
            pos = 4 if after < 0 else filestorage.find_cut(path, after).offset
            for h in filestorage.iter_forward(path, pos):
                if not h.finished:
                    break
                try:
                    ext = h.ext()
                except Exception:
                    ext = {}
                yield h.tid, ext, _text(h.user), _text(h.description)
            return
        start = p64(after + 1) if after >= 0 else None
        it = self.reader().iterator(start, None)
        try:
            for txn in it:
                ext = txn.extension if isinstance(txn.extension, Mapping) else {}
                yield u64(txn.tid), ext, _text(txn.user), _text(txn.description)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def records(self, start: int) -> Iterable[tuple[Later, bytes, bytes | None]]:
        """(transaction, oid, data) of every data record from TID ``start``,
        read without taking any lock (a local file in use is read as it is)."""
        if self.local and self._fs is None:
            from ZODB.FileStorage import FileIterator

            if not self.path.exists():
                return
            it = FileIterator(str(self.path), p64(start))
        else:
            it = self.reader().iterator(p64(start), None)
        try:
            for txn in it:
                lt = Later(self.sid, u64(txn.tid), _text(txn.user), _text(txn.description))
                for rec in txn:
                    yield lt, rec.oid, rec.data
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        for name in ("_reader", "_writer", "_fs"):
            obj = getattr(self, name)
            setattr(self, name, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # pragma: no cover - closing never masks errors
                    pass


def _ts(ext) -> Mapping | None:
    value = ext.get(STAMP_KEY) if isinstance(ext, Mapping) else None
    return value if isinstance(value, Mapping) else None


def _barrier(stores: Mapping[str, _Store], timeout: float) -> None:
    """A no-op 2PC over the ZEO ``stores`` (bounded by ``timeout``)."""
    from ..daemon.zeo import commit_noop

    specs = {sid: st.spec for sid, st in stores.items() if st.spec is not None}
    if not specs:
        return
    box: dict = {}

    def run():
        try:
            box["tids"] = commit_noop(specs, CONNECT_TIMEOUT, description="tidstorage heal barrier")
        except BaseException as exc:  # reported below
            box["error"] = exc

    thread = threading.Thread(target=run, name="tidstorage-heal-barrier", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ToolError(f"the barrier over {', '.join(sorted(specs))} did not finish within"
                        f" {timeout:g} s: a transaction holds a commit lock there and can"
                        " still finish; nothing healed")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, ZeoUnavailable):
            raise ToolError(f"the barrier failed: {exc}; nothing healed") from exc
        raise exc


# -- the analysis -------------------------------------------------------------


def _class_of(data) -> str | None:
    if not data:
        return None
    try:
        from ZODB.utils import get_pickle_metadata

        module, name = get_pickle_metadata(data)
        return f"{module}.{name}" if module else name
    except Exception:
        return None


def _refs(data: bytes) -> tuple[set[bytes], set[tuple[str, bytes]]]:
    """The references in a record's pickle: (oids of its own database,
    (database name, oid) of cross-database ones).  Weak references are left
    out: a weak reference to a missing object is None, not an error."""
    from ZODB.serialize import PersistentUnpickler

    refs: list = []
    try:
        u = PersistentUnpickler(None, refs.append, io.BytesIO(data))
        u.noload()
        u.noload()
    except Exception:
        pass
    local: set[bytes] = set()
    cross: set[tuple[str, bytes]] = set()
    for ref in refs:
        db = None
        if isinstance(ref, tuple) and ref:
            oid = ref[0]
        elif isinstance(ref, (bytes, str)):
            oid = ref
        elif isinstance(ref, list) and len(ref) == 2 and ref[0] in ("m", "n"):
            args = ref[1]
            if not (isinstance(args, tuple) and len(args) >= 2):
                continue
            db, oid = args[0], args[1]
        else:
            continue
        if isinstance(oid, str):
            oid = oid.encode("latin-1")
        if not (isinstance(oid, bytes) and len(oid) == 8):
            continue
        if db is None:
            local.add(oid)
        else:
            cross.add((_text(db), oid))
    return local, cross


#: How far before the split (seconds of TID time) the other storages' records
#: are read for cross-database references to the objects it created: their
#: TIDs come from other clocks (other ZEO servers, other hosts).
MAX_CLOCK_SKEW = 300.0


def _reaches(db: str, holder: str, databases: Mapping[str, str]) -> bool:
    """Can a cross-database reference to ``db`` point into ``holder``?  Yes
    when ``db`` is the holder's database, and when it names no configured
    storage (a database name the config does not know: assumed to be it)."""
    return databases.get(db, holder) == holder


def _load_before(storage, oid: bytes, tid: bytes):
    from ZODB.POSException import POSKeyError

    try:
        return storage.loadBefore(oid, tid)
    except POSKeyError:
        return None


def _analyse(heal: SplitHeal, store: _Store, tid: int, databases: Mapping[str, str]) -> None:
    """The split's objects on ``store``, later changes, dangling references."""
    storage = store.reader()
    sid = store.sid
    try:
        supports = storage.supportsUndo()
    except Exception:
        supports = False
    if not supports:
        heal.blockers.append(Blocker("no-undo", sid, f"{store.describe()} does not support undo"))
        return
    objs: dict[bytes, Obj] = {}
    it = storage.iterator(p64(tid), p64(tid))
    try:
        for txn in it:
            if u64(txn.tid) != tid:
                continue
            for rec in txn:
                objs[rec.oid] = Obj(rec.oid.hex(), _class_of(rec.data), False)
    finally:
        getattr(it, "close", lambda: None)()
    if not objs:
        heal.blockers.append(Blocker("undo-error", sid, f"the record at {_tid_hex(tid)} on"
                                     f" {store.describe()} cannot be read (packed?)"))
        return
    created = set()
    for oid, obj in objs.items():
        if _load_before(storage, oid, p64(tid)) is None:
            obj.created = True
            created.add(oid)
    heal.objects[sid] = sorted(objs.values(), key=lambda o: o.oid)
    later: dict[bytes, list[Later]] = {}
    #: the latest revision after the split of each object referring to one
    #: the split created: oid -> (transaction, referenced oids)
    latest: dict[bytes, tuple[Later, set[bytes]]] = {}
    for lt, oid, data in store.records(tid + 1):
        if oid in objs:
            later.setdefault(oid, []).append(lt)
        if not created:
            continue
        latest.pop(oid, None)
        if data and oid not in created:
            local, cross = _refs(data)
            used = (local | {o for d, o in cross if _reaches(d, sid, databases)}) & created
            if used:
                latest[oid] = (lt, used)
    for oid, ts in later.items():
        heal.later[oid.hex()] = ts
    heal.created[sid] = created
    dangling: dict[bytes, list[tuple[Later, bytes]]] = {}
    for oid, (lt, used) in latest.items():
        for ref in used:
            dangling.setdefault(ref, []).append((lt, oid))
    _dangling_blockers(heal, sid, objs, dangling, "")


def _dangling_blockers(heal: SplitHeal, sid: str, objs: Mapping[bytes, Obj],
                       dangling: Mapping[bytes, list[tuple[Later, bytes]]], where: str) -> None:
    for ref, users in sorted(dangling.items()):
        names = ", ".join(f"{o.hex()} (last written by {_tid_hex(t.tid)})"
                          for t, o in users[:MAX_NAMED])
        heal.blockers.append(Blocker(
            "dangling", sid, f"object {ref.hex()} ({objs[ref].cls or '?'}) was created by"
            f" the split and is referenced by later object(s) {names}{where}: undoing it"
            " would leave a dangling reference (a POSKeyError later)",
            ref.hex(), objs[ref].cls, [t for t, _ in users[:MAX_NAMED]]))


def _foreign_refs(heal: SplitHeal, stores: Mapping[str, _Store],
                  databases: Mapping[str, str]) -> None:
    """Cross-database references, in the other storages' records, to the
    objects the split created on its holders (each other storage is read
    once, from :data:`MAX_CLOCK_SKEW` before the earliest part)."""
    from ..core.tids import shift_tid

    created = {s: c for s, c in heal.created.items() if c}
    if not created:
        return
    start = shift_tid(min(heal.holders[s] for s in created), -MAX_CLOCK_SKEW)
    for sid, store in sorted(stores.items()):
        if sid in heal.holders and set(created) == {sid}:
            continue  # its own records were read by _analyse
        #: the latest revision of each of its objects with a cross-database
        #: reference to a created object: oid -> (transaction, references)
        found: dict[bytes, tuple[Later, set[tuple[str, bytes]]]] = {}
        if not store.readable:
            for holder in created:
                heal.blockers.append(Blocker(
                    "unchecked", holder, f"storage {sid!r} cannot be read (neither zeo nor"
                    f" data_fs): its references to the {len(created[holder])} object(s) the"
                    " split created cannot be checked"))
            continue
        try:
            for lt, oid, data in store.records(start):
                found.pop(oid, None)
                if not data:
                    continue
                cross = {(d, o) for d, o in _refs(data)[1]
                         if any(o in c and _reaches(d, h, databases) and h != sid
                                for h, c in created.items())}
                if cross:
                    found[oid] = (lt, cross)
        except (ZeoUnavailable, OSError) as exc:
            for holder in created:
                heal.blockers.append(Blocker(
                    "unchecked", holder, f"{store.describe()} cannot be read ({exc}): its"
                    " references to the object(s) the split created cannot be checked"))
            continue
        for holder, oids in sorted(created.items()):
            if holder == sid:
                continue
            dangling: dict[bytes, list[tuple[Later, bytes]]] = {}
            for oid, (lt, cross) in found.items():
                for d, ref in cross:
                    if ref in oids and _reaches(d, holder, databases):
                        dangling.setdefault(ref, []).append((lt, oid))
            objs = {bytes.fromhex(o.oid): o for o in heal.objects.get(holder, [])}
            _dangling_blockers(heal, holder, objs, dangling, f" on storage {sid!r}")


# -- the undo -----------------------------------------------------------------


class _Trial(Exception):
    pass


class _IsHeal(Exception):
    """The id to heal is itself a (partial) heal: complete the split's heal."""

    def __init__(self, split: str) -> None:
        super().__init__(split)
        self.split = split


class _UndoFailed(Exception):
    def __init__(self, sid: str, exc: BaseException, finished: dict[str, int]) -> None:
        super().__init__(f"{sid}: {type(exc).__name__}: {exc}")
        self.sid = sid
        self.exc = exc
        self.finished = finished


def _order(clients: Mapping) -> list[str]:
    def key(sid):
        try:
            k = clients[sid].sortKey()
        except Exception:
            k = ""
        return (str(k), sid)
    return sorted(clients, key=key)


class _Raced(Exception):
    """Another heal of the split committed while this one ran (found with
    the commit locks held: nothing of this one was written)."""

    def __init__(self, heals: Mapping[str, tuple[str, int]]) -> None:
        super().__init__(", ".join(f"{h} on {s}" for s, (h, _t) in sorted(heals.items())))
        self.heals = dict(heals)


def _no_other_heal(stores: Mapping[str, _Store], tids: Mapping[str, int], split_id: str
                   ) -> None:
    """Raise _Raced if a heal of ``split_id`` is after ``tids[s]`` on a store.

    Called between the votes and the first finish: every store's commit lock
    is ours (ZEO takes it at vote and runs the undo under it; a local store
    is ours alone), so a heal committed before is seen here and one started
    since waits for the lock and then sees this one.  Without it, two heals
    started together both undo the split: for an object whose conflict
    resolution merges an undo (``BTrees.Length``, a counter), the second undo
    is applied again (a counter decremented twice)."""
    raced = {}
    for sid, store in stores.items():
        for tid, ext, _user, _desc in store.headers(int(tids[sid])):
            value = _ts(ext)
            if value is not None and value.get("heals") == split_id:
                raced[sid] = (str(value.get("id")), tid)
                break
    if raced:
        raise _Raced(raced)


def _undo(stores: Mapping[str, _Store], tids: Mapping[str, int], stamp: dict, split_id: str,
          finish: bool) -> dict[str, int]:
    """Undo ``tids[s]`` on every store, as one 2PC; ``finish`` False: vote,
    then abort (the trial: nothing is written).  Before the first finish, no
    other heal of the split may be there (:func:`_no_other_heal`).  Raises
    _UndoFailed, or _Raced."""
    from ZODB.Connection import TransactionMetaData

    clients = {sid: st.writer() for sid, st in stores.items()}
    meta = TransactionMetaData(user="", description=f"tidstorage heal of {split_id}",
                               extension={STAMP_KEY: stamp})
    order = _order(clients)
    begun: list[str] = []
    finished: dict[str, int] = {}
    current = order[0]
    try:
        for sid in order:
            current = sid
            clients[sid].tpc_begin(meta)
            begun.append(sid)
        for sid in order:
            current = sid
            clients[sid].undo(undo_id(tids[sid]), meta)
        for sid in order:
            current = sid
            clients[sid].tpc_vote(meta)
        if not finish:
            raise _Trial
        _no_other_heal(stores, tids, split_id)
        for sid in order:
            current = sid
            begun.remove(sid)
            tid = clients[sid].tpc_finish(meta)
            finished[sid] = u64(tid if tid is not None else clients[sid].lastTransaction())
    except BaseException as exc:
        for sid in begun:
            try:
                clients[sid].tpc_abort(meta)
            except Exception:
                pass
        if isinstance(exc, _Trial):
            return {}
        if isinstance(exc, _Raced) or not isinstance(exc, Exception):
            raise
        raise _UndoFailed(current, exc, finished) from exc
    return finished


def undo_id(tid: int) -> bytes:
    """The transaction id ``undo`` takes for ``tid``: FileStorage's (and so
    ZEO's) is the base64 of the TID, as ``undoLog`` gives it."""
    import base64

    return base64.encodebytes(p64(tid)).rstrip(b"\n")


def _unwrap(exc: BaseException) -> BaseException:
    """ZEO sends a server-side error it cannot rebuild as a ServerException
    of (class name, its ``__dict__``): an UndoError is rebuilt as one."""
    from ZODB.POSException import UndoError

    args = getattr(exc, "args", ())
    if type(exc).__name__ == "ServerException" and len(args) == 2 \
            and args[0] == "ZODB.POSException.UndoError" and isinstance(args[1], dict):
        return UndoError(args[1].get("_reason"), args[1].get("_oid"))
    return exc


def _undo_blockers(heal: SplitHeal, failed: _UndoFailed) -> list[Blocker]:
    """What the failed undo says is in the way: one blocker per object an
    UndoError names (a MultipleUndoErrors names several)."""
    from ZODB.POSException import MultipleUndoErrors, UndoError

    exc = _unwrap(failed.exc)
    errors = list(getattr(exc, "_errs", []) or []) if isinstance(exc, MultipleUndoErrors) \
        else [exc]
    out = []
    for err in errors:
        if isinstance(err, tuple) and len(err) == 2:  # MultipleUndoErrors: (oid, error)
            err = err[1]
        oid = getattr(err, "_oid", None)
        if not (isinstance(err, UndoError) and isinstance(oid, bytes)):
            why = getattr(err, "_reason", None) or str(err)
            if why == "non-undoable transaction":  # FileStorage: at or before a pack
                why += " (packed past it?)"
            out.append(Blocker("undo-error", failed.sid,
                               f"the undo failed: {type(err).__name__}: {why}"))
            continue
        hexoid = oid.hex()
        cls = next((o.cls for o in heal.objects.get(failed.sid, []) if o.oid == hexoid), None)
        later = heal.later.get(hexoid, [])
        why = getattr(err, "_reason", None) or str(err)
        text = (f"object {hexoid} ({cls or '?'}): {why}"
                + (f" (changed after the split by {', '.join(map(str, later[:MAX_NAMED]))})"
                   if later else ""))
        out.append(Blocker("conflict", failed.sid, text, hexoid, cls, later[:MAX_NAMED]))
    return out or [Blocker("undo-error", failed.sid, f"the undo failed: {exc}")]


# -- the tool -----------------------------------------------------------------


@dataclass
class _Found:
    parts: dict[str, int] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)
    #: heal id -> (storages named, {storage: tid})
    heals: dict[str, tuple[list[str], dict[str, int]]] = field(default_factory=dict)
    #: the id's own records are a heal: of this split
    heals_of: str | None = None


def _scan(stores: Mapping[str, _Store], published: Mapping[str, int], ids: set[str]
          ) -> dict[str, _Found]:
    found = {i: _Found() for i in ids}
    for sid, store in stores.items():
        for tid, ext, _user, _desc in store.headers(int(published.get(sid, -1))):
            value = _ts(ext)
            if value is None:
                continue
            tid_id, heals = value.get("id"), value.get("heals")
            names = value.get("storages")
            names = [str(n) for n in names] if isinstance(names, (list, tuple)) else []
            if tid_id in found:
                f = found[tid_id]
                f.parts.setdefault(sid, tid)
                f.named.update(names)
                if isinstance(heals, str) and heals:
                    f.heals_of = heals
            if isinstance(heals, str) and heals in found and isinstance(tid_id, str):
                entry = found[heals].heals.setdefault(tid_id, (sorted(set(names)), {}))
                entry[1].setdefault(sid, tid)
    return found


def run_heal(config: Config, ids: Iterable[str] = (), *, dry_run: bool = False,
             echo: Echo = quiet, wait: float = DAEMON_WAIT,
             barrier_timeout: float = BARRIER_TIMEOUT,
             published: Mapping[str, int] | None = None) -> HealResult:
    """Heal the daemon's frozen splits (or ``ids``); see the module docstring.

    With ``published`` (the TID log's point: ``repair --heal``, the site and
    its daemon down), the daemon is neither asked nor told, and ``ids`` must
    be given."""
    ids = list(dict.fromkeys(ids))
    result = HealResult(dry_run=dry_run)
    offline = published is not None
    try:
        if offline:
            raise ClientError("not asked (repair --heal: the site is down)")
        status = _status(config)
    except ClientError as exc:
        if not ids:
            raise ToolError(f"cannot ask the daemon for its splits: {exc} (give the split"
                            " ids to heal them without it)") from None
        status = None
        result.notes.append(f"the daemon cannot be reached ({exc}): each storage is read"
                            " from its beginning")
        echo(f"warning: {result.notes[-1]}")
    if not offline:
        published = {s: int(t) for s, t in (status or {}).get("published", {}).items()
                     if t is not None}
    splits = dict((status or {}).get("splits", {})) if status else {}
    if status and status.get("split_count", len(splits)) > len(splits) and not ids:
        result.notes.append(f"the daemon lists {len(splits)} of its {status['split_count']}"
                            " splits: run heal again for the others")
        echo(f"note: {result.notes[-1]}")
    targets = ids or sorted(splits)
    if not targets:
        return result
    stores = {sid: _Store(sid, st) for sid, st in config.storages.items()}
    done: dict[str, SplitHeal] = {}
    try:
        for split_id in targets:
            if split_id in done:
                continue
            heal = SplitHeal(split_id)
            result.heals.append(heal)
            try:
                try:
                    _heal_one(config, heal, splits.get(split_id), stores, published, dry_run,
                              echo, barrier_timeout)
                except _IsHeal as redirect:
                    # A heal killed between its finishes: the daemon lists the
                    # heal itself as split. Complete the heal of its split.
                    if redirect.split in done:
                        heal.state = done[redirect.split].state
                        heal.reason = f"a heal of {redirect.split}, completed above"
                        continue
                    echo(f"{split_id} is an interrupted heal of {redirect.split}: completing it")
                    result.heals[-1] = heal = SplitHeal(redirect.split)
                    _heal_one(config, heal, splits.get(redirect.split), stores, published,
                              dry_run, echo, barrier_timeout)
                    done[split_id] = heal
            except ToolError as exc:
                heal.state, heal.reason = REFUSED, str(exc)
            done[heal.split] = heal
            if heal.state in (HEALED, ALREADY) and not dry_run and not offline:
                _tell_daemon(config, heal, wait, echo)
    finally:
        for store in stores.values():
            store.close()
    return result


def _heal_one(config, heal: SplitHeal, known: Mapping | None, stores, published, dry_run,
              echo, barrier_timeout) -> None:
    split_id = heal.split
    if not split_id.startswith("ts:") and known is None:
        echo(f"note: {split_id} does not look like a coherency id (ts:...)")
    # Where to look: the daemon's parts and missing storages, or everywhere.
    if known is not None:
        said = {str(s): int(t) for s, t in dict(known.get("parts", {})).items()}
        candidates = set(said) | {str(s) for s in known.get("missing", [])}
    else:
        said = {}
        pre = _scan({s: st for s, st in stores.items() if st.readable}, published, {split_id})
        f = pre[split_id]
        if not f.parts:
            raise ToolError(f"no record of {split_id} above the published TID of any storage"
                            " (not a split: a published point keeps a transaction whole, or"
                            " an id that was never written)")
        if f.heals_of:
            raise _IsHeal(f.heals_of)
        candidates = set(f.parts) | f.named
    unknown = sorted(s for s in candidates if s not in stores)
    if unknown:
        raise ToolError(f"the split names storages that are not configured: {', '.join(unknown)}:"
                        " its part there cannot be proven missing")
    unreadable = sorted(s for s in candidates if not stores[s].readable)
    if unreadable:
        raise ToolError(f"storage(s) {', '.join(unreadable)} cannot be read (neither zeo nor"
                        " data_fs): the split cannot be proven there")
    involved = {s: stores[s] for s in sorted(candidates)}
    # The proof: local storages locked, a barrier where the part is missing.
    for st in involved.values():
        st.lock()
    # Where the part was seen, it has finished: the barrier is where it was not.
    seen = said if known is not None else pre[split_id].parts
    _barrier({s: st for s, st in involved.items() if s not in seen}, barrier_timeout)
    found = _scan(involved, published, {split_id})[split_id]
    if found.heals_of:
        raise _IsHeal(found.heals_of)
    named = sorted(found.named | candidates)
    heal.storages = named
    extra = sorted(s for s in found.named if s not in involved)
    if extra:
        raise ToolError(f"the stamp names storages the daemon did not list: {', '.join(extra)}")
    heal.holders = dict(sorted(found.parts.items()))
    heal.missing = [s for s in named if s not in found.parts]
    if not found.parts:
        raise ToolError("no record of it above the published point of its storages (the"
                        " files do not show the split the daemon reported)")
    if not heal.missing:
        raise ToolError("not a split: after the barrier, its record is on every storage it"
                        " names (" + ", ".join(f"{s} at {_tid_hex(t)}" for s, t in
                                               heal.holders.items()) + "): nothing to heal")
    for s, tid in said.items():
        if found.parts.get(s) != tid:
            raise ToolError(f"the daemon says its part on {s} is at {_tid_hex(tid)}, the file"
                            f" has {_tid_hex(found.parts.get(s))}: not healed")
    for s in heal.missing:
        if s in said:
            raise ToolError(f"the daemon says it is on {s}, the file does not have it")
    # Heals already there (a re-run; a heal killed between its finishes).
    if len(found.heals) > 1:
        raise ToolError("several heals of it are in the files ("
                        + ", ".join(sorted(found.heals)) + "): heal it by hand, or repair")
    todo = dict(heal.holders)
    hid, heal_storages = heal_id(), sorted(heal.holders)
    if found.heals:
        hid, (heal_storages, parts) = next(iter(found.heals.items()))
        heal.heal_id, heal.heal_storages, heal.heal_tids = hid, heal_storages, dict(parts)
        if set(heal_storages) != set(heal.holders):
            raise ToolError(f"the heal {hid} in the files names {', '.join(heal_storages)},"
                            f" the split is on {', '.join(heal.holders)}: heal it by hand")
        todo = {s: t for s, t in heal.holders.items() if s not in parts}
        if not todo:
            heal.state = ALREADY
            heal.reason = f"by {hid}"
            return
        # Partial: the heal's writer may still be finishing where it is missing.
        echo(f"{split_id}: a partial heal {hid} is on {', '.join(sorted(parts))}:"
             f" completing it on {', '.join(sorted(todo))}")
        _barrier({s: involved[s] for s in todo}, barrier_timeout)
        again = _scan({s: involved[s] for s in todo}, published, {split_id})[split_id]
        if again.heals.get(hid):
            raise ToolError(f"the heal {hid} appeared on {', '.join(again.heals[hid][1])}"
                            " during the barrier (another heal running?): run it again")
    heal.heal_id, heal.heal_storages = hid, heal_storages
    # Feasibility.
    databases = config.databases()
    for s, tid in todo.items():
        _analyse(heal, involved[s], tid, databases)
    if not heal.blockers:
        _foreign_refs(heal, stores, databases)
    if heal.blockers:
        heal.state, heal.reason = REFUSED, "the undo is not possible"
        return
    todo_stores = {s: involved[s] for s in todo}
    stamp = heal_stamp(hid, heal_storages, split_id)
    try:
        _undo(todo_stores, todo, stamp, split_id, finish=False)
    except _UndoFailed as failed:
        heal.blockers.extend(_undo_blockers(heal, failed))
        heal.state, heal.reason = REFUSED, "the undo is not possible"
        return
    if dry_run:
        heal.state = HEALABLE
        heal.reason = "would undo its part on " + ", ".join(sorted(todo))
        return
    try:
        tids = _undo(todo_stores, todo, stamp, split_id, finish=True)
    except _Raced as raced:
        others = {h for h, _ in raced.heals.values()}
        if set(raced.heals) == set(todo) and len(others) == 1 and (
                not found.heals or others == {hid}):
            heal.heal_id = next(iter(others))
            heal.heal_tids.update({s: t for s, (_h, t) in raced.heals.items()})
            heal.state = ALREADY
            heal.reason = f"by {heal.heal_id}, another heal that committed while this one ran"
            return
        raise ToolError(f"another heal of it committed while this one ran ({raced}): nothing"
                        " of this one was written; run heal again") from None
    except _UndoFailed as failed:
        if failed.finished:
            heal.heal_tids.update(failed.finished)
            raise ToolError(f"the heal failed on {failed.sid} after it finished on "
                            f"{', '.join(failed.finished)}: {failed.exc}; run heal again to"
                            " complete it") from None
        heal.blockers.extend(_undo_blockers(heal, failed))
        heal.state, heal.reason = REFUSED, "the undo failed; nothing changed"
        return
    heal.heal_tids.update(tids)
    heal.completed = sorted(tids) if found.heals else []
    heal.state = HEALED
    echo(f"{split_id}: healed by {hid}: " + ", ".join(
        f"{s} at {_tid_hex(t)}" for s, t in sorted(tids.items())))


def _tell_daemon(config: Config, heal: SplitHeal, wait: float, echo: Echo) -> None:
    """ADMIN healed (a hint), then wait for the daemon to show it."""
    try:
        token = _admin_token(config, False)
    except ConfigError as exc:
        token = None
        echo(f"warning: {exc}")
    hint = "not sent (no admin token: the daemon reads the heal from the files)"
    try:
        if token is not None:
            with _client(config) as client:
                answer = client.admin({"verb": "healed", "split": heal.split,
                                       "heal": heal.heal_id, "tids": heal.heal_tids,
                                       "token": token})
            hint = "told" if answer.get("ok") else f"refused the hint: {answer.get('error')}"
    except ClientError as exc:
        hint = f"not told ({exc})"
    deadline = time.monotonic() + wait
    last = ""
    while True:
        try:
            status = _status(config)
            entry = status.get("splits", {}).get(heal.split)
            frozen = entry is not None and not (isinstance(entry, Mapping) and (
                entry.get("healed") or entry.get("heal")))
            published = status.get("published", {})
            behind = sorted(s for s, t in heal.heal_tids.items()
                            if published.get(s) is None or published[s] < t)
            if not frozen and not behind:
                heal.daemon_ok = True
                heal.daemon = f"{hint}; unfrozen, published past the heal"
                return
            last = ("still lists the split as frozen" if frozen else
                    f"has not published past the heal on {', '.join(behind)}")
        except ClientError as exc:
            last = f"cannot be reached ({exc})"
        if time.monotonic() >= deadline:
            heal.daemon_ok = False
            heal.daemon = (f"{hint}; after {wait:g} s the daemon {last} (the files are healed;"
                           " see `tidstorage status`)")
            return
        time.sleep(0.2)
