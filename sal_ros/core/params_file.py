"""The one reader of ROS 2 params YAML files, shared by the nodes (``sal-ros run``) and the bag reader, which
takes a robot's params file to replay with its topics, cameras, sync and calibration settings."""
from __future__ import annotations

import os
from typing import Any

from sal_ros.core.yamlfile import load_yaml

SEGMENTER_NODE = "sal_segmenter"
RECORDER_NODE = "sal_recorder"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_params_file(path: str | os.PathLike, *node_names: str) -> dict[str, Any]:
    """Flat ``{name: value}`` from a ROS 2 params YAML: the ``/**`` section, then each node's own (``name`` or
    ``/name``) on top in the order given, as ``--params-file`` applies them (ValueError on a malformed file). An
    empty list is left out, as rcl leaves it unset."""
    try:
        doc = load_yaml(path, "params file") or {}
    except OSError as exc:
        raise ValueError(f"cannot read params file {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"params file {path}: expected a mapping of node names, got {type(doc).__name__}")
    values: dict[str, Any] = {}
    for section in ("/**", *(s for name in node_names for s in (name, "/" + name))):
        body = doc.get(section)
        if body is None:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("ros__parameters", {}), dict):
            raise ValueError(f"params file {path}: section {section!r} needs a 'ros__parameters' mapping")
        values.update(_flatten(body.get("ros__parameters") or {}))
    # rcl reads `[]` as "not set" (its type is unknown), so the parameter keeps its default; `ros2 param dump`
    # writes `cameras: []` when no cameras are configured.
    return {name: value for name, value in values.items() if value != []}
