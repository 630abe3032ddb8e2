"""The segmenter's vocabulary at run time: parameter values parsed once, embedded in the background, versioned.

A change of ``prompts`` or ``vocabulary_file`` is parsed into a :class:`~sal_ros.model.vocabulary.Vocabulary`
once, in the on-set callback, within bounded work: prompts are counted and tokenized (at most 256 of 200
characters), a file is read only when it is a regular file within ``vocabulary.max_file_bytes`` (a FIFO, device
or folder is refused before it is opened) and its classes, descriptions and templates within their limits. A
value that does not parse is refused with the reason. The post-set callback hands that same Vocabulary to one
background thread, which embeds it (text embeddings cached per prompt text, sal_ros.model.text_cache) and swaps
it into the model between two frames under the next version number; frames keep flowing with the old vocabulary
meanwhile. The newest request wins: a request for the vocabulary already pending or active changes nothing, and
a newer request abandons an older one between two embedding batches, so what the parameter says is what the
model gets. While a change is pending, :meth:`VocabularyChanges.status` says so ("re-embedding 48/256"); a change
that failed is reported until a later one succeeds.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from sal_ros.nodes import diagnostics as D
from sal_ros.nodes import outputs

if TYPE_CHECKING:
    from sal_ros.model.vocabulary import Vocabulary, VocabularyLimits


def limits_of(values: dict) -> VocabularyLimits:
    """The node's vocabulary file limits (parameters vocabulary.*)."""
    from sal_ros.model.vocabulary import VocabularyLimits

    return VocabularyLimits(int(values["vocabulary.max_file_bytes"]), int(values["vocabulary.max_descriptions"]),
                            int(values["vocabulary.max_templates"]))


def parse_vocabulary(name: str, value: Any, limits: VocabularyLimits) -> Vocabulary:
    """The Vocabulary a ``prompts`` list or a ``vocabulary_file`` path names; raises VocabularyError (a
    ValueError) with the reason."""
    from sal_ros.model.vocabulary import Vocabulary

    if name == "vocabulary_file":
        return Vocabulary.from_yaml(value, limits)
    return Vocabulary.from_prompts(list(value))


def initial_vocabulary(values: dict) -> Vocabulary:
    """The vocabulary a node starts with: ``vocabulary_file`` when set, else ``prompts``."""
    if values["vocabulary_file"]:
        return parse_vocabulary("vocabulary_file", values["vocabulary_file"], limits_of(values))
    return parse_vocabulary("prompts", values["prompts"], limits_of(values))


class Superseded(Exception):
    """Raised into an embedding run that a newer request replaced."""


@dataclass
class _Pending:
    request: int
    source: str
    vocabulary: Vocabulary
    done: int = 0
    total: int = 0


