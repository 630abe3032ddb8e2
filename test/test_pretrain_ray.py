"""The teacher cache on Ray actors (``sal-ros pretrain --cache-only --backend ray``, a private local instance):
the same files as the local cache, and a resumed cache computes only the frames still missing."""
import numpy as np
import pytest
import yaml

from conftest import ray_loopback, require_data

from sal_ros.cli import main as cli_main

pytest.importorskip("ray")


def _config(tmp_path, seq, cache: str):
    path = tmp_path / f"{cache}.yaml"
    path.write_text(yaml.safe_dump({
        "out_dir": f"run_{cache}", "objective": "seal", "device": "cpu", "sources": [{"frames": str(seq)}],
        "teacher": {"kind": "random", "dim": 8, "patch": 16}, "superpixels": {"kind": "slic", "n_segments": 40},
        "cache_dir": cache}))
    return path


def test_ray_cache_equals_local_and_resumes(tmp_path, monkeypatch, capsys):
    from sal_ros.pretrain.cache import load_entry

    ray_loopback(monkeypatch)
    seq = require_data("semantickitti", "sequences", "00")
    local, ray = _config(tmp_path, seq, "local"), _config(tmp_path, seq, "ray")
    assert cli_main(["pretrain", "--config", str(local), "--cache-only", "--no-progress"]) == 0
    keys = sorted(p.stem for p in (tmp_path / "local").glob("*.npz"))
    assert keys == ["00_000000", "00_000001"]
    (tmp_path / "ray").mkdir()
    done = tmp_path / "ray" / f"{keys[0]}.npz"  # a resumed cache: one frame is there already
    done.write_bytes((tmp_path / "local" / f"{keys[0]}.npz").read_bytes())
    before = done.stat().st_mtime_ns
    capsys.readouterr()
    assert cli_main(["pretrain", "--config", str(ray), "--cache-only", "--backend", "ray", "--workers", "2",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 computed, 1 reused; 2 Ray workers" in out and "teacher cache ready: 2 frames" in out
    assert done.stat().st_mtime_ns == before  # skipped, not rewritten
    for key in keys:
        a, b = load_entry(tmp_path / "local" / f"{key}.npz"), load_entry(tmp_path / "ray" / f"{key}.npz")
        assert a["meta"] == b["meta"] and a["meta"]["pose"] is not None
        for ca, cb in zip(a["cameras"], b["cameras"], strict=True):
            assert ca.keys() == cb.keys() == {"index", "cell", "fmap", "segment", "segfeats"}
            for name in ca:
                np.testing.assert_array_equal(ca[name], cb[name])
    assert cli_main(["pretrain", "--config", str(local), "--cache-only", "--ray-address", "auto"]) == 1
    assert "--ray-address and --workers need --backend ray" in capsys.readouterr().err
