"""Each test run uses its own ROS domain: claimed in conftest (a lock per domain, skipping domains a running DDS
participant uses), inherited by every node and subprocess, never a number written in a test."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, require_rclpy

from sal_ros.env import claim_free_ros_domain, ros_domain_in_use


def _claim_in_subprocess(domain: int) -> subprocess.CompletedProcess:
    code = ("import sys; from sal_ros.env import claim_free_ros_domain\n"
            f"try: print(claim_free_ros_domain([{domain}]).domain_id)\n"
            "except RuntimeError as e: print(e); sys.exit(3)")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_the_session_domain_is_held_against_other_runs():
    domain = int(os.environ["ROS_DOMAIN_ID"])
    other = _claim_in_subprocess(domain)  # what a second test run on this machine would try
    assert other.returncode == 3, f"a second run could take domain {domain}: {other.stdout}{other.stderr}"
    assert "no free ROS domain" in other.stdout


def test_a_released_claim_is_free_again_and_two_claims_differ(tmp_path):
    first = claim_free_ros_domain(range(90, 93), lock_dir=tmp_path)
    second = claim_free_ros_domain(range(90, 93), lock_dir=tmp_path)
    assert first.domain_id != second.domain_id
    first.release()
    assert claim_free_ros_domain([first.domain_id], lock_dir=tmp_path).domain_id == first.domain_id


def test_a_domain_with_a_running_participant_is_skipped(tmp_path):
    rclpy = require_rclpy()
    # Two domains no other run holds; a participant of this process then lives in the first one.
    used, spare = claim_free_ros_domain(), claim_free_ros_domain()
    assert not ros_domain_in_use(used.domain_id)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=used.domain_id)
    node = rclpy.create_node("sal_domain_probe", context=context)
    try:
        assert ros_domain_in_use(used.domain_id)
        # A fresh lock directory (a foreign stack takes no lock): the port probe alone must see it.
        got = claim_free_ros_domain([used.domain_id, spare.domain_id], lock_dir=tmp_path)
        assert got.domain_id == spare.domain_id
        with pytest.raises(RuntimeError, match="no free ROS domain"):
            claim_free_ros_domain([used.domain_id], lock_dir=tmp_path / "other")
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        used.release()
        spare.release()


def test_no_test_hard_codes_a_domain():
    # a literal domain in rclpy.init(domain_id=...), a ROS_DOMAIN_ID=... env or a DOMAIN_ID constant
    literal = re.compile(r"domain_id\s*=\s*\d|ROS_DOMAIN_ID\s*[=:,]\s*[\"']?\d|^DOMAIN_ID\s*=", re.M)
    offenders = [f"{path.name}: {m.group(0)}" for path in sorted((REPO / "test").glob("*.py"))
                 if path.name != "test_ros_domain.py" for m in literal.finditer(path.read_text())]
    assert not offenders, offenders
