"""Lidar-anchored camera synchronisation, driven only by message stamps (pure Python, no ROS).

Each lidar cloud is an anchor. For every configured camera the synchronizer picks the image whose stamp is nearest
to ``cloud stamp + offset`` (the camera's expected firing time relative to the cloud stamp, e.g. -35 ms for a
nuScenes front camera that fires before the sweep's stamp), if it lies within ``match_threshold_ns``.

A camera is *decided* for a cloud as soon as the answer cannot change: once the camera's stream (assumed to arrive
in stamp order) has reached the target time, no later image can be nearer than the ones already seen. A cloud is
emitted when all its cameras are decided. Late cameras are waited for at most ``timeout_ns`` after their matching
window closed; then the best image seen so far is taken, or the camera is listed in ``SyncedSet.missing``.

Time comes from the stamps themselves: "now" is the newest stamp seen on any stream, so the same code gives the same
answer online and when replaying a bag. A node can additionally pass the receive time of each cloud
(``add_cloud(..., received_ns=...)``) and call ``poll(now_ns)`` with the same clock, so a dead camera does not hold a
cloud until the next cloud arrives. Without a receive time, ``poll`` takes ROS time (the stamp clock).

Sets come out in cloud stamp order. Buffers are bounded; a stamp that goes backwards on a stream by more than
``jump_threshold_ns`` (a bag loop, a clock reset) clears all buffers. Every discarded message is counted in
``stats``.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Any

MATCH_THRESHOLD_NS = 30_000_000  # node parameter sync.match_threshold and the bag reader's default
SYNC_TIMEOUT_NS = 50_000_000  # sync.timeout
CLOUD_STREAM = ""  # stream key of the lidar in the per-stream bookkeeping (camera names are never empty)


@dataclass(frozen=True)
class SyncedSet:
    """A cloud and the images matched to it; ``missing`` lists configured cameras without a match."""

    stamp_ns: int
    cloud: Any
    images: dict[str, tuple[int, Any]]  # camera -> (image stamp_ns, payload)
    missing: tuple[str, ...] = ()
    received_ns: int | None = None  # receive time of the cloud (the clock given to add_cloud), if known

    @property
    def is_partial(self) -> bool:
        return bool(self.missing)


@dataclass
class SyncStats:
    """Counters since construction (``reset()`` keeps them)."""

    clouds: int = 0  # accepted clouds
    images: int = 0  # accepted images
    matched: int = 0  # sets emitted with every camera
    partial: int = 0  # sets emitted with missing cameras
    missing: dict[str, int] = field(default_factory=dict)  # camera -> sets it was missing from
    dropped_zero_stamp: int = 0  # messages with a zero (unset) or negative stamp
    dropped_late_cloud: int = 0  # cloud not newer than an already emitted one (order), or a duplicate stamp
    dropped_late_image: int = 0  # image too old for any cloud still to come
    dropped_cloud_overflow: int = 0  # oldest pending cloud pushed out of the bounded queue
    dropped_image_overflow: int = 0  # oldest image pushed out of a camera's bounded buffer
    dropped_time_jump: int = 0  # pending clouds discarded when time jumped backwards
    time_jumps: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Pending:
    """A cloud waiting for its cameras; ``chosen`` holds decided cameras (None: decided missing)."""

    __slots__ = ("stamp", "cloud", "received", "chosen")

    def __init__(self, stamp: int, cloud: Any, received: int | None) -> None:
        self.stamp, self.cloud, self.received = stamp, cloud, received
        self.chosen: dict[str, tuple[int, Any] | None] = {}


class _ImageBuffer:
    """One camera's images sorted by stamp (parallel lists for bisect), at most ``size`` of them."""

    __slots__ = ("stamps", "payloads", "size")

    def __init__(self, size: int) -> None:
        self.stamps: list[int] = []
        self.payloads: list[Any] = []
        self.size = size

    def insert(self, stamp: int, payload: Any) -> int:
        """Insert in stamp order (a repeated stamp keeps the first image); returns how many were pushed out."""
        i = bisect.bisect_left(self.stamps, stamp)
        if i < len(self.stamps) and self.stamps[i] == stamp:
            return 0
        self.stamps.insert(i, stamp)
        self.payloads.insert(i, payload)
        overflow = max(0, len(self.stamps) - self.size)
        del self.stamps[:overflow], self.payloads[:overflow]
        return overflow

    def nearest(self, target: int, threshold: int) -> tuple[int, Any] | None:
        """The image nearest to ``target`` within ``threshold`` (ties: the earlier one)."""
        i = bisect.bisect_left(self.stamps, target)
        best = None
        for j in (i - 1, i):  # the neighbours of target; the earlier one first so it wins ties
            if 0 <= j < len(self.stamps):
                d = abs(self.stamps[j] - target)
                if d <= threshold and (best is None or d < abs(self.stamps[best] - target)):
                    best = j
        return None if best is None else (self.stamps[best], self.payloads[best])

    def drop_before(self, stamp: int) -> None:
        i = bisect.bisect_left(self.stamps, stamp)
        del self.stamps[:i], self.payloads[:i]


