"""Other nodes of this node's name in the ROS graph.

Two segmenters of one name both answer every cloud, share one ``set_parameters`` service, and their vocabulary
versions stop meaning the same classes. ROS itself allows it, and a crashed node stays in the graph until its
participant's DDS lease runs out (about 20 s with Fast DDS), so a respawned node would meet its own ghost: by
default a namesake is reported (ERROR once per change, ``duplicate_name`` counted, a ``<node>: name`` status in
/diagnostics that turns OK again when it is gone) and the node keeps running; ``allow_duplicate: false`` refuses
to start instead.
"""
from __future__ import annotations

import time
from typing import Any

from sal_ros.nodes import diagnostics as D


class DuplicateNodeError(RuntimeError):
    """Another node of this node's name is in the ROS graph (and allow_duplicate is false)."""


class Namesakes:
    def __init__(self, node: Any) -> None:
        self._node = node
        self._created = time.monotonic()
        self._seen = 0  # namesakes at the last look

    def count(self) -> int:
        node = self._node
        me = (node.get_name(), node.get_namespace())
        return sum(pair == me for pair in node.get_node_names_and_namespaces()) - 1

    def what(self, n: int) -> str:
        return (f"{n} other node(s) named {self._node.get_fully_qualified_name()} in the ROS graph: each would answer "
                "every cloud, and one set_parameters would change them all")

    def refuse(self, wait_s: float) -> None:
        """Raise DuplicateNodeError when a namesake is found within ``wait_s`` of the node's creation (discovery
        takes that long; a namesake found ends the wait)."""
        while True:
            n = self.count()
            if n > 0 or time.monotonic() - self._created > wait_s:
                break
            time.sleep(0.1)
        if n > 0:
            raise DuplicateNodeError(f"{self.what(n)}; start this one under another name (--ros-args -r "
                                     "__node:=NAME), or leave allow_duplicate true to run beside it with an error")

    def status(self, stats: Any) -> D.Status:
        """Looked at again on each diagnostics period: a namesake that appears later, or a ghost that leaves."""
        n = self.count()
        if n > self._seen:
            stats.count("duplicate_name")
            self._node.get_logger().error(f"{self.what(n)}; rename one (--ros-args -r __node:=NAME)")
        elif n < self._seen:
            self._node.get_logger().info(f"namesakes in the ROS graph: {self._seen} -> {n}")
        self._seen = n
        name = self._node.get_name()
        values = [("namesakes", str(n))]
        if n:
            return D.Status(f"{name}: name", D.ERROR, self.what(n), values)
        return D.Status(f"{name}: name", D.OK, "unique in the ROS graph", values)
