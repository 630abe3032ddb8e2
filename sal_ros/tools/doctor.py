"""``sal-ros doctor``: what on this machine and in this configuration loses lidar clouds or stops the nodes, and
what to change.

Machine checks (no DDS traffic; files under ``--root``, default ``/``, so a test can give a fake one): the RMW, the
Fast DDS profile of the environment and its transports, ``/dev/shm`` (shared-memory segments), the kernel's
socket buffer limits (``net.core.rmem_max`` / ``wmem_max``), IP fragment reassembly (``ipfrag_high_thresh`` /
``ipfrag_time``, for clouds from other hosts), other DDS participants on this ROS domain, and the ROS tools. With
``--params FILE``: the checkpoint, vocabulary and calibration the file names. With ``--live``: the cloud and camera
topics (publishers, QoS, one message each) and the camera transforms, each waited for at most ``--wait`` seconds.

Each advice points at the measured figures behind it: docs/ros.md, "Losing clouds". Exit status: 0 nothing to
change, 1 warnings (clouds may be lost), 3 failures (something will not work), 2 bad usage. ``--json`` prints
the checks as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
EXIT = {OK: 0, INFO: 0, WARN: 1, FAIL: 3}
DOCS = "docs/ros.md, 'Losing clouds'"
MIB = 1 << 20
# Advice thresholds. A full-size cloud: 120k points of 32 bytes (x y z intensity ring t, padded) is 3.8 MB.
CLOUD_BYTES = 4 * MIB
SOCKET_BUFFER = 4 * MIB  # what config/fastdds.xml asks of the kernel for its UDP sockets
IPFRAG_HIGH = 128 * MIB  # the ROS 2 docs' advice for large messages between hosts
IPFRAG_TIME_S = 3
SHM_FREE = 64 * MIB  # two 32 MiB segments (the node and a driver with our profile)
STOCK_SHM_SEGMENT = 512 * 1024  # Fast DDS's default shared-memory segment
PROFILE_ENV = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")


@dataclass
class Check:
    name: str
    verdict: str  # ok | info | warn | fail
    detail: str
    advice: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=None,
                        help="params file of the nodes: check the checkpoint, vocabulary and calibration it names")
    parser.add_argument("--live", action="store_true",
                        help="also check the live cloud and camera topics and the camera transforms (joins the "
                             "ROS graph in this environment's DDS settings)")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for each live topic or transform (default 10)")
    parser.add_argument("--cloud-mb", type=float, default=CLOUD_BYTES / MIB,
                        help="size of your lidar's clouds in MiB, for the buffer checks (default 4: 120k points)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)  # tests: a fake /proc, /dev


def main(args: argparse.Namespace) -> int:
    if args.params is not None and not args.params.is_file():
        print(f"sal-ros doctor: params file not found: {args.params}", file=sys.stderr)
        return 2
    if args.wait < 0 or args.cloud_mb <= 0:
        print("sal-ros doctor: --wait must be >= 0 and --cloud-mb > 0", file=sys.stderr)
        return 2
    env = dict(os.environ)
    cloud_bytes = int(args.cloud_mb * MIB)
    checks = machine_checks(args.root, env, cloud_bytes)
    values = None
    if args.params is not None:
        values, param_checks = params_checks(args.params)
        checks += param_checks
    if args.live:
        checks += live_checks(values or {}, args.wait)
    code = exit_code(checks)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "exit_code": code}, indent=2))
    else:
        print(render(checks))
    return code


def exit_code(checks: list[Check]) -> int:
    return max((EXIT[c.verdict] for c in checks), default=0)


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.verdict.upper():4}] {c.name}: {c.detail}")
        if c.advice and c.verdict in (WARN, FAIL):
            lines.append(f"       -> {c.advice}")
    counts = {v: sum(c.verdict == v for c in checks) for v in (FAIL, WARN)}
    lines.append(f"{counts[FAIL]} failure(s), {counts[WARN]} warning(s); the measured figures behind each advice: "
                 f"{DOCS}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the machine


def machine_checks(root: Path, env: dict[str, str], cloud_bytes: int = CLOUD_BYTES) -> list[Check]:
    profile = profile_file(env)
    transports = read_profile(profile) if profile and profile.is_file() else None
    return [
        check_rmw(env),
        check_profile(env, profile, transports, cloud_bytes),
        check_shm(root / "dev" / "shm", transports),
        *check_socket_buffers(root, transports),
        *check_ipfrag(root, env, cloud_bytes),
        check_domain(env),
        check_ros_tools(env),
    ]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def check_rmw(env: dict[str, str]) -> Check:
    rmw = env.get("RMW_IMPLEMENTATION", "")
    if rmw in ("", "rmw_fastrtps_cpp"):
        return Check("rmw", OK, f"{rmw or 'not set: the default, rmw_fastrtps_cpp'} (Fast DDS)")
    if rmw == "rmw_fastrtps_dynamic_cpp":
        return Check("rmw", OK, f"{rmw} (Fast DDS)")
    return Check("rmw", WARN, f"RMW_IMPLEMENTATION={rmw}: not measured with sal_ros",
                 "the loss figures and the shipped profile are for Fast DDS (rmw_fastrtps_cpp); with another RMW "
                 "measure with `sal-ros bench dds` and size its receive buffers for full-size clouds")


def profile_file(env: dict[str, str]) -> Path | None:
    for name in PROFILE_ENV:
        if env.get(name):
            return Path(env[name])
    return None


def read_profile(path: Path) -> dict[str, Any] | None:
    """The transports of a Fast DDS XML profile: ``{"shm": {segment_size, max_message_size} or None, "udp":
    {receive_buffer, send_buffer, whitelist}, "builtin": bool}`` for the default participant; None when the file
    does not parse."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError):
        return None

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    def child(node: Any, name: str) -> Any:
        return next((c for c in node if local(c.tag) == name), None)

    def text(node: Any, name: str) -> str | None:
        found = child(node, name) if node is not None else None
        return found.text.strip() if found is not None and found.text else None

    descriptors = {text(d, "transport_id"): d for d in tree.iter() if local(d.tag) == "transport_descriptor"}
    participant = next((p for p in tree.iter() if local(p.tag) == "participant"
                        and p.get("is_default_profile") == "true"), None)
    rtps = child(participant, "rtps") if participant is not None else None
    user = child(rtps, "userTransports") if rtps is not None else None
    used = [descriptors.get(t.text.strip()) for t in (user if user is not None else []) if t.text]
    builtin = (text(rtps, "useBuiltinTransports") or "true").lower() != "false" if rtps is not None else True
    out: dict[str, Any] = {"shm": None, "udp": None, "builtin": builtin, "default_participant": participant is not None}
    for d in used:
        if d is None:
            continue
        kind = (text(d, "type") or "").upper()
        if kind == "SHM":
            out["shm"] = {"segment_size": int(text(d, "segment_size") or STOCK_SHM_SEGMENT),
                          "max_message_size": int(text(d, "maxMessageSize") or 0) or None}
        elif kind == "UDPV4":
            whitelist = child(d, "interfaceWhiteList")
            out["udp"] = {"receive_buffer": int(text(d, "receiveBufferSize") or 0),
                          "send_buffer": int(text(d, "sendBufferSize") or 0),
                          "whitelist": [a.text.strip() for a in (whitelist if whitelist is not None else []) if a.text]}
    return out


