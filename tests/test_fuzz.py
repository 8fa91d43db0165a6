"""Fuzzing the daemon's input (issue 9): valid grammar plus byte mutations,
several connections at once, the state checked against a model.

(a) In process: the real ``protocol.Decoder`` and ``coordinator.Coordinator``
    (sans-io, driven as ``server.py`` drives them), seeded generators. Some
    peers send mutated streams; others are well-behaved legacy clients
    (``BEGIN``/``COMMIT``/``ABORT`` on their own storages, unconfigured or
    configured without a way to read them: the tracker's rules alone
    decide). Checked after every step: nothing raises; malformed input ends
    only the peer that sent it (an ``ERROR`` event, last, then nothing);
    the published point never goes down; the well-behaved peers' storages
    are published exactly as a model of the group rule says.
(b) A real ``tidstorage serve``: connections sending mutated streams, then a
    well-behaved client whose reports are applied, the daemon alive.

Bounded to well under a minute in all.
"""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Callable

from support.fsfixtures import run_cli
from tidstorage.core import coordinator as co
from tidstorage.core import protocol as p
from tidstorage.demo.cluster import DaemonProcess

#: Storage and transaction ids of the well-behaved peers: the fuzzing peers
#: never produce them (checked), so the model owns these storages.
W_STORAGES = [f"W-store-{i}" for i in range(5)]
F_STORAGES = [f"f{i}" for i in range(6)] + ["((('127.0.0.1', 8100),), '1')", "é", ""]
F_TXNS = [f"t{i}" for i in range(8)] + ["", "x" * 200]


# -- the model of the well-behaved peers -----------------------------------------


class GroupModel:
    """The group rule of ``tracker.py`` for BEGIN without bounds, naively:
    storages linked by in-flight or held transactions form a group; groups
    merge and never split; when a group's last in-flight transaction ends,
    the newest held TID of each of its storages is published and the group
    dissolves."""

    def __init__(self) -> None:
        self.published: dict[str, int] = {}
        self.in_flight: dict[str, frozenset[str]] = {}
        self.groups: list[dict] = []  # {"storages": set, "txns": set, "held": list}

    def _group(self, storage: str) -> dict | None:
        return next((g for g in self.groups if storage in g["storages"]), None)

    def begin(self, txn: str, storages: list[str]) -> None:
        self.in_flight[txn] = frozenset(storages)
        merged = {"storages": set(storages), "txns": {txn}, "held": []}
        for group in [g for g in self.groups if g["storages"] & merged["storages"]]:
            self.groups.remove(group)
            merged["storages"] |= group["storages"]
            merged["txns"] |= group["txns"]
            merged["held"] += group["held"]
        self.groups.append(merged)

    def end(self, txn: str, tids: dict[str, int] | None) -> None:
        storages = self.in_flight.pop(txn)
        group = self._group(next(iter(storages)))
        group["txns"].discard(txn)
        if tids is not None:
            group["held"].append(tids)
        if not group["txns"]:
            self.groups.remove(group)
            for held in group["held"]:
                for storage, tid in held.items():
                    self.published[storage] = max(tid, self.published.get(storage, -1))


class WellBehaved:
    """A legacy client: one transaction at a time, TIDs from shared counters."""

    def __init__(self, n: int, rng: random.Random, clock: dict, model: GroupModel) -> None:
        self.peer = co.Peer(f"good{n}")
        self.decoder = p.Decoder()
        self.rng, self.clock, self.model = rng, clock, model
        self.name = f"W-txn-{n}-"
        self.count = 0
        self.txn: str | None = None
        self.storages: list[str] = []

    def next_message(self) -> tuple[bytes, Callable[[], None]]:
        """The next report (+ SYNC) and what it does to the model."""
        rng = self.rng
        if self.txn is None:
            self.count += 1
            txn = self.txn = f"{self.name}{self.count}"
            self.storages = rng.sample(W_STORAGES, rng.choice([1, 1, 2, 2, 3]))
            storages = self.storages
            return p.encode_begin(txn, storages), lambda: self.model.begin(txn, storages)
        txn, self.txn = self.txn, None
        if rng.random() < 0.15:
            return p.encode_abort(txn), lambda: self.model.end(txn, None)
        tids = {}
        for storage in self.storages:  # TIDs increase in the order reports are applied
            self.clock[storage] += rng.randint(1, 3)
            tids[storage] = self.clock[storage]
        return p.encode_commit(txn, tids), lambda: self.model.end(txn, tids)


