"""Inference fast paths of the sparse backbone (issue 17) against the autograd path they replace: the walked
kernel map equals the searched one, sparse_conv_inference equals Conv3d for every kind of conv (float64, 1e-9), and the
fused MinkUNet (BatchNorm folded, epilogues in place) equals the module-by-module forward."""
import pytest
import torch

from sal_ros.model.config import ModelConfig
from sal_ros.model.minkunet import MinkUNet
from sal_ros.model.sparse import Conv3d, SparseTensor, build_kernel_map, kernel_offsets, sparse_conv_inference
from sal_ros.model.sparse import kernels, maps, voxelization

TOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_voxels(n_side, channels, stride=1, density=0.3, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    idx = (torch.rand(batch, n_side, n_side, n_side, generator=g) < density).nonzero()
    coords = idx.clone()
    coords[:, 1:] = idx[:, 1:] * stride - 3 * stride  # negative coordinates too
    return SparseTensor(torch.randn(len(idx), channels, generator=g, dtype=torch.float64), coords.int(), stride)


def same_map(a, b):
    return all(torch.equal(i, j) and torch.equal(o, p) for i, o, j, p in zip(a.in_idx, a.out_idx, b.in_idx, b.out_idx))


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 4), (5, 2)])
def test_walked_map_equals_searched(k, stride):
    x = random_voxels(7, 1, stride=stride, seed=k + stride)
    offsets = kernel_offsets(k) * stride
    assert maps._columns_walkable(x.coords.long(), offsets)
    walked = build_kernel_map(x.coords, x.coords, offsets, submanifold=True)
    searched = build_kernel_map(x.coords, x.coords, offsets, submanifold=True, walk_columns=False)
    assert same_map(walked, searched) and walked.identity == searched.identity


def test_unaligned_z_is_searched():
    """Coordinates that do not share a residue modulo the z step (dilation 2 on stride-1 voxels) cannot be
    walked: a voxel may lie between two steps."""
    x = random_voxels(6, 1, seed=3)
    assert not maps._columns_walkable(x.coords.long(), kernel_offsets(3) * 2)


def test_bucketed_row_counts_change_nothing(monkeypatch):
    """bfloat16 matmuls padded to bucketed row counts (one compiled kernel serves many scans) give the same bits."""
    g = torch.Generator().manual_seed(0)
    idx = (torch.rand(2, 20, 20, 20, generator=g) < 0.2).nonzero()
    x = SparseTensor(torch.randn(len(idx), 16, generator=g).bfloat16(), idx.int(), 1)
    conv = Conv3d(16, 8, 3, backend="torch")
    kmap = conv._output_and_map(x)[2]
    weight, bias = conv.kernel.detach().bfloat16(), torch.randn(8, generator=g).bfloat16()
    assert any(len(i) % maps._bucket_step(len(i)) for i in kmap.in_idx)  # some counts do get padded
    bucketed = sparse_conv_inference(x.feats, weight, kmap, bias, relu=True)
    monkeypatch.setattr(maps, "_bucket_step", lambda n: 1)
    assert torch.equal(bucketed, sparse_conv_inference(x.feats, weight, kmap, bias, relu=True))


def reference(conv, x, bias, residual, relu):
    with torch.no_grad():
        out = conv(x)
        feats = out.feats + bias + (0 if residual is None else residual)
    return out, feats.relu() if relu else feats


@pytest.mark.parametrize("relu", [False, True])
def test_submanifold_matches_conv(relu):
    torch.manual_seed(0)
    x = random_voxels(6, 4, seed=1)
    conv = Conv3d(4, 5, 3, backend="torch").double()
    bias, residual = torch.randn(5, dtype=torch.float64), torch.randn(len(x), 5, dtype=torch.float64)
    out, ref = reference(conv, x, bias, residual, relu)
    kmap = x.cache.kmaps[(1, 3, 1, 1)]
    got = sparse_conv_inference(x.feats, conv.kernel.detach(), kmap, bias, residual.clone(), relu)
    assert (got - ref).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["strided", "transposed", "pointwise", "strided3"])
