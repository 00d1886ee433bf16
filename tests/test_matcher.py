"""Tests of point sampling, matching costs and the Hungarian matcher (tiny tensors)."""

import math

import pytest
import torch
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

from c2s_d2.modeling.criterion import logit_uncertainty
from c2s_d2.modeling.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost

LN3 = math.log(3.0)
# sigmoid(0) = 0.5, sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25
INPUTS = torch.tensor([[0.0, 0.0], [LN3, -LN3]])
TARGETS = torch.tensor([[1.0, 0.0], [1.0, 1.0]])


def test_point_sample_hand_checked():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # [1, 1, 2, 2]
    # (x, y): pixel centres sit at 0.25 / 0.75; the image centre averages all four pixels.
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5]]])
    out = point_sample(image, coords, align_corners=False)
    assert out.shape == (1, 1, 4)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 1.0, 2.0, 1.5]))


def test_point_sample_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="same batch size"):
        point_sample(torch.zeros(2, 1, 4, 4), torch.zeros(1, 3, 2), align_corners=False)


def test_uncertain_points_prefer_the_boundary():
    torch.manual_seed(0)
    # Logits = 20 * (x - 0.5): uncertain (|logit| small) only near the vertical line x = 0.5.
    xs = (torch.arange(32).float() + 0.5) / 32
    logits = (20 * (xs - 0.5)).expand(32, 32)[None, None].repeat(3, 1, 1, 1)
    coords = get_uncertain_point_coords_with_randomness(logits, logit_uncertainty, 64, 8.0, 1.0)
    assert coords.shape == (3, 64, 2)
    assert ((coords[..., 0] - 0.5).abs() < 0.15).all()
    # With no importance sampling the points are uniform: many lie far from the boundary.
    uniform = get_uncertain_point_coords_with_randomness(logits, logit_uncertainty, 64, 8.0, 0.0)
    assert ((uniform[..., 0] - 0.5).abs() > 0.15).float().mean() > 0.4


def test_sigmoid_ce_cost_hand_checked():
    # BCE per point: p=0.5 -> ln 2 for any target; p=0.75, y=1 -> -ln 0.75 = 0.287682;
    # p=0.25, y=0 -> -ln 0.75; p=0.25, y=1 -> -ln 0.25 = 1.386294. Mean over the 2 points:
    # (q1, t0) = 0.287682, (q1, t1) = (0.287682 + 1.386294) / 2 = 0.836988.
    expected = torch.tensor([[0.693147, 0.693147], [0.287682, 0.836988]])
    assert torch.allclose(batch_sigmoid_ce_cost(INPUTS, TARGETS), expected, atol=1e-5)


def test_dice_cost_hand_checked():
    # p = [.5, .5], t = [1, 0]: 1 - (2*.5 + 1) / (1 + 1 + 1) = 1/3
    # p = [.5, .5], t = [1, 1]: 1 - (2*1 + 1) / (1 + 2 + 1) = 1/4
    # p = [.75, .25], t = [1, 0]: 1 - (2*.75 + 1) / (1 + 1 + 1) = 1/6
    # p = [.75, .25], t = [1, 1]: 1 - (2*1 + 1) / (1 + 2 + 1) = 1/4
    expected = torch.tensor([[1 / 3, 1 / 4], [1 / 6, 1 / 4]])
    assert torch.allclose(batch_dice_cost(INPUTS, TARGETS), expected, atol=1e-6)


