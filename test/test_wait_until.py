"""conftest.wait_until: a wait that follows progress, so a loaded machine makes tests slower, never red."""
import itertools

import pytest

from conftest import wait_until


def test_a_slow_but_moving_wait_outlasts_the_stall_limit():
    ticks = itertools.count()
    seen = []

    def progress():  # moves every call, like a log that keeps growing
        seen.append(next(ticks))
        return seen[-1]

    # 0.05 s stall limit, yet the predicate needs ~40 polls of 0.01 s: only progress keeps the wait alive
    done = wait_until(lambda: len(seen) > 40 and "done", "forty polls", progress=progress, stall_s=0.05)
    assert done == "done"


def test_a_stalled_wait_fails_naming_what_it_waited_for():
    with pytest.raises(AssertionError, match="no progress for 0 s waiting for the answer"):
        wait_until(lambda: False, "the answer", progress=lambda: 7, stall_s=0.05)


def test_check_fails_at_once():
    def dead():
        raise AssertionError("child exited")

    with pytest.raises(AssertionError, match="child exited"):
        wait_until(lambda: False, "anything", check=dead, stall_s=60)
