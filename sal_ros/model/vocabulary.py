"""Zero-shot vocabulary: classes described by text, embedded by an open_clip text encoder.

A :class:`Vocabulary` is an ordered list of classes (label ``k`` = class ``k - 1``), each with one or more
descriptions (SAL: synonym sets such as car / jeep / SUV / van gave +23 PQ over bare class names) and a thing/stuff
flag (stuff segments merge into one per class at output time). Every description is embedded through CLIP-style
prompt templates ("a photo of a {}.", ...), averaged over templates. Per class the descriptions then combine:

- ``mean``: one row per class, the normalized mean of its normalized description embeddings;
- ``max``: one row per description; a query's class score is its best similarity over the class's rows.

:class:`TextEmbeddings` holds the rows and ``row_class`` (the class of each row), so classification handles both
with one code path (sal_ros.model.inference.classify).

``TextEncoder(pretrained=None)`` builds the open_clip model with random weights drawn from a fixed seed:
meaningless classes, but reproducible across processes (training oracle, node and evaluation agree). Weights
come from a local file or, only when the user names one, an open_clip pretrained tag (downloads).
"""
from __future__ import annotations

import hashlib
import json
import os
import reprlib
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from sal_ros.model.errors import ModelError

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a lidar scan of a {}.",
    "a 3D point cloud of a {}.",
    "a {} in a street scene.",
    "there is a {} in the scene.",
)
COMBINE = ("mean", "max")
CONTEXT_LENGTH = 77  # CLIP text context, start and end tokens included
MAX_CLASSES = 256
MAX_CHARS = 200
EMBED_STEP_DESCRIPTIONS = 16  # descriptions embedded per batch (x templates texts): the unit of progress

# A width-64, one-layer random CLIP text tower with a 512-d output (ViT-B-16's embed_dim, so it pairs with the
# default model config): encodes 20 prompts in milliseconds on CPU. For tests and plumbing demos only.
TINY_TEXT_ENCODER = "sal-tiny-text"
_TINY_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
_RANDOM_SEED = 0


def _short(value: Any) -> str:
    """A repr for error messages, bounded whatever the value (an aliased YAML structure can stand for gigabytes)."""
    short = reprlib.Repr()  # Python 3.11 takes no keyword arguments
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, 40, 40
    text = short.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class VocabularyError(ValueError):
    """A vocabulary (prompts, YAML file) that cannot be used; the text names the problem."""


@dataclass(frozen=True)
class VocabularyLimits:
    """Bounds on a vocabulary file, checked before the work they bound (reading, tokenizing, embedding): a file
    of 50k descriptions took 152 s and 3.7 GB to embed."""

    max_file_bytes: int = 256 * 1024
    max_descriptions: int = 1024  # all classes together; each is embedded once per template
    max_templates: int = 16


# ------------------------------------------------------------------------------------------- validation
@lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@lru_cache(maxsize=8)
def _tokenizer(model_name: str):
    """open_clip's tokenizer of a model, built once per process (its BPE tables take ~0.4 s to read)."""
    import open_clip

    return open_clip.get_tokenizer(model_name)


@lru_cache(maxsize=16384)
def _token_count(text: str) -> int:
    """BPE tokens of a prompt text (without start and end): a vocabulary's texts are checked where it is built and
    again against the encoder that embeds it, so each is tokenized once."""
    return len(_bpe().encode(text))


def _check_text(text: Any, what: str, max_chars: int, templates: Sequence[str], context_length: int) -> str:
    if not isinstance(text, str):
        raise VocabularyError(f"{what} must be a string, got {type(text).__name__} {_short(text)}")
    text = text.strip()
    if not text:
        raise VocabularyError(f"{what} is empty")
    if len(text) > max_chars:
        raise VocabularyError(f"{what} has {len(text)} characters (max {max_chars}): {text[:40]!r}...")
    longest = max((_token_count(t.format(text)) for t in templates), default=0)
    if longest + 2 > context_length:  # + start and end tokens
        raise VocabularyError(f"{what} {text[:40]!r} needs {longest + 2} tokens with its prompt template; "
                              f"the text encoder reads {context_length}")
    return text