def check_profile(env: dict[str, str], path: Path | None, transports: dict[str, Any] | None,
                  cloud_bytes: int) -> Check:
    name = "fastdds profile"
    ours = "config/fastdds.xml (`ros2 launch ... fastdds_profile:=...`, or FASTDDS_DEFAULT_PROFILES_FILE)"
    if path is None:
        return Check(name, WARN, "none: Fast DDS stock transports (512 KiB shared-memory segment)",
                     f"full-size best-effort clouds are mostly lost on stock Fast DDS; give the lidar driver AND the "
                     f"node {ours}, or have the driver publish reliable")
    if not path.is_file():
        return Check(name, FAIL, f"{path} (from the environment) does not exist",
                     "Fast DDS ignores it and runs stock; fix the path")
    if transports is None:
        return Check(name, FAIL, f"{path} is not valid XML", "Fast DDS refuses the file; fix or unset it")
    if not transports["default_participant"]:
        return Check(name, WARN, f"{path}: no participant profile with is_default_profile=\"true\"",
                     "ROS nodes use the default participant profile: mark yours as default")
    shm = transports["shm"]
    if shm is None and not transports["builtin"]:
        return Check(name, WARN, f"{path}: no shared-memory transport: clouds between processes go over UDP",
                     f"add a SHM transport (segment >= 32 MiB, 1 MiB messages) as in {ours}")
    if shm is not None and shm["max_message_size"] is None and shm["segment_size"] < 2 * cloud_bytes:
        return Check(name, WARN, f"{path}: shared-memory segment {shm['segment_size'] // 1024} KiB without a "
                     "message size: a cloud must fit the segment whole",
                     f"set segment_size >= 32 MiB and maxMessageSize 1 MiB, as in {ours}")
    udp = transports["udp"]
    where = ", ".join(udp["whitelist"]) if udp and udp["whitelist"] else "all interfaces"
    detail = (f"{path}: SHM segment {shm['segment_size'] // MIB if shm else '-'} MiB, UDP on {where}"
              f"{', builtin transports too' if transports['builtin'] else ''}")
    if udp and udp["whitelist"] and all(a.startswith("127.") for a in udp["whitelist"]) \
            and env.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "").upper() != "LOCALHOST":
        return Check(name, WARN, detail + ": UDP only on loopback, yet discovery reaches other hosts",
                     "a driver on another host is discovered but its clouds cannot arrive: allow your network "
                     "interface in the profile's interfaceWhiteList, or set ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST")
    return Check(name, OK, detail + "; the driver needs it too (a node-side profile alone does not help)")


