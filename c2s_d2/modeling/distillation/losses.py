"""Distillation losses of C2S (docs/METHOD.md, losses 2 and 3).

Both losses compare *directions* in CLIP's embedding space: student and teacher embeddings are
L2-normalised first, and the teacher side is a constant target (detached).

* Global distillation, ``L_glob``: the projected output ``g_S`` of each CLS query is pulled to the
  teacher's image embedding ``g_T``.
* Local distillation, ``L_loc``: the class embedding ``e_r`` of the query matched to region ``r``
  is pulled to the teacher's region embedding ``t_r``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["GLOBAL_LOSS_KINDS", "global_distillation_loss", "local_distillation_loss"]

GLOBAL_LOSS_KINDS = ("cosine", "l1")
_EPS = 1e-6


def global_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine"
) -> torch.Tensor:
    """Global (image-level) distillation loss.

    With ``s = normalise(g_S[b, g])`` and ``t = normalise(g_T[b])``:

    * ``kind="cosine"``: ``L_glob = mean_{b,g} (1 - <s, t>)``, in ``[0, 2]``;
    * ``kind="l1"``: ``L_glob = mean_{b,g} sum_i |s_i - t_i|`` (the L1 distance between the
      normalised embeddings, summed over the ``d`` channels, averaged over images and CLS
      queries), in ``[0, 2 sqrt(d)]``.

    With ``G > 1`` CLS queries, every CLS query of image ``b`` is pulled to the same ``g_T[b]``.

    Args:
        student: ``[B, d]`` or ``[B, G, d]`` projected CLS-query outputs.
        teacher: ``[B, d]`` teacher image embeddings (treated as constants).
        kind: ``"cosine"`` or ``"l1"``.

    Returns:
        A scalar tensor; ``0`` connected to ``student``'s graph when ``B == 0`` or ``G == 0``.
    """
    if kind not in GLOBAL_LOSS_KINDS:
        raise ValueError(
            f"global distillation loss kind must be one of {GLOBAL_LOSS_KINDS}, got {kind!r}"
        )
    if student.dim() == 2:
        student = student.unsqueeze(1)
    if student.dim() != 3 or teacher.dim() != 2:
        raise ValueError(
            "global_distillation_loss expects student [B, d] or [B, G, d] and teacher [B, d], "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0] or student.shape[2] != teacher.shape[1]:
        raise ValueError(
            f"global_distillation_loss: student {tuple(student.shape)} does not match "
            f"teacher {tuple(teacher.shape)} (batch size and embedding size must agree)"
        )
    if student.numel() == 0:
        # Keeps the graph (and DDP's used-parameter bookkeeping) intact.
        return student.sum() * 0.0
    s = F.normalize(student, dim=-1, eps=_EPS)
    # The teacher is a fixed target: never back-propagate into it.
    t = F.normalize(teacher.detach().to(s.dtype), dim=-1, eps=_EPS).unsqueeze(1)
    if kind == "cosine":
        return (1.0 - (s * t).sum(dim=-1)).mean()
    return (s - t).abs().sum(dim=-1).mean()


def local_distillation_loss(
    student_embeds: torch.Tensor, teacher_embeds: torch.Tensor
) -> torch.Tensor:
    """Local (object-level) distillation loss ``L_loc = mean_r (1 - cos(e_r, t_r))``.

    Args:
        student_embeds: ``[R, d]`` class embeddings of the queries matched to the regions.
        teacher_embeds: ``[R, d]`` teacher region embeddings (treated as constants).

    Returns:
        A scalar tensor; ``0`` connected to ``student_embeds``' graph when ``R == 0``.
    """
    if student_embeds.dim() != 2 or student_embeds.shape != teacher_embeds.shape:
        raise ValueError(
            "local_distillation_loss expects student and teacher embeddings of the same shape "
            f"[R, d], got {tuple(student_embeds.shape)} and {tuple(teacher_embeds.shape)}"
        )
    if student_embeds.shape[0] == 0:
        # No region this step: a zero that still belongs to the graph.
        return student_embeds.sum() * 0.0
    s = F.normalize(student_embeds, dim=-1, eps=_EPS)
    t = F.normalize(teacher_embeds.detach().to(s.dtype), dim=-1, eps=_EPS)
    return (1.0 - (s * t).sum(dim=-1)).mean()
