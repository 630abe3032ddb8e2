"""Sparse tensors and convs against dense torch references (float64, max abs error 1e-9), gradients, voxelize.

Dense references: our kernel ``(K, C_in, C_out)`` becomes a dense weight by placing ``kernel[k]`` at cell
``offset_k + (k - 1) // 2``; grids start at an origin that is a multiple of the coarsest stride in play
(negative here on purpose), which is the alignment the floor-quantized downsampling uses.
"""
import pytest
import torch
import torch.nn.functional as F

from sal_ros.model.sparse import (
    Conv3d,
    SparseTensor,
    cat_feats,
    kernel_offsets,
    to_dense,
    torchsparse_available,
    voxelize,
)

TOL = 1e-9
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_sparse(batch, size, channels, origin, stride=1, density=0.35, seed=0, device="cpu"):
    """Random voxels on a ``size**3`` grid of cells ``origin + i * stride``, ``batch`` independent clouds."""
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, size, size, size, generator=g) < density
    idx = occ.nonzero()
    coords = idx.clone()
    coords[:, 1:] = idx[:, 1:] * stride + torch.tensor(origin)
    feats = torch.randn(len(idx), channels, generator=g, dtype=torch.float64)
    return SparseTensor(feats.to(device), coords.int().to(device), stride)


def dense_weight(conv):
    """``(C_out, C_in, k, k, k)`` for F.conv3d; for conv_transpose3d use ``.transpose(0, 1)``."""
    k = conv.kernel_size
    cell = kernel_offsets(k) + (k - 1) // 2
    w = conv.kernel.new_zeros(conv.out_channels, conv.in_channels, k, k, k)
    per_offset = conv.kernel.detach().reshape(-1, conv.in_channels, conv.out_channels)
    w[:, :, cell[:, 0], cell[:, 1], cell[:, 2]] = per_offset.permute(2, 1, 0)
    return w


def sample(dense, x, origin, stride):
    """Rows of a dense ``(B, C, ...)`` grid (cells ``origin + i * stride``) at the voxels of ``x``."""
    idx = (x.coords[:, 1:].long() - torch.tensor(origin, device=x.device)) // stride
    return dense[x.coords[:, 0].long(), :, idx[:, 0], idx[:, 1], idx[:, 2]]


def make_conv(cin, cout, device, **kw):
    torch.manual_seed(1)
    return Conv3d(cin, cout, backend="torch", **kw).double().to(device)


def test_kernel_offsets_follow_torchsparse_order():
    r3, r2 = [-1, 0, 1], [0, 1]
    odd = [[x, y, z] for z in r3 for y in r3 for x in r3]  # odd volume: x fastest
    even = [[x, y, z] for x in r2 for y in r2 for z in r2]  # even volume: z fastest
    assert kernel_offsets(3).tolist() == odd
    assert kernel_offsets(2).tolist() == even
    assert kernel_offsets(1).tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,dilation", [(1, 1), (2, 1), (3, 1), (3, 2), (2, 2)])
