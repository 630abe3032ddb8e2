"""Zero-shot vocabulary: classes described by text, parsed and checked once.

A :class:`Vocabulary` is an ordered list of classes (label ``k`` = class ``k - 1``), each with one or more
descriptions (SAL: synonym sets such as car / jeep / SUV / van gave +23 PQ over bare class names) and a thing/stuff
flag (stuff segments merge into one per class at output time), the CLIP-style prompt templates its descriptions
are embedded through ("a photo of a {}.", ...; sal_ros.model.text_encoder) and how a class's descriptions combine
(``mean`` or ``max``). It is parsed from a prompt list (:meth:`Vocabulary.from_prompts`) or a YAML file
(:meth:`Vocabulary.from_yaml`), which check every text once, bounded by :class:`VocabularyLimits`; a node numbers
the vocabularies it activates (``version``).
"""
from __future__ import annotations

import hashlib
import json
import reprlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

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


@lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@lru_cache(maxsize=16384)
def token_count(text: str) -> int:
    """BPE tokens of a prompt text (without start and end): a vocabulary's texts are checked where it is built and
    again against the encoder that embeds it, so each is tokenized once."""
    return len(_bpe().encode(text))


def check_text(text: Any, what: str, max_chars: int, templates: Sequence[str], context_length: int) -> str:
    if not isinstance(text, str):
        raise VocabularyError(f"{what} must be a string, got {type(text).__name__} {_short(text)}")
    text = text.strip()
    if not text:
        raise VocabularyError(f"{what} is empty")
    if len(text) > max_chars:
        raise VocabularyError(f"{what} has {len(text)} characters (max {max_chars}): {text[:40]!r}...")
    longest = max((token_count(t.format(text)) for t in templates), default=0)
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
    out = [check_text(p, f"prompt {i}", max_chars, templates, context_length) for i, p in enumerate(prompts)]
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
    """Made by the parsers (:meth:`from_prompts`, :meth:`from_dict`, :meth:`from_yaml`), which check each text
    once; the constructor checks only the structure."""

    classes: tuple[VocabularyClass, ...]
    combine: str = "mean"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    source: str = ""  # where it came from (prompts / file path), for logs and ~/vocabulary
    version: int = 0  # the number a node gave it when it became active (0: never active); not part of the key

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "templates", tuple(self.templates))
        if self.combine not in COMBINE:
            raise VocabularyError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        if not self.templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in self.templates):
            raise VocabularyError(f"templates must be strings with exactly one '{{}}', got {list(self.templates)}")

    def _check_texts(self) -> "Vocabulary":
        """Class names and descriptions checked (the parsers' one pass over the texts); returns itself."""
        validate_prompts([c.name for c in self.classes], templates=("{}",))
        for c in self.classes:
            if not c.descriptions:
                raise VocabularyError(f"class {c.name!r} has no descriptions")
            for j, d in enumerate(c.descriptions):
                check_text(d, f"class {c.name!r} description {j}", MAX_CHARS, self.templates, CONTEXT_LENGTH)
        return self

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
            classes.append(VocabularyClass(name, tuple(t.strip() if isinstance(t, str) else t for t in descriptions),
                                           thing))
        return cls(tuple(classes), d.get("combine", "mean"), tuple(d.get("templates") or DEFAULT_TEMPLATES),
                   source)._check_texts()

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
        """Content hash (cache key): classes, descriptions, flags, combination and templates (not where it came
        from, not its version)."""
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
