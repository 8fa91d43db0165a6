#!/usr/bin/env python
"""Benchmark: latency of ZEO commits with the tidstorage wrapper vs plain ZODB.

Setup (everything on this machine):

* two real ``runzeo`` servers (``tests/servers.py``), each serving one
  FileStorage (named ``1``) in a temp dir; they are the storages ``s1`` and
  ``s2`` of a ZODB multi-database;
* the real daemon, ``python -m tidstorage serve -c <tmp>/tidstorage.toml``
  with both storages configured with their ``zeo`` address (TID log in the
  temp dir, ``burst_period``/``full_dump_period`` from the options), started
  after the servers; the benchmark waits until ``BOOTSTRAPED`` answers 1;
* in this process, independent multi-databases over the same two ZEO
  storages (``workload.open_databases``), each with its own ZEO connections,
  transaction manager and objects:

  - ``plain``: ``ClientStorage`` directly;
  - ``wrapped``: ``TIDStorage(ClientStorage(...), "s1", server=daemon)``
    (and ``"s2"``), reporting to the daemon;
  - ``plain-b`` (on by default, ``--no-control`` to skip): a second plain
    one, an A/A control: its "overhead" over ``plain`` is the noise of the
    measurement;
  - with ``--decompose``, two more wrapped ones that split the overhead:
    ``null`` (the wrapper with a no-op reporter: the wrapper's own cost)
    and ``sink`` (a real ``Reporter`` talking to a minimal process that
    only answers ``HELLO`` and ``SYNC``: wrapper + messaging, without the daemon's work).

What is timed: ``transaction_manager.commit()`` of a transaction that
modified one small ``PersistentMapping`` (one key) in *each* of the two
databases (**2-storage**), or in ``s1`` only (**1-storage**). The object is
modified after ``tm.begin()`` (so the MVCC sync and invalidation processing
of the new transaction are outside the timed region, as in every mode) and
the clock (``perf_counter_ns``) runs around ``tm.commit()`` only.

Interleaving: every *round* runs one commit of every mode (handle x 1/2
storages) in a fresh random order, so drift (page cache, fsync latency,
other load, CPU frequency) hits all modes alike. ``--warmup`` rounds are
run first and discarded, then ``--commits`` rounds are measured.

Phase 2, for information: the daemon gets SIGTERM; once the wrapper's
reporter has seen the connection close, ``--down-commits`` rounds are
measured again. Commits must not wait then (the wrapper reports nothing
and its BEGIN confirmation fails at once); the table shows ``max`` too.

Statistics: nearest-rank median/p90/p99 per mode; overhead = wrapped /
plain - 1 for the median and the p99, with a bootstrap 95% interval of the
median overhead (independent resampling of both sample sets, ``--bootstrap``
resamples). ``--breakdown`` also times, inside the wrapped 2-storage commit,
the wait for the daemon's SYNC reply (``Reporter.confirm``) and the BEGIN
send (``Reporter.begin``), by wrapping those two methods of the reporter
instance (the code measured is otherwise unchanged).

Other processes matter on a small machine: for each phase the output gives
how busy the whole machine was, the share of our processes (this one, the
ZEO servers, the daemon, the sink) and the rest ("other processes", from
``/proc/stat``); ``--wait-quiet SECONDS`` first waits for the machine to be
< 10 % busy over 3 s.

Targets (from the issue): 2-storage median overhead <= 10 %, 1-storage
median overhead <= 3 %. Exit status 0 whatever the result.

Examples::

    .venv/bin/python bench/commit_overhead.py                 # 2000 rounds
    .venv/bin/python bench/commit_overhead.py --commits 500 --json
    .venv/bin/python bench/commit_overhead.py --breakdown --wait-quiet 600
    .venv/bin/python bench/commit_overhead.py --decompose --down-commits 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import transaction  # noqa: E402
import ZODB  # noqa: E402
from persistent.mapping import PersistentMapping  # noqa: E402

from tidstorage.demo.cluster import ZeoServer, free_port, wait_for_port  # noqa: E402
from tidstorage.demo import workload  # noqa: E402
from tidstorage.demo.cluster import DaemonProcess  # noqa: E402
from tidstorage.zodb.reporter import Reporter  # noqa: E402
from tidstorage.zodb.storage import TIDStorage  # noqa: E402

STORAGES = ("s1", "s2")
TARGET_MULTI = 0.10
TARGET_SINGLE = 0.03


# -- processes ----------------------------------------------------------------


#: ``--decompose``: a minimal daemon stand-in that reads everything, answers
#: a daemon id to ``HELLO`` and ``1`` to each ``SYNC`` (no parsing, no
#: tracking, no TID log).
SINK = r"""
import select, socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(8)
conns = []
while True:
    for c in select.select([srv] + conns, [], [])[0]:
        if c is srv:
            new = srv.accept()[0]
            new.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.append(new)
            continue
        data = c.recv(65536)
        if not data:
            conns.remove(c)
            c.close()
            continue
        reply = b"sink\n" if data.startswith(b"HELLO\n") else b""  # the daemon id
        if b"SYNC\n" in data:
            reply += b"1\n" * data.count(b"SYNC\n")
        if reply:
            c.sendall(reply)
