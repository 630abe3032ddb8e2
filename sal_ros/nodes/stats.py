"""Counters, per-stage timings and throttled warnings shared by the node threads."""
from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from typing import Any

import numpy as np
from rclpy.clock import Clock, ClockType

# rclpy's logger compares the throttle clock between calls by identity, so every call site shares this one.
_STEADY = Clock(clock_type=ClockType.STEADY_TIME)


def throttled(period_s: float = 5.0) -> dict[str, Any]:
    """Keyword arguments for rclpy's logger: at most one message per call site per ``period_s`` of wall time
    (whatever the sim clock). rclpy throttles per call site, so call the logger directly, not via a helper."""
    return {"throttle_duration_sec": period_s, "throttle_time_source_type": _STEADY}


class NodeStats:
    """Thread-safe event counters and recent per-stage timings (ms), reported as one JSON record."""

    def __init__(self, window: int = 100) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = defaultdict(int)
        self._timings: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
        self._window = window

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def time(self, stage: str, ms: float) -> None:
        with self._lock:
            self._timings[stage].append(float(ms))

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        """Counters since start and median / 90th percentile / max of each stage over the last ``window`` frames."""
        with self._lock:
            counts = dict(sorted(self._counts.items()))
            timings = {
                stage: {"median_ms": round(float(np.median(v)), 3), "p90_ms": round(float(np.percentile(v, 90)), 3),
                        "max_ms": round(float(np.max(v)), 3), "n": len(v)}
                for stage, v in sorted(self._timings.items()) if v
            }
        return {"counts": counts, "timings": timings, **extra}

    def to_json(self, **extra: Any) -> str:
        return json.dumps(self.snapshot(**extra))

    def summary_line(self, keys: tuple[str, ...] = ("processed", "matched", "partial", "dropped")) -> str:
        snap = self.snapshot()
        parts = [f"{k}={snap['counts'].get(k, 0)}" for k in keys]
        total = snap["timings"].get("total")
        if total:
            parts.append(f"total {total['median_ms']:.1f} ms median")
        latency = snap["timings"].get("latency")
        if latency:
            parts.append(f"latency {latency['median_ms']:.1f} ms median")
        problems = {k: v for k, v in snap["counts"].items() if k.startswith("error.")}
        if problems:
            parts.append("problems " + ", ".join(f"{k[6:]}={v}" for k, v in problems.items()))
        return ", ".join(parts)


class Throttle:
    """Per-key rate limit on wall-clock (monotonic) time: one message per key per period, whatever the sim clock.
    Only for warnings whose key varies at one call site (per topic, per camera), which rclpy's per-call-site
    :func:`throttled` would merge; fixed messages use :func:`throttled`."""

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def ready(self, key: str, period_s: float | None = None) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < (self.period_s if period_s is None else period_s):
                return False
            self._last[key] = now
            return True
