"""Process environment for ROS 2: keep DDS discovery on this machine and use the shipped Fast DDS profile.

Must run before rclpy is imported (the RMW reads these at init).
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
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


# Domains whose RTPS ports (7400 + 250 * id ...) stay below Linux's ephemeral range (32768+), minus the low ones
# robot stacks and people pick by hand (0 is the default, 42 the demo's).
FREE_DOMAIN_RANGE = range(50, 102)
DOMAIN_LOCK_DIR_ENV = "SAL_ROS_DOMAIN_LOCK_DIR"


def domain_participants(domain_id: int, participants: int = 8) -> int:
    """How many DDS participants of this domain run on this machine, from any program or RMW, among the first
    ``participants`` ids: those whose unicast metatraffic port (RTPS well-known port 7410 + 250 * domain + 2 * id)
    is bound. Binding sends nothing."""
    base = 7410 + 250 * domain_id
    bound = 0
    for participant in range(participants):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", base + 2 * participant))
            except OSError:
                bound += 1
    return bound


def ros_domain_in_use(domain_id: int, participants: int = 8) -> bool:
    """Whether a DDS participant of this domain runs on this machine (:func:`domain_participants`)."""
    return domain_participants(domain_id, participants) > 0


class DomainClaim:
    """A ROS domain held for this process: an flock on its lock file, released by release() or at exit."""

    def __init__(self, domain_id: int, fd: int, path: Path):
        self.domain_id, self._fd, self.path = domain_id, fd, path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _domain_lock_dir(lock_dir: str | Path | None) -> Path:
    path = Path(lock_dir or os.environ.get(DOMAIN_LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "sal_ros-ros-domains")
    path.mkdir(parents=True, exist_ok=True)
    try:  # shared by every user of the machine, like /tmp itself
        path.chmod(0o1777)
    except OSError:
        pass
    return path


def claim_free_ros_domain(candidates=FREE_DOMAIN_RANGE, lock_dir: str | Path | None = None) -> DomainClaim:
    """The first domain in `candidates` that no other claimant holds (an flock per domain under `lock_dir`, held
    until release or exit) and no running DDS participant uses, so two test runs, benches or a robot stack on one
    machine never meet."""
    directory = _domain_lock_dir(lock_dir)
    for domain_id in candidates:
        path = directory / f"domain-{domain_id}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # another user's file we may not open: theirs
            continue
        try:  # other users' runs lock it too (the umask took write permission away)
            os.fchmod(fd, 0o666)
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if ros_domain_in_use(domain_id):
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
        return DomainClaim(domain_id, fd, path)
    raise RuntimeError(f"no free ROS domain among {list(candidates)}: every one is held by another "
                       f"run (locks in {directory}) or used by a running DDS participant")
