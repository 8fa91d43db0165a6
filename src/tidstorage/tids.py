"""TIDs as integers: conversions and human-readable forms."""

from __future__ import annotations

import datetime
import time

from ZODB.TimeStamp import TimeStamp
from ZODB.utils import p64, u64

__all__ = ["p64", "u64", "tid_seconds", "tid_time", "tid_age"]


def tid_seconds(tid: int) -> float:
    """The Unix time a TID encodes."""
    return TimeStamp(p64(tid)).timeTime()


def tid_time(tid: int) -> str:
    """The UTC time a TID encodes, ISO style, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(tid_seconds(tid), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def tid_age(tid: int, now: float | None = None) -> str:
    """How long ago a TID was made, e.g. ``3.2s``, ``5m04s``, ``2h01m``, ``3d04h``."""
    age = (time.time() if now is None else now) - tid_seconds(tid)
    if age < 0:
        return "in the future"
    if age < 60:
        return f"{age:.1f}s"
    minutes, seconds = divmod(int(age), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
