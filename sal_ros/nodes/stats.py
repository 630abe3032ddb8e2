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
    """Thread-safe event counters and recent per-stage timings (ms), reported as one JSON record; and the cloud
    publishers' last sequence numbers, which outlive a managed node's subscriptions as the counters do."""

    def __init__(self, window: int = 100) -> None:
        self.publishers = PublisherSequences()
        self._lock = threading.Lock()
        self._counts: dict[str, int] = defaultdict(int)
        self._timings: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
        self._window = window

    def count(self, name: str, n: int = 1) -> None:
        if not n:
            return
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


# Where each cloud the DDS layer hands the node ends up. The node's own counters (NodeStats names) that mean a
# cloud accepted by the synchronizer was not processed, and the reason each is reported under.
DROP_REASONS = {
    "dropped": "overload",  # replaced in the latest-only slot while the worker was busy
    "clouds.dropped.sync_overflow": "sync_overflow",  # pushed out of the synchronizer's bounded queue
    "clouds.dropped.time_jump": "time_jump",  # pending when time jumped back (buffers cleared)
    "clouds.dropped.deactivated": "deactivated",  # pending in the synchronizer when a managed node deactivated
    "dropped_partial": "partial",  # a camera missing with sync.allow_partial false
    "idle": "idle",  # nothing subscribed to the outputs
    "error.malformed_cloud": "malformed",
    "error.too_many_points": "too_many_points",  # max_points_policy reject
    "error.model": "model",
    "error.nonfinite_logits": "nonfinite_output",  # NaN / inf model outputs (e.g. a checkpoint with NaN weights)
    "error.unexpected": "unexpected",
    "error.store": "store",  # recorder: the store is held by another process
    "error.write_failed": "write_failed",  # recorder: full disk, read-only folder
    "skipped_store_full": "store_full",
    "skipped_every_nth": "every_nth",  # recorder: record.every_nth thinning
}
DONE = ("processed", "recorded")
# Counters that say something about a cloud but not its fate (it goes on, or they count points, cameras, events).
NOT_FATES = ("duplicate_name", "matched", "partial", "error.empty_cloud", "error.late_cloud", "error.zero_stamp", "error.negative_stamp",
             "error.tracking", "error.vocabulary", "nonfinite_points", "out_of_range_points", "pose_missing",
             "subsampled", "time_jump_back", "tracking_pose_missing", "warning.intensity_ignored")


def cloud_ledger(counts: dict[str, int], pending: int) -> dict[str, Any]:
    """Every cloud accounted for, from the counters: what publishers sent but never reached the node (``lost``:
    gaps in each publisher's sequence numbers, or what Fast DDS reported through the message-lost event where
    that is more), what was ``delivered`` to the cloud callback, ``refused`` there (stamp),
    ``seen`` by the synchronizer, and what became of those: ``processed``, ``dropped`` by reason, or still
    ``pending`` (synchronizer, slot, worker). ``balanced``: delivered = seen + refused and
    seen = processed + dropped + pending."""
    refused = {k.split(".", 2)[2]: v for k, v in counts.items() if k.startswith("clouds.refused.") and v}
    dropped = {reason: counts[name] for name, reason in DROP_REASONS.items() if counts.get(name)}
    delivered, seen = counts.get("clouds.delivered", 0), counts.get("clouds.seen", 0)
    processed = sum(counts.get(k, 0) for k in DONE)
    return {
        # Gaps show every loss after a publisher's first delivered cloud; the event also those of a publisher none
        # of whose clouds got through. Both count the same clouds where both see them: the larger is the count.
        "lost": max(counts.get("clouds.lost.sequence_gap", 0), counts.get("clouds.lost.dds_event", 0)),
        "sequence_gaps": counts.get("clouds.lost.sequence_gap", 0),
        "dds_reported": counts.get("clouds.lost.dds_event", 0),
        "before_first": counts.get("clouds.before_first", 0),
        "delivered": delivered,
        "refused": refused,
        "seen": seen,
        "processed": processed,
        "dropped": dropped,
        "pending": pending,
        "balanced": delivered == seen + sum(refused.values()) and seen == processed + sum(dropped.values()) + pending,
    }


class PublisherSequences:
    """Per publisher (its gid), the last sequence number DDS delivered: a jump is a cloud that publisher sent and
    this subscription never got (lost in transport, or overwritten in the reader's queue while the node was
    busy). Before a publisher's first delivered cloud nothing can be told apart from clouds sent before the
    match, so those are reported separately (``before_first``). Bounded in publishers."""

    def __init__(self, max_publishers: int = 64) -> None:
        self._last: dict[bytes, int] = {}
        self._resync: set[bytes] = set()
        self._max = max_publishers
        self._lock = threading.Lock()

    def resync(self) -> None:
        """The subscription stops (a managed node's deactivate): what the known publishers send meanwhile is
        neither delivered nor lost, so their next cloud starts afresh."""
        with self._lock:
            self._resync = set(self._last)

    def gap(self, info: Any) -> tuple[int, int]:
        """``(lost, before_first)`` for a delivered message's rclpy MessageInfo (a dict)."""
        seq = info.get("publication_sequence_number") if isinstance(info, dict) else None
        gid = (info.get("publisher_gid") or {}).get("data") if isinstance(info, dict) else None
        if not seq or gid is None:  # an RMW without sequence numbers
            return 0, 0
        gid = bytes(gid)
        with self._lock:
            last = self._last.get(gid)
            if last is None and len(self._last) >= self._max:
                self._last.pop(next(iter(self._last)))
            if last is None or seq > last:
                self._last[gid] = seq
            if gid in self._resync:
                self._resync.discard(gid)
                return 0, 0
        if last is None:
            return 0, seq - 1
        return max(0, seq - last - 1), 0


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
