"""Pretrained backbone files (``sal-ros pretrain`` writes them; ``train`` and ``eval probe`` start from them).

Layout (a plain dict, read with ``torch.load(weights_only=True)``)::

    {"format": "sal_ros.backbone", "format_version": 2, "model_config": {...ModelConfig.to_dict()...},
     "backbone": state_dict, "head": state_dict, "extra": {...}, "torch_version": str}

The model config records the backbone family (``backbone``: minkunet | waffleiron) and its input settings; a
model that starts from the file must agree on every setting that shapes the backbone or its input. Version 1 stored
the config flat; such files still load (migrated on read, as model checkpoints).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sal_ros.core.files import atomic_write
from sal_ros.model.checkpoint import READS_VERSIONS, CheckpointError, _plain, migrated

FORMAT = "sal_ros.backbone"
FORMAT_VERSION = 2
# ModelConfig sections of the query decoder only: a pretrained backbone fits models that differ in these.
DECODER_SECTIONS = ("decoder", "training")


def save_backbone(path: str | Path, backbone, config, head=None, extra: dict | None = None) -> Path:
    import torch

    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": config.to_dict(),
               "backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
               "head": {k: v.detach().cpu() for k, v in (head.state_dict() if head is not None else {}).items()},
               "extra": _plain(dict(extra or {}), "extra"), "torch_version": str(torch.__version__)}
    return atomic_write(Path(path), lambda f: torch.save(payload, f))


def read_backbone(path: str | Path) -> dict:
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained backbone not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means "corrupt"
        raise CheckpointError(f"{path}: not a readable backbone file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a sal_ros pretrained backbone (no format '{FORMAT}')")
    if payload.get("format_version") not in READS_VERSIONS:
        raise CheckpointError(f"{path}: backbone format version {payload.get('format_version')}, this sal_ros reads "
                              f"{FORMAT_VERSION}")
    if "model_config" not in payload:
        raise CheckpointError(f"{path}: backbone file lacks 'model_config'")
    return migrated(payload, path)


def backbone_config(payload: dict):
    from sal_ros.model.config import ModelConfig

    return ModelConfig.from_dict(payload["model_config"])


def check_compatible(saved, config, path: Any = "") -> None:
    """CheckpointError naming the backbone settings in which ``config`` differs from the ``saved`` one."""
    a, b = _backbone_settings(saved), _backbone_settings(config)
    diffs = [f"{k}: pretrained {a[k]!r}, model {b[k]!r}" for k in a if a[k] != b[k]]
    if diffs:
        raise CheckpointError(f"{path}: the pretrained backbone does not fit this model ({'; '.join(diffs)})")


def _backbone_settings(config) -> dict:
    """``{"backbone": family, "section.field": value}`` of every setting outside the decoder's sections."""
    flat = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()} if key not in DECODER_SECTIONS else {})
        else:
            flat[key] = value
    return flat


def load_backbone_into(path: str | Path, backbone, config) -> dict:
    """Load the file's backbone weights into ``backbone`` (built from ``config``); returns the payload."""
    payload = read_backbone(path)
    check_compatible(backbone_config(payload), config, path)
    try:
        backbone.load_state_dict(payload["backbone"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: backbone weights do not fit: {str(exc)[:300]}") from exc
    return payload


__all__ = ["save_backbone", "read_backbone", "backbone_config", "load_backbone_into", "check_compatible", "FORMAT"]