def test_other_convs_match_conv(kind):
    torch.manual_seed(0)
    x = random_voxels(6, 3, seed=2)
    if kind == "transposed":
        x = Conv3d(3, 3, 2, 2, backend="torch").double()(x)  # coarse voxels; the map comes from the parents
        conv = Conv3d(3, 4, 2, 2, transposed=True, backend="torch").double()
    else:
        k, s = {"strided": (2, 2), "pointwise": (1, 1), "strided3": (3, 2)}[kind]
        conv = Conv3d(3, 4, k, s, backend="torch").double()
    bias = torch.randn(4, dtype=torch.float64)
    out, ref = reference(conv, x, bias, None, True)
    fresh = SparseTensor(x.feats, x.coords, x.stride, x.cache)
    got = conv.forward_inference(fresh, conv.kernel.detach(), bias, relu=True)
    assert got.coords is out.coords and got.stride == out.stride
    assert (got.feats - ref).abs().max() <= TOL


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    net = MinkUNet(ModelConfig.preset("tiny", in_channels=4)).double().eval()
    for m in net.modules():  # running statistics and affine terms away from the identity
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def unet_input(dtype=torch.float64):
    x = random_voxels(16, 4, density=0.2, seed=5)
    return lambda: SparseTensor(x.feats.to(dtype), x.coords, 1)


def run(net, x, fused):
    net.fused_inference = fused
    with torch.no_grad():
        return {s: t.feats for s, t in net(x()).items()}


def test_fused_unet_matches_modules():
    net, x = tiny_unet(), unet_input()
    ref, got = run(net, x, False), run(net, x, True)
    assert ref.keys() == got.keys()
    for s in ref:
        assert (got[s] - ref[s]).abs().max() <= TOL * max(1.0, float(ref[s].abs().max()))
    # Folded weights follow statistics a training forward updated (no version counter moves for those).
    net.train()
    with torch.no_grad():
        net(x())
    net.eval()
    ref, got = run(net, x, False), run(net, x, True)
    assert (got[1] - ref[1]).abs().max() <= TOL * float(ref[1].abs().max())


def test_folded_weights_are_kept_until_a_source_changes():
    """A second pass reuses the folds of the first; an optimizer-style in-place step, a load_state_dict and a
    training forward each make the next fused pass fold again (it then equals the module path)."""
    net, x = tiny_unet(), unet_input()
    stem = net.stem[0][0]
    run(net, x, True)
    kept = stem._folded[1]
    run(net, x, True)
    assert stem._folded[1] is kept

    def fused_is_modules():
        ref, got = run(net, x, False)[1], run(net, x, True)[1]
        return bool((got - ref).abs().max() <= TOL * float(ref.abs().max()))

    with torch.no_grad():
        stem.kernel.mul_(1.5)  # what an optimizer step does
    assert fused_is_modules() and stem._folded[1] is not kept
    other = tiny_unet()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    net.load_state_dict(other.state_dict())
    assert fused_is_modules()
    net.train()
    with torch.no_grad():
        net(x())
    net.eval()
    assert fused_is_modules()


def test_model_built_in_inference_mode_runs_fused():
    """Parameters made under inference_mode (no version counter) fold too, and an in-place change shows."""
    x = unet_input()
    with torch.inference_mode():
        net = tiny_unet()
        first = run(net, x, True)[1]
        net.stem[0][1].running_mean.add_(0.5)
        ref, got = run(net, x, False)[1], run(net, x, True)[1]
    assert not torch.equal(first, got)
    assert (got - ref).abs().max() <= TOL * float(ref.abs().max())


def test_training_and_autograd_use_the_modules():
    """Training takes the module path, and its gradient is the true one: the autograd gradient of every parameter
    along a random direction equals a central finite difference of the loss (float64, train-mode BatchNorm)."""
    net, x = tiny_unet(), unet_input()
    net.train()
    feats = net(x())[1].feats
    weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (feats * weights).sum().backward()  # the fused path has no backward; training never reaches it
    params = [p for p in net.parameters() if p.grad is not None]
    assert net.stem[0][0].kernel.grad is not None and len(params) == len(list(net.parameters()))
    g = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    along = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))

    def loss_moved(step):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=step)
            value = float((net(x())[1].feats * weights).sum())
            for p, d in zip(params, direction):
                p.sub_(d, alpha=step)
        return value

    eps = 1e-8  # small: with random weights many ReLU inputs sit near 0, and at 1e-6 steps cross them (1 % off)
    numeric = (loss_moved(eps) - loss_moved(-eps)) / (2 * eps)
    assert abs(along - numeric) <= 1e-6 * max(1.0, abs(numeric)), (along, numeric)
    net.eval()
    with torch.enable_grad():
        assert net(x())[1].feats.requires_grad


