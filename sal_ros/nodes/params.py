"""Every ROS parameter of the sal_ros nodes, in one table: types, defaults, ranges, descriptions.

The nodes declare from these tables (:func:`declare`), ``sal-ros run`` checks a params file (read by
sal_ros.core.params_file, as the bag reader reads it) against them (:func:`unknown_names`), and the parameter
docs are generated from them (:func:`markdown_table`). ROS parameters cannot be nested lists, so cameras are a
name list plus one group of ``camera.<name>.*`` parameters per name (:func:`camera_specs`).

Parameters marked ``dynamic`` may change at run time (``ros2 param set``); the others are read-only.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sal_ros.core.cloud_input import MAX_POINTS_POLICIES, SCORE_THRESHOLD
from sal_ros.core.msgtypes import NS_PER_S, image_topic, info_topic
from sal_ros.core.params_file import RECORDER_NODE, SEGMENTER_NODE, load_params_file  # noqa: F401 (re-exported)
from sal_ros.core.sync import MATCH_THRESHOLD_NS, SYNC_TIMEOUT_NS

RELIABILITY = ("best_effort", "reliable")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str  # bool | int | double | string | string_array
    default: Any
    description: str
    range: tuple[float, float] | None = None  # inclusive, for int and double
    choices: tuple[str, ...] = ()  # allowed values of a string parameter
    dynamic: bool = False  # may change at run time; read-only otherwise


def _qos_specs(stream: str, what: str, depth: int) -> list[ParamSpec]:
    return [
        ParamSpec(f"qos.{stream}.reliability", "string", "best_effort",
                  f"QoS reliability of the {what} subscriptions. best_effort matches every publisher; "
                  "reliable does not match best-effort publishers (sensor drivers), silently.", choices=RELIABILITY),
        ParamSpec(f"qos.{stream}.depth", "int", depth, f"QoS history depth (keep last) of the {what} subscriptions.",
                  range=(1, 1000)),
    ]


# Sensor inputs, shared by the segmenter and the recorder (put them under "/**" in a params file).
INPUT_PARAMS: list[ParamSpec] = [
    ParamSpec("cloud_topic", "string", "/points", "sensor_msgs/PointCloud2 lidar input; it anchors every frame."),
    ParamSpec("cameras", "string_array", [],
              "Camera names; each has camera.<name>.image_topic, .info_topic, .compressed, .time_offset."),
    ParamSpec("sync.match_threshold", "double", MATCH_THRESHOLD_NS / NS_PER_S,
              "Largest |image stamp - (cloud stamp + time_offset)| (s) for an image to match a cloud.", range=(0.0, 1.0)),
    ParamSpec("sync.timeout", "double", SYNC_TIMEOUT_NS / NS_PER_S,
              "How long (s) a cloud waits, after its matching window closed, for late camera images before it goes "
              "on as a partial frame.",
              range=(0.0, 5.0)),
    ParamSpec("sync.allow_partial", "bool", True,
              "Process frames where some cameras had no match (lidar-only outputs still come out)."),
    *_qos_specs("cloud", "lidar cloud", 2),
    *_qos_specs("images", "camera image", 2),
    *_qos_specs("camera_info", "camera_info", 2),
    ParamSpec("calibration.source", "string", "tf",
              "Where lidar->camera extrinsics come from: tf (tf2 lookup at the cloud stamp) or static "
              "(calibration.file).", choices=("tf", "static")),
    ParamSpec("calibration.file", "string", "",
              "Static extrinsics YAML (calibration.source static): per camera a 4x4 lidar->camera optical transform."),
    ParamSpec("input_timeout", "double", 2.0,
              "Warn (throttled) when an input has been silent this long (s).", range=(0.1, 3600.0)),
    ParamSpec("stats_period", "double", 5.0,
              "Period (s) of ~/stats and of the statistics log line.", range=(0.1, 3600.0)),
    ParamSpec("diagnostics_period", "double", 1.0,
              "Period (s, wall clock) of the node's /diagnostics (diagnostic_msgs/DiagnosticArray): input, processing "
              "and model health with OK / WARN / ERROR over the last 10 s.", range=(0.1, 3600.0)),
]

SEGMENTER_PARAMS: list[ParamSpec] = [
    ParamSpec("model.checkpoint", "string", "",
              "SAL checkpoint (.pt). Empty: a tiny random-weight model for trying the plumbing (meaningless labels)."),
    ParamSpec("model.device", "string", "cuda", "Torch device (cuda, cuda:N or cpu); falls back to cpu without CUDA."),
    ParamSpec("model.intensity_scale", "double", 0.0,
              "Full-scale intensity of this lidar's driver (1 for 0..1, 255 for 8-bit, 65535 for 16-bit), rescaled "
              "to the scale the checkpoint was trained with. 0: the checkpoint's own scale (same kind of sensor).",
              range=(0.0, 1e9), dynamic=True),
    ParamSpec("text_encoder.model", "string", "ViT-B-16", "open_clip text encoder (must match the checkpoint's token size)."),
    ParamSpec("text_encoder.pretrained", "string", "",
              "open_clip pretrained tag or local weights file. Empty: random weights (classes are meaningless)."),
    ParamSpec("prompts", "string_array", ["car", "truck", "bicycle", "person", "road", "sidewalk", "building",
                                          "vegetation", "pole", "traffic sign"],
              "Vocabulary: one class per prompt (label k = prompts[k-1]). Change at run time with ros2 param set; "
              "ignored at start when vocabulary_file is set.", dynamic=True),
    ParamSpec("vocabulary_file", "string", "",
              "Vocabulary YAML (classes with descriptions and thing/stuff); overrides prompts at start.", dynamic=True),
    ParamSpec("allow_duplicate", "bool", False,
              "Start even when another node of this name is in the ROS graph (both would answer every cloud and "
              "share one set_parameters service). false: refuse to start, naming the other (sal-ros run "
              "--allow-duplicate sets it). Either way a namesake is an ERROR '<node>: name' status in /diagnostics "
              "while it lasts, counted as duplicate_name."),
    ParamSpec("duplicate_check_s", "double", 2.0,
              "How long after its creation the node looks for a namesake in the ROS graph before it starts "
              "(a namesake found ends the look). 0: no check.", range=(0.0, 600.0)),
    ParamSpec("duplicate_ghost_s", "double", 30.0,
              "How long a namesake found at start is given to leave the graph before the node refuses: a crashed "
              "node stays until its DDS lease ends (20 s by Fast DDS's default).", range=(0.0, 600.0)),
    ParamSpec("vocabulary.max_file_bytes", "int", 256 * 1024,
              "Largest vocabulary_file read (bytes); a bigger one is refused before it is read.", range=(1, 1 << 30)),
    ParamSpec("vocabulary.max_descriptions", "int", 1024,
              "Most descriptions a vocabulary_file may hold, all classes together (each is embedded once per "
              "template).", range=(1, 1_000_000)),
    ParamSpec("vocabulary.max_templates", "int", 16, "Most prompt templates a vocabulary_file may list.",
              range=(1, 1000)),
    ParamSpec("text_encoder.cache_dir", "string", "",
              "Folder of the text embedding cache (one row per prompt text, per encoder and weights; read at start, "
              "so a restarted node embeds known prompts at once). Empty: $SAL_ROS_CACHE/text_embeddings, default "
              "~/.cache/sal_ros/text_embeddings. 'none': memory only."),
    ParamSpec("score_threshold", "double", SCORE_THRESHOLD,
              "Points whose segment score is below this get label 0 and instance 0.", range=(0.0, 1.0), dynamic=True),
    ParamSpec("min_instance_points", "int", 1,
              "Instances with fewer points are dropped (their points get label 0, instance 0); e.g. 15-50 to keep "
              "speckle out of the markers. 1: keep every instance.", range=(1, 1_000_000), dynamic=True),
    ParamSpec("max_points", "int", 300000,
              "Largest cloud the model sees (finite points); bigger clouds follow max_points_policy. 0: no limit.",
              range=(0, 10_000_000), dynamic=True),  # the shipped Fast DDS profile carries them (docs/ros.md)
    ParamSpec("max_points_policy", "string", "subsample",
              "subsample: run the model on a random subset and label the rest by nearest neighbour; "
              "reject: drop the frame with a warning.", choices=MAX_POINTS_POLICIES, dynamic=True),
    ParamSpec("publish.labeled_points", "bool", True, "Publish ~/labeled_points (PointCloud2).", dynamic=True),
    ParamSpec("publish.markers", "bool", True, "Publish ~/markers (boxes and class labels per instance).", dynamic=True),
    ParamSpec("publish.overlays", "bool", True, "Publish ~/overlay/<camera> label overlay images.", dynamic=True),
    ParamSpec("publish.info", "bool", True,
              "Publish ~/info (debugging aid, JSON per frame: stamp, vocabulary version and classes, instances; "
              "the typed outputs are ~/detections and ~/frame_summary).", dynamic=True),
    ParamSpec("publish.detections", "bool", True,
              "Publish ~/detections (vision_msgs/Detection3DArray: per instance its box, track id and top classes).",
              dynamic=True),
    ParamSpec("publish.frame_summary", "bool", True,
              "Publish ~/frame_summary (sal_ros_msgs/FrameSummary: vocabulary version, counts, tracks, timings).",
              dynamic=True),
    ParamSpec("publish.filtered", "bool", True,
              "Publish ~/filtered: the input cloud (its fields and point layout) without the points of filter.classes.",
              dynamic=True),
    ParamSpec("publish.debug", "bool", True,
              "Publish ~/debug/processing_time_ms, ~/debug/cyclic_time_ms and ~/debug/pipeline_latency_ms per frame "
              "(Autoware's debug topics; stamped with the cloud's stamp).", dynamic=True),
    ParamSpec("filter.classes", "string_array", [],
              "Class names (of the active vocabulary) whose points ~/filtered leaves out, e.g. [road, vegetation]. "
              "Empty: ~/filtered is the input cloud (clear it at run time with \"['']\": `ros2 param set` takes [] for a "
              "bool array).", dynamic=True),
    ParamSpec("markers.min_points", "int", 5, "Instances with fewer points get no marker.", range=(1, 100000),
              dynamic=True),
    ParamSpec("tracking.enable", "bool", True,
              "Track instances over frames: instance ids in every output are track ids, kept while the object is "
              "seen, and a track's class is smoothed over its frames. false: ids afresh each frame.", dynamic=True),
    ParamSpec("tracking.fixed_frame", "string", "",
              "Frame to track in (e.g. odom, map): boxes move there through TF at the cloud stamp, so ego motion "
              "cancels. Empty: the sensor frame (fine for a still robot or slow motion)."),
    ParamSpec("tracking.max_distance", "double", 2.0,
              "Largest distance (m) between a track's predicted centre and an instance for them to be associated.",
              range=(0.01, 100.0), dynamic=True),
    ParamSpec("tracking.max_misses", "int", 3, "Frames a track survives without an instance before it ends.",
              range=(0, 1000), dynamic=True),
    ParamSpec("tracking.class_memory", "double", 0.7,
              "Weight of a track's past class votes against the new frame's (0: the class of the frame only).",
              range=(0.0, 0.99), dynamic=True),
    ParamSpec("overlay.point_radius", "int", 2, "Radius (pixels) of a projected point in overlays.", range=(0, 10),
              dynamic=True),
    ParamSpec("qos.outputs.reliability", "string", "reliable",
              "QoS reliability of the outputs; reliable reaches both reliable (RViz default) and best-effort "
              "subscribers.", choices=RELIABILITY),
    ParamSpec("qos.outputs.depth", "int", 1, "QoS history depth of the outputs.", range=(1, 1000)),
]

RECORDER_PARAMS: list[ParamSpec] = [
    ParamSpec("output_dir", "string", "sal_frames", "FrameStore directory (created; an existing one is resumed)."),
    ParamSpec("every_nth", "int", 1, "Record one synced frame in every N.", range=(1, 100000)),
    ParamSpec("max_frames", "int", 0, "Stop recording after this many frames in the store. 0: no limit.",
              range=(0, 100_000_000)),
    ParamSpec("max_gb", "double", 0.0, "Stop recording when the store reaches this size (GB). 0: no limit.",
              range=(0.0, 100000.0)),
    ParamSpec("pose_frame", "string", "odom",
              "Fixed frame of the lidar pose stored with each frame (tf2 pose_frame -> cloud frame at the cloud "
              "stamp, waiting up to sync.timeout), for Seal's temporal term (sal-ros pretrain, seal.pose_frame). "
              "A frame without one is recorded anyway, counted as pose_missing in ~/stats. Empty: no poses."),
]


def camera_specs(name: str) -> list[ParamSpec]:
    """The ``camera.<name>.*`` parameters of one configured camera."""
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise ValueError(f"camera name {name!r}: use letters, digits and '_' (it becomes part of parameter names)")
    p = f"camera.{name}."
    return [
        ParamSpec(p + "image_topic", "string", image_topic(name), f"Image topic of camera {name}."),
        ParamSpec(p + "info_topic", "string", info_topic(name), f"sensor_msgs/CameraInfo topic of camera {name}."),
        ParamSpec(p + "compressed", "bool", False,
                  f"Camera {name} publishes sensor_msgs/CompressedImage (jpeg/png) instead of Image."),
        ParamSpec(p + "rectified", "bool", False,
                  f"Camera {name}'s image topic is rectified (image_rect): project with CameraInfo's P and R, no "
                  "distortion; false: the raw image, K and D."),
        ParamSpec(p + "time_offset", "double", 0.0,
                  f"When camera {name} fires relative to the cloud stamp (s; image stamp - cloud stamp, e.g. -0.035 "
                  "for a camera that fires before the sweep's stamp): the image nearest cloud stamp + offset is taken.",
                  range=(-1.0, 1.0)),
    ]


def node_specs(node_name: str) -> list[ParamSpec]:
    if node_name == SEGMENTER_NODE:
        return INPUT_PARAMS + SEGMENTER_PARAMS
    if node_name == RECORDER_NODE:
        return INPUT_PARAMS + RECORDER_PARAMS
    raise ValueError(f"unknown node {node_name!r}")


# --------------------------------------------------------------------------------------------- validation


def check_value(spec: ParamSpec, value: Any) -> str | None:
    """Why ``value`` is not acceptable for ``spec`` (range, choices), or None. Types are checked by rclpy."""
    if spec.choices and value not in spec.choices:
        return f"{spec.name} must be one of {list(spec.choices)}, got {value!r}"
    if spec.range is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = spec.range
        if not (lo <= value <= hi) or (isinstance(value, float) and math.isnan(value)):
            return f"{spec.name} must be in [{lo}, {hi}], got {value!r}"
    return None


def coerce(spec: ParamSpec, value: Any) -> Any:
    """YAML-friendly coercion: ints for double parameters (``timeout: 1``), tuples to lists."""
    if spec.type == "double" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if spec.type == "string_array" and isinstance(value, tuple):
        return list(value)
    return value


# ----------------------------------------------------------------------------------------------- rclpy side


def _rclpy_type(spec: ParamSpec):
    from rclpy.parameter import Parameter

    return {
        "bool": Parameter.Type.BOOL,
        "int": Parameter.Type.INTEGER,
        "double": Parameter.Type.DOUBLE,
        "string": Parameter.Type.STRING,
        "string_array": Parameter.Type.STRING_ARRAY,
    }[spec.type]


def descriptor(spec: ParamSpec):
    """The rcl_interfaces ParameterDescriptor of a spec (type, description, range, read-only)."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    d = ParameterDescriptor(
        name=spec.name,
        type=_rclpy_type(spec).value,
        description=spec.description,
        read_only=not spec.dynamic,
    )
    if spec.choices:
        d.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.range is not None and spec.type == "double":
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]), to_value=float(spec.range[1]))]
    if spec.range is not None and spec.type == "int":
        d.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    return d


