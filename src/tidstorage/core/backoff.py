"""Retry delays: exponential backoff with jitter, for every retry loop.

Used by the coordinator (failed storage reads, failed no-op commits) and by
the reporter (reconnecting to the daemon). Each delay doubles up to a
maximum; half of it is fixed and half random ("equal jitter"), so that the
processes of a site that lost the daemon at the same moment do not all come
back at the same instant, and no wait is ever shorter than half its step.
The random source is injected: the simulation passes a seeded one so that a
run replays exactly.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Successive delays ``first, 2*first, ... maximum`` (each jittered)."""

    __slots__ = ("first", "maximum", "_step", "_random")

    def __init__(self, first: float, maximum: float, rng: random.Random | None = None) -> None:
        if not 0 < first <= maximum:
            raise ValueError(f"backoff: need 0 < first ({first}) <= maximum ({maximum})")
        self.first = first
        self.maximum = maximum
        self._step = 0.0
        self._random = (rng or random.Random()).random

    def next(self) -> float:
        """The delay to wait before the next attempt."""
        self._step = self.first if not self._step else min(self._step * 2, self.maximum)
        return self._step * (0.5 + 0.5 * self._random())

    def reset(self) -> None:
        """The last attempt succeeded: the next failure waits ``first`` again."""
        self._step = 0.0