def test_submanifold_matches_dense(device, k, dilation):
    origin, size = (-6, 3, -9), 7
    x = random_sparse(2, size, 3, origin, device=device)
    conv = make_conv(3, 4, device, kernel_size=k, dilation=dilation, bias=True)
    y = conv(x)
    assert y.coords is x.coords and y.stride == 1
    lo = dilation * ((k - 1) // 2)
    hi = dilation * (k - 1) - lo
    padded = F.pad(to_dense(x, (size,) * 3, origin), (lo, hi) * 3)
    ref = F.conv3d(padded, dense_weight(conv), conv.bias, dilation=dilation)
    assert (y.feats - sample(ref, x, origin, 1)).abs().max() <= TOL


def downsample_reference(x, conv, size, origin):
    """F.conv3d with the sparse conv's alignment, on the input's grid (cells of its tensor stride)."""
    k, s = conv.kernel_size, conv.stride
    lo = (k - 1) // 2
    padded = F.pad(to_dense(x, (size,) * 3, origin), (lo, k - 1 - lo) * 3)
    return F.conv3d(padded, dense_weight(conv), conv.bias, stride=s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("in_stride", [1, 2])
def test_strided_matches_dense(device, k, in_stride):
    origin, size = (-8, 4, -12), 8  # origin a multiple of in_stride * stride
    x = random_sparse(2, size, 3, origin, stride=in_stride, device=device)
    conv = make_conv(3, 5, device, kernel_size=k, stride=2, bias=True)
    y = conv(x)
    assert y.stride == 2 * in_stride
    # Output voxels: every stride-aligned block holding at least one input voxel, per batch entry.
    occupied = to_dense(x.replace_feats(torch.ones_like(x.feats[:, :1])), (size,) * 3, origin)
    blocks = F.max_pool3d(occupied, 2)
    got = torch.zeros_like(blocks)
    idx = (y.coords[:, 1:].long() - torch.tensor(origin, device=device)) // y.stride
    got[y.coords[:, 0].long(), 0, idx[:, 0], idx[:, 1], idx[:, 2]] = 1
    assert torch.equal(got, blocks) and len(torch.unique(y.coords, dim=0)) == len(y)
    ref = downsample_reference(x, conv, size, origin)
    assert (y.feats - sample(ref, y, origin, y.stride)).abs().max() <= TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("reuse_map", [True, False])
def test_transposed_matches_dense(device, k, reuse_map):
    origin, size = (-4, 6, -10), 8
    x = random_sparse(3, size, 3, origin, device=device)
    # With reuse_map the strided twin (same kernel) built the map; otherwise a kernel-2 downsample made the
    # coarse voxels and the transposed conv builds its map itself.
    down = make_conv(3, 4, device, kernel_size=k if reuse_map else 2, stride=2)
    coarse = down(x)
    g = torch.Generator().manual_seed(3)
    coarse = coarse.replace_feats(torch.randn(len(coarse), 4, generator=g, dtype=torch.float64).to(device))
    up = make_conv(4, 2, device, kernel_size=k, stride=2, transposed=True, bias=True)
    y = up(coarse)
    assert y.coords is x.coords and y.stride == 1
    key = (1, k, 2, 1)
    if reuse_map:
        assert x.cache.kmaps[key].in_idx[0] is y.cache.kmaps[key].in_idx[0]
    dense_in = to_dense(coarse, (size // 2,) * 3, origin)
    full = F.conv_transpose3d(dense_in, dense_weight(up).transpose(0, 1), stride=2)
    lo = (k - 1) // 2
    full = F.pad(full, (0, size + lo - full.shape[-1]) * 3)[..., lo:lo + size, lo:lo + size, lo:lo + size]
    ref = full + up.bias.view(1, -1, 1, 1, 1)
    assert (y.feats - sample(ref, y, origin, 1)).abs().max() <= TOL


def test_batches_do_not_mix():
    """A cloud's output is the same alone and next to another cloud at the same coordinates."""
    a = random_sparse(1, 6, 2, (-3, -3, -3), seed=5)
    both_coords = torch.cat([a.coords, a.coords + torch.tensor([1, 0, 0, 0], dtype=torch.int32)])
    both = SparseTensor(torch.cat([a.feats, 2 * a.feats]), both_coords)
    sub, down = make_conv(2, 3, "cpu", kernel_size=3), make_conv(3, 3, "cpu", kernel_size=2, stride=2)
    up = make_conv(3, 2, "cpu", kernel_size=2, stride=2, transposed=True)
    alone, joint = up(down(sub(a))).feats, up(down(sub(both))).feats
    n = len(a)
    assert both.batch_size == 2
    assert (joint[:n] - alone).abs().max() <= TOL and (joint[n:] - 2 * alone).abs().max() <= TOL


def gradcheck_conv(conv, x):
    def fn(feats, kernel):
        return torch.func.functional_call(conv, {"kernel": kernel}, (x.replace_feats(feats),)).feats

    feats = x.feats.clone().requires_grad_(True)
    kernel = conv.kernel.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (feats, kernel), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["submanifold", "strided", "transposed", "pointwise"])
def test_gradients(kind):
    x = random_sparse(2, 4, 2, (-2, 0, -4), density=0.4, seed=7)
    if kind == "submanifold":
        gradcheck_conv(make_conv(2, 3, "cpu", kernel_size=3), x)
    elif kind == "pointwise":
        gradcheck_conv(make_conv(2, 3, "cpu", kernel_size=1), x)
    elif kind == "strided":
        gradcheck_conv(make_conv(2, 3, "cpu", kernel_size=3, stride=2), x)
    else:
        coarse = make_conv(2, 2, "cpu", kernel_size=2, stride=2)(x)
        coarse = coarse.replace_feats(torch.rand(len(coarse), 2, dtype=torch.float64))
        gradcheck_conv(make_conv(2, 3, "cpu", kernel_size=2, stride=2, transposed=True), coarse)


def test_weight_layouts():
    assert Conv3d(4, 8, 3).kernel.shape == (27, 4, 8)
    assert Conv3d(4, 8, 2, stride=2).kernel.shape == (8, 4, 8)
    assert Conv3d(4, 8, 1).kernel.shape == (4, 8)
    assert Conv3d(4, 8, 1, stride=2).kernel.shape == (1, 4, 8)
    conv = Conv3d(4, 8, 3)
    assert conv.weight is conv.kernel and "kernel" in conv.state_dict()


def test_voxelize_maps_points_back():
    g = torch.Generator().manual_seed(11)
    pts = (torch.rand(3000, 3, generator=g) - 0.5) * 6.0  # negative and positive coordinates
    batch = torch.randint(0, 3, (3000,), generator=g)
    batch[:1000] = 1  # an unsorted mix of clouds
    vs = 0.5
    cells = torch.floor(pts.double() / vs).long()
    # Features constant per voxel come back exactly through the inverse map.
    per_voxel = torch.cat([batch[:, None], cells], 1).double() * torch.tensor([1000.0, 1.0, 7.0, 49.0])
    x, p2v = voxelize(pts, batch, vs, per_voxel)
    assert torch.equal(x.feats[p2v], per_voxel)
    assert torch.equal(x.coords[p2v].long(), torch.cat([batch[:, None], cells], 1))
    assert len(torch.unique(x.coords, dim=0)) == len(x) and x.batch_size == 3
    # Random features average per voxel.
    feats = torch.randn(3000, 2, generator=g, dtype=torch.float64)
    x, p2v = voxelize(pts, batch, vs, feats)
    for v in (0, len(x) // 2, len(x) - 1):
        assert (x.feats[v] - feats[p2v == v].mean(0)).abs().max() <= TOL


def test_autocast_and_empty_input():
    x = random_sparse(1, 6, 4, (-3, 0, 0), seed=2)
    x = x.replace_feats(x.feats.float())
    conv = Conv3d(4, 4, 3, bias=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.feats.dtype == torch.bfloat16
    assert (y.feats.float() - conv(x).feats).abs().max() < 0.1
    y.feats.float().sum().backward()
    assert conv.kernel.grad.dtype == torch.float32
    empty = SparseTensor(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32))
    down = Conv3d(4, 4, 2, stride=2, backend="torch")(Conv3d(4, 4, 3, backend="torch")(empty))
    assert len(down) == 0 and down.stride == 2
    assert len(Conv3d(4, 2, 2, stride=2, transposed=True, backend="torch")(down)) == 0


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_bfloat16_sums_in_float32(kind):
    """Under bfloat16 autocast (AMP on CUDA) each voxel sums 27 half-precision products: summed in bfloat16 the
    error is ~4x one final rounding of the exact result, summed in float32 it stays within 2.5x."""
    torch.manual_seed(0)
    x = random_sparse(1, 26, 64, (0, 0, 0), density=0.4, seed=3)
    conv = make_conv(64, 64, "cpu", kernel_size=3)
    x32 = x.replace_feats(x.feats.float().requires_grad_())
    x64 = x.replace_feats(x.feats.clone().requires_grad_())
    ref = conv(x64).feats
    conv32 = make_conv(64, 64, "cpu", kernel_size=3).float()  # same seed: the same weights in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv32(x32).feats
    if kind == "backward":
        grad = torch.randn(ref.shape, dtype=torch.float64)
        ref.backward(grad)
        out.backward(grad.to(out.dtype))
        ref, out = x64.feats.grad, x32.feats.grad
    rounding = (ref.to(torch.bfloat16).double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= 2.5 * rounding


def test_voxelize_rejects_bad_points():
    with pytest.raises(ValueError, match="NaN"):
        voxelize(torch.tensor([[0.0, float("nan"), 1.0]]), None, 0.1, torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        voxelize(torch.zeros(4, 2), None, 0.1, torch.zeros(4, 1))


def test_cat_feats_checks_voxels():
    x = random_sparse(1, 5, 2, (0, 0, 0))
    y = Conv3d(2, 3, 3, backend="torch").double()(x)
    assert cat_feats(x, y).feats.shape == (len(x), 5)
    other = random_sparse(1, 5, 3, (0, 0, 0), seed=9)
    with pytest.raises(ValueError):
        cat_feats(x, other)


def test_transposed_needs_cached_stride():
    x = random_sparse(1, 4, 2, (0, 0, 0), stride=2)
    with pytest.raises(ValueError, match="stride 1"):
        Conv3d(2, 2, 2, stride=2, transposed=True, backend="torch").double()(x)


@pytest.mark.skipif(not (torchsparse_available() and torch.cuda.is_available()), reason="needs torchsparse + CUDA")
def test_torchsparse_parity():
    pts = (torch.rand(20000, 3) - 0.5) * 40.0
    x, _ = voxelize(pts.cuda(), None, 0.4, torch.randn(20000, 4).cuda())
    layers = [(4, 8, 3, 1, False), (8, 8, 2, 2, False), (8, 8, 3, 1, False), (8, 4, 2, 2, True)]
    outs = {}
    for backend in ("torch", "torchsparse"):
        torch.manual_seed(0)
        y = SparseTensor(x.feats, x.coords)
        for cin, cout, k, s, t in layers:
            y = Conv3d(cin, cout, k, stride=s, transposed=t, backend=backend).cuda()(y)
        outs[backend] = y
    assert torch.equal(outs["torch"].coords, outs["torchsparse"].coords)
    assert torch.allclose(outs["torch"].feats, outs["torchsparse"].feats, atol=1e-4, rtol=1e-3)
