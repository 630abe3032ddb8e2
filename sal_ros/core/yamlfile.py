"""The one YAML reader for files people hand us: params files, calibration, train / pretrain configs, vocabularies,
label configs, class maps.

``yaml.safe_load`` executes nothing, but aliases let a 1 kB file stand for a billion nodes ("billion laughs"): the
loaded object is a small graph of shared lists, and the first code that walks it (flattening params, ``np.array`` of
a matrix, an error message quoting it) runs for minutes into gigabytes. Here the document is composed first (linear
in the text), its size with every alias expanded is counted on the node graph (shared nodes counted once per use,
recursive aliases refused), and only a document within ``max_nodes`` is constructed. The file itself is read
through :func:`sal_ros.core.files.read_text_file` (regular files only, at most ``max_bytes``).
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from sal_ros.core.files import read_text_file

DEFAULT_MAX_BYTES = 4 << 20
DEFAULT_MAX_NODES = 200_000  # a params file or label config has hundreds; the 956-byte alias bomb has 10^9

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlBudgetError(ValueError):
    """A YAML document over its expanded-node budget, recursive, or too deeply nested; ``reason`` is a name to
    count, the message names the file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_yaml(path: str | os.PathLike, what: str = "YAML file", max_bytes: int = DEFAULT_MAX_BYTES,
              max_nodes: int = DEFAULT_MAX_NODES) -> Any:
    """The document in ``path`` (None when empty). ValueError naming the file for anything wrong: not a regular
    file, too large, not UTF-8, not YAML, more than ``max_nodes`` nodes with aliases expanded; OSError if missing."""
    return load_yaml_text(read_text_file(path, max_bytes, what), f"{what} {path}", max_nodes)


def load_yaml_text(text: str, source: str = "YAML", max_nodes: int = DEFAULT_MAX_NODES) -> Any:
    """``text`` parsed like ``yaml.safe_load`` within the node budget; errors start with ``source``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, max_nodes, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise YamlBudgetError("yaml_too_deep", f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expanded_size(root: yaml.Node, max_nodes: int, source: str) -> int:
    """Nodes in the document with every alias expanded, counted without expanding (each shared node's size is
    computed once); YamlBudgetError past ``max_nodes`` or on an alias inside its own anchor."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            ancestors.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > max_nodes:
                raise YamlBudgetError("yaml_node_budget",
                                      f"{source}: more than {max_nodes} nodes with its aliases expanded "
                                      "(an alias bomb?)")
            continue
        if key in sizes:
            continue
        if key in ancestors:
            raise YamlBudgetError("yaml_recursive_alias", f"{source}: an alias refers to its own anchor")
        ancestors.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]
