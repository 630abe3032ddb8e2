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
from sal_ros.model.mask_pooling import (CELL_POOL_BYTES, CellPool, cell_stages, logit_dtype, planned_level, pool_cells,
                                       pool_planned)
from sal_ros.model.sparse import SparseTensor

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
    dtype = logit_dtype(x)
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
                                                 logit_dtype(fine.feats))
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
        logit_bytes = len(fine) * self.cfg.decoder.num_queries * logit_dtype(fine.feats).itemsize
        small = self.cell_pooling and batch_size == 1 and logit_bytes <= CELL_POOL_BYTES
        chain = cell_stages(fine.coords, {s: feats[s].coords for s in self.levels}, fine.cache) if small else None
        fine = None if chain is not None else fine
        levels = [self._level(i, feats[s], fine, batch_size) for i, s in enumerate(self.levels)]
        return [(*level, None if chain is None else chain[s]) for level, s in zip(levels, self.levels)]

    def _forward_last(self, q: Tensor, qpos: Tensor, mask_feats: tuple[Tensor, ...], levels,
                      batch_size: int) -> LayerPrediction:
        emb = self.mask_embed(self.out_norm(q))
        planned = [planned_level(values, keys, parents, mask_feats) if cells is None else
                   [(v.to(logit_dtype(mf)), k.to(logit_dtype(mf)), mf.to(logit_dtype(mf)), cells)
                    for v, k, mf in zip(values, keys, mask_feats)]
                   for values, keys, parents, cells in levels]
        # one (Q, L) mask buffer per batch element, reused by every layer: fresh 10-20 MB tensors cost page faults
        widest = [max(len(level[b][0]) for level in planned) for b in range(batch_size)]
        masks_out = [emb.new_empty(emb.shape[1] * n, dtype=planned[0][b][2].dtype) for b, n in enumerate(widest)]
        for i, layer in enumerate(self.layers):
            level = planned[i % len(self.levels)]
            memory = [(values, keys, pool_cells(emb[b], mf, plan, masks_out[b]) if isinstance(plan, CellPool)
                       else pool_planned(emb[b], mf, plan, masks_out[b]))
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
            dtype = logit_dtype(values)
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


__all__ = ["OBJECT", "QueryDecoder", "LayerPrediction", "parent_rows", "FourierPositions"]