def check_shm(shm: Path, transports: dict[str, Any] | None) -> Check:
    if not shm.is_dir():
        return Check("shared memory", FAIL, f"{shm} is missing: Fast DDS cannot use shared memory and sends every "
                     "cloud over UDP", "mount a tmpfs on /dev/shm (containers: `docker run --shm-size 512m`)")
    st = os.statvfs(shm)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    segment = (transports or {}).get("shm") or {}
    need = max(SHM_FREE, 2 * segment.get("segment_size", 0))
    stale = [p.name for p in shm.glob("fastdds_*") if not p.name.endswith("_el")]
    detail = f"{shm}: {free / MIB:.0f} MiB free of {total / MIB:.0f} MiB, {len(stale)} Fast DDS segment(s)"
    if free < need:
        return Check("shared memory", WARN, detail + f": under {need / MIB:.0f} MiB",
                     "each process maps its own segment there; with too little Fast DDS logs `Failed to create "
                     "segment` and falls back to UDP: give it more (`docker run --shm-size 512m`), and remove "
                     "segments left by crashed processes with `fastdds shm clean`")
    return Check("shared memory", OK, detail)


def check_socket_buffers(root: Path, transports: dict[str, Any] | None) -> list[Check]:
    udp = (transports or {}).get("udp") or {}
    out = []
    for key, want in (("rmem_max", max(SOCKET_BUFFER, udp.get("receive_buffer", 0))),
                      ("wmem_max", max(SOCKET_BUFFER, udp.get("send_buffer", 0)))):
        value = _read_int(root / "proc" / "sys" / "net" / "core" / key)
        name = f"net.core.{key}"
        if value is None:
            out.append(Check(name, INFO, "unreadable here (not Linux, or no /proc)"))
        elif value < want:
            out.append(Check(name, WARN, f"{value} bytes: below {want} (the profile's UDP buffer asks for it; "
                             "the kernel caps it silently)",
                             f"a best-effort cloud over UDP is lost when the socket buffer overflows: "
                             f"`sudo sysctl -w net.core.{key}={want}` (and in /etc/sysctl.d/ to keep it)"))
        else:
            out.append(Check(name, OK, f"{value} bytes"))
    return out


