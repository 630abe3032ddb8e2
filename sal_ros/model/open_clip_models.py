"""open_clip models for the text encoder and the pseudo-label image tokens alike: an open_clip tag, a local
weights file, or seeded random weights (the same in every process: training oracle, node and evaluation agree);
and the tiny random text tower of the tests and plumbing demos.

Weights come from a local file or, only when the user names one, an open_clip pretrained tag (downloads).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from sal_ros.model.errors import ModelError
from sal_ros.model.vocabulary import CONTEXT_LENGTH

# A width-64, one-layer random CLIP text tower with a 512-d output (ViT-B-16's embed_dim, so it pairs with the
# default model config): encodes 20 prompts in milliseconds on CPU. For tests and plumbing demos only.
TINY_TEXT_ENCODER = "sal-tiny-text"
_TINY_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
_RANDOM_SEED = 0


def encoder_identity(model_name: str, pretrained: str | None) -> str:
    """What a text encoder's embeddings depend on: model and weights (random weights are seeded, so reproducible)."""
    return f"{model_name}/{pretrained or f'random-seed{_RANDOM_SEED}'}"


def _tiny_config_dir() -> str:
    """Register the tiny text encoder config with open_clip once per process."""
    import open_clip

    if TINY_TEXT_ENCODER not in open_clip.list_models():
        # open_clip reads the file when it is added and keeps the config, so the folder can go at once (one was
        # left in /tmp by every process before).
        with tempfile.TemporaryDirectory(prefix="sal_ros_clip_") as folder:
            config = Path(folder) / f"{TINY_TEXT_ENCODER}.json"
            config.write_text(json.dumps(_TINY_CONFIG))
            open_clip.add_model_config(config)
    return TINY_TEXT_ENCODER


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(pretrained).exists()


def load_open_clip(model_name: str, pretrained: str | None, text_only: bool = False):
    """An open_clip model (on CPU) for the text encoder and the pseudo-label image tokens alike: ``pretrained``
    is an open_clip tag (open_clip fetches it), a local weights file, or None for seeded random weights (the
    same in every process). ``text_only``: a weights file may lack the image tower. Unknown models or tags
    raise ModelError naming the alternatives."""
    import open_clip
    import torch

    if model_name == TINY_TEXT_ENCODER:
        _tiny_config_dir()
    if model_name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if model_name.lower()[:4] in m.lower()][:8]
        raise ModelError(f"unknown open_clip model {model_name!r}" + (f"; similar: {close}" if close else ""))
    if pretrained is None or _looks_like_path(pretrained):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            model = open_clip.create_model(model_name, pretrained=None)
        if pretrained is not None:
            _load_weights_file(model, pretrained, text_only)
        return model
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ModelError(f"{model_name}: unknown pretrained tag {pretrained!r} and no such file; tags: {tags}")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained)
    except RuntimeError as exc:  # open_clip's wording for a fetch that failed (offline robot, HF_HUB_OFFLINE)
        raise ModelError(
            f"{model_name}: weights for tag {pretrained!r} are not in the Hugging Face cache and could not be "
            f"fetched ({exc}); fetch them on a machine with internet and copy the cache (HF_HOME), or give a "
            "local weights file") from exc



def _load_weights_file(model, path: str, text_only: bool) -> None:
    """open_clip weights from a local .pt/.pth/.bin (torch, weights only) or .safetensors file."""
    import torch

    if not Path(path).is_file():
        raise ModelError(f"open_clip weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ModelError(f"cannot read open_clip weights {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (text_only and k.startswith("visual."))]
    if missing or result.unexpected_keys:
        raise ModelError(f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
