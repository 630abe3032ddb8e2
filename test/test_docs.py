"""The user docs and the RViz config follow the code: generated parameter tables, topics the node publishes,
commands and options that exist."""
import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from sal_ros import cli
from sal_ros.tools import docs
from sal_ros.nodes import params as P
from sal_ros.nodes.outputs import LABELED_FIELDS, UNLABELED_COLOR

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RVIZ = REPO / "config" / "sal_ros.rviz"
RVIZ_TYPES = {"rviz_default_plugins/PointCloud2": "PointCloud2", "rviz_default_plugins/MarkerArray": "MarkerArray",
              "rviz_default_plugins/Image": "Image"}


# ------------------------------------------------------------------------------------------------ parameters


def test_parameters_md_is_generated_from_the_specs():
    assert (REPO / "docs" / "parameters.md").read_text() == docs.parameters_markdown(), \
        "docs/parameters.md is stale: run `python -m sal_ros.tools.docs`"


def test_parameters_md_names_every_parameter_once():
    text = docs.parameters_markdown()
    specs = P.node_specs(P.SEGMENTER_NODE) + P.RECORDER_PARAMS + P.camera_specs(docs.EXAMPLE_CAMERA)
    for spec in specs:
        assert text.count(f"| `{spec.name}` |") == 1, spec.name
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(specs)
    assert all(line.count(" | ") == 5 for line in rows), "a description splits its table cell"


def test_markdown_table_escapes_cells_and_writes_defaults_as_yaml():
    specs = [
        P.ParamSpec("a", "string", "x|y", "Largest |a - b| (s) for <camera> -> frame."),
        P.ParamSpec("b", "string_array", ["car", "traffic sign"], "line one\nline two", dynamic=True),
        P.ParamSpec("c", "bool", False, "flag"),
        P.ParamSpec("d", "string", "", "empty", choices=("<a>", "b|c")),
        P.ParamSpec("e", "string", None, "unset"),
        P.ParamSpec("f", "string", "true", "a string YAML would read as a bool"),
        P.ParamSpec("g", "double", 0.03, "number", range=(0.0, 1.0)),
        P.ParamSpec("h", "string_array", (), "empty list"),
    ]
    rows = P.markdown_table(specs).splitlines()[2:]
    assert rows == [
        r"| `a` | string | `x\|y` |  | no | Largest \|a - b\| (s) for &lt;camera&gt; -&gt; frame. |",
        "| `b` | string_array | `[car, traffic sign]` |  | yes | line one line two |",
        "| `c` | bool | `false` |  | no | flag |",
        r"| `d` | string | `''` | &lt;a&gt; b\|c | no | empty |",
        "| `e` | string | `null` |  | no | unset |",
        "| `f` | string | `'true'` |  | no | a string YAML would read as a bool |",
        "| `g` | double | `0.03` | 0.0 .. 1.0 | no | number |",
        "| `h` | string_array | `[]` |  | no | empty list |",
    ]
    for row in rows:  # six cells, whatever the text holds
        assert len(re.split(r"(?<!\\)\|", row)) == 8, row
    already = P.markdown_table([P.ParamSpec("i", "string", "", r"a \| b")]).splitlines()[2]
    assert already.endswith(r"| a \| b |")  # an escaped pipe is not escaped twice


def test_check_mode_detects_a_stale_file(tmp_path):
    stale = tmp_path / "parameters.md"
    stale.write_text(docs.parameters_markdown().replace("0.03", "0.04", 1))
    assert docs.main(["--check", "--out", str(stale)]) == 1
    assert docs.main(["--out", str(stale)]) == 0
    assert docs.main(["--check", "--out", str(stale)]) == 0


# ------------------------------------------------------------------------------------------------------ RViz


def published_topics() -> dict[str, str]:
    """``{topic regex: message type}`` of the segmenter's publishers, read from their source (a type imported
    under another name, e.g. ``Vocabulary as VocabularyMsg``, by its message name)."""
    tree = ast.parse((REPO / "sal_ros" / "nodes" / "publishers.py").read_text())
    message_name = {alias.asname: alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names if alias.asname}
    out = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "create_publisher"):
            continue
        msg_type, topic = node.args[0], node.args[1]
        if isinstance(topic, ast.Constant) and topic.value == "/diagnostics":
            continue  # the one ROS-wide topic, by the diagnostics convention
        parts = [topic] if isinstance(topic, ast.Constant) else list(topic.values)  # f-string: {...} = one name
        assert isinstance(parts[0], ast.Constant) and parts[0].value.startswith("~/"), "outputs are private topics"
        pattern = "".join(re.escape(v.value) if isinstance(v, ast.Constant) else r"[A-Za-z0-9_]+" for v in parts)
        out[re.escape(f"/{P.SEGMENTER_NODE}/") + pattern[len(re.escape("~/")):]] = message_name.get(msg_type.id,
                                                                                                   msg_type.id)
    return out


