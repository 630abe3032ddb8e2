"""What the launch files share: conditions on arguments and the overrides a node takes over its params file.

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

