"""sal_ros.core.files: the one atomic writer (content, permissions, failures, torch.save through it)."""
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from sal_ros.core.files import TMP_PREFIX, atomic_open, atomic_write, remove_temp_files, write_json


@pytest.fixture
def umask():
    state = {}

    def set_mask(mask):
        state.setdefault("old", os.umask(mask))  # the first call keeps the umask to restore

    yield set_mask
    if "old" in state:
        os.umask(state["old"])


def test_round_trip_bytes_text_function_and_json(tmp_path):
    assert atomic_write(tmp_path / "a.bin", b"\x00\x01binary") == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01binary"
    atomic_write(tmp_path / "b.txt", "grüße\n")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "grüße\n"
    atomic_write(tmp_path / "c.npz", lambda f: np.savez(f, x=np.arange(5)))
    with np.load(tmp_path / "c.npz") as data:
        np.testing.assert_array_equal(data["x"], np.arange(5))
    write_json(tmp_path / "d.json", {"a": [1, 2.5, None]})
    assert (tmp_path / "d.json").read_text() == json.dumps({"a": [1, 2.5, None]}, indent=2) + "\n"
    with pytest.raises(ValueError):
        write_json(tmp_path / "e.json", {"x": float("nan")})  # NaN is not JSON
    assert not (tmp_path / "e.json").exists()
    with atomic_open(tmp_path / "sub" / "f.txt", "w") as f:  # missing folders are created
        f.write("line\n")
    assert (tmp_path / "sub" / "f.txt").read_text() == "line\n"
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_file_mode_follows_umask_not_mkstemp(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "report.png"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)  # an old file's mode does not carry over: the new file is a new file
    atomic_write(path, b"new")
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_failure_in_the_writer_keeps_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def half_then_fail(f):
        f.write(b"half a fi")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(path, half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path) as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failed_replace_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out"
    path.mkdir()  # os.replace of a file onto a folder fails after the temp file was written
    with pytest.raises(OSError):
        atomic_write(path, b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_temp_files_of_a_killed_writer_are_removable(tmp_path):
    """A process killed mid-write leaves a ``.tmp-*`` file (never a half target); remove_temp_files cleans it."""
    script = ("import os, sys; from sal_ros.core.files import atomic_open\n"
              "with atomic_open(sys.argv[1]) as f:\n"
              "    f.write(b'partial'); f.flush(); os._exit(9)\n")
    target = tmp_path / "frame.npz"
    proc = subprocess.run([sys.executable, "-c", script, str(target)], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 9
    assert not target.exists()
    assert [p.name.startswith(f"{TMP_PREFIX}frame.npz.") for p in tmp_path.iterdir()] == [True]
    assert remove_temp_files(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_torch_save_through_a_file_object(tmp_path, umask):
    import torch
    umask(0o022)
    path = tmp_path / "model.pt"
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 7}
    atomic_write(path, lambda f: torch.save(state, f))
    back = torch.load(path, weights_only=True)
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_files_module_does_not_import_torch():
    code = "import sys, sal_ros.core.files; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"
