"""model/checkpoint and model/vocabulary share their errors through model/errors, not through each other."""
import ast
from pathlib import Path

import sal_ros

MODEL = Path(sal_ros.__file__).parent / "model"


def imported_modules(path: Path) -> set[str]:
    """Every sal_ros module ``path`` imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("sal_ros")}


def test_no_import_cycle_between_checkpoint_and_vocabulary():
    for module in ("vocabulary.py", "text_encoder.py", "open_clip_models.py"):
        assert "sal_ros.model.checkpoint" not in imported_modules(MODEL / module), module
    assert imported_modules(MODEL / "errors.py") == set()  # the bottom of the model layer


def test_one_error_family_under_both_names():
    from sal_ros.model import checkpoint, errors, open_clip_models, text_encoder

    assert checkpoint.ModelError is errors.ModelError is text_encoder.ModelError is open_clip_models.ModelError
    assert issubclass(checkpoint.CheckpointError, errors.ModelError)
