"""``sal-ros run``: the segmenter (and optionally the recorder) in one process, without ROS launch tooling.

    sal-ros run --params config/segment.yaml [--record DIR] [--set model.device=cpu ...] [--use-sim-time]
    sal-ros run --list-params
    sal-ros run --params my_robot.yaml --rviz-config my_robot.rviz

The params file is the same ROS 2 YAML the launch files take (sections ``/**``, ``sal_segmenter``,
``sal_recorder``); unknown parameter names are an error here (a typo would otherwise be ignored).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from sal_ros.core.yamlfile import load_yaml, load_yaml_text

from sal_ros.env import apply_ros_env_defaults
from sal_ros.nodes import params as P
from sal_ros.tools.docs import parameter_tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, help="ROS 2 params YAML (e.g. config/segment.yaml)")
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="also run the recorder into this FrameStore directory")
    parser.add_argument("--no-segmenter", action="store_true", help="run only the recorder (needs --record)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override one parameter (YAML value), for every node that has it; repeatable")
    parser.add_argument("--use-sim-time", action="store_true", help="follow /clock (e.g. with sal-ros replay)")
    parser.add_argument("--allow-duplicate", action="store_true",
                        help="start the segmenter even when a node of its name runs already (parameter allow_duplicate)")
    parser.add_argument("--threads", type=int, default=None, help="executor threads (default: CPU count)")
    parser.add_argument("--localhost", action="store_true",
                        help="keep DDS on this machine: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, the shipped Fast DDS "
                             "profile and rmw_fastrtps_cpp where not set (default: the environment as it is)")
    parser.add_argument("--list-params", action="store_true", help="print every parameter as Markdown tables (as in docs/parameters.md)")
    parser.add_argument("--rviz-config", type=Path, metavar="OUT",
                        help="write the shipped RViz config with one overlay display per camera of --params and exit")


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``["name=value", ...]`` -> ``{name: YAML-parsed value}``."""
    out = {}
    for item in sets:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        out[name.strip()] = load_yaml_text(text, f"--set {name.strip()}")
    return out


def parameter_values(node_name: str, params_file: Path | None, sets: dict[str, Any], extra: dict[str, Any]) -> dict:
    """Flat parameter values of one node: params file (unknown names are an error), then the ``--set`` values
    the node has, then ``extra``."""
    values = P.load_params_file(params_file, node_name) if params_file else {}
    unknown = P.unknown_names(node_name, values)
    if unknown:
        raise ValueError(f"{params_file}: {node_name} has no parameter(s) {unknown}; see `sal-ros run --list-params`")
    values.update(sets)
    values.update(extra)
    ignored = set(P.unknown_names(node_name, values))
    return {k: v for k, v in values.items() if k not in ignored}


def node_overrides(args: argparse.Namespace) -> dict[str, list]:
    """Per node name, the rclpy parameter overrides for the nodes to start."""
    wanted = ([] if args.no_segmenter else [P.SEGMENTER_NODE]) + ([P.RECORDER_NODE] if args.record else [])
    if not wanted:
        raise ValueError("nothing to run: --no-segmenter needs --record DIR")
    sets = parse_sets(args.set)
    out, used = {}, set()
    for node_name in wanted:
        extra: dict[str, Any] = {"use_sim_time": True} if args.use_sim_time else {}
        if node_name == P.RECORDER_NODE:
            extra["output_dir"] = str(args.record)
        elif getattr(args, "allow_duplicate", False):
            extra["allow_duplicate"] = True
        values = parameter_values(node_name, args.params, sets, extra)
        used |= set(values)
        out[node_name] = P.overrides(node_name, values)
    unused = sorted(set(sets) - used)
    if unused:
        raise ValueError(f"--set: no node here has parameter(s) {unused}; see `sal-ros run --list-params`")
    return out


def make_nodes(overrides: dict[str, list]) -> list:
    """Construct the nodes (rclpy must be initialized); a node that fails to start takes the others down."""
    nodes = []
    try:
        for node_name, params in overrides.items():
            if node_name == P.SEGMENTER_NODE:  # node modules load rclpy (and torch): not for --list-params
                from sal_ros.nodes.segmenter import SegmenterNode

                nodes.append(SegmenterNode(parameter_overrides=params))
            else:
                from sal_ros.nodes.recorder import RecorderNode

                nodes.append(RecorderNode(parameter_overrides=params))
    except BaseException:
        for node in nodes:
            node.destroy_node()
        raise
    return nodes


