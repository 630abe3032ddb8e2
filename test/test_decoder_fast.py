"""Issue 17's decoder and postprocess shortcuts compute what the plain versions compute: the attention masks pooled
block by block (scaled logits clamped at 0) allow exactly the voxels ``QueryDecoder._allowed`` allows, the
block-wise query fusion picks the query and score the whole-tensor formula picks, in either mask layout, the
positional features from per-axis tables are those of the voxel centres (and train the same weights), and the
instance summaries found through a lookup table describe the instances the sorting path (large ids) finds."""
import numpy as np
import torch

from sal_ros.core.panoptic import instance_summaries

from sal_ros.model.config import ModelConfig
from sal_ros.model.decoder import OBJECT, POSITION_BLOCK_ROWS, FourierPositions, QueryDecoder, _add_linear
from sal_ros.model.mask_pooling import POOL_CHUNK_ROWS, allowed_pooled, pool_plan, pool_planned
from sal_ros.model.sparse import SparseTensor
from sal_ros.model.inference import FUSE_BLOCK_VOXELS, fuse_queries


def _masks(queries: int, voxels: int, levels: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    emb, feats = torch.randn(queries, 16, generator=gen), torch.randn(voxels, 16, generator=gen)
    parents = torch.cat([torch.arange(levels), torch.randint(0, levels, (voxels - levels,), generator=gen)])
    return emb, feats, parents


def test_pooled_attention_mask_allows_what_the_full_resolution_mask_allows():
    emb, feats, parents = _masks(40, 2 * POOL_CHUNK_ROWS + 123, 700)  # several chunks per cap
    emb[3] = 0.0  # logits exactly 0 everywhere: an empty mask, which attends everywhere
    emb[5] = -feats.mean(0) * 1e-3  # a query whose mask is positive on a minority of voxels
    logits = emb @ feats.T
    assert 0 < (logits[5] > 0).float().mean() < 1
    expected = QueryDecoder._allowed(logits, parents, 700)
    additive = allowed_pooled(emb, feats, parents, 700)
    assert additive.shape == (40, 700) and additive.is_contiguous()
    assert torch.equal(additive == 0, expected)
    assert bool(expected[3].all()) and additive.max() <= 0
    assert additive[~expected].max() < -1e20  # softmax weight exactly 0 where not allowed
    # the attention those masks give is the attention the boolean mask gives
    q, k = torch.randn(1, 40, 16), torch.randn(1, 700, 16)
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, k, additive[None]),
                               torch.nn.functional.scaled_dot_product_attention(q, k, k, expected[None]))


