"""A robot's TF publishers, as a process of its own: tf2_ros broadcasters for static transforms on /tf_static and a
moving odom -> base_link on /tf (20 Hz, stamped with the current time: x = 1 m/s * t, yaw = 0.1 rad/s * t, t from
the spec's "t0_ns").

    python tf_broadcaster.py '{"static": [[parent, child, T4x4], ...], "moving": true, "t0_ns": 0,
                               "later": [[parent, child, T4x4], ...]}'

Prints "ready" once everything has been sent once; runs until SIGINT or SIGTERM. A line "send N" on stdin sends
"later" transform N (with the static ones and the later ones sent before) on /tf_static and prints "sent": the
process and its DDS discovery are up beforehand, so a test can time a late transform without a process start."""
import json
import signal
import sys
import threading

import numpy as np
import rclpy
from geometry_msgs.msg import TransformStamped
from rclpy.signals import SignalHandlerOptions
from tf2_ros import StaticTransformBroadcaster, TransformBroadcaster

from sal_ros.core.transforms import make_transform, matrix_to_transform_fields, quaternion_to_matrix



def odom_T_base(stamp_ns: int, t0_ns: int) -> np.ndarray:
    t = (stamp_ns - t0_ns) / 1e9
    yaw = 0.1 * t
    return make_transform(quaternion_to_matrix([0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2)]), [1.0 * t, 0.0, 0.0])


def stamped(parent: str, child: str, T, stamp_ns: int) -> TransformStamped:
    (x, y, z), (qx, qy, qz, qw) = matrix_to_transform_fields(np.asarray(T, np.float64))
    msg = TransformStamped()
    msg.header.frame_id, msg.child_frame_id = parent, child
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    t, r = msg.transform.translation, msg.transform.rotation
    t.x, t.y, t.z, r.x, r.y, r.z, r.w = x, y, z, qx, qy, qz, qw
    return msg


def main() -> None:
    spec = json.loads(sys.argv[1])
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("sal_test_tf_broadcaster")
    now = node.get_clock().now().nanoseconds
    static = StaticTransformBroadcaster(node) if spec.get("static") or spec.get("later") else None
    if spec.get("static"):
        static.sendTransform([stamped(p, c, T, now) for p, c, T in spec["static"]])
    moving = TransformBroadcaster(node) if spec.get("moving") else None
    commands: list[str] = []
    sent: set[int] = set()
    threading.Thread(target=lambda: commands.extend(line.strip() for line in sys.stdin), daemon=True).start()
    print("ready", flush=True)
    while not stop:
        while commands:
            sent.add(int(commands.pop(0).split()[1]))
            # the latched message holds every static transform sent so far (a late joiner gets only the last one)
            later = spec.get("static", []) + [spec["later"][i] for i in sorted(sent)]
            static.sendTransform([stamped(p, c, T, node.get_clock().now().nanoseconds) for p, c, T in later])
            print("sent", flush=True)
        if moving is not None:
            stamp = node.get_clock().now().nanoseconds
            moving.sendTransform(stamped("odom", "base_link", odom_T_base(stamp, spec["t0_ns"]), stamp))
        rclpy.spin_once(node, timeout_sec=0.05)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()
