"""The daemon's Prometheus endpoint (issue 10, item 2), scraped over HTTP
from a real daemon process and checked against ``dump``."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tidstorage.demo.cluster import DaemonProcess, free_port


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = sample.value
    return out


def test_metrics_match_dump(tmp_path):
    port = free_port()
    d = DaemonProcess(tmp_path / "d", server={"metrics_address": f"127.0.0.1:{port}"}).start()
    try:
        with d.client() as c:
            c.begin("t1", ["main", "other"])
            c.commit("t1", {"main": 0x03C5A5B2E5F0A000, "other": 7})
            c.begin("t2", ["main"])  # in flight
            c.commit("nope", {"main": 1})  # refused: never began
            c.sync()
            tids = c.dump()
        assert tids == {"main": 0x03C5A5B2E5F0A000, "other": 7}
        m = scrape(port)
        published = {dict(k[1])["storage"]: v for k, v in m.items()
                     if k[0] == "tidstorage_published_tid"}
        assert published == {s: float(t) for s, t in tids.items()}
        assert m[("tidstorage_in_flight", ())] == 1.0
        assert m[("tidstorage_bootstrapped", ())] == 1.0
        assert m[("tidstorage_reports_total", (("kind", "commit"),))] >= 2.0
        assert m[("tidstorage_refusals_total", (("reason", "unknown"),))] == 1.0
        assert m[("tidstorage_frozen_splits", ())] == 0.0
        # records were written: the write latency histogram counted them
        deadline = time.monotonic() + 30
        while scrape(port).get(("tidstorage_tidlog_write_seconds_count", ()), 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert ("tidstorage_tidlog_last_record_age_seconds", ()) in scrape(port)
    finally:
        d.kill()


def test_metrics_off_by_default_and_a_bad_address_is_refused(tmp_path):
    d = DaemonProcess(tmp_path / "d").start()
    try:
        assert "metrics on" not in d.log()
    finally:
        d.kill()
    bad = DaemonProcess(tmp_path / "bad", server={"metrics_address": "nowhere"})
    r = subprocess.run([sys.executable, "-m", "tidstorage", "serve", "-c", str(bad.config_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "server.metrics_address" in r.stderr


def test_a_busy_metrics_port_stops_the_daemon_with_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = DaemonProcess(tmp_path / "d", server={"metrics_address": f"127.0.0.1:{port}"})
        r = subprocess.run([sys.executable, "-m", "tidstorage", "serve", "-c",
                            str(d.config_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "metrics_address" in r.stderr and str(port) in r.stderr


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
