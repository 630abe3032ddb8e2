"""The package as colcon installs it, and the real ROS 2 tools run against that install (`ros2 launch`, `ros2 param`,
`ros2 run`) as processes of their own: shared by the launch, parameter and TF tests.

colcon comes from `.colcon-venv` (made by `make setup`; never in .venv, it pins setuptools<80). Each test module
builds the current sources into its own temporary install (about 2 s), so a test never runs a stale install. The
environment is what a shell gets from `. shared/ros2/env.sh .venv && . install/setup.sh` (colcon's prefix first),
plus the test session's DDS settings (loopback, private domain, shipped Fast DDS profile)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, wait_until

VENV = Path(sys.executable).parent.parent  # the venv the tests run in (the project's .venv)
COLCON_VENV = REPO / ".colcon-venv"
# What must be absent from the output of a clean run and its shutdown.
UNCLEAN = ("Traceback", "failed to terminate", "never retrieved", "Destroyable", "escalating to", "[ERROR]",
           "[FATAL]", "exit code -", "has died")


def bundle_env() -> dict[str, str]:
    """This process's environment with the venv's `ros2` on PATH and its ament index on AMENT_PREFIX_PATH."""
    env = dict(os.environ, RCUTILS_COLORIZED_OUTPUT="0", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV / 'bin'}:{env.get('PATH', '')}"
    prefixes = [p for p in env.get("AMENT_PREFIX_PATH", "").split(":") if p]
    env["AMENT_PREFIX_PATH"] = ":".join(prefixes + ([str(VENV)] if str(VENV) not in prefixes else []))
    return env


def colcon_install(dest: Path) -> dict[str, str]:
    """`colcon build` of this package into ``dest/install``; returns the environment with it sourced."""
    colcon = COLCON_VENV / "bin" / "colcon"
    if not colcon.is_file():
        pytest.fail(f"{colcon} is missing: run `make setup` (it makes .colcon-venv from requirements-colcon.txt)")
    site = next((COLCON_VENV / "lib").glob("python3*/site-packages"))
    env = bundle_env()
    build = subprocess.run(
        [sys.executable, str(colcon), "--log-base", str(dest / "log"), "build", "--base-paths", str(REPO),
         "--packages-select", "sal_ros", "--build-base", str(dest / "build"), "--install-base", str(dest / "install")],
        cwd=dest, env=dict(env, PYTHONPATH=str(site)), capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    sourced = subprocess.run(["bash", "-c", f"set +u; . '{dest}/install/setup.sh' && env -0"], env=env,
                             capture_output=True, check=True).stdout
    return dict(item.split("=", 1) for item in sourced.decode().split("\0") if "=" in item)


class GroupProcess:
    """A command in a process group of its own (as a terminal runs it), output to a log file. ``interrupt`` is a
    terminal's Ctrl-C: SIGINT to every process of the group at once."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> None:
        self.cmd, self.log_path = cmd, log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd or log_path.parent, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.cmd[:3]} exited ({self.proc.returncode}):\n{self.log()[-4000:]}")

    def wait_log(self, text: str, what: str) -> None:
        wait_until(lambda: text in self.log(), what, progress=lambda: len(self.log()), check=self.check_alive)

    def interrupt(self) -> int:
        """Ctrl-C to the group; waits for the leader while anything in the log still moves."""
        os.killpg(self.proc.pid, signal.SIGINT)
        wait_until(lambda: self.proc.poll() is not None, "the process group to end after SIGINT",
                   progress=lambda: len(self.log()), stall_s=30)
        return self.close()

    def close(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        _wait_group_gone(self.proc.pid)
        return self.proc.returncode


def _wait_group_gone(pgid: int) -> None:
    """Every process of the group has ended (the nodes may outlive launch's exit by a moment)."""
    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    deadline = time.monotonic() + 30
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not gone():
        os.killpg(pgid, signal.SIGKILL)
        raise AssertionError(f"processes of group {pgid} outlived their launch")


# The `ros2 launch` process's own Python (not a node) can take the terminal's SIGINT inside a weakref callback of
# the standard library before launch's handler runs; Python prints that as an ignored KeyboardInterrupt with a
# traceback through _weakrefset.py only (seen once in ~40 launches). That is upstream launch, not sal_ros: it is
# left out, and only that exact shape (an unprefixed traceback whose frames are all in _weakrefset.py).
def _without_launch_weakref_interrupt(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        block = [line.strip() for line in lines[i:i + 5]]
        if (len(block) == 5 and block[0] == "Traceback (most recent call last):" and "_weakrefset.py" in block[1]
                and block[2].startswith("def _remove(") and block[3] == "" and block[4].startswith("KeyboardInterrupt")):
            i += 5
            continue
        out.append(lines[i])
        i += 1
    return out


def unclean_lines(log: str) -> list[str]:
    lines = _without_launch_weakref_interrupt(log.splitlines())
    return [line for line in lines if any(bad in line for bad in UNCLEAN)]