def test_bfloat16_fused_unet_stays_close_to_float32():
    """Under bfloat16 autocast the fused path (bfloat16 features between layers) stays within a few percent of
    the float32 module path (relative to each level's largest feature)."""
    net = tiny_unet().float()
    x = unet_input(torch.float32)
    ref = run(net, x, False)
    net.fused_inference = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = {s: t.feats for s, t in net(x()).items()}
    for s in ref:
        assert got[s].dtype == torch.bfloat16
        assert float((got[s].float() - ref[s]).abs().max() / ref[s].abs().max()) < 0.05


@pytest.mark.parametrize("kind", ["submanifold", "strided", "transposed"])
def test_csr_scatter_equals_index_add(monkeypatch, kind):
    """The products summed by the map's CSR scatter matrix (one sparse matmul) equal one index_add_ per offset."""
    x = random_voxels(8, 6, seed=3)
    conv = Conv3d(6, 7, 3, backend="torch") if kind == "submanifold" else Conv3d(6, 7, 2, 2, backend="torch")
    coords, _, kmap = conv._output_and_map(x)
    if kind == "transposed":
        kmap = kmap.transposed()
        assert kmap is conv._output_and_map(x)[2].transposed()  # one object: its scatter matrix is kept
        x = SparseTensor(torch.randn(kmap.n_in, 6, dtype=torch.float64), coords, 2, x.cache)
    weight, bias = conv.kernel.detach().double(), torch.randn(7, dtype=torch.float64)
    assert kernels._sparse_scatter(x.feats.new_empty(1, 7))
    got = sparse_conv_inference(x.feats, weight, kmap, bias, relu=True)
    monkeypatch.setattr(kernels, "_sparse_scatter", lambda out: False)
    ref = sparse_conv_inference(x.feats, weight, kmap, bias, relu=True)
    assert got.shape == (kmap.n_out, 7) and (got - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("n", [1000, 70_000, 300_000])
def test_stable_order_is_a_stable_argsort(n):
    """The radix-sorted pair order (one 16-bit pass below 65,536 outputs, two above) is torch's stable argsort."""
    keys = torch.randint(0, n, (5 * n // 4,), generator=torch.Generator().manual_seed(n))
    assert torch.equal(maps._stable_order(keys, n), torch.argsort(keys, stable=True))


@pytest.mark.parametrize("batches", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_voxelize_equals_generic(monkeypatch, batches, dtype):
    """The CPU voxelize (radix-sorted float64 keys, CSR means) gives the generic path's voxels, order and bits."""
    g = torch.Generator().manual_seed(7)
    pts = (torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([20.0, 20.0, 2.0]) - 5).to(dtype)
    feats = torch.randn(20000, 5, generator=g, dtype=dtype)
    batch = None if batches is None else torch.randint(0, batches, (20000,), generator=g)
    assert voxelization._voxelize_cpu_applies(pts, batch, feats)
    got, got_p2v = voxelization.voxelize(pts, batch, 0.3, feats)
    monkeypatch.setattr(voxelization, "_voxelize_cpu_applies", lambda *args: False)
    ref, ref_p2v = voxelization.voxelize(pts, batch, 0.3, feats)
    assert torch.equal(got.coords, ref.coords) and got.coords.dtype == torch.int32
    assert torch.equal(got.feats, ref.feats) and torch.equal(got_p2v, ref_p2v)
    assert got.batch_size == ref.batch_size and len(got) < 20000


def test_cpu_voxelize_rejects_non_finite():
    with pytest.raises(ValueError, match="NaN or inf"):
        voxelization.voxelize(torch.tensor([[0.0, 1.0, float("inf")]]), None, 0.1, torch.zeros(1, 1))


@pytest.mark.parametrize("stride", [1, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_numpy_walk_equals_torch_walk(monkeypatch, stride, shuffle):
    """The CPU walk in numpy gives the torch walk's pairs in the same order (sorted and unsorted voxels), and on
    sorted voxels the searched map's (unsorted, the walk mirrors other offsets than the search: same pairs)."""
    x = random_voxels(12, 1, stride=stride, density=0.25, seed=9)
    coords = x.coords[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))] if shuffle else x.coords
    offsets = kernel_offsets(3) * stride
    got = build_kernel_map(coords, coords, offsets, True)
    monkeypatch.setattr(maps, "_walk_on_numpy", False)
    assert same_map(got, build_kernel_map(coords, coords, offsets, True))
    searched = build_kernel_map(coords, coords, offsets, True, walk_columns=False)
    assert shuffle or same_map(got, searched)
    assert all(torch.equal(torch.sort(i * len(x) + o).values, torch.sort(j * len(x) + p).values)
               for i, o, j, p in zip(got.in_idx, got.out_idx, searched.in_idx, searched.out_idx))


@pytest.mark.parametrize("k,stride,shuffle", [(3, 1, False), (3, 4, True), (5, 2, False), (3, 2, True)])
def test_table_map_equals_the_walk(monkeypatch, k, stride, shuffle):
    """The lookup-table map gives the numpy walk's pairs in the same order (two batch entries, negative
    coordinates, sorted and shuffled voxels); over TABLE_MAX_CELLS, or off the step grid, the walk runs."""
    x = random_voxels(12, 1, stride=stride, density=0.25, seed=k + stride)
    coords = x.coords[torch.randperm(len(x), generator=torch.Generator().manual_seed(2))] if shuffle else x.coords
    offsets = kernel_offsets(k) * stride
    calls = []
    table_map = maps._table_map_cpu
    monkeypatch.setattr(maps, "_table_map_cpu", lambda *a: calls.append(table_map(*a)) or calls[-1])
    got = build_kernel_map(coords, coords, offsets, True)
    assert calls[-1] is got  # built by the table
    monkeypatch.setattr(maps, "TABLE_MAX_CELLS", 0)
    walked = build_kernel_map(coords, coords, offsets, True)
    assert calls[-1] is None and same_map(got, walked) and got.identity == walked.identity
    monkeypatch.setattr(maps, "TABLE_MAX_CELLS", 1 << 22)
    off_grid = coords.clone()
    off_grid[0, 1] += 1  # one x off the stride grid
    if stride > 1:
        assert table_map(off_grid, offsets, len(offsets) // 2) is None
    assert same_map(build_kernel_map(coords, coords, offsets, True), got)  # the table was left clean


@pytest.mark.parametrize("stride,step", [(1, 2), (2, 4), (1, 3)])
def test_numpy_downsample_and_parent_map_equal_torch(monkeypatch, stride, step):
    """Parent cells, their order, each child's parent and the 2x2x2 parent map: numpy (CPU) equals torch."""
    x = random_voxels(12, 1, stride=stride, density=0.3, seed=11)  # column-major coords, as nonzero gives
    before = x.coords.clone()
    got_coords, got_parents = maps._downsample_with_parents(x.coords, step)
    assert torch.equal(x.coords, before)  # the input is left alone
    got_map = maps.build_parent_map(x.coords, got_coords, got_parents, stride) if step == 2 * stride else None
    monkeypatch.setattr(maps, "_downsample_on_numpy", False)
    ref_coords, ref_parents = maps._downsample_with_parents(x.coords, step)
    assert torch.equal(got_coords, ref_coords) and got_coords.dtype == torch.int32
    assert torch.equal(got_parents, ref_parents)
    if got_map is not None:
        assert same_map(got_map, maps.build_parent_map(x.coords, ref_coords, ref_parents, stride))


def test_cpu_voxelize_under_autocast_keeps_float32():
    """Under bfloat16 autocast (the Segmenter's fast path) the CPU voxelize still averages in float32."""
    g = torch.Generator().manual_seed(3)
    pts, feats = torch.randn(5000, 3, generator=g) * 10, torch.randn(5000, 4, generator=g)
    ref, _ = voxelization.voxelize(pts, None, 0.5, feats)
    with torch.autocast("cpu", torch.bfloat16):
        got, _ = voxelization.voxelize(pts, None, 0.5, feats)
    assert got.feats.dtype == torch.float32 and torch.equal(got.feats, ref.feats)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), 2e4])
def test_admit_fast_path_matches_per_point_test(bad):
    """A clean cloud is admitted by two whole-array reductions; one bad value sends it to the per-point test,
    and both give the same valid set and counts."""
    import numpy as np

    from sal_ros.core.cloud_input import MAX_COORDINATE, SegmenterConfig, admit_cloud

    pts = np.random.default_rng(0).normal(0, 30, (1000, 3)).astype(np.float32)
    if bad is not None:
        pts[[3, 500]] = bad
    got = admit_cloud(pts, None, SegmenterConfig(), 1.0)
    finite = np.isfinite(pts).all(1)
    with np.errstate(invalid="ignore"):
        valid = np.flatnonzero(finite & (np.abs(pts) <= MAX_COORDINATE).all(1))
    assert np.array_equal(got.valid, valid) and np.array_equal(got.run, valid)
    assert got.nonfinite == int((~finite).sum()) and got.out_of_range == 1000 - got.nonfinite - valid.size
    expected = (0, 0) if bad is None else (0, 2) if np.isfinite(bad) else (2, 0)
    assert (got.nonfinite, got.out_of_range) == expected
