"""Files handed to sal_ros (issue 24): a FIFO, a device or a folder is refused before it is opened, files have a
size bound, and YAML goes through one loader with an expanded-node budget, so an alias bomb is a one-line error
naming the file wherever configs are read (params file, calibration, train / pretrain config, vocabulary)."""
import errno
import os
import threading
import time

import pytest


def anchors(levels: int, width: int, indent: str) -> str:
    """``width ** levels`` strings behind ``levels`` anchored lists ``l0`` .. ``l<levels-1>``."""
    lines = [f"{indent}l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"{indent}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The classic "billion laughs" as a ROS 2 params file: 9 x 9 is 564 bytes for 9^9 = 387M leaves (the issue's
    bombs: a 956-byte params file, a 564-byte calibration file)."""
    return "/**:\n  ros__parameters:\n" + anchors(levels, width, "    ")


# A bomb old code still loads in a second (3^12 = 531k leaves), so these tests fail there by returning, not by
# eating memory; new code refuses it like the big one.
SMALL_BOMB = dict(levels=12, width=3)


def refused_without_opening(fn, fifo):
    """Run ``fn()`` in a thread; fail if it opens ``fifo`` (a writer can connect only while a reader has it open),
    else return what it raised. Waits on the call's end, not on a clock."""
    box = {}

    def call():
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            time.sleep(0.005)
            continue
        os.close(fd)  # unblocks the reader (end of file)
        thread.join()
        pytest.fail("the FIFO was opened (a reader blocks on it until a writer comes)")
    assert "error" in box, f"returned {box.get('result')!r} instead of refusing"
    return box["error"]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "vocab.yaml"
    os.mkfifo(path)
    return path


def test_non_regular_files_are_refused_before_open(tmp_path, fifo):
    from sal_ros.core.files import FileRefusedError, check_regular_file, read_regular_file

    error = refused_without_opening(lambda: read_regular_file(fifo), fifo)
    assert isinstance(error, FileRefusedError) and error.reason == "not_regular_file"
    assert str(fifo) in str(error) and "FIFO" in str(error)
    with pytest.raises(FileRefusedError, match="folder") as info:
        check_regular_file(tmp_path)
    assert info.value.reason == "not_regular_file"
    with pytest.raises(FileRefusedError, match="device"):
        read_regular_file("/dev/zero")  # would never end
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * 1001)
    with pytest.raises(FileRefusedError, match="1001 bytes") as info:
        read_regular_file(big, max_bytes=1000)
    assert info.value.reason == "file_too_large"
    assert read_regular_file(big, max_bytes=1001) == b"#" * 1001
    link = tmp_path / "link.yaml"
    link.symlink_to(big)  # a link to a regular file is that file
    assert len(read_regular_file(link)) == 1001


def test_config_readers_refuse_a_fifo_without_blocking(tmp_path, fifo):
    from sal_ros.core.calibration import read_static_extrinsics
    from sal_ros.core.params_file import load_params_file
    from sal_ros.model.vocabulary import Vocabulary
    from sal_ros.train.trainer import TrainConfig

    for read in (lambda: load_params_file(fifo, "sal_segmenter"), lambda: read_static_extrinsics(fifo),
                 lambda: Vocabulary.from_yaml(fifo), lambda: TrainConfig.from_yaml(fifo)):
        error = refused_without_opening(read, fifo)
        assert isinstance(error, ValueError) and "not a regular file" in str(error) and str(fifo) in str(error)


def test_yaml_budget_counts_aliases_and_allows_ordinary_ones():
    from sal_ros.core.yamlfile import YamlBudgetError, load_yaml_text

    assert load_yaml_text("a: &x [1, 2]\nb: *x\nc: {<<: {q: 1}, r: 2}") == {"a": [1, 2], "b": [1, 2],
                                                                           "c": {"q": 1, "r": 2}}
    with pytest.raises(YamlBudgetError, match="more than 100 nodes") as info:
        load_yaml_text("a: &x [" + ", ".join(["1"] * 30) + "]\nb: [*x, *x, *x, *x]", max_nodes=100)
    assert info.value.reason == "yaml_node_budget"
    with pytest.raises(YamlBudgetError) as info:
        load_yaml_text("a: &x [1, *x]")  # a list that holds itself
    assert info.value.reason == "yaml_recursive_alias"
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml_text("a: [1, 2")


def test_a_sub_kilobyte_alias_bomb_is_refused(tmp_path):
    from sal_ros.core.yamlfile import YamlBudgetError, load_yaml

    bomb = alias_bomb()
    assert len(bomb) < 1000
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(YamlBudgetError, match="alias") as info:
        load_yaml(tmp_path / "bomb.yaml", "params file")
    assert str(tmp_path / "bomb.yaml") in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("reader", ["params", "calibration", "train", "pretrain", "vocabulary"])
def test_every_config_reader_refuses_an_alias_bomb(tmp_path, reader):
    from sal_ros.core.calibration import read_static_extrinsics
    from sal_ros.core.params_file import load_params_file
    from sal_ros.model.vocabulary import Vocabulary
    from sal_ros.pretrain.trainer import PretrainConfig
    from sal_ros.train.trainer import TrainConfig

    top = anchors(**SMALL_BOMB, indent="  ")
    text = {"params": alias_bomb(**SMALL_BOMB),
            "calibration": f"anchors:\n{top}cameras: [*l11]\n",
            "vocabulary": f"anchors:\n{top}classes: [*l11]\n",
            "train": f"model:\n{anchors(**SMALL_BOMB, indent='  ')}",
            "pretrain": f"model:\n{anchors(**SMALL_BOMB, indent='  ')}"}[reader]
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    read = {"params": lambda: load_params_file(path, "sal_segmenter"),
            "calibration": lambda: read_static_extrinsics(path), "vocabulary": lambda: Vocabulary.from_yaml(path),
            "train": lambda: TrainConfig.from_yaml(path), "pretrain": lambda: PretrainConfig.from_yaml(path)}[reader]
    with pytest.raises(ValueError, match="aliases expanded") as info:
        read()
    assert str(path) in str(info.value) and len(str(info.value)) < 400
