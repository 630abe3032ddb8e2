"""QoS profiles of the sal_ros nodes.

Inputs default to the sensor-data profile (best effort, keep last, volatile): a best-effort subscription
matches both best-effort and reliable publishers, while a reliable one never matches a best-effort driver
(silently). Outputs default to reliable keep-last-1, which reaches RViz (reliable by default) and best-effort
subscribers alike. The vocabulary topic is transient-local so late joiners (and bag recorders) get it.
"""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

_RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}


def profile(reliability: str, depth: int) -> QoSProfile:
    """Keep-last, volatile profile with the given reliability ("best_effort" or "reliable") and depth."""
    if reliability not in _RELIABILITY:
        raise ValueError(f"QoS reliability must be one of {sorted(_RELIABILITY)}, got {reliability!r}")
    if int(depth) < 1:
        raise ValueError(f"QoS depth must be >= 1, got {depth}")
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=int(depth),
        reliability=_RELIABILITY[reliability],
        durability=DurabilityPolicy.VOLATILE,
    )


def input_profile(params: dict, stream: str) -> QoSProfile:
    """Subscription profile of one input stream ("cloud", "images", "camera_info") from ``qos.<stream>.*``."""
    return profile(params[f"qos.{stream}.reliability"], params[f"qos.{stream}.depth"])


def latched() -> QoSProfile:
    """Reliable, transient-local, depth 1: the last message reaches subscribers that join later."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=1,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )


def describe(qos: QoSProfile) -> str:
    return f"{qos.reliability.name.lower()}/depth {qos.depth}"