def to_parameter(spec: ParamSpec, value: Any):
    """An rclpy Parameter with the spec's type (an empty list would otherwise become a byte array)."""
    from rclpy.parameter import Parameter

    try:
        return Parameter(spec.name, _rclpy_type(spec), coerce(spec, value))
    except (TypeError, ValueError):  # rclpy says only "Type '9' and value '5' do not agree"
        raise ValueError(f"parameter {spec.name}: expected {spec.type.replace('_', ' ')}, got {value!r} "
                         f"({type(value).__name__})") from None


def declare(node: Any, specs: Iterable[ParamSpec]) -> dict[str, Any]:
    """Declare ``specs`` on ``node`` (overrides from --params-file / -p / parameter_overrides apply) and
    return the values. A wrong type or out-of-range override raises ValueError naming the parameter."""
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
    from rclpy.parameter import Parameter

    values = {}
    for spec in specs:
        empty_list = spec.type == "string_array" and not spec.default
        try:
            # An empty list default would be inferred as a byte array: declare those by type (no default).
            default = _rclpy_type(spec) if empty_list else coerce(spec, spec.default)
            param = node.declare_parameter(spec.name, default, descriptor(spec))
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            raise ValueError(f"parameter {spec.name}: {exc} (expected {spec.type})") from exc
        if param.type_ == Parameter.Type.NOT_SET:
            _assign_empty_list(node, spec)
            value = list(spec.default)  # a list left unset (or `[]` in a params file) means "none"
        else:
            value = list(param.value) if spec.type == "string_array" else param.value
        problem = check_value(spec, value)
        if problem:
            raise ValueError(problem)
        values[spec.name] = value
    return values


