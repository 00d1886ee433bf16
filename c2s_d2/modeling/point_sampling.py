"""Point sampling for mask losses and matching costs (PointRend-style).

Mask losses on a few thousand sampled points instead of every pixel cost far less memory and
give the same training signal. Coordinates are normalised to ``[0, 1]^2`` as ``(x, y)``, with
``(0, 0)`` the top-left corner of the top-left pixel (``align_corners=False`` convention), so
the same coordinates address a low-resolution prediction and a high-resolution target alike.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["point_sample", "uncertain_point_coords", "logit_uncertainty"]


def point_sample(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``input`` at normalised point coordinates.

    Args:
        input: [N, C, H, W] feature maps or mask logits.
        coords: [N, P, 2] points ``(x, y)`` in ``[0, 1]^2``.

    Returns:
        [N, C, P] sampled values.
    """
    if input.dim() != 4:
        raise ValueError(
            f"point_sample: input must be [N, C, H, W], got shape {tuple(input.shape)}"
        )
    if coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[0] != input.shape[0]:
        raise ValueError(
            f"point_sample: coords must be [N, P, 2] with N={input.shape[0]}, "
            f"got shape {tuple(coords.shape)}"
        )
    # grid_sample addresses [-1, 1]; a dummy width-1 axis turns the point list into a grid.
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(input.dtype)
    sampled = F.grid_sample(input, grid, mode="bilinear", align_corners=False)
    return sampled.squeeze(3)


def logit_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits: ``-|logit|`` (highest at the decision boundary).

    Args:
        logits: [N, 1, ...] mask logits.

    Returns:
        Tensor of the same shape; larger means more uncertain.
    """
    return -logits.abs()


def uncertain_point_coords(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    uncertainty_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick points where the mask prediction is most uncertain, plus uniform random points.

    ``num_points * oversample_ratio`` uniform candidates are drawn; the
    ``importance_sample_ratio * num_points`` most uncertain of them are kept and the rest of the
    ``num_points`` are fresh uniform points (so the whole mask is still covered).

    Args:
        logits: [N, 1, H, W] mask logits (no gradient is taken through the choice of points).
        num_points: P, points per mask (> 0).
        oversample_ratio: >= 1, candidates per kept point.
        importance_sample_ratio: in [0, 1], share of points chosen by uncertainty.
        uncertainty_fn: maps [N, 1, S] sampled logits to [N, 1, S] uncertainties;
            default ``logit_uncertainty`` (``-|logit|``).
        generator: optional random generator (on the logits' device) for reproducible points.

    Returns:
        [N, P, 2] point coordinates ``(x, y)`` in ``[0, 1]^2``.
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(
            f"uncertain_point_coords: logits must be [N, 1, H, W], got {tuple(logits.shape)}"
        )
    if num_points <= 0:
        raise ValueError(f"uncertain_point_coords: num_points must be > 0, got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(
            f"uncertain_point_coords: oversample_ratio must be >= 1, got {oversample_ratio}"
        )
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(
            "uncertain_point_coords: importance_sample_ratio must be in [0, 1], "
            f"got {importance_sample_ratio}"
        )
    uncertainty_fn = uncertainty_fn or logit_uncertainty
    n = logits.shape[0]
    device = logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain

    with torch.no_grad():
        candidates = torch.rand(n, num_candidates, 2, device=device, generator=generator)
        cand_logits = point_sample(logits.detach().float(), candidates)  # [N, 1, S]
        uncertainty = uncertainty_fn(cand_logits)[:, 0, :]  # [N, S]
        top = torch.topk(uncertainty, k=num_uncertain, dim=1).indices  # [N, P_u]
        coords = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
        if num_random > 0:
            uniform = torch.rand(n, num_random, 2, device=device, generator=generator)
            coords = torch.cat([coords, uniform], dim=1)
    return coords
