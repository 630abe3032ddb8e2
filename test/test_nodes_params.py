"""Parameter table on a real rclpy node: explicit types (empty string lists stay string arrays), ranges and
read-only descriptors, params-file loading, and the `sal-ros run` argument checks."""
import argparse
from pathlib import Path

import pytest

from conftest import require_rclpy
from sal_ros.nodes import params as P

rclpy = require_rclpy()
from rclpy.parameter import Parameter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def context():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


def _node(context, name, values):
    return rclpy.create_node(name, context=context, parameter_overrides=P.overrides(name, values),
                             start_parameter_services=False)


def test_declare_from_segment_yaml_with_types_ranges_and_read_only(context):
    values = P.load_params_file(REPO / "config" / "segment.yaml", P.SEGMENTER_NODE)
    values["cameras"] = ["front"]
    values["camera.front.time_offset"] = 0  # an int in YAML for a double parameter
    node = _node(context, P.SEGMENTER_NODE, values)
    try:
        got = P.declare(node, P.all_specs(P.SEGMENTER_NODE, values))
        assert got["prompts"][:2] == ["car", "truck"]
        assert got["cameras"] == ["front"] and got["camera.front.time_offset"] == 0.0
        assert got["camera.front.image_topic"] == "/front/image_raw"  # table default
        desc = node.describe_parameter("prompts")
        assert desc.type == Parameter.Type.STRING_ARRAY.value and not desc.read_only
        desc = node.describe_parameter("sync.match_threshold")
        assert desc.read_only and desc.floating_point_range[0].to_value == 1.0
        assert node.describe_parameter("max_points").integer_range[0].to_value == 10_000_000
        assert "best_effort" in node.describe_parameter("qos.cloud.reliability").additional_constraints
        # Read-only and out-of-range changes are refused by rclpy from the descriptors.
        assert not node.set_parameters([Parameter("cloud_topic", value="/other")])[0].successful
        assert not node.set_parameters([Parameter("score_threshold", value=1.5)])[0].successful
        assert node.set_parameters([Parameter("score_threshold", value=0.5)])[0].successful
    finally:
        node.destroy_node()


def test_empty_string_list_default_is_a_string_array(context):
    node = _node(context, P.RECORDER_NODE, {})
    try:
        got = P.declare(node, P.node_specs(P.RECORDER_NODE))
        assert got["cameras"] == []
        assert node.describe_parameter("cameras").type == Parameter.Type.STRING_ARRAY.value
        assert node.set_parameters([Parameter("output_dir", value="x")])[0].successful is False  # read-only
    finally:
        node.destroy_node()


def test_bad_override_names_the_parameter(context):
    node = rclpy.create_node(P.RECORDER_NODE, context=context, start_parameter_services=False,
                             parameter_overrides=[Parameter("every_nth", value="three")])
    try:
        with pytest.raises(ValueError, match="every_nth"):
            P.declare(node, P.RECORDER_PARAMS)
    finally:
        node.destroy_node()
    node = rclpy.create_node(P.RECORDER_NODE, context=context, start_parameter_services=False,
                             parameter_overrides=[Parameter("qos.cloud.reliability", value="fast")])
    try:
        with pytest.raises(ValueError, match="qos.cloud.reliability must be one of"):
            P.declare(node, P.INPUT_PARAMS)
    finally:
        node.destroy_node()


def test_camera_names_must_be_parameter_safe():
    with pytest.raises(ValueError, match="camera name"):
        P.camera_specs("front/left")


def test_params_file_sections_merge_and_unknown_names(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("/**:\n  ros__parameters:\n    cloud_topic: /a\n    sync: {timeout: 1}\n"
                    "sal_recorder:\n  ros__parameters:\n    cloud_topic: /b\n    every_nth: 3\n    evry_nth: 2\n")
    values = P.load_params_file(path, P.RECORDER_NODE)
    assert values == {"cloud_topic": "/b", "sync.timeout": 1, "every_nth": 3, "evry_nth": 2}
    assert P.unknown_names(P.RECORDER_NODE, values) == ["evry_nth"]
    assert P.load_params_file(path, P.SEGMENTER_NODE) == {"cloud_topic": "/a", "sync.timeout": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("sal_recorder: [1, 2]\n")
    with pytest.raises(ValueError, match="ros__parameters"):
        P.load_params_file(bad, P.RECORDER_NODE)


def test_params_file_with_an_empty_list_leaves_it_unset(tmp_path):
    # as rcl reads it (NOT_SET, so the default stays): `ros2 param dump` writes `cameras: []`
    path = tmp_path / "p.yaml"
    path.write_text("/**:\n  ros__parameters:\n    cameras: []\n    cloud_topic: /a\n")
    assert P.load_params_file(path, P.SEGMENTER_NODE) == {"cloud_topic": "/a"}


def test_empty_list_override_keeps_the_empty_default(context):
    # rclpy would re-infer an empty override as a byte array and refuse the STRING_ARRAY declaration
    values = {"cameras": [], "cloud_topic": "/a"}
    assert [p.name for p in P.overrides(P.SEGMENTER_NODE, values)] == ["cloud_topic"]
    node = _node(context, P.SEGMENTER_NODE, values)
    try:
        got = P.declare(node, P.all_specs(P.SEGMENTER_NODE, values))
        assert got["cameras"] == [] and got["cloud_topic"] == "/a"
    finally:
        node.destroy_node()


def _run_args(**kw):
    from sal_ros.tools import run

    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    argv = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            argv += [flag] if v is True else [flag, str(v)]
    return parser.parse_args(argv)


def test_run_overrides_from_params_file_set_and_record(tmp_path):
    from sal_ros.tools.run import node_overrides

    args = _run_args(params=REPO / "config" / "segment.yaml", record=tmp_path / "frames",
                     set=["model.device=cpu", "every_nth=4", "score_threshold=1"], use_sim_time=True)
    out = node_overrides(args)
    seg = {p.name: p.value for p in out[P.SEGMENTER_NODE]}
    rec = {p.name: p.value for p in out[P.RECORDER_NODE]}
    assert seg["model.device"] == "cpu" and seg["score_threshold"] == 1.0 and "every_nth" not in seg
    assert rec["every_nth"] == 4 and rec["output_dir"] == str(tmp_path / "frames") and "model.device" not in rec
    assert seg["use_sim_time"] is True and rec["use_sim_time"] is True
    with pytest.raises(ValueError, match="modle.device"):
        node_overrides(_run_args(set=["modle.device=cpu"]))
    with pytest.raises(ValueError, match="nothing to run"):
        node_overrides(_run_args(no_segmenter=True))


def test_list_params_prints_every_parameter(capsys):
    from sal_ros.tools import docs, run

    assert run.main(_run_args(list_params=True)) == 0
    text = capsys.readouterr().out
    for spec in P.INPUT_PARAMS + P.SEGMENTER_PARAMS + P.RECORDER_PARAMS + P.camera_specs(docs.EXAMPLE_CAMERA):
        assert f"`{spec.name}`" in text
    assert text == docs.parameter_tables()  # the very tables of docs/parameters.md
    assert text in (REPO / "docs" / "parameters.md").read_text()
