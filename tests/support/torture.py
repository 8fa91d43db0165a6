"""The crash torture: random faults on a live cluster, then repair and restore.

Shared by ``tests/test_torture.py`` (a short run) and ``bench/torture.py``
(a long, parameterised one). It reuses the demo's :class:`~tidstorage.demo.Cluster`:
two ``runzeo`` servers with three storages, the real daemon, and writer
processes (``tidstorage.demo.workload``) committing over random subsets of the
storages while keeping a cross-storage invariant.

A *round*:

1. start ``writers`` writer processes for ``seconds`` and wait until each has
   committed (seen in the tails of the files), so that faults do not hit a
   writer still opening its connections;
2. run a random schedule of events (seeded :class:`random.Random`), at
   random moments of the round, one at a time:

   * ``writer_kill``: start a *victim* writer that SIGKILLs itself between
     the ``tpc_finish`` calls of its K-th multi-storage commit (K in 1..3):
     the live files then hold half of a transaction;
   * ``daemon_kill``: SIGKILL the daemon, restart it after 0.2-1.5 s
     (other events may happen while it is down);
   * ``zeo_restart``: restart one of the two ZEO servers (SIGTERM, start on
     the same port); postponed while a victim writer is alive (the workload
     does not retry while it opens its databases);
   * ``backup``: ``run_backup`` (full with probability 0.3), at least one
     per round;
   * ``heal`` (after each ``writer_kill``, once its victim is dead and the
     daemon up): ``tidstorage heal`` online while the writers go on; each
     healed split must leave the daemon unfrozen past its heal;

   round 0 has each kind at least once (``force_all``);
3. wait for the writers (exit 0, progress made; errors only if a ZEO server
   was restarted during the round: the workload retries and counts them),
   restart the daemon if it is down, wait for its bootstrap, then *settle*:
   every split transaction present in the live files must be reported
   ("SPLIT transaction <id>") by the *current* daemon process (or the
   deadline ``grace + 30`` s passes: counted as ``splits_unseen``);
4. take the published point (``DUMP``), stop the daemon (SIGTERM: the TID
   log must then hold at least that point) and the ZEO servers;
5. restore the round's latest backup set into ``restored-<round>/`` and
   repair the live files in place (odd rounds: ``repair --heal``, the
   splits left undone on the files first, then the cut) (after removing the previous round's
   safety copies, as an operator would once satisfied); both are judged:
   ``verify.check(...).ok``, the workload's invariant on ``read_roots``, and
   the tool's own ``coherent`` flag (a failure counts in ``incoherent``).
   A cut the tools had to *lower* below the TID log's point (to the largest
   coherent cut the stamps allow) means the daemon published a point that
   splits a transaction: the result is still coherent, but it is counted
   apart (``lowered``, ``lowered_cuts``) and makes the run not ``ok``. The
   previous round's safety copies are removed before the repair, or kept
   as ``Data.fs.before-repair-round-N`` if that round had any problem;
6. unless ``fresh``, the next round restarts the ZEO servers and the daemon
   on the repaired files (they must be usable: servers start, writers make
   progress); with ``fresh``, every round has its own new cluster.

The result counts the rounds, the events of each kind, backups, restores,
repairs, incoherent results (must be 0) and the transactions dropped by the
cuts; ``problems`` lists everything that went wrong, in words.
"""

from __future__ import annotations

import heapq
import json
import shutil
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tidstorage.tools.common import id_filename
from tidstorage.demo import STORAGES, Cluster, read_roots

__all__ = ["KINDS", "TortureReport", "Torture", "run_torture"]

#: The kinds of events, in the order they are forced in round 0.
KINDS = ("writer_kill", "daemon_kill", "zeo_restart", "backup")


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None, "total": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "total": sum(values)}


