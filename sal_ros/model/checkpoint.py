"""SAL model checkpoints: one file with weights, architecture config and the text encoder the tokens live in.

Layout (a plain dict, loadable with ``torch.load(weights_only=True)``, so no pickled code runs on load)::

    {"format": "sal_ros.model", "format_version": 2,
     "model_config": {"backbone": str, "input": {...}, "minkunet": {...}, ...: ModelConfig.to_dict()}, "token_dim": int,
     "text_encoder": {"model": "ViT-B-16", "pretrained": str | None, "identity": str} | None,
     "model": state_dict, "extra": {...}, "torch_version": str}

Version 1 stored the model config as one flat record (``sal_ros.model.config.FLAT_NAMES``); such files still load,
into the same model: ``read_checkpoint`` migrates them. Writes are atomic (``sal_ros.core.files.atomic_write``): a reader never sees half a file.

Loads check the file before any real module is built (``check_state``): the stored config could claim 20M queries
in a 2 MB file, and building that model first costs gigabytes. The architecture is built on the meta device (no
memory), under a budget of as many tensors as the file holds, and its tensor names and shapes must be the file's;
weights with NaN or inf are refused too (the model would label every point 0 and look fine).
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from sal_ros.core.files import atomic_write
from sal_ros.model.errors import CheckpointError, ModelError

FORMAT = "sal_ros.model"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)  # 1: flat model config
# The pickled part of a checkpoint (config, names, extra; tensors are stored beside it) is kilobytes; torch's
# weights-only unpickler reads it in Python at ~1 s per 1.3 MB, so 5M class names would take 20 s just to read.
MAX_PICKLE_BYTES = 16 << 20


def save_checkpoint(path: str | Path, model, config=None, text_encoder_identity: Any = None,
                    extra: dict | None = None) -> Path:
    """Write ``model``'s weights and config atomically.

    ``text_encoder_identity``: a TextEncoder, or ``{"model": name, "pretrained": tag-or-file}``, or None (the
    checkpoint then says nothing about its token space). ``extra``: plain data (dicts, lists, numbers, strings).
    """
    import torch

    path = Path(path)
    from sal_ros.model.config import ModelConfig

    config = config if config is not None else model.config
    config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": config.to_dict(),
        "token_dim": int(config.decoder.token_dim),
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
        from sal_ros.model.open_clip_models import encoder_identity

        pretrained = encoder.get("pretrained") or None
        return {"model": str(encoder["model"]), "pretrained": pretrained,
                "identity": str(encoder.get("identity") or encoder_identity(str(encoder["model"]), pretrained))}
    return {"model": encoder.model_name, "pretrained": encoder.pretrained, "identity": encoder.identity}


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """The checkpoint's dict, checked for format and version, in the current version's layout; CheckpointError
    otherwise."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_pickled_size(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle error, disallowed global: all "corrupt"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a sal_ros model checkpoint (no format '{FORMAT}')")
    version = payload.get("format_version")
    if version not in READS_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this sal_ros reads {FORMAT_VERSION}")
    for key in ("model_config", "model", "token_dim"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return migrated(payload, path)


def migrated(payload: dict, path) -> dict:
    """A version-1 payload (or backbone file) in version 2's layout: the flat model config nested per section."""
    from sal_ros.model.config import nested_settings

    if payload.get("format_version") != 1:
        return payload
    try:
        config = nested_settings(payload.get("model_config"))
    except ValueError as exc:  # not a mapping; a setting given twice
        raise CheckpointError(f"{path}: stored model config is not valid here: {exc}") from exc
    return {**payload, "format_version": 2, "model_config": config}


def _check_pickled_size(path: Path) -> None:
    """CheckpointError for a FIFO or device, or a checkpoint whose pickled part is over ``MAX_PICKLE_BYTES``
    (read from the zip directory, before unpickling); other formats are left to torch.load."""
    import zipfile

    from sal_ros.core.files import FileRefusedError, check_regular_file

    try:
        check_regular_file(path, None, "checkpoint")
        with zipfile.ZipFile(path) as archive:
            sizes = [i.file_size for i in archive.infolist() if i.filename.endswith("/data.pkl")]
    except FileRefusedError as exc:
        raise CheckpointError(str(exc)) from None
    except (zipfile.BadZipFile, OSError):
        return  # torch.load names what is wrong with it
    if sizes and max(sizes) > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: its pickled part (config, names, extra) is {max(sizes)} bytes, more than the "
                              f"limit of {MAX_PICKLE_BYTES}; not read")


