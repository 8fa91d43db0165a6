#!/usr/bin/env python
"""Benchmark: throughput of the coherency daemon and DUMP latency under load.

For each number of clients N (default 1, 8, 32):

* starts the real daemon, ``python -m tidstorage serve -c <tmp config>``
  (status file in a temp dir, burst_period = 1, full_dump_period = 10, no
  storages, so the bootstrap completes at once), waits for its port and for
  ``BOOTSTRAPED`` to answer 1; its stderr goes to a file;
* a *load generator* process opens N connections and sends legacy
  ``BEGIN``/``COMMIT`` pairs of 2-storage transactions over 8 storages, in
  pre-encoded batches (default 500 transactions), each followed by ``SYNC``;
  a batch counts only once its ``SYNC`` reply has arrived (the daemon has
  then applied it), and at most 2 batches are in flight per connection;
* a *DUMP prober* process, on its own connection, sends ``DUMP`` every 100 ms,
  times the reply and parses it (legacy dict: count, keys, values);
* after a warm-up (default 1 s), transactions confirmed during the measured
  window (default 5 s) give transactions/s; DUMP latency p50/p99 is taken
  over the probes sent in the window (nearest-rank percentiles);
* at the end the daemon gets SIGTERM and the lines of its log containing
  ``CRITICAL`` and ``refused`` are counted and reported;
* the CPU used during the window by the server and by the generator is
  reported, and so is ``other``: the rest of the machine's busy time (from
  /proc/stat), which shows when other processes disturbed a measurement.

The same generator, with the same bytes, is then run against a *baseline*: a
minimal ``asyncio.Protocol`` server (this script with ``--baseline-server``)
that only reads the bytes in large chunks and answers ``1`` to each ``SYNC``
(also when a ``SYNC`` is split across reads). That is the Python ceiling for
this transport; the table shows our fraction of it. On 2 cores the baseline
is limited by the generator (its CPU share is printed), so it is a lower
bound of the ceiling.

TIDs are causally plausible, so that a correct daemon has no reason to log a
"Decreasing update". In a real ZODB commit a storage chooses the TID under its
commit lock (taken at vote, released after tpc_finish), and the committing
client has sent its BEGIN before its first tpc_finish: so if T2 gets a higher
TID than T1 on storage s, T1 was announced before T2 could even get its TID.
The generator mimics that with per-storage locks: a batch takes the "commit
lock" of each storage it uses when its TIDs are drawn from the storage's
counter (``max(last + 1, tid_at(time.time()))``: real ZODB TIDs of the current
time; the daemon refuses TIDs implausibly far in the future, see ``[server]
max_tid_ahead``), and keeps it until the daemon
has confirmed the batch (SYNC reply); other connections wait for free
storages, first come first served. The connection holding a storage may
pipeline its second batch on it (a connection is processed in order), but
only when no other connection is waiting, so that N clients really share the
load. So every storage's TIDs reach the daemon in increasing order. Each batch uses
one pair of storages, drawn at random among the free ones (28 pairs over 8
storages): as with ZEO's commit locks, at most 4 connections have batches in
flight at any moment (up to 2 each); the others wait their turn. Transaction
ids are disjoint per client (``c<client>-<seq>``).

``--tids clock`` drops the locks (any connection, any storage, any time; TIDs
still drawn from the shared per-storage counters when a batch is built):
batches of different connections then reach the daemon in any order, and the
daemon rightly logs a "Decreasing update" for each TID that arrives after a
higher one was published. It shows what causally implausible load costs.

``--overlap K`` keeps K transactions of each batch in flight on its
connection (the BEGIN of transaction i + K is sent right after the COMMIT of
i), as when clients announce transactions before finishing them: the groups
of the tracker then stay busy during a batch instead of dissolving at every
COMMIT.

``--breakdown`` times, in-process and without a profiler, each stage of the
daemon (decoder, tracker, dispatch, TID log writer, ``data_received``) on the
generator's bytes, per transaction.

Example::

    .venv/bin/python bench/daemon_throughput.py                 # 1, 8, 32 clients
    .venv/bin/python bench/daemon_throughput.py --clients 32 --json
    .venv/bin/python bench/daemon_throughput.py --clients 32 --only ours \\
        --profile /tmp/prof     # daemon under cProfile (numbers not representative)
    .venv/bin/python bench/daemon_throughput.py --breakdown    # µs per transaction per stage
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from tidstorage.core import protocol as p
from tidstorage.core.tids import tid_at

SYNC = p.SYNC_REQUEST
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the load generator (its own process) ------------------------------------


class _Client(asyncio.Protocol):
    """One connection of the generator; replies are ``1\\n`` per SYNC."""

    def __init__(self, gen: "_Generator", cid: int) -> None:
        self.gen = gen
        self.cid = cid
        self.prefix = b"c%d-" % cid
        self.seq = 0
        self.pending: deque = deque()  # (storage indexes, ntx) per batch in flight
        self.templates: dict = {}
        self.buf = b""
        self.confirmed = 0  # transactions confirmed in the window
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = buf.count(b"\n")
        if buf[: 2 * n] != b"1\n" * n:
            raise RuntimeError(f"client {self.cid}: unexpected reply {buf[:40]!r}")
        self.buf = buf[2 * n :]
        gen = self.gen
        for _ in range(n):
            gen.confirm(self)
        gen.pump()

    def connection_lost(self, exc) -> None:
        if not self.gen.stopping:
            self.gen.fail(f"client {self.cid}: connection lost ({exc})")

    def template(self, a: int, b: int) -> tuple[bytes, bytes, bytes]:
        """%-templates of BEGIN (seq), COMMIT (seq, tid a, tid b) and both."""
        key = (a, b)
        tmpl = self.templates.get(key)
        if tmpl is None:
            na, nb = self.gen.names[a], self.gen.names[b]
            pre = self.prefix
            begin = b"BEGIN\n" + pre + b"%d\n2\n" + na + b"\n" + nb + b"\n"
            commit = b"COMMIT\n" + pre + b"%d\n2\n" + na + b"\n" + nb + b"\n%d\n%d\n"
            tmpl = self.templates[key] = (begin, commit, begin + commit)
        return tmpl


class _Generator:
    def __init__(self, nclients: int, storages: list[str], batch: int, max_in_flight: int,
                 seed: int, locks: bool = True, overlap: int = 0) -> None:
        self.nclients = nclients
        self.locks = locks
        self.overlap = overlap
        self.storage_ids = storages
        self.names = [s.encode() for s in storages]
        for name in self.names:
            assert b"%" not in name and b"\n" not in name
        self.batch = batch
        self.max_in_flight = max_in_flight
        self.rnd = random.Random(seed)
        self.owner: list = [None] * len(storages)  # storage -> client holding its lock
        self.refs = [0] * len(storages)  # batches in flight holding it
        self.last_tid = [0] * len(storages)
        self.clients: list[_Client] = []
        self.waiting: deque = deque()
        self.stopping = False
        self.sending = False
        self.t_measure = self.t_end = 0.0
        self.confirmed = 0  # transactions confirmed in the window
        self.batches_in_window = 0
        self.sent_tx = 0
        self.checked = False
        self.done: asyncio.Future | None = None
        self.error: str | None = None

    def fail(self, message: str) -> None:
        self.error = self.error or message
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def build(self, client: _Client, a: int, b: int) -> bytes:
        """The bytes of one batch on storages a, b (TIDs drawn now), + SYNC."""
        n = self.batch
        now = tid_at(time.time())  # a ZODB TID, not nanoseconds
        ta = max(self.last_tid[a] + 1, now)
        tb = max(self.last_tid[b] + 1, now)
        self.last_tid[a] = ta + n - 1
        self.last_tid[b] = tb + n - 1
        s0 = client.seq
        client.seq = s0 + n
        begin, commit, pair = client.template(a, b)
        k = self.overlap
        if not k:
            parts = [
                pair % (s, s, x, y)
                for s, x, y in zip(range(s0, s0 + n), range(ta, ta + n), range(tb, tb + n))
            ]
        else:
            # k transactions in flight: BEGIN of i + k right after COMMIT of i.
            begins = [begin % s for s in range(s0, s0 + n)]
            parts = begins[:k]
            for i, (s, x, y) in enumerate(
                zip(range(s0, s0 + n), range(ta, ta + n), range(tb, tb + n))
            ):
                parts.append(commit % (s, x, y))
                if i + k < n:
                    parts.append(begins[i + k])
        if not self.checked:  # the fast templates are the protocol's own encoding
            self.checked = True
            sa, sb = self.storage_ids[a], self.storage_ids[b]
            txns = [f"c{client.cid}-{s}" for s in range(s0, s0 + n)]
            enc_b = [p.encode_begin(t, [sa, sb]) for t in txns]
            enc_c = [p.encode_commit(t, {sa: ta + i, sb: tb + i}) for i, t in enumerate(txns)]
            if not k:
                expect = [x for pair_ in zip(enc_b, enc_c) for x in pair_]
            else:
                expect = enc_b[:k]
                for i in range(n):
                    expect.append(enc_c[i])
                    if i + k < n:
                        expect.append(enc_b[i + k])
            assert b"".join(parts) == b"".join(expect), "template differs from protocol.encode_*"
        parts.append(SYNC)
        return b"".join(parts)

    def pump(self) -> None:
        """Send batches for waiting clients while storages are free (FIFO)."""
        if not self.sending:
            return
        if time.monotonic() >= self.t_end:
            self.sending = False
            self._check_done()
            return
        owner, refs, rnd = self.owner, self.refs, self.rnd
        waiting = self.waiting
        nstorages = len(owner)
        for _ in range(len(waiting)):
            c = waiting.popleft()
            if self.locks:
                if waiting:  # others are queued: no jumping the queue on held storages
                    avail = [s for s in range(nstorages) if owner[s] is None]
                else:
                    avail = [s for s in range(nstorages) if owner[s] is None or owner[s] is c]
            else:
                avail = range(nstorages)
            if len(avail) < 2:
                waiting.append(c)
                continue
            a, b = rnd.sample(avail, 2)
            for s in (a, b):
                owner[s] = c
                refs[s] += 1
            data = self.build(c, a, b)
            c.pending.append(((a, b), self.batch))
            self.sent_tx += self.batch
            c.transport.write(data)
            if len(c.pending) < self.max_in_flight:
                waiting.append(c)

    def confirm(self, c: _Client) -> None:
        (a, b), ntx = c.pending.popleft()
        owner, refs = self.owner, self.refs
        for s in (a, b):
            refs[s] -= 1
            if not refs[s]:
                owner[s] = None
        now = time.monotonic()
        if self.t_measure <= now < self.t_end:
            self.confirmed += ntx
            c.confirmed += ntx
            self.batches_in_window += 1
        if len(c.pending) == self.max_in_flight - 1:
            self.waiting.append(c)
        if not self.sending:
            self._check_done()

    def _check_done(self) -> None:
        if not any(c.pending for c in self.clients) and not self.done.done():
            self.done.set_result(None)


def _generator_main(conn, port: int, nclients: int, storages: list[str], batch: int,
                    max_in_flight: int, seed: int, locks: bool, overlap: int) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    gen = _Generator(nclients, storages, batch, max_in_flight, seed, locks, overlap)
    try:
        for cid in range(nclients):
            client = _Client(gen, cid)
            loop.run_until_complete(loop.create_connection(lambda: client, "127.0.0.1", port))
            gen.clients.append(client)
    except OSError as exc:
        conn.send({"error": f"generator cannot connect: {exc}"})
        return
    conn.send("ready")
    t0, t_measure, t_end = conn.recv()
    gen.t_measure, gen.t_end = t_measure, t_end
    gen.done = loop.create_future()
    cpu = {}

    def start() -> None:
        gen.sending = True
        gen.waiting.extend(gen.clients)
        gen.pump()

    def mark(name: str) -> None:
        cpu[name] = time.process_time()

    loop.call_at(t0, start)
    loop.call_at(t_measure, mark, "start")
    loop.call_at(t_end, mark, "end")
    # pump() stops sending at t_end; make sure it runs then even if idle.
    loop.call_at(t_end, gen.pump)
    try:
        loop.run_until_complete(asyncio.wait_for(gen.done, t_end - time.monotonic() + 30))
    except asyncio.TimeoutError:
        gen.error = gen.error or "generator: batches still unconfirmed 30 s after the end"
    gen.stopping = True
    for c in gen.clients:
        c.transport.close()
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()
    per_client = [c.confirmed for c in gen.clients]
    conn.send({
        "error": gen.error,
        "confirmed_tx": gen.confirmed,
        "batches": gen.batches_in_window,
        "sent_tx": gen.sent_tx,
        "per_client_min": min(per_client),
        "per_client_max": max(per_client),
        "cpu_seconds": cpu.get("end", 0) - cpu.get("start", 0),
    })


# -- the DUMP prober (its own process) ----------------------------------------


def _prober_main(conn, port: int, interval: float, nstorages: int) -> None:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as exc:
        conn.send({"error": f"prober cannot connect: {exc}"})
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.send("ready")
    t0, t_measure, t_end = conn.recv()
    reader = p.ReplyReader()
    latencies: list[float] = []
    error = None
    regressions = 0
    sizes = set()
    last: dict[str, int] = {}
    next_at = t0
    try:
        while True:
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            sent = time.monotonic()
            if sent >= t_end:
                break
            start = time.perf_counter()
            sock.sendall(p.DUMP_REQUEST)
            while (reply := reader.read_dict()) is None:
                data = sock.recv(65536)
                if not data:
                    raise OSError("the daemon closed the connection")
                reader.feed(data)
            latency = time.perf_counter() - start
            if sent >= t_measure:
                latencies.append(latency)
                sizes.add(len(reply))
            regressions += sum(1 for k, v in reply.items() if v < last.get(k, 0))
            last = reply
            next_at = max(next_at + interval, time.monotonic())
    except (OSError, p.ProtocolError) as exc:
        error = f"prober: {exc}"
    sock.close()
    conn.send({
        "error": error,
        "latencies": latencies,
        "dump_sizes": sorted(sizes),
        "dump_regressions": regressions,
        "expected_size": nstorages,
    })


# -- the baseline server (its own process) ------------------------------------


class _Sink(asyncio.Protocol):
    """Read everything; answer ``1`` to each ``SYNC\\n`` (even split across reads)."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.tail = b""

    def data_received(self, data: bytes) -> None:
        n = data.count(b"SYNC\n")
        if self.tail:
            # Only a SYNC straddling the previous read and this one (a match
            # here includes bytes of the tail, so it is not counted above).
            n += (self.tail + data[:4]).count(b"SYNC\n")
            self.tail = (self.tail + data[-4:])[-4:]
        else:
            self.tail = data[-4:]
        if n:
            self.transport.write(b"1\n" * n)