class VocabularyChanges:
    """Parsed vocabulary requests, handed to one background thread that embeds and activates the newest.

    ``encode(vocabulary, progress)`` gives the text embeddings of a vocabulary under its version, ``install
    (embeddings)`` puts them into the model; the install happens under ``swap_lock`` (the node's model lock)
    together with the change of ``active`` (the Vocabulary the model runs with, numbered), so a frame sees one
    vocabulary. ``announce(active, ms)`` publishes a new active vocabulary; ``fail(source,
    exc)`` reports a change that failed (the old vocabulary stays active); ``changed()`` is called when the status
    changes (a batch embedded, a request queued, superseded, failed or activated).
    """

    def __init__(self, encode: Callable[..., Any], install: Callable[[Any], None], swap_lock: Any,
                 announce: Callable[[Vocabulary, float], None], fail: Callable[[str, BaseException], None],
                 changed: Callable[[], None] = lambda: None) -> None:
        self._encode, self._install, self._swap_lock = encode, install, swap_lock
        self._announce, self._fail, self._changed = announce, fail, changed
        self._lock = threading.Lock()
        self._request = 0  # requests numbered in arrival order
        self._pending: _Pending | None = None  # the newest request not active yet
        self._parsed: dict[tuple[str, Any], Vocabulary] = {}  # on-set -> post-set hand-off, keyed by (name, value)
        self.active: Vocabulary | None = None
        self.failed: str | None = None  # why the newest change failed, until a later one becomes active
        self.superseded = 0
        # one torch thread: PyTorch's OpenMP pool serves the thread that first used it (the worker)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sal_vocabulary",
                                          initializer=_one_torch_thread)

    def start(self, vocabulary: Vocabulary) -> Vocabulary:
        """Activate the first vocabulary (version 1) on the calling thread."""
        return self._activate(vocabulary, 1)

    def check(self, name: str, value: Any, limits: VocabularyLimits) -> Vocabulary:
        """Parse a new parameter value (on-set callback); raises with the reason when it cannot be used."""
        vocabulary = parse_vocabulary(name, value, limits)
        with self._lock:
            self._parsed[(name, _hashable(value))] = vocabulary
            while len(self._parsed) > 8:  # checked values whose set failed on another parameter
                self._parsed.pop(next(iter(self._parsed)))
        return vocabulary

    def request(self, name: str, value: Any) -> None:
        """Queue the Vocabulary ``check`` parsed for this value (post-set callback); the newest request wins."""
        with self._lock:
            vocabulary = self._parsed.pop((name, _hashable(value)), None)
            if vocabulary is None:  # cannot happen through rclpy, which runs the on-set check first
                raise RuntimeError(f"{name}: request without a check")
            if self._pending is not None and self._pending.vocabulary.key == vocabulary.key:
                return  # already pending (e.g. a set_parameters sent twice): no new version
            if self._pending is None and self.active is not None and self.active.key == vocabulary.key:
                self.failed = None  # the parameter names the active vocabulary again
                pending = None
            else:
                self.superseded += self._pending is not None
                self._request += 1
                pending = self._pending = _Pending(self._request, name, vocabulary, 0, _descriptions(vocabulary))
        self._changed()
        if pending is not None:
            self._thread.submit(self._run, pending)

    def status(self) -> dict:
        """``{"state": "active" | "re-embedding" | "failed", "text": ..., "active_version", ...}``."""
        with self._lock:
            pending, failed, active = self._pending, self.failed, self.active
        out: dict[str, Any] = {"active_version": active.version if active else 0, "superseded": self.superseded}
        if pending is not None:
            out.update(state="re-embedding", text=f"re-embedding {pending.done}/{pending.total}",
                       source=pending.source, classes=len(pending.vocabulary), done=pending.done, total=pending.total)
        elif failed is not None:
            out.update(state="failed", text=f"failed, v{out['active_version']} stays active: {failed}")
        else:
            out.update(state="active", text=f"v{out['active_version']} active")
        return out

    def _activate(self, vocabulary: Vocabulary, version: int, progress: Callable[[int, int], None] | None = None
                  ) -> Vocabulary:
        """Embed ``vocabulary`` as ``version`` and swap it into the model between two frames."""
        active = replace(vocabulary, version=version)
        embeddings = self._encode(active, progress)
        with self._swap_lock:
            self._install(embeddings)
            self.active = active
        return active

    def _run(self, pending: _Pending) -> None:
        def progress(done: int, total: int) -> None:
            with self._lock:
                if pending is not self._pending:
                    raise Superseded()
                pending.done, pending.total = done, total
            self._changed()

        t0 = time.perf_counter()
        try:
            progress(0, pending.total)
            active = self._activate(pending.vocabulary, self.active.version + 1, progress)
        except Superseded:
            return
        except Exception as exc:  # noqa: BLE001 - a failed change keeps the old vocabulary running
            with self._lock:
                if pending is self._pending:
                    self._pending, self.failed = None, f"{type(exc).__name__}: {exc}"
            self._changed()
            self._fail(pending.source, exc)
            return
        with self._lock:
            if pending is self._pending:
                self._pending, self.failed = None, None
        self._announce(active, (time.perf_counter() - t0) * 1e3)
        self._changed()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def status_record(active: Vocabulary, status: dict) -> str:
    """JSON for ``~/debug/vocabulary``: the active vocabulary's record with the change status beside it."""
    record = json.loads(outputs.vocabulary_record(active))
    record["status"] = status
    return json.dumps(record)


def diagnostic_status(node: str, status: dict) -> Any:
    """The ``<node>: vocabulary`` diagnostic: OK when the parameters' vocabulary is active, WARN while one is
    being embedded or after one failed (the parameter then names a vocabulary the model does not run)."""
    level = {"active": D.OK, "re-embedding": D.WARN, "failed": D.WARN}[status["state"]]
    values = [("active version", str(status["active_version"])), ("state", status["state"]),
              ("superseded changes", str(status["superseded"]))]
    if status["state"] == "re-embedding":
        values.append(("progress", f"{status['done']}/{status['total']} descriptions"))
    return D.Status(f"{node}: vocabulary", level, status["text"], values)


def _descriptions(vocabulary: Vocabulary) -> int:
    return sum(len(c.descriptions) for c in vocabulary.classes)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)
