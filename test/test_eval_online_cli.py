"""`sal-ros eval online`: a 2-frame SemanticKITTI bag replayed into a real `sal-ros run` child (tiny checkpoint,
tiny text encoder, CPU) over DDS on localhost; online.json / online.md and the printed headline."""
import json
import math

from conftest import eval_online, require_rclpy


def test_eval_online_writes_summary_and_prints_headline(eval_online_rig):
    out = eval_online_rig.root / "out"
    proc = eval_online(eval_online_rig.bag, "--params", eval_online_rig.params, "--out", out, "--rate", "1",
                       "--set", "stats_period=0.5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr

    summary = json.loads((out / "online.json").read_text())
    assert summary["clouds_sent"] == 2 and summary["clouds_answered"] + summary["dropped"] == 2
    assert summary["clouds_answered"] >= 1
    latency = summary["end_to_end_ms"]
    for key in ("median", "p90", "max"):
        assert isinstance(latency[key], float) and math.isfinite(latency[key]) and latency[key] > 0, latency
    assert latency["n"] == summary["clouds_answered"]
    assert summary["node_timings_ms"]["total"]["median"] > 0
    assert summary["meta"]["sets"] == ["stats_period=0.5"] and summary["meta"]["cloud_topic"] == "/lidar/points"

    headline = f"{summary['clouds_answered']}/2 clouds answered"
    assert headline in proc.stdout and f"median {latency['median']:.1f} ms" in proc.stdout
    assert f"p90 {latency['p90']:.1f} ms" in proc.stdout
    first = summary["first_frame"]  # the first cloud beside the median, end to end and in the node
    assert first["end_to_end_ms"] > 0 and first["end_to_end_vs_median"] > 0 and first["node_total_ms"] > 0
    assert f"first frame {first['end_to_end_ms']:.1f} ms" in proc.stdout
    markdown = (out / "online.md").read_text()
    assert markdown.startswith("# Online evaluation") and headline in markdown and "| total |" in markdown
    assert (out / "node.log").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]  # atomic writes left no temp files


def test_eval_online_without_params_file_says_so(tmp_path):
    require_rclpy()
    proc = eval_online(tmp_path, "--params", tmp_path / "missing.yaml", "--out", tmp_path / "out", timeout=60)
    assert proc.returncode == 1 and "missing.yaml" in proc.stderr
    assert not (tmp_path / "out").exists()