def _permuted_batch(num_queries=6, num_classes=4, sizes=((3, 16), (2, 24)), seed=0):
    """Targets with random masks, predictions equal to targets placed at known queries."""
    gen = torch.Generator().manual_seed(seed)
    logits, masks, targets, perms = [], [], [], []
    for n, size in sizes:
        tgt_masks = torch.rand(n, size, size, generator=gen) > 0.5
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        perm = torch.randperm(num_queries, generator=gen)[:n]
        pred_logits = torch.zeros(num_queries, num_classes + 1)
        pred_logits[:, -1] = 5.0  # unmatched queries say "no object"
        pred_masks = torch.full((num_queries, 8, 8), -5.0)
        for j in range(len(perm)):  # n > Q leaves some targets without a query
            pred_logits[perm[j]] = 0.0
            pred_logits[perm[j], labels[j]] = 5.0
            small = torch.nn.functional.interpolate(
                tgt_masks[j][None, None].float(), size=(8, 8), mode="bilinear"
            )[0, 0]
            pred_masks[perm[j]] = 10.0 * (small - 0.5)
        logits.append(pred_logits)
        masks.append(pred_masks)
        targets.append({"labels": labels, "masks": tgt_masks})
        perms.append(perm)
    outputs = {"pred_logits": torch.stack(logits), "pred_masks": torch.stack(masks)}
    return outputs, targets, perms


@pytest.mark.parametrize("num_points", [0, 256])
def test_matcher_recovers_known_permutation(num_points):
    torch.manual_seed(0)
    outputs, targets, perms = _permuted_batch()
    indices = HungarianMatcher(num_points=num_points)(outputs, targets)
    assert len(indices) == 2
    for (pred_idx, tgt_idx), perm, target in zip(indices, perms, targets):
        assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
        assert len(pred_idx) == len(target["labels"])
        assert torch.equal(pred_idx, perm[tgt_idx])


def test_matcher_handles_empty_targets_and_more_targets_than_queries():
    outputs, targets, _ = _permuted_batch(num_queries=2, sizes=((0, 16), (3, 16)))
    indices = HungarianMatcher(num_points=64)(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert len(indices[1][0]) == 2  # min(Q, n) pairs
    assert len(set(indices[1][1].tolist())) == 2


def test_matcher_infers_k_and_rejects_out_of_range_labels():
    outputs, targets, _ = _permuted_batch(num_classes=4)
    targets[0]["labels"] = torch.tensor([0, 1, 4])  # 4 == no-object index: not a class
    with pytest.raises(ValueError, match="outside 0..3"):
        HungarianMatcher(num_points=16)(outputs, targets)
    with pytest.raises(KeyError, match="pred_masks"):
        HungarianMatcher()({"pred_logits": outputs["pred_logits"]}, targets)


def test_match_by_mask_cost_respects_allowed_queries():
    torch.manual_seed(0)
    regions = torch.zeros(2, 8, 8, dtype=torch.bool)
    regions[0, :4] = True
    regions[1, 4:] = True
    pred = torch.full((4, 8, 8), -6.0)
    pred[1] = torch.where(regions[0], 6.0, -6.0)  # query 1 is region 0's best match
    pred[2] = torch.where(regions[1], 6.0, -6.0)  # query 2 is region 1's best match
    pred[3] = torch.where(regions[0], 2.0, -2.0)  # query 3 is region 0's second best
    matcher = HungarianMatcher(num_points=0)

    q, r = matcher.match_by_mask_cost(pred, regions, torch.ones(4, dtype=torch.bool))
    assert dict(zip(r.tolist(), q.tolist())) == {0: 1, 1: 2}

    allowed = torch.tensor([True, False, True, True])
    q, r = matcher.match_by_mask_cost(pred, regions, allowed)
    assert dict(zip(r.tolist(), q.tolist())) == {0: 3, 1: 2}

    q, r = matcher.match_by_mask_cost(pred, regions, torch.tensor([False, False, False, True]))
    assert q.tolist() == [3] and r.tolist() == [0]

    q, r = matcher.match_by_mask_cost(pred, regions, torch.zeros(4, dtype=torch.bool))
    assert q.numel() == 0 and r.numel() == 0
    with pytest.raises(ValueError, match="allowed_queries"):
        matcher.match_by_mask_cost(pred, regions, torch.ones(3, dtype=torch.bool))