# -- the fuzzing peers ---------------------------------------------------------------


def _num(rng: random.Random) -> bytes:
    return rng.choice([b"0", b"1", b"2", b"3", b"7", b"%d" % rng.randint(0, 2**64 - 1),
                       b"%d" % (2**64 - 1), b"%d" % 2**64, b"4096", b"4097", b"-1", b"+1",
                       b" 1", b"1_0", "١".encode(), b"", b"99999999999999999999999"])


def _id(rng: random.Random, pool: list[str]) -> bytes:
    r = rng.random()
    if r < 0.9:
        return rng.choice(pool).encode()
    if r < 0.985:
        return "".join(rng.choice("abcxyz019 '(),.é") for _ in range(rng.randint(1, 12))).encode()
    if r < 0.99:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    return b"z" * rng.choice([p.MAX_FIELD_BYTES, p.MAX_FIELD_BYTES, p.MAX_FIELD_BYTES + 1])


def _command(rng: random.Random) -> bytes:
    """One command of the grammar, mostly well formed (over random ids)."""
    kind = rng.choice(["BEGIN", "BEGIN", "BEGIN2", "COMMIT", "COMMIT", "ABORT", "DUMP",
                       "BOOTSTRAPED", "SYNC", "SYNC", "LOST", "INDOUBT", "HELLO", "AUTH",
                       "QUIT"]) if rng.random() < 0.99 else "FROB"
    name = kind.encode() if rng.random() < 0.8 else kind.lower().encode()
    n = rng.choice([0, 1, 1, 2, 3])
    keys = [_id(rng, F_STORAGES) for _ in range(n)]
    if rng.random() < 0.02:  # a wrong count
        count = _num(rng)
    else:
        count = b"%d" % n
    txn = _id(rng, F_TXNS)
    tids = [b"%d" % rng.choice([0, 1, 5, 10, 11, 2**64 - 1, rng.randint(0, 50)])
            if rng.random() < 0.98 else _num(rng) for _ in range(n)]
    if kind == "BEGIN":
        fields = [name, txn, count, *keys]
    elif kind in ("BEGIN2", "COMMIT"):
        fields = [name, txn, count, *keys, *tids]
    elif kind in ("ABORT", "INDOUBT"):
        fields = [name, txn]
    elif kind == "LOST":
        fields = [name, count, *keys]
    elif kind == "HELLO":
        fields = [name, rng.choice([b"s1", b"s2", b"s3"]), rng.choice([b"k1", b"k2"]),
                  b"%d" % rng.randint(1, 99999) if rng.random() < 0.9 else _num(rng), b"host"]
    elif kind == "AUTH":
        fields = [name, _id(rng, ["token", ""])]
    else:
        fields = [name]
    sep = b"\r\n" if rng.random() < 0.1 else b"\n"
    return sep.join(fields) + sep


INSERTS = [b"\n", b"\r", b"\xff", b"\x00", b"-", b"+", b" ", b"9", b"BEGIN\n", b"COMMIT\n",
           b"4096\n", b"\xc3", "é".encode()]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not data:
            break
        i = rng.randrange(len(data))
        r = rng.random()
        if r < 0.3:
            data[i] = rng.randrange(256)
        elif r < 0.5:
            del data[i : i + rng.randint(1, 8)]
        elif r < 0.75:
            data[i:i] = rng.choice(INSERTS)
        elif r < 0.9:
            j = rng.randrange(len(data))
            data[i:i] = data[j : j + rng.randint(1, 20)]
        else:
            del data[i:]
    return bytes(data)