def _assign_empty_list(node: Any, spec: ParamSpec) -> None:
    """Give a list parameter declared by type its typed empty value. Left NOT_SET, rclpy's get_parameters fails
    the whole request it is part of: `ros2 param dump` printed `ros__parameters: {}` and rqt_reconfigure showed
    nothing. rclpy infers `[]` as a byte array and its public setters refuse read-only parameters, so the value
    goes in through the setter rclpy's own declare_parameter uses (descriptors given: no read-only check)."""
    param = to_parameter(spec, spec.default)
    result = node._set_parameters_atomically_common([param], {spec.name: node.describe_parameter(spec.name)})
    if not result.successful:
        raise ValueError(f"parameter {spec.name}: {result.reason}")


# --------------------------------------------------------------------------------------------- params files


def all_specs(node_name: str, values: dict[str, Any]) -> list[ParamSpec]:
    """The node's specs plus the per-camera specs of the cameras named in ``values``."""
    specs = node_specs(node_name)
    cameras = values.get("cameras", [])
    for name in cameras or []:
        specs = specs + camera_specs(str(name))
    return specs


# Parameters every rclpy node declares itself (they are in a `ros2 param dump`).
RCLPY_PARAMS = ("use_sim_time", "start_type_description_service")


def unknown_names(node_name: str, values: dict[str, Any]) -> list[str]:
    """Parameter names in ``values`` the node does not declare (typos), rclpy's own (RCLPY_PARAMS) excepted."""
    known = {spec.name for spec in all_specs(node_name, values)} | set(RCLPY_PARAMS)
    return sorted(name for name in values if name not in known)