def _skewed_parents(voxels: int, levels: int, seed: int) -> torch.Tensor:
    """Child counts from 1 to a few hundred (every cap, padded ones included), level row 7 without a child."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(levels, generator=gen) ** 12
    weights[7] = 0.0
    rest = torch.multinomial(weights, voxels - levels + 1, replacement=True, generator=gen)
    return torch.cat([torch.arange(levels)[torch.arange(levels) != 7], rest])[torch.randperm(voxels, generator=gen)]


def test_pool_plan_covers_every_child_of_every_column():
    parents = _skewed_parents(6000, 300, seed=2)
    counts = torch.bincount(parents, minlength=300)
    assert counts.max() > 100 and counts[7] == 0
    plan = pool_plan(parents, 300, chunk_rows=512)
    assert sorted(plan.order.tolist()) == list(range(300))
    columns = plan.order
    seen = torch.zeros(len(parents), dtype=torch.bool)
    for start, cap, col, n in plan.chunks:
        rows = plan.fine_rows[start:start + cap * n].view(cap, n)
        assert cap == 0 or bool((parents[rows] == columns[col:col + n]).all())  # rank-major, one column each
        assert cap >= int(counts[columns[col:col + n]].max())
        seen[rows.reshape(-1)] = True
    assert bool(seen.all())
    assert len(plan.fine_rows) <= 1.25 * len(parents)  # padding stays below a quarter


def test_planned_pooling_allows_what_the_full_resolution_mask_allows():
    """Skewed child counts (capped, padded and big buckets, several chunks each, a level row without a child),
    float32 and bf16: the additive mask allows exactly what ``QueryDecoder._allowed`` allows, in plan order."""
    parents = _skewed_parents(9000, 400, seed=3)
    gen = torch.Generator().manual_seed(4)
    emb, feats = torch.randn(24, 16, generator=gen), torch.randn(9000, 16, generator=gen)
    emb[2] = 0.0  # empty mask: attends everywhere
    emb[9] = -feats.mean(0) * 1e-3
    for dtype in (torch.float32, torch.bfloat16):
        e, f = emb.to(dtype), feats.to(dtype)
        expected = QueryDecoder._allowed(e @ f.T, parents, 400)
        plan = pool_plan(parents, 400, chunk_rows=700)
        additive = pool_planned(e, f, plan)
        assert additive.dtype == dtype and additive.shape == (24, 400)
        assert torch.equal(additive == 0, expected[:, plan.order])
        assert bool(expected[2].all()) and not bool(expected[9].all()) and bool(expected[9].any())
        assert float(additive[~expected[:, plan.order]].max()) < -1e20
        assert torch.equal(allowed_pooled(e, f, parents, 400) == 0, expected)  # level order


def _fused_whole(mask_logits: torch.Tensor, obj_logits: torch.Tensor):
    p_obj = obj_logits.float().softmax(-1)[:, OBJECT]
    score, query = (mask_logits.float().sigmoid() * p_obj[:, None]).max(0)
    return query, score


def test_blockwise_fusion_is_the_whole_tensor_fusion_in_both_layouts():
    gen = torch.Generator().manual_seed(1)
    voxels = 2 * FUSE_BLOCK_VOXELS + 77
    vq = torch.randn(voxels, 30, generator=gen) * 4
    obj = torch.randn(30, 2, generator=gen)
    for masks in (vq.T.contiguous(), vq.T, vq.bfloat16().T):  # training layout, decoder's (V, Q) view, bf16
        before = masks.clone()
        query, score = fuse_queries(masks, obj)
        ref_query, ref_score = _fused_whole(masks, obj)
        assert torch.equal(query, ref_query)
        torch.testing.assert_close(score, ref_score, rtol=0, atol=0)
        assert torch.equal(masks, before)  # the caller's logits are left as they were


def test_instance_summaries_are_the_same_through_the_lookup_and_through_sorting():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(5000, 3)) * 10
    small = rng.choice([0, 3, 4, 9], size=5000)  # 0: no instance; ids below the lookup bound
    label = (small % 5 + 1).astype(np.uint16)
    label[rng.random(5000) < 0.1] = 7  # an instance's label is its first point's
    score = rng.random(5000).astype(np.float32)
    large = np.where(small > 0, small.astype(np.int64) * 10**9, 0)  # ids far above the bound: np.unique
    fast, sorted_ = instance_summaries(points, small, label, score), instance_summaries(points, large, label, score)
    assert [s.instance_id for s in fast] == [3, 4, 9] and [s.instance_id for s in sorted_] == [3e9, 4e9, 9e9]
    for a, b in zip(fast, sorted_):
        assert (a.label, a.num_points, a.score, a.box.yaw) == (b.label, b.num_points, b.score, b.box.yaw)
        assert np.array_equal(a.box.center, b.box.center) and np.array_equal(a.box.size, b.box.size)
        first = np.flatnonzero(small == a.instance_id)[0]
        assert a.label == label[first] and a.num_points == np.count_nonzero(small == a.instance_id)


def test_positions_from_per_axis_tables_are_the_positions_of_the_centres():
    torch.manual_seed(3)
    positions = FourierPositions(24, min_wavelength=0.1)
    coords = torch.randint(-1500, 1500, (4000, 3), dtype=torch.int32) * 4  # a stride-4 level, metres up to 300
    centres = (coords.float() + 2) * 0.05
    torch.testing.assert_close(positions.of_cells(coords, 2, 0.05), positions(centres), rtol=0, atol=1e-5)
    bias = torch.randn(24)  # a caller's bias (the mask features' linear) is added once per voxel
    torch.testing.assert_close(positions.of_cells(coords, 2, 0.05, bias), positions(centres) + bias, rtol=0, atol=1e-5)
    with torch.no_grad():  # cast block by block: the bits of the float32 features cast whole
        many = torch.randint(-1500, 1500, (2 * POSITION_BLOCK_ROWS + 5, 3), dtype=torch.int32)
        assert torch.equal(positions.of_cells(many, 0.5, 0.05, bias, torch.bfloat16),
                           positions.of_cells(many, 0.5, 0.05, bias).to(torch.bfloat16))
    grads = []
    for features in (lambda: positions.of_cells(coords, 2, 0.05), lambda: positions(centres)):
        positions.zero_grad()
        (features() ** 2).sum().backward()  # the same training signal reaches the projection
        grads.append([p.grad.clone() for p in positions.parameters()])
    for table_grad, grad in zip(*grads):
        torch.testing.assert_close(table_grad, grad, rtol=1e-4, atol=1e-3)


def test_inference_sums_are_the_bits_of_the_training_formulas():
    """Without autograd the mask features' addmm runs in place and a level's keys are summed straight into
    autocast's dtype: the same bits as the plain formulas cast the way autocast and the attention cast them."""
    gen = torch.Generator().manual_seed(5)
    for feat_dtype, amp in ((torch.bfloat16, True), (torch.float32, True), (torch.float32, False)):
        base, w = torch.randn(3000, 32, generator=gen), torch.randn(32, 24, generator=gen)
        x = torch.randn(3000, 24, generator=gen).to(feat_dtype)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            expected = torch.addmm(base.to(x.dtype), x, w.T)
            with torch.no_grad():
                got = _add_linear(base.clone(), x, w)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    config = ModelConfig.preset("tiny")
    decoder = QueryDecoder(config, {s: 16 for s in (1, *config.decoder.attention_strides)}).eval()
    stride = config.decoder.attention_strides[0]
    fine = SparseTensor(torch.randn(500, 16, generator=gen), torch.cat(
        [torch.zeros(500, 1, dtype=torch.int32), torch.randint(0, 40, (500, 3), generator=gen, dtype=torch.int32)], 1))
    coarse_coords = torch.unique(torch.div(fine.coords, torch.tensor([1, stride, stride, stride]),
                                           rounding_mode="floor") * torch.tensor([1, stride, stride, stride]), dim=0)
    coarse = SparseTensor(torch.randn(len(coarse_coords), 16, generator=gen), coarse_coords, stride)
    for amp in (True, False):
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            values, keys, parents = decoder._level(0, coarse, fine, 1)
            with torch.no_grad():
                fast_values, fast_keys, fast_parents = decoder._level(0, coarse, fine, 1)
        dtype = torch.bfloat16 if amp else torch.float32
        assert fast_keys[0].dtype == fast_values[0].dtype == dtype
        assert torch.equal(fast_keys[0], keys[0].to(dtype)) and torch.equal(fast_values[0], values[0].to(dtype))
        assert torch.equal(fast_parents[0], parents[0])
