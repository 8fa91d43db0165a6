"""A writer process driven line by line from a test (real ZODB, real commits).

``python tests/scripted.py SPEC`` where SPEC is JSON::

    {"server": "127.0.0.1:9001", "timeout": 0.5,
     "zeo": {"a": ["127.0.0.1", 8100, "1"]}, "files": {"b": "/path/Data.fs"},
     "zconfig": "...optional zodb.conf text instead of zeo/files..."}

Commands on stdin, one per line; each is answered by one line on stdout
starting with ``ok`` (or ``error``):

``commit a,b``                one transaction writing both storages
``commit a,b pause=between``  print ``paused`` after the first tpc_finish,
                              wait for ``go``, then finish the others
``commit a,b pause=vote``     print ``paused`` before the first vote (the
                              commit is sealed, its BEGIN sent), wait for ``go``
``commit a,b kill=between``   SIGKILL this process after the first finish
``last``                      ``ok {"a": tid, ...}`` (lastTransaction of each)
``wait-connected``            wait until every reporter is connected
``reporters``                 how many connections the storages report through
``wait-disconnected``         wait until no reporter is connected
``exit``                      close the databases and exit 0
``quit-open``                 exit 0 without closing anything (atexit only)
``fork a,b``                  fork; the child commits over a,b, exits 0; ``ok <status>``
"""

from __future__ import annotations

import json
import os
import signal
import sys

import transaction
import ZODB
import ZODB.config
from persistent.mapping import PersistentMapping
from ZODB.utils import u64

from tidstorage.zodb.storage import wrap


def open_all(spec: dict) -> dict[str, ZODB.DB]:
    if spec.get("zconfig"):
        databases = ZODB.config.databaseFromString(spec["zconfig"]).databases
        return dict(databases)
    from ZEO.ClientStorage import ClientStorage
    from ZODB.FileStorage import FileStorage

    from tidstorage.core.addresses import parse_host_port

    server = parse_host_port(spec["server"], "daemon address")
    bases = {name: ClientStorage((h, int(p)), storage=st, wait_timeout=30)
             for name, (h, p, st) in spec.get("zeo", {}).items()}
    for name, path in spec.get("files", {}).items():
        bases[name] = FileStorage(path)
    databases: dict[str, ZODB.DB] = {}
    for name, base in sorted(bases.items()):
        ZODB.DB(wrap(base, name, server=server, timeout=spec.get("timeout", 0.5)),
                databases=databases, database_name=name)
    return databases


def commit(databases, names: list[str], pause: str | None = None, kill: str | None = None,
           tm=None) -> dict[str, int]:
    tm = tm or transaction.TransactionManager()
    conns = {}
    first = databases[names[0]].open(tm)
    try:
        for name in names:
            conn = conns[name] = first if name == names[0] else first.get_connection(name)
            root = conn.root()
            counter = root.get("counter")
            if counter is None:
                counter = root["counter"] = PersistentMapping()
            counter["n"] = counter.get("n", 0) + 1
        bases = [databases[n].storage.base for n in names]
        restore = []
        if pause == "vote":
            base = bases[0]
            real_vote = base.tpc_vote

            def tpc_vote(txn, real=real_vote, base=base):
                base.tpc_vote = real
                say("paused")
                wait_go()
                return real(txn)

            base.tpc_vote = tpc_vote
            restore.append((base, "tpc_vote", real_vote))
        if pause == "between" or kill == "between":
            state = {"done": 0}
            for base in bases:
                real_finish = base.tpc_finish

                def tpc_finish(txn, func=lambda tid: None, real=real_finish, base=base):
                    base.tpc_finish = real
                    tid = real(txn, func)
                    state["done"] += 1
                    if state["done"] == 1:
                        if kill == "between":
                            os.kill(os.getpid(), signal.SIGKILL)
                        say("paused")
                        wait_go()
                    return tid

                base.tpc_finish = tpc_finish
                restore.append((base, "tpc_finish", real_finish))
        try:
            tm.get().note("scripted " + "+".join(names))
            tm.commit()
        finally:
            for base, attr, real in restore:
                setattr(base, attr, real)
    finally:
        first.close()
    return {n: u64(databases[n].storage.lastTransaction()) for n in names}


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"expected go, got {line!r}")


def main() -> int:
    spec = json.loads(sys.argv[1])
    databases = open_all(spec)
    say("ok ready")
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        command, args = words[0], words[1:]
        try:
            if command == "commit":
                options = dict(a.split("=", 1) for a in args[1:])
                tids = commit(databases, args[0].split(","), options.get("pause"),
                              options.get("kill"))
                say("ok " + json.dumps(tids))
            elif command in ("wait-connected", "wait-disconnected"):
                import time

                want = command == "wait-connected"
                deadline = time.monotonic() + 30
                while any(db.storage.reporter.connected != want for db in databases.values()):
                    if time.monotonic() > deadline:
                        raise TimeoutError(command)
                    time.sleep(0.01)
                say("ok")
            elif command == "reporters":
                import time

                deadline = time.monotonic() + 30  # aliases form once connected
                while True:
                    targets = {id(db.storage.reporter.target()) for db in databases.values()}
                    if len(targets) == 1 or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                say(f"ok {len(targets)}")
            elif command == "last":
                say("ok " + json.dumps({n: u64(db.storage.lastTransaction())
                                        for n, db in databases.items()}))
            elif command == "exit":
                for db in databases.values():
                    db.close()
                say("ok bye")
                return 0
            elif command == "quit-open":
                say("ok bye")
                sys.exit(0)
            elif command == "fork":
                pid = os.fork()
                if pid == 0:
                    try:
                        commit(databases, args[0].split(","))
                    finally:
                        sys.stdout.flush()
                    sys.exit(0)
                _, status = os.waitpid(pid, 0)
                say(f"ok {status}")
            else:
                say(f"error unknown command {command}")
        except Exception as exc:  # the test reads it
            say(f"error {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