def check_ipfrag(root: Path, env: dict[str, str], cloud_bytes: int) -> list[Check]:
    """IP reassembly: a UDP datagram over a 1500-byte MTU arrives in ~44 pieces; reassembly memory above
    ipfrag_high_thresh drops them, and incomplete ones hold it for ipfrag_time. Only between hosts (loopback's MTU
    is 64 KiB), so with localhost discovery they do not matter."""
    base = root / "proc" / "sys" / "net" / "ipv4"
    high, ttl = _read_int(base / "ipfrag_high_thresh"), _read_int(base / "ipfrag_time")
    if env.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "").upper() == "LOCALHOST":
        return [Check("ip fragments", INFO, f"not used: discovery is LOCALHOST (ipfrag_high_thresh {high}, "
                      f"ipfrag_time {ttl})")]
    out = []
    if high is None:
        out.append(Check("net.ipv4.ipfrag_high_thresh", INFO, "unreadable here"))
    elif high < max(IPFRAG_HIGH, 4 * cloud_bytes):
        out.append(Check("net.ipv4.ipfrag_high_thresh", WARN, f"{high} bytes: a few clouds from another host fill it",
                         f"for a lidar on another host: `sudo sysctl -w net.ipv4.ipfrag_high_thresh={IPFRAG_HIGH}` "
                         "(not needed when driver and node share a machine)"))
    else:
        out.append(Check("net.ipv4.ipfrag_high_thresh", OK, f"{high} bytes"))
    if ttl is None:
        out.append(Check("net.ipv4.ipfrag_time", INFO, "unreadable here"))
    elif ttl > IPFRAG_TIME_S:
        out.append(Check("net.ipv4.ipfrag_time", WARN, f"{ttl} s: fragments of a lost datagram hold reassembly "
                         "memory that long", f"for a lidar on another host: `sudo sysctl -w "
                         f"net.ipv4.ipfrag_time={IPFRAG_TIME_S}`"))
    else:
        out.append(Check("net.ipv4.ipfrag_time", OK, f"{ttl} s"))
    return out


def check_domain(env: dict[str, str]) -> Check:
    from sal_ros.env import domain_participants

    text = env.get("ROS_DOMAIN_ID", "")
    try:
        domain = int(text) if text else 0
    except ValueError:
        return Check("ros domain", FAIL, f"ROS_DOMAIN_ID={text!r} is not a number", "set a number from 0 to 101")
    if not 0 <= domain <= 232:
        return Check("ros domain", FAIL, f"ROS_DOMAIN_ID={domain} is out of range", "use 0 to 101 (232 at most)")
    busy = domain_participants(domain)
    scope = env.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "SUBNET (default)")
    detail = f"{domain}{' (default)' if not text else ''}, discovery {scope}, {busy} participant(s) on it here"
    if busy:
        return Check("ros domain", WARN, detail,
                     "other DDS participants share this domain on this machine: make sure they are yours (driver, "
                     "TF); another robot stack or test run there sees your topics, and you theirs. Choose a free "
                     "ROS_DOMAIN_ID otherwise")
    if domain == 0 and scope.upper() != "LOCALHOST":
        return Check("ros domain", INFO, detail + "; domain 0 is every ROS machine's default on this network")
    return Check("ros domain", OK, detail)


def check_ros_tools(env: dict[str, str]) -> Check:
    import importlib.util

    missing = [m for m in ("rclpy", "tf2_ros", "sal_ros_msgs", "vision_msgs") if importlib.util.find_spec(m) is None]
    ros2 = shutil.which("ros2", path=env.get("PATH"))
    detail = f"ros2 CLI {'at ' + ros2 if ros2 else 'not on PATH'}; python modules missing: {missing or 'none'}"
    if "rclpy" in missing or "sal_ros_msgs" in missing:
        return Check("ros tools", FAIL, detail, "source your ROS 2 setup and the workspace's install/setup.bash "
                     "(or `make setup` without an apt ROS)")
    if missing or not ros2:
        return Check("ros tools", WARN, detail, "source your ROS 2 setup: `ros2 launch/param` and TF need them")
    return Check("ros tools", OK, detail)


# ------------------------------------------------------------------------------------------- the params file


def params_checks(path: Path) -> tuple[dict[str, Any] | None, list[Check]]:
    """The segmenter's values from ``path`` (defaults filled in), and checks of what they name."""
    from sal_ros.nodes import params as P

    try:
        raw = P.load_params_file(path, P.SEGMENTER_NODE)
    except ValueError as exc:
        return None, [Check("params file", FAIL, str(exc), "fix the file")]
    unknown = P.unknown_names(P.SEGMENTER_NODE, raw)
    values = {s.name: s.default for s in P.all_specs(P.SEGMENTER_NODE, raw)}
    values.update(raw)
    checks = [Check("params file", WARN if unknown else OK,
                    f"{path}: unknown parameter(s) {unknown}" if unknown else f"{path}: {len(raw)} value(s)",
                    "the node refuses unknown names: see `sal-ros run --list-params`")]
    checks += [check_checkpoint(values), check_vocabulary(values), check_calibration(values)]
    return values, checks


