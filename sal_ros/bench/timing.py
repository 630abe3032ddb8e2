"""Timing shared by the benches: median wall time of a call, in ms."""
from __future__ import annotations

import gc
import time
from typing import Any, Callable

import numpy as np


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2,
              clock: Callable[[], int] = time.perf_counter_ns) -> float:
    """Median wall time (or of ``clock``, e.g. ``time.thread_time_ns`` for this thread's CPU time, which a busy
    machine inflates far less). Each result lives until the next call returns, as a node holds its last message:
    with nothing large alive, glibc hands freed heap back to the OS and every call pays fresh page faults instead."""
    last = None
    for _ in range(warmup):
        last = fn()
    times = []
    gc.collect()
    for _ in range(max(1, repeats)):
        start = clock()
        result = fn()
        times.append(clock() - start)
        last = result
    del last
    return float(np.median(times)) / 1e6
