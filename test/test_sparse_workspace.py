"""Scratch reuse of the CPU inference convs (issue 17): a Workspace changes no bit, results never alias it, and the
fused MinkUNet takes it off the cache after the forward pass and keeps it for the next (issue 25)."""
import pytest
import torch

from sal_ros.model.config import ModelConfig
from sal_ros.model.minkunet import MinkUNet
from sal_ros.model.sparse import Conv3d, SparseTensor, Workspace, sparse_conv_inference


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def voxels(channels, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = (torch.rand(2, 18, 18, 18, generator=g) < 0.25).nonzero()
    return SparseTensor(torch.randn(len(idx), channels, generator=g).to(dtype), idx.int(), 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("centre", [True, False])
def test_workspace_changes_no_bit(dtype, centre):
    x = voxels(12, dtype)
    conv = Conv3d(12, 8, 3 if centre else 2, 1 if centre else 2, backend="torch")
    kmap = conv._output_and_map(x)[2]
    assert (kmap.identity is not None) == centre
    g = torch.Generator().manual_seed(1)
    weight = conv.kernel.detach().to(dtype)
    bias = torch.randn(8, generator=g).to(dtype)
    residual = torch.randn(kmap.n_out, 8, generator=g).to(dtype)
    ws = Workspace()
    for b, r, relu in [(bias, residual, True), (None, None, False), (bias, None, False)]:
        fresh = sparse_conv_inference(x.feats, weight, kmap, b, r, relu)
        first = sparse_conv_inference(x.feats, weight, kmap, b, r, relu, ws)
        kept = first.clone()
        second = sparse_conv_inference(x.feats * 2, weight, kmap, b, r, relu, ws)  # reuses every scratch tensor
        assert torch.equal(first, fresh) and torch.equal(first, kept)  # not overwritten: no aliasing
        assert not torch.equal(second, first)


def test_fused_minkunet_same_bits_and_drops_workspace(monkeypatch):
    from sal_ros.model.sparse import fused

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    net = MinkUNet(cfg).eval()
    x = voxels(cfg.input.in_channels, torch.float32, seed=3)

    def run():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            return net(SparseTensor(x.feats, x.coords, 1))

    with_ws = run()
    assert next(iter(with_ws.values())).cache.workspace is None
    monkeypatch.setattr(fused, "Workspace", lambda: None)
    without = run()
    assert all(with_ws[s].feats.dtype == torch.bfloat16 for s in with_ws)
    assert all(torch.equal(with_ws[s].feats, without[s].feats) for s in with_ws)


def test_fused_minkunet_keeps_its_workspace_between_passes():
    """The second pass reuses the first pass's scratch (made afresh, its buffers were new pages in every frame:
    tiny ~2,600 page faults per scan) and gives the same bits; the first pass's outputs never alias it."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    net = MinkUNet(cfg).eval()
    x = voxels(cfg.input.in_channels, torch.float32, seed=3)

    def run(feats):
        with torch.no_grad():
            return net(SparseTensor(feats, x.coords, 1))

    first = run(x.feats)
    kept = {s: t.feats.clone() for s, t in first.items()}
    workspace = net._workspace
    assert workspace is not None and workspace._flat
    storage = {role: t.data_ptr() for role, t in workspace._flat.items()}
    second = run(x.feats * 2)
    assert net._workspace is workspace
    assert {role: t.data_ptr() for role, t in workspace._flat.items()} == storage  # reused, not grown
    assert all(torch.equal(first[s].feats, kept[s]) for s in first)  # not overwritten by the second pass
    assert not torch.equal(second[1].feats, first[1].feats)
    again = run(x.feats)
    assert all(torch.equal(again[s].feats, kept[s]) for s in kept)


@pytest.mark.filterwarnings("error:An output with one or more elements was resized")  # padding must fit
@pytest.mark.parametrize("channels", [(12, 8), (40, 24), (7, 128)])
@pytest.mark.parametrize("use_ws", [False, True])
def test_widened_products_same_bits(monkeypatch, channels, use_ws):
    """bfloat16 products written as the high halves of float32 words (one matmul with a zero-interleaved weight)
    equal the matmul-and-cast path bit for bit, negative features and bucket-padded offsets included."""
    from sal_ros.model.sparse import kernels, maps

    c_in, c_out = channels
    x = voxels(c_in, torch.bfloat16, seed=4)
    g = torch.Generator().manual_seed(5)
    conv = Conv3d(c_in, c_out, 3, backend="torch")
    kmap = conv._output_and_map(x)[2]
    assert any(len(i) % maps._bucket_step(len(i)) for i in kmap.in_idx)  # padding spills somewhere
    weight = torch.randn(27, c_in, c_out, generator=g).bfloat16()
    bias = torch.randn(c_out, generator=g).bfloat16()
    assert kernels._products_as_halves(x.feats, weight, torch.empty(0))
    ws = Workspace() if use_ws else None
    wide = sparse_conv_inference(x.feats, weight, kmap, bias, workspace=ws)
    monkeypatch.setattr(kernels, "_products_as_halves", lambda *a: False)
    assert torch.equal(wide, sparse_conv_inference(x.feats, weight, kmap, bias, workspace=ws))


def test_widened_weight_halves():
    from sal_ros.model.sparse.kernels import _widened

    w = torch.randn(3, 4, 5).bfloat16()
    halves = _widened(w).view(3, 4, 5, 2)
    assert torch.equal(halves[..., 1], w) and not halves[..., 0].any()


@pytest.mark.filterwarnings("error:An output with one or more elements was resized")
def test_many_chunks_same_bits(monkeypatch):
    """Product buffers cut into many chunks (padding spills at every chunk's end): same bits with and without a
    workspace, and within 1 % of the range of the float64 conv."""
    from sal_ros.model.sparse import kernels

    monkeypatch.setattr(kernels, "_SCATTER_CHUNK_BYTES", 4096)
    monkeypatch.setattr(kernels, "_WORKSPACE_CHUNK_BYTES", 4096)
    x = voxels(16, torch.bfloat16, seed=6)
    conv = Conv3d(16, 24, 3, backend="torch")
    kmap = conv._output_and_map(x)[2]
    assert sum(len(i) for i in kmap.in_idx) * 24 * 4 > 20 * 4096  # many chunks
    weight = conv.kernel.detach().bfloat16()
    got = sparse_conv_inference(x.feats, weight, kmap, workspace=Workspace())
    assert torch.equal(got, sparse_conv_inference(x.feats, weight, kmap))
    exact = sparse_conv_inference(x.feats.double(), weight.double(), kmap)
    assert (got.double() - exact).abs().max() <= 1e-2 * exact.abs().max()  # bf16 products, float32 sums