def validate_prompts(prompts: Any, max_classes: int = MAX_CLASSES, max_chars: int = MAX_CHARS,
                     templates: Sequence[str] = DEFAULT_TEMPLATES, context_length: int = CONTEXT_LENGTH) -> list[str]:
    """Check a prompt list (one class per prompt); returns the stripped prompts or raises VocabularyError."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise VocabularyError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise VocabularyError("prompts is empty: give at least one class")
    if len(prompts) > max_classes:
        raise VocabularyError(f"{len(prompts)} prompts, at most {max_classes} classes are supported")
    out = [_check_text(p, f"prompt {i}", max_chars, templates, context_length) for i, p in enumerate(prompts)]
    seen: dict[str, int] = {}
    for i, p in enumerate(out):
        j = seen.setdefault(p.casefold(), i)
        if j != i:
            raise VocabularyError(f"prompt {i} {p!r} duplicates prompt {j} {out[j]!r} (case-insensitive)")
    return out


# ------------------------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class VocabularyClass:
    name: str
    descriptions: tuple[str, ...]
    thing: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "descriptions", tuple(self.descriptions))


@dataclass(frozen=True)
class Vocabulary:
    classes: tuple[VocabularyClass, ...]
    combine: str = "mean"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    source: str = ""  # where it came from (prompts / file path), for logs and ~/vocabulary

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "templates", tuple(self.templates))
        if self.combine not in COMBINE:
            raise VocabularyError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        if not self.templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in self.templates):
            raise VocabularyError(f"templates must be strings with exactly one '{{}}', got {list(self.templates)}")
        validate_prompts([c.name for c in self.classes], templates=("{}",))
        for c in self.classes:
            if not c.descriptions:
                raise VocabularyError(f"class {c.name!r} has no descriptions")
            for j, d in enumerate(c.descriptions):
                _check_text(d, f"class {c.name!r} description {j}", MAX_CHARS, self.templates, CONTEXT_LENGTH)

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], combine: str = "mean",
                     templates: Sequence[str] = DEFAULT_TEMPLATES) -> "Vocabulary":
        """One thing class per prompt, described by the prompt itself."""
        names = validate_prompts(prompts, templates=templates)
        return cls(tuple(VocabularyClass(n, (n,), True) for n in names), combine, tuple(templates), "prompts")

    @classmethod
    def from_dict(cls, d: dict, source: str = "", limits: VocabularyLimits = VocabularyLimits()) -> "Vocabulary":
        """``{classes: [{name, descriptions: [...], thing: bool}], combine: mean|max, templates: [...]}``.

        ``descriptions`` defaults to ``[name]`` and ``thing`` to true. The counts are checked against ``limits``
        before any text is looked at.
        """
        what = source or "vocabulary"
        if not isinstance(d, dict):
            raise VocabularyError(f"{what}: expected a mapping with 'classes', got {type(d).__name__}")
        unknown = set(d) - {"classes", "combine", "templates"}
        if unknown:
            raise VocabularyError(f"{what}: unknown keys {_short(sorted(map(str, unknown)))}")
        items = d.get("classes")
        if not isinstance(items, list) or not items:
            raise VocabularyError(f"{what}: 'classes' must be a non-empty list")
        _check_counts(what, items, d.get("templates"), limits)
        classes = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "name" not in item:
                raise VocabularyError(f"{source or 'vocabulary'}: class {i} must be a mapping with a 'name'")
            extra = set(item) - {"name", "descriptions", "thing"}
            if extra:
                raise VocabularyError(f"class {_short(item['name'])}: unknown keys "
                                      f"{_short(sorted(map(str, extra)))}")
            descriptions = item.get("descriptions", [item["name"]])
            if isinstance(descriptions, str) or not isinstance(descriptions, list):
                raise VocabularyError(f"class {item['name']!r}: descriptions must be a list of strings")
            thing = item.get("thing", True)
            if not isinstance(thing, bool):
                raise VocabularyError(f"class {item['name']!r}: thing must be true or false, got {thing!r}")
            name = item["name"].strip() if isinstance(item["name"], str) else item["name"]
            classes.append(VocabularyClass(name, tuple(d_.strip() if isinstance(d_, str) else d_ for d_ in descriptions), thing))
        return cls(tuple(classes), d.get("combine", "mean"), tuple(d.get("templates") or DEFAULT_TEMPLATES), source)

    @classmethod
    def from_yaml(cls, path: str | Path, limits: VocabularyLimits = VocabularyLimits()) -> "Vocabulary":
        """A vocabulary file: a regular file (a FIFO, device or folder is refused before it is opened) of at
        most ``limits.max_file_bytes``, YAML within the alias budget, classes within the counts of ``limits``."""
        from sal_ros.core.yamlfile import load_yaml

        try:
            data = load_yaml(path, "vocabulary file", max_bytes=limits.max_file_bytes)
        except ValueError as exc:  # not a regular file, too large, not UTF-8, not YAML, an alias bomb
            raise VocabularyError(str(exc)) from None
        except FileNotFoundError:
            raise VocabularyError(f"vocabulary file {path}: not found") from None
        except OSError as exc:
            raise VocabularyError(f"vocabulary file {path}: {exc.strerror or exc}") from None
        return cls.from_dict(data, source=str(path), limits=limits)

    def to_dict(self) -> dict:
        return {"combine": self.combine, "templates": list(self.templates),
                "classes": [{"name": c.name, "descriptions": list(c.descriptions), "thing": c.thing} for c in self.classes]}

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def descriptions(self) -> list[list[str]]:
        return [list(c.descriptions) for c in self.classes]

    @property
    def things(self) -> list[bool]:
        return [c.thing for c in self.classes]

    @property
    def key(self) -> str:
        """Content hash (cache key): classes, descriptions, flags, combination and templates."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.classes)


