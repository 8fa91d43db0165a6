"""The daemon's Prometheus endpoint (``[server] metrics_address``, off by
default), with ``prometheus_client``.

Nothing is counted per commit for it: a scrape asks the coordinator for its
status (the same answer as ``tidstorage status``, so the lag has one
definition) on the event loop, from prometheus_client's HTTP thread, and
turns it into metrics. Only the TID log write latency is observed as it
happens (a histogram, thread-safe).

Metrics (all prefixed ``tidstorage_``):

====================================  =====================================
``published_tid{storage}``            the published TID
``lag_seconds{storage}``              the lag (NaN while unknown)
``bootstrapped``                      1 once the bootstrap is complete
``in_flight``                         transactions in flight
``in_doubt``                          transactions being resolved
``frozen_splits``                     split transactions (frozen storages)
``unknown_ids``                       storage ids reported, not configured
``storage_problems{storage}``         problems listed by ``status``
``connections``                       client connections
``reports_total{kind}``               commands received: begin, commit, abort, all
``refusals_total{reason}``            commands refused, by reason
``tidlog_write_seconds``              TID log record write + fsync
``tidlog_last_record_age_seconds``    age of the TID log's last record
``tidlog_failing``                    1 while the TID log cannot be written
====================================  =====================================

An example alert rule for the lag is in ``contrib/prometheus/alerts.yml``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Callable

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("tidstorage.server")

#: How long a scrape waits for the event loop (seconds).
SCRAPE_TIMEOUT = 5.0


class _StatusCollector:
    def __init__(self, status: Callable[[], dict], loop: asyncio.AbstractEventLoop) -> None:
        self._status = status
        self._loop = loop

    def _read(self) -> dict | None:
        async def ask() -> dict:
            return self._status()

        try:
            return asyncio.run_coroutine_threadsafe(ask(), self._loop).result(SCRAPE_TIMEOUT)
        except Exception as exc:  # the loop is stopping, or too busy
            log.warning("metrics: no status from the daemon's loop: %s", exc)
            return None

    def collect(self):
        status = self._read()
        if status is None:
            return
        storages = status.get("storages", {})
        published = GaugeMetricFamily("tidstorage_published_tid", "The published TID.",
                                      labels=["storage"])
        lag = GaugeMetricFamily(
            "tidstorage_lag_seconds", "Age of the oldest committed transaction that the"
            " published point does not cover (0: covers everything; NaN: unknown).",
            labels=["storage"])
        problems = GaugeMetricFamily("tidstorage_storage_problems",
                                     "Problems of the storage (see tidstorage status).",
                                     labels=["storage"])
        for storage, info in sorted(storages.items()):
            if info.get("published") is not None:
                published.add_metric([storage], float(info["published"]))
            value = info.get("lag")
            lag.add_metric([storage], math.nan if value is None else float(value))
            problems.add_metric([storage], float(len(info.get("problems", []))))
        yield published
        yield lag
        yield problems
        for name, doc, value in (
            ("bootstrapped", "1 once the bootstrap is complete.", status.get("bootstrapped")),
            ("in_flight", "Transactions in flight.", status.get("in_flight", 0)),
            ("in_doubt", "Transactions being resolved.", status.get("in_doubt_count", 0)),
            ("frozen_splits", "Split transactions (their storages are frozen).",
             status.get("split_count", 0)),
            ("unknown_ids", "Storage ids reported but not configured.",
             len(status.get("unknown_ids", {}))),
            ("connections", "Client connections.", status.get("connections", 0)),
        ):
            yield GaugeMetricFamily(f"tidstorage_{name}", doc, value=float(value or 0))
        reports = CounterMetricFamily("tidstorage_reports", "Commands received, by kind"
                                      " (begin, commit, abort; all: every command).",
                                      labels=["kind"])
        for kind, n in sorted(status.get("reports", {}).items()):
            reports.add_metric([kind.lower()], float(n))
        yield reports
        refusals = CounterMetricFamily("tidstorage_refusals", "Commands refused, by reason.",
                                       labels=["reason"])
        for reason, n in sorted(status.get("refusals", {}).items()):
            refusals.add_metric([reason], float(n))
        yield refusals
        tidlog = status.get("tidlog")
        if tidlog:
            age = tidlog.get("last_record_age")
            yield GaugeMetricFamily("tidstorage_tidlog_last_record_age_seconds",
                                    "Age of the TID log's last record.",
                                    value=math.nan if age is None else float(age))
            yield GaugeMetricFamily("tidstorage_tidlog_failing",
                                    "1 while the TID log cannot be written.",
                                    value=1.0 if tidlog.get("failing") else 0.0)


class Metrics:
    """The registry and its HTTP server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.tidlog_write = Histogram(
            "tidstorage_tidlog_write_seconds", "TID log record write, fsync included.",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self._server = None
        self._thread = None
        self.port: int | None = None

    def start(self, address: tuple[str, int], status: Callable[[], dict],
              loop: asyncio.AbstractEventLoop) -> None:
        self.registry.register(_StatusCollector(status, loop))
        self._server, self._thread = start_http_server(address[1], address[0],
                                                       registry=self.registry)
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", address[0], self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
