"""tidstorage verify: split transactions found in the tails of real Data.fs files."""

from __future__ import annotations

import json
import sys
import time

import pytest
from support.fsfixtures import Site, raw_commit, run_cli
from ZODB.FileStorage import FileStorage

from tidstorage.core.stamps import stamp_value
from tidstorage.formats import filestorage
from tidstorage.tools import verify


@pytest.fixture(autouse=True)
def _no_fsync_in_zodb(monkeypatch):
    monkeypatch.setattr(sys.modules["ZODB.FileStorage.FileStorage"], "fsync", None)


def _split_site(tmp_path):
    """a and b; a stamped transaction T kept in a, lost by b (truncated)."""
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    with site:
        for _ in range(3):
            site.commit()
            site.commit(["a"])
        t = site.commit(stamp_id="T-lost")
        site.commit(["a"])
    cut = filestorage.find_cut(site.data_fs("b"), t["b"] - 1)
    filestorage.truncate_at(site.data_fs("b"), cut.offset)
    return site, t


def test_coherent_files(tmp_path):
    site = Site(tmp_path / "site", ("a", "b", "c"), blobs=False)
    with site:
        for _ in range(4):
            site.commit()
            site.commit(["a", "b"])
            site.commit(["c"])
    r = run_cli("verify", "-c", site.config)
    assert r.returncode == 0, r.stderr
    assert "coherent: no multi-storage transaction is split" in r.stdout
    assert "a: " in r.stdout and "8 stamped" in r.stdout


def test_split_reported_and_largest_coherent_cut(tmp_path):
    site, t = _split_site(tmp_path)
    r = run_cli("verify", "-c", site.config)
    assert r.returncode == 1
    assert "1 split transaction" in r.stdout and "'T-lost'" in r.stdout
    assert "missing in b" in r.stdout

    r = run_cli("verify", "-c", site.config, "--compute", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["coherent"] is False
    assert [sp["id"] for sp in out["splits"]] == ["T-lost"]
    expected = filestorage.find_cut(site.data_fs("a"), t["a"] - 1)
    assert out["coherent_cut"]["a"]["offset"] == expected.offset
    assert out["coherent_cut"]["a"]["dropped"] == 2  # T and the single one after it
    assert out["coherent_cut"]["b"]["offset"] == site.data_fs("b").stat().st_size

    # the same files, named explicitly
    r = run_cli("verify", "--files", f"a={site.data_fs('a')}", "--files",
                f"b={site.data_fs('b')}")
    assert r.returncode == 1 and "'T-lost'" in r.stdout
    # only a: b is not scanned, so nothing can be called missing
    r = run_cli("verify", "--files", f"a={site.data_fs('a')}")
    assert r.returncode == 0 and "coherent" in r.stdout


def test_usage_errors(tmp_path):
    r = run_cli("verify")
    assert r.returncode == 2 and "give -c FILE or --files" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[storages.a]\nbackup_dir = 'x'\n")
    r = run_cli("verify", "-c", bad)
    assert r.returncode == 2 and "storages.a.data_fs" in r.stderr
    r = run_cli("verify", "--files", tmp_path / "nope.fs")
    assert r.returncode == 1 and "nope.fs" in r.stderr


def _hours_apart(tmp_path, n=31, step=600.0):
    """a and b with a stamped transaction every ``step`` seconds of TID time."""
    t0 = time.time() - n * step - 3600
    paths = {s: tmp_path / f"{s}.fs" for s in "ab"}
    fs = {s: FileStorage(str(p), create=True) for s, p in paths.items()}
    tids = {"a": [], "b": []}
    try:
        for k in range(n):
            ext = {"tidstorage": stamp_value(f"T{k}", ["a", "b"])}
            tids["a"].append(raw_commit(fs["a"], verify.tid_at(t0 + k * step), ext))
            tids["b"].append(raw_commit(fs["b"], verify.tid_at(t0 + k * step + 2), ext))
    finally:
        for f in fs.values():
            f.close()
    return paths, tids


def test_window_reads_only_the_tail(tmp_path):
    paths, tids = _hours_apart(tmp_path)
    report = verify.check(paths, window=3600)
    assert report.ok
    w = report.windows["a"]
    # one hour of transactions every 10 minutes (plus the one at the bound)
    assert 6 <= w.transactions <= 8 and not w.exhausted
    report = verify.check(paths, window=10 * 3600)
    assert report.windows["a"].exhausted and report.windows["a"].transactions == 31


def test_stale_tid_log_is_found_beyond_the_window(tmp_path):
    """b's TID is 25 transactions (over 4 hours) behind a's: every one of them
    is split, although only the last hour before a's cut is in a's window."""
    paths, tids = _hours_apart(tmp_path)
    cut = {"a": tids["a"][-1], "b": tids["b"][5]}
    report = verify.check(paths, cut, window=3600)
    assert len(report.splits) == 25 and report.coherent is None
    report = verify.check(paths, cut, window=3600, compute=True)
    assert [sp.id for sp in report.splits] == [f"T{k}" for k in range(6, 31)]
    assert report.coherent["a"] == tids["a"][5]
    assert report.coherent["b"] == tids["b"][5]
    assert report.lowered() == {"a": (cut["a"], 25)}
    assert find_nothing_split(paths, report.coherent)


def find_nothing_split(paths, cut):
    return verify.check(paths, cut, window=3600).ok


def test_packed_storage_is_not_split(tmp_path):
    """Packing to now removes transactions whose records are all garbage:
    their absence in the packed storage must not read as a split."""
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    with site:
        for _ in range(5):
            site.commit()
        time.sleep(0.01)
        site.dbs["a"].pack()
    h = filestorage.tail_transactions(site.data_fs("a"))
    assert len(h) < 5 and all(x.status == b"p" for x in h)  # the pack removed some
    report = verify.check({s: site.data_fs(s) for s in "ab"})
    assert report.ok, [verify.describe_split(sp) for sp in report.splits]


def test_damaged_tail_falls_back_to_forward_scan(tmp_path):
    site = Site(tmp_path / "site", ("a", "b"), blobs=False)
    with site:
        site.commit()
        site.commit()
    with open(site.data_fs("a"), "ab") as f:
        f.write(b"\0garbage" * 10)
    r = run_cli("verify", "-c", site.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backward scan failed" in r.stdout and "coherent" in r.stdout
