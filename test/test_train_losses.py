"""Hungarian matching and the SAL loss on small tensors."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sal_ros.train.losses import LossWeights, Target, dice_loss, sal_loss
from sal_ros.train.matching import OBJECT, dice_cost, match, sigmoid_bce_cost


def _brute_force(cost: np.ndarray) -> float:
    q, k = cost.shape
    return min(cost[list(p), range(k)].sum() for p in itertools.permutations(range(q), k))


def test_cost_matrices_equal_pairwise_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g)
    targets = (torch.rand(3, 40, generator=g) > 0.5).float()
    bce, dice = sigmoid_bce_cost(logits, targets), dice_cost(logits, targets)
    for q, k in itertools.product(range(5), range(3)):
        assert bce[q, k] == pytest.approx(float(F.binary_cross_entropy_with_logits(logits[q], targets[k])), rel=1e-5)
        assert dice[q, k] == pytest.approx(float(dice_loss(logits[q : q + 1], targets[k : k + 1])[0]), rel=1e-5)


def test_match_is_optimal():
    g = torch.Generator().manual_seed(1)
    logits, obj = torch.randn(6, 50, generator=g), torch.randn(6, 2, generator=g)
    targets = torch.rand(4, 50, generator=g) > 0.6
    rows, cols = match(logits, obj, targets)
    cost = (5 * sigmoid_bce_cost(logits, targets.float()) + 2 * dice_cost(logits, targets.float())
            - 2 * obj.softmax(-1)[:, OBJECT, None]).numpy()
    assert sorted(cols.tolist()) == [0, 1, 2, 3] and len(set(rows.tolist())) == 4
    assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(_brute_force(cost), rel=1e-6)
    # a query that predicts a target exactly is matched to it
    logits[2] = torch.where(targets[1], 10.0, -10.0)
    rows, cols = match(logits, obj, targets)
    assert rows[cols == 1].item() == 2
    empty = match(logits, obj, targets[:0])
    assert empty[0].numel() == 0


def test_loss_fits_targets_by_gradient_descent():
    """Free per-query parameters trained on the loss reproduce the masks and tokens of the targets."""
    torch.manual_seed(0)
    n, q, d = 60, 6, 8
    inst = torch.arange(n) % 4  # instance 0 = unlabeled points, 1..3 objects
    target = Target(masks=inst[None] == torch.arange(1, 4)[:, None], tokens=F.normalize(torch.randn(3, d), dim=-1))
    masks = torch.zeros(q, n, requires_grad=True)
    obj = torch.zeros(q, 2, requires_grad=True)
    tokens = torch.randn(q, d, requires_grad=True)
    opt = torch.optim.Adam([masks, obj, tokens], lr=0.1)
    w = LossWeights()
    first = None
    for _ in range(150):
        layer = {"masks": [masks], "objectness": [obj], "tokens": [tokens]}
        loss, terms = sal_loss([layer, layer], [target], w)  # two "decoder layers"
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first and terms["token"] < 0.05 and terms["dice"] < 0.1
    rows, cols = match(masks.detach(), obj.detach(), target.masks)
    for r, c in zip(rows, cols):
        assert torch.equal(masks[r].detach() > 0, target.masks[c])
        assert F.cosine_similarity(tokens[r], target.tokens[c], dim=0) > 0.95
    p_obj = obj.detach().softmax(-1)[:, OBJECT]
    unmatched = torch.ones(q, dtype=torch.bool)
    unmatched[rows] = False
    assert p_obj[rows].min() > 0.5 > p_obj[unmatched].max()


def test_no_targets_still_gives_gradients():
    masks = torch.zeros(4, 10, requires_grad=True)
    obj = torch.zeros(4, 2, requires_grad=True)
    tokens = torch.randn(4, 8, requires_grad=True)
    target = Target(torch.zeros(0, 10, dtype=torch.bool), torch.zeros(0, 8))
    loss, terms = sal_loss([{"masks": [masks], "objectness": [obj], "tokens": [tokens]}], [target], LossWeights())
    loss.backward()
    assert terms["bce"] == 0.0 and obj.grad is not None and masks.grad is not None
    assert obj.grad[:, OBJECT].gt(0).all()  # pushes every query toward "no object"


def test_unknown_weight_rejected():
    with pytest.raises(ValueError, match="unknown loss settings"):
        LossWeights.from_dict({"clas": 1})
