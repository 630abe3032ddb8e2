"""Mask2Former-style query decoder over sparse voxel features (as MaskPLS / Mask4Former, with SAL's heads).

``num_queries`` learned queries (features + positional embeddings) run ``decoder_rounds`` rounds; each round
visits the attention levels (``attention_strides``, coarse first) once with a layer of masked cross-attention to
that level's voxels, self-attention among the queries, and an FFN (post-norm, as Mask2Former). Before the first
layer and after every layer each query predicts

- mask logits over the stride-1 voxels (mask embedding . per-voxel mask feature),
- objectness logits ``(object, no-object)`` (index ``OBJECT`` is "object", as sal_ros.train.matching expects),
- a CLIP token of ``token_dim`` dims, L2-normalized,

so training can supervise every layer. Masked attention: a query only attends to the voxels of a level whose
children its previous mask covers (max logit > 0); a query whose mask is empty attends everywhere.
Clouds of one batch have different voxel counts, so cross-attention and mask prediction loop over batch
elements; self-attention and FFNs are batched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sal_ros.model.config import ModelConfig
from sal_ros.model.sparse import SparseCache, SparseTensor
from sal_ros.model.sparse.maps import _downsample_with_parents, _stable_order

OBJECT = 0  # objectness logits are (object, no-object), as in Mask2Former's "last class is no-object"


@dataclass
class LayerPrediction:
    """One decoder layer's predictions per batch element, masks over that element's stride-1 voxels."""

    masks: list[Tensor]  # [(Q, V_b)] logits
    objectness: Tensor  # (B, Q, 2) logits
    tokens: Tensor  # (B, Q, D) L2-normalized


class MLP(nn.Sequential):
    def __init__(self, cin: int, hidden: int, cout: int, layers: int) -> None:
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(cin if i == 0 else hidden, cout if i == layers - 1 else hidden))
            if i < layers - 1:
                mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)


POSITION_BLOCK_ROWS = 8192  # 8192 voxels x 128 float32 = 4 MB per block of positions cast to a narrower dtype


class FourierPositions(nn.Module):
    """Voxel centres in metres -> ``dim`` features: sin/cos at geometric wavelengths, then a linear layer."""

    def __init__(self, dim: int, min_wavelength: float, max_wavelength: float = 256.0, num_freqs: int = 16) -> None:
        super().__init__()
        wavelengths = torch.logspace(math.log10(min_wavelength), math.log10(max_wavelength), num_freqs)
        self.register_buffer("freqs", 2 * math.pi / wavelengths, persistent=False)
        self.proj = nn.Linear(6 * num_freqs, dim)

    def forward(self, xyz: Tensor) -> Tensor:
        angles = (xyz[:, :, None] * self.freqs.to(xyz.dtype)).flatten(1)  # (N, 3F)
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=1))

    def of_cells(self, coords: Tensor, offset: float, voxel_size: float, bias: Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
        """``forward`` of the centres ``(coords + offset) * voxel_size`` of integer voxel coords ``(N, 3)``, float32,
        plus ``bias`` (a caller's own bias, folded in here for free); ``dtype``: cast to it (without autograd
        block by block, never a full-size float32 copy: the same bits as ``.to(dtype)``).

        The projection is linear, so it splits into one table per axis: the projected sin/cos of each cell index
        along that axis (a scan spans a few thousand, not ~10^5 voxels), summed per voxel by one embedding_bag.
        Same features as ``forward`` up to float32 rounding (autocast off: more exact than its bf16 linear)."""
        if len(coords) == 0:
            return self.proj.weight.new_zeros(0, self.proj.out_features, dtype=dtype)
        lo = coords.min(0).values
        rows = (coords - lo).long()  # (N, 3) rows of the axes' tables
        span = int(rows.max()) + 1
        cells = torch.arange(span, device=coords.device)[:, None] + lo  # (R, 3) integer cells
        with torch.autocast(coords.device.type, enabled=False):
            angles = ((cells.float() + offset) * voxel_size)[:, :, None] * self.freqs  # (R, 3, F)
            # proj's inputs are [sin x, sin y, sin z, cos x, cos y, cos z], F each
            weight = self.proj.weight.float().view(-1, 2, coords.shape[1], len(self.freqs))
            tables = [angles[:, a].sin() @ weight[:, 0, a].T + angles[:, a].cos() @ weight[:, 1, a].T
                      for a in range(coords.shape[1])]  # (R, dim) each
            tables[0] = tables[0] + self.proj.bias.float() + (0.0 if bias is None else bias.float())  # once per voxel
            rows += torch.arange(coords.shape[1], device=coords.device) * span  # the axes' tables stacked
            table = torch.cat(tables)
            if dtype == torch.float32 or torch.is_grad_enabled():
                return F.embedding_bag(rows, table, mode="sum").to(dtype)
            out = table.new_empty(len(rows), table.shape[1], dtype=dtype)
            for start in range(0, len(rows), POSITION_BLOCK_ROWS):
                block = slice(start, start + POSITION_BLOCK_ROWS)
                out[block] = F.embedding_bag(rows[block], table, mode="sum")
            return out


def _add_linear(base: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``base + x @ weight.T`` as ``torch.addmm(base.to(x.dtype), x, weight.T)`` computes it (autocast included).
    Without autograd in place on the cast ``base``: addmm copies its input into a fresh output and then runs the
    same in-place product, so this skips one (V, d) copy and its page faults, same bits."""
    if torch.is_grad_enabled():
        return torch.addmm(base.to(x.dtype), x, weight.T)
    dtype = _logit_dtype(x)
    return base.to(dtype).addmm_(x.to(dtype), weight.T.to(dtype))


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention; ``allowed`` (B|1, Lq, Lk) bool, True = attend
    (or an additive float mask, 0 = attend, -inf = not)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None) -> Tensor:
        b, lq, d = q.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

        mask = None if allowed is None else allowed[:, None]
        out = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(k)), split(self.v(v)), attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(b, lq, d))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.cross = Attention(dim, heads, dropout)
        self.self_attn = Attention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, qpos: Tensor, memory: list[tuple[Tensor, Tensor, Tensor | None]]) -> Tensor:
        """``memory``: per batch element (values (V, d), keys = values + positions (V, d), allowed (Q, V))."""
        attended = [self.cross(q[b:b + 1] + qpos[b:b + 1], keys[None], values[None],
                               None if allowed is None else allowed[None])
                    for b, (values, keys, allowed) in enumerate(memory)]
        q = self.norms[0](q + self.drop(torch.cat(attended, 0)))
        qk = q + qpos
        q = self.norms[1](q + self.drop(self.self_attn(qk, qk, q)))
        return self.norms[2](q + self.drop(self.ffn(q)))