def load_checkpoint(path: str | Path, map_location: Any = "cpu", model=None, text_encoder=None):
    """``(model, meta)``: a SALModel built from the stored config (or ``model``, filled in place), in eval mode
    when built here. ``meta`` holds the config, token_dim, text_encoder record and extra. With ``text_encoder``
    the token dimension is checked against its embeddings."""
    from sal_ros.model.config import ModelConfig
    from sal_ros.model.sal import SALModel

    payload = read_checkpoint(path, map_location)
    try:
        config = ModelConfig.from_dict(payload["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: stored model config is not valid here: {exc}") from exc
    token_dim = config.decoder.token_dim
    if text_encoder is not None and token_dim != text_encoder.embed_dim:
        raise CheckpointError(f"{path}: the model predicts {token_dim}-d tokens but text encoder "
                              f"{text_encoder.identity} embeds {text_encoder.embed_dim}-d; use the encoder it was "
                              f"trained with ({(payload.get('text_encoder') or {}).get('identity', 'not recorded')})")
    built = model is None
    check_state(path, payload["model"], (lambda: SALModel(config)) if built else None)
    if built:
        model = SALModel(config)
    _load_state(model, payload["model"], path)
    if built:
        model.eval()
    meta = {"model_config": config, "token_dim": token_dim, "text_encoder": payload.get("text_encoder"),
            "extra": payload.get("extra") or {}, "torch_version": payload.get("torch_version"), "path": str(path)}
    return model, meta


def check_state(path, state: Any, build: Callable[[], Any] | None) -> None:
    """CheckpointError unless ``state`` is a dict of tensors, every floating one finite, and (``build``: the
    model the stored config describes) the built model's tensor names and shapes are exactly the file's. ``build``
    runs on the meta device and stops once it creates more tensors than the file holds."""
    import torch

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: the stored weights are not a mapping of names to tensors")
    if build is not None:
        with _meta_build(len(state), path):
            shell = build()
        _compare(shell.state_dict(), state, path)
    # a sum is NaN / inf when any element is (and is 5-10x faster than isfinite); suspects are confirmed exactly
    bad = [name for name, t in state.items() if (t.is_floating_point() or t.is_complex()) and t.numel()
           and not bool(t.sum().isfinite()) and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}); the model would give garbage: retrain or "
                              "use an earlier checkpoint")


def _shapes_only():
    """A torch function mode in which modules build without memory: tensors made by the allocating factories
    (``torch.empty`` behind every parameter, ``zeros``, ``ones``, ...) live on the meta device, and in-place ops on
    meta tensors (weight init: ``normal_``, ``uniform_``) are skipped, as they change no shape. Other ops (small
    constant buffers: ``logspace``) run as usual; ``torch.device("meta")`` would send them, and ``normal_``, through
    torch's decompositions, whose first use imports ~900 modules (seconds)."""
    import torch
    from torch.overrides import TorchFunctionMode

    factories = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.empty_strided}

    class ShapesOnly(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories:
                return func(*args, **{**kwargs, "device": "meta"})
            name = getattr(func, "__name__", "")
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
            if name.endswith("_") and not name.endswith("__") and isinstance(target, torch.Tensor) and target.is_meta:
                return target
            return func(*args, **kwargs)

    return ShapesOnly()


@contextlib.contextmanager
def _meta_build(tensors_in_file: int, path) -> Iterator[None]:
    """Build modules on the meta device, refusing an architecture with far more tensors than the file (a config
    claiming thousands of layers would take minutes to build even without memory)."""
    import torch
    from torch.nn.modules import module as nn_module

    budget = 2 * tensors_in_file + 64  # non-persistent buffers are not in the file
    me, count = threading.get_ident(), [0]

    def counted(_module, name, value):
        if threading.get_ident() == me:  # other threads may build their own modules meanwhile
            count[0] += 1
            if count[0] > budget:
                raise CheckpointError(f"{path}: the stored config describes a model with more than {budget} "
                                      f"tensors, the file holds {tensors_in_file}")

    hooks = [nn_module.register_module_parameter_registration_hook(counted),
             nn_module.register_module_buffer_registration_hook(counted)]
    try:
        with _shapes_only():
            yield
    finally:
        for hook in hooks:
            hook.remove()


def _load_state(model, state: dict, path) -> None:
    _compare(model.state_dict(), state, path)
    model.load_state_dict(state, strict=True)


def _compare(own: dict, state: dict, path) -> None:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
        raise CheckpointError(f"{path}: weights do not fit the model; " + "; ".join(parts))


__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "CheckpointError", "ModelError", "FORMAT_VERSION"]