def _check_counts(what: str, items: list, templates: Any, limits: VocabularyLimits) -> None:
    """Classes, descriptions and templates within ``limits``, counted without reading a text."""
    if len(items) > MAX_CLASSES:
        raise VocabularyError(f"{what}: {len(items)} classes, at most {MAX_CLASSES} are supported")
    described = [item.get("descriptions") if isinstance(item, dict) else None for item in items]
    total = sum(len(x) if isinstance(x, list) else 1 for x in described)
    if total > limits.max_descriptions:
        raise VocabularyError(f"{what}: {total} descriptions, at most {limits.max_descriptions} "
                              "(parameter vocabulary.max_descriptions)")
    if isinstance(templates, list) and len(templates) > limits.max_templates:
        raise VocabularyError(f"{what}: {len(templates)} templates, at most {limits.max_templates} "
                              "(parameter vocabulary.max_templates)")


# ------------------------------------------------------------------------------------------- embeddings
@dataclass(frozen=True)
class TextEmbeddings:
    """Rows of L2-normalized text embeddings and the class of each row (``mean``: one row per class)."""

    class_names: tuple[str, ...]
    thing: np.ndarray  # (K,) bool
    embeddings: np.ndarray  # (R, D) float32, unit rows
    row_class: np.ndarray  # (R,) int64 in [0, K)
    combine: str = "mean"
    version: int = 0
    encoder: str = ""  # TextEncoder.identity

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """One embedding per class, as an array; a ``max`` vocabulary has several rows per class and refuses."""
        if len(self.row_class) != self.num_classes:
            raise VocabularyError("this vocabulary combines descriptions by 'max': use .embeddings with .row_class")
        return self.embeddings if dtype is None else self.embeddings.astype(dtype)


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


