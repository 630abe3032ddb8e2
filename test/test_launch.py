"""Launch files: loadable, with the documented arguments, pointing at config files that exist and that hold
only parameters the nodes declare (a typo in a params file would otherwise be ignored silently)."""
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


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    from ros_install import colcon_install

    return colcon_install(tmp_path_factory.mktemp("colcon"))


def _launched(launch_file: str) -> dict:
    """What the installed ``launch_file`` declares and does with its defaults: arguments (name -> default), the
    environment variables it may set, its nodes (as run) and the launch files it includes."""
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction, SetEnvironmentVariable
    from launch.utilities import perform_substitutions

    from ament_index_python.packages import get_package_share_directory

    path = Path(get_package_share_directory("sal_ros")) / "launch" / launch_file
    spec = importlib.util.spec_from_file_location(launch_file.replace(".", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    context, out = LaunchContext(), {"args": {}, "env": set(), "nodes": [], "included": []}
    for entity in module.generate_launch_description().entities:  # arguments first: the nodes read them
        if isinstance(entity, DeclareLaunchArgument):
            entity.execute(context)
            out["args"][entity.name] = perform_substitutions(context, entity.default_value)
    for entity in module.generate_launch_description().entities:
        if isinstance(entity, SetEnvironmentVariable):
            out["env"].add(perform_substitutions(context, entity.name))
        elif isinstance(entity, OpaqueFunction):
            out["nodes"] += [{"package": n.node_package, "executable": n.node_executable,
                              "name": n._Node__node_name} for n in entity.execute(context)]
        elif isinstance(entity, IncludeLaunchDescription):
            source = entity.launch_description_source
            source.get_launch_description(context)  # loads it: the location is known from then on
            out["included"].append(Path(source.location).name)
    return out


@pytest.mark.parametrize("launch_file", sorted(EXPECTED_ARGS))
def test_launch_file_arguments_and_defaults(installed, monkeypatch, launch_file):
    """The installed launch file run up to its nodes with the default arguments."""
    monkeypatch.setenv("AMENT_PREFIX_PATH", installed["AMENT_PREFIX_PATH"])
    launched = _launched(launch_file)
    assert set(launched["args"]) == set(EXPECTED_ARGS[launch_file])
    for name, expected in EXPECTED_ARGS[launch_file].items():
        default = launched["args"][name]
        if name == "params_file":  # <install>/share/sal_ros/config/<file>, the file of the sources
            assert Path(default).name == expected and Path(default).is_file(), default
            assert Path(default).read_text() == (REPO / "config" / expected).read_text()
        else:
            assert default == expected, name
    # The DDS environment is set for the nodes only when asked (conditions on the arguments), and the nodes are
    # the installed executables with their names.
    assert launched["env"] == {"ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_DEFAULT_PROFILES_FILE"}
    setup = (REPO / "setup.py").read_text()
    for node in launched["nodes"]:
        assert node["package"] == "sal_ros"
        # the plain node and its lifecycle variant (managed:=true) are installed executables
        for name in (node["executable"], node["executable"] + "_managed"):
            assert f'"{name} = sal_ros.tools.run:{name}_main"' in setup, name
        assert node["name"] in (params.SEGMENTER_NODE, params.RECORDER_NODE)
    # Each node is defined in one launch file: segment.launch.py runs the recorder by including record.launch.py.
    assert sorted(node["executable"] for node in launched["nodes"]) == (
        ["segmenter"] if launch_file == "segment.launch.py" else ["recorder"])
    assert launched["included"] == (["record.launch.py"] if launch_file == "segment.launch.py" else [])


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
