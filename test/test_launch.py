"""Launch files: loadable, with the documented arguments, pointing at config files that exist and that hold
only parameters the nodes declare (a typo in a params file would otherwise be ignored silently)."""
import ast
import importlib.util
from pathlib import Path

import pytest

from sal_ros.nodes import params

REPO = Path(__file__).resolve().parents[1]

EXPECTED_ARGS = {
    "segment.launch.py": {"params_file": "segment.yaml", "record": "false", "record_dir": "",
                          "use_sim_time": "false", "log_level": "info", "managed": "false", "discovery_range": "",
                          "fastdds_profile": ""},
    "record.launch.py": {"params_file": "record.yaml", "record_dir": "", "use_sim_time": "false",
                         "log_level": "info", "managed": "false", "discovery_range": "", "fastdds_profile": ""},
}


def _declared_args(tree: ast.AST) -> dict[str, ast.AST]:
    """DeclareLaunchArgument(name, default_value=...) calls in a launch file: name -> default expression."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DeclareLaunchArgument":
            name = node.args[0].value
            found[name] = next(kw.value for kw in node.keywords if kw.arg == "default_value")
    return found


def _executable(node: ast.Call) -> str:
    """The executable a launch Node names: a constant, or executable(context, "<name>") (launch_args)."""
    value = next(kw.value for kw in node.keywords if kw.arg == "executable")
    return value.value if isinstance(value, ast.Constant) else value.args[1].value


@pytest.mark.parametrize("launch_file", sorted(EXPECTED_ARGS))
def test_launch_file_arguments_and_defaults(launch_file):
    tree = ast.parse((REPO / "launch" / launch_file).read_text())
    declared = _declared_args(tree)
    assert set(declared) == set(EXPECTED_ARGS[launch_file])
    for name, expected in EXPECTED_ARGS[launch_file].items():
        default = declared[name]
        if expected is None:
            continue
        if isinstance(default, ast.Constant):
            assert default.value == expected, name
        else:  # os.path.join(share, "config", "<file>")
            assert expected in [c.value for c in ast.walk(default) if isinstance(c, ast.Constant)], name
            assert (REPO / "config" / expected).is_file()
    # The DDS environment is set for the nodes only when asked (conditions on the arguments), and the nodes are
    # the installed executables with their names.
    env_vars = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "SetEnvironmentVariable"}
    assert env_vars == {"ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_DEFAULT_PROFILES_FILE"}
    nodes = [{kw.arg: kw.value.value for kw in n.keywords if isinstance(kw.value, ast.Constant)}
             | {"executable": _executable(n)}
             for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Node"]
    setup = (REPO / "setup.py").read_text()
    for node in nodes:
        assert node["package"] == "sal_ros"
        # the plain node and its lifecycle variant (managed:=true) are installed executables
        for name in (node["executable"], node["executable"] + "_managed"):
            assert f'"{name} = sal_ros.tools.run:{name}_main"' in setup, name
        assert node["name"] in (params.SEGMENTER_NODE, params.RECORDER_NODE)
    # Each node is defined in one launch file: segment.launch.py runs the recorder by including record.launch.py.
    assert sorted(node["executable"] for node in nodes) == (["segmenter"] if launch_file == "segment.launch.py"
                                                           else ["recorder"])
    included = [c.value for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "IncludeLaunchDescription"
                for c in ast.walk(n) if isinstance(c, ast.Constant) and str(c.value).endswith(".launch.py")]
    assert included == (["record.launch.py"] if launch_file == "segment.launch.py" else [])


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    from ros_install import colcon_install

    return colcon_install(tmp_path_factory.mktemp("colcon"))


@pytest.mark.parametrize("launch_file", sorted(EXPECTED_ARGS))
def test_installed_launch_file_shows_its_arguments(installed, launch_file):
    """`ros2 launch sal_ros <file> --show-args` on the colcon install: the file loads where users run it."""
    import subprocess

    shown = subprocess.run(["ros2", "launch", "sal_ros", launch_file, "--show-args"], env=installed,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    names = {line.strip().strip("'").rstrip("':") for line in shown.stdout.splitlines() if line.startswith("    '")}
    assert names == set(EXPECTED_ARGS[launch_file]), shown.stdout


@pytest.mark.parametrize("config,nodes", [("segment.yaml", (params.SEGMENTER_NODE, params.RECORDER_NODE)),
                                          ("record.yaml", (params.RECORDER_NODE,))])
def test_config_files_hold_only_declared_valid_parameters(config, nodes):
    for node in nodes:
        values = params.load_params_file(REPO / "config" / config, node)
        assert values, f"{config} has nothing for {node}"
        assert params.unknown_names(node, values) == []
        specs = {s.name: s for s in params.all_specs(node, values)}
        for name, value in values.items():
            assert params.check_value(specs[name], params.coerce(specs[name], value)) is None