def fuzz_stream(rng: random.Random) -> bytes:
    """Commands of the grammar, some of them mutated."""
    rate = rng.choice([0.0, 0.01, 0.05, 0.2])
    out = []
    for _ in range(rng.randint(1, 40)):
        command = _command(rng)
        out.append(_mutate(rng, command) if rng.random() < rate else command)
    return b"".join(out)


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6)))) \
        if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def _strings(event: tuple):
    for item in event[1:]:
        if isinstance(item, str):
            yield item
        elif isinstance(item, (list, dict)):
            yield from item


# -- (a) in process --------------------------------------------------------------------


class Shell:
    """What ``server.py`` does around the coordinator, without sockets."""

    def __init__(self, configured: bool) -> None:
        self.now = 1000.0
        kinds = dict.fromkeys(W_STORAGES + F_STORAGES[:3], None) if configured else {}
        self.core = co.Coordinator(kinds, {}, clock=lambda: self.now, daemon_id="fuzz")
        self.timers: dict[tuple, float] = {}
        self.point: dict[str, int] = {}
        self.core.start()
        self.act()

    def act(self) -> None:
        for action in self.core.take_actions():
            if isinstance(action, co.SetTimer):
                self.timers[action.key] = self.now + action.delay
            elif isinstance(action, co.Publish):
                for storage, tid in action.changes.items():
                    assert tid > self.point.get(storage, -1), (storage, tid, self.point)
                    self.point[storage] = tid
            else:  # no storage is readable: nothing to scan, no no-op
                raise AssertionError(f"unexpected action {action}")
        published = dict(self.core.published())
        assert all(published.get(s, -1) >= t for s, t in self.point.items()), "went down"
        self.point.update(published)

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for key, due in sorted(self.timers.items(), key=lambda kv: kv[1]):
            if due <= self.now:
                del self.timers[key]
                self.core.timer(key)
        self.act()


def run_seed(seed: int, steps: int = 300) -> dict:
    rng = random.Random(seed)
    shell = Shell(configured=seed % 2 == 1)
    core = shell.core
    model = GroupModel()
    clock = dict.fromkeys(W_STORAGES, 0)
    good = [WellBehaved(n, rng, clock, model) for n in range(3)]
    names = iter(range(10**6))

    def connect() -> list:
        return [co.Peer(f"bad{next(names)}"), p.Decoder(), _chunks(rng, fuzz_stream(rng))]

    bad = [connect() for _ in range(rng.randint(2, 5))]
    stats = {"errors": 0, "quits": 0, "drops": 0, "events": 0, "good": 0}
    for _ in range(steps):
        if rng.random() < 0.3:
            g = rng.choice(good)
            message, effect = g.next_message()
            events = g.decoder.feed(message + p.SYNC_REQUEST)
            assert core.apply(g.peer, events) == b"1\n"  # registered
            effect()
            shell.act()
            stats["good"] += 1
            _check_model(core, model)
            continue
        entry = rng.choice(bad)
        peer, decoder, chunks = entry
        events = decoder.feed(chunks.pop(0))
        stats["events"] += len(events)
        for event in events:
            assert not any(s.startswith(("W-store-", "W-txn-")) for s in _strings(event)), event
        error = events and events[-1][0] is p.ERROR
        assert all(e[0] is not p.ERROR for e in events[:-1]), events
        if error:
            events.pop()
        if events:
            core.apply(peer, events)
        shell.act()
        if error or peer.quit or not chunks:
            if error:
                assert decoder.feed(b"DUMP\n") == []  # broken for good
            stats["errors" if error else "quits" if peer.quit else "drops"] += 1
            core.connection_closed(peer)  # the shell closes it (or it went away)
            shell.act()
            bad[bad.index(entry)] = connect()
        if rng.random() < 0.05:
            shell.tick(rng.choice([0.1, 1.0, 61.0]))
        if rng.random() < 0.01:
            core.describe()
        _check_model(core, model)
    for g in good:  # end what they have open: every group becomes quiet
        if g.txn is not None:
            message, effect = g.next_message()
            assert core.apply(g.peer, g.decoder.feed(message + p.SYNC_REQUEST)) == b"1\n"
            effect()
            shell.act()
    _check_model(core, model)
    assert not model.in_flight
    return stats


