"""detectron2's PointRend point sampling behaves as the project's former hand-written copy.

c2s_d2 used to ship its own ``point_sample`` / ``uncertain_point_coords``; the criterion and the
matcher now call ``detectron2.projects.point_rend.point_features``. Before the switch the two
were compared exactly (torch.equal on 48 ``point_sample`` and 384 point-selection cases with the
same global RNG seed). These tests keep the contract the losses rely on: the
``align_corners=False`` convention with zero padding, the order of random draws (candidates
first, then the uniform points), uncertain points before uniform ones, and clear errors for bad
sampling settings.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

from c2s_d2.modeling.criterion import SetCriterion, logit_uncertainty
from c2s_d2.modeling.matcher import HungarianMatcher


def _bilinear_reference(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling written out by hand: [N, C, H, W], [N, P, 2] (x, y) -> [N, C, P].

    Point (x, y) sits at pixel position (x W - 0.5, y H - 0.5) (pixel centres at integers);
    taps outside the image count as zero.
    """
    n, c, h, w = input.shape
    px = coords[..., 0].double() * w - 0.5
    py = coords[..., 1].double() * h - 0.5
    x0, y0 = px.floor().long(), py.floor().long()
    out = torch.zeros(n, c, coords.shape[1], dtype=torch.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - (px - xi).abs()) * (1 - (py - yi).abs())  # [N, P]
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            flat = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1))[:, None].expand(-1, c, -1)
            values = torch.gather(input.double().flatten(2), 2, flat)
            out += values * (weight * inside)[:, None]
    return out


def test_point_sample_zero_padding_at_the_border_hand_checked():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # [1, 1, 2, 2]
    # (0, 0): the four taps around pixel position (-0.5, -0.5) weigh 1/4 each; only pixel (0, 0)
    # (value 0) is inside -> 0. (1, 1): only pixel (1, 1) = 3 is inside -> 3/4.
    # (0.5, 0): the row above is outside; pixels 0 and 1 weigh 1/2 * 1/2 -> 1/4.
    coords = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.5, 0.0]]])
    out = point_sample(image, coords, align_corners=False)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.75, 0.25]))


def test_point_sample_matches_hand_written_bilinear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 9, generator=g)
    coords = torch.rand(3, 200, 2, generator=g)
    coords[:, 0] = torch.tensor([0.0, 1.0])  # corners and edges too
    coords[:, 1] = torch.tensor([1.0, 0.0])
    out = point_sample(x, coords, align_corners=False)
    assert out.shape == (3, 4, 200)
    assert torch.allclose(out.double(), _bilinear_reference(x, coords), atol=1e-5)


def _reference_coords(logits, num_points, oversample_ratio, importance_sample_ratio):
    """The former c2s_d2 point selection, drawing from torch's global generator."""
    n = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = torch.rand(n, num_candidates, 2)
    grid = (2.0 * candidates - 1.0).unsqueeze(2)
    sampled = F.grid_sample(logits, grid, mode="bilinear", align_corners=False)[..., 0]
    top = torch.topk(-sampled.abs()[:, 0], k=num_uncertain, dim=1).indices
    coords = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    uniform = torch.rand(n, num_points - num_uncertain, 2)
    return torch.cat([coords, uniform], dim=1)


@pytest.mark.parametrize(
    "num_points, oversample_ratio, importance_sample_ratio",
    [(1, 1.0, 1.0), (7, 3.0, 0.75), (112, 2.5, 0.5), (50, 3.0, 0.0), (64, 1.0, 1.0)],
)
def test_uncertain_points_equal_the_former_selection(
    num_points: int, oversample_ratio: float, importance_sample_ratio: float
):
    logits = 3.0 * torch.randn(4, 1, 13, 20, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    expected = _reference_coords(logits, num_points, oversample_ratio, importance_sample_ratio)
    expected_next = torch.rand(2)
    torch.manual_seed(5)
    coords = get_uncertain_point_coords_with_randomness(
        logits, logit_uncertainty, num_points, oversample_ratio, importance_sample_ratio
    )
    assert coords.shape == (4, num_points, 2)
    assert torch.equal(coords, expected)
    # Same number of draws: the global generator continues identically afterwards.
    assert torch.equal(torch.rand(2), expected_next)


def test_uncertain_points_come_first_then_fresh_uniform_points():
    logits = 3.0 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    candidates = torch.rand(2, 30, 2)
    uniform = torch.rand(2, 5, 2)
    torch.manual_seed(3)
    coords = get_uncertain_point_coords_with_randomness(logits, logit_uncertainty, 10, 3.0, 0.5)
    assert torch.equal(coords[:, 5:], uniform)
    for b in range(2):
        for point in coords[b, :5]:
            assert (candidates[b] == point).all(1).any()
    # Most uncertain first: |logit| at the chosen points does not decrease.
    magnitude = point_sample(logits, coords[:, :5], align_corners=False)[:, 0].abs()
    assert (magnitude[:, 1:] >= magnitude[:, :-1]).all()


def test_logit_uncertainty_hand_checked():
    logits = torch.tensor([[[-2.0, 0.0, 0.5, math.inf]]])  # [N=1, 1, P=4], as detectron2 passes
    assert torch.equal(logit_uncertainty(logits), torch.tensor([[[-2.0, -0.0, -0.5, -math.inf]]]))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"oversample_ratio": 0.5}, "OVERSAMPLE_RATIO"),
        ({"importance_sample_ratio": 1.5}, "IMPORTANCE_SAMPLE_RATIO"),
        ({"importance_sample_ratio": -0.1}, "IMPORTANCE_SAMPLE_RATIO"),
    ],
)
def test_criterion_rejects_bad_sampling_settings(kwargs, key):
    weights = {"loss_ce": 1.0, "loss_mask": 1.0, "loss_dice": 1.0}
    with pytest.raises(ValueError, match=key):
        SetCriterion(HungarianMatcher(), weights, 0.1, num_points=16, **kwargs)
    # Without point sampling the settings are unused and accepted, as before.
    SetCriterion(HungarianMatcher(), weights, 0.1, num_points=0, **kwargs)