"""


class NullReporter:
    """``--decompose``: the wrapper's own cost, without any message sent
    (the ``Reporter`` API the wrapper calls: ``begin(txn, storages, bounds)``,
    ``confirm(txn)``, ``finished``, ``ended``, ``single``)."""

    connected = True

    def target(self):
        return self

    def begin(self, txn, storages, bounds=None) -> None:
        pass

    def confirm(self, txn) -> bool:
        return True

    def finished(self, *args) -> None:
        pass

    ended = single = acquire = release = close = finished


# -- the commits ----------------------------------------------------------------


class Handle:
    """One multi-database over s1 and s2, its transaction manager and objects."""

    def __init__(self, label: str, zeo: dict, daemon_address, *, wrap: bool, timeout: float,
                 reporter=None) -> None:
        self.label = label
        self.wrap = wrap
        if reporter is None:
            self.databases = workload.open_databases(zeo, daemon_address, timeout=timeout,
                                                     wrap=wrap)
        else:  # decomposition: the wrapper around a given reporter
            from ZEO.ClientStorage import ClientStorage

            self.databases = {}
            for name, (address, zeo_storage) in zeo.items():
                base = ClientStorage(address, storage=zeo_storage, wait_timeout=30)
                ZODB.DB(TIDStorage(base, name, reporter=reporter),
                        databases=self.databases, database_name=name)
        self.tm = transaction.TransactionManager()
        self.conn = self.databases["s1"].open(self.tm)
        self.conns = {"s1": self.conn, "s2": self.conn.get_connection("s2")}
        self.key = f"bench-{label}"
        self.objs: dict[str, PersistentMapping] = {}

    def create_objects(self, keys: list[str]) -> None:
        """Create every handle's objects in one transaction (root conflicts otherwise)."""
        self.tm.begin()
        for conn in self.conns.values():
            root = conn.root()
            for key in keys:
                if key not in root:
                    root[key] = PersistentMapping({"n": 0})
        self.tm.commit()

    def find_objects(self, timeout: float = 10) -> None:
        """Wait until this handle sees its objects (ZEO invalidations are async)."""
        deadline = time.monotonic() + timeout
        while True:
            self.tm.begin()
            try:
                self.objs = {name: conn.root()[self.key] for name, conn in self.conns.items()}
                self.objs["s1"]["n"], self.objs["s2"]["n"]  # load them
                return
            except KeyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
            finally:
                self.tm.abort()

    def commit(self, storages: tuple[str, ...]) -> int:
        """One timed commit modifying one object in each of ``storages``; ns."""
        tm = self.tm
        tm.begin()
        for name in storages:
            obj = self.objs[name]
            obj["n"] += 1
        t0 = time.perf_counter_ns()
        tm.commit()
        return time.perf_counter_ns() - t0

    @property
    def reporter(self):
        storage = self.databases["s1"].storage
        return storage.reporter if isinstance(storage, TIDStorage) else None

    def close(self) -> None:
        try:
            self.tm.abort()
        finally:
            self.conn.close()
            for db in self.databases.values():
                db.close()


