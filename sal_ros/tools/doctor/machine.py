"""Machine checks, without DDS traffic: the RMW, the Fast DDS profile of the environment and its transports,
``/dev/shm``, the kernel's socket buffer limits, IP fragment reassembly, other participants on the ROS domain and
the ROS tools. Files are read under ``root`` (``/`` unless a test gives a fake one)."""
from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from sal_ros.tools.doctor.report import FAIL, INFO, MIB, OK, WARN, Check

# Advice thresholds. A full-size cloud: 120k points of 32 bytes (x y z intensity ring t, padded) is 3.8 MB.
CLOUD_BYTES = 4 * MIB
SOCKET_BUFFER = 4 * MIB  # what config/fastdds.xml asks of the kernel for its UDP sockets
IPFRAG_HIGH = 128 * MIB  # the ROS 2 docs' advice for large messages between hosts
IPFRAG_TIME_S = 3
SHM_FREE = 64 * MIB  # two 32 MiB segments (the node and a driver with our profile)
STOCK_SHM_SEGMENT = 512 * 1024  # Fast DDS's default shared-memory segment
PROFILE_ENV = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")


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