def _baseline_server(port: int) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Sink, "127.0.0.1", port, reuse_address=True,
                                          backlog=4096)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(serve())


def _self_test_sink() -> None:
    """The baseline's SYNC counting, on every way of splitting a stream."""
    stream = b"BEGIN\nx\n1\ns\nSYNC\nCOMMIT\nx\n1\ns\n5\nSYNC\nSYNC\n"
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            out = []
            sink = _Sink()
            sink.connection_made(type("T", (), {"write": staticmethod(out.append)})())
            for chunk in (stream[:i], stream[i:j], stream[j:]):
                if chunk:
                    sink.data_received(chunk)
            assert b"".join(out) == b"1\n" * 3, (i, j, out)


# -- servers under test --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def _bootstraped(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = p.ReplyReader()
        while time.monotonic() < deadline:
            sock.sendall(p.BOOTSTRAPED_REQUEST)
            while (value := reader.read_int()) is None:
                reader.feed(sock.recv(64))
            if value == 1:
                sock.sendall(p.QUIT_REQUEST)
                return
            time.sleep(0.05)
    raise RuntimeError("the daemon did not bootstrap")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _busy_cpu_seconds() -> float:
    """CPU seconds spent busy by the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK  # without guest times (counted in user)


class _Server:
    """The daemon (``ours``) or the baseline sink, as a subprocess."""

    def __init__(self, kind: str, workdir: Path, profile: Path | None = None) -> None:
        self.kind = kind
        self.port = _free_port()
        self.log_path = workdir / f"{kind}.log"
        if kind == "ours":
            config = workdir / "tidstorage.toml"
            config.write_text(
                "[server]\n"
                'address = "127.0.0.1"\n'
                f"port = {self.port}\n"
                f'status_file = "{workdir / "tidstorage.tid"}"\n'
                "burst_period = 1\n"
                "full_dump_period = 10\n"
            )
            prefix = [sys.executable]
            if profile is not None:
                prefix += ["-m", "cProfile", "-o", str(profile)]
            self.argv = prefix + ["-m", "tidstorage", "serve", "-c", str(config)]
        else:
            self.argv = [sys.executable, os.path.abspath(__file__),
                         "--baseline-server", str(self.port)]

    def __enter__(self) -> "_Server":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        try:
            _wait_port(self.port, self.proc)
            if self.kind == "ours":
                _bootstraped(self.port)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log_counts(self) -> dict:
        text = self.log_path.read_text(errors="replace").splitlines()
        return {
            "critical_lines": sum("CRITICAL" in line for line in text),
            "refused_lines": sum("refused" in line for line in text),
            "exit_code": self.proc.returncode,
        }


# -- one measurement -----------------------------------------------------------


def _source_digest() -> dict[str, str]:
    """sha256 prefixes of the daemon's modules, to tie results to the code measured."""
    import hashlib

    import tidstorage

    root = Path(tidstorage.__file__).parent
    return {
        name: hashlib.sha256((root / f"{name}.py").read_bytes()).hexdigest()[:12]
        for name in ("protocol", "server", "connection", "coordinator", "gate", "tracker",
                     "tidlog")
        if (root / f"{name}.py").exists()
    }


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def measure(kind: str, nclients: int, args, workdir: Path) -> dict:
    profile = None
    if args.profile and kind == "ours":
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profile = Path(args.profile) / f"daemon-{nclients}.prof"
    ctx = mp.get_context("fork")
    storages = [args.storage_format % i for i in range(args.storages)]
    with _Server(kind, workdir, profile) as server:
        procs = []
        gen_conn, child = ctx.Pipe()
        procs.append(ctx.Process(target=_generator_main, args=(
            child, server.port, nclients, storages, args.batch, args.in_flight, args.seed,
            args.tids == "locked", args.overlap)))
        probe_conn = None
        if kind == "ours":
            probe_conn, child2 = ctx.Pipe()
            procs.append(ctx.Process(target=_prober_main, args=(
                child2, server.port, args.dump_interval, len(storages))))
        conns = [c for c in (gen_conn, probe_conn) if c is not None]
        for proc in procs:
            proc.start()
        try:
            for c in conns:
                ready = c.recv()
                if ready != "ready":
                    raise RuntimeError(ready["error"])
            t0 = time.monotonic() + 0.2
            t_measure = t0 + args.warmup
            t_end = t_measure + args.duration
            for c in conns:
                c.send((t0, t_measure, t_end))
            time.sleep(max(0.0, t_measure - time.monotonic()))
            cpu0, busy0 = _cpu_seconds(server.proc.pid), _busy_cpu_seconds()
            time.sleep(max(0.0, t_end - time.monotonic()))
            cpu1, busy1 = _cpu_seconds(server.proc.pid), _busy_cpu_seconds()
            gen = gen_conn.recv()
            probe = probe_conn.recv() if probe_conn is not None else None
        finally:
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
    result = {
        "server": kind,
        "clients": nclients,
        "profiled": profile is not None,
        "tids": args.tids,
        "overlap": args.overlap,
        "source": _source_digest(),
        "tx_per_s": gen["confirmed_tx"] / args.duration,
        "batches": gen["batches"],
        "per_client_tx_per_s_min": gen["per_client_min"] / args.duration,
        "per_client_tx_per_s_max": gen["per_client_max"] / args.duration,
        "server_cpu": (cpu1 - cpu0) / args.duration,
        "generator_cpu": gen["cpu_seconds"] / args.duration,
        # Everything else the machine did meanwhile (DUMP prober, other users):
        # on a shared machine, results with a high value are not clean.
        "other_cpu": (busy1 - busy0 - (cpu1 - cpu0) - gen["cpu_seconds"]) / args.duration,
        "errors": [e for e in (gen["error"], probe and probe["error"]) if e],
    }
    if probe is not None:
        lat = probe["latencies"]
        result.update({
            "dump_samples": len(lat),
            "dump_p50_ms": _percentile(lat, 50) * 1000 if lat else None,
            "dump_p99_ms": _percentile(lat, 99) * 1000 if lat else None,
            "dump_max_ms": max(lat) * 1000 if lat else None,
            "dump_sizes": probe["dump_sizes"],
            "dump_regressions": probe["dump_regressions"],
        })
    if kind == "ours":
        result.update(server.log_counts())
        result["log"] = str(server.log_path)
        if profile is not None:
            result["profile"] = str(profile)
    return result