class TextEncoder:
    """open_clip text tower (the vision tower is dropped after loading) with caches of embeddings: whole
    vocabularies (LRU of ``cache_size``) and single prompt texts (in memory, and on disk under ``cache_dir``;
    sal_ros.model.text_cache)."""

    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | None = None, device: str = "cpu",
                 cache_size: int = 16, cache_dir: str | os.PathLike | None = None) -> None:
        import open_clip
        import torch

        from sal_ros.model.text_cache import TextEmbeddingCache, weights_fingerprint

        self.model_name, self.pretrained = model_name, pretrained or None
        self.device = torch.device(device)
        model = load_open_clip(model_name, self.pretrained, text_only=True)
        if hasattr(model, "visual"):
            model.visual = torch.nn.Identity()  # text only: frees the image tower's memory
        self.model = model.to(self.device).eval()
        self.tokenizer = _tokenizer(model_name)
        self.context_length = int(getattr(self.tokenizer, "context_length", CONTEXT_LENGTH))
        self.embed_dim = int(open_clip.get_model_config(model_name)["embed_dim"])
        self.identity = encoder_identity(model_name, self.pretrained)
        self.fingerprint = weights_fingerprint(self.model)
        self._cache: OrderedDict[str, TextEmbeddings] = OrderedDict()
        self._cache_size = cache_size
        self.texts = TextEmbeddingCache(f"{model_name}-{self.fingerprint[:16]}", cache_dir)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TextEncoder({self.identity}, dim={self.embed_dim}, device={self.device})"

    def check_token_dim(self, token_dim: int, what: str = "the model") -> None:
        if int(token_dim) != self.embed_dim:
            raise ModelError(f"{what} predicts {token_dim}-d tokens but text encoder {self.identity} embeds "
                             f"{self.embed_dim}-d: use the text encoder the model was trained with")

    def encode(self, vocabulary: Vocabulary | Sequence[str], version: int = 0,
               progress: Callable[[int, int], None] | None = None) -> TextEmbeddings:
        """Embeddings of a vocabulary (a list of prompts counts as ``Vocabulary.from_prompts``), cached.
        ``progress(done, total)`` is called with the descriptions embedded so far (it may raise to abandon)."""
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary.from_prompts(vocabulary)
        key = vocabulary.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return replace(hit, version=version)
            out = self._encode(vocabulary, version, progress)
            self._cache[key] = out
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def embed_texts(self, texts: Sequence[str], batch: int = 256) -> np.ndarray:
        """(len(texts), D) float32 unit rows, computed (not cached)."""
        import torch

        rows = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                tokens = self.tokenizer(list(texts[i:i + batch])).to(self.device)
                rows.append(torch.nn.functional.normalize(self._encode_tokens(tokens).float(), dim=-1).cpu())
        return torch.cat(rows).numpy()

    def _encode_tokens(self, tokens):
        """open_clip's ``encode_text``, on the tokens up to the longest text's end token: under the causal mask a
        position never sees the padding after it, and the pooled end token is within, so the result is the same
        (to float rounding) for a fraction of the work (a prompt is ~10 of the 77 positions)."""
        import open_clip
        import torch

        model = self.model
        if not (isinstance(model, open_clip.CLIP) and model.attn_mask is not None
                and model.text_pool_type == "argmax" and getattr(model.transformer, "batch_first", True)):
            return model.encode_text(tokens)
        n = int((tokens != 0).any(0).nonzero().max()) + 1  # 0 pads every text after its end token
        tokens = tokens[:, :n]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
        x = x[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)]
        if model.text_projection is None:
            return x
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection

    def _embed_cached(self, texts: list[str], per_step: int, progress: Callable[[int, int], None] | None,
                      total: int) -> np.ndarray:
        """Rows of ``texts``: from the text cache, the rest embedded ``per_step`` texts at a time (and cached);
        ``progress`` after each step with the share of ``total`` (descriptions) done."""
        rows = [self.texts.get(t) for t in texts]
        # shortest first: a batch runs to its longest text, so texts of one length batch together
        missing = sorted((i for i, r in enumerate(rows) if r is None), key=lambda i: _token_count(texts[i]))
        done_before = len(texts) - len(missing)
        if progress is not None:
            progress(done_before * total // max(len(texts), 1), total)
        for start in range(0, len(missing), per_step):
            step = missing[start:start + per_step]
            new = self.embed_texts([texts[i] for i in step], batch=per_step)
            self.texts.put([texts[i] for i in step], new)
            for i, row in zip(step, new):
                rows[i] = row
            if progress is not None:
                progress((done_before + start + len(step)) * total // len(texts), total)
        return np.stack(rows) if rows else np.zeros((0, self.embed_dim), np.float32)

    def _encode(self, vocab: Vocabulary, version: int,
                progress: Callable[[int, int], None] | None = None) -> TextEmbeddings:
        for c in vocab.classes:  # this tokenizer's context may be shorter than CLIP's 77
            for d in c.descriptions:
                _check_text(d, f"class {c.name!r} description", MAX_CHARS, vocab.templates, self.context_length)
        descriptions = [d for c in vocab.classes for d in c.descriptions]
        owner = np.repeat(np.arange(len(vocab)), [len(c.descriptions) for c in vocab.classes])
        t = len(vocab.templates)
        texts = [tpl.format(d) for d in descriptions for tpl in vocab.templates]
        flat = self._embed_cached(texts, EMBED_STEP_DESCRIPTIONS * t, progress, len(descriptions))
        per_description = _unit(flat.reshape(len(descriptions), t, -1).mean(1))
        if vocab.combine == "mean":
            sums = np.zeros((len(vocab), per_description.shape[1]), np.float64)
            np.add.at(sums, owner, per_description)
            rows, row_class = _unit(sums), np.arange(len(vocab))
        else:
            rows, row_class = per_description, owner
        return TextEmbeddings(vocab.class_names, np.array(vocab.things, bool), rows.astype(np.float32),
                              row_class.astype(np.int64), vocab.combine, version, self.identity)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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


def tiny_text_encoder(device: str = "cpu") -> TextEncoder:
    """The tiny random text encoder (tests, plumbing demos): 512-d, milliseconds per vocabulary."""
    return TextEncoder(TINY_TEXT_ENCODER, None, device)


__all__ = ["Vocabulary", "VocabularyClass", "VocabularyError", "VocabularyLimits", "TextEncoder", "TextEmbeddings", "validate_prompts",
           "tiny_text_encoder", "TINY_TEXT_ENCODER", "DEFAULT_TEMPLATES", "ModelError"]
