"""Output for machines and people (issue 10, item 6): outside a terminal
nothing is wrapped or truncated; sizes are human-readable; every command's
--help has examples."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from tidstorage.cli import main
from tidstorage.cli.common import human_size
from tidstorage.formats.tidlog import KIND_FULL, encode_record


def _commands(group: click.Group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


@pytest.mark.parametrize("path", list(_commands(main)), ids=" ".join)
def test_every_command_has_examples_in_its_help(path):
    r = subprocess.run([sys.executable, "-m", "tidstorage", *path, "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    if path in {("demo",), ("log", "full"), ("log", "recover")}:
        return  # one obvious form
    assert "Examples:" in r.stdout, r.stdout


def test_tables_outside_a_terminal_are_plain_and_whole(tmp_path):
    log = tmp_path / "t.tid"
    ids = {f"storage-with-a-long-name-{i}": 292005591771402683 + i for i in range(3)}
    log.write_bytes(encode_record(1.0e9, KIND_FULL, ids))
    r = subprocess.run([sys.executable, "-m", "tidstorage", "log", "check", str(log)],
                       capture_output=True, text=True, timeout=60,
                       env={"COLUMNS": "40", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    for sid, tid in ids.items():
        line = next(x for x in r.stdout.splitlines() if x.startswith(sid + "\t"))
        assert line.split("\t")[1] == str(tid)  # never cut to "29200559177140…"
    assert "…" not in r.stdout and "┃" not in r.stdout


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (5 * 1024**3, "5.0 GiB"), (None, "?")])
def test_human_size(n, text):
    assert human_size(n) == text
