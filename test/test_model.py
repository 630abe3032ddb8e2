"""SAL model on the real SemanticKITTI scan: training step, batching, inverse map, determinism, full-size CPU run."""
import numpy as np
import pytest
import torch

from conftest import require_data
from sal_ros.model.config import ModelConfig
from sal_ros.model.decoder import OBJECT, parent_rows
from sal_ros.model.sal import SALModel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: with torch's default team on a loaded 2-core machine the two-cluster test took 274 s
    (user time 107 s) against 8 s here; OpenMP barriers crawl when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scan():
    path = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    return np.fromfile(path, np.float32).reshape(-1, 4)


def _tensors(scan, n, seed):
    rows = np.sort(np.random.default_rng(seed).choice(len(scan), n, replace=False))
    s = scan[rows]
    return torch.from_numpy(s[:, :3].copy()), torch.from_numpy(s[:, 3].copy())


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return SALModel(ModelConfig.preset("tiny", **overrides))


def test_outputs_per_layer_and_shapes(scan):
    model = _tiny().eval()
    a, b = _tensors(scan, 3000, 1), _tensors(scan, 2000, 2)
    with torch.no_grad():
        layers = model([a[0], b[0]], [a[1], b[1]])
    cfg = model.config
    assert len(layers) == cfg.decoder.rounds * len(cfg.decoder.attention_strides) + 1
    for layer in layers:
        assert [m.shape for m in layer["masks"]] == [(cfg.decoder.num_queries, 3000), (cfg.decoder.num_queries, 2000)]
        assert [o.shape for o in layer["objectness"]] == [(cfg.decoder.num_queries, 2)] * 2
        for tok in layer["tokens"]:
            assert tok.shape == (cfg.decoder.num_queries, cfg.decoder.token_dim)
            torch.testing.assert_close(tok.norm(dim=1), torch.ones(cfg.decoder.num_queries))


def test_batch_elements_are_independent_and_eval_is_deterministic(scan):
    model = _tiny(decoder_rounds=2).eval()
    a, b = _tensors(scan, 4000, 3), _tensors(scan, 2500, 4)
    with torch.no_grad():
        both = model([a[0], b[0]], [a[1], b[1]])
        alone = [model(a[0], a[1]), model(b[0], b[1])]
        again = model([a[0], b[0]], [a[1], b[1]])
    for key in ("masks", "objectness", "tokens"):
        for bi in range(2):
            torch.testing.assert_close(both[-1][key][bi], alone[bi][-1][key][0], atol=1e-4, rtol=1e-4)
            assert torch.equal(both[-1][key][bi], again[-1][key][bi])


def test_point_order_follows_the_input(scan):
    """Per-point outputs go through the voxel inverse map: permuting the points permutes the mask columns."""
    model = _tiny().eval()
    p, i = _tensors(scan, 5000, 5)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(5000))
    with torch.no_grad():
        ref = model(p, i, all_layers=False)[-1]["masks"][0]
        shuffled = model(p[perm], i[perm], all_layers=False)[-1]["masks"][0]
    torch.testing.assert_close(shuffled, ref[:, perm], atol=1e-4, rtol=1e-4)


def test_parent_rows_matches_brute_force():
    rng = np.random.default_rng(0)
    fine = np.concatenate([rng.integers(0, 2, (500, 1)), rng.integers(-40, 40, (500, 3))], 1)
    fine = np.unique(fine, axis=0)
    parent = fine.copy()
    parent[:, 1:] = np.floor_divide(parent[:, 1:], 4) * 4
    coarse = np.unique(parent, axis=0)[::-1].copy()  # any order
    rows = parent_rows(torch.from_numpy(fine).int(), torch.from_numpy(coarse).int(), 4).numpy()
    np.testing.assert_array_equal(coarse[rows], parent)


def test_training_step_fits_two_clusters_and_reaches_every_parameter(scan):
    """Masks of queries 0/1 fit two point clusters of the real scan (near ground ring, far points); objectness
    and tokens fit too. Gradients reach every parameter through the deep-supervision outputs."""
    model = _tiny(seed=1).train()
    clouds = [_tensors(scan, 6000, 6), _tensors(scan, 4000, 7)]
    targets = []
    gen = torch.Generator().manual_seed(0)
    for p, _ in clouds:
        r = p[:, :2].norm(dim=1)
        masks = torch.stack([r < 8, r > 20]).float()
        tokens = torch.nn.functional.normalize(torch.randn(2, model.config.decoder.token_dim, generator=gen), dim=1)
        targets.append((masks, tokens))
    obj_target = torch.full((model.config.decoder.num_queries,), 1 - OBJECT)
    obj_target[:2] = OBJECT

    def loss_fn():
        layers = model([p for p, _ in clouds], [i for _, i in clouds])
        total = 0.0
        for layer in layers:
            for b, (masks, tokens) in enumerate(targets):
                total = total + torch.nn.functional.binary_cross_entropy_with_logits(layer["masks"][b][:2], masks)
                total = total + torch.nn.functional.cross_entropy(layer["objectness"][b], obj_target)
                total = total + (1 - (layer["tokens"][b][:2] * tokens).sum(1)).mean()
        return total

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = loss_fn()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    first = float(loss.detach())
    for _ in range(25):
        opt.step()
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
    assert float(loss.detach()) < 0.6 * first, (first, float(loss.detach()))


@pytest.mark.slow
def test_default_model_runs_the_full_scan_on_cpu(scan):
    """Default config (MinkUNet34, 0.05 m voxels, 300 queries) on all 124,668 points, inference only."""
    torch.manual_seed(0)
    model = SALModel(ModelConfig()).eval()
    p, i = torch.from_numpy(scan[:, :3].copy()), torch.from_numpy(scan[:, 3].copy())
    with torch.inference_mode():
        vin = model.prepare(p, i)
        pred = model.decode(model.backbone(vin.voxels), 1, all_layers=False)[-1]
    assert len(scan) == 124_668
    assert vin.num_voxels[0] > 50_000  # 0.05 m voxels keep most points apart
    assert pred.masks[0].shape == (300, vin.num_voxels[0])
    assert torch.isfinite(pred.masks[0]).all() and torch.isfinite(pred.tokens).all()
