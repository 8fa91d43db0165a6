"""The health of the published point: the daemon's status, judged.

``tidstorage status`` (a monitoring plugin: Nagios, Icinga, Sensu, ...)
asks the daemon for its status (the ADMIN ``status`` verb, see
``coordinator.status``) and turns it into one of the plugin exit codes with
one line per finding. The rules are here, and nowhere else:

=====================================================  ============
finding                                                 state
=====================================================  ============
the daemon cannot be reached                            CRITICAL
a frozen split (a transaction kept on some storages)    CRITICAL
a storage's lag >= ``crit`` seconds                     CRITICAL
the TID log cannot be written                           CRITICAL
a storage held back (too much unpublished)              CRITICAL
the bootstrap is not complete                           WARNING
a storage's lag >= ``warn`` seconds                     WARNING
a storage not read yet, blocked, or not readable now    WARNING
a transaction in doubt for >= ``warn`` seconds          WARNING
storage ids reported but not configured                 WARNING
the TID log's last record older than full_dump_period   WARNING
  plus ``warn`` (records are not being written)
the configuration cannot be read                        UNKNOWN
=====================================================  ============

The **lag** of a storage is defined once, in ``coordinator.lag``: the age of
the oldest committed transaction that the published point does not cover (0
when it covers everything).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OK", "WARNING", "CRITICAL", "UNKNOWN", "NAMES", "Health", "assess",
           "DEFAULT_WARN", "DEFAULT_CRIT"]

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
#: Default thresholds on the lag (seconds).
DEFAULT_WARN = 60.0
DEFAULT_CRIT = 300.0
#: Most findings of one kind listed (the rest are counted).
MAX_LISTED = 8


@dataclass
class Health:
    code: int = OK
    findings: list[tuple[int, str]] = field(default_factory=list)

    def add(self, code: int, text: str) -> None:
        self.findings.append((code, text))
        self.code = max(self.code, code)

    @property
    def state(self) -> str:
        return NAMES[self.code]

    def summary(self, lags: dict[str, float | None]) -> str:
        """The plugin's first line: state, the worst finding, perfdata."""
        worst = [t for c, t in self.findings if c == self.code]
        text = worst[0] if worst else "the published point covers every storage"
        more = len(self.findings) - 1
        perf = " ".join(f"lag_{s}={v:.3f}s" for s, v in sorted(lags.items()) if v is not None)
        return (f"TIDSTORAGE {self.state} - {text}" + (f" (+{more} more)" if more > 0 else "")
                + (f" | {perf}" if perf else ""))


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def assess(status: dict, *, warn: float = DEFAULT_WARN, crit: float = DEFAULT_CRIT,
           full_dump_period: float | None = None) -> Health:
    """Judge a daemon status (the ADMIN ``status`` answer)."""
    h = Health()
    if not status.get("bootstrapped"):
        h.add(WARNING, f"bootstrap not complete after {_seconds(status.get('uptime', 0.0))}:"
                       " nothing newer than the TID log is published yet")
    splits = status.get("split_count", len(status.get("splits", {})))
    if splits:
        ids = ", ".join(list(status.get("splits", {}))[:MAX_LISTED])
        h.add(CRITICAL, f"{splits} split transaction(s) freeze their storages ({ids}):"
                        " run tidstorage repair (or heal)")
    for storage, info in sorted(status.get("storages", {}).items()):
        lag = info.get("lag")
        if lag is None and info.get("kind"):
            h.add(WARNING, f"storage {storage}: not read yet (lag unknown)")
        elif lag is not None and lag >= crit:
            h.add(CRITICAL, f"storage {storage}: lag {_seconds(lag)} >= {_seconds(crit)}")
        elif lag is not None and lag >= warn:
            h.add(WARNING, f"storage {storage}: lag {_seconds(lag)} >= {_seconds(warn)}")
        for problem in info.get("problems", []):
            if problem.startswith("frozen"):
                continue  # counted with the splits
            h.add(CRITICAL if problem.startswith("held back") else WARNING,
                  f"storage {storage}: {problem}")
    for txn in status.get("in_doubt", []):
        if txn.get("age", 0.0) >= warn:
            h.add(WARNING, f"transaction {txn['id']} in doubt for {_seconds(txn['age'])}"
                           f" ({txn.get('why', '')}; waiting for {', '.join(txn.get('waiting_for', []))})")
    for txn in status.get("oldest_in_flight", []):
        deadline = txn.get("deadline")
        if deadline is not None and txn.get("age", 0.0) >= warn:
            h.add(WARNING, f"legacy transaction {txn['id']} lost its client; in doubt in"
                           f" {_seconds(max(0.0, deadline))}")
    unknown = status.get("unknown_ids", {})
    if unknown:
        h.add(WARNING, f"storage ids reported but not configured: {', '.join(sorted(unknown)[:MAX_LISTED])}"
                       " (a name typo in zope.conf?)")
    tidlog = status.get("tidlog")
    if tidlog:
        if tidlog.get("failing"):
            h.add(CRITICAL, f"the TID log {tidlog.get('path')} cannot be written"
                            f" ({tidlog.get('unwritten', 0)} storages' TIDs unwritten)")
        age = tidlog.get("last_record_age")
        if full_dump_period and age is not None and age > full_dump_period + warn:
            h.add(WARNING, f"the TID log's last record is {_seconds(age)} old"
                           f" (a full record is due every {_seconds(full_dump_period)})")
    return h
