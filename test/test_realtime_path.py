"""Issue 25's decoder shortcut for the realtime preset: attention masks pooled from the stride-1 logits cell by cell
(``CellPool``) allow exactly the keys the PoolPlan's masks allow, and on the real scan a seeded ``realtime`` model segments as
it did with PoolPlans (float rounding apart: keys and values attend in level order instead of plan order)."""
import numpy as np
import pytest
import torch

from sal_ros.model.config import ModelConfig
from sal_ros.model.decoder import parent_rows
from sal_ros.model.mask_pooling import allowed_pooled, cell_stages, pool_cells
from sal_ros.model.sal import SALModel
from sal_ros.model.segmenter import Segmenter, SegmenterConfig
from sal_ros.model.sparse import _downsample_coords
from conftest import require_data, semantickitti_embeddings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# measured on the real scan with the seeded realtime model: 5.4e-7 (masks), 4.0e-7 (objectness), 4.5e-8 (tokens)
MAX_ABS_DIFF = 1e-5


def _levels(seed: int = 0):
    """Stride-1 voxels around the origin (negative coordinates too) and their cells at strides 8 and 16."""
    gen = torch.Generator().manual_seed(seed)
    fine = torch.unique(torch.randint(-40, 40, (6000, 3), generator=gen), dim=0)
    fine = torch.cat([torch.zeros(len(fine), 1, dtype=fine.dtype), fine], 1).int()
    levels, coords = {}, fine
    for stride in (2, 4, 8, 16):
        coords = _downsample_coords(coords, stride)
        levels[stride] = coords
    return fine, {s: levels[s] for s in (8, 16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cell_pooling_gives_the_plan_masks_bit_for_bit(dtype):
    fine, levels = _levels()
    pools = cell_stages(fine, levels)
    assert set(pools) == {8, 16} and [len(pools[s].steps) for s in (8, 16)] == [3, 4]
    gen = torch.Generator().manual_seed(1)
    feats, emb = torch.randn(len(fine), 16, generator=gen).to(dtype), torch.randn(24, 16, generator=gen)
    emb[3] = 0.0  # an empty mask: attends everywhere
    emb[5] = -feats.float().mean(0) * 1e-3  # positive on some voxels only
    for stride, coords in levels.items():
        planned = allowed_pooled(emb, feats, parent_rows(fine, coords, stride), len(coords))
        cells = pool_cells(emb, feats, pools[stride])
        assert cells.shape == (24, len(coords)) and 0 < int((cells == 0).sum()) < cells.numel()
        # the same keys allowed; where not allowed, the same most negative logit up to the matmul's rounding (the
        # plan multiplies gathered rows): softmax weight exactly 0 either way
        assert torch.equal(cells == 0, planned == 0)
        blocked = planned != 0
        assert cells[blocked].max() < -1e20
        torch.testing.assert_close(cells[blocked].float(), planned[blocked].float(), rtol=1e-2 if dtype ==
                                   torch.bfloat16 else 1e-6, atol=0)


def test_cell_stages_only_for_halved_cells_in_their_order():
    fine, levels = _levels()
    assert cell_stages(fine, {8: levels[8].flip(0), 16: levels[16]}) is None  # another row order
    assert cell_stages(fine, {12: _downsample_coords(fine, 12)}) is None  # not a power of two


@pytest.fixture(scope="module")
def realtime_scan():
    scan = np.fromfile(require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin"), np.float32)
    torch.manual_seed(0)
    return SALModel(ModelConfig.preset("realtime")).eval(), scan.reshape(-1, 4)


def test_realtime_decoder_on_the_real_scan_as_with_pool_plans(realtime_scan, monkeypatch):
    model, scan = realtime_scan
    calls = []
    monkeypatch.setattr("sal_ros.model.decoder.pool_cells",
                        lambda *a, _f=pool_cells: calls.append(1) or _f(*a))
    with torch.inference_mode():
        vin = model.prepare(torch.from_numpy(scan[:, :3].copy()), torch.from_numpy(scan[:, 3].copy()))
        feats = model.backbone(vin.voxels)
        out = {}
        for cells in (False, True):
            model.decoder.cell_pooling = cells
            out[cells] = model.decode(feats, 1, all_layers=False)[-1]
    model.decoder.cell_pooling = True
    assert len(calls) == len(model.decoder.layers) and vin.num_voxels[0] > 10_000
    # the steps taken from the backbone's downsampling maps are the steps of a downsampling of their own
    levels = {s: feats[s].coords for s in model.decoder.levels}
    cached, own = cell_stages(feats[1].coords, levels, feats[1].cache), cell_stages(feats[1].coords, levels)
    assert set(cached) == set(own) == set(levels)
    for s in levels:
        assert torch.equal(cached[s].level_rows, own[s].level_rows)
        assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(cached[s].steps, own[s].steps))
    old, new = out[False], out[True]
    for a, b in [(old.masks[0], new.masks[0]), (old.objectness, new.objectness), (old.tokens, new.tokens)]:
        assert float((a - b).abs().max()) <= MAX_ABS_DIFF


def test_realtime_segments_on_the_real_scan_as_with_pool_plans(realtime_scan, monkeypatch):
    model, scan = realtime_scan
    segmenter = Segmenter(model, "cpu", semantickitti_embeddings(), SegmenterConfig(score_threshold=0.0))
    pts, inten = np.ascontiguousarray(scan[:, :3]), np.ascontiguousarray(scan[:, 3])
    with monkeypatch.context() as plans:
        plans.setattr(model.decoder, "cell_pooling", False)
        old = segmenter.segment(pts, inten)
    new = segmenter.segment(pts, inten)
    assert len(np.unique(old.instance)) >= 2
    assert np.array_equal(old.label, new.label) and np.array_equal(old.instance, new.instance)
    assert np.abs(old.score - new.score).max() <= MAX_ABS_DIFF
