"""Kernel maps: which input voxel feeds which output voxel through which kernel offset; searched by hashing,
walked along z columns for submanifold convs, or given by the parent cells of a 2x2x2 downsampling."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from sal_ros.model.sparse.hashing import _MAX_KEY, _Box, _radix_order


def _downsample_coords(coords: Tensor, step: int) -> Tensor:
    """Unique ``floor(coords / step) * step`` per batch, sorted lexicographically [b, x, y, z]."""
    return _downsample_with_parents(coords, step)[0]


def _downsample_with_parents(coords: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """``_downsample_coords`` and, per input row, the row of its parent cell in them."""
    if coords.device.type == "cpu" and len(coords) and _downsample_on_numpy:
        return _downsample_cpu(coords, step)
    c = coords.long().clone()
    c[:, 1:] = torch.div(c[:, 1:], step, rounding_mode="floor") * step
    if len(c) == 0:
        return c.to(torch.int32), c.new_zeros(0)
    box = _Box.around(c)
    keys, parents = torch.unique(box.key(c), return_inverse=True)
    return box.decode(keys).to(torch.int32), parents


_downsample_on_numpy = True  # False: the torch path above (tests compare the two)


def _downsample_cpu(coords: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """:func:`_downsample_with_parents` for CPU coordinates in numpy, same rows and parents: keys over the parent
    cells' indices (``step`` times fewer per axis), numpy's 16-bit radix sort instead of ``torch.unique``, each
    parent's coordinates from its first child instead of decoding keys."""
    c = coords.numpy()
    cells = c.T.copy()  # (4, N) [b, x, y, z], always a copy: shifted in place below
    if step & (step - 1):
        cells[1:] //= step
    else:  # an arithmetic shift is floor division by a power of two, several times faster
        cells[1:] >>= step.bit_length() - 1
    lo, hi = cells.min(1).astype(np.int64), cells.max(1).astype(np.int64)
    ext = (hi - lo + 1).tolist()
    if math.prod(ext) >= _MAX_KEY:
        raise ValueError(f"coordinate range {ext} too large to hash into int64 keys")
    keys = cells[0] - lo[0]
    for axis in (1, 2, 3):  # row-major [b, x, y, z]: key order is coordinate order
        keys = keys * ext[axis] + (cells[axis] - lo[axis])
    order = _radix_order(keys, int(math.prod(ext) - 1).bit_length())
    ordered = keys[order]
    new = np.empty(len(keys), bool)
    new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    parents = np.empty(len(keys), np.int64)
    parents[order] = np.cumsum(new) - 1
    out = cells[:, order[np.flatnonzero(new)]].T.astype(np.int32)
    out[:, 1:] *= step
    return torch.from_numpy(np.ascontiguousarray(out)), torch.from_numpy(parents)


def _parent_map_cpu(in_coords: Tensor, out_coords: Tensor, parents: Tensor, in_stride: int) -> KernelMap:
    """:func:`build_parent_map` in numpy, same pairs in the same order: an 8-bit key sorts by numpy's radix sort."""
    p = parents.numpy()
    rel = in_coords.numpy()[:, 1:] - out_coords.numpy()[p, 1:]
    if in_stride & (in_stride - 1):
        rel //= in_stride
    else:
        rel >>= in_stride.bit_length() - 1
    k = (rel @ np.array([4, 2, 1], rel.dtype)).astype(np.uint8)
    order = np.argsort(k, kind="stable")  # grouped by offset, inputs ascending within each offset
    sizes = np.bincount(k, minlength=8).tolist()
    ins, outs = torch.from_numpy(order), torch.from_numpy(p[order])
    return KernelMap(list(ins.split(sizes)), list(outs.split(sizes)), len(in_coords), len(out_coords))