def _check_model(core: co.Coordinator, model: GroupModel) -> None:
    published = {s: t for s, t in core.published().items() if s.startswith("W-store-")}
    assert published == model.published
    in_flight = {t: s for t, s in core.tracker.in_flight().items() if t.startswith("W-txn-")}
    assert in_flight == model.in_flight


def test_fuzzed_peers_break_nothing_but_themselves():
    totals: dict[str, int] = {}
    deadline = time.monotonic() + 25  # a budget: most seeds run in far less
    seeds = 0
    for seed in range(1000):
        for key, value in run_seed(seed).items():
            totals[key] = totals.get(key, 0) + value
        seeds += 1
        if time.monotonic() > deadline:
            break
    assert seeds >= 20, seeds
    # every way a connection ends is reached, and the model is used
    assert min(totals["errors"], totals["quits"], totals["drops"]) > seeds, totals
    assert totals["good"] > 50 * seeds, totals


def test_the_model_is_the_group_rule():
    """The model itself, on the tracker's chain example."""
    m = GroupModel()
    m.begin("t1", ["s1", "s2"])
    m.begin("t2", ["s1", "s3"])
    m.end("t2", {"s1": 2, "s3": 1})
    m.begin("t3", ["s3"])
    m.end("t3", {"s3": 2})
    assert m.published == {}
    m.end("t1", {"s1": 1, "s2": 2})
    assert m.published == {"s1": 2, "s2": 2, "s3": 2}


# -- (b) a real daemon ---------------------------------------------------------------


def test_a_real_daemon_survives_fuzzed_connections(tmp_path):
    d = DaemonProcess(tmp_path / "d", verbose=False).start()  # no [storages]: any id
    try:
        rng = random.Random(9)
        deadline = time.monotonic() + 10
        point: dict[str, int] = {}
        rounds = 0
        with d.client() as watcher:
            while time.monotonic() < deadline and rounds < 400:
                rounds += 1
                sockets = []
                for _ in range(8):  # several connections at once
                    s = socket.create_connection(d.address, timeout=5)
                    sockets.append((s, _chunks(rng, fuzz_stream(rng))))
                while any(chunks for _, chunks in sockets):
                    s, chunks = rng.choice([x for x in sockets if x[1]])
                    try:
                        s.sendall(chunks.pop(0))
                    except OSError:  # the daemon closed it (garbage, QUIT): fine
                        chunks.clear()
                for s, _ in sockets:
                    s.close()
                dump = watcher.dump()  # it answers, and never goes down
                assert all(dump.get(s, -1) >= t for s, t in point.items()), (point, dump)
                point = dump
            assert d.proc.poll() is None, d.log()
        tids = {"W-store-0": 10**15, "W-store-1": 10**15 + 1}
        with d.client() as c:
            c.begin("W-txn-1", list(tids), sync=True)
            c.commit("W-txn-1", tids)
            c.sync()
            dump = c.dump()
        assert {s: dump.get(s) for s in tids} == tids
        r = run_cli("dump", "--server", f"127.0.0.1:{d.port}", "--json", timeout=30)
        assert r.returncode == 0, r.stderr
        assert {s: json.loads(r.stdout).get(s) for s in tids} == tids
    finally:
        code = d.stop()
    assert code == 0, d.log()
    log = d.log()
    assert "Traceback" not in log, log[-5000:]
    assert "protocol error" in log and rounds >= 10
