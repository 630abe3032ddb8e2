"""``sal_recorder``: synced lidar + camera frames into a FrameStore directory for the pseudo-label engine.

Each recorded frame holds the cloud (xyz, intensity), every synced camera's image, camera model (from its
CameraInfo) and lidar->camera transform at the cloud stamp, the stamps, and the lidar's pose in ``pose_frame``
(default ``odom``; tf2 at the cloud stamp through the node's one buffer, for Seal's temporal term; a frame without
one is recorded all the same, the miss counted as ``pose_missing`` in ~/stats and warned). Frames are appended
atomically by the FrameStore, so a ``kill -9`` loses at most the frame being written, never a completed one;
restarting on the same ``output_dir`` resumes the store. ``every_nth``, ``max_frames`` and ``max_gb`` bound what
is kept.

Same threading as the segmenter: callbacks store, a latest-only slot feeds one writer thread.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from sal_ros.core.types import Frame
from sal_ros.nodes import diagnostics as D
from sal_ros.nodes import params as P
from sal_ros.nodes.base import SensorNode
from sal_ros.nodes.stats import throttled
from sal_ros.nodes.worker import Worker


class RecorderNode(SensorNode):
    WORK = "recording a frame"
    SUMMARY = ("recorded", "matched", "partial", "dropped")
    SUMMARY_WHEN = ("matched", "partial")

    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__(P.RECORDER_NODE, P.RECORDER_PARAMS, **node_kwargs)
        self.store = None
        self._tf = None  # the tf2 buffer poses come from; None: no poses (pose_frame empty, or no tf2_ros)
        self.bring_up()

    def configure(self) -> None:
        """The store opened (resumed when it exists) and the writer started."""
        self.store = self._open_store()
        self._full = False
        self._stopped = ""  # why recording stopped: "limit" or the error
        self.start_worker(Worker("sal_recorder_writer", self._record, self._on_worker_error))

    def activate(self) -> None:
        self.start_inputs()
        self._tf = self._pose_source()
        names = [c.name for c in self.cameras]
        if not names:
            self.get_logger().warning("no cameras configured: frames are recorded lidar-only; "
                                      "pseudo-labels need camera images")
        self.get_logger().info(f"recording {self.inputs.topics['cloud']} + cameras {names} "
                               f"into {self.values['output_dir']} ({len(self.store)} frames there already)")

    def cleanup(self) -> None:
        """Writer stopped (the frame in hand written), store closed."""
        super().cleanup()
        self.store.close()
        self.store = None

    def _open_store(self) -> Any:
        from sal_ros.data.framestore import FrameStore

        v = self.values
        return FrameStore(
            v["output_dir"],
            every_nth=v["every_nth"],
            max_frames=v["max_frames"] or None,
            max_bytes=int(v["max_gb"] * 1e9) or None,
        )

    def _pose_source(self) -> Any:
        if not self.values["pose_frame"]:
            return None
        try:
            return self.inputs.tf_buffer()
        except ImportError as exc:
            self.get_logger().error(f"frames are recorded without poses (pose_frame "
                                    f"{self.values['pose_frame']!r}): {exc}")
            return None

    def _pose(self, frame: Frame) -> tuple[np.ndarray, str] | None:
        """(T_fixed_lidar at the cloud stamp, the fixed frame), or None; waits up to sync.timeout for late /tf."""
        if self._tf is None:
            return None
        fixed = self.values["pose_frame"]
        T = self._tf.lookup(fixed, frame.frame_id, frame.stamp_ns)
        return None if T is None else (T, fixed)

    def _count_pose_miss(self, frame: Frame) -> None:
        fixed = self.values["pose_frame"]
        self.stats.count("pose_missing")
        why = self._tf.last_error.get((fixed, frame.frame_id), "nothing received")
        self.get_logger().warning(f"frame {frame.key} recorded without a pose: no transform {fixed} -> "
                                  f"{frame.frame_id!r} at its stamp ({why})", **throttled())

    def _record(self, synced: Any) -> None:
        if self._full:
            self.stats.count("skipped_store_full")
            return
        t0 = time.perf_counter()
        decoded = self.decode(synced, with_cameras=True)
        if decoded is None:
            return
        pose = self._pose(decoded.frame)
        try:
            written = self.store.append(decoded.frame, pose)
        except RuntimeError as exc:  # another process holds the store
            self.stats.count("error.store")
            self._full = True
            self._stopped = str(exc)
            self.get_logger().error(f"recording stops: {exc}")
            return
        except OSError as exc:  # full disk, read-only folder: counted; the next frame retries, the log is throttled
            self.stats.count("error.write_failed")
            self.health.error("write_failed")
            self.get_logger().error(f"frame not recorded: {exc}", **throttled())
            return
        if written is None:
            self.stats.count("skipped_every_nth")
            return
        if written is False:  # a size or frame limit is reached
            self.stats.count("skipped_store_full")
            self._full = True
            self._stopped = "limit"
            self.get_logger().warning(f"{self.values['output_dir']}: limit reached "
                                      f"(max_frames={self.values['max_frames']}, max_gb={self.values['max_gb']}); "
                                      "recording stops")
            return
        self.stats.count("recorded")
        if pose is None and self._tf is not None:
            self._count_pose_miss(decoded.frame)
        self.stats.time("write", (time.perf_counter() - t0) * 1e3)
        self.health.processed()

    def stats_extra(self) -> dict[str, Any]:
        return {"frames_in_store": len(self.store)}

    def diagnostic_statuses(self, window: Any) -> list:
        v, name = self.values, self.get_name()
        return [D.input_status(name, window, self.inputs.topics["cloud"], v["input_timeout"]),
                D.recording_status(name, window, v["output_dir"], len(self.store), self._stopped,
                                   self.stats.snapshot()["timings"])]

    def destroy_node(self) -> None:
        super().destroy_node()  # stops the writer before the store closes
        if getattr(self, "store", None) is not None:
            self.store.close()
