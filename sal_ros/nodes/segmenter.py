"""``sal_segmenter``: zero-shot lidar panoptic segmentation from text prompts, as a ROS 2 node.

Inputs: ``cloud_topic`` (PointCloud2) and optional cameras (image + camera_info) synced to each cloud.
Outputs, in the cloud's frame and stamp:

- ``~/labeled_points`` PointCloud2 (x y z intensity label vocabulary_version instance score rgb; the input's
  points in its order),
- ``~/detections`` vision_msgs/Detection3DArray: per instance its oriented box, track id and top classes,
- ``~/frame_summary`` sal_ros_msgs/FrameSummary: vocabulary version, counts, tracks, per-stage timings,
- ``~/markers`` MarkerArray (DELETEALL, the vocabulary legend, then a box and a text label per instance; one
  colour per track),
- ``~/overlay/<camera>`` Image: labeled points projected into each synced camera,
- ``~/vocabulary`` sal_ros_msgs/Vocabulary, transient-local: the active vocabulary, once per version,
- ``/diagnostics`` diagnostic_msgs/DiagnosticArray every ``diagnostics_period`` (wall clock): input,
  processing and model health,
- debugging aids, JSON in std_msgs/String: ``~/info`` per frame, ``~/debug/vocabulary`` (transient local) and
  ``~/stats`` every ``stats_period`` (counters and per-stage timings).

Instances are tracked (sal_ros.core.tracking): instance ids on every output are track ids, in the sensor frame
or, with ``tracking.fixed_frame``, in that frame through TF at the cloud stamp.

Threads: subscription callbacks only store messages; synced frames go into a latest-only slot; one worker thread
decodes, runs the model and publishes. A frame that arrives while the worker is busy replaces the waiting one
(counted as ``dropped``). Nothing is decoded or run while no output has a subscriber. Prompt changes
(``ros2 param set /sal_segmenter prompts "[...]"``) are validated in the on-set callback, embedded on a
background thread and swapped in between two frames; frames keep flowing with the old vocabulary meanwhile.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sal_ros.core.cloud_input import MAX_COORDINATE, SegmenterConfig
from sal_ros.core.tracking import Tracker
from sal_ros.core.types import Frame, Segmentation
from sal_ros.model.errors import NonFiniteOutputError
from sal_ros.nodes import diagnostics as D
from sal_ros.nodes import params as P
from sal_ros.nodes.base import SensorNode
from sal_ros.nodes.messages import rclpy_types
from sal_ros.nodes.namesakes import Namesakes
from sal_ros.nodes.publishers import SegmenterPublishers
from sal_ros.nodes.stats import Throttle, throttled
from sal_ros.nodes.tracking import NodeTracking, tracker_config
from sal_ros.nodes.vocabulary_changes import (VocabularyChanges, diagnostic_status, initial_vocabulary, limits_of,
                                      status_record)
from sal_ros.nodes.worker import Worker

if TYPE_CHECKING:
    from sal_ros.model.vocabulary import Vocabulary

OUTPUTS = ("labeled_points", "markers", "overlays", "info", "detections", "frame_summary", "filtered")
# The parameters that make the Segmenter's configuration (_segmenter_config).
SEGMENTER_CONFIG_PARAMS = ("score_threshold", "min_instance_points", "max_points", "max_points_policy",
                           "model.intensity_scale")


class SegmenterNode(SensorNode):
    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__(P.SEGMENTER_NODE, P.SEGMENTER_PARAMS, **node_kwargs)
        self.namesakes = Namesakes(self)
        self._specs = {s.name: s for s in P.node_specs(P.SEGMENTER_NODE)}
        self._types = rclpy_types()
        self.startup_events: list[str] = []  # what start-up did, in order (warm-up comes before ready)
        self._first_frame_ms: dict[str, float] | None = None  # the first real frame's stage times
        self._model_lock = threading.Lock()  # one model call at a time; vocabulary swaps happen between frames
        self.vocabulary = VocabularyChanges(self._encode_vocabulary, self._install_vocabulary, self._model_lock,
                                            self._announce_vocabulary, self._vocabulary_failed,
                                            self._vocabulary_status_changed)
        self._status_throttle = Throttle()
        self.device = self._choose_device(self.values["model.device"])
        self.tracking = NodeTracking(self)
        self.outputs = SegmenterPublishers(self, self.cameras, self._types, self.values)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        try:
            self.bring_up()
        except BaseException:
            self.destroy_node()  # out of the ROS graph at once: a node refused at start is no namesake to others
            raise

    # --------------------------------------------------------------------------------------------- lifecycle

    def configure(self) -> None:
        """Model and vocabulary loaded, on the worker thread, which then waits for frames."""
        # All CPU model work, loading included, happens on the worker thread: PyTorch's OpenMP pool serves the
        # thread that first used it; parallel ops of a second thread ran ~6x slower here (tiny backbone 55 ->
        # 340 ms on 2 cores). The vocabulary thread uses one torch thread for the same reason.
        self.start_worker(Worker("sal_segmenter_worker", self._process, self._on_worker_error,
                                 setup=self._setup_model))
        self._publish_vocabulary(self.active)
        problem = self._unknown_filter_classes(self.values["filter.classes"])
        if problem:
            raise ValueError(problem)
        if not self.values["allow_duplicate"]:
            self.namesakes.refuse(float(self.values["duplicate_check_s"]), float(self.values["duplicate_ghost_s"]))

    def activate(self) -> None:
        self.start_inputs()
        self.startup_events.append("ready")
        self.get_logger().info(
            f"listening on {self.inputs.topics['cloud']} with cameras {[c.name for c in self.cameras]}; "
            f"model on {self.device}, torch threads: {self._torch_threads}; "
            f"vocabulary v{self.active.version}: {list(self.active.class_names)}")

    def cleanup(self) -> None:
        """Worker stopped, model and text encoder freed (GPU memory back to the device)."""
        super().cleanup()
        with self._model_lock:
            self._text_encoder = self._segmenter = None
            self.vocabulary.active = None
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        self.get_logger().info("model freed")

    # ------------------------------------------------------------------------------------------------- model

    def _choose_device(self, device: str) -> str:
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            self.get_logger().warning(f"model.device is {device} but CUDA is not available: running on cpu (slow)")
            return "cpu"
        return device

    def _setup_model(self) -> None:
        import torch

        if self.device == "cpu":
            _leave_a_core_for_callbacks()
        self._torch_threads = torch.get_num_threads()
        self._text_encoder, self._segmenter = self._load_model()
        self.startup_events.append("model loaded")
        self.vocabulary.start(initial_vocabulary(self.values))
        self.startup_events.append("vocabulary")
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay what a first frame would before the node says it is ready: one model pass on a synthetic scan of
        realistic size (kernel and allocator set-up, buffers), the tracker (its assignment solver) and every
        output message built from that result (codec buffers, marker pool), published nowhere."""
        from sal_ros.model.segmenter import warm_up

        t0 = time.perf_counter()
        xyz, intensity, seg = warm_up(self._segmenter)
        t1 = time.perf_counter()
        tracker = Tracker(tracker_config(self.values))  # a throwaway: the node's tracker starts empty
        tracker.update(seg.instances, 0, None, seg.vocabulary_version)
        tracking = tracker.update(seg.instances, 1, None, seg.vocabulary_version)
        frame = Frame(1, "warm_up", xyz, intensity)
        wanted = {name: True for name in OUTPUTS if name != "overlays"} | {"overlays": set()}
        self.outputs.frame(frame, seg, wanted, tracking, {}, send=lambda publisher, message: None)
        self.startup_events.append("warm-up")
        self.get_logger().info(f"warm-up: model on a synthetic scan of {len(seg.label)} points in "
                               f"{(t1 - t0) * 1e3:.0f} ms, tracking and outputs in "
                               f"{(time.perf_counter() - t1) * 1e3:.0f} ms")

    def _load_model(self) -> tuple[Any, Any]:
        from sal_ros.model.segmenter import Segmenter
        from sal_ros.model.text_encoder import TextEncoder

        v = self.values
        if not v["text_encoder.pretrained"]:
            self.get_logger().warning(
                f"text_encoder.pretrained is empty: {v['text_encoder.model']} has RANDOM weights, so class names "
                "are meaningless; set an open_clip tag or a local weights file")
        encoder = TextEncoder(v["text_encoder.model"], v["text_encoder.pretrained"] or None, self.device,
                              cache_dir=_cache_dir(v["text_encoder.cache_dir"]))
        if not v["model.checkpoint"]:
            self.get_logger().warning(
                "model.checkpoint is empty: running a TINY RANDOM-WEIGHT model to try the plumbing; "
                "segments and labels are meaningless. Set model.checkpoint to a trained SAL checkpoint.")
        segmenter = Segmenter.from_checkpoint(v["model.checkpoint"] or None, self.device, encoder,
                                              config=self._segmenter_config())
        return encoder, segmenter

    # -------------------------------------------------------------------------------------------- vocabulary

    @property
    def active(self) -> Vocabulary | None:
        """The vocabulary the model runs with (numbered); None while not configured."""
        return self.vocabulary.active

    def _encode_vocabulary(self, vocabulary: Vocabulary, progress: Any = None) -> Any:
        return self._text_encoder.encode(vocabulary, progress=progress)

    def _install_vocabulary(self, embeddings: Any) -> None:
        self._segmenter.set_embeddings(embeddings)

    def _announce_vocabulary(self, active: Vocabulary, ms: float) -> None:
        self.stats.time("embed", ms)
        self._publish_vocabulary(active)
        self.get_logger().info(f"vocabulary v{active.version} active: {list(active.class_names)}")

    def _vocabulary_failed(self, source: str, exc: BaseException) -> None:
        self.stats.count("error.vocabulary")
        self.get_logger().error(f"vocabulary change from {source} failed, keeping v{self.active.version}: {exc}")

    def _vocabulary_status_changed(self) -> None:
        """Publish the change status on ~/debug/vocabulary: at once when a change starts or ends, at most twice
        a second while it embeds."""
        status = self.vocabulary.status()
        if status["state"] == "re-embedding" and 0 < status["done"] < status["total"] \
                and not self._status_throttle.ready("progress", 0.5):
            return
        if hasattr(self, "outputs") and self.active is not None:
            self.outputs.vocabulary_status(status_record(self.active, status))

    def _publish_vocabulary(self, active: Vocabulary) -> None:
        v = self.values
        encoder = f"{v['text_encoder.model']} ({v['text_encoder.pretrained'] or 'random weights'})"
        self.outputs.vocabulary_active(active, encoder, self.get_clock().now().to_msg(),
                                       status_record(active, self.vocabulary.status()))

    # -------------------------------------------------------------------------------------------- parameters

    def _validate_parameters(self, parameters: list) -> Any:
        """On-set callback: reject bad values with a reason before they are stored."""
        from rcl_interfaces.msg import SetParametersResult

        from sal_ros.model.vocabulary import VocabularyError

        for param in parameters:
            spec = self._specs.get(param.name)
            if spec is None:
                continue
            problem = P.check_value(spec, param.value)
            try:
                if not problem and (param.name == "prompts" or (param.name == "vocabulary_file" and param.value)):
                    self.vocabulary.check(param.name, param.value, limits_of(self.values))
                elif not problem and param.name == "filter.classes":
                    problem = self._unknown_filter_classes(list(param.value))
            except (VocabularyError, OSError, ValueError) as exc:
                problem = f"{param.name}: {exc}"
            if problem:
                self.get_logger().warning(f"rejected parameter change: {problem}")
                return SetParametersResult(successful=False, reason=problem)
        return SetParametersResult(successful=True)

    def _unknown_filter_classes(self, names: list[str]) -> str | None:
        """Why ``filter.classes`` cannot be ``names``: a name the active vocabulary does not have."""
        if self.active is None:
            return None  # not configured: checked at configure
        unknown = [n for n in names if n and n not in self.active.class_names]  # "": no class (clears the filter)
        if unknown:
            return (f"filter.classes: {unknown} not in the vocabulary (v{self.active.version}: "
                    f"{list(self.active.class_names)})")
        return None

    def _apply_parameters(self, parameters: list) -> None:
        """Post-set callback: store accepted values; vocabulary changes are embedded in the background."""
        for param in parameters:
            if param.name not in self._specs:
                continue
            value = list(param.value) if isinstance(param.value, (list, tuple)) else param.value
            self.values[param.name] = value
            loaded = self.configured  # a managed node not configured yet takes model values at configure
            if param.name == "prompts" or (param.name == "vocabulary_file" and value):
                if loaded:
                    self.vocabulary.request(param.name, value)
            elif param.name in SEGMENTER_CONFIG_PARAMS and loaded:
                self._configure_segmenter()
            elif param.name.startswith("tracking."):
                self.tracking.configure()

    def wanted_outputs(self) -> dict[str, Any]:
        """Which outputs are enabled and subscribed; overlays as the set of camera names."""
        return self.outputs.wanted()

    # ------------------------------------------------------------------------------------------------ frames

    def _process(self, synced: Any) -> None:
        t0 = time.perf_counter()
        wanted = self.wanted_outputs()
        if not any(wanted.values()):
            self.stats.count("idle")  # nobody listens: no decode, no model work
            self.get_logger().info("frames arrive but nothing subscribes to the outputs: the model runs once "
                                   "something does (RViz, ros2 topic echo ~/labeled_points)", **throttled(30.0))
            return
        decoded = self.decode(synced, with_cameras=bool(wanted["overlays"]))
        if decoded is None:
            return
        frame = decoded.frame
        t1 = time.perf_counter()
        seg = self.segment_frame(frame)
        if seg is None:
            return
        t2 = time.perf_counter()
        tracking = self.tracking.track(frame, seg)
        t3 = time.perf_counter()
        stages = {"decode": t1 - t0, "segment": t2 - t1, "track": t3 - t2}
        self.outputs.frame(frame, seg, wanted, tracking, {**{k: v * 1e3 for k, v in stages.items()},
                                                          **{"model." + k: v for k, v in seg.timings_ms.items()}},
                           self.tracking.frame_of(tracking, frame))
        if wanted["filtered"]:
            self.outputs.filtered_cloud(decoded.cloud_msg, seg)
        t4 = time.perf_counter()
        self.stats.count("processed")
        for stage, ms in (*stages.items(), ("publish", t4 - t3), ("total", t4 - t0)):
            self.stats.time(stage, ms * 1e3)
        if self._first_frame_ms is None:  # what a first frame costs after warm-up, beside the medians in ~/stats
            self._first_frame_ms = {stage: round(s * 1e3, 2) for stage, s in
                                    (*stages.items(), ("publish", t4 - t3), ("total", t4 - t0))}
        for stage, ms in seg.timings_ms.items():
            self.stats.time("model." + stage, ms)
        latency = None
        if synced.received_ns is not None:  # cloud received -> outputs published: sync wait + slot + work
            latency = (time.monotonic_ns() - synced.received_ns) / 1e6
            self.stats.time("latency", latency)
        self.health.processed(latency)
        now_ns = self.get_clock().now().nanoseconds
        if frame.stamp_ns and now_ns > frame.stamp_ns:  # includes driver and transport; needs synced clocks
            self.stats.time("stamp_age", (now_ns - frame.stamp_ns) / 1e6)
        self.outputs.debug_times(frame, t0, t4, now_ns)

    def segment_frame(self, frame: Frame) -> Segmentation | None:
        """The Segmenter on one frame, with what it left out counted and warned about. None when the frame is
        rejected (max_points_policy reject) or the model failed."""
        cloud = self._segmenter.admit(frame.points, frame.intensity)
        self._report_input(frame, cloud)
        if cloud.rejected:
            return None
        try:
            with self._model_lock:
                return self._segmenter.run(cloud)
        except NonFiniteOutputError as exc:  # NaN weights or an overflow: the frame is skipped, the node goes on
            self.stats.count("error.nonfinite_logits")
            self.health.error("nonfinite_logits")
            self.get_logger().error(f"frame at {frame.stamp_ns} skipped: {exc}", **throttled())
            return None
        except Exception as exc:  # noqa: BLE001 - OOM after the Segmenter's retry, bad model state: skip the frame
            self.stats.count("error.model")
            self.health.error("model")
            self.get_logger().error(f"model failed on the frame at {frame.stamp_ns}, skipped: "
                                    f"{type(exc).__name__}: {exc}", **throttled())
            return None

    def _report_input(self, frame: Frame, cloud: Any) -> None:
        """Counters and throttled warnings for the points the Segmenter leaves out, subsamples or rescales."""
        log, limit = self.get_logger(), cloud.config.max_points
        if cloud.nonfinite:
            self.stats.count("nonfinite_points", cloud.nonfinite)
        if cloud.nonfinite == frame.num_points:
            self.stats.count("error.empty_cloud")
            log.warning(f"cloud at {frame.stamp_ns} has no finite points; publishing it unlabeled", **throttled())
        if cloud.out_of_range:  # labeled 0 like non-finite points; the rest of the cloud is segmented
            self.stats.count("out_of_range_points", cloud.out_of_range)
            log.warning(f"{cloud.out_of_range} points beyond {MAX_COORDINATE:g} m in the cloud at {frame.stamp_ns} "
                        "left out (label 0)", **throttled())
        if cloud.rejected:
            self.stats.count("error.too_many_points")
            log.warning(f"cloud with {cloud.valid.size} points exceeds max_points={limit}: frame rejected",
                        **throttled())
        elif cloud.subsampled:
            self.stats.count("subsampled")
            log.warning(f"cloud with {cloud.valid.size} points exceeds max_points={limit}: the model sees a random "
                        "subset, the rest take their nearest neighbour's label", **throttled())
        if cloud.intensity is None:
            log.warning("the cloud has no intensity field: the model sees zero intensity", **throttled())
        elif (peak := cloud.intensity_overshoot()) is not None:
            log.warning(f"intensity reaches {peak:g} on the model's scale, which ends at {cloud.trained_scale:g}: "
                        "set model.intensity_scale to this lidar's full scale (e.g. 255 or 65535)", **throttled())

    def _segmenter_config(self) -> SegmenterConfig:
        v = self.values
        return SegmenterConfig(float(v["score_threshold"]), int(v["min_instance_points"]), int(v["max_points"]),
                               v["max_points_policy"], float(v["model.intensity_scale"]))

    def _configure_segmenter(self) -> None:
        """Hand the node's parameters to the Segmenter as one value, swapped atomically (from the next frame)."""
        self._segmenter.configure(self._segmenter_config())

    # ------------------------------------------------------------------------------------------------- stats

    def stats_extra(self) -> dict[str, Any]:
        return {"vocabulary_version": self.active.version, "vocabulary": self.vocabulary.status(),
                "first_frame_ms": self._first_frame_ms,
                "slot": {"accepted": self.worker.slot.accepted, "replaced": self.worker.slot.replaced}}

    def diagnostic_statuses(self, window: Any) -> list:
        v, name = self.values, self.get_name()
        subscribed = any(self.wanted_outputs().values())
        return [
            D.input_status(name, window, self.inputs.topics["cloud"], v["input_timeout"]),
            D.processing_status(name, window, self.stats.snapshot()["timings"], subscribed),
            D.model_status(name, v["model.device"], self.device, self.active.version, len(self.active.class_names),
                           getattr(self, "_torch_threads", None),
                           len(self.tracking.tracker.tracks) if v["tracking.enable"] else None),
            diagnostic_status(name, self.vocabulary.status()),
            self.namesakes.status(self.stats),
        ]

    def destroy_node(self) -> None:
        if hasattr(self, "vocabulary"):  # absent when __init__ failed early
            self.vocabulary.shutdown()
        super().destroy_node()


def _cache_dir(value: str) -> Any:
    """The text embedding cache folder a ``text_encoder.cache_dir`` value names (None: memory only)."""
    from sal_ros.model.text_cache import default_cache_dir

    if value == "none":
        return None
    return Path(value).expanduser() if value else default_cache_dir()


def _leave_a_core_for_callbacks() -> None:
    """CPU model work on all cores but one, unless OMP_NUM_THREADS says otherwise (sal_ros.model.runtime says why;
    the benches apply the same policy)."""
    from sal_ros.model.runtime import apply_node_thread_policy

    apply_node_thread_policy()
