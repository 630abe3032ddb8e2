"""The import graph of sal_ros goes one way, in the layer order docs/architecture.md draws, and has no cycles; the
"never" rules hold (rooms that never import a room or a third-party package) and no sal_ros module name is computed.

Every import counts, at module level or inside a function (parsed with ast, nothing is imported): a lazy import
keeps a module from loading early, it does not make a dependency on a higher layer right. The order is read from
the table under "## Layer order" in docs/architecture.md and the rules from the one under "## Never", so the
picture and this test cannot drift apart.
"""
from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE_MD = REPO / "docs" / "architecture.md"
PACKAGE = "sal_ros"


def layer_order(markdown: str) -> dict[str, int]:
    """Room -> layer number from the doc's table rows ``| N | room, room | ... |`` under "## Layer order"."""
    section = markdown.split("## Layer order", 1)[1].split("\n## ", 1)[0]
    order = {}
    for number, rooms in re.findall(r"^\|\s*(\d+)\s*\|([^|]+)\|", section, flags=re.MULTILINE):
        for room in re.findall(r"[a-z_]+", rooms):
            order[room] = int(number)
    return order


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root/sal_ros``."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The sal_ros modules ``name`` imports anywhere in its file (``from pkg import mod`` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    processes = _subprocess_modules(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif isinstance(node, ast.Constant) and node.value in known and id(node) not in processes:
            targets = [node.value]  # a module named as a string, for importlib (lazy dispatch tables)
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] == PACKAGE and t in known)
    return found - {name}


def _subprocess_modules(tree: ast.AST) -> set[int]:
    """Module names that follow ``"-m"`` in a list or tuple: a new process (``python -m sal_ros.cli run``), not
    an import."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            for before, item in zip(node.elts, node.elts[1:]):
                if isinstance(before, ast.Constant) and before.value == "-m":
                    out.add(id(item))
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def room(module: str) -> str | None:
    """``sal_ros.<room>...``; None for the package's own __init__ (a docstring and the version)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]], order: dict[str, int]) -> list[str]:
    """Imports of a room from a room of a higher layer, or of another room in the same layer."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            src, dst = room(module), room(target)
            if src is None or dst is None or src == dst:
                continue
            if src not in order or dst not in order:
                bad.append(f"{module} -> {target}: room {src if src not in order else dst} has no layer")
            elif order[dst] >= order[src]:
                bad.append(f"{module} (layer {order[src]}) -> {target} (layer {order[dst]})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def never_rules(markdown: str) -> list[tuple[set[str], list[str]]]:
    """(rooms, what they never import) from the table rows ``| room, room | name, `pattern*`, ... |`` under "## Never":
    a name is a room of sal_ros, a third-party top-level package (fnmatch pattern), or ``computed imports``."""
    section = markdown.split("## Never", 1)[1].split("\n## ", 1)[0]
    rules = []
    for rooms, never in re.findall(r"^\|([^|]+)\|([^|]+)\|", section, flags=re.MULTILINE):
        if set(rooms.strip()) <= set("-: ") or rooms.strip() == "rooms":
            continue  # the header and its rule
        names = [n.strip(" `") for n in never.split(",")]
        rules.append((set(re.findall(r"[a-z_]+", rooms)), names))
    return rules


COMPUTED = "computed imports"
_IMPORT_CALLS = {"import_module", "__import__"}
# A constant that begins a sal_ros module name and leaves its end to be filled in: "sal_ros." + x, f"sal_ros.{x}",
# "sal_ros.%s" % x, "sal_ros.{}".format(x).
_MODULE_PREFIX = re.compile(r"^sal_ros(\.\w+)*\.($|\{|%)")


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a file, anywhere in it (``import a.b`` and ``from a.b import c``
    both give ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {PACKAGE}


def computed_imports(path: Path) -> list[str]:
    """What a reader of this file cannot resolve: ``import_module``/``__import__`` called with anything but a
    string, and the start of a sal_ros module name whose end is computed."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and node.args:
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in _IMPORT_CALLS and not isinstance(node.args[0], ast.Constant):
                found.append(f"line {node.lineno}: {func}({ast.unparse(node.args[0])})")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PREFIX.match(node.value):
            found.append(f"line {node.lineno}: a sal_ros module name completed at run time from {node.value!r}")
    return found


