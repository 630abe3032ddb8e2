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


def test_overwrite_refuses_an_output_that_a_link_in_the_dataset_points_to(tmp_path, capsys):
    """Issue 24 item 2: velodyne/ is a link to OUT, so OUT holds the scans (here links to the real ones)."""
    real = require_data("semantickitti", "sequences", "00")
    out = tmp_path / "out"
    out.mkdir()
    for scan in (real / "velodyne").iterdir():
        os.symlink(scan, out / scan.name)
    seq = tmp_path / "data" / "sequences" / "00"
    seq.mkdir(parents=True)
    for entry in real.iterdir():
        os.symlink(out if entry.name == "velodyne" else entry, seq / entry.name)
    scans = sorted(p.name for p in out.iterdir())
    assert cli_main(["convert", str(seq), str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "overlaps the input dataset" in err and "velodyne" in err, err
    assert sorted(p.name for p in out.iterdir()) == scans  # the scans are still there


@pytest.mark.parametrize("what", ["folder", "file", "bag with extras"])
def test_overwrite_replaces_only_a_bag_convert_wrote(linked_sequence, tmp_path, what, capsys):
    out = tmp_path / "out"
    if what == "file":
        out.write_text("notes\n")
    else:
        assert cli_main(["convert", str(linked_sequence), str(out), "--max-frames", "1"]) == 0
        if what == "folder":
            for p in out.iterdir():
                p.unlink()
            (out / "thesis.tex").write_text("months of work\n")
        else:
            (out / "notes.txt").write_text("mine\n")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()
    capsys.readouterr()
    assert cli_main(["convert", str(linked_sequence), str(out), "--overwrite", "--max-frames", "1"]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "nothing deleted" in err or "not a bag folder" in err, err
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()) == before


def test_overwrite_replaces_a_bag_convert_wrote(linked_sequence, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["convert", str(linked_sequence), str(out), "--max-frames", "1"]) == 0
    assert cli_main(["convert", str(linked_sequence), str(out), "--overwrite", "--max-frames", "2"]) == 0
    from sal_ros.data.sources import iter_source_frames

    assert len(list(iter_source_frames(out))) == 2
