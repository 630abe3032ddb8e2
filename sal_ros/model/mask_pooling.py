"""How the query decoder's masked attention learns which voxels of a level a query may attend: the maxima of its
stride-1 mask logits over each level cell's children, as an additive attention mask (0 = attend, a huge negative =
not), without materialising more logits than the cache holds.

Two ways, the same keys allowed (tested): a ``PoolPlan`` per level (fine rows grouped by their level row, chunked to
``POOL_CHUNK_ROWS``) for any batch and stride, and for one scan whose levels halve again and again (MinkUNet's) a
``CellPool`` (all stride-1 logits in one matmul, then pooled step by step through the backbone's 2x2x2 maps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sal_ros.model.sparse import SparseCache
from sal_ros.model.sparse.maps import _downsample_with_parents, _stable_order


POOL_CHUNK_ROWS = 4096  # fine rows per chunk: 300 queries x 4096 x 2 bytes = 2.4 MB of logits, kept in cache
# Logits are pooled scaled by 2**100: exact in float32 and bfloat16 (a power of two, same exponent range; logits
# stay below 1e8), so clamping the pooled values at 0 gives the additive attention mask in one pass: 0 where a
# child's logit is positive, 2**100 x the most negative child logit (softmax weight exactly 0) where none is.
# A maximum of exactly 0.0 (an exact cancellation) is the one case it attends and ``QueryDecoder._allowed`` does
# not. float16 (max 65504) cannot hold the scale: inference runs in float32 or bf16.
MASK_SCALE = 2.0 ** 100


@dataclass
class PoolPlan:
    """How one level pools stride-1 logits (``pool_plan``): level rows grouped by a cap on their child count,
    fine rows chunk by chunk, each chunk a (cap, n) rank-major block: row r of column j is the r-th child of the
    chunk's j-th level row (its last child repeated past its count: the max is the same)."""

    order: Tensor  # (L,) level rows in plan order (mask column j is level row order[j])
    fine_rows: Tensor  # (sum of cap * n over chunks,) fine rows, chunk after chunk
    chunks: list[tuple[int, int, int, int]]  # (first entry of fine_rows, cap, first mask column, n)


