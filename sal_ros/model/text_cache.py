"""Text embeddings kept across vocabularies and processes, per text encoder.

A row is the unit embedding of one prompt text, i.e. of one (description, template) pair formatted, so a new
vocabulary only embeds the texts no earlier one had. In memory a bounded LRU; on disk a folder per encoder
fingerprint (model name and a hash of its weights: a row is only ever read back by the weights that made it)
holding shards: one ``.npz`` (texts, rows; no pickle) per embedding run, written atomically, read at start.
A shard that cannot be read is skipped and named in the log; the cache is never needed for correctness.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from sal_ros.core.files import atomic_write, remove_temp_files

log = logging.getLogger(__name__)

MAX_ROWS = 65_536  # 128 MB of 512-d rows: the memory bound, and how many rows a start reads from disk
SHARD_SUFFIX = ".npz"


def default_cache_dir() -> Path:
    """``$SAL_ROS_CACHE/text_embeddings`` (default ``~/.cache/sal_ros``)."""
    root = os.environ.get("SAL_ROS_CACHE") or Path.home() / ".cache" / "sal_ros"
    return Path(root) / "text_embeddings"


def weights_fingerprint(module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes, dtypes, bytes), in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class TextEmbeddingCache:
    """Rows by prompt text for one encoder; ``folder=None`` keeps them in memory only."""

    def __init__(self, encoder_key: str, folder: str | os.PathLike | None, max_rows: int = MAX_ROWS) -> None:
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()
        self._max_rows = max_rows
        self.folder = None if folder is None else Path(folder) / re.sub(r"[^A-Za-z0-9._-]", "_", encoder_key)
        self.skipped_shards: list[str] = []
        if self.folder is not None and self.folder.is_dir():
            self._read_shards()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, text: str) -> np.ndarray | None:
        row = self._rows.get(text)
        if row is not None:
            self._rows.move_to_end(text)
        return row

    def put(self, texts: Sequence[str], rows: np.ndarray) -> None:
        """Keep ``rows`` (one per text) in memory, and write them as one shard when there is a folder."""
        self._remember(texts, rows)
        if self.folder is None or not len(texts):
            return
        name = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:24] + SHARD_SUFFIX
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / name, lambda f: np.savez(f, texts=np.array(texts, dtype=str),
                                                                rows=np.asarray(rows, np.float32)))
        except OSError as exc:  # a full disk or read-only home: the rows stay in memory
            log.warning("text embedding cache %s not written: %s", self.folder, exc)

    def _remember(self, texts: Sequence[str], rows: np.ndarray) -> None:
        for text, row in zip(texts, rows):
            self._rows[text] = row
            self._rows.move_to_end(text)
        while len(self._rows) > self._max_rows:
            self._rows.popitem(last=False)

    def _read_shards(self) -> None:
        remove_temp_files(self.folder)
        shards = sorted(self.folder.glob(f"*{SHARD_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
        for shard in shards:  # newest first, until the memory bound
            if len(self._rows) >= self._max_rows:
                break
            try:
                with np.load(shard, allow_pickle=False) as data:
                    texts, rows = data["texts"], data["rows"]
                if texts.ndim != 1 or rows.ndim != 2 or len(texts) != len(rows) or rows.dtype != np.float32:
                    raise ValueError(f"texts {texts.shape} and rows {rows.shape} {rows.dtype} do not match")
            except (OSError, ValueError, KeyError) as exc:
                self.skipped_shards.append(shard.name)
                log.warning("text embedding cache shard %s skipped: %s", shard, exc)
                continue
            for text, row in zip(texts.tolist(), rows):
                self._rows.setdefault(text, row)
