import random

import pytest

from tidstorage.core.backoff import Backoff


def test_doubles_to_the_maximum_with_jitter_between_half_and_whole():
    b = Backoff(0.5, 4.0, random.Random(1))
    steps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    delays = [b.next() for _ in steps]
    for step, delay in zip(steps, delays):
        assert step / 2 <= delay <= step
    assert len(set(delays[3:])) == 3  # jittered: not all the same
    b.reset()
    assert b.next() <= 0.5


def test_seeded_replays_exactly():
    a = Backoff(0.1, 2.0, random.Random(7))
    b = Backoff(0.1, 2.0, random.Random(7))
    assert [a.next() for _ in range(8)] == [b.next() for _ in range(8)]


def test_bad_bounds():
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)
