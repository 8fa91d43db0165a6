"""A deterministic simulation of the whole protocol, with faults.

In the spirit of FoundationDB's simulation testing and Jepsen's fault
schedules: one seeded random generator drives, in virtual time,

* model storages: ZEO-like (commit lock taken at vote, a no-op commit
  possible, voted transactions aborted when their client's connection dies
  or the server restarts) and FileStorage-like (lock taken at ``tpc_begin``,
  one owning process, an unfinished ``c`` record visible to readers, a lock
  file naming the owner), each with its own clock offset;
* application processes running the real client code (``session.py``:
  :class:`~tidstorage.core.session.ClientSession` and
  :class:`~tidstorage.core.session.CommitFlow`), with the storage wrapper's
  sequence of calls (seal, BEGIN2 + SYNC, votes, confirmation with its
  timeout, finishes, reports, batching);
* the real daemon core (``coordinator.py`` with the tracker and the gate)
  behind real protocol codecs (``protocol.Decoder``/``ReplyReader``): bytes
  cross a simulated network;
* faults: processes killed at any point (including between their
  finishes), clean exits, connections dropped or partitioned, the daemon
  killed (its state reloaded from its simulated TID log) or stopped, ZEO
  servers restarted, locks held for long (lock delays), finishes that fail.

After every publication the published point is checked against the ground
truth (every transaction's parts in the model storages): it must keep every
multi-storage transaction whole or drop it whole. At the end (faults
stopped, writers done) the point must reach the largest coherent point of
the files (liveness), and every SPLIT the daemon declared must be a real one.

``run(seed)`` returns a :class:`Result`; the same seed replays exactly
(``bench/simulate.py --seed N --trace``).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

from tidstorage.core import coordinator as co
from tidstorage.core import protocol as p
from tidstorage.core.session import ClientSession, CommitFlow
from tidstorage.core.stamps import STAMP_KEY, Stamp, largest_coherent_cut, stamp_of
from tidstorage.core.tids import MAX_TID

US = 1_000_000  # TIDs are microseconds of (per-storage) clock time here


# -- configuration --------------------------------------------------------------


@dataclass
class Params:
    """What one seed simulates (drawn from the seed by :func:`draw`)."""

    storages: dict[str, str]  # name -> "zeo" | "file"
    offsets: dict[str, float]  # per-storage clock offset (seconds)
    processes: int
    duration: float  # seconds of workload with faults
    txn_gap: tuple[float, float]
    threads: int
    faults: dict[str, float]  # fault kind -> mean interval (seconds)
    timeout: float = 0.3  # the client's confirmation timeout
    sections: bool = False  # processes configure two sections for one daemon
    slow_io: float = 0.0  # probability that one daemon read / no-op is slow


def draw(rng: random.Random) -> Params:
    n = rng.choice((2, 2, 3, 3, 4))
    names = [f"s{i}" for i in range(n)]
    kinds = {}
    for name in names:
        kinds[name] = "file" if rng.random() < 0.3 else "zeo"
    offsets = {}
    for name in names:
        r = rng.random()
        offsets[name] = 0.0 if r < 0.5 else rng.choice((-1, 1)) * rng.uniform(0.001, 150.0)
    faults = {}
    for kind, mean in (("kill", 2.5), ("kill_between", 2.0), ("exit", 4.0), ("drop", 2.0),
                       ("partition", 4.0), ("daemon_kill", 4.0), ("daemon_stop", 8.0),
                       ("zeo_restart", 5.0), ("lock_delay", 3.0), ("finish_error", 4.0),
                       ("stall_between", 2.0),
                       ("clock_jump", 8.0)):
        if rng.random() < 0.55:
            faults[kind] = mean * rng.uniform(0.5, 2.0)
    return Params(
        storages=kinds,
        offsets=offsets,
        processes=rng.choice((1, 2, 2, 3)),
        duration=rng.uniform(2.0, 5.0),
        txn_gap=(0.005, rng.choice((0.03, 0.08, 0.2))),
        threads=rng.choice((1, 1, 2)),
        faults=faults,
        sections=rng.random() < 0.2,
        slow_io=rng.choice((0.0, 0.1, 0.3)),
    )


# -- the world ------------------------------------------------------------------


class Violation(AssertionError):
    pass


@dataclass
class Result:
    seed: int
    ok: bool
    problem: str | None
    stats: dict
    trace: list[str]
    params: Params | None = None


class Killed(Exception):
    """Raised into a process's task: it died."""


