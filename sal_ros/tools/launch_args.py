"""What the launch files share: the arguments both take, how a sensor node is launched, conditions on arguments
and the overrides a node takes over its params file.

Imported by launch/*.launch.py (installed with the package), never by the nodes.
"""
from __future__ import annotations

from typing import Any


def when_given(name: str) -> Any:
    """Condition: launch argument ``name`` is not empty (LaunchConfigurationNotEquals is deprecated)."""
    from launch.conditions import IfCondition
    from launch.substitutions import LaunchConfiguration, NotEqualsSubstitution

    return IfCondition(NotEqualsSubstitution(LaunchConfiguration(name), ""))


def node_overrides(context: Any, **params_from_args: str) -> dict[str, Any]:
    """``use_sim_time`` and ``{parameter: launch argument}``, for a Node with ``namespace=""``: launch_ros writes
    a parameter dict under the node's full name only when its namespace is given, and a ``/**`` dict loses to a
    params file's node-scoped section (``sal_recorder: output_dir`` beat ``record_dir:=``). An empty argument is
    left out, so the params file's value stays."""
    from launch.substitutions import LaunchConfiguration
    from launch_ros.parameter_descriptions import ParameterValue

    out: dict[str, Any] = {"use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)}
    for param, arg in params_from_args.items():
        text = LaunchConfiguration(arg).perform(context)
        if text:
            out[param] = text
    return out


def executable(context: Any, name: str) -> str:
    """``name``, or its lifecycle variant ``<name>_managed`` with ``managed:=true``."""
    from launch.substitutions import LaunchConfiguration

    managed = LaunchConfiguration("managed").perform(context).strip().lower() in ("true", "1", "yes")
    return f"{name}_managed" if managed else name



# The arguments every launch file takes besides its own: name -> (default, description of what it does for
# {nodes}).
SHARED_ARGUMENTS = {
    "use_sim_time": ("false", "use /clock (bag replay)"),
    "log_level": ("info", "debug, info, warn, error"),
    "managed": ("false", "lifecycle nodes, unconfigured at start: ros2 lifecycle set configure, activate"),
    "discovery_range": ("", "ROS_AUTOMATIC_DISCOVERY_RANGE for {nodes} (LOCALHOST, SUBNET, ...); "
                            "empty: as in the environment"),
    "fastdds_profile": ("", "Fast DDS XML profile for {nodes}, e.g. the installed config/fastdds.xml (loopback "
                            "only); empty: as in the environment"),
}


def shared_arguments(nodes: str) -> list:
    """:data:`SHARED_ARGUMENTS` declared, and the DDS environment they set for ``nodes`` ("the node", "the
    nodes") only when given."""
    from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
    from launch.substitutions import LaunchConfiguration

    declared = [DeclareLaunchArgument(name, default_value=default, description=text.format(nodes=nodes))
                for name, (default, text) in SHARED_ARGUMENTS.items()]
    return declared + [
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", LaunchConfiguration("discovery_range"),
                               condition=when_given("discovery_range")),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile"),
                               condition=when_given("fastdds_profile")),
    ]


def sensor_node(context: Any, name: str, executable_name: str, **params_from_args: str) -> list:
    """The node ``name`` of this package: ``executable_name`` (or its lifecycle variant, :func:`executable`), the
    params file, then the overrides from launch arguments (:func:`node_overrides`), logging at ``log_level``."""
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    return [Node(
        package="sal_ros",
        executable=executable(context, executable_name),
        name=name,
        namespace="",  # the node's full name is known: its overrides are node-scoped (node_overrides)
        parameters=[LaunchConfiguration("params_file"), node_overrides(context, **params_from_args)],
        ros_arguments=["--log-level", LaunchConfiguration("log_level")],
        output="screen",
        emulate_tty=True,
    )]
