"""Health of the nodes on ``/diagnostics`` (diagnostic_msgs/DiagnosticArray), as rqt_runtime_monitor and the
diagnostic_aggregator read it.

:class:`HealthMonitor` (no ROS) records what happens to frames over a sliding window of wall time; the node's
``*_statuses`` functions turn that and the node's state into :class:`Status` entries with levels that mean
something:

- input: ERROR when the cloud topic has been silent for ``input_timeout`` (or never published); WARN when some
  camera was missing from more than ``MISSING_WARN`` of the window's frames;
- processing: ERROR when a frame failed in the model or worker within the window; WARN when more than
  ``DROP_WARN`` of the frames were dropped (the model is slower than the input) or the in-node latency median
  exceeds the input period (outputs lag behind the sensor);
- model: WARN when it runs on the CPU although ``model.device`` asked for CUDA (fallback); the key values say
  device, vocabulary version and per-stage timing medians (the same figures as ``~/stats``).

Published on a steady (wall) timer every ``diagnostics_period``, so a replay that pauses the ROS clock does not
silence it. :func:`diagnostic_array` builds the message.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

OK, WARN, ERROR, STALE = 0, 1, 2, 3
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR", STALE: "STALE"}
DROP_WARN = 0.2  # share of the window's frames dropped before processing
MISSING_WARN = 0.5  # share of the window's frames a camera was missing from


@dataclass
class Status:
    name: str
    level: int
    message: str
    values: list[tuple[str, str]] = field(default_factory=list)
    hardware_id: str = ""


class HealthMonitor:
    """Thread-safe record of frame events over the last ``window_s`` seconds (monotonic clock)."""

    def __init__(self, cameras: Sequence[str] = (), window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cameras = tuple(cameras)
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._events: deque = deque()  # (t, kind, payload)
        self.started = clock()
        self.last_input: float | None = None
        self.totals: dict[str, int] = {}

    def _add(self, kind: str, payload: Any = None) -> None:
        now = self._clock()
        with self._lock:
            self._events.append((now, kind, payload))
            self.totals[kind] = self.totals.get(kind, 0) + 1
            if kind == "input":
                self.last_input = now
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0][0] > self.window_s:
            self._events.popleft()

    def frame_in(self, missing: Sequence[str] = ()) -> None:
        """A synced frame reached the node (``missing``: cameras without an image)."""
        self._add("input", tuple(missing))

    def left_out(self, cameras: Sequence[str]) -> None:
        """Cameras of a synced frame left out at decoding (no CameraInfo, no transform, bad image)."""
        if cameras:
            self._add("left_out", tuple(cameras))

    def dropped(self) -> None:
        self._add("dropped")

    def processed(self, latency_ms: float | None = None, work_ms: float | None = None) -> None:
        self._add("processed", (latency_ms, work_ms))

    def error(self, kind: str) -> None:
        self._add("error", kind)

    def window(self) -> dict[str, Any]:
        """Figures over the window: input rate and period, per-camera missing shares, drop rate, latency
        median, errors by kind, and seconds since the last input (None: never)."""
        now = self._clock()
        with self._lock:
            self._trim(now)
            events = list(self._events)
            last_input = self.last_input
        inputs = [t for t, k, _ in events if k == "input"]
        missing = {c: sum(1 for _, k, m in events if k in ("input", "left_out") and c in m) for c in self.cameras}
        latencies = [p[0] for _, k, p in events if k == "processed" and p[0] is not None]
        errors: dict[str, int] = {}
        for _, k, p in events:
            if k == "error":
                errors[p] = errors.get(p, 0) + 1
        n_in = len(inputs)
        period = float(np.median(np.diff(inputs))) if n_in >= 2 else None
        dropped = sum(1 for _, k, _ in events if k == "dropped")
        return {
            "frames_in": n_in,
            "processed": sum(1 for _, k, _ in events if k == "processed"),
            "dropped": dropped,
            "drop_rate": dropped / n_in if n_in else 0.0,
            "input_period_s": period,
            "input_rate_hz": (1.0 / period) if period else None,
            "missing": {c: (min(1.0, m / n_in) if n_in else 0.0) for c, m in missing.items()},
            "latency_median_ms": float(np.median(latencies)) if latencies else None,
            "errors": errors,
            "since_input_s": None if last_input is None else now - last_input,
            "uptime_s": now - self.started,
        }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _stage_values(timings: dict[str, dict], taken: set[str]) -> list[tuple[str, str]]:
    """Per-stage medians since start (~/stats), except a stage whose key the window already gives (``latency``:
    the window's median is the one the level is judged on; one key, one value)."""
    rows = [(f"{stage} median (ms)", _fmt(t["median_ms"])) for stage, t in sorted(timings.items())]
    return [(key, value) for key, value in rows if key not in taken]


def input_status(node: str, w: dict[str, Any], cloud_topic: str, input_timeout: float) -> Status:
    since = w["since_input_s"]
    values = [("cloud topic", cloud_topic), ("frames in window", _fmt(w["frames_in"])),
              ("input rate (Hz)", _fmt(w["input_rate_hz"])), ("since last frame (s)", _fmt(since))]
    values += [(f"camera {c} missing (share)", _fmt(share)) for c, share in w["missing"].items()]
    if since is None and w["uptime_s"] > input_timeout:
        return Status(f"{node}: input", ERROR, f"no frame since start ({w['uptime_s']:.0f} s) on {cloud_topic}", values)
    if since is not None and since > input_timeout:
        return Status(f"{node}: input", ERROR, f"input silent for {since:.1f} s on {cloud_topic}", values)
    gone = [c for c, share in w["missing"].items() if share > MISSING_WARN]
    if gone:
        return Status(f"{node}: input", WARN, f"camera(s) missing from most frames: {', '.join(gone)}", values)
    return Status(f"{node}: input", OK, "frames arriving" if since is not None else "waiting for the first frame",
                  values)


def processing_status(node: str, w: dict[str, Any], timings: dict[str, dict], subscribed: bool = True) -> Status:
    values = [("processed in window", _fmt(w["processed"])), ("dropped in window", _fmt(w["dropped"])),
              ("drop rate", _fmt(w["drop_rate"])), ("latency median (ms)", _fmt(w["latency_median_ms"])),
              ("input period (ms)", _fmt(None if w["input_period_s"] is None else 1e3 * w["input_period_s"]))]
    values += [(f"errors {kind}", str(n)) for kind, n in sorted(w["errors"].items())]
    values += _stage_values(timings, {key for key, _ in values})
    name = f"{node}: processing"
    if w["errors"]:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(w["errors"].items()))
        return Status(name, ERROR, f"frames failed: {kinds}", values)
    if not subscribed:
        return Status(name, OK, "idle: nothing subscribes to the outputs", values)
    if w["frames_in"] and w["drop_rate"] > DROP_WARN:
        return Status(name, WARN, f"{100 * w['drop_rate']:.0f} % of frames dropped (processing slower than input)",
                      values)
    lat, period = w["latency_median_ms"], w["input_period_s"]
    if lat is not None and period is not None and lat > 1e3 * period:
        return Status(name, WARN, f"latency {lat:.0f} ms exceeds the input period {1e3 * period:.0f} ms", values)
    return Status(name, OK, "keeping up" if w["processed"] else "no frame processed in the window", values)