def build_parent_map(in_coords: Tensor, out_coords: Tensor, parents: Tensor, in_stride: int) -> KernelMap:
    """Kernel map of a 2x2x2 stride-2 conv without any search: every input row has exactly one output, its
    parent cell (``parents`` from the downsampling's unique inverse), through the offset given by its position in
    that cell (offsets {0, 1} per axis, z fastest: ``index = iz + 2 * (iy + 2 * ix)``)."""
    if in_coords.device.type == "cpu" and _downsample_on_numpy:
        return _parent_map_cpu(in_coords, out_coords, parents, in_stride)
    rel = torch.div(in_coords[:, 1:].long() - out_coords[parents, 1:].long(), in_stride, rounding_mode="floor")
    k = (rel * torch.tensor([4, 2, 1], device=rel.device)).sum(1)
    order = torch.argsort(k, stable=True)  # grouped by offset, inputs ascending within each offset
    sizes = torch.bincount(k, minlength=8).tolist()
    return KernelMap(list(order.split(sizes)), list(parents[order].split(sizes)), len(in_coords), len(out_coords))


def _padded_rows(rows: Tensor) -> Tensor:
    """``rows`` and repeats of its first row up to a bucketed length (padding a padded list changes nothing)."""
    n = len(rows)
    return torch.cat([rows, rows[:1].expand(-n % _bucket_step(n))]) if n % _bucket_step(n) else rows


def _bucket_step(n: int) -> int:
    """Row counts are rounded up to multiples of this: 8 sizes per power of two, at most 1/8 more rows."""
    return 1 << max(0, n.bit_length() - 4)


@dataclass
class KernelMap:
    """Input/output row pairs per kernel offset: output row ``out_idx[k][j]`` gathers input ``in_idx[k][j]``.

    ``identity`` is the offset whose pairs are ``(i, i)`` for every row (submanifold centre), applied
    without gathering.
    """

    in_idx: list[Tensor]
    out_idx: list[Tensor]
    n_in: int
    n_out: int
    identity: Optional[int] = None
    # Built on first use and kept with the map (maps are shared by every conv of a layer config in a forward pass).
    _transposed: Optional["KernelMap"] = field(default=None, repr=False, compare=False)
    _scatter: dict = field(default_factory=dict, repr=False, compare=False)

    def transposed(self) -> "KernelMap":
        """The map with inputs and outputs swapped; the same object every call, so its scatter matrix is kept."""
        if self._transposed is None:
            self._transposed = KernelMap(self.out_idx, self.in_idx, self.n_out, self.n_in, self.identity)
        return self._transposed

    @property
    def sizes(self) -> list[int]:
        """Pairs per offset, kept: read by every conv on this map (``len`` of a tensor costs a Python call)."""
        sizes = self._scatter.get("sizes")
        if sizes is None:
            sizes = self._scatter["sizes"] = [i.shape[0] for i in self.in_idx]
        return sizes

    def padded_in_idx(self, k: int) -> Tensor:
        """``in_idx[k]`` padded to a bucketed length (:func:`_gather_rows`), kept: every conv on this map pads it."""
        key = ("padded", k, _bucket_step(len(self.in_idx[k])))
        rows = self._scatter.get(key)
        if rows is None:
            rows = self._scatter[key] = _padded_rows(self.in_idx[k])
        return rows

    def scatter_matrix(self, dtype: torch.dtype, first: int = 0, stop: Optional[int] = None) -> Tensor:
        """CSR ``(n_out, pairs)`` of ones over the pairs of offsets ``first:stop``: row ``o`` holds the positions, in
        those offsets' concatenated pair order, of the pairs whose output is ``o``. ``out.addmm_(S, products)`` then
        sums every offset's products into their outputs in one sparse matmul (MKL), 2-3x faster than one
        ``index_add_`` per offset on 16-32 channels."""
        key = (dtype, first, stop)
        csr = self._scatter.get(key)
        if csr is None:
            outs = torch.cat(self.out_idx[first:stop])
            index = torch.int32 if len(outs) < 2**31 else torch.int64
            crow = torch.zeros(self.n_out + 1, dtype=index)
            torch.cumsum(torch.bincount(outs, minlength=self.n_out), 0, out=crow[1:])
            cols = _stable_order(outs, self.n_out).to(index)
            csr = torch.sparse_csr_tensor(crow, cols, torch.ones(len(outs), dtype=dtype), (self.n_out, len(outs)),
                                          check_invariants=False)
            self._scatter[key] = csr
        return csr


