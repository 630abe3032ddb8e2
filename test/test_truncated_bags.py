"""Bags with a truncated tail (issue 24 item 12: a recorder killed, a copy cut short): every reader salvages the
complete messages before the cut, says how many and names the file, and the commands finish (replay, eval model
--bag, pseudolabel) instead of "File end magic is invalid" or a traceback."""
import logging
import os
import shutil
import subprocess
import sys

import pytest

from conftest import require_data, require_rclpy, save_tiny_checkpoint

from sal_ros.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """The real sequence as a bag, and two copies cut short: one lost only its summary and footer, the other
    the second half of its data too."""
    from sal_ros.data.convert import convert

    root = tmp_path_factory.mktemp("truncated")
    whole = root / "whole"
    convert(require_data("semantickitti", "sequences", "00"), whole, progress=False)
    out = {"whole": whole}
    for name, keep in (("summary_lost", None), ("half_lost", 0.5)):
        shutil.copytree(whole, root / name)
        mcap = next((root / name).glob("*.mcap"))
        data = mcap.read_bytes()
        mcap.write_bytes(data[:-200] if keep is None else data[:int(len(data) * keep)])
        out[name] = root / name
    return out


def test_the_bag_reader_salvages_every_complete_message_and_says_so(bags, caplog):
    from sal_ros.data.bag import iter_bag_frames

    whole = [(f.key, sorted(f.cameras)) for f in iter_bag_frames(bags["whole"])]
    assert len(whole) == 2
    with caplog.at_level(logging.WARNING, logger="sal_ros.data.bag"):
        assert [(f.key, sorted(f.cameras)) for f in iter_bag_frames(bags["summary_lost"])] == whole
        half = list(iter_bag_frames(bags["half_lost"]))
    assert 1 <= len(half) < 2 and half[0].key == whole[0][0]
    warnings = [r.getMessage() for r in caplog.records]
    mcap = str(next(bags["half_lost"].glob("*.mcap")))
    assert any(mcap in w and "truncated" in w and "complete messages" in w and "bytes after it are lost" in w
               for w in warnings), warnings


def test_eval_model_and_pseudolabel_finish_on_a_truncated_bag(bags, tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    rc = cli_main(["eval", "model", "--checkpoint", str(ckpt), "--vocabulary",
                   os.path.join(REPO, "config", "vocabulary_semantickitti.yaml"), "--bag", str(bags["half_lost"]),
                   "--out", str(tmp_path / "eval"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "report.md").is_file()
    rc = cli_main(["pseudolabel", str(bags["summary_lost"]), "--out", str(tmp_path / "pl"), "--masks", "slic",
                   "--no-tokens", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert len(list((tmp_path / "pl").glob("*.npz"))) == 2


def test_replay_plays_what_a_truncated_bag_holds(bags):
    require_rclpy()
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", RCUTILS_COLORIZED_OUTPUT="0")
    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "replay", str(bags["half_lost"]), "--rate", "4",
                           "--start-paused-s", "0.1", "--wait-for-subscribers-s", "0.1", "--no-clock"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "truncated" in proc.stderr and str(bags["half_lost"]) in proc.stderr and "published" in proc.stderr