def broken_never_rules(root: Path, rules: list[tuple[set[str], list[str]]]) -> list[str]:
    graph, known_rooms = import_graph(root), rooms_of(root)
    bad = []
    for module, path in sorted(module_files(root).items()):
        src = room(module)
        for rooms, never in rules:
            if src not in rooms:
                continue
            rooms_never = {n for n in never if n != COMPUTED and "*" not in n and n in known_rooms}
            packages = [n for n in never if n != COMPUTED and n not in rooms_never]
            bad += [f"{module} -> {t}: {src} never imports {room(t)}" for t in sorted(graph[module])
                    if room(t) in rooms_never]
            bad += [f"{module} -> {name}: {src} never imports {pattern}" for name in sorted(third_party_imports(path))
                    for pattern in packages if fnmatch.fnmatchcase(name, pattern)]
            if COMPUTED in never:
                bad += [f"{module}: {src} never computes an import: {c}" for c in computed_imports(path)]
    return sorted(set(bad))


def rooms_of(root: Path) -> set[str]:
    return {room(m) for m in module_files(root)} - {None}


def test_the_doc_orders_every_room():
    order = layer_order(ARCHITECTURE_MD.read_text())
    rooms = {room(m) for m in module_files(REPO)} - {None}
    assert rooms <= set(order), f"rooms missing from docs/architecture.md's layer order: {sorted(rooms - set(order))}"
    assert order["core"] < order["model"] < order["nodes"] < order["tools"] < order["cli"]


def test_imports_go_down_the_layers():
    bad = upward_imports(import_graph(REPO), layer_order(ARCHITECTURE_MD.read_text()))
    assert not bad, "imports against docs/architecture.md's layer order:\n" + "\n".join(bad)


def test_the_never_rules_hold():
    rules = never_rules(ARCHITECTURE_MD.read_text())
    assert len(rules) >= 4 and all(rooms <= rooms_of(REPO) for rooms, _ in rules), rules
    bad = broken_never_rules(REPO, rules)
    assert not bad, "imports against docs/architecture.md's never rules:\n" + "\n".join(bad)


def test_no_sal_ros_module_name_is_computed():
    bad = [f"{module}: {c}" for module, path in sorted(module_files(REPO).items()) for c in computed_imports(path)
           if "sal_ros module name" in c]
    assert not bad, "computed sal_ros imports (name the module as a whole string):\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(import_graph(REPO))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


# --- the checks themselves fail on a bad tree --------------------------------------------------------------------

ORDER = {"core": 1, "model": 2, "nodes": 3, "tools": 4}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"sal_ros/__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        init = path.parent / "__init__.py"
        if not init.exists():
            init.write_text("")
    return root


@pytest.mark.parametrize("source", [
    "from sal_ros.nodes.node import Node\n",  # module level
    "def f():\n    from sal_ros.nodes import node\n    return node\n",  # hidden in a function
    "def f():\n    import sal_ros.tools.run\n",
    "from ..nodes import node\n",  # relative
    "import importlib\nMODES = {'run': 'sal_ros.tools.run'}\n",  # named for importlib.import_module
    "CMD = ['python', '-m', 'sal_ros.tools.run']\nfrom sal_ros.nodes import node\n",  # a process is no import
])
def test_an_upward_import_fails(tmp_path, source):
    root = _tree(tmp_path, {"sal_ros/core/low.py": source, "sal_ros/nodes/node.py": "", "sal_ros/tools/run.py": ""})
    bad = upward_imports(import_graph(root), ORDER)
    assert len(bad) == 1 and bad[0].startswith("sal_ros.core.low (layer 1) -> sal_ros.")