def spin_until_shutdown(executor: Any) -> None:
    """``executor.spin()`` until the executor or its context shuts down, however the shutdown lands.

    rclpy checks the context only between waits: a Ctrl-C (rclpy's handler shuts the context down) that lands
    after that check makes the next wait-set construction raise RCLError ("the given context is not valid")
    instead of ExternalShutdownException. Likewise a spin thread that has not yet seen ``executor.shutdown()``
    when the teardown, which waits for it only briefly under load, destroys the nodes meets InvalidHandle
    ("destruction was requested"). Both are a shutdown, not an error."""
    from rclpy.executors import ExternalShutdownException, ShutdownException
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    try:
        executor.spin()
    except (ExternalShutdownException, ShutdownException):
        pass
    except (_rclpy.RCLError, _rclpy.InvalidHandle):
        if executor.context.ok() and not getattr(executor, "_is_shutdown", False):
            raise


SHUTDOWN_SIGNALS = ("SIGINT", "SIGTERM")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ignore_shutdown_signals() -> None:
    """From here on a further Ctrl-C (a terminal sends one to the whole process group; launch may send its own)
    cannot cut the teardown short. A KeyboardInterrupt already pending lands on this loop, which retries; once
    SIG_IGN is installed, a tripped-but-undelivered signal is dropped by Python."""
    while True:
        try:
            for name in SHUTDOWN_SIGNALS:
                signal.signal(getattr(signal, name), signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue


def _dds_environment() -> str:
    """The DDS settings this process runs with, as the user gave them (nothing here changes them)."""
    names = ("RMW_IMPLEMENTATION", "ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_DEFAULT_PROFILES_FILE")
    return ", ".join(f"{n}={os.environ.get(n, '<unset>')}" for n in names)


def _teardown(executor: Any, spinner: threading.Thread | None, nodes: list, stop_timeout_s: float) -> bool:
    """Ordered shutdown: no more callbacks (executor stopped, spin thread joined), then each node's worker told to
    stop (a frame in the model is not waited for past ``stop_timeout_s``), nodes destroyed, rclpy shut down.
    Returns True when every worker ended."""
    import rclpy

    executor.shutdown(timeout_sec=stop_timeout_s)
    if spinner is not None and spinner.ident is not None:  # a Ctrl-C may land between Thread() and start()
        spinner.join(stop_timeout_s)
    stopped = True
    for node in nodes:
        worker = getattr(node, "worker", None)
        if worker is not None:
            stopped &= worker.stop(timeout=stop_timeout_s)
    for node in nodes:
        node.destroy_node()
    rclpy.try_shutdown()
    return stopped


def _stuck_in(thread_id: int | None) -> str:
    """The innermost three calls of a thread, innermost first."""
    import traceback

    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "unknown"
    return " <- ".join(f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})"
                       for f in reversed(traceback.extract_stack(frame)[-3:]))


def _exit_later_without_gil(delay_s: float, rc: int) -> bool:
    """Ends the process with ``rc`` after ``delay_s`` even while the main thread holds the GIL inside C++ (a
    DDS entity destroy under load has held it for seconds; a Python timer thread cannot run then). A POSIX timer
    (SIGEV_THREAD) calls libc's ``_exit(rc)`` on a thread of its own: no Python runs there, so no GIL is needed.
    ``union sigval`` is passed like an int on x86-64 and aarch64, so the timer's value is the exit status.
    Returns False where the C library has no such timer; faulthandler's exit (status 1) is then the last resort."""
    import ctypes
    import ctypes.util

    class SigEvent(ctypes.Structure):  # struct sigevent on 64-bit Linux: 64 bytes
        _fields_ = [("value", ctypes.c_long), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                    ("function", ctypes.c_void_p), ("attribute", ctypes.c_void_p), ("pad", ctypes.c_int * 8)]

    class TimeSpec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8 or sys.byteorder != "little":
        return False
    sigev_thread, clock_monotonic = 2, 1
    for name in (None, ctypes.util.find_library("rt")):  # glibc >= 2.34 has timer_create in libc itself
        lib = ctypes.CDLL(name, use_errno=True)
        if hasattr(lib, "timer_create") and hasattr(lib, "_exit"):
            break
    else:
        return False
    event = SigEvent(value=rc, notify=sigev_thread, function=ctypes.cast(lib._exit, ctypes.c_void_p).value)
    timer = ctypes.c_void_p()
    if lib.timer_create(clock_monotonic, ctypes.byref(event), ctypes.byref(timer)) != 0:
        return False
    seconds = int(delay_s)
    when = (TimeSpec(0, 0), TimeSpec(seconds, int((delay_s - seconds) * 1e9)))  # it_interval, it_value
    return lib.timer_settime(timer, 0, ctypes.byref((TimeSpec * 2)(*when)), None) == 0


