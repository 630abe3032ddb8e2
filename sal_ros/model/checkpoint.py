"""SAL model checkpoints: one file with weights, architecture config and the text encoder the tokens live in.

Layout (a plain dict, loadable with ``torch.load(weights_only=True)``, so no pickled code runs on load)::

    {"format": "sal_ros.model", "format_version": 1,
     "model_config": {...ModelConfig fields...}, "token_dim": int,
     "text_encoder": {"model": "ViT-B-16", "pretrained": str | None, "identity": str} | None,
     "model": state_dict, "extra": {...}, "torch_version": str}

Writes are atomic (``sal_ros.core.files.atomic_write``): a reader never sees half a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sal_ros.core.files import atomic_write
from sal_ros.model.errors import CheckpointError, ModelError

FORMAT = "sal_ros.model"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, model, config=None, text_encoder_identity: Any = None,
                    extra: dict | None = None) -> Path:
    """Write ``model``'s weights and config atomically.

    ``text_encoder_identity``: a TextEncoder, or ``{"model": name, "pretrained": tag-or-file}``, or None (the
    checkpoint then says nothing about its token space). ``extra``: plain data (dicts, lists, numbers, strings).
    """
    import torch

    path = Path(path)
    config = config if config is not None else model.config
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
        "token_dim": int(config.token_dim if hasattr(config, "token_dim") else config["token_dim"]),
        "text_encoder": _encoder_record(text_encoder_identity),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": _plain(dict(extra or {}), "extra"),
        "torch_version": str(torch.__version__),
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def _plain(value: Any, where: str) -> Any:
    """``value`` as data that ``torch.load(weights_only=True)`` reads back; ValueError naming anything else."""
    import numpy as np
    import torch

    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise ValueError(f"checkpoint {where} holds a {type(value).__name__}; store plain data (dicts, lists, numbers, "
                     f"strings, tensors)")


def _encoder_record(encoder: Any) -> dict | None:
    if encoder is None:
        return None
    if isinstance(encoder, dict):
        from sal_ros.model.vocabulary import encoder_identity

        pretrained = encoder.get("pretrained") or None
        return {"model": str(encoder["model"]), "pretrained": pretrained,
                "identity": str(encoder.get("identity") or encoder_identity(str(encoder["model"]), pretrained))}
    return {"model": encoder.model_name, "pretrained": encoder.pretrained, "identity": encoder.identity}


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """The checkpoint's dict, checked for format and version; CheckpointError otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle error, disallowed global: all "corrupt"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a sal_ros model checkpoint (no format '{FORMAT}')")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this sal_ros reads {FORMAT_VERSION}")
    for key in ("model_config", "model", "token_dim"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return payload


def load_checkpoint(path: str | Path, map_location: Any = "cpu", model=None, text_encoder=None):
    """``(model, meta)``: a SALModel built from the stored config (or ``model``, filled in place), in eval mode
    when built here. ``meta`` holds the config, token_dim, text_encoder record and extra. With ``text_encoder``
    the token dimension is checked against its embeddings."""
    from sal_ros.model.sal import ModelConfig, SALModel

    payload = read_checkpoint(path, map_location)
    try:
        config = ModelConfig.from_dict(dict(payload["model_config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: stored model config is not valid here: {exc}") from exc
    if text_encoder is not None and config.token_dim != text_encoder.embed_dim:
        raise CheckpointError(f"{path}: the model predicts {config.token_dim}-d tokens but text encoder "
                              f"{text_encoder.identity} embeds {text_encoder.embed_dim}-d; use the encoder it was "
                              f"trained with ({(payload.get('text_encoder') or {}).get('identity', 'not recorded')})")
    built = model is None
    if built:
        model = SALModel(config)
    _load_state(model, payload["model"], path)
    if built:
        model.eval()
    meta = {"model_config": config, "token_dim": config.token_dim, "text_encoder": payload.get("text_encoder"),
            "extra": payload.get("extra") or {}, "torch_version": payload.get("torch_version"), "path": str(path)}
    return model, meta


def _load_state(model, state: dict, path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
        raise CheckpointError(f"{path}: weights do not fit the model; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "CheckpointError", "ModelError", "FORMAT_VERSION"]
