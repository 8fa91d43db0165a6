#!/usr/bin/env python
"""Benchmark: how far the published point lags behind the commits, under restarts and kills.

Everything runs on this machine, with real processes:

* **zeo** mode: two ``runzeo`` servers (``tidstorage.demo.cluster.ZeoServer``):
  server ``a`` serves the storages ``a1`` and ``a2``, server ``b`` serves
  ``b1``; the daemon (``DaemonProcess``, ``tidstorage serve``) has each
  storage's ``zeo`` address and ``data_fs``;
* **local** mode: three local FileStorages (``a1``, ``a2``, ``b1``), opened
  by the writer processes themselves; the daemon has ``data_fs`` and no
  ``zeo`` (it reads the files, read-only). A FileStorage is opened by one
  process at a time, so there is one writer process at a time;
* writers are ``python -m tidstorage.demo.workload`` subprocesses (random
  subsets of their storages, a cross-storage invariant, ``--pause`` between
  commits), wrapped by tidstorage and reporting to the daemon;
* a sampler thread sends ``DUMP`` every ``--interval`` (100 ms) on its own
  connection (reconnecting when the daemon restarts).

Scenarios (each *segment* runs on a fresh cluster in a fresh directory):

``steady``
    ``--writers`` writers (zeo; 1 in local mode) for ``--seconds``; no
    restart, no kill. The reference.
``rolling``
    the same shape, with rolling restarts: each writer lives a random time
    (``--life``, local ``--local-life``), exits cleanly and is replaced at
    once by a new writer process; and ``--kills`` SIGKILLs per segment at
    uniformly random moments, each of a random live writer (replaced at
    once). In local mode the single writer process is, with probability
    ``--local-kill-share``, SIGKILLed at a random moment of its life instead
    of exiting cleanly, and the next one starts when it is gone.
``split``
    a real split next to a storage that is not linked to it: a writer over
    ``a2`` alone keeps committing while victims over ``a1`` + ``b1`` kill
    themselves between the ``tpc_finish`` calls of their K-th multi-storage
    transaction (``workload --kill-after-first-finish K``), one after the
    other (``--split-victims``): ``a1``/``b1`` stay frozen by design, ``a2``
    must keep publishing.
``restart``
    the steady writers while the daemon is SIGKILLed and restarted at once,
    ``--restarts`` times; a fast prober (every 10 ms) times the restart.

The lag of a sample (computed afterwards, from the ``Data.fs`` files read
when every process has stopped): for each storage, the age at the sample's
time of the oldest committed transaction the published point does not
cover (0 if it covers everything); the sample's lag is the maximum over the
storages. A transaction's commit time is the time in its TID (ZEO chooses it
at vote, FileStorage at ``tpc_begin``: the age includes the commit itself);
everything runs on this host, so TIDs and samples share one clock. A
transaction counts from the DUMP's send time; its age is taken at the reply
(both conservative).

Real splits (a stamped transaction present in some of its storages and not
the others, from the stamps in the files, as ``tests/test_storage_faults.py``
``file_stamps``/``splits_at``) keep storages frozen until a repair, by
design: the largest coherent cut of the final files (``stamps.
largest_coherent_cut``) says up to where each storage can ever be published.
Each split is attributed to the kill of its writer (the writer number is in
the transaction's description); a storage is *frozen by* the first split
kill after which the largest coherent cut of what was committed until the
next split kill stops below that storage's last transaction. From that
kill on the storage is left out of the lag (a sample with every storage
left out is not counted); before it, and for the others, only the
transactions at or below the final coherent cut count.

Also measured:

* after each kill (and each clean exit), the time until every storage not
  frozen by a split covers everything committed before the kill (the exit);
* each daemon restart: from the restart (the new process is started) until
  it listens, until ``BOOTSTRAPED`` answers 1, until the daemon logs
  "bootstrap complete", until every storage's point moves past the point
  published before the kill, and until the point covers everything
  committed before the kill;
* every published point is checked against the stamps (must split nothing)
  and every SPLIT the daemon declared (log) must be a real split.

Targets (issue 8): with rolling restarts p99 <= 0.5 s and max <= 2 s (zeo
and local); after a kill, storages not linked to a split publish again
within 2 s; a bootstrap/re-check after a restart under load <= 1 s. The
exit code is 0 whether they are met or not (1 only if the benchmark itself
failed).

Examples::

    .venv/bin/python bench/publication_lag.py --modes zeo      # ~4.5 min (both modes: ~9 min)
    .venv/bin/python bench/publication_lag.py --modes zeo --segments 2 --seconds 20
    .venv/bin/python bench/publication_lag.py --json > lag.json
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tidstorage.formats import filestorage
from tidstorage.daemon.client import Client, ClientError
from tidstorage.demo.cluster import DaemonProcess, ZeoServer
from tidstorage.core.stamps import stamp_of, largest_coherent_cut
from tidstorage.core.tids import MAX_TID, tid_seconds

STORAGES = ("a1", "a2", "b1")
#: zeo mode: storage -> (server, zeo storage name)
PLACEMENT = {"a1": ("a", "1"), "a2": ("a", "2"), "b1": ("b", "1")}
TARGET_P99 = 0.5
TARGET_MAX = 2.0
TARGET_KILL = 2.0
TARGET_RESTART = 1.0
WRITER_RE = re.compile(rb"^writer (\d+):")
LOG_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
SPLIT_RE = re.compile(r"SPLIT transaction (\S+) over")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- machine load -------------------------------------------------------------


class Load:
    """Machine busy share (``/proc/stat``), our CPU (this process and its
    reaped children) and the load average over a scenario."""

    def __init__(self) -> None:
        self.start_stat = self._stat()
        self.start_ours = self._ours()
        self.start_load = os.getloadavg()
        self.start_wall = time.time()

    @staticmethod
    def _stat() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self) -> dict:
        busy1, all1 = self._stat()
        busy0, all0 = self.start_stat
        wall = time.time() - self.start_wall
        ncpu = os.cpu_count() or 1
        machine = (busy1 - busy0) / max(1, all1 - all0)
        ours = (self._ours() - self.start_ours) / max(1e-9, wall * ncpu)
        return {
            "wall_s": wall,
            "machine_busy": machine,
            "ours": ours,
            "others": max(0.0, machine - ours),
            "loadavg_before": self.start_load[0],
            "loadavg_after": os.getloadavg()[0],
        }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


# -- the cluster ----------------------------------------------------------------


class Cluster:
    """ZEO servers (zeo mode) or local files, and the daemon, in ``directory``."""

    def __init__(self, directory: Path, mode: str, pause: float) -> None:
        self.directory = directory
        self.mode = mode
        self.pause = pause
        self.servers: dict[str, ZeoServer] = {}
        if mode == "zeo":
            self.servers = {
                "a": ZeoServer(directory / "zeo-a", ["1", "2"]),
                "b": ZeoServer(directory / "zeo-b", ["1"]),
            }
            self.paths = {s: self.servers[x].data_fs(n) for s, (x, n) in PLACEMENT.items()}
            storages = {
                s: {"data_fs": str(self.paths[s]),
                    "zeo": "%s:%d" % self.servers[x].address, "zeo_storage": n}
                for s, (x, n) in PLACEMENT.items()
            }
        else:
            self.paths = {s: directory / "local" / s / "Data.fs" for s in STORAGES}
            storages = {s: {"data_fs": str(p)} for s, p in self.paths.items()}
        self.daemon = DaemonProcess(
            directory / "daemon", storages=storages,
            server={"burst_period": 1, "full_dump_period": 60}, verbose=False)
        self.writers = 0

    def start(self) -> None:
        for server in self.servers.values():
            server.start()
        if self.mode == "local":
            from ZODB.FileStorage import FileStorage

            for path in self.paths.values():  # an empty Data.fs for the daemon to read
                path.parent.mkdir(parents=True, exist_ok=True)
                FileStorage(str(path)).close()
        self.daemon.start()
        self.daemon.wait_bootstrapped(timeout=60)

    def stop(self) -> None:
        try:
            if self.daemon.proc is not None:
                self.daemon.stop()
        finally:
            for server in self.servers.values():
                server.stop()

    def writer(self, storages=STORAGES, *, seconds: float, kill_after: int | None = None,
               rng: random.Random) -> "Writer":
        self.writers += 1
        number = self.writers
        if self.mode == "zeo":
            spec = {s: [*self.servers[PLACEMENT[s][0]].address, PLACEMENT[s][1]]
                    for s in storages}
            where = ["--zeo", json.dumps(spec)]
        else:
            where = ["--files", json.dumps({s: str(self.paths[s]) for s in storages})]
        cmd = [sys.executable, "-m", "tidstorage.demo.workload", *where,
               "--server", "127.0.0.1:%d" % self.daemon.port, "--writer", str(number),
               "--seconds", f"{seconds:.3f}", "--seed", str(rng.randrange(1 << 30)),
               "--pause", str(self.pause)]
        if kill_after:
            cmd += ["--kill-after-first-finish", str(kill_after)]
        return Writer(number, tuple(storages), cmd, self.directory / "writers")


class Writer:
    def __init__(self, number: int, storages: tuple, cmd: list[str], logdir: Path) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        self.number = number
        self.storages = storages
        self.out = open(logdir / f"writer-{number}.out", "wb")
        self.err = open(logdir / f"writer-{number}.err", "wb")
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err,
                                     stdin=subprocess.DEVNULL)
        self.ended: float | None = None
        self.killed = False

    def poll(self) -> bool:
        """True once the process has exited (records when)."""
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.time()
            self.out.close()
            self.err.close()
        return self.ended is not None

    def kill(self) -> float:
        now = time.time()
        self.proc.kill()
        self.proc.wait()
        self.killed = True
        self.poll()
        return now

    @property
    def summary(self) -> dict | None:
        try:
            lines = Path(self.out.name).read_text().strip().splitlines()
            return json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            return None


# -- sampling ---------------------------------------------------------------------


class Sampler(threading.Thread):
    """``DUMP`` every ``period`` seconds: (send time, reply time, point)."""

    def __init__(self, address, period: float) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.period = period
        self.samples: list[tuple[float, float, dict]] = []
        self.failures = 0
        self._halt = threading.Event()

    def run(self) -> None:
        client = None
        next_at = time.monotonic()
        while not self._halt.is_set():
            try:
                if client is None:
                    client = Client(self.address, timeout=2)
                sent = time.time()
                point = client.dump()
                self.samples.append((sent, time.time(), point))
            except (ClientError, OSError):
                self.failures += 1
                if client is not None:
                    try:
                        client.close()
                    except OSError:
                        pass
                client = None
            next_at = max(next_at + self.period, time.monotonic())
            self._halt.wait(max(0.0, next_at - time.monotonic()))
        if client is not None:
            client.close()

    def stop(self) -> list:
        self._halt.set()
        self.join(10)
        return self.samples


# -- one segment ---------------------------------------------------------------------


@dataclass
class Segment:
    mode: str
    scenario: str
    index: int
    directory: Path
    paths: dict
    samples: list = field(default_factory=list)
    fast_samples: list = field(default_factory=list)
    events: list = field(default_factory=list)  # dicts: kind, t, writer
    restarts: list = field(default_factory=list)
    daemon_log: str = ""
    writer_summaries: list = field(default_factory=list)
    writer_failures: list = field(default_factory=list)
    load: dict = field(default_factory=dict)


def run_segment(mode: str, scenario: str, index: int, args, top: Path,
                rng: random.Random) -> Segment:
    directory = top / f"{mode}-{scenario}-{index}"
    directory.mkdir(parents=True)
    cluster = Cluster(directory, mode, args.pause)
    seg = Segment(mode, scenario, index, directory, dict(cluster.paths))
    load = Load()
    writers: list[Writer] = []
    sampler = None
    try:
        cluster.start()
        sampler = Sampler(cluster.daemon.address, args.interval)
        sampler.start()
        t0 = time.time()
        end = t0 + args.seconds
        if scenario in ("steady", "restart"):
            count = args.writers if mode == "zeo" else 1
            writers = [cluster.writer(seconds=args.seconds, rng=rng) for _ in range(count)]
            if scenario == "restart":
                run_restarts(cluster, seg, args, t0, end, rng)
            while time.time() < end:
                time.sleep(0.05)
        elif scenario == "rolling":
            writers = rolling(cluster, seg, args, t0, end, rng)
        elif scenario == "split":
            writers = split_victims(cluster, seg, args, t0, end, rng)
        else:
            raise ValueError(scenario)
        deadline = time.time() + 60
        for w in writers:
            while not w.poll():
                if time.time() > deadline:
                    w.kill()
                    seg.writer_failures.append(f"writer {w.number} did not exit; killed")
                time.sleep(0.02)
            if not w.killed:
                if w.proc.returncode not in (0, -signal.SIGKILL):
                    seg.writer_failures.append(
                        f"writer {w.number} exited {w.proc.returncode}: "
                        + Path(w.err.name).read_text(errors="replace")[-500:])
                if w.proc.returncode == 0 and not any(
                        e["kind"] == "exit" and e["writer"] == w.number for e in seg.events):
                    seg.events.append({"kind": "exit", "t": w.ended, "writer": w.number})
            if w.summary:
                seg.writer_summaries.append(w.summary)
        time.sleep(args.tail)
        seg.samples = sampler.stop()
        sampler = None
    finally:
        if sampler is not None:
            sampler.stop()
        for w in writers:
            if not w.poll():
                w.kill()
        seg.daemon_log = cluster.daemon.log()
        cluster.stop()
    seg.load = load.stop()
    # for a re-analysis (kept with --dir)
    (directory / "samples.json").write_text(json.dumps({
        "samples": seg.samples, "fast_samples": seg.fast_samples, "events": seg.events,
        "restarts": seg.restarts, "paths": {k: str(v) for k, v in seg.paths.items()}}))
    return seg


def rolling(cluster: Cluster, seg: Segment, args, t0: float, end: float,
            rng: random.Random) -> list[Writer]:
    everyone: list[Writer] = []
    if cluster.mode == "zeo":
        slots: list[Writer | None] = [None] * args.writers
        kills = sorted(t0 + rng.uniform(2.0, args.seconds - 2.0) for _ in range(args.kills))
        while True:
            now = time.time()
            if kills and now >= kills[0]:
                kills.pop(0)
                live = [i for i, w in enumerate(slots) if w is not None and not w.poll()
                        and now - w.started > 1.5]
                if live:
                    i = rng.choice(live)
                    w = slots[i]
                    t = w.kill()
                    seg.events.append({"kind": "kill", "t": t, "writer": w.number})
                    slots[i] = None
            for i, w in enumerate(slots):
                if w is not None and w.poll():
                    if not w.killed:
                        seg.events.append({"kind": "exit", "t": w.ended, "writer": w.number})
                    slots[i] = w = None
                remaining = end - now
                if w is None and remaining > 2.0:
                    life = min(rng.uniform(*args.life), remaining)
                    slots[i] = cluster.writer(seconds=life, rng=rng)
                    everyone.append(slots[i])
            if now >= end and all(w is None or w.poll() for w in slots):
                break
            if now >= end + 30:
                break
            time.sleep(0.005)
        return everyone
    # local: one writer process at a time
    while time.time() < end - 1.5:
        life = min(rng.uniform(*args.local_life), end - time.time())
        w = cluster.writer(seconds=life, rng=rng)
        everyone.append(w)
        kill_at = None
        if rng.random() < args.local_kill_share:
            kill_at = w.started + rng.uniform(0.8, 0.8 + life)
        while not w.poll():
            if kill_at is not None and time.time() >= kill_at:
                t = w.kill()
                seg.events.append({"kind": "kill", "t": t, "writer": w.number})
                break
            time.sleep(0.005)
        if not w.killed:
            seg.events.append({"kind": "exit", "t": w.ended, "writer": w.number})
    return everyone


def split_victims(cluster: Cluster, seg: Segment, args, t0: float, end: float,
                  rng: random.Random) -> list[Writer]:
    """a2 alone keeps committing; victims over a1+b1 split themselves."""
    steady = cluster.writer(("a2",), seconds=args.seconds, rng=rng)
    everyone = [steady]
    time.sleep(1.0)
    for _ in range(args.split_victims):
        if time.time() > end - 3:
            break
        victim = cluster.writer(("a1", "b1"), seconds=max(1.0, end - time.time() - 1),
                                kill_after=rng.randint(10, 40), rng=rng)
        everyone.append(victim)
        while not victim.poll():
            time.sleep(0.002)
        if victim.proc.returncode == -signal.SIGKILL:
            victim.killed = True
            seg.events.append({"kind": "kill", "t": victim.ended, "writer": victim.number,
                               "self": True})
        else:
            seg.events.append({"kind": "exit", "t": victim.ended, "writer": victim.number})
        time.sleep(min(3.0, max(0.0, end - time.time() - 3)))
    return everyone


def run_restarts(cluster: Cluster, seg: Segment, args, t0: float, end: float,
                 rng: random.Random) -> None:
    daemon = cluster.daemon
    gap = (end - t0 - 2.0) / (args.restarts + 1)
    for k in range(args.restarts):
        at = t0 + 2.0 + gap * (k + 1) + rng.uniform(-0.2, 0.2) * gap
        while time.time() < at:
            time.sleep(0.01)
        with daemon.client(timeout=2) as c:
            before = c.dump()
        killed = time.time()
        daemon.kill()
        restart = time.time()
        daemon.start()
        listening = time.time()
        info = {"killed": killed, "restart": restart, "listening": listening,
                "point_before": before}
        client = Client(daemon.address, timeout=5)
        try:
            while time.time() - restart < 30:
                t = time.time()
                ok = client.bootstrapped()
                if ok:
                    info["bootstrapped"] = time.time()
                    break
                time.sleep(max(0.0, 0.01 - (time.time() - t)))
            while time.time() - restart < 30:
                sent = time.time()
                point = client.dump()
                seg.fast_samples.append((sent, time.time(), point))
                if all(point.get(s, -1) > before.get(s, -1) for s in STORAGES):
                    info.setdefault("moved", time.time())
                if time.time() - restart > 4.0 and "moved" in info:
                    break
                time.sleep(0.01)
        finally:
            client.close()
        seg.restarts.append(info)
        seg.events.append({"kind": "daemon-kill", "t": killed, "writer": None})


# -- analysis ---------------------------------------------------------------------------


@dataclass
class Files:
    tids: dict          # storage -> sorted list of tids
    times: dict         # storage -> list of TID times (s)
    stamps: dict        # coherency id -> (named storages, {storage: tid}, writer)
    records: dict       # storage -> [(tid, Stamp | None)]
    writer_of: dict     # (storage, tid) -> writer number


def read_files(paths: dict) -> Files:
    tids, times, records, writer_of = {}, {}, {}, {}
    stamps: dict = {}
    for s, path in paths.items():
        lst, tl, recs = [], [], []
        if Path(path).exists():
            for h in filestorage.iter_forward(path):
                if not h.finished:
                    break
                ext = h.ext()
                st = stamp_of(ext)
                m = WRITER_RE.match(h.description)
                writer = int(m.group(1)) if m else None
                lst.append(h.tid)
                tl.append(tid_seconds(h.tid))
                recs.append((h.tid, st))
                writer_of[(s, h.tid)] = writer
                if st is not None:
                    entry = stamps.setdefault(st.id, (st.storages, {}, writer))
                    entry[1][s] = h.tid
        tids[s], times[s], records[s] = lst, tl, recs
    return Files(tids, times, stamps, records, writer_of)


def real_splits(files: Files) -> list[dict]:
    out = []
    for sid, (named, where, writer) in files.stamps.items():
        scanned = [n for n in named if n in files.tids]
        if where and set(where) != set(scanned):
            first = min(where.values())
            out.append({"id": sid, "storages": list(named), "present": dict(where),
                        "missing": sorted(set(scanned) - set(where)), "writer": writer,
                        "time": tid_seconds(first)})
    out.sort(key=lambda x: x["time"])
    return out


def frozen_storages(files: Files, splits: list[dict], kills: dict) -> tuple[dict, dict, list]:
    """(final coherent cut, storage -> time from which it is frozen, notes)."""
    final = largest_coherent_cut(files.records, {})
    notes = []
    frozen_from: dict[str, float] = {}
    lasts = {s: (lst[-1] if lst else -1) for s, lst in files.tids.items()}
    frozen_final = {s for s in files.tids if final.get(s, MAX_TID) < lasts[s]}
    if not frozen_final:
        return final, frozen_from, notes
    # the kill of each split's writer, in time order
    moments = []
    for sp in splits:
        k = kills.get(sp["writer"])
        if k is None:
            notes.append(f"split {sp['id']} (writer {sp['writer']}) matches no kill: counted"
                         " frozen from its commit time")
            k = sp["time"]
        moments.append(k)
    moments = sorted(set(moments))
    for i, k in enumerate(moments):
        boundary = moments[i + 1] if i + 1 < len(moments) else math.inf
        view = _view(files, boundary)
        cut = largest_coherent_cut(view, {})
        for s, recs in view.items():
            if s in frozen_from or not recs:
                continue
            if cut.get(s, MAX_TID) < max(t for t, _ in recs):
                frozen_from[s] = k
    for s in frozen_final - set(frozen_from):  # should not happen
        first = bisect.bisect_right(files.tids[s], final[s])
        frozen_from[s] = files.times[s][first]
        notes.append(f"{s} frozen without an attributable split kill")
    return final, frozen_from, notes


def _view(files: Files, boundary: float) -> dict:
    """The transactions begun before ``boundary`` (a stamped one wholly, by
    its first part's time: no in-flight transaction looks split)."""
    first_time = {sid: min(tid_seconds(t) for t in where.values())
                  for sid, (_, where, _) in files.stamps.items() if where}
    view = {}
    for s, recs in files.records.items():
        out = []
        for (tid, st), tt in zip(recs, files.times[s]):
            when = first_time[st.id] if st is not None else tt
            if when <= boundary:
                out.append((tid, st))
        view[s] = out
    return view


def lag_series(samples, files: Files, final: dict, frozen_from: dict) -> tuple[list, int]:
    """Lags (s) of the samples; and how many samples were left out (every
    storage frozen)."""
    lags, excluded = [], 0
    for sent, received, point in samples:
        worst = None
        for s, lst in files.tids.items():
            if frozen_from.get(s, math.inf) <= sent:
                continue
            p = point.get(s, -1)
            i = bisect.bisect_right(lst, p)
            lag = 0.0
            if i < len(lst) and lst[i] <= final.get(s, MAX_TID) and files.times[s][i] <= sent:
                lag = received - files.times[s][i]
            worst = lag if worst is None else max(worst, lag)
        if worst is None:
            excluded += 1
        else:
            lags.append(worst)
    return lags, excluded


def catch_up(samples, files: Files, final: dict, frozen_from: dict, moment: float):
    """Seconds from ``moment`` until every storage not frozen at ``moment``
    covers everything committed before it; (None, storages) if never."""
    targets = {}
    for s, lst in files.tids.items():
        if frozen_from.get(s, math.inf) <= moment:
            continue
        j = bisect.bisect_right(files.times[s], moment) - 1
        while j >= 0 and lst[j] > final.get(s, MAX_TID):
            j -= 1
        targets[s] = lst[j] if j >= 0 else -1
    for sent, received, point in samples:
        if sent < moment:
            continue
        if all(point.get(s, -1) >= t for s, t in targets.items()):
            return received - moment, sorted(targets)
    return None, sorted(targets)


def incoherent_points(samples, files: Files) -> list[str]:
    """Published points that keep a stamped transaction on some of its
    storages and not on others (must be none)."""
    problems = []
    distinct = {tuple(sorted(p.items())): p for _, _, p in samples}
    for point in distinct.values():
        if not set(files.tids) <= set(point):
            continue
        for sid, (named, where, _) in files.stamps.items():
            inside = {n for n in named if n in where and where[n] <= point[n]}
            if inside and inside != set(named):
                problems.append(f"point {point} splits {sid} ({where})")
    return problems


def log_time(line: str) -> float | None:
    m = LOG_TIME_RE.match(line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def analyse(seg: Segment) -> dict:
    files = read_files(seg.paths)
    splits = real_splits(files)
    kills = {e["writer"]: e["t"] for e in seg.events if e["kind"] == "kill"}
    final, frozen_from, notes = frozen_storages(files, splits, kills)
    lags, excluded = lag_series(seg.samples, files, final, frozen_from)
    kill_rows, exit_rows = [], []
    split_writers = {sp["writer"] for sp in splits}
    for e in seg.events:
        if e["kind"] not in ("kill", "exit"):
            continue
        took, storages = catch_up(seg.samples, files, final, frozen_from, e["t"])
        row = {"t": e["t"] - seg.samples[0][0] if seg.samples else 0.0, "writer": e["writer"],
               "split": e["writer"] in split_writers, "catch_up_s": took,
               "unfrozen": storages,
               "frozen": sorted(s for s, t in frozen_from.items() if t <= e["t"])}
        (kill_rows if e["kind"] == "kill" else exit_rows).append(row)
    restarts = []
    log_lines = seg.daemon_log.splitlines()
    boot_times = [log_time(x) for x in log_lines if "bootstrap complete" in x]
    merged = sorted(seg.samples + seg.fast_samples)
    for r in seg.restarts:
        row = {"listen_s": r["listening"] - r["restart"]}
        if "bootstrapped" in r:
            row["bootstraped_s"] = r["bootstrapped"] - r["restart"]
        logged = [t for t in boot_times if t is not None and t >= r["restart"] - 0.002]
        if logged:
            row["log_bootstrap_complete_s"] = max(0.0, min(logged) - r["restart"])
        if "moved" in r:
            row["moved_past_s"] = r["moved"] - r["restart"]
        took, _ = catch_up(merged, files, final, frozen_from, r["killed"])
        row["covers_pre_kill_s"] = None if took is None else took - (r["restart"] - r["killed"])
        restarts.append(row)
    declared = set(SPLIT_RE.findall(seg.daemon_log))
    real_ids = {sp["id"] for sp in splits}
    return {
        "mode": seg.mode, "scenario": seg.scenario, "segment": seg.index,
        "samples": len(seg.samples), "lags": lags, "excluded_samples": excluded,
        "transactions": {s: len(v) for s, v in files.tids.items()},
        "writers": len({e["writer"] for e in seg.events if e["writer"]}) or None,
        "committed_by_writers": sum(w.get("done", 0) for w in seg.writer_summaries),
        "writer_errors": sum(w.get("errors", 0) for w in seg.writer_summaries),
        "writer_failures": seg.writer_failures,
        "splits": [{k: v for k, v in sp.items() if k != "time"} for sp in splits],
        "frozen": {s: t - seg.samples[0][0] if seg.samples else None
                   for s, t in frozen_from.items()},
        "notes": notes,
        "kills": kill_rows, "exits": exit_rows, "restarts": restarts,
        "incoherent_points": incoherent_points(seg.samples + seg.fast_samples, files),
        "declared_splits": sorted(declared),
        "false_splits": sorted(declared - real_ids),
        "load": seg.load,
        "daemon_errors": [x for x in log_lines if " ERROR " in x or " CRITICAL " in x][:20],
    }


# -- statistics and report ------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def fmt(v, spec=".3f", unit=" s") -> str:
    return "-" if v is None else format(v, spec) + unit


def combine(results: list[dict], mode: str, scenario: str) -> dict | None:
    rows = [r for r in results if r["mode"] == mode and r["scenario"] == scenario]
    if not rows:
        return None
    lags = [x for r in rows for x in r["lags"]]
    loads = [r["load"] for r in rows]
    return {
        "segments": len(rows),
        "samples": sum(r["samples"] for r in rows),
        "counted": len(lags),
        "excluded": sum(r["excluded_samples"] for r in rows),
        "p50": pct(lags, 50), "p99": pct(lags, 99), "max": max(lags) if lags else None,
        "kills": [k for r in rows for k in r["kills"]],
        "exits": [k for r in rows for k in r["exits"]],
        "restarts": [k for r in rows for k in r["restarts"]],
        "splits": sum(len(r["splits"]) for r in rows),
        "incoherent": sum(len(r["incoherent_points"]) for r in rows),
        "false_splits": sum(len(r["false_splits"]) for r in rows),
        "committed": sum(r["committed_by_writers"] for r in rows),
        "writer_failures": [f for r in rows for f in r["writer_failures"]],
        "machine_busy": sum(x["machine_busy"] for x in loads) / len(loads),
        "others": sum(x["others"] for x in loads) / len(loads),
        "loadavg": (min(x["loadavg_before"] for x in loads),
                    max(x["loadavg_after"] for x in loads)),
        "seconds": sum(x["wall_s"] for x in loads),
    }


def report(results: list[dict], modes: list[str], args) -> list[str]:
    out = []
    missed = []
    out.append("Publication lag (s): age of the oldest committed transaction the published"
               " point does not cover, per DUMP sample")
    out.append("")
    out.append("| mode | scenario | segments | samples counted (left out) | p50 | p99 | max |"
               " kills (split) | clean exits | committed | machine busy (others) |")
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for mode in modes:
        for scenario in ("steady", "rolling", "split", "restart"):
            c = combine(results, mode, scenario)
            if c is None:
                continue
            summary[(mode, scenario)] = c
            nsplit = sum(1 for k in c["kills"] if k["split"])
            out.append(
                f"| {mode} | {scenario} | {c['segments']} | {c['counted']} ({c['excluded']}) |"
                f" {fmt(c['p50'])} | {fmt(c['p99'])} | {fmt(c['max'])} |"
                f" {len(c['kills'])} ({nsplit}) | {len(c['exits'])} | {c['committed']:,} |"
                f" {c['machine_busy']:.0%} ({c['others']:.0%}) |")
    out.append("")
    out.append("Ratios rolling / steady (same shape, same machine):")
    for mode in modes:
        st, ro = summary.get((mode, "steady")), summary.get((mode, "rolling"))
        if not st or not ro:
            continue
        parts = []
        for key in ("p50", "p99", "max"):
            a, b = st[key], ro[key]
            parts.append(f"{key} {b / a:.2f}x" if a and b is not None else f"{key} -")
        out.append(f"  {mode}: " + ", ".join(parts))
    out.append("")
    for mode in modes:
        ro = summary.get((mode, "rolling"))
        if not ro:
            continue
        for key, target in (("p99", TARGET_P99), ("max", TARGET_MAX)):
            v = ro[key]
            ok = v is not None and v <= target
            line = f"target {mode} rolling {key} <= {target:g} s: {fmt(v)} -> " + (
                "met" if ok else "MISSED" + (f" by {v - target:.3f} s ({v / target:.1f}x)"
                                            if v is not None else " (no samples)"))
            out.append(line)
            if not ok:
                missed.append(line)
    out.append("")
    out.append("After each kill: seconds until every storage not frozen by a split covers"
               " everything committed before the kill")
    out.append("| mode | scenario | kills | split | unfrozen storages | median | max | never |")
    out.append("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    kill_times = {m: [] for m in modes}
    for (mode, scenario), c in summary.items():
        if not c["kills"]:
            continue
        took = [k["catch_up_s"] for k in c["kills"] if k["unfrozen"]]
        done = [t for t in took if t is not None]
        kill_times[mode] += took
        unfrozen = sorted({",".join(k["unfrozen"]) or "none" for k in c["kills"]})
        out.append(f"| {mode} | {scenario} | {len(c['kills'])} |"
                   f" {sum(1 for k in c['kills'] if k['split'])} | {'; '.join(unfrozen)} |"
                   f" {fmt(pct(done, 50))} | {fmt(max(done) if done else None)} |"
                   f" {len(took) - len(done)} |")
    for mode in modes:
        took = kill_times[mode]
        if not took:
            continue
        worst = None if any(t is None for t in took) else max(took)
        ok = worst is not None and worst <= TARGET_KILL
        line = (f"target {mode} after a kill, unlinked storages publish again <= {TARGET_KILL:g} s:"
                f" worst {fmt(worst) if worst is not None else 'never (within the segment)'} -> "
                + ("met" if ok else "MISSED" + (f" by {worst - TARGET_KILL:.3f} s"
                                                if worst is not None else "")))
        out.append(line)
        if not ok:
            missed.append(line)
    exits = [(m, k) for (m, s), c in summary.items() for k in c["exits"] if s == "rolling"]
    for mode in modes:
        took = [k["catch_up_s"] for m, k in exits if m == mode]
        done = [t for t in took if t is not None]
        if took:
            out.append(f"  {mode}: after a clean exit, the point covers everything committed"
                       f" before it in median {fmt(pct(done, 50))}, max"
                       f" {fmt(max(done) if done else None)} ({len(took)} exits,"
                       f" {len(took) - len(done)} never)")
    out.append("")
    out.append("Daemon SIGKILL + immediate restart under load (seconds from the restart)")
    out.append("| mode | # | listening | BOOTSTRAPED = 1 | log: bootstrap complete |"
               " every storage past the old point | covers all committed before the kill |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in modes:
        c = summary.get((mode, "restart"))
        if not c:
            continue
        worst_boot = worst_move = 0.0
        for i, r in enumerate(c["restarts"], 1):
            out.append(f"| {mode} | {i} | {fmt(r.get('listen_s'))} | {fmt(r.get('bootstraped_s'))} |"
                       f" {fmt(r.get('log_bootstrap_complete_s'))} | {fmt(r.get('moved_past_s'))} |"
                       f" {fmt(r.get('covers_pre_kill_s'))} |")
            worst_boot = max(worst_boot, r.get("bootstraped_s", math.inf))
            worst_move = max(worst_move, r.get("moved_past_s", math.inf))
        for what, v in (("BOOTSTRAPED", worst_boot), ("point moves past the old one", worst_move)):
            ok = v <= TARGET_RESTART
            line = (f"target {mode} restart under load, {what} <= {TARGET_RESTART:g} s: worst"
                    f" {fmt(v)} -> " + ("met" if ok else f"MISSED by {v - TARGET_RESTART:.3f} s"))
            out.append(line)
            if not ok:
                missed.append(line)
    out.append("")
    problems = []
    for r in results:
        tag = f"{r['mode']}/{r['scenario']}#{r['segment']}"
        if r["incoherent_points"]:
            problems.append(f"{tag}: {len(r['incoherent_points'])} published points split a"
                            f" transaction, e.g. {r['incoherent_points'][0]}")
        if r["false_splits"]:
            problems.append(f"{tag}: the daemon declared SPLIT for transactions present"
                            f" everywhere: {r['false_splits']}")
        for f in r["writer_failures"]:
            problems.append(f"{tag}: {f}")
        for n in r["notes"]:
            problems.append(f"{tag}: note: {n}")
    real = sum(len(r["splits"]) for r in results)
    declared = sum(len(r["declared_splits"]) for r in results)
    out.append(f"Soundness: {sum(len(r['incoherent_points']) for r in results)} published points"
               f" splitting a transaction; {real} real splits in the files, {declared} declared"
               f" by the daemon, {sum(len(r['false_splits']) for r in results)} false.")
    out.extend(problems)
    out.append("")
    if missed:
        out.append("MISSED targets:")
        out.extend("  " + m for m in missed)
    else:
        out.append("All targets met.")
    return out


def source_digest() -> dict:
    import tidstorage

    root = Path(tidstorage.__file__).parent
    return {n: hashlib.sha256((root / f"{n}.py").read_bytes()).hexdigest()[:12]
            for n in ("coordinator", "gate", "server", "session", "reporter", "storage",
                      "scanners", "tracker")
            if (root / f"{n}.py").exists()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="zeo,local", help="zeo,local (default both)")
    ap.add_argument("--scenarios", default="steady,rolling,split,restart",
                    help="default steady,rolling,split,restart")
    ap.add_argument("--segments", type=int, default=3,
                    help="segments (fresh clusters) of steady and rolling (default 3)")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds per segment (30)")
    ap.add_argument("--writers", type=int, default=3, help="concurrent writers, zeo mode (3)")
    ap.add_argument("--pause", type=float, default=0.01,
                    help="writers' pause between commits (0.01 s)")
    ap.add_argument("--life", type=float, nargs=2, default=(4.0, 10.0), metavar=("MIN", "MAX"),
                    help="zeo rolling: a writer's writing time, uniform (4 10 s)")
    ap.add_argument("--local-life", type=float, nargs=2, default=(2.0, 6.0),
                    metavar=("MIN", "MAX"), help="local rolling: same (2 6 s)")
    ap.add_argument("--kills", type=int, default=2,
                    help="zeo rolling: SIGKILLs per segment at random moments (2)")
    ap.add_argument("--local-kill-share", type=float, default=0.35,
                    help="local rolling: share of writer processes SIGKILLed (0.35)")
    ap.add_argument("--split-victims", type=int, default=3,
                    help="split scenario: victims per segment (3)")
    ap.add_argument("--restarts", type=int, default=3,
                    help="restart scenario: daemon kills per segment (3)")
    ap.add_argument("--interval", type=float, default=0.1, help="DUMP period (0.1 s)")
    ap.add_argument("--tail", type=float, default=2.0,
                    help="sampling after the last writer exited (2 s)")
    ap.add_argument("--seed", type=int, default=None, help="schedule seed (default: random)")
    ap.add_argument("--dir", type=Path, help="work directory (kept); default a temp dir, removed")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    modes = [m for m in args.modes.split(",") if m]
    scenarios = [s for s in args.scenarios.split(",") if s]
    top = args.dir or Path(tempfile.mkdtemp(prefix="tidstorage-lag-"))
    top.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    up_before = uptime()
    say(f"seed {seed}; {up_before}")
    results = []
    try:
        for mode in modes:
            for scenario in scenarios:
                count = args.segments if scenario in ("steady", "rolling") else 1
                for i in range(count):
                    seg = run_segment(mode, scenario, i, args, top, rng)
                    res = analyse(seg)
                    results.append(res)
                    say(f"{mode} {scenario} #{i}: {len(res['lags'])} samples, p50"
                        f" {fmt(pct(res['lags'], 50))} p99 {fmt(pct(res['lags'], 99))} max"
                        f" {fmt(max(res['lags']) if res['lags'] else None)}; kills"
                        f" {len(res['kills'])}, splits {len(res['splits'])}, load"
                        f" {res['load']['loadavg_before']:.2f}->{res['load']['loadavg_after']:.2f},"
                        f" machine {res['load']['machine_busy']:.0%}"
                        f" (others {res['load']['others']:.0%})")
    finally:
        if args.dir is None:
            shutil.rmtree(top, ignore_errors=True)
    up_after = uptime()
    lines = report(results, modes, args)
    header = (f"# publication lag, {started:%Y-%m-%d %H:%M} UTC, seed {seed}, {os.cpu_count()} CPUs;"
              f" {args.writers} zeo writers, pause {args.pause:g} s, segments {args.segments} x"
              f" {args.seconds:g} s\n# before: {up_before}\n# after:  {up_after}")
    if args.json:
        print(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                   for k, v in vars(args).items()},
                          "seed": seed, "started": started.isoformat(), "uptime_before": up_before,
                          "uptime_after": up_after, "source": source_digest(),
                          "results": [{k: v for k, v in r.items() if k != "lags"}
                                      | {"lag_p50": pct(r["lags"], 50),
                                         "lag_p99": pct(r["lags"], 99),
                                         "lag_max": max(r["lags"]) if r["lags"] else None}
                                      for r in results],
                          "report": lines}, indent=1, default=str))
    else:
        print(header)
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