def arm_teardown_deadline(log: Any, deadline_s: float, rc: int) -> None:
    """The teardown after a shutdown signal ends within ``deadline_s``, whatever step hangs: launch escalates to
    SIGTERM 5 s after SIGINT and logs an error, and a user's Ctrl-C must not hang. Past the deadline a timer thread
    logs where the main thread is stuck and ends the process with ``rc``; writers are atomic, so nothing
    half-written is left. A step that holds the GIL (rclpy's destroy_node inside Fast DDS) blocks that thread:
    faulthandler prints every thread's stack 0.4 s later, and a POSIX timer ends the process with ``rc``
    a moment after (:func:`_exit_later_without_gil`)."""
    import faulthandler

    main = threading.main_thread().ident

    def abandon() -> None:
        log.warning(f"teardown not done {deadline_s:g} s after the shutdown signal, stuck in {_stuck_in(main)}; "
                    "ending the process without it")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)

    timer = threading.Timer(deadline_s, abandon)
    timer.daemon = True
    timer.start()
    exits_later = _exit_later_without_gil(deadline_s + 0.7, rc)
    faulthandler.dump_traceback_later(deadline_s + 0.4, exit=not exits_later)


def start_and_spin(make_nodes_now, logger_name: str, num_threads: int | None = None,
                   stop_timeout_s: float = 1.5, teardown_deadline_s: float = 4.0) -> NoReturn:
    """Build the nodes (rclpy initialized without its signal handlers) and spin them on one
    MultiThreadedExecutor in a background thread until SIGINT / SIGTERM or an external shutdown.

    A node that cannot start ends the process with 1 and the reason; Ctrl-C at any moment, model loading and a
    frame in the model included, ends it quietly with 0 within about ``stop_timeout_s`` (launch escalates to
    SIGTERM 5 s after SIGINT), and within ``teardown_deadline_s`` whatever hangs (:func:`arm_teardown_deadline`).
    The signals raise KeyboardInterrupt in the main thread, which only waits: rclpy's
    own handler would shut the context down under running callbacks and raise KeyboardInterrupt wherever the main
    thread happened to be (in destroy_node, say). A worker still inside the model when the rest is torn down is
    not joined. The process always ends here with os._exit(exit code) after the ordered teardown, so that
    interpreter finalization never runs (C++ static destructors racing a torch op or a joinable thread)."""

    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    for name in SHUTDOWN_SIGNALS:
        signal.signal(getattr(signal, name), _raise_interrupt)
    rc, nodes, spinner, executor = 0, [], None, None
    log = rclpy.logging.get_logger(logger_name)
    try:
        executor = MultiThreadedExecutor(num_threads=num_threads)
        log.info(f"DDS environment: {_dds_environment()}")
        try:
            nodes = make_nodes_now()
        except Exception as exc:  # noqa: BLE001 - configuration errors end the process with the reason
            log.fatal(f"cannot start: {exc}")
            rc = 1
        else:
            for node in nodes:
                executor.add_node(node)
            spinner = threading.Thread(target=spin_until_shutdown, args=(executor,), name="sal_spin", daemon=True)
            spinner.start()
            while spinner.is_alive():  # an external shutdown (the context) also ends the spin
                spinner.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _ignore_shutdown_signals()
        arm_teardown_deadline(log, teardown_deadline_s, rc)
        stopped = True
        if executor is not None:
            stopped = _teardown(executor, spinner, nodes, stop_timeout_s)
        rclpy.try_shutdown()
    stray = [t for t in threading.enumerate() if t.daemon and t.is_alive() and t.name.startswith("sal_")]
    if not stopped or stray:  # e.g. Ctrl-C while a node was loading its model on its worker thread
        log.info("stopped while a frame was in the model; not waiting for it")
    # Everything that matters is done (workers stopped or abandoned, files written atomically, nodes destroyed,
    # rclpy shut down). Interpreter finalization would now run C++ static destructors of rclpy / Fast DDS / torch
    # in an unspecified order; a joinable thread met there aborts the process ("terminate called without an
    # active exception", exit -6: seen in about 1 of 10 Ctrl-C'd recorders). A node process ends here instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def ros_node_main(node_class, name: str, argv: list[str] | None) -> int:
    """``ros2 run sal_ros <node>`` / ``ros2 launch``: parameters from --ros-args. The DDS environment (RMW,
    discovery range, Fast DDS profile) is the user's: a robot's lidar driver on another host must stay visible."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    try:
        rclpy.init(args=sys.argv if argv is None else argv, signal_handler_options=SignalHandlerOptions.NO)
    except KeyboardInterrupt:
        return 0
    return start_and_spin(lambda: [node_class()], name)


def segmenter_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ros2 run sal_ros segmenter`` (parameters from --ros-args)."""
    from sal_ros.nodes.segmenter import SegmenterNode  # rclpy and torch load only for this command

    return ros_node_main(SegmenterNode, P.SEGMENTER_NODE, argv)