def check_checkpoint(values: dict[str, Any]) -> Check:
    from sal_ros.model.checkpoint import CheckpointError, load_checkpoint
    from sal_ros.model.open_clip_models import encoder_identity

    path = values.get("model.checkpoint") or ""
    if not path:
        return Check("checkpoint", WARN, "model.checkpoint is empty: a tiny RANDOM model runs (meaningless labels)",
                     "set model.checkpoint to a trained SAL checkpoint")
    try:
        _, meta = load_checkpoint(path)
    except CheckpointError as exc:
        return Check("checkpoint", FAIL, str(exc), "the node cannot start with it: point at a sal_ros checkpoint")
    trained = (meta.get("text_encoder") or {}).get("identity")
    wanted = encoder_identity(values["text_encoder.model"], values["text_encoder.pretrained"] or None)
    detail = f"{path}: {meta['model_config'].num_queries} queries, {meta['token_dim']}-d tokens, trained with text " \
             f"encoder {trained or 'not recorded'}"
    if trained and trained != wanted:
        return Check("checkpoint", WARN, detail + f"; the params give {wanted}",
                     "class names only mean something with the encoder the model was trained with: set "
                     "text_encoder.model / text_encoder.pretrained to match")
    return Check("checkpoint", OK, detail)


def check_vocabulary(values: dict[str, Any]) -> Check:
    from sal_ros.model.vocabulary import Vocabulary, VocabularyError

    source = values.get("vocabulary_file") or ""
    try:
        vocabulary = Vocabulary.from_yaml(source) if source else Vocabulary.from_prompts(list(values["prompts"]))
    except (VocabularyError, OSError, ValueError) as exc:
        return Check("vocabulary", FAIL, f"{source or 'prompts'}: {exc}", "the node refuses it: fix the file/prompts")
    names = [c.name for c in vocabulary.classes]
    return Check("vocabulary", OK, f"{source or 'prompts'}: {len(names)} class(es): {', '.join(names[:8])}"
                 f"{' ...' if len(names) > 8 else ''}")


def check_calibration(values: dict[str, Any]) -> Check:
    from sal_ros.core.calibration import read_static_extrinsics
    from sal_ros.core.errors import CalibrationError

    cameras = list(values.get("cameras") or [])
    if not cameras:
        return Check("cameras", OK, "none configured: lidar-only (no overlays)")
    if values["calibration.source"] == "tf":
        return Check("cameras", INFO, f"{cameras}: extrinsics from TF (`--live` checks the transforms)")
    path = values.get("calibration.file") or ""
    if not path:
        return Check("cameras", FAIL, "calibration.source is static but calibration.file is empty",
                     "name the static extrinsics YAML (sal-ros convert writes extrinsics.yaml)")
    try:
        calib = read_static_extrinsics(path)
    except CalibrationError as exc:
        return Check("cameras", FAIL, str(exc), "fix the calibration file")
    by_frame = {c.frame_id for c in calib.values()}
    unmatched = [c for c in cameras if c not in calib]
    detail = f"{path}: {sorted(calib)} for cameras {cameras}"
    if unmatched:
        return Check("cameras", WARN, detail + f"; {unmatched} not in the file by name",
                     f"they then match by their images' frame_id, one of {sorted(by_frame)} (`--live` checks it)")
    return Check("cameras", OK, detail)


# -------------------------------------------------------------------------------------------------- live


def live_checks(values: dict[str, Any], wait_s: float) -> list[Check]:
    """Joins the graph with this environment's DDS settings: the cloud topic's publishers and their QoS against
    the node's subscription, one cloud, each camera's image and CameraInfo, and (calibration.source tf) the
    transform from the cloud's frame to each camera's."""
    import rclpy

    from sal_ros.nodes import params as P

    defaults = {s.name: s.default for s in P.all_specs(P.SEGMENTER_NODE, values)}
    values = {**defaults, **values}
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("sal_doctor", context=context)
    probe = _Live(node, context, wait_s)
    try:
        checks = [probe.cloud(values["cloud_topic"], values["qos.cloud.reliability"])]
        for name in values.get("cameras") or []:
            checks.append(probe.camera(name, values[f"camera.{name}.image_topic"], values[f"camera.{name}.info_topic"],
                                       bool(values[f"camera.{name}.compressed"])))
        if values.get("cameras") and values["calibration.source"] == "tf":
            checks += probe.transforms()
        return checks
    finally:
        probe.executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