# -- in-process breakdown (no sockets, no profiler overhead) ----------------------


class _FakeTransport:
    def __init__(self) -> None:
        self.out = 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out += len(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def breakdown(args) -> dict:
    """Time each stage of the daemon on the generator's bytes, in-process.

    The stream is what 32 locked clients send (batches of ``--batch``
    transactions on random pairs, each + SYNC), cut in reads of
    ``--read-size`` bytes (the daemon's reads were ~64 KiB at 32 clients).
    Stages, each timed alone (best of 3), per transaction:

    * decode: ``Decoder.feed`` of every read;
    * tracker: ``Tracker.begin``/``commit`` called directly on the events;
    * apply without TID log: ``Daemon.apply`` with ``writer = None``
      (tracker + dispatch + ``_apply_publication``);
    * apply: ``Daemon.apply`` with the real TID log writer (burst 1 s, full 10 s);
    * one read: ``_Connection.process`` (or ``data_received`` if there is no
      ``process``) on a fake transport: decode + apply + reply write, i.e. the
      daemon minus asyncio, sockets and its scheduling of bulk reads.
    """
    from tidstorage.config import Config, ServerConfig
    from tidstorage.daemon.server import Daemon

    try:
        from tidstorage.daemon.connection import Connection as _Connection
    except ImportError:  # before connection.py was split out of server.py
        from tidstorage.daemon.server import _Connection
    from tidstorage.core.tracker import Tracker

    storages = [args.storage_format % i for i in range(args.storages)]
    nbatches = max(1, args.breakdown_tx // args.batch)
    gen = _Generator(32, storages, args.batch, args.in_flight, args.seed, True, args.overlap)
    clients = [_Client(gen, cid) for cid in range(32)]
    rnd = random.Random(args.seed)
    stream = b"".join(
        gen.build(clients[i % 32], *rnd.sample(range(len(storages)), 2)) for i in range(nbatches)
    )
    ntx = nbatches * args.batch
    size = args.read_size
    reads = [stream[i : i + size] for i in range(0, len(stream), size)]

    def best(func, setup=lambda: None) -> float:
        times = []
        for _ in range(3):
            state = setup()
            t = time.perf_counter()
            func(state)
            times.append(time.perf_counter() - t)
        return min(times)

    def decode(_):
        feed = p.Decoder().feed
        for r in reads:
            feed(r)

    decoder = p.Decoder()
    event_lists = [decoder.feed(r) for r in reads]
    import gc
    gc.freeze()  # the kept events are not the daemon's garbage: keep them out of GC passes
    assert sum(len(e) for e in event_lists) == 2 * ntx + nbatches
    assert not any(ev[0] is p.ERROR for e in event_lists for ev in e)

    def tracker_only(tracker):
        begin, commit = tracker.begin, tracker.commit
        for events in event_lists:
            for ev in events:
                kind = ev[0]
                if kind is p.COMMIT:
                    commit(ev[1], ev[2])
                elif kind is p.BEGIN:
                    begin(*ev[1:])

    def fresh_tracker():
        t = Tracker()
        t.set_bootstrapped()
        return t

    tmp = Path(tempfile.mkdtemp(prefix="tidstorage-breakdown-"))
    counter = iter(range(1000))

    def fresh_daemon(with_log: bool = True):
        status = tmp / f"tid-{next(counter)}.log" if with_log else None
        config = Config(server=ServerConfig(status_file=status, burst_period=1,
                                            full_dump_period=10))
        daemon = Daemon(config)
        daemon.tracker.set_bootstrapped()
        try:  # the handler injected (a499d51 and later)
            conn = _Connection(daemon, daemon.bulk, auth_required=False)
        except TypeError:  # older code: the connection received the daemon
            conn = _Connection(daemon)
        conn.connection_made(_FakeTransport())
        return daemon, conn

    def apply(state):
        daemon, conn = state
        for events in event_lists:
            daemon.apply(conn, events)

    def received(state):
        _, conn = state
        # decode + apply + write of one read, without the daemon's own
        # scheduling of bulk reads (if it has one) which needs a running loop
        handle = getattr(conn, "process", conn.data_received)
        for r in reads:
            handle(r)

    try:
        t_decode = best(decode)
        t_tracker = best(tracker_only, fresh_tracker)
        t_apply_nolog = best(apply, lambda: fresh_daemon(False))
        t_apply = best(apply, fresh_daemon)
        t_received = best(received, fresh_daemon)
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    us = lambda t: t / ntx * 1e6  # noqa: E731
    return {
        "source": _source_digest(),
        "overlap": args.overlap,
        "transactions": ntx,
        "reads": len(reads),
        "read_size": size,
        "us_per_tx": {
            "decode": us(t_decode),
            "tracker": us(t_tracker),
            "dispatch+publication (apply without log - tracker)": us(t_apply_nolog - t_tracker),
            "TID log writer (apply - apply without log)": us(t_apply - t_apply_nolog),
            "apply": us(t_apply),
            "one read (decode + apply + write)": us(t_received),
        },
        "max_tx_per_s_without_asyncio": ntx / t_received,
    }


# -- main -------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    by = {(r["server"], r["clients"]): r for r in rows}
    clients = sorted({r["clients"] for r in rows})

    def cpu(r):
        return "-" if r is None else f"{r['server_cpu']:.0%}/{r['generator_cpu']:.0%}"

    def other(r):
        return "-" if r is None or "other_cpu" not in r else f"{r['other_cpu']:.0%}"

    head = (f"{'clients':>7} {'ours tx/s':>10} {'base tx/s':>10} {'ours/base':>9} "
            f"{'DUMP p50':>9} {'DUMP p99':>9} {'CRITICAL':>8} {'refused':>7} "
            f"{'ours cpu':>9} {'base cpu':>9} {'other':>9}")
    print(head)
    print("-" * len(head))
    for n in clients:
        ours, base = by.get(("ours", n)), by.get(("baseline", n))
        ratio = ours["tx_per_s"] / base["tx_per_s"] if ours and base and base["tx_per_s"] else None
        print(
            f"{n:>7} {_fmt(ours and ours['tx_per_s'], ',.0f'):>10} "
            f"{_fmt(base and base['tx_per_s'], ',.0f'):>10} {_fmt(ratio, '.1%'):>9} "
            f"{_fmt(ours and ours['dump_p50_ms'], '.2f'):>6} ms {_fmt(ours and ours['dump_p99_ms'], '.2f'):>6} ms "
            f"{_fmt(ours and ours['critical_lines'], 'd'):>8} {_fmt(ours and ours['refused_lines'], 'd'):>7} "
            f"{cpu(ours):>9} {cpu(base):>9} {other(ours):>4}/{other(base):>4}"
        )
    print("cpu: share of one core during the window: server/generator; other: the rest of the")
    print("machine's busy time (DUMP prober, other processes) during ours/baseline's window")
    for r in rows:
        for e in r["errors"]:
            print(f"ERROR ({r['server']}, {r['clients']} clients): {e}")
        if r["server"] == "ours" and r.get("dump_regressions"):
            print(f"WARNING ({r['clients']} clients): DUMP went backward {r['dump_regressions']} times")
        if r.get("exit_code"):
            print(f"WARNING ({r['clients']} clients): the daemon exited with {r['exit_code']}")
        if r.get("other_cpu", 0) > 0.15:
            print(f"WARNING ({r['server']}, {r['clients']} clients): other processes used "
                  f"{r['other_cpu']:.0%} of a core during the window: not a clean measurement")
        if r["generator_cpu"] > 0.8:
            print(f"note ({r['server']}, {r['clients']} clients): the generator used "
                  f"{r['generator_cpu']:.0%} of a core: it is (near) the bottleneck"
                  + (", so this baseline is a lower bound of the ceiling"
                     if r["server"] == "baseline" else ""))


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--baseline-server"]:
        _baseline_server(int(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts (1,8,32)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (1)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds (5)")
    ap.add_argument("--batch", type=int, default=500, help="transactions per batch (500)")
    ap.add_argument("--in-flight", type=int, default=2, help="batches in flight per connection (2)")
    ap.add_argument("--storages", type=int, default=8, help="number of storages (8)")
    ap.add_argument("--storage-format", default="storage-%d", help="storage id format (storage-%%d)")
    ap.add_argument("--dump-interval", type=float, default=0.1, help="seconds between DUMPs (0.1)")
    ap.add_argument("--tids", choices=("locked", "clock"), default="locked",
                    help="locked (default): per-storage commit locks, causally plausible TIDs; "
                    "clock: no locks (any connection, any storage, at any time), TIDs drawn "
                    "at send time: TIDs of a storage can reach the daemon out of order")
    ap.add_argument("--overlap", type=int, default=0, metavar="K",
                    help="0 (default): each BEGIN is directly followed by its COMMIT; K > 0: "
                    "each connection keeps K transactions of a batch in flight (BEGIN of "
                    "i + K sent right after COMMIT of i), so groups stay busy")
    ap.add_argument("--only", choices=("ours", "baseline"), help="run only one server")
    ap.add_argument("--profile", metavar="DIR",
                    help="run the daemon under cProfile, write DIR/daemon-N.prof")
    ap.add_argument("--breakdown", action="store_true",
                    help="instead: time decode/tracker/apply/TID log in-process, per transaction")
    ap.add_argument("--breakdown-tx", type=int, default=200_000,
                    help="transactions for --breakdown (200000)")
    ap.add_argument("--read-size", type=int, default=64 * 1024,
                    help="bytes per simulated read for --breakdown (65536)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, TID logs)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.storages < 2:
        ap.error("--storages must be at least 2")
    if args.breakdown:
        result = breakdown(args)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{result['transactions']} transactions in {result['reads']} reads of "
                  f"{result['read_size']} bytes; microseconds per transaction:")
            for name, value in result["us_per_tx"].items():
                print(f"  {name:52} {value:6.2f}")
            print(f"  => at most {result['max_tx_per_s_without_asyncio']:,.0f} tx/s "
                  "before asyncio and sockets")
        return 0
    clients = [int(x) for x in args.clients.split(",") if x]
    kinds = [args.only] if args.only else ["ours", "baseline"]
    _self_test_sink()
    rows = []
    top = Path(tempfile.mkdtemp(prefix="tidstorage-bench-"))
    try:
        for n in clients:
            for kind in kinds:
                workdir = top / f"{kind}-{n}"
                workdir.mkdir()
                row = measure(kind, n, args, workdir)
                rows.append(row)
                if not args.json:
                    print(f"  {kind:8} {n:3} clients: {row['tx_per_s']:>12,.0f} tx/s"
                          + (f", DUMP p99 {row['dump_p99_ms']:.2f} ms" if row.get("dump_p99_ms") else ""),
                          file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {top}", file=sys.stderr)
        else:
            import shutil
            shutil.rmtree(top, ignore_errors=True)
    if args.json:
        print(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "results": rows}, indent=2))
    else:
        print_table(rows)
        if args.profile:
            print(f"profiles in {args.profile} (profiled daemon: throughput not representative)")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