def _stable_order(keys: Tensor, n: int) -> Tensor:
    """Stable argsort of CPU ``keys`` in ``[0, n)``: numpy's radix sort on 16-bit digits (one pass below 65,536, two
    below 2**32), 3-5x faster than ``torch.sort`` here."""
    if n > 2**32:
        return torch.argsort(keys, stable=True)
    a = keys.numpy()
    order = np.argsort((a & 0xFFFF).astype(np.uint16), kind="stable")
    if n > 2**16:
        order = order[np.argsort((a[order] >> 16).astype(np.uint16), kind="stable")]
    return torch.from_numpy(order)


def build_kernel_map(in_coords: Tensor, out_coords: Tensor, offsets: Tensor, submanifold: bool,
                     walk_columns: bool = True) -> KernelMap:
    """Pairs (input row, output row) per offset such that ``in = out + offset`` in the same batch entry.

    Coordinates are hashed into linear keys of a box wide enough that ``key(out + off) = key(out) +
    key_delta(off)`` never aliases; lookups are one sort plus one searchsorted over all offsets, or, for a
    submanifold map where ``walk_columns`` allows it, one searchsorted per z column (:func:`_walk_columns`).
    """
    n_in, n_out, n_k = len(in_coords), len(out_coords), len(offsets)
    centre = n_k // 2 if submanifold and n_k % 2 == 1 else None
    empty = in_coords.new_zeros(0, dtype=torch.int64)
    if n_in == 0 or n_out == 0:
        return KernelMap([empty] * n_k, [empty] * n_k, n_in, n_out, centre)
    # On one voxel set an odd kernel is point-symmetric (offset K-1-k = -offset k), so the second half of
    # the map is the first half with inputs and outputs swapped: search only offsets before the centre.
    mirror = centre is not None and (in_coords is out_coords or torch.equal(in_coords, out_coords))
    if mirror and walk_columns and in_coords.device.type == "cpu" and _walk_on_numpy:
        kmap = _table_map_cpu(in_coords, offsets, centre)
        if kmap is None:
            kmap = _walk_columns_cpu(in_coords, offsets, centre)
        if kmap is not None:
            return kmap
    cin, cout = in_coords.long(), out_coords.long()
    box = _Box.around(cin, cout, margin=int(offsets.abs().max()))
    sorted_keys, order = torch.sort(box.key(cin))
    if mirror and walk_columns and _columns_walkable(cin, offsets):
        return _walk_columns(sorted_keys, order, box.key(cout), offsets, box, n_in, n_out, centre)
    searched = offsets[:centre] if mirror else offsets
    delta = (searched * box.mult[1:]).sum(1)
    query = box.key(cout)[None, :] + delta[:, None]  # (K, N_out)
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=n_in - 1)
    hit = sorted_keys[pos] == query
    if centre is not None and not mirror:
        hit[centre] = False  # the identity offset is applied without gathering
    k, out_rows = hit.nonzero(as_tuple=True)  # row-major: grouped by offset
    in_rows = order[pos[k, out_rows]]
    sizes = hit.sum(1).tolist()
    ins, outs = list(in_rows.split(sizes)), list(out_rows.split(sizes))
    if mirror:
        ins, outs = ins + [empty] + outs[::-1], outs + [empty] + ins[::-1]
    return KernelMap(ins, outs, n_in, n_out, centre)


def _columns_walkable(coords: Tensor, offsets: Tensor) -> bool:
    """Whether a cubic kernel's z steps can be walked instead of searched: every z coordinate is congruent modulo
    the step, so no voxel lies strictly between a key and the key one step up (same x, y)."""
    k = round(len(offsets) ** (1 / 3))
    if k < 2 or k**3 != len(offsets):
        return False
    step = int(offsets[k * k, 2] - offsets[0, 2])
    return step > 0 and bool(((coords[:, 3] - coords[0, 3]) % step == 0).all())


