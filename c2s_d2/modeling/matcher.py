"""Hungarian matching of object queries to ground-truth segments (MaskFormer set prediction).

The cost of assigning query ``q`` to segment ``t`` is

    C[q, t] = cost_class * (-p_q(c_t)) + cost_mask * BCE(m_q, M_t) + cost_dice * Dice(m_q, M_t)

where ``p_q`` is the softmax over ``[K classes, no-object]``, ``m_q`` the query's mask logits
and ``M_t`` the binary target mask, both read at the same random points (or at every pixel).
The one-to-one assignment minimising the total cost is solved with
``scipy.optimize.linear_sum_assignment`` on the CPU.

``HungarianMatcher.match_by_mask_cost`` matches pseudo-mask regions (which have no class) to
queries left free by the main matching, by the mask terms alone (local distillation).

A non-finite cost (NaN/inf predictions) raises :class:`NonFiniteError`. In training the
trainer's collective check sets ``defer_non_finite``: the matcher then records the fault in
``non_finite_reports``, solves with the non-finite entries replaced by a large finite cost, and
lets the step reach the check, where every process stops together (a process that raised here
alone would leave the others waiting in the step's collectives).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..utils.errors import NonFiniteError

__all__ = ["batch_sigmoid_ce_cost", "batch_dice_cost", "HungarianMatcher"]

Indices = Tuple[torch.Tensor, torch.Tensor]
# stands for NaN/+inf (and -_HUGE for -inf) in a deferred non-finite cost: any assignment is valid
_HUGE = 1e9


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid binary cross-entropy, averaged over points.

    Args:
        inputs: [Q, P] mask logits.
        targets: [T, P] targets in [0, 1].

    Returns:
        [Q, T] cost; entry (q, t) is ``mean_p BCE(inputs[q, p], targets[t, p])``.
    """
    num_points = inputs.shape[1]
    # BCE(x, y) = y * softplus(-x) + (1 - y) * softplus(x), so both terms are matrix products.
    pos = F.softplus(-inputs)
    neg = F.softplus(inputs)
    cost = pos @ targets.T + neg @ (1.0 - targets).T
    return cost / max(num_points, 1)


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise Dice cost with +1 smoothing.

    Args:
        inputs: [Q, P] mask logits.
        targets: [T, P] targets in [0, 1].

    Returns:
        [Q, T] cost ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``, ``p = sigmoid(inputs)``.
    """
    probs = inputs.sigmoid()
    numerator = 2.0 * (probs @ targets.T)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def _solve(cost: torch.Tensor) -> Indices:
    """Minimum-cost one-to-one assignment of a [Q, T] cost matrix (rows, cols as int64)."""
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def _empty_indices() -> Indices:
    return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """One-to-one assignment between object queries and target segments, per image.

    The number of classes K is read from ``pred_logits`` at every call (the bank grows when
    latent classes are added), so one matcher serves every class list.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ):
        """
        Args:
            cost_class: weight of the classification cost ``-p(target class)``.
            cost_mask: weight of the sigmoid BCE mask cost.
            cost_dice: weight of the Dice mask cost.
            num_points: points sampled uniformly per image for the mask costs (the same points
                for every query and target); <= 0 compares at the prediction's resolution,
                with targets resized bilinearly.
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice are all 0")
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.num_points = int(num_points)
        # set by the training loop's collective check (c2s_d2/engine/hooks.py); see the module doc
        self.defer_non_finite = False
        self.non_finite_reports: List[str] = []

    def _finite_cost(self, cost: torch.Tensor, what: str, fault: str) -> torch.Tensor:
        """``cost`` if finite; else raise :class:`NonFiniteError` or, when deferred, record
        ``fault`` and return the cost with NaN/inf replaced by +-``_HUGE``."""
        if bool(torch.isfinite(cost).all()):
            return cost
        if not self.defer_non_finite:
            raise NonFiniteError(f"{what}: non-finite matching cost ({fault})")
        self.non_finite_reports.append(fault)
        return torch.nan_to_num(cost, nan=_HUGE, posinf=_HUGE, neginf=-_HUGE)

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )

    def mask_costs(
        self, pred_masks: torch.Tensor, target_masks: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """BCE and Dice costs between every prediction and every target mask of one image.

        Args:
            pred_masks: [Q, h, w] mask logits.
            target_masks: [T, H, W] binary (bool or float) masks; H, W may differ from h, w.

        Returns:
            ([Q, T] BCE cost, [Q, T] Dice cost), float32.
        """
        if pred_masks.dim() != 3 or target_masks.dim() != 3:
            raise ValueError(
                "HungarianMatcher: pred masks must be [Q, h, w] and target masks [T, H, W], got "
                f"{tuple(pred_masks.shape)} and {tuple(target_masks.shape)}"
            )
        pred = pred_masks.float()
        tgt = target_masks.to(device=pred.device, dtype=torch.float32)
        if self.num_points > 0:
            # One set of points for all queries and targets keeps the costs comparable.
            coords = torch.rand(1, self.num_points, 2, device=pred.device)
            pred_flat = point_sample(pred[None], coords, align_corners=False)[0]  # [Q, P]
            tgt_flat = point_sample(tgt[None], coords, align_corners=False)[0]  # [T, P]
        else:
            if tgt.shape[-2:] != pred.shape[-2:]:
                tgt = F.interpolate(
                    tgt[None], size=pred.shape[-2:], mode="bilinear", align_corners=False
                )[0]
            pred_flat = pred.flatten(1)
            tgt_flat = tgt.flatten(1)
        return batch_sigmoid_ce_cost(pred_flat, tgt_flat), batch_dice_cost(pred_flat, tgt_flat)

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]]
    ) -> List[Indices]:
        """Match the queries of each image to its target segments.

        Args:
            outputs: ``"pred_logits"`` [B, Q, K+1] (last = no-object) and ``"pred_masks"``
                [B, Q, h, w] mask logits.
            targets: B dicts with ``"labels"`` [n] int64 in ``0..K-1`` and ``"masks"``
                [n, H, W] bool/float.

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors of length ``min(Q, n)``:
            query ``pred_idx[j]`` is assigned to target ``tgt_idx[j]``.
        """
        for key in ("pred_logits", "pred_masks"):
            if key not in outputs:
                raise KeyError(f"HungarianMatcher: outputs lack {key!r} (got {sorted(outputs)})")
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if logits.dim() != 3 or masks.dim() != 4 or logits.shape[:2] != masks.shape[:2]:
            raise ValueError(
                "HungarianMatcher: need pred_logits [B, Q, K+1] and pred_masks [B, Q, h, w], got "
                f"{tuple(logits.shape)} and {tuple(masks.shape)}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(
                f"HungarianMatcher: {len(targets)} targets for a batch of {logits.shape[0]}"
            )
        num_classes = logits.shape[-1] - 1
        indices = []
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for b, target in enumerate(targets):
                labels = _checked_labels(target, b, num_classes)
                if labels.numel() == 0:
                    indices.append(_empty_indices())
                    continue
                probs = logits[b].float().softmax(-1)  # [Q, K+1]
                cost_class = -probs[:, labels.to(probs.device)]  # [Q, n]
                cost_ce, cost_dice = self.mask_costs(masks[b], target["masks"])
                cost = (
                    self.cost_class * cost_class
                    + self.cost_mask * cost_ce
                    + self.cost_dice * cost_dice
                )
                fault = f"image {b}: NaN/inf in pred_logits or pred_masks"
                indices.append(_solve(self._finite_cost(cost, "HungarianMatcher", fault)))
        return indices

    @torch.no_grad()
    def match_by_mask_cost(
        self,
        pred_masks: torch.Tensor,
        region_masks: torch.Tensor,
        allowed_queries: torch.Tensor,
    ) -> Indices:
        """Match class-less regions (pseudo-masks) to allowed queries by mask cost only.

        Args:
            pred_masks: [Q, h, w] mask logits of one image.
            region_masks: [R, H, W] binary region masks.
            allowed_queries: [Q] bool, True for queries that may take a region (e.g. those
                left unmatched by the main matching).

        Returns:
            ``(pred_idx, region_idx)`` int64 CPU tensors of length ``min(#allowed, R)``;
            ``pred_idx`` indexes all Q queries.
        """
        if pred_masks.dim() != 3 or region_masks.dim() != 3:
            raise ValueError(
                "match_by_mask_cost: pred_masks must be [Q, h, w] and region_masks [R, H, W], got "
                f"{tuple(pred_masks.shape)} and {tuple(region_masks.shape)}"
            )
        allowed = allowed_queries.to(device=pred_masks.device, dtype=torch.bool)
        if allowed.shape != pred_masks.shape[:1]:
            raise ValueError(
                f"match_by_mask_cost: allowed_queries must be [Q={pred_masks.shape[0]}] bool, "
                f"got shape {tuple(allowed_queries.shape)}"
            )
        query_ids = allowed.nonzero(as_tuple=True)[0]
        if query_ids.numel() == 0 or region_masks.shape[0] == 0:
            return _empty_indices()
        # Regions have no class, so only the mask terms decide (equal weights if both are 0).
        w_mask, w_dice = self.cost_mask, self.cost_dice
        if w_mask == 0 and w_dice == 0:
            w_mask, w_dice = 1.0, 1.0
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            cost_ce, cost_dice = self.mask_costs(pred_masks[query_ids], region_masks)
            cost = w_mask * cost_ce + w_dice * cost_dice
        fault = "pseudo-mask regions: NaN/inf in pred_masks"
        rows, cols = _solve(self._finite_cost(cost, "match_by_mask_cost", fault))
        return query_ids.cpu()[rows], cols


def _checked_labels(target: Dict[str, torch.Tensor], index: int, num_classes: int) -> torch.Tensor:
    """Return ``target["labels"]`` after checking keys, shapes and the class range."""
    for key in ("labels", "masks"):
        if key not in target:
            raise KeyError(f"HungarianMatcher: target {index} lacks {key!r} (got {sorted(target)})")
    labels, masks = target["labels"], target["masks"]
    if labels.dim() != 1 or masks.dim() != 3 or labels.shape[0] != masks.shape[0]:
        raise ValueError(
            f"HungarianMatcher: target {index} needs labels [n] and masks [n, H, W], got "
            f"{tuple(labels.shape)} and {tuple(masks.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"HungarianMatcher: target {index} has labels {labels.tolist()} outside "
            f"0..{num_classes - 1} (pred_logits has {num_classes} classes + no-object)"
        )
    return labels.long()
