"""`sal-ros convert` never writes over its own input (issue 14 item 3). The input here is a folder of links to
the real sequence's files, so nothing under ../shared/data can be touched even by the old code."""
import os

import pytest

from conftest import require_data

from sal_ros.cli import main as cli_main


@pytest.fixture
def linked_sequence(tmp_path):
    real = require_data("semantickitti", "sequences", "00")
    seq = tmp_path / "data" / "sequences" / "00"
    seq.mkdir(parents=True)
    for entry in real.iterdir():
        os.symlink(entry, seq / entry.name)
    return seq


@pytest.mark.parametrize("where", ["same", "inside", "around", "same via link"])
def test_convert_refuses_an_output_that_is_contains_or_lies_in_the_input(linked_sequence, where, capsys):
    seq = linked_sequence
    if where == "same via link":
        os.symlink(seq, seq.parent / "alias")
    out = {"same": seq, "inside": seq / "bag", "around": seq.parent.parent,
           "same via link": seq.parent / "alias"}[where]
    before = sorted(p.name for p in seq.iterdir())
    assert cli_main(["convert", str(seq), str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "overlaps the input dataset" in err, err
    assert sorted(p.name for p in seq.iterdir()) == before  # the input is intact
    assert (seq / "calib.txt").is_file()


def test_convert_beside_the_input_still_works(linked_sequence, tmp_path):
    out = tmp_path / "bag"
    assert cli_main(["convert", str(linked_sequence), str(out), "--max-frames", "1"]) == 0
    assert (out / "metadata.yaml").is_file()
