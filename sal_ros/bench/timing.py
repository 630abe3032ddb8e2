"""Timing shared by the benches: median wall time of a call, in ms."""
from __future__ import annotations

import gc
import time
from typing import Any, Callable

import numpy as np


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time. Each result lives until the next call returns, as a node holds its last message: with
    nothing large alive, glibc hands freed heap back to the OS and every call pays fresh page faults instead."""
    last = None
    for _ in range(warmup):
        last = fn()
    times = []
    gc.collect()
    for _ in range(max(1, repeats)):
        start = time.perf_counter_ns()
        result = fn()
        times.append(time.perf_counter_ns() - start)
        last = result
    del last
    return float(np.median(times)) / 1e6
