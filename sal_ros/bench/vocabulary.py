"""``sal-ros bench vocabulary``: how long a prompt change takes to embed, cold and warm.

For 4, 32 and 256 prompts (distinct realistic class names, the default six templates) it times, on one torch thread
like the node's vocabulary thread:

- ``parse``: the on-set parameter check (prompts -> Vocabulary, tokens counted against the context);
- ``cold``: embedding with empty caches (memory and disk), by an encoder that has run once (as a node's has);
- ``warm_memory``: the same prompts again in a running encoder (its text rows cached, not the whole vocabulary);
- ``warm_disk``: a fresh encoder (a restarted node) reading the rows the cold run wrote to disk; its start-up,
  which reads the cache, is reported as ``open_ms``.

Each figure is the median wall time and this thread's CPU time over ``--repeats`` runs (a fresh cache folder per
cold run). The reference is open_clip's own ``encode_text`` on the full 77-token context (what the node did before)
on the 4-prompt vocabulary in the same run; ``--reference-all`` times it for every size (256 takes minutes).
Goals (issue 25): 256 prompts <= 20 s cold and <= 1 s warm, 4 prompts <= 0.5 s, on one core.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sal_ros.bench.env import apply_threads, environment, finish

GOALS_S = {"cold_256": 20.0, "warm_256": 1.0, "cold_4": 0.5}
_ADJECTIVES = ("parked", "moving", "small", "large", "red", "white", "old", "wooden", "metal", "distant", "broken",
               "tall", "dark", "wet", "stone", "plastic")
_NOUNS = ("car", "truck", "bicycle", "person", "traffic sign", "tree trunk", "fence", "building", "bus", "pole",
          "motorcycle", "trailer", "bench", "road barrier", "street lamp", "construction vehicle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B-16", help="open_clip text encoder (default: the node's default)")
    parser.add_argument("--pretrained", default=None, help="weights (default: seeded random, same cost)")
    parser.add_argument("--sizes", default="4,32,256", help="prompt counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the vocabulary thread's)")
    parser.add_argument("--reference-all", action="store_true",
                        help="time the full-context reference for every size, not only the smallest")


def prompts(n: int) -> list[str]:
    """``n`` distinct class names of one to two words (bare nouns first, then adjective + noun)."""
    names = list(_NOUNS) + [f"{a} {b}" for a in _ADJECTIVES for b in _NOUNS]
    if n > len(names):
        raise ValueError(f"at most {len(names)} prompts")
    return names[:n]


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return (time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3, out


def _median(runs: list[tuple[float, float]]) -> dict:
    return {"wall_ms": round(float(np.median([r[0] for r in runs])), 1),
            "cpu_ms": round(float(np.median([r[1] for r in runs])), 1)}


def _uncached_parse(names: list[str]) -> Any:
    """The on-set check of prompts never seen (the token counts it caches are cleared first)."""
    from sal_ros.model.vocabulary import Vocabulary, token_count

    token_count.cache_clear()
    return Vocabulary.from_prompts(names)


def _full_context(encoder: Any, vocabulary: Any) -> np.ndarray:
    """open_clip's encode_text on every text, 77 positions each: the path before issue 25."""
    import torch

    texts = [t.format(d) for c in vocabulary.classes for d in c.descriptions for t in vocabulary.templates]
    with torch.inference_mode():
        return encoder.model.encode_text(encoder.tokenizer(texts)).float().numpy()


def measure(model: str, pretrained: str | None, n: int, repeats: int, reference: bool) -> dict:
    from sal_ros.model.text_encoder import TextEncoder
    from sal_ros.model.vocabulary import Vocabulary

    names = prompts(n)
    Vocabulary.from_prompts(["warm-up"])  # the tokenizer's tables load once per process (a node: at start)
    parse = [_timed(lambda: _uncached_parse(names))[:2] for _ in range(repeats)]
    vocabulary = Vocabulary.from_prompts(names)
    cold, warm_memory, warm_disk, opened = [], [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="sal_bench_vocab_") as folder:
            encoder = TextEncoder(model, pretrained, "cpu", cache_dir=folder)
            encoder.embed_texts(["a photo of a warm-up."])  # a node's first pass is paid at start (warm-up)
            wall, cpu, first = _timed(lambda: encoder.encode(vocabulary))
            cold.append((wall, cpu))
            encoder._cache.clear()  # the whole-vocabulary cache would answer at once: time the per-text rows
            warm_memory.append(_timed(lambda: encoder.encode(vocabulary))[:2])
            wall, cpu, restarted = _timed(lambda: TextEncoder(model, pretrained, "cpu", cache_dir=folder))
            opened.append((wall, cpu))
            wall, cpu, again = _timed(lambda: restarted.encode(vocabulary))
            warm_disk.append((wall, cpu))
            if not np.array_equal(first.embeddings, again.embeddings):
                raise AssertionError("rows read back from the disk cache differ from the rows written")
    out = {"prompts": n, "texts": n * len(vocabulary.templates), "parse": _median(parse), "cold": _median(cold),
           "warm_memory": _median(warm_memory), "warm_disk": _median(warm_disk),
           "open_with_disk_cache": _median(opened)}
    if reference:
        ref = [_timed(lambda: _full_context(encoder, vocabulary)) for _ in range(repeats)]
        out["reference_full_context"] = _median([r[:2] for r in ref])
        fast = encoder.embed_texts([t.format(d) for d in names for t in vocabulary.templates])
        full = ref[-1][2] / np.linalg.norm(ref[-1][2], axis=1, keepdims=True)
        out["max_abs_difference_to_reference"] = float(np.abs(fast - full).max())
        out["speedup_cold_vs_reference"] = round(out["reference_full_context"]["wall_ms"] / out["cold"]["wall_ms"], 2)
    return out


def main(args: argparse.Namespace) -> int:
    threads = apply_threads(args.threads)
    env = environment()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results = [measure(args.model, args.pretrained, n, args.repeats, args.reference_all or n == min(sizes))
               for n in sizes]
    by_size = {r["prompts"]: r for r in results}
    goals = {}
    if 256 in by_size:
        goals["cold_256_s"] = {"measured_s": by_size[256]["cold"]["wall_ms"] / 1e3, "goal_s": GOALS_S["cold_256"]}
        warm = max(by_size[256]["warm_memory"]["wall_ms"], by_size[256]["warm_disk"]["wall_ms"])
        goals["warm_256_s"] = {"measured_s": warm / 1e3, "goal_s": GOALS_S["warm_256"]}
    if 4 in by_size:
        goals["cold_4_s"] = {"measured_s": by_size[4]["cold"]["wall_ms"] / 1e3, "goal_s": GOALS_S["cold_4"]}
    for goal in goals.values():
        goal["met"] = goal["measured_s"] <= goal["goal_s"]
    print(json.dumps({"bench": "vocabulary", "model": args.model, "pretrained": args.pretrained or "seeded random",
                      "threads": threads, "repeats": args.repeats, "results": results, "goals": goals,
                      "environment": finish(env)}, indent=2))
    return 0


__all__ = ["add_arguments", "main", "measure", "prompts"]
