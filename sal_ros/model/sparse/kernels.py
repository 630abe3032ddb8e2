"""The gather-matmul-scatter kernels over a kernel map: the autograd function of training and the fused
inference conv (bias, residual and ReLU on the float32 accumulator, bucketed row counts, workspace)."""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

from sal_ros.model.sparse import maps  # the bucketing is looked up there at each call (one value for maps
                                       # and kernels, patched in one place by the tests)
from sal_ros.model.sparse.maps import KernelMap
from sal_ros.model.sparse.tensor import Workspace


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision products are summed in float32: 27 bfloat16 partial sums per voxel lose ~4x the
    accuracy of one final rounding (max relative error on a 64-channel layer: 0.9%, 0.4% summed in float32,
    0.2% for rounding the exact result)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _GatherMatmulScatter(torch.autograd.Function):
    """``out[o] += feats[i] @ W[k]`` over all pairs; backward re-gathers instead of keeping 27 buffers."""

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
        acc = _accumulation_dtype(feats.dtype)
        if kmap.identity is not None:
            out = (feats @ weight[kmap.identity]).to(acc)
        else:
            out = feats.new_zeros(kmap.n_out, weight.shape[-1], dtype=acc)
        for k, (i, o) in enumerate(zip(kmap.in_idx, kmap.out_idx)):
            if len(i):
                out.index_add_(0, o, (feats.index_select(0, i) @ weight[k]).to(acc))
        ctx.save_for_backward(feats, weight)
        ctx.kmap = kmap
        return out.to(feats.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        feats, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = _accumulation_dtype(feats.dtype)
        grad_x = torch.zeros_like(feats, dtype=acc) if want_x else None
        grad_w = torch.zeros_like(weight) if want_w else None
        if kmap.identity is not None:
            c = kmap.identity
            if want_x:
                grad_x += grad_out @ weight[c].T
            if want_w:
                grad_w[c] = feats.T @ grad_out
        for k, (i, o) in enumerate(zip(kmap.in_idx, kmap.out_idx)):
            if not len(i):
                continue
            g = grad_out.index_select(0, o)
            if want_x:
                grad_x.index_add_(0, i, (g @ weight[k].T).to(acc))
            if want_w:
                grad_w[k] = feats.index_select(0, i).T @ g
        return None if grad_x is None else grad_x.to(feats.dtype), grad_w, None


@torch.no_grad()
def sparse_conv_inference(feats: Tensor, weight: Tensor, kmap: KernelMap, bias: Optional[Tensor] = None,
                          residual: Optional[Tensor] = None, relu: bool = False,
                          workspace: Optional[Workspace] = None) -> Tensor:
    """``relu(conv + bias + residual)`` without autograd, for inference, in the dtype of ``feats``; the conv is
    ``_GatherMatmulScatter``'s sum: per offset gather and matmul, on the CPU summed into a float32 accumulator by
    one sparse matmul per buffer of products (:func:`_scatter_products`; tiny's backbone 1.2x), elsewhere by
    ``index_add_``; the accumulator also takes the bias (in the centre offset's ``addmm``), the residual and the
    ReLU before the one cast back (float32 element-wise passes ran twice as fast per element as bfloat16 ones
    here; operands are cast first because a float32 += bfloat16 in place ran 10x slower than a cast and an add).
    Half-precision matmuls on the CPU get bucketed row counts (:func:`_rows_matmul`): on fresh scans the minkunet34
    backbone ran 1.16x faster with them, on one scan repeated 0.97x.

    Measured against it and dropped (whole backbone, one thread, same run): an output-stationary "implicit
    GEMM" (per output its 27 neighbours side by side, zero rows where absent, one matmul with the
    ``(27 * C_in, C_out)`` weight, no scatter): only 3.8 of 27 neighbours are present at stride 1 (9.3 at
    stride 16), and gathering the absent ones as zero rows cost what the scatter saved (minkunet34 in bfloat16
    1.00-1.06x, within the noise; tiny in float32 0.86x); writing the transposed 2x2x2 convs' single products
    without an accumulator (1.00x); cutting the per-offset temporaries into 1-16 MB chunks (0.93-1.00x).
    """
    acc = _accumulation_dtype(feats.dtype)
    c_out = weight.shape[-1]
    bucket = feats.device.type == "cpu" and feats.dtype in (torch.bfloat16, torch.float16)
    ws = workspace if feats.device.type == "cpu" else None
    # The accumulator is scratch only when the result is a fresh cast of it.
    out = ws.get("acc", kmap.n_out, c_out, acc) if ws is not None and acc != feats.dtype else None
    if kmap.identity is not None and out is not None and _products_as_halves(feats, weight, out):
        # the centre's bfloat16 products (bias included) land in the accumulator as float32, no cast pass
        wide_bias = None if bias is None else _widened(bias[None, None])[0, 0]
        wide = _widened(weight[kmap.identity][None])[0]
        _rows_matmul(feats, None, wide, wide_bias, bucket, dest=out.view(feats.dtype))
    elif kmap.identity is not None:
        centre = _rows_matmul(feats, None, weight[kmap.identity], bias, bucket, None if out is None else ws)
        out = centre.to(acc) if out is None else out.copy_(centre)
    elif bias is not None:
        out = bias.to(acc).expand(kmap.n_out, c_out).clone() if out is None else out.copy_(bias.expand_as(out))
    else:
        out = torch.zeros(kmap.n_out, c_out, dtype=acc, device=feats.device) if out is None else out.zero_()
    if _sparse_scatter(out):
        _scatter_products(feats, weight, kmap, out, bucket, ws)
    else:
        for k, (i, o) in enumerate(zip(kmap.in_idx, kmap.out_idx)):
            if len(i):
                out.index_add_(0, o, _rows_matmul(feats, i, weight[k], None, bucket).to(acc))
    if residual is not None:
        out += residual.to(acc) if ws is None or residual.dtype == acc else \
            ws.get("res", *residual.shape, acc).copy_(residual)
    return (out.relu_() if relu else out).to(feats.dtype)


_SCATTER_CHUNK_BYTES = 16 << 20
# A workspace's buffer is paged in once per pass, not per conv: there fewer, larger sums won (minkunet34 bf16 backbone
# 1.02x at 24-32 MB against 16 MB; 64 MB and more fault more pages than they save: 0.9x).
_WORKSPACE_CHUNK_BYTES = 32 << 20


def _sparse_scatter(out: Tensor) -> bool:
    """Whether the products go into ``out`` through the map's CSR scatter matrix (MKL on the CPU)."""
    cpu = out.device.type == "cpu" and torch.backends.mkl.is_available()
    return cpu and out.dtype in (torch.float32, torch.float64)


def _scatter_products(feats: Tensor, weight: Tensor, kmap: KernelMap, out: Tensor, bucket: bool,
                      ws: Optional[Workspace] = None) -> None:
    """``out += S @ products``: the offsets' ``feats[in] @ W[k]`` written one after another into a buffer of at
    most ``_SCATTER_CHUNK_BYTES`` (more offsets per buffer at fewer channels), each buffer summed into its outputs
    by one sparse matmul (:meth:`KernelMap.scatter_matrix`). Larger buffers are fresh pages from the OS on every
    call (glibc maps allocations over 32 MB itself): one 52 MB buffer made a 64-channel conv 1.4x slower."""
    sizes = kmap.sizes
    budget = _SCATTER_CHUNK_BYTES if ws is None else _WORKSPACE_CHUNK_BYTES
    chunks = _chunks(kmap, max(1, budget // (out.shape[1] * out.element_size())))
    wide = _widened(weight) if _products_as_halves(feats, weight, out) else None
    # Widened products keep their bucket padding: it spills into the next offset's rows (written next) or the tail.
    spill = max((-n % maps._bucket_step(n) for n in sizes if n), default=0) if wide is not None and bucket else 0
    rows = max(c[2] for c in chunks) + spill
    buffer = out.new_empty(rows, out.shape[1]) if ws is None else ws.get("products", rows, out.shape[1], out.dtype)
    weights = weight.unbind(0)
    for first, stop, rows in chunks:
        if not rows:
            continue
        start = 0
        for k in range(first, stop):
            n = sizes[k]
            if n and wide is not None:
                gathered = _gather_rows(feats, kmap.padded_in_idx(k) if bucket else kmap.in_idx[k], bucket, ws)
                torch.mm(gathered, wide[k], out=buffer[start:start + gathered.shape[0]].view(feats.dtype))
                start += n
            elif n:
                dst = buffer[start:start + n]
                if feats.dtype == out.dtype and not bucket:
                    torch.mm(feats.index_select(0, kmap.in_idx[k]), weights[k], out=dst)
                else:
                    rows_k = kmap.padded_in_idx(k) if bucket else kmap.in_idx[k]
                    dst.copy_(_rows_matmul(feats, rows_k, weights[k], None, bucket, ws)[:n])
                start += n
        with torch.autocast("cpu", enabled=False):  # MKL's sparse matmul is float32 / float64 only
            out.addmm_(kmap.scatter_matrix(out.dtype, first, stop), buffer[:rows])


def _chunks(kmap: KernelMap, limit: int) -> list[tuple[int, int, int]]:
    """``(first, stop, rows)``: consecutive offsets whose pairs fill a buffer of at most ``limit`` rows (one offset
    alone may pass it), kept with the map per limit."""
    key = ("chunks", limit)
    chunks = kmap._scatter.get(key)
    if chunks is None:
        chunks, first, rows = [], 0, 0
        for k, n in enumerate(kmap.sizes):
            if rows and rows + n > limit:
                chunks.append((first, k, rows))
                first, rows = k, 0
            rows += n
        chunks.append((first, len(kmap.sizes), rows))
        kmap._scatter[key] = chunks
    return chunks


def _products_as_halves(feats: Tensor, weight: Tensor, out: Tensor) -> bool:
    """Whether bfloat16 products go straight into the float32 buffer as the high halves of its words
    (:func:`_widened`): up to 128 channels in and out; wider, the doubled matmul output cost more than the cast
    (minkunet34 per layer: 32-64 channels 1.1x, 96-128 about even, 192-384 0.9x)."""
    narrow = weight.shape[-2] <= 128 and weight.shape[-1] <= 128
    return narrow and feats.dtype == torch.bfloat16 and out.dtype == torch.float32 and sys.byteorder == "little"


def _widened(weight: Tensor) -> Tensor:
    """``(K, C_in, 2 C_out)`` bfloat16 weight with a zero column before each column of ``weight``: a product with it,
    viewed as float32, is exactly the float32 value of each bfloat16 product (bfloat16 is a float32's high half;
    the zero columns' sums, started from +0, are +0, the low halves). One matmul with twice the columns replaces a
    matmul and a bfloat16 -> float32 cast pass, 1.04-1.5x faster on 256-32 channels (AMX)."""
    wide = weight.new_zeros(*weight.shape, 2)
    wide[..., 1] = weight
    return wide.view(*weight.shape[:-1], 2 * weight.shape[-1])


def _gather_rows(feats: Tensor, rows: Tensor, bucket: bool, ws: Optional[Workspace] = None) -> Tensor:
    """``feats[rows]``, with ``bucket`` padded (by repeats of the first row) to a bucketed row count."""
    rows = maps._padded_rows(rows) if bucket else rows
    scratch = None if ws is None else ws.get("gather", len(rows), feats.shape[1], feats.dtype)
    return torch.index_select(feats, 0, rows, out=scratch)


def _rows_matmul(feats: Tensor, rows: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                 bucket: bool, ws: Optional[Workspace] = None, dest: Optional[Tensor] = None) -> Tensor:
    """``feats[rows] @ weight (+ bias)``, all rows when ``rows`` is None. With ``bucket`` every matmul gets one of
    a few row counts: oneDNN compiles a half-precision kernel per shape on first use (~2.4 ms, against 0.4 ms for
    the cached 20,000 x 96 x 96 product), and each new scan brings new pair counts in every layer. With ``ws`` the
    gathered rows and the product are its views (valid until the next call with it); all rows can also be written
    into ``dest``."""
    def mm(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if bias is None:
            return torch.mm(x, weight, out=out)
        return torch.addmm(bias, x, weight, out=out)

    def scratch(role: str, n_rows: int, cols: int) -> Optional[Tensor]:
        return None if ws is None else ws.get(role, n_rows, cols, feats.dtype)

    c_out = weight.shape[-1]
    n = len(feats) if rows is None else len(rows)
    step = maps._bucket_step(n)
    if rows is None and (not bucket or n % step == 0):
        return mm(feats, scratch("mm", n, c_out) if dest is None else dest)
    if rows is None:  # a bucket-sized head as a view, the tail gathered and padded
        head = n // step * step
        out = dest if dest is not None else feats.new_empty(n, c_out) if ws is None else scratch("mm", n, c_out)
        mm(feats[:head], out[:head])
        out[head:] = _rows_matmul(feats, torch.arange(head, n, device=feats.device), weight, bias, True)
        return out
    gathered = _gather_rows(feats, rows, bucket, ws)
    return mm(gathered, scratch("mm", len(gathered), c_out))[:n]