class LidarAnchoredSynchronizer:
    """Matches camera images to lidar clouds by stamp; see the module docstring for the rules.

    Not thread-safe: callers serialize ``add_*``/``poll`` (a node holds one lock around them).
    """

    def __init__(
        self,
        cameras: list[str],
        offsets_ns: dict[str, int] | None = None,
        match_threshold_ns: int = MATCH_THRESHOLD_NS,
        timeout_ns: int = SYNC_TIMEOUT_NS,
        buffer_size: int = 16,
        jump_threshold_ns: int = 100_000_000,
    ) -> None:
        self.cameras = tuple(cameras)
        if len(set(self.cameras)) != len(self.cameras) or any(not c for c in self.cameras):
            raise ValueError(f"camera names must be unique and non-empty, got {list(cameras)}")
        offsets = dict(offsets_ns or {})
        unknown = set(offsets) - set(self.cameras)
        if unknown:
            raise ValueError(f"offsets given for unknown camera(s) {sorted(unknown)}; cameras: {list(self.cameras)}")
        if match_threshold_ns < 0 or timeout_ns < 0 or jump_threshold_ns < 0 or buffer_size < 1:
            raise ValueError("match_threshold_ns, timeout_ns and jump_threshold_ns must be >= 0, buffer_size >= 1")
        self.offsets = {c: int(offsets.get(c, 0)) for c in self.cameras}
        self.match_threshold_ns = int(match_threshold_ns)
        self.timeout_ns = int(timeout_ns)
        self.buffer_size = int(buffer_size)
        self.jump_threshold_ns = int(jump_threshold_ns)
        self.stats = SyncStats()
        self.reset()

    def reset(self) -> None:
        """Forget every buffered message and the time seen so far (stats are kept)."""
        self._pending: list[_Pending] = []  # sorted by stamp
        self._images = {c: _ImageBuffer(self.buffer_size) for c in self.cameras}
        self._last_seen: dict[str, int] = {}  # stream -> newest stamp
        self._now = 0  # newest stamp on any stream
        self._last_emitted: int | None = None

    # ------------------------------------------------------------------------------------------------ input

    def add_cloud(self, stamp_ns: int, payload: Any, received_ns: int | None = None) -> list[SyncedSet]:
        """Add a lidar cloud; ``received_ns`` is its receive time on the clock later given to ``poll``."""
        stamp_ns = int(stamp_ns)
        if not self._accept_stamp(CLOUD_STREAM, stamp_ns):
            return self._emit_ready(None)
        if self._last_emitted is not None and stamp_ns <= self._last_emitted or self._has_pending(stamp_ns):
            self.stats.dropped_late_cloud += 1
            return self._emit_ready(None)
        self.stats.clouds += 1
        bisect.insort(self._pending, _Pending(stamp_ns, payload, received_ns), key=lambda p: p.stamp)
        if len(self._pending) > self.buffer_size:
            self._pending.pop(0)
            self.stats.dropped_cloud_overflow += 1
        return self._emit_ready(None)

    def add_camera(self, name: str, stamp_ns: int, payload: Any) -> list[SyncedSet]:
        """Add an image of camera ``name``."""
        if name not in self._images:
            raise ValueError(f"unknown camera {name!r}; configured cameras: {list(self.cameras)}")
        stamp_ns = int(stamp_ns)
        if not self._accept_stamp(name, stamp_ns):  # may reset the buffers
            return self._emit_ready(None)
        if self._last_emitted is not None and stamp_ns < self._oldest_useful(name):
            self.stats.dropped_late_image += 1
            return self._emit_ready(None)
        self.stats.images += 1
        self.stats.dropped_image_overflow += self._images[name].insert(stamp_ns, payload)
        return self._emit_ready(None)

    def poll(self, now_ns: int | None = None) -> list[SyncedSet]:
        """Emit what is decided; ``now_ns`` (the clock of ``received_ns``, or ROS time) also ends waits."""
        return self._emit_ready(None if now_ns is None else int(now_ns))

    def flush(self) -> list[SyncedSet]:
        """Decide every pending cloud now with the images at hand (end of a bag or of a run)."""
        out = []
        while self._pending:
            out.append(self._finish(self._pending.pop(0), force=True))
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------------------------------------ rules

    def _accept_stamp(self, stream: str, stamp: int) -> bool:
        """Reject zero stamps; a stamp far behind its stream's newest one resets everything (bag loop)."""
        if stamp <= 0:
            self.stats.dropped_zero_stamp += 1
            return False
        last = self._last_seen.get(stream)
        if last is not None and stamp < last - self.jump_threshold_ns:
            self.stats.time_jumps += 1
            self.stats.dropped_time_jump += len(self._pending)
            self.reset()
        self._last_seen[stream] = max(stamp, self._last_seen.get(stream, stamp))
        self._now = max(self._now, stamp)
        return True

    def _has_pending(self, stamp: int) -> bool:
        i = bisect.bisect_left(self._pending, stamp, key=lambda p: p.stamp)
        return i < len(self._pending) and self._pending[i].stamp == stamp

    def _oldest_useful(self, camera: str) -> int:
        """Images older than this cannot match any cloud still to come (those are newer than the last emitted)."""
        return self._last_emitted + self.offsets[camera] - self.match_threshold_ns

    def _timed_out(self, p: _Pending, camera: str, now_rx: int | None) -> bool:
        window_end = self.offsets[camera] + self.match_threshold_ns  # relative to the cloud stamp
        if self._now >= p.stamp + window_end + self.timeout_ns:
            return True
        received = p.stamp if p.received is None else p.received
        return now_rx is not None and now_rx >= received + max(window_end, 0) + self.timeout_ns

    def _decide(self, p: _Pending, now_rx: int | None, force: bool = False) -> bool:
        """Decide the cameras whose answer is final; True when all are decided."""
        for cam in self.cameras:
            if cam in p.chosen:
                continue
            target = p.stamp + self.offsets[cam]
            # Once the stream has reached the target, every later image is farther than the newest one
            # (which is itself the best if it lies inside the window): the answer is final.
            reached = self._last_seen.get(cam, target - 1) >= target
            if reached or force or self._timed_out(p, cam, now_rx):
                p.chosen[cam] = self._images[cam].nearest(target, self.match_threshold_ns)
        return len(p.chosen) == len(self.cameras)

    def _emit_ready(self, now_rx: int | None) -> list[SyncedSet]:
        out = []
        while self._pending and self._decide(self._pending[0], now_rx):
            out.append(self._finish(self._pending.pop(0)))
        return out

    def _finish(self, p: _Pending, force: bool = False) -> SyncedSet:
        if force:
            self._decide(p, None, force=True)
        images = {c: m for c, m in p.chosen.items() if m is not None}
        missing = tuple(c for c in self.cameras if p.chosen[c] is None)
        if missing:
            self.stats.partial += 1
            for c in missing:
                self.stats.missing[c] = self.stats.missing.get(c, 0) + 1
        else:
            self.stats.matched += 1
        self._last_emitted = p.stamp
        for cam, buffer in self._images.items():
            buffer.drop_before(self._oldest_useful(cam))
        return SyncedSet(p.stamp, p.cloud, images, missing, p.received)