def rviz_displays(text: str | None = None) -> list[dict]:
    config = yaml.safe_load(RVIZ.read_text() if text is None else text)
    return config["Visualization Manager"]["Displays"]


def test_published_topics_are_found_in_the_source():
    types = sorted(published_topics().values())
    assert types.count("PointCloud2") == 2 and "MarkerArray" in types and "Image" in types  # labeled, filtered


def shown_outputs(displays: list[dict]) -> dict[str, list[dict]]:
    """Message type -> the displays showing a segmenter output of that type (each checked against the source)."""
    published = published_topics()
    shown = {}
    for display in displays:
        if display["Class"] not in RVIZ_TYPES:
            continue
        topic = display["Topic"]["Value"]
        matches = [t for pattern, t in published.items() if re.fullmatch(pattern, topic)]
        assert matches, f"RViz display {display['Name']!r} shows {topic}, which the segmenter does not publish"
        assert matches == [RVIZ_TYPES[display["Class"]]], f"{topic}: display {display['Class']} for {matches}"
        shown.setdefault(matches[0], []).append(display)
    return shown


def test_rviz_config_parses_and_shows_the_node_outputs_with_the_robots_cameras(tmp_path):
    """The shipped file names no camera (the camera names are the robot's: it showed `cam0` before); `sal-ros run
    --rviz-config` adds one overlay per camera of a params file."""
    config = yaml.safe_load(RVIZ.read_text())
    assert config["Visualization Manager"]["Global Options"]["Fixed Frame"] == "velodyne"
    assert set(shown_outputs(rviz_displays())) == {"PointCloud2", "MarkerArray"}
    assert "/overlay/" not in RVIZ.read_text()
    params = tmp_path / "robot.yaml"
    params.write_text("/**:\n  ros__parameters:\n    cameras: [front, rear_left]\n")
    out = tmp_path / "robot.rviz"
    assert cli.main(["run", "--params", str(params), "--rviz-config", str(out)]) == 0
    shown = shown_outputs(rviz_displays(out.read_text()))
    assert set(shown) == {"PointCloud2", "MarkerArray", "Image"}
    assert [d["Topic"]["Value"] for d in shown["Image"]] == [f"/{P.SEGMENTER_NODE}/overlay/front",
                                                             f"/{P.SEGMENTER_NODE}/overlay/rear_left"]
    assert rviz_displays(out.read_text())[:len(rviz_displays())] == rviz_displays()  # the shipped ones, unchanged


def test_rviz_cloud_colours_come_from_output_fields():
    fields = [name for name, _ in LABELED_FIELDS]
    clouds = [d for d in rviz_displays() if d["Class"] == "rviz_default_plugins/PointCloud2"]
    enabled = [d for d in clouds if d["Enabled"]]
    assert enabled and enabled[0]["Color Transformer"] == "RGB8" and "rgb" in fields
    for d in clouds:
        if d["Color Transformer"] == "Intensity":
            assert d["Channel Name"] in fields
    assert any(d.get("Channel Name") == "label" for d in clouds)


def test_rviz_qos_matches_the_output_qos():
    default = {s.name: s.default for s in P.SEGMENTER_PARAMS}["qos.outputs.reliability"]
    for d in rviz_displays():
        if d["Class"] in RVIZ_TYPES and d["Topic"]["Reliability Policy"] == "Reliable":
            assert default == "reliable", "a reliable RViz subscription never matches best-effort outputs"


def test_setup_installs_the_config_folder():
    setup = ast.parse((REPO / "setup.py").read_text())
    globs = [n.args[0].value for n in ast.walk(setup)
             if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "glob"]
    assert "config/*" in globs and RVIZ.parent.name == "config"


# ------------------------------------------------------------------------------------------ docs vs commands


