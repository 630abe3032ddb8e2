"""The segmenter's vocabulary at run time: parameter values parsed once, embedded in the background, versioned.

A change of ``prompts`` or ``vocabulary_file`` is parsed into a :class:`~sal_ros.model.vocabulary.Vocabulary`
once, in the on-set callback (a value that does not parse is refused with the reason); the post-set callback
hands that same value to one background thread, which embeds it and swaps it into the model between two frames
under the next version number. A change queued behind a newer one is skipped, so the newest request wins. Frames
keep flowing with the old vocabulary meanwhile.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sal_ros.nodes import outputs

@dataclass(frozen=True)
class ActiveVocabulary:
    """The vocabulary the model runs with: its version, classes and legend colours."""

    version: int
    vocabulary: Any
    class_names: tuple[str, ...]
    palette: np.ndarray

    @classmethod
    def of(cls, vocabulary: Any, version: int) -> "ActiveVocabulary":
        names = tuple(outputs.class_names_of(vocabulary))
        return cls(version, vocabulary, names, outputs.class_colors(len(names)))


def parse_vocabulary(name: str, value: Any) -> Any:
    """The Vocabulary a ``prompts`` list or a ``vocabulary_file`` path names; raises VocabularyError, OSError or
    ValueError with the reason."""
    from sal_ros.model.vocabulary import Vocabulary

    if name == "vocabulary_file":
        return Vocabulary.from_yaml(value)
    return Vocabulary.from_prompts(list(value))


def initial_vocabulary(values: dict) -> Any:
    """The vocabulary a node starts with: ``vocabulary_file`` when set, else ``prompts``."""
    if values["vocabulary_file"]:
        return parse_vocabulary("vocabulary_file", values["vocabulary_file"])
    return parse_vocabulary("prompts", values["prompts"])


class VocabularyChanges:
    """Parsed vocabulary requests, handed to one background thread that embeds and activates them in order.

    ``encode(vocabulary, version)`` gives the text embeddings, ``install(embeddings)`` puts them into the model;
    both happen under ``swap_lock`` (the node's model lock) together with the change of ``active``, so a frame
    sees one vocabulary. ``announce(active, ms)`` publishes a new active vocabulary; ``fail(source, exc)``
    reports a change that failed (the old vocabulary stays active).
    """

    def __init__(self, encode: Callable[[Any, int], Any], install: Callable[[Any], None], swap_lock: Any,
                 announce: Callable[[ActiveVocabulary, float], None],
                 fail: Callable[[str, BaseException], None]) -> None:
        self._encode, self._install, self._swap_lock = encode, install, swap_lock
        self._announce, self._fail = announce, fail
        self._lock = threading.Lock()
        self._request = 0
        self._parsed: dict[tuple[str, Any], Any] = {}  # on-set -> post-set hand-off, keyed by (name, value)
        self.active: ActiveVocabulary | None = None
        # one torch thread: PyTorch's OpenMP pool serves the thread that first used it (the worker)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sal_vocabulary",
                                          initializer=_one_torch_thread)

    def start(self, vocabulary: Any) -> ActiveVocabulary:
        """Activate the first vocabulary (version 1) on the calling thread."""
        return self._activate(vocabulary, 1)

    def _activate(self, vocabulary: Any, version: int) -> ActiveVocabulary:
        """Embed ``vocabulary`` and swap it into the model between two frames."""
        embeddings = self._encode(vocabulary, version)
        active = ActiveVocabulary.of(vocabulary, version)
        with self._swap_lock:
            self._install(embeddings)
            self.active = active
        return active

    def check(self, name: str, value: Any) -> Any:
        """Parse a new parameter value (on-set callback); raises with the reason when it cannot be used."""
        vocabulary = parse_vocabulary(name, value)
        with self._lock:
            self._parsed[(name, _hashable(value))] = vocabulary
        return vocabulary

    def request(self, name: str, value: Any) -> None:
        """Queue the value ``check`` parsed (post-set callback); the newest request wins."""
        with self._lock:
            vocabulary = self._parsed.pop((name, _hashable(value)), None)
            self._request += 1
            request = self._request
        if vocabulary is None:  # set without the on-set check (cannot happen through rclpy): parse on the thread
            self._thread.submit(self._parse_and_run, request, name, value)
        else:
            self._thread.submit(self._run, request, name, vocabulary)

    def _parse_and_run(self, request: int, name: str, value: Any) -> None:
        try:
            vocabulary = parse_vocabulary(name, value)
        except Exception as exc:  # noqa: BLE001 - reported; the old vocabulary stays
            self._fail(name, exc)
            return
        self._run(request, name, vocabulary)

    def _run(self, request: int, source: str, vocabulary: Any) -> None:
        with self._lock:
            if request != self._request:
                return  # a newer change is queued behind this one
        t0 = time.perf_counter()
        try:
            active = self._activate(vocabulary, self.active.version + 1)
        except Exception as exc:  # noqa: BLE001 - a failed change keeps the old vocabulary running
            self._fail(source, exc)
            return
        self._announce(active, (time.perf_counter() - t0) * 1e3)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)
