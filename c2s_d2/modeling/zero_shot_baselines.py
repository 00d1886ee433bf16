"""Inference-only comparisons that use the CLIP teacher at test time (what C2S avoids).

* teacher-only dense zero-shot (MaskCLIP-style): classify each teacher patch embedding by the
  text embeddings; no student at all.
* two-stage (zsseg-style): the student's masks, each classified by the teacher on a masked crop
  of the image (one teacher forward per mask).

``MODEL.C2S.INFERENCE_MODE`` selects them: "teacher_dense" or "two_stage" ("student" = C2S).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = ["teacher_dense_scores", "two_stage_query_probs", "mask_boxes"]


def teacher_dense_scores(
    dense: torch.Tensor, bank: torch.Tensor, size: Tuple[int, int], logit_scale: float = 100.0
) -> torch.Tensor:
    """Per-pixel class probabilities from teacher dense embeddings.

    Args:
        dense: [d, h, w] normalised teacher patch embeddings.
        bank: [K, d] normalised text embeddings.
        size: (H, W) output size.
    Returns:
        [K, H, W] softmax(scale * cos) upsampled bilinearly.
    """
    logits = logit_scale * torch.einsum("dhw,kd->khw", dense, bank.to(dense.dtype))
    logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    return logits.softmax(0)


def mask_boxes(masks: torch.Tensor, min_size: float = 8.0) -> torch.Tensor:
    """Bounding boxes (x0, y0, x1, y1) of bool masks [Q, H, W]; empty masks get the whole image.

    Boxes are at least ``min_size`` pixels wide and high.
    """
    q, h, w = masks.shape
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    rows, cols = masks.any(2), masks.any(1)
    big = torch.tensor(1e9, device=masks.device)
    y0 = torch.where(rows, ys, big).min(1).values
    y1 = torch.where(rows, ys, -big).max(1).values + 1
    x0 = torch.where(cols, xs, big).min(1).values
    x1 = torch.where(cols, xs, -big).max(1).values + 1
    empty = ~rows.any(1)
    boxes = torch.stack([x0, y0, x1, y1], 1)
    boxes[empty] = torch.tensor([0.0, 0.0, float(w), float(h)], device=masks.device)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half_w = ((boxes[:, 2] - boxes[:, 0]).clamp_min(min_size)) / 2
    half_h = ((boxes[:, 3] - boxes[:, 1]).clamp_min(min_size)) / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1)


@torch.no_grad()
def two_stage_query_probs(
    teacher,
    image_rgb: torch.Tensor,
    mask_logits: torch.Tensor,
    bank: torch.Tensor,
    crop_size: int,
    logit_scale: float = 100.0,
    chunk: int = 16,
) -> torch.Tensor:
    """Classify each student mask with the teacher (masked crop -> global embedding).

    Args:
        teacher: a ClipTeacher (callable on RGB 0..255 images -> (global, dense)).
        image_rgb: [3, H, W] RGB 0..255.
        mask_logits: [Q, H, W] student mask logits at image resolution.
        bank: [K, d] normalised text embeddings.
        crop_size: teacher input size of each crop.
    Returns:
        [Q, K] class probabilities of each mask.
    """
    masks = mask_logits.sigmoid() > 0.5
    boxes = mask_boxes(masks)
    mean = image_rgb.mean((1, 2), keepdim=True)
    probs = []
    for s in range(0, masks.shape[0], chunk):
        m = masks[s : s + chunk, None].to(image_rgb.dtype)
        # background outside the mask becomes the image's mean colour, as zsseg's masked crops
        masked = image_rgb[None] * m + mean[None] * (1 - m)
        idx = torch.arange(m.shape[0], device=masked.device, dtype=masked.dtype)[:, None]
        rois = torch.cat([idx, boxes[s : s + chunk].to(masked.dtype)], 1)
        crops = roi_align(masked, rois, (crop_size, crop_size), aligned=True)
        g, _ = teacher(crops)
        probs.append((logit_scale * g @ bank.to(g.dtype).t()).softmax(-1))
    return torch.cat(probs, 0)
