"""package.xml lists what the code uses (rosdep keys) and nothing that nothing uses; what has no rosdep key is
pinned in requirements.txt."""
import ast
import re
import sys
from pathlib import Path

from conftest import REPO

# Python module -> rosdep key, for modules whose key is not their own name.
KEYS = {"tf2_ros": "tf2_ros_py", "numpy": "python3-numpy", "scipy": "python3-scipy", "yaml": "python3-yaml",
        "transforms3d": "python3-transforms3d", "tqdm": "python3-tqdm", "PIL": "python3-pil",
        "matplotlib": "python3-matplotlib", "skimage": "python3-skimage", "sklearn": "python3-sklearn", "rosbags": "python3-rosbags-pip",
        "torch": "python3-pytorch-pip"}
# No rosdep key: pip only, from requirements.txt (module -> requirement name, None: optional, imported only when
# asked for); torchsparse is an accelerator the code falls back from, spconv a bench reference.
PIP_ONLY = {"open_clip": "open_clip_torch", "sam2": None, "segment_anything": "segment-anything", "ray": "ray",
            "timm": None, "safetensors": None, "torchvision": "torchvision", "torchsparse": None, "spconv": None}


def used_modules() -> set[str]:
    found = set()
    for path in [*(REPO / "sal_ros").rglob("*.py"), *(REPO / "launch").glob("*.py")]:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        found |= set(re.findall(r'"(\w+)/msg/\w+"', text))  # message classes imported by type name
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("sal_ros", "__future__")}


def test_package_xml_depends_on_exactly_what_the_code_imports():
    from catkin_pkg.package import parse_package

    package = parse_package(str(REPO / "package.xml"))
    exec_keys = {d.name for d in package.exec_depends}
    used = used_modules()
    wanted = {KEYS.get(m, m) for m in used if m not in PIP_ONLY}
    assert exec_keys == wanted, (sorted(exec_keys - wanted), sorted(wanted - exec_keys))
    requirements = (REPO / "requirements.txt").read_text()
    for module in used & set(PIP_ONLY):
        if PIP_ONLY[module]:
            assert f"{PIP_ONLY[module]}==" in requirements, module
    assert "python3-rosbags-pip" in exec_keys and "launch_testing" not in {d.name for d in package.test_depends}


def test_test_depends_are_imported_or_run_by_the_tests():
    from catkin_pkg.package import parse_package

    tests = "\n".join(p.read_text() for p in (REPO / "test").glob("*.py"))
    for dep in parse_package(str(REPO / "package.xml")).test_depends:
        name = {"python3-pytest": "pytest", "ros2launch": '"launch"', "ros2param": '"param"', "ros2run": '"run"',
                "ros2pkg": '"pkg"'}.get(dep.name, dep.name)
        assert name in tests, dep.name