class World:
    def __init__(self, seed: int, params: Params | None = None, *, trace: bool = False,
                 mutant: Callable[["World"], None] | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.params = params or draw(self.rng)
        self.now = 0.0
        self._queue: list = []
        self._seq = itertools.count()
        self.tracing = trace
        self.trace: list[str] = []
        self.stats = collections.Counter()
        self.storages = {name: Storage(self, name, kind, self.params.offsets[name])
                         for name, kind in self.params.storages.items()}
        self.truth: dict[str, Truth] = {}  # coherency id (or txn key) -> ground truth
        self._truth_on: dict[str, list] = {s: [] for s in self.storages}
        self.processes: list[Process] = []
        self._pids = itertools.count(100)
        self.link_ids = itertools.count(1)
        self.daemon = Daemon(self)
        self.faults_on = True
        self.mutant = mutant
        if mutant is not None:
            mutant(self)

    # -- scheduling ------------------------------------------------------

    def at(self, delay: float, callback: Callable, *args) -> None:
        heapq.heappush(self._queue, (self.now + max(delay, 0.0), next(self._seq), callback, args))

    def delay(self, low: float = 0.0005, high: float = 0.005) -> float:
        return self.rng.uniform(low, high)

    def io_delay(self, low: float = 0.0005, high: float = 0.01) -> float:
        """A daemon read or no-op: sometimes slow (a busy ZEO server)."""
        if self.rng.random() < self.params.slow_io:
            return self.rng.uniform(0.02, 0.4)
        return self.rng.uniform(low, high)

    def log(self, text: str) -> None:
        if self.tracing:
            self.trace.append(f"{self.now:9.4f} {text}")

    def run_until(self, end: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= end:
            when, _, callback, args = heapq.heappop(queue)
            self.now = when
            callback(*args)
            self.stats["events"] += 1
            if self.stats["events"] > 400_000:
                raise Violation("the simulation does not settle (event limit)")
        self.now = max(self.now, end)

    # -- ground truth ------------------------------------------------------

    def committed(self, storage: "Storage", key: str, members: tuple, tid: int) -> None:
        truth = self.truth.get(key)
        if truth is None:
            truth = self.truth[key] = Truth(key, members)
        truth.parts[storage.name] = tid
        self._truth_on[storage.name].append((tid, truth))

    def check_point(self, old: dict, new: dict) -> None:
        """A published point moved from ``old`` to ``new``: is it coherent?"""
        for storage, tid in new.items():
            if tid < old.get(storage, -1):
                raise Violation(f"published TID of {storage} went down: {old} -> {new}")
        for storage, tid in new.items():
            low = old.get(storage, -1)
            for t, truth in self._truth_on.get(storage, ()):
                if low < t <= tid and len(truth.members) > 1:
                    kept = [s for s in truth.members
                            if s in truth.parts and truth.parts[s] <= new.get(s, -1)]
                    if len(kept) != len(truth.members):
                        raise Violation(
                            f"published point {new} splits {truth.key} over {truth.members}"
                            f" (parts {truth.parts}, kept on {kept})")

    def start(self) -> None:
        self.daemon.start()
        for i in range(self.params.processes):
            self.at(self.rng.uniform(0.0, 0.05), self.spawn, i)
        if self.faults_on:
            for kind, mean in self.params.faults.items():
                self.at(self.rng.expovariate(1 / mean), self.fault, kind, mean)

    def spawn(self, slot: int) -> "Process":
        proc = Process(self, next(self._pids), slot)
        self.processes.append(proc)
        proc.start()
        return proc

    def live_processes(self) -> list["Process"]:
        return [p for p in self.processes if p.alive]

    # -- faults ------------------------------------------------------------

    def fault(self, kind: str, mean: float) -> None:
        if not self.faults_on:
            return
        self.at(self.rng.expovariate(1 / mean), self.fault, kind, mean)
        rng = self.rng
        procs = self.live_processes()
        self.stats[f"fault_{kind}"] += 1
        self.log(f"FAULT {kind}")
        if kind == "kill" and procs:
            rng.choice(procs).kill()
        elif kind == "kill_between" and procs:
            rng.choice(procs).kill_between = True
        elif kind == "exit" and procs:
            rng.choice(procs).exit()
        elif kind == "drop" and procs:
            proc = rng.choice(procs)
            if proc.link is not None:
                proc.link.drop()
        elif kind == "partition" and procs:
            proc = rng.choice(procs)
            if proc.link is not None:
                proc.link.partition(rng.uniform(0.05, 1.5))
        elif kind == "daemon_kill":
            self.daemon.crash(rng.uniform(0.01, 0.8))
        elif kind == "daemon_stop":
            self.daemon.stop(rng.uniform(0.01, 0.5))
        elif kind == "zeo_restart":
            zeo = [s for s in self.storages.values() if s.kind == "zeo"]
            if zeo:
                rng.choice(zeo).restart(rng.uniform(0.01, 0.3))
        elif kind == "lock_delay" and procs:
            rng.choice(procs).slow_next = rng.uniform(0.2, 2.0)
        elif kind == "stall_between" and procs:
            # the next commit stalls between its finishes (a slow client),
            # and often loses its daemon connection meanwhile
            proc = rng.choice(procs)
            proc.stall_between = rng.uniform(0.1, 1.5)
            proc.drop_while_stalled = rng.random() < 0.7
        elif kind == "finish_error" and procs:
            rng.choice(procs).fail_next_finish = rng.choice(("before", "after"))
        elif kind == "clock_jump":
            storage = rng.choice(list(self.storages.values()))
            storage.offset += rng.uniform(1.0, 120.0)


@dataclass
class Truth:
    key: str
    members: tuple
    parts: dict = field(default_factory=dict)


# -- storages ---------------------------------------------------------------------


class Txn:
    """A transaction's hold on one storage."""

    __slots__ = ("key", "members", "stamp", "tid", "proc", "storage", "voted")

    def __init__(self, key, members, stamp, proc, storage) -> None:
        self.key = key
        self.members = members
        self.stamp = stamp
        self.tid = None
        self.proc = proc
        self.storage = storage
        self.voted = False


class Storage:
    def __init__(self, world: World, name: str, kind: str, offset: float) -> None:
        self.world = world
        self.name = name
        self.kind = kind
        self.offset = offset
        self.last = 0
        self.records: list[tuple[int, dict]] = []  # committed: (tid, extension)
        self.holder: Txn | None = None
        self.waiting: collections.deque = collections.deque()
        self.up = True
        self.epoch = 0
        self.owner: Process | None = None  # file storages: the lock file's process

    def clock_tid(self) -> int:
        return int((self.world.now + 1000.0 + self.offset) * US)

    def acquire(self, txn: Txn, granted: Callable[[], None], failed: Callable[[], None]) -> None:
        if not self.up:
            self.world.at(self.world.delay(), failed)
            return
        self.waiting.append((txn, granted, failed, self.epoch))
        self._grant()

    def _grant(self) -> None:
        while self.holder is None and self.waiting:
            txn, granted, failed, epoch = self.waiting.popleft()
            if epoch != self.epoch or (txn.proc is not None and not txn.proc.alive):
                continue
            self.holder = txn
            txn.tid = max(self.clock_tid(), self.last + 1)
            self.world.at(self.world.delay(0.0001, 0.001), granted)

    def finish(self, txn: Txn) -> int:
        assert self.holder is txn and self.up
        ext = {STAMP_KEY: txn.stamp} if txn.stamp else {}
        self.records.append((txn.tid, ext))
        self.last = txn.tid
        self.world.committed(self, txn.key, txn.members, txn.tid)
        self.holder = None
        self._grant()
        return txn.tid

    def release(self, txn: Txn) -> None:
        if self.holder is txn:
            self.holder = None
            self._grant()
        else:
            self.waiting = collections.deque(w for w in self.waiting if w[0] is not txn)

    def restart(self, downtime: float) -> None:
        """A ZEO server restart: voted/locked transactions are aborted."""
        self.up = False
        self.epoch += 1
        holder, self.holder = self.holder, None
        waiting, self.waiting = self.waiting, collections.deque()
        self.world.log(f"zeo {self.name} restart (holder {holder and holder.key})")
        for _, _, failed, _ in waiting:
            self.world.at(self.world.delay(), failed)
        if holder is not None and holder.proc is not None:
            holder.proc.lost_hold(holder)
        self.world.at(downtime, self._back)

    def _back(self) -> None:
        self.up = True
        self._grant()

    def scan(self, since: int) -> list[tuple[int, Stamp | None]]:
        out = []
        for tid, ext in self.records[_first_after(self.records, since):]:
            stamp = stamp_of(ext)
            out.append((tid, stamp))
        return out


def _first_after(records, tid) -> int:
    lo, hi = 0, len(records)
    while lo < hi:
        mid = (lo + hi) // 2
        if records[mid][0] <= tid:
            lo = mid + 1
        else:
            hi = mid
    return lo


# -- the network -------------------------------------------------------------------


class Link:
    """A TCP connection between a process and the daemon."""

    def __init__(self, world: World, proc: "Process", incarnation: int) -> None:
        self.world = world
        self.id = next(world.link_ids)
        self.proc = proc
        self.incarnation = incarnation
        self.open = True
        self.held_until = 0.0
        self._last = {"up": 0.0, "down": 0.0}  # FIFO per direction
        self.peer = co.Peer(f"proc{proc.pid}/link{self.id}")
        self.decoder = p.Decoder()
        self.reader = p.ReplyReader()
        self.daemon_open = True

    def _when(self, direction: str) -> float:
        w = self.world
        t = max(w.now + w.delay(0.0002, 0.003), self._last[direction], self.held_until)
        self._last[direction] = t
        return t - w.now

    def send_up(self, data: bytes | None) -> None:
        """Client -> daemon; None is the client's close (FIN)."""
        if not data and data is not None:
            return
        self.world.at(self._when("up"), self.world.daemon.receive, self, data)

    def send_down(self, data: bytes | None) -> None:
        """Daemon -> client; None is the daemon's close."""
        if not data and data is not None:
            return
        self.world.at(self._when("down"), self.proc.receive, self, data)

    def drop(self) -> None:
        """Both ends see the connection fail (after their delays)."""
        if not self.open:
            return
        self.world.log(f"drop link {self.id}")
        self.send_up(None)
        self.send_down(None)

    def partition(self, length: float) -> None:
        self.world.log(f"partition link {self.id} for {length:.2f}s")
        self.held_until = max(self.held_until, self.world.now + length)


# -- application processes ----------------------------------------------------------


class Process:
    def __init__(self, world: World, pid: int, slot: int) -> None:
        self.world = world
        self.pid = pid
        self.slot = slot
        self.alive = True
        self.exiting = False
        self.session = ClientSession(pid=pid, host="here", session_id=f"sim{pid}",
                                     secret=f"secret{pid}")
        self.link: Link | None = None
        self.connecting = False
        self.handshake: Link | None = None
        self.backoff = 0.05
        self.tasks: set[Task] = set()
        self.holds: set[Txn] = set()
        self.kill_between = False
        self.stall_between = 0.0
        self.drop_while_stalled = False
        self.slow_next = 0.0
        self.fail_next_finish: str | None = None
        self.flush_armed = False
        self.first_attempt = False  # the reporter's first connection attempt ended
        self.counter = itertools.count(1)
        # file storages: each is owned by the process of one slot
        self.files = [s for s in world.storages.values()
                      if s.kind == "file" and _owner_slot(world, s) == slot]
        self.sections = {}
        if world.params.sections:
            for i, name in enumerate(sorted(world.storages)):
                self.sections[name] = i % 2

    def usable(self) -> list[str]:
        return sorted(s.name for s in self.world.storages.values()
                      if s.kind == "zeo" or s in self.files)

    def start(self) -> None:
        w = self.world
        for storage in self.files:
            if storage.owner is not None and storage.owner.alive:
                # the previous owner still runs: this one waits for the lock
                w.at(0.05, self._retry_start)
                return
        for storage in self.files:
            storage.owner = self
        w.log(f"proc {self.pid} starts")
        self.connect()
        for _ in range(w.params.threads):
            self.spawn_task(self.worker())

    def _retry_start(self) -> None:
        if self.alive:
            self.start()

    # -- the daemon connection (the reporter) ------------------------------

    def connect(self) -> None:
        w = self.world
        if not self.alive or self.link is not None or self.connecting or self.exiting:
            return
        self.connecting = True
        d = w.daemon
        if not d.up:
            self.first_attempt = True
            w.at(self.backoff, self._reconnect)
            self.backoff = min(self.backoff * 2, 1.0)
            return
        link = Link(w, self, d.incarnation)
        self.handshake = link
        d.accept(link)
        link.send_up(self.session.handshake())
        # the handshake reply is read by receive(); a timeout gives up
        w.at(self.world.params.timeout * 2, self._handshake_timeout, link)

    def _reconnect(self) -> None:
        self.connecting = False
        self.connect()

    def _handshake_timeout(self, link: Link) -> None:
        if self.handshake is link:
            self.first_attempt = True
            self.handshake = None
            link.send_up(None)
            link.open = False
            self.connecting = False
            self.world.at(self.backoff, self.connect)
            self.backoff = min(self.backoff * 2, 1.0)

    def receive(self, link: Link, data: bytes | None) -> None:
        if not self.alive or not link.open:
            return
        if data is None:
            self._lost_link(link)
            return
        link.reader.feed(data)
        if self.handshake is link:
            daemon_id = link.reader.read_field()
            if daemon_id is None:
                return
            self.handshake = None
            self.connecting = False
            self.first_attempt = True
            self.backoff = 0.05
            self.link = link
            out = self.session.attached(daemon_id)
            self.world.log(f"proc {self.pid} attached link {link.id} gen {self.session.generation}")
            link.send_up(out)
        while True:
            value = link.reader.read_int()
            if value is None:
                break
            self.session.reply(value)

    def _lost_link(self, link: Link) -> None:
        link.open = False
        if self.handshake is link:
            self.handshake = None
            self.connecting = False
        if self.link is link:
            self.link = None
            self.session.detached()
            self.world.log(f"proc {self.pid} lost link {link.id}")
        if not self.exiting:
            self.world.at(self.backoff, self.connect)
            self.backoff = min(self.backoff * 2, 1.0)

    def send(self, data: bytes | None) -> None:
        if data and self.link is not None:
            self.link.send_up(data)

    def drop_link(self, why: str) -> None:
        link = self.link
        if link is not None:
            self.world.log(f"proc {self.pid} drops link {link.id}: {why}")
            link.send_up(None)
            self._lost_link(link)

    def queue_flush(self) -> None:
        if not self.flush_armed:
            self.flush_armed = True
            self.world.at(0.01, self._flush)

    def _flush(self) -> None:
        self.flush_armed = False
        if self.alive:
            self.send(self.session.flush())

    # -- life and death ------------------------------------------------------

    def spawn_task(self, gen: Iterator) -> None:
        task = Task(self, gen)
        self.tasks.add(task)
        task.step(None)

    def kill(self) -> None:
        if not self.alive:
            return
        w = self.world
        w.log(f"KILL proc {self.pid}")
        self.alive = False
        for task in list(self.tasks):
            task.dead = True
        self.tasks.clear()
        # the kernel closes its sockets: the daemon and the ZEO servers see it
        if self.link is not None:
            self.link.send_up(None)
        if self.handshake is not None:
            self.handshake.send_up(None)
        for hold in list(self.holds):
            storage = hold.storage
            if storage.kind == "zeo":
                w.at(w.delay(0.001, 0.02), storage.release, hold)
            else:
                storage.release(hold)  # the 'c' record is never committed
        self.holds.clear()
        for storage in self.files:
            if storage.owner is self:
                storage.owner = None
        if w.faults_on or w.respawn:
            w.at(w.rng.uniform(0.05, 0.5), w.spawn, self.slot)

    def exit(self) -> None:
        """A clean exit: stop starting transactions; when none is running,
        close the reporter (reports + QUIT), then the process ends."""
        if self.exiting or not self.alive:
            return
        self.exiting = True
        self.world.log(f"proc {self.pid} exits")
        self._try_exit()

    def _try_exit(self) -> None:
        if not self.alive:
            return
        if self.tasks:
            self.world.at(0.02, self._try_exit)
            return
        data = self.session.close()
        if self.link is not None:
            if data:
                self.link.send_up(data)
            self.link.send_up(None)
            self.link.open = False
            self.link = None
        self.alive = False
        for storage in self.files:
            if storage.owner is self:
                storage.owner = None
        w = self.world
        if w.faults_on or w.respawn:
            w.at(w.rng.uniform(0.01, 0.3), w.spawn, self.slot)

    def lost_hold(self, hold: Txn) -> None:
        self.holds.discard(hold)
        for task in self.tasks:
            if task.waiting_on is hold:
                task.fail()

    # -- the workload ------------------------------------------------------------

    def worker(self) -> Iterator:
        w = self.world
        while self.alive and not self.exiting and (w.faults_on or w.writing):
            yield ("sleep", w.rng.uniform(*w.params.txn_gap))
            if self.exiting or not (w.faults_on or w.writing):
                break
            names = self.usable()
            if not names:
                break
            k = w.rng.choice((1, 2, 2, 3))
            storages = sorted(w.rng.sample(names, min(k, len(names))))
            yield from self.transaction(storages)

    def transaction(self, storages: list[str]) -> Iterator:
        w = self.world
        n = next(self.counter)
        cid = f"ts:{self.session.id}-{n}"
        # One flow per transaction (per section when the mutant splits them).
        if self.sections and w.mutant_sections:
            groups: dict[int, list[str]] = {}
            for s in storages:
                groups.setdefault(self.sections[s], []).append(s)
            flows = [(CommitFlow({}, f"{cid}.{g}"), members) for g, members in groups.items()]
        else:
            flows = [(CommitFlow({}, cid), storages)]
        truth_key = cid  # the ground truth: one transaction over all storages
        members = tuple(storages)
        holds: dict[str, Txn] = {}
        if not self.first_attempt:
            # the reporter gives its first connection a chance (timeout once)
            yield ("first", w.now + w.params.timeout)
        stamps = {}
        for flow, names in flows:
            for s in names:
                flow.join(s)
            if flow.seal(STAMP_KEY):
                bounds = {s: w.storages[s].last for s in names}
                self.send(self.session.begin(flow.id, flow.storage_ids, bounds))
            for s in names:
                stamps[s] = flow.extension.get(STAMP_KEY)
        slow = self.slow_next
        self.slow_next = 0.0
        try:
            # FileStorage takes its lock (and chooses the TID) at tpc_begin
            for s in storages:
                storage = w.storages[s]
                if storage.kind == "file":
                    hold = holds[s] = Txn(truth_key, members, stamps[s], self, storage)
                    yield ("lock", hold)
            yield ("sleep", w.delay(0.001, 0.01) + slow)
            for s in storages:
                storage = w.storages[s]
                if storage.kind == "zeo":
                    hold = holds[s] = Txn(truth_key, members, stamps[s], self, storage)
                    yield ("lock", hold)
                holds[s].voted = True
            for flow, names in flows:
                if flow.multi:
                    yield ("confirm", flow)
        except Failed:
            for hold in holds.values():
                hold.storage.release(hold)
                self.holds.discard(hold)
            for flow, names in flows:
                if flow.multi:
                    self.send(self.session.ended(flow.id, "abort"))
                    self.queue_flush()
            return
        # tpc_finish, one storage at a time
        finished: dict[str, int] = {}
        failed_at = None
        for i, s in enumerate(storages):
            if i > 0 and self.kill_between:
                self.kill_between = False
                self.kill()
                return
            hold = holds[s]
            storage = w.storages[s]
            if not storage.up or storage.holder is not hold:
                failed_at = (s, "before")
                break
            mode = self.fail_next_finish
            if mode is not None:
                self.fail_next_finish = None
                failed_at = (s, mode)
                if mode == "after":
                    storage.finish(hold)
                    self.holds.discard(hold)
                break
            tid = storage.finish(hold)
            self.holds.discard(hold)
            finished[s] = tid
            for flow, names in flows:
                if s in names:
                    flow.member_finished(s, tid)
                    self.session.finished(flow.id, s, tid)
            if i + 1 < len(storages):
                stall = self.stall_between
                if stall:
                    self.stall_between = 0.0
                    if self.drop_while_stalled and self.link is not None:
                        self.link.drop()
                yield ("sleep", w.delay(0.0001, 0.002) + stall
                       + (slow if w.rng.random() < 0.3 else 0))
        if failed_at is not None:
            # the transaction package aborts every member after a failure
            for s in storages:
                if s not in finished:
                    hold = holds[s]
                    hold.storage.release(hold)
                    self.holds.discard(hold)
            for flow, names in flows:
                if not flow.multi:
                    if set(names) <= set(finished):
                        (s,) = names
                        self.session.single(flow.id, s, finished[s])
                        self.queue_flush()
                    continue
                if failed_at[0] in names:
                    flow.uncertain.add(failed_at[0])
                outcome = None
                for s in names:
                    if s not in finished:
                        outcome = flow.member_aborted(s) or outcome
                if outcome is None:
                    outcome = "indoubt" if flow.finished else "abort"
                self.send(self.session.ended(flow.id, outcome))
                self.queue_flush()
            return
        for flow, names in flows:
            if flow.multi:
                self.send(self.session.ended(flow.id, "commit", flow.tids))
            else:
                (s,) = names
                self.session.single(flow.id, s, finished[s])
            self.queue_flush()


class Failed(Exception):
    pass


class Task:
    """A thread of a process: a generator of waits."""

    def __init__(self, proc: Process, gen: Iterator) -> None:
        self.proc = proc
        self.gen = gen
        self.dead = False
        self.waiting_on = None
        self.token = 0

    def step(self, value, exc: BaseException | None = None) -> None:
        if self.dead:
            return
        self.waiting_on = None
        self.token += 1
        try:
            if exc is not None:
                request = self.gen.throw(exc)
            else:
                request = self.gen.send(value)
        except StopIteration:
            self.proc.tasks.discard(self)
            return
        self._wait(request)

    def fail(self) -> None:
        self.proc.world.at(0, self._resume, self.token, None, Failed())

    def _resume(self, token: int, value, exc=None) -> None:
        if token == self.token and not self.dead:
            self.step(value, exc)

    def _wait(self, request) -> None:
        w = self.proc.world
        kind = request[0]
        token = self.token
        if kind == "sleep":
            w.at(request[1], self._resume, token, None)
        elif kind == "lock":
            hold: Txn = request[1]
            self.waiting_on = hold
            self.proc.holds.add(hold)
            hold.storage.acquire(
                hold, lambda: self._resume(token, None),
                lambda: self._resume(token, None, Failed()))
        elif kind == "first":
            self._first(token, request[1])
        elif kind == "confirm":
            flow: CommitFlow = request[1]
            self._confirm(token, flow, w.now + w.params.timeout)


    def _first(self, token: int, deadline: float) -> None:
        if token != self.token or self.dead:
            return
        w = self.proc.world
        if self.proc.first_attempt or self.proc.session.connected or w.now >= deadline:
            self.step(None)
        else:
            w.at(0.002, self._first, token, deadline)

    def _confirm(self, token: int, flow: CommitFlow, deadline: float) -> None:
        if token != self.token or self.dead:
            return
        proc = self.proc
        state = proc.session.confirmation(flow.id)
        w = proc.world
        if state is not None:
            flow.confirmed = state
            self.step(state)
            return
        if w.now >= deadline:
            proc.drop_link(f"no confirmation within {w.params.timeout} s")
            flow.confirmed = False
            self.step(False)
            return
        w.at(0.002, self._confirm, token, flow, deadline)


def _owner_slot(world: World, storage: Storage) -> int:
    files = sorted(s.name for s in world.storages.values() if s.kind == "file")
    return files.index(storage.name) % max(world.params.processes, 1)


# -- the daemon ---------------------------------------------------------------------


class Daemon:
    def __init__(self, world: World) -> None:
        self.world = world
        self.up = False
        self.incarnation = 0
        self.core: co.Coordinator | None = None
        self.links: set[Link] = set()
        self.tidlog: dict[str, int] = {}  # the TID log's last state (fsync'd)
        self.splits: dict[str, set] = {}  # declared by any incarnation

    def start(self) -> None:
        w = self.world
        self.incarnation += 1
        self.up = True
        kinds = dict(w.params.storages)
        self.core = co.Coordinator(kinds, dict(self.tidlog), clock=lambda: w.now,
                                   daemon_id=f"d{self.incarnation}", host="here",
                                   grace=1.0, config_name="sim",
                                   rng=random.Random(f"{w.seed}-{self.incarnation}"))
        w.log(f"daemon {self.incarnation} starts from {self.tidlog}")
        self.core.start()
        self.act()

    def crash(self, downtime: float) -> None:
        if not self.up:
            return
        self.world.log(f"DAEMON CRASH {self.incarnation}")
        self._down()
        self.world.at(downtime, self.start)

    def stop(self, downtime: float) -> None:
        if not self.up:
            return
        self.world.log(f"daemon stop {self.incarnation}")
        self._down()
        self.world.at(downtime, self.start)

    def _down(self) -> None:
        self.up = False
        self._record_splits()
        for link in list(self.links):
            link.send_down(None)
            link.daemon_open = False
        self.links.clear()
        # its ZEO clients die: its no-op holds are aborted by the servers
        for storage in self.world.storages.values():
            holder = storage.holder
            if holder is not None and holder.proc is None:
                self.world.at(self.world.delay(), storage.release, holder)
            storage.waiting = collections.deque(
                x for x in storage.waiting if x[0].proc is not None)
        self.core = None

    def _record_splits(self) -> None:
        if self.core is not None:
            for txn, known in self.core.splits().items():
                self.splits[txn] = set(known.never)

    def accept(self, link: Link) -> None:
        self.links.add(link)

    def receive(self, link: Link, data: bytes | None) -> None:
        if not self.up or link.incarnation != self.incarnation or not link.daemon_open:
            return
        core = self.core
        if data is None:
            link.daemon_open = False
            self.links.discard(link)
            core.connection_closed(link.peer)
            self.act()
            return
        events = link.decoder.feed(data)
        if events and events[-1][0] is p.ERROR:
            raise Violation(f"protocol error from the client code: {events[-1][1]}")
        replies = core.apply(link.peer, events)
        if replies:
            link.send_down(replies)
        if link.peer.quit:
            link.daemon_open = False
            self.links.discard(link)
            link.send_down(None)
            core.connection_closed(link.peer)
        self.act()

    def act(self) -> None:
        core = self.core
        if core is None:
            return
        w = self.world
        inc = self.incarnation
        while core.verdicts:
            self._check_verdict(*core.verdicts.popleft())
        for action in core.take_actions():
            if isinstance(action, co.Publish):
                old = dict(self.tidlog)
                new = dict(old)
                new.update(action.changes)
                w.check_point(old, new)
                self.tidlog = new
                w.stats["publications"] += 1
                w.log(f"publish {action.changes}")
            elif isinstance(action, co.Scan):
                w.at(w.io_delay(), self._scan, inc, action)
            elif isinstance(action, co.Noop):
                self._noop(inc, action)
            elif isinstance(action, co.CheckOwner):
                w.at(w.delay(), self._owner, inc, action)
            elif isinstance(action, co.SetTimer):
                w.at(action.delay, self._timer, inc, action.key)

    def _check_verdict(self, txn: str, outcome: str, parts: dict) -> None:
        """A verdict must say what the files hold when it is given."""
        truth = self.world.truth.get(txn)
        held = dict(truth.parts) if truth is not None else {}
        members = set(truth.members) if truth is not None else set()
        self.world.stats[f"verdict_{outcome}"] += 1
        if parts != {s: t for s, t in held.items() if s in parts}:
            raise Violation(f"verdict {outcome} for {txn} with parts {parts}; files hold {held}")
        if outcome == "committed" and set(held) != members:
            raise Violation(f"verdict committed for {txn}: files hold {held} of {members}")
        # "aborted" (found nowhere) says only that nothing was committed when
        # the storages were read: a client still alive may commit it later,
        # and the gate then sees it like any transaction. But a transaction
        # the daemon has itself published whole was found.
        if outcome == "aborted" and held and set(held) == members:
            published = self.core.published()
            if all(t <= published.get(s, -1) for s, t in held.items()):
                raise Violation(f"verdict aborted for {txn}, which is published whole: {held}")
        if outcome == "split" and (not held or set(held) == members):
            raise Violation(f"verdict split for {txn}: files hold {held} of {members}")

    def _alive(self, inc: int) -> bool:
        return self.up and self.incarnation == inc

    def _scan(self, inc: int, action: co.Scan) -> None:
        if not self._alive(inc):
            return
        storage = self.world.storages[action.storage]
        if not storage.up:
            result = (None, "server down")
        else:
            result = (storage.scan(action.since), None)
        self.world.at(self.world.io_delay(), self._scan_done, inc, action, result)

    def _scan_done(self, inc: int, action: co.Scan, result) -> None:
        if not self._alive(inc):
            return
        records, error = result
        self.core.scan_result(action.storage, action.seq, records, error=error)
        self.act()

    def _noop(self, inc: int, action: co.Noop) -> None:
        w = self.world
        holds = []
        order = sorted(action.storages)

        def fail():
            for h in holds:
                h.storage.release(h)
            if self._alive(inc):
                self.core.noop_result(action.request, None, error="server down")
                self.act()

        def lock(i: int) -> None:
            if not self._alive(inc):
                for h in holds:
                    h.storage.release(h)
                return
            if i == len(order):
                w.at(w.delay(), finish, 0, {})
                return
            storage = w.storages[order[i]]
            # empty: not a multi-storage transaction of the ground truth
            hold = Txn(f"noop-{inc}-{action.request}", (), None, None, storage)
            holds.append(hold)
            storage.acquire(hold, lambda: lock(i + 1), fail)

        def finish(i: int, tids: dict) -> None:
            if not self._alive(inc):
                for h in holds[i:]:
                    w.at(w.delay(), h.storage.release, h)
                return
            if i == len(holds):
                w.at(w.io_delay(), self._noop_done, inc, action.request, tids)
                return
            hold = holds[i]
            if not hold.storage.up or hold.storage.holder is not hold:
                for h in holds[i:]:
                    h.storage.release(h)
                self.core.noop_result(action.request, None, error="server restarted")
                self.act()
                return
            tids[hold.storage.name] = hold.storage.finish(hold)
            w.at(w.delay(0.0001, 0.001), finish, i + 1, tids)

        w.at(w.delay(), lock, 0)

    def _noop_done(self, inc: int, request: int, tids: dict) -> None:
        if self._alive(inc):
            self.core.noop_result(request, tids)
            self.act()

    def _owner(self, inc: int, action: co.CheckOwner) -> None:
        if not self._alive(inc):
            return
        storage = self.world.storages[action.storage]
        owner = storage.owner
        if owner is None or not owner.alive:
            info = co.OwnerInfo(None)
        else:
            info = co.OwnerInfo(owner.pid, True, f"start{owner.pid}")
        self.core.owner_result(action.request, info)
        self.act()

    def _timer(self, inc: int, key: tuple) -> None:
        if not self._alive(inc):
            return
        self.core.timer(key)
        self.act()


World.respawn = False
World.writing = False
World.mutant_sections = False


# -- one run --------------------------------------------------------------------


def run(seed: int, *, trace: bool = False, params: Params | None = None,
        mutant: Callable[[World], None] | None = None) -> Result:
    world = World(seed, params, trace=trace, mutant=mutant)
    problem = None
    try:
        _run(world)
    except Violation as exc:
        problem = str(exc)
    world.stats["transactions"] = len(world.truth)
    return Result(seed, problem is None, problem, dict(world.stats), world.trace, world.params)


def _run(world: World) -> None:
    params = world.params
    world.writing = True
    world.respawn = True
    world.start()
    world.run_until(params.duration)
    # Faults stop. Writers go on a little, then stop; the daemon must catch up.
    world.faults_on = False
    world.log("FAULTS STOP")
    for link in {proc.link for proc in world.processes if proc.link is not None}:
        link.held_until = min(link.held_until, world.now)
    if not world.daemon.up:
        world.daemon.start()
    for storage in world.storages.values():
        if not storage.up:
            storage._back()
    world.run_until(world.now + 1.0)
    world.writing = False
    world.respawn = False
    world.run_until(world.now + 3.0)
    # every process stopped writing; the point must reach the files' best
    for slot in range(params.processes):
        if not any(p.alive and p.slot == slot for p in world.processes):
            pass
    world.run_until(world.now + 6.0)
    _check_end(world)


def _check_end(world: World) -> None:
    daemon = world.daemon
    core = daemon.core
    assert core is not None
    daemon._record_splits()
    published = dict(core.published())
    # Liveness: the largest coherent point of the files, from their stamps.
    txns = {name: [(tid, stamp_of(ext)) for tid, ext in s.records]
            for name, s in world.storages.items()}
    start = {name: MAX_TID for name in world.storages}
    best = largest_coherent_cut(txns, start)
    expected = {}
    for name, s in world.storages.items():
        tids = [tid for tid, _ in s.records if tid <= best[name]]
        if tids:
            expected[name] = tids[-1]
    got = {s: t for s, t in published.items() if s in world.storages}
    if got != expected:
        raise Violation(f"liveness: published {got} after the faults stopped; the files"
                        f" allow {expected}")
    # No false split: every declared split is one in the files.
    for txn, missing in daemon.splits.items():
        truth = world.truth.get(txn)
        if truth is None:
            raise Violation(f"SPLIT declared for {txn}, which no storage holds")
        present = set(truth.parts)
        if present == set(truth.members) or not present or (missing & present):
            raise Violation(f"false SPLIT declared for {txn}: parts {truth.parts} over"
                            f" {truth.members}, declared missing {sorted(missing)}")
    world.stats["splits"] = len(daemon.splits)
    world.stats["real_splits"] = sum(
        1 for t in world.truth.values()
        if len(t.members) > 1 and t.parts and len(t.parts) < len(t.members))
