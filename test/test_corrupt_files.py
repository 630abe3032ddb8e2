"""A corrupt or missing camera image in a dataset: `sal-ros convert` and `sal-ros eval pseudolabels` name the
frame and the reason, count it and say so in their exit status, instead of a traceback or a silent success
(issue 14 item 6). The dataset is a folder of links to the real sequence with one image replaced."""
import json
import os

import pytest

from conftest import require_data

from sal_ros.cli import main as cli_main


@pytest.fixture(params=["corrupt", "missing"])
def broken_sequence(tmp_path, request):
    real = require_data("semantickitti", "sequences", "00")
    seq = tmp_path / "seq"
    seq.mkdir()
    for entry in real.iterdir():
        if entry.name != "image_0":
            os.symlink(entry, seq / entry.name)
    (seq / "image_0").mkdir()
    os.symlink(real / "image_0" / "000000.png", seq / "image_0" / "000000.png")
    if request.param == "corrupt":  # a PNG signature and then garbage, as a half-copied file
        (seq / "image_0" / "000001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    return seq, request.param


def test_convert_names_and_counts_a_frame_without_its_image(broken_sequence, tmp_path, capsys):
    seq, kind = broken_sequence
    assert cli_main(["convert", str(seq), str(tmp_path / "bag")]) == 3
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "2 frames" in out and "1 with a camera left out" in out
    reason = "cannot read image" if kind == "corrupt" else "not found"
    assert f"frame seq_000001: camera image_0 left out: " in err and reason in err and "000001.png" in err
    assert "seq_000000" not in err
    assert (tmp_path / "bag" / "metadata.yaml").is_file()


def test_eval_pseudolabels_scores_only_complete_frames_and_says_which_not(broken_sequence, tmp_path, capsys):
    seq, kind = broken_sequence
    out = tmp_path / "eval"
    rc = cli_main(["eval", "pseudolabels", str(seq), "--masks", "oracle", "--variants", "naive", "--no-progress",
                   "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 3, err
    assert "frame seq_000001 not scored: camera image_0 left out" in err and "1 frame(s) not scored, 1 scored" in err
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert meta["frames"] == 1 and list(meta["frames_skipped"]) == ["seq_000001"]
