"""Segmentation loss of the student (MaskFormer set criterion).

After Hungarian matching, each image contributes

* ``loss_ce``: cross-entropy over ``[K classes, no-object]`` for every query; matched queries
  target their segment's class, the others "no object", whose weight is ``no_object_weight``
  (``F.cross_entropy`` with class weights: the weighted sum divided by the sum of the weights);
* ``loss_mask``: sigmoid BCE between matched mask logits and target masks, mean over points
  (with ``num_points > 0``, points chosen by detectron2's PointRend importance sampling, where
  the predicted mask is uncertain, plus uniform ones; otherwise every target pixel);
* ``loss_dice``: Dice loss on the same pairs;

the mask terms summed over matched pairs and divided by the number of target masks in the whole
(distributed) batch. With ``aux_outputs`` (deep supervision) every decoder layer adds the same
three terms with suffix ``_i``. Losses are returned unweighted; ``weight_losses`` applies
``weight_dict`` (a suffixed key takes the weight of its base key).
"""

from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import nn

from .matcher import HungarianMatcher, Indices

__all__ = [
    "sigmoid_ce_loss",
    "dice_loss",
    "logit_uncertainty",
    "SetCriterion",
    "build_set_criterion",
]

_LOSS_KEYS = {"labels": ("loss_ce",), "masks": ("loss_mask", "loss_dice")}
# "loss_dice_3" -> "loss_dice": deep-supervision keys share the weight of their base key.
_AUX_SUFFIX = re.compile(r"^(.*)_(\d+)$")


def logit_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits for point selection: ``-|logit|``.

    Highest at the decision boundary; used as detectron2's ``uncertainty_func``.

    Args:
        logits: [N, 1, P] mask logits at P points.

    Returns:
        [N, 1, P]; larger means more uncertain.
    """
    return -logits.abs()


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sigmoid BCE per mask (mean over points), summed over masks and divided by ``num_masks``.

    Args:
        inputs: [M, P] mask logits.
        targets: [M, P] targets in [0, 1].
        num_masks: normaliser (number of target masks in the batch).

    Returns:
        scalar loss.
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` per mask, summed / ``num_masks``.

    Args:
        inputs: [M, P] mask logits (``p = sigmoid(inputs)``).
        targets: [M, P] targets in [0, 1].
        num_masks: normaliser (number of target masks in the batch).

    Returns:
        scalar loss.
    """
    probs = inputs.sigmoid()
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return loss.sum() / num_masks