class _Live:
    def __init__(self, node: Any, context: Any, wait_s: float) -> None:
        from rclpy.executors import SingleThreadedExecutor

        self.node, self.wait_s = node, wait_s
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(node)
        self.cloud_frame: str | None = None
        self.camera_frames: dict[str, str] = {}

    def _spin_until(self, done: Callable[[], Any]) -> Any:
        """``done()``'s value once truthy, spinning meanwhile; its last (falsy) value after ``wait_s``."""
        import time

        end = time.monotonic() + self.wait_s
        while not (value := done()) and time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.05)
        return value

    def _one(self, msg_type: Any, topic: str, reliability: str = "best_effort") -> Any:
        from sal_ros.nodes.qos import profile

        got: list = []
        sub = self.node.create_subscription(msg_type, topic, got.append, profile(reliability, 1))
        try:
            self._spin_until(lambda: got)
        finally:
            self.node.destroy_subscription(sub)
        return got[0] if got else None

    def cloud(self, topic: str, reliability: str) -> Check:
        from rclpy.qos import ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        name = f"live cloud {topic}"
        infos = self._spin_until(lambda: self.node.get_publishers_info_by_topic(topic))
        if not infos:
            return Check(name, FAIL, f"no publisher within {self.wait_s:g} s",
                         "check the topic name (`ros2 topic list`), the driver, ROS_DOMAIN_ID and discovery range")
        best_effort = [i for i in infos if i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT]
        if reliability == "reliable" and best_effort:
            return Check(name, FAIL, f"{len(best_effort)} best-effort publisher(s), the node subscribes reliable: "
                         "they never match", "set qos.cloud.reliability: best_effort")
        msg = self._one(PointCloud2, topic)
        if msg is None:
            return Check(name, WARN, f"{len(infos)} publisher(s) but no cloud arrived within {self.wait_s:g} s",
                         f"large best-effort clouds are being lost: see the DDS checks above and {DOCS}")
        self.cloud_frame = msg.header.frame_id
        size = len(msg.data)
        qos = "best effort" if best_effort else "reliable"
        return Check(name, OK, f"{len(infos)} publisher(s), {qos}; a cloud of {msg.width * msg.height} points "
                     f"({size / MIB:.1f} MiB) in frame {msg.header.frame_id!r}")

    def camera(self, camera: str, image_topic: str, info_topic: str, compressed: bool) -> Check:
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image

        name = f"live camera {camera}"
        image = self._one(CompressedImage if compressed else Image, image_topic)
        if image is None:
            return Check(name, FAIL, f"no image on {image_topic} within {self.wait_s:g} s",
                         "check camera.<name>.image_topic / .compressed and the camera driver")
        info = self._one(CameraInfo, info_topic)
        self.camera_frames[camera] = image.header.frame_id
        if info is None:
            return Check(name, WARN, f"images in frame {image.header.frame_id!r}, but no CameraInfo on {info_topic}",
                         "the camera is left out of every frame without intrinsics: check camera.<name>.info_topic "
                         "(or give intrinsics in the static calibration file)")
        return Check(name, OK, f"images in frame {image.header.frame_id!r}, CameraInfo {info.width}x{info.height}")

    def transforms(self) -> list[Check]:
        try:
            import tf2_ros
        except ImportError:
            return [Check("live transforms", FAIL, "tf2_ros is not importable", "source your ROS 2 setup")]
        from rclpy.duration import Duration
        from rclpy.time import Time

        if self.cloud_frame is None:
            return [Check("live transforms", WARN, "no cloud arrived: the cloud's frame is unknown")]
        buffer = tf2_ros.Buffer()
        listener = tf2_ros.TransformListener(buffer, self.node, spin_thread=False)
        try:
            out = []
            for camera, frame in self.camera_frames.items():
                found = self._spin_until(lambda f=frame: buffer.can_transform(f, self.cloud_frame, Time(),
                                                                              Duration(seconds=0)))
                name = f"live transform {camera}"
                if found:
                    out.append(Check(name, OK, f"{self.cloud_frame!r} -> {frame!r} available"))
                else:
                    out.append(Check(name, FAIL, f"no transform {self.cloud_frame!r} -> {frame!r} within "
                                     f"{self.wait_s:g} s", "publish it (robot_state_publisher, a static transform "
                                     "publisher) or use calibration.source: static"))
            return out
        finally:
            listener.unregister()