def _walk_columns(sorted_keys: Tensor, order: Tensor, out_keys: Tensor, offsets: Tensor, box: "_Box", n_in: int,
                  n_out: int, centre: int) -> KernelMap:
    """Submanifold map of an odd cubic kernel on one voxel set, by z columns: per (dx, dy) column, one
    searchsorted at the lowest dz, then each next dz's position is the previous one plus its hit (keys of one
    x, y are consecutive, and nothing lies between z steps). Half the columns are walked (and the centre
    column's lower half); the other half are their point mirrors with inputs and outputs swapped."""
    k = round(len(offsets) ** (1 / 3))
    step = int(offsets[k * k, 2] - offsets[0, 2])
    delta = (offsets * box.mult[1:]).sum(1)  # index = ix + k * (iy + k * iz): column ix + k * iy, level iz
    ins: list[Optional[Tensor]] = [None] * len(offsets)
    outs: list[Optional[Tensor]] = [None] * len(offsets)
    rows = torch.arange(n_out, device=out_keys.device)
    for column in range(k * k // 2 + 1):
        levels = k // 2 if column == k * k // 2 else k  # the centre column stops below the centre
        query = out_keys + delta[column]
        pos = torch.searchsorted(sorted_keys, query)
        for level in range(levels):
            if level:
                query += step
                pos += hit
            hit = sorted_keys[pos.clamp(max=n_in - 1)] == query
            idx = column + k * k * level
            ins[idx], outs[idx] = order[pos[hit]], rows[hit]
    empty = sorted_keys.new_zeros(0)
    ins[centre], outs[centre] = empty, empty
    _fill_mirrors(ins, outs)
    return KernelMap(ins, outs, n_in, n_out, centre)


def _fill_mirrors(ins: list, outs: list) -> None:
    """Offsets not looked up take the pairs of their point mirror (offset K-1-k = -offset k) swapped."""
    last = len(ins) - 1
    for i in range(len(ins)):
        if ins[i] is None:
            ins[i], outs[i] = outs[last - i], ins[last - i]


_walk_on_numpy = True  # False: the torch walk below (tests compare the two)
TABLE_MAX_CELLS = 1 << 22  # the lookup table's limit: 16 MB of int32 per thread (0: always walk)
_tables = threading.local()


def _table_map_cpu(coords: Tensor, offsets: Tensor, centre: int) -> Optional[KernelMap]:
    """:func:`_walk_columns_cpu`'s map (same pairs, same order) by a dense lookup table over the voxels' bounding
    box, in units of the kernel's step: each voxel's row written at its cell, then one gather per offset the walk
    looks up (realtime's stride-1 map 2.1 -> 1.1 ms, its five maps ~4.5 -> ~3.2 ms). The table is kept per thread and
    cleared cell by cell after use. None when the box passes ``TABLE_MAX_CELLS`` or a coordinate is off the step
    grid (the walk then runs)."""
    k = round(len(offsets) ** (1 / 3))
    if k < 2 or k**3 != len(offsets) or TABLE_MAX_CELLS <= 0:
        return None
    step = int(offsets[k * k, 2] - offsets[0, 2])
    c = coords.numpy()
    lo = c.min(0).astype(np.int64)
    rel = c - lo.astype(c.dtype)
    if step < 1 or (step > 1 and (rel[:, 1:] % step).any()):
        return None
    half = k // 2  # the offsets' reach in steps
    ext = ((c.max(0).astype(np.int64) - lo) // [1, step, step, step] + [1, 2 * half + 1, 2 * half + 1, 2 * half + 1])
    cells = int(np.prod(ext))
    if cells > TABLE_MAX_CELLS:
        return None
    table = getattr(_tables, "table", None)
    if table is None or len(table) < cells:  # at its full size at once: a first real scan's box, larger than
        table = _tables.table = np.full(max(cells, TABLE_MAX_CELLS), -1, np.int32)  # the warm-up's, pays nothing
    keys = rel[:, 0].astype(np.int64)
    for axis in (1, 2, 3):  # row-major [b, x, y, z], in steps, the reach as margin (integer matmuls are slow)
        keys *= int(ext[axis])
        keys += (rel[:, axis] if step == 1 else rel[:, axis] // step) + half
    mult = np.array([ext[2] * ext[3], ext[3], 1])
    n = len(keys)
    table[keys] = np.arange(n, dtype=np.int32)
    # the offsets the walk looks up (the first half of the (dx, dy) columns, and the centre column below the
    # centre), so that every offset's pairs come in the walk's order; the others are their point mirrors
    square = k * k
    looked_up = [i for i in range(len(offsets))
                 if i % square < square // 2 or (i % square == square // 2 and i < centre)]
    ins: list[Optional[Tensor]] = [None] * len(offsets)
    outs: list[Optional[Tensor]] = [None] * len(offsets)
    try:
        delta = ((offsets[looked_up].numpy() // step).astype(np.int64) @ mult).tolist()
        for i, d in zip(looked_up, delta):
            found = np.take(table, keys + d)
            rows = np.flatnonzero(found >= 0)
            ins[i], outs[i] = torch.from_numpy(found[rows].astype(np.int64)), torch.from_numpy(rows)
    finally:
        table[keys] = -1
    ins[centre] = outs[centre] = torch.zeros(0, dtype=torch.int64)
    _fill_mirrors(ins, outs)
    return KernelMap(ins, outs, n, n, centre)


def _walk_columns_cpu(coords: Tensor, offsets: Tensor, centre: int) -> Optional[KernelMap]:
    """:func:`_walk_columns` for CPU coordinates, same pairs in the same order, in numpy: its searchsorted speeds
    up on sorted queries (each search starts from the previous answer; voxels come sorted, so the queries are), and
    its small element-wise steps cost a fraction of torch's per-call overhead. None when z is not walkable or the
    keys would pass 2**62."""
    k = round(len(offsets) ** (1 / 3))
    step = int(offsets[k * k, 2] - offsets[0, 2])
    c = coords.numpy()
    if k < 2 or k**3 != len(offsets) or step < 1 or ((c[:, 3] - c[0, 3]) % step).any():
        return None
    margin = int(offsets.abs().max())
    lo = c.min(0).astype(np.int64) - [0, margin, margin, margin]
    ext = (c.max(0).astype(np.int64) + [0, margin, margin, margin] - lo + 1).tolist()
    if math.prod(ext) >= _MAX_KEY:
        return None
    keys = c[:, 0] - lo[0]
    for axis in (1, 2, 3):  # row-major [b, x, y, z], as _Box
        keys = keys * ext[axis] + (c[:, axis] - lo[axis])
    order = None if (keys[1:] > keys[:-1]).all() else np.argsort(keys, kind="stable")
    sorted_keys = keys if order is None else keys[order]
    mult = np.array([ext[2] * ext[3], ext[3], 1])
    delta = offsets.numpy() @ mult
    n = len(keys)
    ins: list[Optional[Tensor]] = [None] * len(offsets)
    outs: list[Optional[Tensor]] = [None] * len(offsets)
    for column in range(k * k // 2 + 1):
        levels = k // 2 if column == k * k // 2 else k  # the centre column stops below the centre
        query = keys + delta[column]
        pos = np.searchsorted(sorted_keys, query)
        for level in range(levels):
            if level:
                query += step
                pos += hit
            hit = sorted_keys[np.minimum(pos, n - 1)] == query
            rows = np.flatnonzero(hit)
            found = pos[rows] if order is None else order[pos[rows]]
            idx = column + k * k * level
            ins[idx], outs[idx] = torch.from_numpy(found), torch.from_numpy(rows)
    empty = torch.zeros(0, dtype=torch.int64)
    ins[centre], outs[centre] = empty, empty
    _fill_mirrors(ins, outs)
    return KernelMap(ins, outs, n, n, centre)