def overrides(node_name: str, values: dict[str, Any]) -> list:
    """rclpy Parameters for ``Node(parameter_overrides=...)``: typed from the table, use_sim_time passed on."""
    from rclpy.parameter import Parameter

    specs = {spec.name: spec for spec in all_specs(node_name, values)}
    out = []
    for name, value in values.items():
        if name in specs and value == [] and not specs[name].default:
            continue  # the default already; rclpy would re-infer an empty override as a byte array
        if name in specs:
            out.append(to_parameter(specs[name], value))
        elif name == "use_sim_time":
            out.append(Parameter(name, Parameter.Type.BOOL, bool(value)))
    return out


# -------------------------------------------------------------------------------------------------- docs


def markdown_table(specs: Sequence[ParamSpec]) -> str:
    """A Markdown table of parameters (name, type, default, range or choices, dynamic, description).

    Defaults are written as in a params file (:func:`yaml_value`). No cell breaks the table: ``|`` is escaped
    everywhere, ``<`` and ``>`` in text cells (they would start an HTML tag; code spans show them as they are).
    """
    rows = ["| parameter | type | default | range / choices | dynamic | description |", "|---|---|---|---|---|---|"]
    for s in specs:
        limits = " ".join(s.choices) if s.choices else (f"{s.range[0]} .. {s.range[1]}" if s.range else "")
        cells = [_code_cell(s.name), _text_cell(s.type), _code_cell(yaml_value(s.default)), _text_cell(limits),
                 "yes" if s.dynamic else "no", _text_cell(s.description)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def yaml_value(value: Any) -> str:
    """``value`` as YAML flow text: ``[a, b]``, plain strings (quoted only where YAML would read something else,
    e.g. ``''``), ``true``/``false``, ``null``, numbers."""
    import yaml

    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _one_line(text: str) -> str:
    return re.sub(r"(?<!\\)\|", r"\\|", " ".join(str(text).splitlines()))


def _text_cell(text: str) -> str:
    return _one_line(text).replace("<", "&lt;").replace(">", "&gt;")


def _code_cell(text: str) -> str:
    return f"`{_one_line(text)}`" if text else ""
