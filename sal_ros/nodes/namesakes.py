"""Other nodes of this node's name in the ROS graph.

Two segmenters of one name both answer every cloud, share one ``set_parameters`` service, and their vocabulary
versions stop meaning the same classes, so a segmenter refuses to start next to a namesake. A crashed node stays in
the graph until its participant's DDS lease runs out (20 s by Fast DDS's default), so a node restarted at once
meets its own ghost: a namesake found at start is given ``duplicate_ghost_s`` to leave before the node refuses.
``allow_duplicate`` starts anyway. Either way the graph is looked at again every diagnostics period: a namesake
that appears later is an ERROR once per change, counted (``duplicate_name``), and a ``<node>: name`` status in
/diagnostics that turns OK again when it is gone.
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

    def refuse(self, check_s: float, ghost_s: float) -> None:
        """Raise DuplicateNodeError when a namesake is found within ``check_s`` of the node's creation (discovery
        takes that long; a namesake found ends the look) and has not left ``ghost_s`` later."""
        n = self._wait(lambda n: n > 0, self._created + check_s)
        if n <= 0:
            return
        self._node.get_logger().warning(f"{self.what(n)}; waiting up to {ghost_s:g} s for it to leave (a node that "
                                        "crashed stays in the graph until its DDS lease ends)")
        n = self._wait(lambda n: n <= 0, time.monotonic() + ghost_s)
        if n > 0:
            raise DuplicateNodeError(f"{self.what(n)}; start this one under another name (--ros-args -r "
                                     "__node:=NAME) or allow it (parameter allow_duplicate, sal-ros run "
                                     "--allow-duplicate)")
        self._node.get_logger().info("the namesake left the ROS graph: starting")

    def _wait(self, done, until: float) -> int:
        while True:
            n = self.count()
            if done(n) or time.monotonic() > until:
                return n
            time.sleep(0.1)

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