class Breakdown:
    """Times Reporter.begin and Reporter.confirm of one reporter instance."""

    def __init__(self, reporter) -> None:
        self.reporter = reporter
        self.begin_ns: list[int] = []
        self.confirm_ns: list[int] = []
        self.recording = False
        real_begin, real_confirm = reporter.begin, reporter.confirm

        def begin(*args, **kw):
            t0 = time.perf_counter_ns()
            try:
                return real_begin(*args, **kw)
            finally:
                if self.recording:
                    self.begin_ns.append(time.perf_counter_ns() - t0)

        def confirm(*args, **kw):
            t0 = time.perf_counter_ns()
            try:
                return real_confirm(*args, **kw)
            finally:
                if self.recording:
                    self.confirm_ns.append(time.perf_counter_ns() - t0)

        reporter.begin, reporter.confirm = begin, confirm

    def clear(self) -> None:
        self.begin_ns.clear()
        self.confirm_ns.clear()


def run_rounds(handles: dict[str, Handle], rounds: int, rng: random.Random,
               record: bool, samples: dict[str, list[int]]) -> None:
    modes = [(label, n) for label in handles for n in (2, 1)]
    for _ in range(rounds):
        rng.shuffle(modes)
        for label, n in modes:
            dt = handles[label].commit(STORAGES[:n])
            if record:
                samples[f"{label}/{n}"].append(dt)


# -- statistics -------------------------------------------------------------------