def _count_caps(largest: int) -> Tensor:
    """Caps of the child counts: every count up to 8, then steps of ~1/4 (a row pads at most 25 %)."""
    caps = list(range(1, 9))
    while caps[-1] < largest:
        caps.append(caps[-1] + max(2, caps[-1] // 4))
    return torch.tensor(caps)


def pool_plan(parents: Tensor, n_level: int, chunk_rows: int = POOL_CHUNK_ROWS) -> PoolPlan:
    """The PoolPlan of fine voxels with level rows ``parents`` (every level row has a child, as ``parent_rows``
    gives for a level pooled from the fine voxels)."""
    counts = torch.bincount(parents, minlength=n_level)
    caps = _count_caps(int(counts.max()) if n_level else 0).to(parents.device)
    cap = torch.where(counts > 0, caps[torch.searchsorted(caps, counts).clamp_(max=len(caps) - 1)], 0)
    order = torch.argsort(cap, stable=True)
    column = torch.empty_like(order)
    column[order] = torch.arange(n_level, device=order.device)
    by_column = torch.argsort(column[parents], stable=True)  # fine rows grouped by their parent's column
    counts, cap = counts[order], cap[order]
    first = torch.cumsum(counts, 0) - counts  # each column's first child in by_column
    bucket_caps, bucket_sizes = torch.unique_consecutive(cap, return_counts=True)
    entries, chunks, start, col = [], [], 0, 0
    for c, size in zip(bucket_caps.tolist(), bucket_sizes.tolist()):
        rank = torch.arange(c, device=parents.device)[:, None]
        step = max(1, chunk_rows // c) if c else size
        for lo in range(col, col + size, step):
            hi = min(lo + step, col + size)
            entries.append((first[lo:hi] + torch.minimum(rank, counts[lo:hi] - 1)).reshape(-1))  # cap 0: none
            chunks.append((start, c, lo, hi - lo))
            start += c * (hi - lo)
        col += size
    fine_rows = by_column[torch.cat(entries)] if entries else by_column
    return PoolPlan(order, fine_rows, chunks)


def logit_dtype(mask_feats: Tensor) -> torch.dtype:
    """autocast's dtype when it is on (the matmul the training path runs), else the features' own."""
    device = mask_feats.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else mask_feats.dtype


def planned_level(values: tuple[Tensor, ...], keys: tuple[Tensor, ...], parents: list[Tensor],
                   mask_feats: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor, Tensor, PoolPlan]]:
    """Per batch element: values and keys in plan order, the mask features in the dtype the logits are computed
    in (autocast's when it is on), the plan."""
    out = []
    for v, k, p, mf in zip(values, keys, parents, mask_feats):
        plan = pool_plan(p, len(v))
        dtype = logit_dtype(mf)  # the attention's projections cast keys and values to it anyway
        out.append((v.to(dtype).index_select(0, plan.order), k.to(dtype).index_select(0, plan.order), mf.to(dtype),
                    plan))
    return out


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _max_over_ranks(logits: Tensor) -> Tensor:
    """(n, Q) maxima of (cap, n, Q) logits over their first dim, in place: halves folded onto halves, each fold
    one elementwise maximum over contiguous slabs (log2(cap) passes; amax over dim 0 ran 2x slower)."""
    while len(logits) > 1:
        half = len(logits) // 2
        if len(logits) % 2:
            torch.maximum(logits[0], logits[-1], out=logits[0])
        torch.maximum(logits[:half], logits[half:2 * half], out=logits[:half])
        logits = logits[:half]
    return logits[0]


def pool_planned(emb: Tensor, mask_feats: Tensor, plan: PoolPlan, out: Tensor | None = None) -> Tensor:
    """The additive (Q, L) attention mask (0 = attend, very negative = not) of the masks ``emb @ mask_feats.T``,
    its columns in plan order; ``mask_feats`` in the logits' dtype; ``out``: a buffer for the mask.

    Chunk by chunk the plan's fine rows are gathered, their (cap * n, Q) logits (rows first: that matmul runs 2x
    faster than (Q, rows)) reduced over the cap rank-major (n, Q) slabs, all in cache, and written transposed
    into the mask's columns. The reduction runs on the logits' bits read as signed integers (integer maxima
    run 2-4x faster than bfloat16 ones): by sign and magnitude, a float (not NaN) is > 0 iff its bits are > 0, so
    the bits' maximum is > 0 iff some child's logit is, and <= 0 otherwise, where it is the bits of the most
    negative child logit (-0.0 reads as the smallest integer); clamped at 0 that is the additive mask."""
    q, n_level = emb.shape[0], len(plan.order)
    weight = (emb * MASK_SCALE).to(mask_feats.dtype).T
    pooled = (mask_feats.new_empty(q * n_level) if out is None else out[: q * n_level]).view(q, n_level)
    most = max((c * n for _, c, _, n in plan.chunks), default=0)
    scratch, rows = mask_feats.new_empty(q * most), mask_feats.new_empty(most * mask_feats.shape[1])
    int_type = _SAME_WIDTH_INT[mask_feats.element_size()]
    bits = pooled.view(int_type)
    for start, c, col, n in plan.chunks:
        if c == 0:  # level rows without a child: never allowed
            pooled[:, col:col + n] = float("-inf")
            continue
        chunk = torch.index_select(mask_feats, 0, plan.fine_rows[start:start + c * n],
                                   out=rows[: c * n * mask_feats.shape[1]].view(c * n, -1))
        logits = torch.mm(chunk, weight, out=scratch[: q * c * n].view(c * n, q))
        bits[:, col:col + n].copy_(_max_over_ranks(logits.view(int_type).view(c, n, q)).T)
    return _additive(pooled)


def _additive(pooled: Tensor) -> Tensor:
    """(Q, L) maxima of the scaled logits, in place, as the additive attention mask (``pool_planned``)."""
    bits = pooled.view(_SAME_WIDTH_INT[pooled.element_size()])
    empty = bits.amax(1) <= 0  # a query whose mask is empty attends everywhere
    bits.clamp_(max=0)
    if bool(empty.any()):
        pooled[empty] = 0.0
    return pooled


# Whole (V, Q) logits of at most this size are pooled cell by cell: realtime's 1.4 MB and tiny's 4.1 MB (float32,
# 32 queries) gain; minkunet34's 55 MB (bf16, 300 queries) stay with the cache-sized chunks of a PoolPlan.
CELL_POOL_BYTES = 8 << 20


@dataclass
class CellPool:
    """How stride-1 logits reach a level of cells that halve again and again (``cell_stages``). Per step the
    parent cells are kept in order of falling child count, so the parents with an r-th child are a prefix: the
    step's ``rows`` (rows of the step before, or stride-1 voxels) list every parent's first child, then the second
    child of those that have one, and so on (``sizes``: how many parents have each rank; no padding).
    ``level_rows``: the last step's row of each level row."""

    steps: list[tuple[Tensor, list[int]]]
    level_rows: Tensor


def cell_stages(fine: Tensor, levels: dict[int, Tensor], cache: SparseCache | None = None) -> dict[int, CellPool] | None:
    """CellPools from the stride-1 voxel coordinates ``fine`` to each level's coordinates, or None unless every
    level stride is a power of two and its coordinates are the halved cells in their order (``_downsample_coords``
    order, as MinkUNet's levels are). ``cache``: the backbone's, whose 2x2x2 downsampling maps give the parents
    without a second downsampling (1.2 of realtime's 2.1 ms here)."""
    top = max(levels)
    if any(s & (s - 1) for s in levels) or not len(fine):
        return None
    steps, pools, coords, stride = [], {}, fine, 1
    position = None  # row of each cell of the step before in that step's output (None: stride-1 voxels)
    while stride < top:
        coords, parents = _halved(coords, stride, cache)
        n = len(coords)
        counts = torch.bincount(parents, minlength=n)
        # children grouped by parent
        order = _stable_order(parents, n) if fine.device.type == "cpu" else torch.argsort(parents, stable=True)
        if position is not None:
            order = position[order]
        first = torch.cumsum(counts, 0) - counts
        by_count = torch.argsort(counts, descending=True, stable=True)
        ranked = counts[by_count]
        sizes = [int(k) for k in (ranked[None] > torch.arange(8, device=fine.device)[:, None]).sum(1) if k]
        rows = torch.cat([order[first[by_count[:k]] + r] for r, k in enumerate(sizes)])
        steps.append((rows, sizes))
        position = torch.empty_like(by_count)
        position[by_count] = torch.arange(n, device=fine.device)
        stride *= 2
        if stride in levels:
            if not torch.equal(coords, levels[stride]):
                return None
            pools[stride] = CellPool(list(steps), position)
    return pools


def _halved(coords: Tensor, stride: int, cache: SparseCache | None) -> tuple[Tensor, Tensor]:
    """``_downsample_with_parents(coords, 2 * stride)``, from the cache's downsampling map from ``coords`` when it
    holds one (every input of a 2x2x2 stride-2 map is in exactly one pair, with its parent cell)."""
    kmap = None if cache is None or cache.coords.get(stride) is not coords else cache.kmaps.get((stride, 2, 2, 1))
    coarse = None if cache is None else cache.coords.get(2 * stride)
    if kmap is None or coarse is None or kmap.n_in != len(coords) or kmap.n_out != len(coarse):
        return _downsample_with_parents(coords, 2 * stride)
    parents = torch.empty(kmap.n_in, dtype=torch.int64, device=coords.device)
    parents[torch.cat(kmap.in_idx)] = torch.cat(kmap.out_idx)
    return coarse, parents


def pool_cells(emb: Tensor, mask_feats: Tensor, pool: CellPool, out: Tensor | None = None) -> Tensor:
    """``pool_planned`` through a CellPool, in level order: the (V, Q) logits of all stride-1 voxels in one
    matmul, then per step the children's rows gathered rank by rank and folded into the prefix of parents that
    have that rank by elementwise maxima (on the bits read as integers, as there). Maxima of maxima are the
    maxima over every stride-1 child of a level cell: the keys a PoolPlan allows (its masked-out values may differ
    in the last bit: its matmuls multiply gathered rows)."""
    q = emb.shape[0]
    int_type = _SAME_WIDTH_INT[mask_feats.element_size()]
    bits = torch.mm(mask_feats, (emb * MASK_SCALE).to(mask_feats.dtype).T).view(int_type)
    for rows, sizes in pool.steps:
        children = bits.index_select(0, rows)
        bits, start = children[:sizes[0]], sizes[0]
        for n in sizes[1:]:
            torch.maximum(bits[:n], children[start:start + n], out=bits[:n])
            start += n
    n_level = len(pool.level_rows)
    pooled = (mask_feats.new_empty(q * n_level) if out is None else out[: q * n_level]).view(q, n_level)
    pooled.view(int_type).copy_(bits.index_select(0, pool.level_rows).T)
    return _additive(pooled)


def allowed_pooled(emb: Tensor, mask_feats: Tensor, parents: Tensor, n_level: int) -> Tensor:
    """``QueryDecoder._allowed`` of the masks ``emb @ mask_feats.T`` without materializing them as (Q, V), as the
    additive (Q, V_level) attention mask (0 = attend, very negative = not) that scaled_dot_product_attention uses
    as is, in level order (the decoder keeps the plan's order instead)."""
    plan = pool_plan(parents, n_level)
    pooled = pool_planned(emb, mask_feats.to(logit_dtype(mask_feats)), plan)
    out = torch.empty_like(pooled)
    out[:, plan.order] = pooled
    return out