def recorder_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ros2 run sal_ros recorder`` (parameters from --ros-args)."""
    from sal_ros.nodes.recorder import RecorderNode  # rclpy loads only for this command

    return ros_node_main(RecorderNode, P.RECORDER_NODE, argv)


def segmenter_managed_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ros2 run sal_ros segmenter_managed``: the lifecycle segmenter, unconfigured at start."""
    from sal_ros.nodes.base import managed
    from sal_ros.nodes.segmenter import SegmenterNode

    return ros_node_main(managed(SegmenterNode), P.SEGMENTER_NODE, argv)


def recorder_managed_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ros2 run sal_ros recorder_managed``: the lifecycle recorder, unconfigured at start."""
    from sal_ros.nodes.base import managed
    from sal_ros.nodes.recorder import RecorderNode

    return ros_node_main(managed(RecorderNode), P.RECORDER_NODE, argv)


def overlay_display(camera: str) -> dict[str, Any]:
    """An RViz Image display of the segmenter's ``~/overlay/<camera>``, with the outputs' QoS."""
    return {"Class": "rviz_default_plugins/Image", "Enabled": True, "Max Value": 1, "Median window": 5,
            "Min Value": 0, "Name": f"overlay {camera}", "Normalize Range": True, "Value": True,
            "Topic": {"Depth": 1, "Durability Policy": "Volatile", "History Policy": "Keep Last",
                      "Reliability Policy": "Reliable", "Value": f"/{P.SEGMENTER_NODE}/overlay/{camera}"}}


def rviz_config(cameras: list[str]) -> str:
    """config/sal_ros.rviz (cloud, label view, markers: the same for every robot) plus the overlay of each of
    ``cameras``: the camera names are the robot's, so the shipped file cannot name them."""
    from sal_ros.env import config_file

    import yaml

    config = load_yaml(config_file("sal_ros.rviz"), "RViz config")
    config["Visualization Manager"]["Displays"] += [overlay_display(name) for name in cameras]
    return yaml.safe_dump(config, sort_keys=False)


def write_rviz_config(args: argparse.Namespace) -> int:
    from sal_ros.core.files import atomic_write

    try:
        values = parameter_values(P.SEGMENTER_NODE, args.params, parse_sets(args.set), {})
    except ValueError as exc:
        print(f"sal-ros run: {exc}", file=sys.stderr)
        return 1
    cameras = [str(c) for c in values.get("cameras") or []]
    atomic_write(args.rviz_config, rviz_config(cameras))
    print(f"{args.rviz_config}: overlays of {cameras or 'no cameras'}; rviz2 -d {args.rviz_config}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.list_params:
        print(parameter_tables(), end="")  # the tables of docs/parameters.md
        return 0
    if args.rviz_config:
        return write_rviz_config(args)
    try:
        overrides = node_overrides(args)
    except ValueError as exc:
        print(f"sal-ros run: {exc}", file=sys.stderr)
        return 1
    if args.localhost:
        apply_ros_env_defaults()
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    return start_and_spin(lambda: make_nodes(overrides), "sal_ros", args.threads)