def batch_splits(x: SparseTensor, batch_size: int) -> list[int]:
    """Rows per batch element (sparse tensors keep rows sorted by batch index)."""
    return torch.bincount(x.coords[:, 0].long(), minlength=batch_size).tolist()


def parent_rows(fine: Tensor, coarse: Tensor, stride: int) -> Tensor:
    """Row in ``coarse`` (coords of tensor stride ``stride``) of each ``fine`` voxel's parent cell."""
    parent = fine.long().clone()
    parent[:, 1:] = torch.div(parent[:, 1:], stride, rounding_mode="floor") * stride
    c = coarse.long()
    lo = torch.minimum(parent.min(0).values, c.min(0).values)
    ext = (torch.maximum(parent.max(0).values, c.max(0).values) - lo + 1).tolist()
    mult = torch.tensor([ext[1] * ext[2] * ext[3], ext[2] * ext[3], ext[3], 1], device=fine.device)
    coarse_keys = ((c - lo) * mult).sum(1)
    order = torch.argsort(coarse_keys)
    pos = torch.searchsorted(coarse_keys[order], ((parent - lo) * mult).sum(1)).clamp_(max=len(c) - 1)
    return order[pos]


class QueryDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, feature_widths: dict[int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder.hidden_dim
        self.levels = cfg.decoder.attention_strides
        self.query_feat = nn.Embedding(cfg.decoder.num_queries, d)
        self.query_pos = nn.Embedding(cfg.decoder.num_queries, d)
        self.level_proj = nn.ModuleList(nn.Linear(feature_widths[s], d) for s in self.levels)
        self.level_embed = nn.Embedding(len(self.levels), d)
        self.positions = FourierPositions(d, min_wavelength=2 * cfg.input.voxel_size)
        self.mask_features = nn.Linear(feature_widths[1], cfg.decoder.mask_dim)
        # Position in the mask features: conv features are translation-equivariant, so two touching segments
        # that look alike (a road cut into pieces, parked cars in a row) need it to get different masks.
        self.mask_positions = FourierPositions(cfg.decoder.mask_dim, min_wavelength=2 * cfg.input.voxel_size)
        self.layers = nn.ModuleList(DecoderLayer(d, cfg.decoder.heads, cfg.decoder.ffn_dim, cfg.decoder.dropout)
                                    for _ in range(cfg.decoder.rounds * len(self.levels)))
        self.out_norm = nn.LayerNorm(d)
        self.mask_embed = MLP(d, d, cfg.decoder.mask_dim, 3)
        self.objectness = nn.Linear(d, 2)
        self.token_head = MLP(d, d, cfg.decoder.token_dim, 2)

    def forward(self, feats: dict[int, SparseTensor], batch_size: int, all_layers: bool = True) -> list[LayerPrediction]:
        """Predictions before the first layer and after each layer (only the last one unless ``all_layers``)."""
        cfg = self.cfg
        fine = feats[1]
        fine_split = batch_splits(fine, batch_size)
        # mask_features(fine.feats) + positions in one addmm, the linear's bias inside the positions' tables
        positions = self.mask_positions.of_cells(fine.coords[:, 1:], 0.5, cfg.input.voxel_size, self.mask_features.bias,
                                                 _logit_dtype(fine.feats))
        mask_feats = _add_linear(positions, fine.feats, self.mask_features.weight).split(fine_split)
        q = self.query_feat.weight[None].expand(batch_size, -1, -1)
        qpos = self.query_pos.weight[None].expand(batch_size, -1, -1)
        if not all_layers and not self.training and self.pooled_masks:
            return [self._forward_last(q, qpos, mask_feats, self._pooled_levels(feats, batch_size), batch_size)]
        levels = [self._level(i, feats[s], fine, batch_size) for i, s in enumerate(self.levels)]
        pred = self._predict(q, mask_feats)
        preds = [pred]
        for i, layer in enumerate(self.layers):
            values, keys, parents = levels[i % len(self.levels)]
            memory = []
            for b in range(batch_size):
                allowed = self._allowed(pred.masks[b], parents[b], len(values[b]))
                v, k = values[b], keys[b]
                if self.training and cfg.training.max_keys and len(v) > cfg.training.max_keys:
                    keep = torch.randperm(len(v), device=v.device)[: cfg.training.max_keys]
                    v, k, allowed = v[keep], k[keep], allowed[:, keep]
                    allowed = allowed | ~allowed.any(1, keepdim=True)
                memory.append((v, k, allowed))
            q = layer(q, qpos, memory)
            pred = self._predict(q, mask_feats)
            preds = preds + [pred] if all_layers else [pred]
        return preds

    # Inference: the intermediate masks only decide the next layer's attention (a level voxel is allowed when
    # one of its stride-1 children has a positive logit), so they go straight to each level through a PoolPlan
    # (logits in (Q, rows) chunks that stay in cache, pooled into the additive (Q, L) mask the attention reads)
    # and are never kept at full resolution. The level's keys and values are put in the plan's order (attention
    # does not depend on the order of its keys). Same attention as the training path, up to rounding;
    # ``pooled_masks = False`` restores that path.
    pooled_masks = True
    # One scan with logits of at most CELL_POOL_BYTES whose levels are the stride-1 cells halved again and again
    # (MinkUNet's): the logits are computed once for all stride-1 voxels and pooled cell by cell (``CellPool``: at
    # most 8 children per step, a few whole-tensor ops instead of a chunk loop; realtime's and tiny's decoder 0.72x and
    # 0.73x in the Segmenter); the same keys allowed (tested). False: PoolPlans for every case.
    cell_pooling = True

    def _pooled_levels(self, feats: dict[int, SparseTensor], batch_size: int):
        """Per level: (values, keys, parent rows of the fine voxels or None, CellPool or None): CellPools when
        ``cell_stages`` chains the fine voxels to every level, else parent rows for PoolPlans."""
        fine = feats[1]
        logit_bytes = len(fine) * self.cfg.decoder.num_queries * _logit_dtype(fine.feats).itemsize
        small = self.cell_pooling and batch_size == 1 and logit_bytes <= CELL_POOL_BYTES
        chain = cell_stages(fine.coords, {s: feats[s].coords for s in self.levels}, fine.cache) if small else None
        fine = None if chain is not None else fine
        levels = [self._level(i, feats[s], fine, batch_size) for i, s in enumerate(self.levels)]
        return [(*level, None if chain is None else chain[s]) for level, s in zip(levels, self.levels)]

    def _forward_last(self, q: Tensor, qpos: Tensor, mask_feats: tuple[Tensor, ...], levels,
                      batch_size: int) -> LayerPrediction:
        emb = self.mask_embed(self.out_norm(q))
        planned = [_planned_level(values, keys, parents, mask_feats) if cells is None else
                   [(v.to(_logit_dtype(mf)), k.to(_logit_dtype(mf)), mf.to(_logit_dtype(mf)), cells)
                    for v, k, mf in zip(values, keys, mask_feats)]
                   for values, keys, parents, cells in levels]
        # one (Q, L) mask buffer per batch element, reused by every layer: fresh 10-20 MB tensors cost page faults
        widest = [max(len(level[b][0]) for level in planned) for b in range(batch_size)]
        masks_out = [emb.new_empty(emb.shape[1] * n, dtype=planned[0][b][2].dtype) for b, n in enumerate(widest)]
        for i, layer in enumerate(self.layers):
            level = planned[i % len(self.levels)]
            memory = [(values, keys, _pool_cells(emb[b], mf, plan, masks_out[b]) if isinstance(plan, CellPool)
                       else _pool_planned(emb[b], mf, plan, masks_out[b]))
                      for b, (values, keys, mf, plan) in enumerate(level)]
            q = layer(q, qpos, memory)
            emb = self.mask_embed(self.out_norm(q))
        qn = self.out_norm(q)
        # (Q, V) views of (V, Q) products: fusion reduces over queries along contiguous rows.
        masks = [(mf @ emb[b].T.to(mf.dtype)).T for b, mf in enumerate(mask_feats)]
        return LayerPrediction(masks, self.objectness(qn), F.normalize(self.token_head(qn).float(), dim=-1))

    def _level(self, index: int, x: SparseTensor, fine: SparseTensor | None, batch_size: int):
        """Per batch element: projected features, keys (features + position), parent row of each fine voxel
        (None without ``fine``)."""
        values = self.level_proj[index](x.feats) + self.level_embed.weight[index]
        positions = self.positions.of_cells(x.coords[:, 1:], x.stride / 2, self.cfg.input.voxel_size).to(values.dtype)
        if torch.is_grad_enabled():
            keys = values + positions
        else:  # the attention casts both to autocast's dtype: sum straight into it (same bits, a pass less)
            dtype = _logit_dtype(values)
            keys = torch.add(values, positions, out=values.new_empty(values.shape, dtype=dtype))
            values = values.to(dtype)
        split = batch_splits(x, batch_size)
        if fine is None:
            return values.split(split), keys.split(split), None
        parents = parent_rows(fine.coords, x.coords, x.stride)
        offsets = torch.tensor([0] + split[:-1], device=parents.device).cumsum(0)
        parents = [p - offsets[b] for b, p in enumerate(parents.split(batch_splits(fine, batch_size)))]
        return values.split(split), keys.split(split), parents

    @staticmethod
    def _allowed(mask_logits: Tensor, parents: Tensor, n_level: int) -> Tensor:
        """(Q, V_level) bool: level voxels with a child inside the query's current mask; empty masks see all."""
        pooled = mask_logits.detach().new_full((mask_logits.shape[0], n_level), float("-inf"))
        pooled.scatter_reduce_(1, parents[None].expand(mask_logits.shape[0], -1), mask_logits.detach(), "amax")
        allowed = pooled > 0
        return allowed | ~allowed.any(1, keepdim=True)

    def _predict(self, q: Tensor, mask_feats: tuple[Tensor, ...]) -> LayerPrediction:
        qn = self.out_norm(q)
        emb = self.mask_embed(qn)
        masks = [emb[b] @ mf.T.to(emb.dtype) for b, mf in enumerate(mask_feats)]
        return LayerPrediction(masks, self.objectness(qn), F.normalize(self.token_head(qn).float(), dim=-1))


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


def _logit_dtype(mask_feats: Tensor) -> torch.dtype:
    """autocast's dtype when it is on (the matmul the training path runs), else the features' own."""
    device = mask_feats.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else mask_feats.dtype


def _planned_level(values: tuple[Tensor, ...], keys: tuple[Tensor, ...], parents: list[Tensor],
                   mask_feats: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor, Tensor, PoolPlan]]:
    """Per batch element: values and keys in plan order, the mask features in the dtype the logits are computed
    in (autocast's when it is on), the plan."""
    out = []
    for v, k, p, mf in zip(values, keys, parents, mask_feats):
        plan = pool_plan(p, len(v))
        dtype = _logit_dtype(mf)  # the attention's projections cast keys and values to it anyway
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