def _code_lines(text: str) -> list[tuple[bool, str]]:
    """``(complete, line)``: lines of fenced code blocks (complete commands) and inline code spans (may be
    partial references such as `sal-ros convert`)."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += [(True, line) for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [(False, span) for span in re.findall(r"`([^`\n]+)`", prose)]
    return [(complete, line.strip()) for complete, line in lines]


def _commands(prefix: str) -> list[tuple[str, bool, list[str]]]:
    found = []
    for path in DOC_FILES:
        for complete, line in _code_lines(path.read_text()):
            line = re.sub(r"^(\.venv/bin/|\$ )", "", line)
            if not line.startswith(prefix + " "):
                continue
            words = shlex.split(line, comments=True)  # a placeholder in the comment leaves the command checked
            if not any("<" in w or "..." in w for w in words):
                found.append((path.name, complete, words))
    return found


SAL_ROS_COMMANDS = _commands("sal-ros")


def test_docs_show_sal_ros_commands():
    complete = {words[1] for _, full, words in SAL_ROS_COMMANDS if full}
    assert {"run", "convert", "replay", "pseudolabel", "train", "eval"} <= complete
    benches = {words[2] for _, _, words in SAL_ROS_COMMANDS if words[1] == "bench"}
    assert benches == set(cli.BENCHES), "docs/performance.md should give a command for every bench"


@pytest.mark.parametrize("where,complete,words", SAL_ROS_COMMANDS,
                         ids=[" ".join(w)[:70] for _, _, w in SAL_ROS_COMMANDS])
def test_documented_sal_ros_commands_parse(where, complete, words):
    """Code blocks must parse as they stand; inline references may leave out required arguments, nothing else. A
    command asking for help must print it, and its other words must parse, required arguments aside (argparse
    prints help as soon as it meets the flag, whatever unknown words precede it)."""
    argv = words[1:]
    asks_help = [w for w in argv if w in ("--help", "-h")]
    if asks_help:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            cli.build_parser(argv).parse_args(argv)
        assert exited.value.code == 0 and out.getvalue().startswith("usage: sal-ros"), \
            f"{where}: `{' '.join(words)}` prints no help"
        argv = [w for w in argv if w not in asks_help]
    parser = cli.build_parser(argv)
    if asks_help or not complete:
        _require_nothing(parser)  # else a missing required argument hides an unknown word behind it
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{' '.join(words)}` does not parse: {err.getvalue().strip().splitlines()[-1]}")


def _require_nothing(parser):
    for group in parser._mutually_exclusive_groups:
        group.required = False
    for action in parser._actions:
        action.required = False
        if isinstance(action.choices, dict):  # the subcommands' parsers
            for sub in action.choices.values():
                _require_nothing(sub)


def test_documented_launch_arguments_exist():
    from sal_ros.tools.launch_args import SHARED_ARGUMENTS

    commands = _commands("ros2 launch")
    assert commands
    for where, _, words in commands:
        assert words[2] == "sal_ros", f"{where}: {words}"
        source = (REPO / "launch" / words[3]).read_text()
        declared = set(re.findall(r'DeclareLaunchArgument\(\s*"(\w+)"', source))
        if "*shared_arguments(" in source:  # the arguments every launch file takes (tools/launch_args)
            declared |= set(SHARED_ARGUMENTS)
        for arg in words[4:]:
            name = arg.split(":=")[0]
            assert name in declared, f"{where}: {words[3]} has no launch argument {name!r} ({sorted(declared)})"


def test_documented_param_sets_are_dynamic_parameters():
    commands = _commands("ros2 param set")
    assert commands
    specs = {s.name: s for s in P.node_specs(P.SEGMENTER_NODE)}
    for where, _, words in commands:
        assert words[3] == f"/{P.SEGMENTER_NODE}"
        spec = specs.get(words[4])
        assert spec is not None and spec.dynamic, f"{where}: {words[4]} is not a dynamic parameter"
        if spec.type == "string_array":
            value = yaml.safe_load(words[5])
            assert isinstance(value, list) and all(isinstance(v, str) for v in value)


def test_documented_rviz_command_names_the_shipped_config():
    rviz = [words for _, _, words in _commands("rviz2")]
    assert rviz and all(RVIZ.name in " ".join(words) for words in rviz)


# ----------------------------------------------------------------------------------------- README and ros.md


def test_readme_starts_with_the_two_setup_commands_and_keeps_the_demo_marker():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]
    demo = text.split("\n## Demo\n", 1)[1].split("\n## ", 1)[0]
    assert "\n<!-- demo-results -->\n" in demo


def test_ros_md_lists_every_labeled_cloud_field_with_its_type():
    row = next(line for line in (REPO / "docs" / "ros.md").read_text().splitlines()
               if line.startswith("| `~/labeled_points`"))
    positions = [re.search(rf"(?<![\w/]){name}(?!\w)", row) for name, _ in LABELED_FIELDS]
    assert all(positions), [name for (name, _), m in zip(LABELED_FIELDS, positions) if not m]
    starts = [m.start() for m in positions]
    assert starts == sorted(starts), "fields out of order"
    for name, dtype in LABELED_FIELDS:
        assert np.dtype(dtype).name in row, f"{name}: {np.dtype(dtype).name} not documented"


def test_doc_links_point_to_existing_files():
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            if target == "docs/training.md" or (path.parent.name == "docs" and target == "training.md"):
                continue  # written by the training docs owner
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def test_ros_md_documents_the_label_0_colour():
    assert f"grey `{tuple(UNLABELED_COLOR)}`" in (REPO / "docs" / "ros.md").read_text()