def pct(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summary(values: list[int]) -> dict:
    s = sorted(values)
    return {
        "n": len(s),
        "median_us": pct(s, 50) / 1e3,
        "p90_us": pct(s, 90) / 1e3,
        "p99_us": pct(s, 99) / 1e3,
        "mean_us": sum(s) / len(s) / 1e3,
        "max_us": s[-1] / 1e3,
    }


def median_ratio_ci(a: list[int], b: list[int], resamples: int, rng: random.Random):
    """Bootstrap 95% interval of median(b) / median(a) - 1."""
    if resamples <= 0:
        return None
    ratios = []
    for _ in range(resamples):
        ma = pct(sorted(rng.choices(a, k=len(a))), 50)
        mb = pct(sorted(rng.choices(b, k=len(b))), 50)
        ratios.append(mb / ma - 1)
    ratios.sort()
    return [ratios[int(0.025 * len(ratios))], ratios[min(len(ratios) - 1, int(0.975 * len(ratios)))]]


def analyse(samples: dict[str, list[int]], labels: list[str], resamples: int,
            rng: random.Random) -> dict:
    result: dict = {"modes": {}, "overhead": {}}
    for key, values in samples.items():
        if values:
            result["modes"][key] = summary(values)
    for n in (2, 1):
        base = samples[f"plain/{n}"]
        for label in labels:
            if label == "plain" or not samples[f"{label}/{n}"]:
                continue
            other = samples[f"{label}/{n}"]
            a, b = result["modes"][f"plain/{n}"], result["modes"][f"{label}/{n}"]
            result["overhead"][f"{label}/{n}"] = {
                "median": b["median_us"] / a["median_us"] - 1,
                "p99": b["p99_us"] / a["p99_us"] - 1,
                "median_ci95": median_ratio_ci(base, other, resamples, rng),
            }
    return result


# -- output -------------------------------------------------------------------------


MODE_NAMES = {
    "plain": "plain ZODB",
    "wrapped": "wrapper + daemon",
    "plain-b": "plain ZODB (A/A control)",
    "null": "wrapper, no-op reporter (decomposition)",
    "sink": "wrapper + minimal sink (decomposition)",
}


def format_table(title: str, res: dict, labels: list[str], wrapped_name: str) -> str:
    names = dict(MODE_NAMES, wrapped=wrapped_name)
    lines = [title, ""]
    lines.append("| commit | mode | n | median µs | p90 µs | p99 µs | max µs | median overhead "
                 "(95% CI) | p99 overhead |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (2, 1):
        for label in labels:
            m = res["modes"].get(f"{label}/{n}")
            if m is None:
                continue
            ov = res["overhead"].get(f"{label}/{n}")
            if ov is None:
                med = p99 = "—"
            else:
                ci = ov["median_ci95"]
                med = f"{ov['median'] * 100:+.1f} %"
                if ci:
                    med += f" ({ci[0] * 100:+.1f} … {ci[1] * 100:+.1f})"
                p99 = f"{ov['p99'] * 100:+.1f} %"
            lines.append(
                f"| {n}-storage | {names[label]} | {m['n']} | {m['median_us']:.0f} | "
                f"{m['p90_us']:.0f} | {m['p99_us']:.0f} | {m['max_us']:.0f} | {med} | {p99} |"
            )
    return "\n".join(lines)


def cpu_note(cpu: dict) -> str:
    return (f"machine {cpu['machine_busy']:.0%} busy, our processes {cpu['ours']:.0%}, "
            f"other processes {cpu['others']:.0%}; load avg {cpu['loadavg_before'][0]:.2f} "
            f"-> {cpu['loadavg_after'][0]:.2f}")


def format_breakdown(b: dict) -> str:
    return (
        "Inside the wrapped 2-storage commit (daemon up): Reporter.begin (BEGIN+SYNC send) "
        f"median {b['begin_median_us']:.1f} µs; Reporter.confirm (wait for the SYNC reply, "
        f"before the first tpc_finish) median {b['confirm_median_us']:.1f} µs, "
        f"p99 {b['confirm_p99_us']:.1f} µs, max {b['confirm_max_us']:.1f} µs "
        f"({b['confirm_waited']} of {b['n']} commits waited > 20 µs)."
    )


class CpuAccount:
    """Machine CPU time used by other processes than ours during a phase.

    From ``/proc/stat`` (all CPUs busy time) minus the CPU time of this
    process and of the ZEO servers, daemon and sink we started.
    """

    def __init__(self, pids_fn) -> None:
        self.pids_fn = pids_fn
        self.tick = os.sysconf("SC_CLK_TCK")

    def _machine(self) -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]) - idle, sum(fields[:8])

    def _ours(self) -> int:
        total = 0
        for pid in [os.getpid(), *self.pids_fn()]:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def start(self) -> None:
        self.m0, self.o0 = self._machine(), self._ours()
        self.load0 = os.getloadavg()

    def stop(self) -> dict:
        (busy1, all1), ours1 = self._machine(), self._ours()
        busy0, all0 = self.m0
        seconds = (all1 - all0) / self.tick / (os.cpu_count() or 1)
        machine = (busy1 - busy0) / max(1, all1 - all0)
        ours = (ours1 - self.o0) / max(1, all1 - all0)
        return {
            "machine_busy": machine,
            "ours": ours,
            "others": max(0.0, machine - ours),
            "loadavg_before": self.load0,
            "loadavg_after": os.getloadavg(),
            "seconds": seconds,
        }


def _relative(path: str) -> str:
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