def model_status(node: str, requested_device: str, device: str, vocabulary_version: int, num_classes: int,
                 torch_threads: int | None, active_tracks: int | None) -> Status:
    values = [("device", device), ("requested device", requested_device), ("vocabulary version", str(vocabulary_version)),
              ("classes", str(num_classes)), ("torch threads", _fmt(torch_threads)),
              ("active tracks", _fmt(active_tracks))]
    if requested_device.startswith("cuda") and device == "cpu":
        return Status(f"{node}: model", WARN, f"CPU fallback: {requested_device} requested but unavailable", values)
    return Status(f"{node}: model", OK, f"on {device}, vocabulary v{vocabulary_version}", values)


def diagnostic_array(statuses: Sequence[Status], stamp: Any, hardware_id: str) -> Any:
    """diagnostic_msgs/DiagnosticArray of ``statuses`` (``stamp``: a builtin_interfaces/Time)."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from std_msgs.msg import Header

    return DiagnosticArray(header=Header(stamp=stamp), status=[
        DiagnosticStatus(level=bytes([s.level]), name=s.name, message=s.message,
                         hardware_id=s.hardware_id or hardware_id,
                         values=[KeyValue(key=k, value=v) for k, v in s.values])
        for s in statuses])


def level_of(status: Any) -> int:
    """The level of a received DiagnosticStatus as an int (rclpy gives bytes)."""
    level = status.level
    return level[0] if isinstance(level, (bytes, bytearray)) else int(level)


def steady_clock() -> Any:
    """An rclpy steady clock: timers on it tick in wall time, also while a replay holds the ROS clock."""
    from rclpy.clock import Clock, ClockType

    return Clock(clock_type=ClockType.STEADY_TIME)


def recording_status(node: str, w: dict[str, Any], output_dir: str, frames_in_store: int, stopped: str,
                     timings: dict[str, dict]) -> Status:
    """The recorder's store: ERROR when a frame could not be written or recording stopped on an error, WARN when
    it stopped at its configured limit (nothing more is kept)."""
    values = [("output dir", output_dir), ("frames in store", str(frames_in_store)),
              ("recorded in window", _fmt(w["processed"])), ("dropped in window", _fmt(w["dropped"]))]
    values += [(f"errors {kind}", str(n)) for kind, n in sorted(w["errors"].items())]
    values += _stage_values(timings, {key for key, _ in values})
    name = f"{node}: recording"
    if stopped and stopped != "limit":
        return Status(name, ERROR, f"recording stopped: {stopped}", values)
    if w["errors"]:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(w["errors"].items()))
        return Status(name, ERROR, f"frames not recorded: {kinds}", values)
    if stopped == "limit":
        return Status(name, WARN, "limit reached (max_frames / max_gb): recording stopped", values)
    if w["frames_in"] and w["drop_rate"] > DROP_WARN:
        return Status(name, WARN, f"{100 * w['drop_rate']:.0f} % of frames dropped (writing slower than input)",
                      values)
    return Status(name, OK, f"{frames_in_store} frames in the store", values)


class CloudLoss:
    """The ``<node>: clouds`` status from the node's cloud ledger (stats.cloud_ledger): every cloud a publisher
    sent, delivered, seen, processed or dropped by reason, as totals since start. WARN while clouds are being lost
    before the node (gaps in a publisher's sequence numbers since the previous report): DDS settings or a busy
    node; ``sal-ros doctor`` checks the settings."""

    def __init__(self, node: str) -> None:
        self.name = f"{node}: clouds"
        self._lost = 0

    def update(self, ledger: dict[str, Any]) -> Status:
        values = [(key, str(ledger[key])) for key in ("lost", "dds_reported", "before_first", "delivered", "seen",
                                                       "processed", "pending", "balanced")]
        values += [(f"refused {k}", str(n)) for k, n in sorted(ledger["refused"].items())]
        values += [(f"dropped {k}", str(n)) for k, n in sorted(ledger["dropped"].items())]
        new, self._lost = ledger["lost"] - self._lost, ledger["lost"]
        if new > 0:
            return Status(self.name, WARN, f"{new} cloud(s) lost before reaching the node since the last report "
                          f"({ledger['dds_reported']} reported by DDS in all); run `sal-ros doctor`", values)
        return Status(self.name, OK, f"{ledger['delivered']} delivered, {ledger['processed']} processed, "
                      f"{sum(ledger['dropped'].values())} dropped, {ledger['lost']} lost", values)