def test_a_downward_import_passes_and_an_unordered_room_fails(tmp_path):
    root = _tree(tmp_path, {"sal_ros/nodes/node.py": "from sal_ros.core import low\n", "sal_ros/core/low.py": "",
                            "sal_ros/extra/x.py": "from sal_ros.core.low import f\n"})
    assert upward_imports(import_graph(root), ORDER) == [
        "sal_ros.extra.x -> sal_ros.core.low: room extra has no layer"]


def test_a_cycle_fails_even_through_a_function(tmp_path):
    root = _tree(tmp_path, {"sal_ros/model/a.py": "from sal_ros.model import b\n",
                            "sal_ros/model/b.py": "def f():\n    from sal_ros.model.a import g\n",
                            "sal_ros/model/c.py": "from sal_ros.model import a\n"})
    assert cycles(import_graph(root)) == [["sal_ros.model.a", "sal_ros.model.b"]]


NEVER = [({"core"}, ["torch", "rclpy", "tf2_ros", "*_msgs", COMPUTED]), ({"nodes"}, ["train", "pretrain"])]


@pytest.mark.parametrize("files, expected", [
    ({"sal_ros/nodes/base.py": "from sal_ros.pretrain import trainer\n"},
     "sal_ros.nodes.base -> sal_ros.pretrain.trainer: nodes never imports pretrain"),
    ({"sal_ros/core/low.py": "import torch\n"}, "sal_ros.core.low -> torch: core never imports torch"),
    ({"sal_ros/core/low.py": "def f():\n    from rclpy.time import Time\n"},
     "sal_ros.core.low -> rclpy: core never imports rclpy"),
    ({"sal_ros/core/low.py": "def f():\n    from sensor_msgs.msg import Image\n"},
     "sal_ros.core.low -> sensor_msgs: core never imports *_msgs"),
    ({"sal_ros/core/low.py": "import importlib\ndef f(pkg):\n    return importlib.import_module(f'{pkg}.msg')\n"},
     "sal_ros.core.low: core never computes an import: line 3: import_module(f'{pkg}.msg')"),
])
def test_a_broken_never_rule_fails(tmp_path, files, expected):
    root = _tree(tmp_path, {"sal_ros/core/low.py": "", "sal_ros/nodes/base.py": "", "sal_ros/pretrain/trainer.py": "",
                            "sal_ros/train/x.py": "", **files})
    assert broken_never_rules(root, NEVER) == [expected]


def test_a_downward_import_of_an_allowed_package_passes(tmp_path):
    root = _tree(tmp_path, {"sal_ros/core/low.py": "import numpy\nimport rosbags\n",
                            "sal_ros/nodes/base.py": "import rclpy\nimport torch\nfrom sal_ros.core import low\n",
                            "sal_ros/train/x.py": ""})
    assert broken_never_rules(root, NEVER) == []


@pytest.mark.parametrize("source", [
    "import importlib\nmod = importlib.import_module('sal_ros.' + name)\n",
    "import importlib\nmod = importlib.import_module(f'sal_ros.pretrain.{name}')\n",
    "PREFIX = 'sal_ros.'\n",
    "mod = __import__('sal_ros.{}'.format(name))\n",
])
def test_a_computed_sal_ros_module_name_is_found(tmp_path, source):
    root = _tree(tmp_path, {"sal_ros/tools/x.py": source})
    assert any("sal_ros module name" in c for c in computed_imports(root / "sal_ros/tools/x.py"))


def test_a_module_named_whole_is_no_computed_name(tmp_path):
    root = _tree(tmp_path, {"sal_ros/cli.py": "MODES = {'run': 'sal_ros.tools.run'}\nDOC = 'see sal_ros.core.tf'\n"})
    assert computed_imports(root / "sal_ros/cli.py") == []
