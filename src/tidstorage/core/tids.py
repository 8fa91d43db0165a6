"""TIDs as integers: conversions and human-readable forms."""

from __future__ import annotations

import datetime
import math
import time

from ZODB.TimeStamp import TimeStamp
from ZODB.utils import p64, u64

__all__ = ["p64", "u64", "MAX_TID", "tid_seconds", "tid_at", "shift_tid", "tid_time", "tid_age"]

#: The largest TID.
MAX_TID = (1 << 64) - 1


def tid_seconds(tid: int) -> float:
    """The Unix time a TID encodes."""
    return TimeStamp(p64(tid)).timeTime()


_TID0_SECONDS = TimeStamp(p64(0)).timeTime()


def tid_at(seconds: float) -> int:
    """The smallest TID at or after the Unix time ``seconds`` (clamped)."""
    if seconds <= _TID0_SECONDS:
        return 0
    try:
        t = time.gmtime(seconds)
        ts = TimeStamp(t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min,
                       t.tm_sec + math.fmod(seconds, 1.0))
    except (OverflowError, ValueError, OSError):
        return MAX_TID
    return u64(ts.raw())


def shift_tid(tid: int, seconds: float) -> int:
    """The TID ``seconds`` of TID time after (or, if negative, before) ``tid``."""
    return tid_at(tid_seconds(tid) + seconds)


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
