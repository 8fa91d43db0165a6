"""The systemd units in contrib/systemd/: ``systemd-analyze verify`` accepts
them (and rejects broken copies), their wiring and their hardening hold.

The units run ``/opt/tidstorage/bin/...``; ``systemd-analyze verify`` checks
that ExecStart binaries exist, so the test checks a copy whose binaries
point at this venv's (``tidstorage``, ``runzeo``). Unknown keys and bad
values are only warnings for systemd (exit 0): every line of output that
names one of the units counts as a failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "contrib" / "systemd"
PREFIX = "/opt/tidstorage/bin/"
ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None)

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")

BACKUPS = ("tidstorage-backup.service", "tidstorage-backup-full.service")
JOBS = BACKUPS + ("tidstorage-cleanup.service", "tidstorage-verify.service")


def unit_files() -> list[Path]:
    return sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".timer"))


def parse(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (every assignment, list values split)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        assert section is not None, f"{path.name}: {line!r} outside a section"
        sections[section][key.strip()].extend(value.split())
    return sections


def copy_units(dest: Path) -> Path:
    """The units, their ExecStart binaries in this venv."""
    bindir = str(Path(sys.executable).parent) + "/"
    dest.mkdir()
    for path in unit_files():
        (dest / path.name).write_text(path.read_text().replace(PREFIX, bindir))
    return dest


def verify_problems(directory: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about the units in directory."""
    units = sorted(str(p) for p in directory.iterdir())
    proc = subprocess.run([ANALYZE, "verify", *units], capture_output=True, text=True,
                          timeout=120)
    names = [p.name for p in directory.iterdir()]
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if str(directory) in line or any(n in line for n in names)]
    if proc.returncode != 0:
        problems.append(f"exit code {proc.returncode}: {proc.stderr.strip()}")
    return problems


def test_every_binary_is_the_tidstorage_venv():
    for path in unit_files():
        for line in path.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPre=", "ExecStartPost=")):
                command = line.partition("=")[2].lstrip("-@:+!")
                assert command.startswith(PREFIX), (path.name, line)


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    assert len(unit_files()) >= 9
    assert verify_problems(copy_units(tmp_path / "units")) == []


@pytest.mark.parametrize("unit, old, new, what", [
    ("tidstorage-backup.service", "Nice=10", "Nicee=10", "Unknown key"),
    ("tidstorage-verify.timer", "OnCalendar=", "OnCalender=", "Unknown key"),
    ("tidstorage-cleanup.timer", "05:40:00", "25:40:00", "calendar"),
    ("tidstorage.service", "/tidstorage serve", "/tidstorage-missing serve", "not executable"),
    ("zeo@.service", "ProtectSystem=strict", "ProtectSystem=stricter", "protect system"),
])
def test_verify_rejects_a_broken_unit(tmp_path, unit, old, new, what):
    units = copy_units(tmp_path / "units")
    text = (units / unit).read_text()
    assert old in text
    (units / unit).write_text(text.replace(old, new, 1))
    problems = verify_problems(units)
    assert any(what in p for p in problems), problems


def test_wiring():
    units = {p.name: parse(p) for p in unit_files()}

    def refs(name, key):
        return units[name]["Unit"].get(key, [])

    # Every unit a tidstorage unit names is shipped (zeo@x.service: the
    # zeo@.service template); every timer starts its service.
    for name, unit in units.items():
        for key in ("Wants", "Requires", "After", "Before", "OnFailure", "OnSuccess"):
            for ref in unit["Unit"].get(key, []):
                if ref.startswith(("tidstorage", "zeo@")):
                    shipped = re.sub(r"@[^.]+\.", "@.", ref)
                    assert shipped in units, (name, key, ref)
        if name.endswith(".timer"):
            assert name.replace(".timer", ".service") in units, name
            assert unit["Timer"]["OnCalendar"], name
            assert unit["Timer"]["Persistent"] == ["true"], name
            assert unit["Install"]["WantedBy"] == ["timers.target"], name
    for name in JOBS:
        assert name.replace(".service", ".timer") in units, name
        assert units[name]["Service"]["Type"] == ["oneshot"], name
    for name in BACKUPS + ("tidstorage-verify.service",):
        assert "tidstorage.service" in refs(name, "After"), name

    # The daemon starts after the local ZEO servers and wants them, but a
    # ZEO restart must not stop it (no Requires=/BindsTo=).
    zeo = [u for u in refs("tidstorage.service", "Wants") if u.startswith("zeo@")]
    assert zeo and set(zeo) <= set(refs("tidstorage.service", "After"))
    assert not refs("tidstorage.service", "Requires")
    assert not refs("tidstorage.service", "BindsTo")
    # Backups want the daemon (its TID log) without requiring it, and need
    # their disk mounted; cleanup waits for a running backup.
    for name in BACKUPS:
        assert "tidstorage.service" in refs(name, "Wants"), name
        assert "tidstorage.service" not in refs(name, "Requires"), name
        assert "/var/backups/tidstorage" in refs(name, "RequiresMountsFor"), name
    assert set(BACKUPS) <= set(refs("tidstorage-cleanup.service", "After"))
    assert "tidstorage-backup.service" in refs("tidstorage-backup-full.service", "After")
    assert "--full" in units["tidstorage-backup-full.service"]["Service"]["ExecStart"]
    # verify checks the published point (the TID log), not the raw file ends.
    assert "-t" in units["tidstorage-verify.service"]["Service"]["ExecStart"]


def test_hardening():
    units = {p.name: parse(p)["Service"] for p in unit_files() if p.suffix == ".service"}
    for name, service in units.items():
        assert service["User"] and service["User"] != ["root"], name
        assert service["ProtectSystem"] == ["strict"], name
        assert service["NoNewPrivileges"] == ["yes"], name
        assert service["CapabilityBoundingSet"] == [], name
        assert service["PrivateTmp"] == ["yes"], name
    for name in BACKUPS:
        assert int(units[name]["Nice"][0]) > 0, name
        assert units[name]["IOSchedulingClass"] in (["best-effort"], ["idle"]), name
        assert units[name]["ReadWritePaths"] == ["/var/backups/tidstorage"], name
    assert units["tidstorage-cleanup.service"]["ReadWritePaths"] == ["/var/backups/tidstorage"]
    # verify only reads; the daemon writes only its state and log dirs.
    assert not units["tidstorage-verify.service"].get("ReadWritePaths")
    assert not units["tidstorage.service"].get("ReadWritePaths")
    assert units["tidstorage.service"]["StateDirectory"] == ["tidstorage"]
    assert set(units["zeo@.service"]["ReadWritePaths"]) == {
        "/var/lib/zope/filestorage", "/var/lib/zope/blobs"}


def test_exposure_is_low(tmp_path):
    """``systemd-analyze security --offline`` rates every tidstorage unit
    at an exposure of 4.0 or less ("OK")."""
    units = copy_units(tmp_path / "units")
    for path in sorted(units.glob("tidstorage*.service")):
        proc = subprocess.run([ANALYZE, "security", "--offline=yes", "--threshold=40",
                               str(path)], capture_output=True, text=True, timeout=120,
                              cwd=units)
        if proc.returncode != 0 and "--offline" in proc.stderr:
            pytest.skip(f"systemd-analyze security --offline unsupported: {proc.stderr}")
        level = re.search(r"exposure level for \S+: ([0-9.]+)", proc.stdout)
        assert proc.returncode == 0 and level, (path.name, proc.stdout[-1500:], proc.stderr)
        assert float(level[1]) <= 4.0, (path.name, level[1])