class SetCriterion(nn.Module):
    """Matching + classification and mask losses of a mask-classification segmentor."""

    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        no_object_weight: float,
        losses: Sequence[str] = ("labels", "masks"),
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        """
        Args:
            matcher: assigns queries to targets.
            weight_dict: weight of each base loss key (``loss_ce``, ``loss_mask``, ``loss_dice``
                and any other key the caller wants to weight with ``weight_losses``).
            no_object_weight: class weight of "no object" in ``loss_ce`` (others weigh 1).
            losses: which terms to compute: ``"labels"`` and/or ``"masks"``.
            num_points: points per mask for the mask losses (importance-sampled); <= 0 uses
                full resolution (predictions upsampled bilinearly to the target size).
            oversample_ratio: candidates per point for importance sampling (>= 1).
            importance_sample_ratio: share of points chosen where predictions are uncertain
                (in [0, 1]).
        """
        super().__init__()
        unknown = [name for name in losses if name not in _LOSS_KEYS]
        if unknown or not losses:
            raise ValueError(
                f"SetCriterion: losses must be a subset of {sorted(_LOSS_KEYS)}, got {list(losses)}"
            )
        if no_object_weight < 0:
            raise ValueError(f"SetCriterion: no_object_weight must be >= 0, got {no_object_weight}")
        missing = [k for name in losses for k in _LOSS_KEYS[name] if k not in weight_dict]
        if missing:
            raise KeyError(f"SetCriterion: weight_dict lacks {missing} (got {sorted(weight_dict)})")
        # detectron2's point selection only asserts these; give the config key instead.
        if num_points > 0 and not oversample_ratio >= 1:
            raise ValueError(
                "SetCriterion: oversample_ratio (MODEL.C2S.OVERSAMPLE_RATIO) must be >= 1, "
                f"got {oversample_ratio}"
            )
        if num_points > 0 and not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(
                "SetCriterion: importance_sample_ratio (MODEL.C2S.IMPORTANCE_SAMPLE_RATIO) must be "
                f"in [0, 1], got {importance_sample_ratio}"
            )
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.no_object_weight = float(no_object_weight)
        self.losses = tuple(losses)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)

    def extra_repr(self) -> str:
        return (
            f"losses={self.losses}, no_object_weight={self.no_object_weight}, "
            f"num_points={self.num_points}, weight_dict={self.weight_dict}"
        )

    # ------------------------------------------------------------------ loss terms
    def loss_labels(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Sequence[Indices],
    ) -> Dict[str, torch.Tensor]:
        """``loss_ce`` over ``[K classes, no-object]`` for all B x Q queries.

        Args:
            outputs: ``"pred_logits"`` [B, Q, K+1].
            targets: B dicts with ``"labels"`` [n].
            indices: B matchings ``(pred_idx, tgt_idx)``.
        """
        logits = outputs["pred_logits"].float()
        num_classes = logits.shape[-1] - 1
        target_classes = torch.full(
            logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device
        )
        batch_idx, pred_idx = _pred_positions(indices)
        if batch_idx.numel():
            matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(
                logits.device
            )
            target_classes[batch_idx.to(logits.device), pred_idx.to(logits.device)] = matched_labels
        # Built per call because K changes when latent classes extend the bank.
        class_weight = torch.ones(num_classes + 1, device=logits.device)
        class_weight[-1] = self.no_object_weight
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=class_weight)
        return {"loss_ce": loss}

    def loss_masks(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Sequence[Indices],
        num_masks: float,
    ) -> Dict[str, torch.Tensor]:
        """``loss_mask`` (BCE) and ``loss_dice`` over the matched pairs.

        Args:
            outputs: ``"pred_masks"`` [B, Q, h, w] mask logits.
            targets: B dicts with ``"masks"`` [n, H, W] (sizes may differ between images).
            indices: B matchings ``(pred_idx, tgt_idx)``.
            num_masks: normaliser (target masks in the whole batch, >= 1).
        """
        pred_masks = outputs["pred_masks"]
        batch_idx, pred_idx = _pred_positions(indices)
        if batch_idx.numel() == 0:
            # Keep the graph connected so every parameter still gets a (zero) gradient.
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        device = pred_masks.device
        src = pred_masks[batch_idx.to(device), pred_idx.to(device)].float()  # [M, h, w]
        counts = [len(j) for _, j in indices]
        tgt_per_image = [
            t["masks"][j.to(t["masks"].device)].to(device=device, dtype=torch.float32)
            for t, (_, j) in zip(targets, indices)
        ]
        if self.num_points > 0:
            with torch.no_grad():  # no gradient through the choice of points
                coords = get_uncertain_point_coords_with_randomness(
                    src[:, None],
                    logit_uncertainty,
                    self.num_points,
                    self.oversample_ratio,
                    self.importance_sample_ratio,
                )  # [M, P, 2]: the uncertain points first, then uniform ones
            src_points = point_sample(src[:, None], coords, align_corners=False)[:, 0]  # [M, P]
            # Per image because target sizes may differ; coords are the predictions' coords.
            tgt_points = torch.cat(
                [
                    point_sample(m[:, None], c, align_corners=False)[:, 0]
                    for m, c in zip(tgt_per_image, coords.split(counts))
                    if m.shape[0]
                ]
            )
            return {
                "loss_mask": sigmoid_ce_loss(src_points, tgt_points, num_masks),
                "loss_dice": dice_loss(src_points, tgt_points, num_masks),
            }
        loss_mask = src.new_zeros(())
        loss_dice = src.new_zeros(())
        for pred, tgt in zip(src.split(counts), tgt_per_image):
            if tgt.shape[0] == 0:
                continue
            # Upsampling predictions keeps the targets' exact boundaries.
            pred = F.interpolate(
                pred[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
            loss_mask = loss_mask + sigmoid_ce_loss(pred.flatten(1), tgt.flatten(1), num_masks)
            loss_dice = loss_dice + dice_loss(pred.flatten(1), tgt.flatten(1), num_masks)
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    def get_losses(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Sequence[Indices],
        num_masks: float,
    ) -> Dict[str, torch.Tensor]:
        """All configured terms for one decoder layer's outputs and a given matching."""
        losses: Dict[str, torch.Tensor] = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices))
        if "masks" in self.losses:
            losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        return losses

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        return_indices: bool = False,
    ) -> Union[Dict[str, torch.Tensor], Tuple[Dict[str, torch.Tensor], List[Indices]]]:
        """Match and compute the (unweighted) losses of every decoder layer.

        Args:
            outputs: ``"pred_logits"`` [B, Q, K+1], ``"pred_masks"`` [B, Q, h, w], and
                optionally ``"aux_outputs"``: a list of dicts of the same form (deep supervision).
            targets: B dicts with ``"labels"`` [n] int64 and ``"masks"`` [n, H, W].
            return_indices: also return the final layer's matching.

        Returns:
            losses ``{"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", ...}``, and with
            ``return_indices`` the final layer's B matchings ``(pred_idx, tgt_idx)``.
        """
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(final, targets)
        num_masks = self.num_target_masks(targets, outputs["pred_logits"].device)
        losses = self.get_losses(final, targets, indices, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self.matcher(aux, targets)
            aux_losses = self.get_losses(aux, targets, aux_indices, num_masks)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        if return_indices:
            return losses, indices
        return losses

    @staticmethod
    def num_target_masks(targets: Sequence[Dict[str, torch.Tensor]], device: torch.device) -> float:
        """Average number of target masks per process (all-reduced when distributed), >= 1."""
        count = torch.tensor(
            float(sum(len(t["labels"]) for t in targets)), dtype=torch.float32, device=device
        )
        world_size = comm.get_world_size()  # 1 without an initialised process group
        if world_size > 1:
            dist.all_reduce(count)
        return float(torch.clamp(count / world_size, min=1.0).item())

    def weight_losses(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Multiply each loss by its weight; ``loss_x_i`` takes the weight of ``loss_x``.

        Raises:
            KeyError: naming a loss key with no weight in ``weight_dict``.
        """
        weighted = {}
        for key, value in losses.items():
            weighted[key] = value * self.loss_weight(key)
        return weighted

    def loss_weight(self, key: str) -> float:
        """Weight of loss ``key`` (suffix ``_i`` of deep supervision falls back to the base)."""
        if key in self.weight_dict:
            return self.weight_dict[key]
        match = _AUX_SUFFIX.match(key)
        if match and match.group(1) in self.weight_dict:
            return self.weight_dict[match.group(1)]
        raise KeyError(
            f"SetCriterion.weight_losses: no weight for loss {key!r} "
            f"(weight_dict has {sorted(self.weight_dict)})"
        )


def _pred_positions(indices: Sequence[Indices]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-image matchings into (batch index, query index) int64 vectors [M]."""
    if len(indices) == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    pred_idx = torch.cat([src for src, _ in indices])
    return batch_idx, pred_idx


def build_set_criterion(cfg) -> SetCriterion:
    """SetCriterion + HungarianMatcher from ``cfg.MODEL.C2S`` (see c2s_d2/config.py).

    Keys: CLASS_WEIGHT, MASK_WEIGHT, DICE_WEIGHT (matching costs and loss weights),
    NO_OBJECT_WEIGHT, TRAIN_NUM_POINTS, OVERSAMPLE_RATIO, IMPORTANCE_SAMPLE_RATIO.
    """
    c = cfg.MODEL.C2S
    matcher = HungarianMatcher(
        cost_class=c.CLASS_WEIGHT,
        cost_mask=c.MASK_WEIGHT,
        cost_dice=c.DICE_WEIGHT,
        num_points=c.TRAIN_NUM_POINTS,
    )
    weight_dict = {
        "loss_ce": c.CLASS_WEIGHT,
        "loss_mask": c.MASK_WEIGHT,
        "loss_dice": c.DICE_WEIGHT,
    }
    return SetCriterion(
        matcher,
        weight_dict=weight_dict,
        no_object_weight=c.NO_OBJECT_WEIGHT,
        num_points=c.TRAIN_NUM_POINTS,
        oversample_ratio=c.OVERSAMPLE_RATIO,
        importance_sample_ratio=c.IMPORTANCE_SAMPLE_RATIO,
    )
