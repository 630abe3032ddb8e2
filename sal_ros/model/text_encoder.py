"""Vocabularies embedded by an open_clip text encoder.

Every description is embedded through its vocabulary's prompt templates, averaged over templates. Per class the
descriptions then combine:

- ``mean``: one row per class, the normalized mean of its normalized description embeddings;
- ``max``: one row per description; a query's class score is its best similarity over the class's rows.

:class:`TextEmbeddings` holds the rows and ``row_class`` (the class of each row), so classification handles both
with one code path (sal_ros.model.inference.classify).

``TextEncoder(pretrained=None)`` builds the open_clip model with random weights drawn from a fixed seed
(sal_ros.model.open_clip_models): meaningless classes, but reproducible across processes.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Callable, Sequence

import numpy as np

from sal_ros.model.errors import ModelError
from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER, encoder_identity, load_open_clip
from sal_ros.model.vocabulary import (CONTEXT_LENGTH, MAX_CHARS, Vocabulary, VocabularyError, check_text,
                                      token_count)

EMBED_STEP_DESCRIPTIONS = 16  # descriptions embedded per batch (x templates texts): the unit of progress


@lru_cache(maxsize=8)
def _tokenizer(model_name: str):
    """open_clip's tokenizer of a model, built once per process (its BPE tables take ~0.4 s to read)."""
    import open_clip

    return open_clip.get_tokenizer(model_name)


@dataclass(frozen=True)
class TextEmbeddings:
    """A vocabulary's rows of L2-normalized text embeddings and the class of each row (``mean``: one row per
    class). Classes, thing flags, combination and version are the vocabulary's: a Segmentation made with these
    embeddings names the classes and version of the Vocabulary they were made from."""

    vocabulary: Vocabulary
    embeddings: np.ndarray  # (R, D) float32, unit rows
    row_class: np.ndarray  # (R,) int64 in [0, K)
    encoder: str = ""  # TextEncoder.identity

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.vocabulary.class_names

    @cached_property
    def thing(self) -> np.ndarray:
        """(K,) bool."""
        return np.array(self.vocabulary.things, bool)

    @property
    def combine(self) -> str:
        return self.vocabulary.combine

    @property
    def version(self) -> int:
        return self.vocabulary.version

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

    def encode(self, vocabulary: Vocabulary | Sequence[str], version: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> TextEmbeddings:
        """Embeddings of a vocabulary (a list of prompts counts as ``Vocabulary.from_prompts``), cached, under
        ``version`` (default: the vocabulary's). ``progress(done, total)`` is called with the descriptions embedded
        so far (it may raise to abandon)."""
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary.from_prompts(vocabulary)
        if version is not None and version != vocabulary.version:
            vocabulary = replace(vocabulary, version=version)
        key = vocabulary.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return replace(hit, vocabulary=vocabulary)
            out = self._encode(vocabulary, progress)
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
        missing = sorted((i for i, r in enumerate(rows) if r is None), key=lambda i: token_count(texts[i]))
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

    def _encode(self, vocab: Vocabulary, progress: Callable[[int, int], None] | None = None) -> TextEmbeddings:
        if self.context_length < CONTEXT_LENGTH:  # the parse checked CLIP's 77; this tokenizer reads fewer
            for c in vocab.classes:
                for d in c.descriptions:
                    check_text(d, f"class {c.name!r} description", MAX_CHARS, vocab.templates, self.context_length)
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
        return TextEmbeddings(vocab, rows.astype(np.float32), row_class.astype(np.int64), self.identity)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def tiny_text_encoder(device: str = "cpu") -> TextEncoder:
    """The tiny random text encoder (tests, plumbing demos): 512-d, milliseconds per vocabulary."""
    return TextEncoder(TINY_TEXT_ENCODER, None, device)