def machine_busy(seconds: float) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from ``/proc/stat``)."""
    def read():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    b0, a0 = read()
    time.sleep(seconds)
    b1, a1 = read()
    return (b1 - b0) / max(1, a1 - a0)


def wait_quiet(limit: float, threshold: float, say) -> float:
    """Wait (at most ``limit`` s) until the machine is < ``threshold`` busy over 3 s."""
    deadline = time.monotonic() + limit
    while True:
        busy = machine_busy(3.0)
        if busy < threshold or time.monotonic() > deadline:
            return busy
        say(f"machine {busy:.0%} busy (other processes): waiting for < {threshold:.0%}")


def machine_note() -> dict:
    try:
        model = next(line.split(":", 1)[1].strip()
                     for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    import ZEO  # noqa: F401
    from importlib.metadata import version

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ZODB": version("ZODB"),
        "ZEO": version("ZEO"),
        "note": "2 runzeo servers, the daemon and this client all on this machine",
    }


# -- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=2000,
                    help="measured rounds: commits per mode (default 2000)")
    ap.add_argument("--warmup", type=int, default=200, help="discarded rounds first (default 200)")
    ap.add_argument("--down-commits", type=int, default=500,
                    help="rounds with the daemon stopped (default 500; 0: skip)")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the plain-b A/A control database")
    ap.add_argument("--timeout", type=float, default=1.0, help="wrapper's timeout (default 1.0)")
    ap.add_argument("--burst-period", type=float, default=1.0, help="daemon (default 1.0)")
    ap.add_argument("--full-dump-period", type=float, default=60.0, help="daemon (default 60)")
    ap.add_argument("--bootstrap", type=int, default=1000,
                    help="bootstrap resamples for the CI (default 1000; 0: none)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time Reporter.begin/confirm inside the wrapped commits")
    ap.add_argument("--decompose", action="store_true",
                    help="add two wrapped databases, with a no-op reporter and with a reporter"
                         " talking to a minimal SYNC-answering sink, to split the overhead")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="first wait (at most SECONDS) until the machine is < 10%% busy over 3 s"
                         " (the result is affected by other processes)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="work directory (default: a fresh temp dir, removed)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    tmp = None
    if args.dir:
        work = Path(args.dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="commit-overhead-")
        work = Path(tmp.name)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    idle_before = None
    if args.wait_quiet > 0:
        idle_before = wait_quiet(args.wait_quiet, 0.10, say)
        say(f"machine {idle_before:.0%} busy before the start")
    servers = {name: ZeoServer(work / name, ["1"]) for name in STORAGES}
    daemon = None
    sink = None
    extra_reporters = []
    handles: dict[str, Handle] = {}
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        for server in servers.values():
            server.start()
        zeo = {name: (server.address, "1") for name, server in servers.items()}
        daemon = DaemonProcess(
            work / "daemon",
            storages={n: {"data_fs": str(s.data_fs("1")), "zeo": f"{s.address[0]}:{s.address[1]}",
                          "zeo_storage": "1"} for n, s in servers.items()},
            server={"burst_period": args.burst_period, "full_dump_period": args.full_dump_period},
            verbose=False,
        )
        daemon.start()
        daemon.wait_bootstrapped(timeout=60)
        say(f"servers {[s.address[1] for s in servers.values()]}, daemon {daemon.port}: bootstrapped")

        labels = ["plain", "wrapped"] + (["plain-b"] if args.control else [])
        for label in labels:
            handles[label] = Handle(label, zeo, daemon.address, wrap=label == "wrapped",
                                    timeout=args.timeout)
        if args.decompose:
            sink_port = free_port()
            sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_port)],
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            if not wait_for_port(("127.0.0.1", sink_port), timeout=10):
                raise RuntimeError("the sink did not start")
            sink_reporter = Reporter(("127.0.0.1", sink_port), timeout=args.timeout)
            extra_reporters.append(sink_reporter)
            handles["null"] = Handle("null", zeo, None, wrap=True, timeout=args.timeout,
                                     reporter=NullReporter())
            handles["sink"] = Handle("sink", zeo, None, wrap=True, timeout=args.timeout,
                                     reporter=sink_reporter)
            labels += ["null", "sink"]
            deadline = time.monotonic() + 10
            while not sink_reporter.connected and time.monotonic() < deadline:
                time.sleep(0.01)
        ours = lambda: [p.pid for p in (daemon.proc, sink,  # noqa: E731
                                        *(s.process for s in servers.values())) if p is not None]
        account = CpuAccount(ours)
        handles["plain"].create_objects([h.key for h in handles.values()])
        for handle in handles.values():
            handle.find_objects()
        reporter = handles["wrapped"].reporter
        deadline = time.monotonic() + 10
        while not reporter.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        if not reporter.connected:
            raise RuntimeError("the wrapper's reporter did not connect to the daemon")
        breakdown = Breakdown(reporter) if args.breakdown else None

        # Phase 1: daemon up.
        samples = {f"{label}/{n}": [] for label in labels for n in (2, 1)}
        say(f"warm-up: {args.warmup} rounds of {2 * len(labels)} commits")
        run_rounds(handles, args.warmup, rng, False, samples)
        say(f"measuring: {args.commits} rounds")
        if breakdown:
            breakdown.clear()
            breakdown.recording = True
        t0 = time.monotonic()
        account.start()
        run_rounds(handles, args.commits, rng, True, samples)
        up_cpu = account.stop()
        up_seconds = time.monotonic() - t0
        if breakdown:
            breakdown.recording = False
        if not reporter.connected:
            say("WARNING: the reporter lost the daemon during phase 1")
        up = analyse(samples, labels, args.bootstrap, rng)
        up["seconds"] = up_seconds
        up["cpu"] = up_cpu
        up["reporter_connected_at_end"] = reporter.connected
        if breakdown and breakdown.confirm_ns:
            c = sorted(breakdown.confirm_ns)
            b = sorted(breakdown.begin_ns)
            up["breakdown"] = {
                "n": len(c),
                "begin_median_us": pct(b, 50) / 1e3,
                "confirm_median_us": pct(c, 50) / 1e3,
                "confirm_p99_us": pct(c, 99) / 1e3,
                "confirm_max_us": c[-1] / 1e3,
                "confirm_waited": sum(1 for v in c if v > 20_000),
            }

        # Phase 2: daemon stopped.
        down = None
        down_labels = labels
        if args.down_commits > 0:
            code = daemon.stop()
            say(f"daemon stopped (exit {code})")
            deadline = time.monotonic() + 10
            while reporter.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            if reporter.connected:
                raise RuntimeError("the reporter did not notice the daemon's exit")
            down_handles = {k: h for k, h in handles.items() if k not in ("null", "sink")}
            down_labels = list(down_handles)
            samples = {f"{label}/{n}": [] for label in down_labels for n in (2, 1)}
            run_rounds(down_handles, min(args.warmup, 50), rng, False, samples)
            t0 = time.monotonic()
            account.start()
            run_rounds(down_handles, args.down_commits, rng, True, samples)
            down_cpu = account.stop()
            down = analyse(samples, down_labels, args.bootstrap, rng)
            down["seconds"] = time.monotonic() - t0
            down["cpu"] = down_cpu
            down["reporter_connected_at_end"] = reporter.connected
    finally:
        for handle in handles.values():
            try:
                handle.close()
            except Exception as exc:  # pragma: no cover - best effort
                say(f"closing {handle.label}: {exc}")
        for reporter_ in extra_reporters:
            reporter_.close()
        if sink is not None:
            sink.kill()
            sink.wait()
        if daemon is not None:
            daemon.stop()
        for server in servers.values():
            server.stop()
        if tmp is not None:
            tmp.cleanup()

    ov2 = up["overhead"]["wrapped/2"]["median"]
    ov1 = up["overhead"]["wrapped/1"]["median"]
    targets = {
        "multi_median_overhead": ov2, "multi_target": TARGET_MULTI, "multi_met": ov2 <= TARGET_MULTI,
        "single_median_overhead": ov1, "single_target": TARGET_SINGLE,
        "single_met": ov1 <= TARGET_SINGLE,
    }
    result = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([_relative(sys.executable), *sys.argv]),
        "args": vars(args),
        "machine": dict(machine_note(), busy_before_start=idle_before),
        "daemon_up": up,
        "daemon_stopped": down,
        "targets": targets,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = result["machine"]
    print(f"# commit overhead, {result['date']}, {m['cpus']} CPUs ({m['cpu_model']}), "
          f"Python {m['python']}, ZODB {m['ZODB']}, ZEO {m['ZEO']}; {m['note']}")
    print()
    print(format_table(f"Daemon running ({args.commits} rounds, {up['seconds']:.1f} s; "
                       f"{cpu_note(up['cpu'])})", up, labels, "wrapper + daemon"))
    if "breakdown" in up:
        print()
        print(format_breakdown(up["breakdown"]))
    if down is not None:
        print()
        print(format_table(f"Daemon stopped, for information ({args.down_commits} rounds, "
                           f"{down['seconds']:.1f} s; {cpu_note(down['cpu'])})", down,
                           down_labels, "wrapper, daemon stopped"))
    print()
    print(f"target 2-storage median overhead <= {TARGET_MULTI:.0%}: {ov2 * 100:+.1f} % -> "
          f"{'met' if targets['multi_met'] else 'NOT met'}")
    print(f"target 1-storage median overhead <= {TARGET_SINGLE:.0%}: {ov1 * 100:+.1f} % -> "
          f"{'met' if targets['single_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
