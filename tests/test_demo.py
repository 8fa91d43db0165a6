"""The README's main command, end to end (short run)."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_verifies(tmp_path):
    directory = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "tidstorage", "demo", "--dir", str(directory), "--seconds", "8"],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "is split" in out
    assert "healed: 1 transaction undone, 0 dropped" in out  # online, while writing
    assert "live files after the heal: 0 split transaction(s), 1 healed" in out
    assert "restore: coherent (no split transaction), invariant holds" in out
    assert "repair: coherent (no split transaction), invariant holds" in out
    assert "OK: every result is coherent" in out
    assert (directory / "tidstorage.toml").exists()
    # the config it leaves works with the other commands
    v = subprocess.run([sys.executable, "-m", "tidstorage", "verify", "-c",
                        str(directory / "tidstorage.toml")], capture_output=True, text=True,
                       timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr
    # a second run in the same directory starts afresh
    r2 = subprocess.run(
        [sys.executable, "-m", "tidstorage", "demo", "--dir", str(directory), "--seconds", "5"],
        capture_output=True, text=True, timeout=240,
    )
    assert r2.returncode == 0, r2.stdout + r2.stderr


def test_demo_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "tidstorage", "demo", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