def _pool_planned(emb: Tensor, mask_feats: Tensor, plan: PoolPlan, out: Tensor | None = None) -> Tensor:
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
    """(Q, L) maxima of the scaled logits, in place, as the additive attention mask (``_pool_planned``)."""
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


def _pool_cells(emb: Tensor, mask_feats: Tensor, pool: CellPool, out: Tensor | None = None) -> Tensor:
    """``_pool_planned`` through a CellPool, in level order: the (V, Q) logits of all stride-1 voxels in one
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


def _allowed_pooled(emb: Tensor, mask_feats: Tensor, parents: Tensor, n_level: int) -> Tensor:
    """``QueryDecoder._allowed`` of the masks ``emb @ mask_feats.T`` without materializing them as (Q, V), as the
    additive (Q, V_level) attention mask (0 = attend, very negative = not) that scaled_dot_product_attention uses
    as is, in level order (the decoder keeps the plan's order instead)."""
    plan = pool_plan(parents, n_level)
    pooled = _pool_planned(emb, mask_feats.to(_logit_dtype(mask_feats)), plan)
    out = torch.empty_like(pooled)
    out[:, plan.order] = pooled
    return out


__all__ = ["OBJECT", "QueryDecoder", "LayerPrediction", "parent_rows", "FourierPositions"]
