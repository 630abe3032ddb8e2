"""Process environment for ROS 2: keep DDS discovery on this machine and use the shipped Fast DDS profile.

Must run before rclpy is imported (the RMW reads these at init).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def config_file(name: str) -> Path | None:
    """A file shipped in config/: the source tree's, or an installed share/sal_ros/config one."""
    candidates = [PACKAGE_DIR.parent / "config" / name]
    try:  # installed with colcon/ament
        from ament_index_python.packages import get_package_share_directory  # type: ignore

        candidates.append(Path(get_package_share_directory("sal_ros")) / "config" / name)
    except Exception:
        pass
    return next((p for p in candidates if p.is_file()), None)


def fastdds_profile_path() -> Path | None:
    """The shipped Fast DDS profile (config/fastdds.xml)."""
    return config_file("fastdds.xml")


def apply_ros_env_defaults(domain_id: int | None = None) -> None:
    """Set localhost-only discovery and the Fast DDS profile unless the user already chose otherwise."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if domain_id is not None:
        os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    profile = fastdds_profile_path()
    if profile is not None:
        os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(profile))
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