@dataclass
class TortureReport:
    rounds: int = 0
    writer_kills: int = 0        #: victims killed between their tpc_finish calls
    daemon_kills: int = 0        #: SIGKILL + restart of the daemon
    zeo_restarts: int = 0        #: SIGTERM + restart of a ZEO server
    backups: int = 0             #: successful backups
    restores: int = 0
    repairs: int = 0
    incoherent: int = 0          #: restore/repair results failing a check (must be 0)
    lowered: int = 0             #: cuts lowered below the TID log's point (a split published)
    lowered_cuts: list[str] = field(default_factory=list)    #: ...described
    heals: int = 0               #: splits healed online (tidstorage heal)
    heals_refused: int = 0       #: heals refused (then cut by the repair)
    repair_heals: int = 0        #: splits undone by repair --heal
    splits_found: int = 0        #: split transactions in the live files before the repairs
    splits_unseen: int = 0       #: ...of which the current daemon did not report in time
    #: who wrote them: "killed writer", "regular writer" (a ZEO restart in its
    #: tpc_finish), "daemon no-op" (the daemon killed in its own no-op commit)
    split_causes: dict[str, int] = field(default_factory=dict)
    transactions: int = 0        #: committed by the regular writers
    writer_errors: int = 0       #: commits the writers retried (ZEO restarts)
    dropped_repair: list[int] = field(default_factory=list)   #: per repair (all storages)
    dropped_restore: list[int] = field(default_factory=list)  #: per restore (all storages)
    round_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.incoherent == 0 and self.lowered == 0 and not self.problems

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dropped_repair"] = _stats(self.dropped_repair)
        d["dropped_restore"] = _stats(self.dropped_restore)
        d["dropped_all"] = _stats(self.dropped_repair + self.dropped_restore)
        d["round_seconds"] = [round(s, 1) for s in self.round_seconds]
        d["seconds"] = round(self.seconds, 1)
        d["ok"] = self.ok
        return d

    def table(self) -> str:
        def mmm(values):
            s = _stats(values)
            if s["min"] is None:
                return "-"
            return f"{s['min']} / {s['median']:g} / {s['max']}"

        rows = [
            ("rounds", self.rounds),
            ("writers killed between tpc_finish calls", self.writer_kills),
            ("daemon kills (SIGKILL + restart)", self.daemon_kills),
            ("ZEO server restarts", self.zeo_restarts),
            ("backups", self.backups),
            ("restores", self.restores),
            ("repairs", self.repairs),
            ("incoherent results", self.incoherent),
            ("cuts lowered (incoherent published point)", self.lowered),
            ("split transactions in the live files", self.splits_found),
            ("  of which not reported by the daemon", self.splits_unseen),
            *((f"  written by: {cause}", n) for cause, n in sorted(self.split_causes.items())),
            ("transactions committed by the writers", self.transactions),
            ("writer commits retried (ZEO restarts)", self.writer_errors),
            ("dropped per repair (min / median / max)", mmm(self.dropped_repair)),
            ("dropped per restore (min / median / max)", mmm(self.dropped_restore)),
            ("dropped per cut, both (min / median / max)",
             mmm(self.dropped_repair + self.dropped_restore)),
            ("problems", len(self.problems)),
            ("wall time (s)", f"{self.seconds:.1f}"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class Torture:
    """One torture run (see the module docstring)."""

    def __init__(self, directory: Path, *, rounds: int = 3, seconds: float = 8.0,
                 writers: int = 3, seed: int = 0, events: int = 4, grace: float = 1.0,
                 pause: float = 0.01, fresh: bool = False, force_all: bool = True,
                 keep: bool = False, echo: Callable[[str], None] = print) -> None:
        import random

        if rounds < 1 or writers < 1 or seconds <= 0:
            raise ValueError("rounds, writers and seconds must be positive")
        self.directory = Path(directory).resolve()
        self.rounds = rounds
        self.seconds = seconds
        self.writers = writers
        self.seed = seed
        self.events = events
        self.grace = grace
        self.pause = pause
        self.fresh = fresh
        self.force_all = force_all
        self.keep = keep
        self.echo = echo
        self.rng = random.Random(seed)
        self.report = TortureReport()
        self.cluster: Cluster | None = None
        self.config = None
        self._victim_ids = 100
        self._t0 = time.monotonic()
        self._daemon_log_start = 0
        self._previous_round_failed = False

    # -- helpers -----------------------------------------------------------

    def say(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self._t0:6.1f}s] {text}")

    def problem(self, text: str) -> None:
        self.report.problems.append(text)
        self.say(f"PROBLEM: {text}")

    def live_paths(self) -> dict[str, Path]:
        return {sid: st.data_fs for sid, st in self.config.storages.items()}

    def _start_daemon(self) -> None:
        daemon = self.cluster.daemon
        self._daemon_log_start = len(daemon.log())
        daemon.start()

    def _daemon_log(self) -> str:
        """The log of the current daemon process only."""
        return self.cluster.daemon.log()[self._daemon_log_start:]

    # -- the run -----------------------------------------------------------

    def run(self) -> TortureReport:
        self._t0 = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for r in range(self.rounds):
                started = time.monotonic()
                self._round(r)
                self.report.rounds += 1
                self.report.round_seconds.append(time.monotonic() - started)
        finally:
            if self.cluster is not None:
                self.cluster.stop()
            self.report.seconds = time.monotonic() - self._t0
        return self.report

    def _open_cluster(self, r: int) -> None:
        from tidstorage.config import load_config

        if self.cluster is None or self.fresh:
            if self.cluster is not None:
                self.cluster.stop()
            where = self.directory / (f"cluster-{r}" if self.fresh else "cluster")
            if where.exists():
                shutil.rmtree(where)
            self.cluster = Cluster(where, grace=self.grace)
            self.cluster.start()
            self._daemon_log_start = 0
            self.config = load_config(self.cluster.config_path)
            self.say(f"cluster in {where}: storages {', '.join(STORAGES)}, daemon on port "
                     f"{self.cluster.daemon.port}")
        else:
            # Continue on the repaired files: they must be usable.
            for server in self.cluster.servers.values():
                server.start()
            self._start_daemon()
            self.cluster.daemon.wait_bootstrapped(timeout=120)
            self.say("ZEO servers and daemon restarted on the repaired files")

    def _round(self, r: int) -> None:
        rng = self.rng
        self._open_cluster(r)
        cluster = self.cluster
        state = _RoundState(r)
        problems_before = len(self.report.problems) + self.report.lowered
        round_start = time.time()
        writers = {
            w: cluster.start_writer(w, seconds=self.seconds, pause=self.pause,
                                    seed=rng.randrange(1 << 30))
            for w in range(1, self.writers + 1)
        }
        self._wait_writers_ready(writers, round_start)
        self._run_schedule(state, self._plan(r))
        self._end_writers(state, writers)
        self._settle(state)
        self._stop_and_judge(state)
        self._previous_round_failed = (
            len(self.report.problems) + self.report.lowered > problems_before)
        self.say(f"round {r} done: {state.summary()}")

    # -- the schedule --------------------------------------------------------

    def _plan(self, r: int) -> list[tuple[float, str]]:
        rng = self.rng
        kinds = list(KINDS) if (self.force_all and r == 0) else []
        while len(kinds) < self.events:
            kinds.append(rng.choice(KINDS))
        if "backup" not in kinds:
            kinds.append("backup")
        span = max(self.seconds - 2.0, 1.0)
        return sorted((rng.uniform(0.0, span), kind) for kind in kinds)

    def _wait_writers_ready(self, writers: dict, since: float, timeout: float = 60) -> None:
        """Until every writer has committed once (its notes in the files' tails)."""
        from tidstorage.formats import filestorage
        from tidstorage.core.tids import tid_at

        since_tid = tid_at(since - 1)
        waiting = set(writers)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for w, proc in writers.items():
                if proc.poll() is not None:
                    waiting.discard(w)  # judged at the end of the round
            for path in self.live_paths().values():
                try:
                    tail = filestorage.tail_transactions(path, since_tid)
                except Exception:  # a record being written: look again
                    continue
                for h in tail:
                    text = h.description.decode("utf-8", "replace")
                    if text.startswith("writer "):
                        try:
                            waiting.discard(int(text[7:].split(":", 1)[0]))
                        except ValueError:
                            pass
            if waiting:
                time.sleep(0.1)
        if waiting:
            self.problem(f"writers {sorted(waiting)} did not commit within {timeout} s")

    def _run_schedule(self, state: "_RoundState", plan: list[tuple[float, str]]) -> None:
        t0 = time.monotonic()
        hard_end = t0 + self.seconds + 30
        heap = [(t0 + offset, i, kind) for i, (offset, kind) in enumerate(plan)]
        heapq.heapify(heap)
        seq = len(heap)
        while heap:
            when, _, kind = heapq.heappop(heap)
            delay = when - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            later = self._event(state, kind, now >= hard_end)
            if later is not None:
                seq += 1
                heapq.heappush(heap, (now + later[0], seq, later[1]))

    def _event(self, state: "_RoundState", kind: str, overdue: bool) -> tuple[float, str] | None:
        """Do one event; may return (delay, kind) of an event to schedule."""
        rng = self.rng
        cluster = self.cluster
        daemon_down = cluster.daemon.proc is None
        if kind == "writer_kill":
            self._victim_ids += 1
            k = rng.randint(1, 3)
            proc = cluster.start_writer(self._victim_ids, seconds=self.seconds + 60,
                                        kill_after=k, pause=self.pause,
                                        seed=rng.randrange(1 << 30))
            state.victims.append((self._victim_ids, k, proc))
            state.log(f"victim writer {self._victim_ids} (dies in its multi-storage commit #{k})"
                      + (" while the daemon is down" if daemon_down else ""))
            return (self.grace + 2.0, "heal")
        elif kind == "heal":
            return self._heal(state, overdue)
        elif kind == "daemon_kill":
            if daemon_down:
                return (0.5, kind)  # after the restart
            cluster.daemon.kill()
            self.report.daemon_kills += 1
            state.daemon_kills += 1
            down = rng.uniform(0.2, 1.5)
            state.log(f"daemon SIGKILL (down {down:.1f} s)")
            return (down, "daemon_start")
        elif kind == "daemon_start":
            self._start_daemon()
            state.log("daemon restarted")
        elif kind == "zeo_restart":
            if not overdue and any(p.poll() is None for _, _, p in state.victims):
                return (0.2, kind)
            name = rng.choice(sorted(cluster.servers))
            t = time.monotonic()
            cluster.servers[name].restart()
            self.report.zeo_restarts += 1
            state.zeo_restarts += 1
            state.log(f"ZEO server {name} restarted ({time.monotonic() - t:.1f} s)")
        elif kind == "backup":
            from tidstorage.errors import ToolError
            from tidstorage.tools.backup import run_backup

            full = rng.random() < 0.3
            try:
                result = run_backup(self.config, full=full)
            except ToolError as exc:
                self.problem(f"round {state.round}: backup failed: {exc}")
                return None
            if result.ok:
                self.report.backups += 1
                state.backups += 1
                modes = ",".join(sorted({s.mode for s in result.storages.values()}))
                state.log(f"backup {result.timestamp} ({modes})"
                          + (" while the daemon is down" if daemon_down else ""))
            else:
                errors = "; ".join(f"{s.id}: {s.error}" for s in result.storages.values()
                                   if s.error)
                self.problem(f"round {state.round}: backup failed: {errors}")
        else:  # pragma: no cover
            raise ValueError(kind)
        return None

    def _heal(self, state: "_RoundState", overdue: bool) -> tuple[float, str] | None:
        """Heal online the splits the daemon lists (after a victim died)."""
        from tidstorage.errors import TidstorageError
        from tidstorage.tools.heal import run_heal

        alive = any(p.poll() is None for _, _, p in state.victims)
        if (alive or self.cluster.daemon.proc is None) and not overdue:
            return (0.5, "heal")  # the victim has not died yet, or the daemon is down
        try:
            with self.cluster.daemon.client() as c:
                splits = c.admin({"verb": "status"}).get("splits", {})
        except Exception:
            splits = {}
        if not splits:
            if not overdue and state.heal_tries < 20:
                state.heal_tries += 1
                return (0.5, "heal")  # not proven yet
            state.log("heal: no split to heal")
            return None
        try:
            result = run_heal(self.config, wait=10, echo=lambda _line: None)
        except TidstorageError as exc:
            state.log(f"heal: {exc}")
            return None
        for h in result.heals:
            if h.state == "healed":
                # The daemon may still hold the storage below another split
                # (one that cannot be undone: a writer that lived on changed
                # the same objects); the round's end judges the files.
                self.report.heals += 1
                state.log(f"healed {h.split} on {', '.join(sorted(h.heal_tids))}"
                          f" (daemon: {h.daemon})")
            else:
                self.report.heals_refused += 1
                state.log(f"heal of {h.split} {h.state}: {h.reason}")
        return None

    # -- end of the round ----------------------------------------------------

    def _end_writers(self, state: "_RoundState", writers: dict) -> None:
        r = state.round
        for w, k, proc in state.victims:
            try:
                proc.wait(timeout=120)
            except Exception:
                proc.kill()
                proc.wait()
            if proc.returncode == -signal.SIGKILL:
                self.report.writer_kills += 1
                state.writer_kills += 1
            else:
                self.problem(f"round {r}: victim writer {w} was not killed in its commit #{k}"
                             f" (exit {proc.returncode}; see writer-{w}.log)")
        for w, proc in writers.items():
            try:
                out, _ = proc.communicate(timeout=self.seconds + 120)
            except Exception:
                proc.kill()
                out, _ = proc.communicate()
            try:
                summary = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                summary = None
            if proc.returncode != 0 or summary is None:
                self.problem(f"round {r}: writer {w} exit {proc.returncode}, output {out!r}"
                             f" (see writer-{w}.log)")
                continue
            self.report.transactions += summary["done"]
            self.report.writer_errors += summary["errors"]
            state.done += summary["done"]
            state.errors += summary["errors"]
            if summary["done"] == 0:
                self.problem(f"round {r}: writer {w} made no progress: {summary}")
            if summary["errors"] and not state.zeo_restarts:
                self.problem(f"round {r}: writer {w} had errors without a ZEO restart:"
                             f" {summary} (see writer-{w}.log)")

    def _settle(self, state: "_RoundState") -> None:
        """Daemon up and bootstrapped; every split in the files reported by it."""
        from tidstorage.formats import filestorage
        from tidstorage.tools import verify
        daemon = self.cluster.daemon
        if daemon.proc is None:
            self._start_daemon()
        daemon.wait_bootstrapped(timeout=120)
        deadline = time.monotonic() + self.grace + 30
        while True:
            try:
                report = verify.check(self.live_paths())
            except filestorage.ScanError:  # a record being written (the daemon's no-op)
                time.sleep(0.2)
                continue
            splits = {s.id for s in report.splits}
            log = self._daemon_log()
            unseen = {s for s in splits if f"SPLIT transaction {s} " not in log}
            if not unseen or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        state.splits = len(splits)
        self.report.splits_found += len(splits)
        for split in report.splits:
            cause = self._split_cause(split)
            self.report.split_causes[cause] = self.report.split_causes.get(cause, 0) + 1
            state.log(f"split {split.id} ({cause}): {verify.describe_split(split)}")
        if unseen:
            self.report.splits_unseen += len(unseen)
            self.problem(f"round {state.round}: the daemon did not report the split"
                         f" transaction(s) {sorted(unseen)} within {self.grace + 30:g} s")
        time.sleep(0.5)  # the TID log's burst period

    def _split_cause(self, split) -> str:
        """Who wrote a split transaction: its note in a storage that kept it."""
        from tidstorage.formats import filestorage
        storage, tid = sorted(split.present.items())[0]
        text = ""
        for h in filestorage.iter_backward(self.live_paths()[storage]):
            if h.tid == tid:
                text = h.description.decode("utf-8", "replace")
                break
            if h.tid < tid:
                break
        if text.startswith("writer "):
            try:
                writer = int(text[7:].split(":", 1)[0])
            except ValueError:
                return f"unknown ({text[:40]!r})"
            return "killed writer" if writer > 100 else "regular writer"
        if split.id.startswith("ts:tidstorage-"):
            return "daemon no-op"
        return f"unknown ({text[:40]!r})"

    def _stop_and_judge(self, state: "_RoundState") -> None:
        from tidstorage.tools.repair import run_repair
        from tidstorage.tools.restore import run_restore
        from tidstorage.formats.tidlog import read_log

        r = state.round
        cluster, config = self.cluster, self.config
        with cluster.daemon.client() as c:
            dumped = c.dump()
        code = cluster.daemon.stop()
        if code != 0:
            self.problem(f"round {r}: the daemon exited {code} on SIGTERM")
        logged = read_log(config.server.status_file).final_tids()
        behind = {s: (t, logged.get(s)) for s, t in dumped.items()
                  if logged.get(s) is None or logged[s] < t}
        if behind:
            self.problem(f"round {r}: TID log behind DUMP after SIGTERM: {behind}")
        cluster.stop_servers()

        # Restore the round's latest backup set.
        if state.backups:
            out = self.directory / f"restored-{r}"
            if out.exists():
                shutil.rmtree(out)
            try:
                result = run_restore(config, output_dir=out)
            except Exception as exc:
                self.report.incoherent += 1
                self.problem(f"round {r}: restore failed: {type(exc).__name__}: {exc}")
            else:
                self.report.restores += 1
                cuts = {s: x.cut for s, x in result.storages.items() if x.cut is not None}
                dropped = sum(c.point.dropped for c in cuts.values())
                self.report.dropped_restore.append(dropped)
                state.restore = f"dropped {dropped}"
                self._count_lowered("restore", r, cuts)
                paths = {sid: out / f"{id_filename(sid)}.fs" for sid in config.storages}
                if self._judge(f"round {r} restore", paths, result.coherent):
                    state.restore += ", coherent"
                    if not self.keep:
                        shutil.rmtree(out)
        else:
            self.problem(f"round {r}: no backup was taken: nothing to restore")

        # Repair in place. The previous round's safety copies were checked:
        # remove them, or keep them under another name if that round had a
        # problem (or with keep), for the post-mortem.
        for st in config.storages.values():
            for p in (Path(f"{st.data_fs}.before-repair"),
                      Path(f"{st.blob_dir}.before-repair") if st.blob_dir else None):
                if p is None or not p.exists():
                    continue
                if self.keep or self._previous_round_failed:
                    p.rename(p.with_name(f"{p.name}-round-{r - 1}"))
                elif p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        try:
            if r % 2:  # repair --heal: undo what can be undone, cut the rest
                from tidstorage.tools.repair import heal_before_repair

                heals = heal_before_repair(config, None, window=3600.0)
                undone = [h.split for h in heals if h.state == "healed"]
                self.report.repair_heals += len(undone)
                state.log(f"repair --heal: {len(undone)} undone, {len(heals) - len(undone)}"
                          " cut")
            repair = run_repair(config)
        except Exception as exc:
            self.report.incoherent += 1
            self.problem(f"round {r}: repair failed: {type(exc).__name__}: {exc}")
            return
        self.report.repairs += 1
        dropped = sum(c.point.dropped for c in repair.cuts.values())
        self.report.dropped_repair.append(dropped)
        state.repair = f"dropped {dropped}"
        self._count_lowered("repair", r, repair.cuts)
        if self._judge(f"round {r} repair", self.live_paths(), repair.coherent):
            state.repair += ", coherent"

    def _count_lowered(self, what: str, r: int, cuts: dict) -> None:
        lowered = {s: (c.tid, c.final_tid) for s, c in cuts.items() if c.lowered}
        if lowered:
            self.report.lowered += 1
            text = ", ".join(f"{s}: {a:#018x} -> {b:#018x}"
                             for s, (a, b) in sorted(lowered.items()))
            text = (f"round {r} {what}: the TID log's point splits a transaction; cut lowered"
                    f" to the largest coherent one ({text})")
            self.report.lowered_cuts.append(text)
            self.say(f"PUBLISHED POINT INCOHERENT: {text}")

    def _judge(self, what: str, paths: dict[str, Path], coherent: bool | None) -> bool:
        from tidstorage.tools import verify
        from tidstorage.demo.workload import check_invariant

        problems = []
        if coherent is False:
            problems.append("the tool reported an incoherent result")
        try:
            report = verify.check(paths)
            if not report.ok:
                problems.append("split transactions: "
                                + "; ".join(verify.describe_split(s) for s in report.splits))
            broken = check_invariant(read_roots(paths))
            if broken:
                problems.append(f"invariant broken: {broken[:3]}")
        except Exception as exc:
            problems.append(f"cannot check: {type(exc).__name__}: {exc}")
        if problems:
            self.report.incoherent += 1
            self.problem(f"{what}: INCOHERENT: {'; '.join(problems)}")
            return False
        return True


@dataclass
class _RoundState:
    round: int
    victims: list = field(default_factory=list)   # (writer id, K, Popen)
    events: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    daemon_kills: int = 0
    zeo_restarts: int = 0
    writer_kills: int = 0
    backups: int = 0
    heal_tries: int = 0
    done: int = 0
    errors: int = 0
    splits: int = 0
    restore: str = "-"
    repair: str = "-"

    def log(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:.1f}s {text}")

    def summary(self) -> str:
        return (f"{self.done} transactions ({self.errors} retried); events: "
                f"{'; '.join(self.events)}; {self.writer_kills} writer(s) killed; "
                f"{self.splits} split(s) in the files; restore {self.restore}; "
                f"repair {self.repair}")


def run_torture(directory: Path, **kw) -> TortureReport:
    """Run the torture (see :class:`Torture` for the parameters)."""
    return Torture(directory, **kw).run()
