"""Latent text embeddings: text embeddings for the mined latent classes (docs/METHOD.md).

The paper generates latent text embeddings "by coordinating their text embeddings and the dense
features". We build, for each latent prototype, a convex mix of a *text part* (what the latent
vocabulary says the prototype looks like) and a *visual part* (the prototype itself, moved from
the image side to the text side of CLIP's modality gap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["latent_text_embeddings"]

_EPS = 1e-6


def latent_text_embeddings(
    prototypes: torch.Tensor,
    vocab_text: torch.Tensor,
    topk: int,
    tau: float,
    lam: float,
    mean_image: torch.Tensor,
    mean_text: torch.Tensor,
) -> torch.Tensor:
    r"""Latent text embedding ``z_k`` of every latent prototype ``p_k``.

    With ``p = normalise(p_k)``, vocabulary text embeddings ``T_v = normalise(vocab_text[v])``
    and ``c_v = <p, T_v>`` (cosine similarity):

    * ``N_k`` = the ``min(topk, V)`` vocabulary entries with the largest ``c_v`` (ties: lower
      index first);
    * text part ``t_k = sum_{v in N_k} w_v T_v`` with
      ``w_v = exp(c_v / tau) / sum_{u in N_k} exp(c_u / tau)`` (softmax over the top-k only);
    * visual part ``u_k = p - mean_image + mean_text`` (the modality-gap shift; ``mean_image`` and
      ``mean_text`` are running means of normalised image and text embeddings);
    * ``z_k = normalise(lam * t_k + (1 - lam) * u_k)``.

    With an empty vocabulary (``V = 0``), ``z_k = normalise(u_k)``.

    Args:
        prototypes: ``[K, d]`` latent prototypes.
        vocab_text: ``[V, d]`` text embeddings of the latent vocabulary (``V`` may be 0).
        topk: number of vocabulary entries mixed into the text part (``>= 1``).
        tau: softmax temperature (``> 0``).
        lam: weight ``lambda`` of the text part, in ``[0, 1]``.
        mean_image: ``[d]`` mean image embedding.
        mean_text: ``[d]`` mean text embedding.

    Returns:
        ``[K, d]`` unit-norm latent text embeddings (float32 or the prototypes' float dtype).
    """
    if prototypes.dim() != 2 or vocab_text.dim() != 2:
        raise ValueError(
            "latent_text_embeddings expects prototypes [K, d] and vocab_text [V, d], got "
            f"{tuple(prototypes.shape)} and {tuple(vocab_text.shape)}"
        )
    d = prototypes.shape[1]
    for name, t in (
        ("vocab_text", vocab_text),
        ("mean_image", mean_image),
        ("mean_text", mean_text),
    ):
        if t.shape[-1] != d or (name != "vocab_text" and t.dim() != 1):
            raise ValueError(
                f"latent_text_embeddings: {name} {tuple(t.shape)} does not match d={d}"
            )
    if int(topk) < 1:
        raise ValueError(f"LATENT.TOPK must be >= 1, got {topk}")
    if float(tau) <= 0:
        raise ValueError(f"LATENT.TAU must be > 0, got {tau}")
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"LATENT.LAMBDA must be in [0, 1], got {lam}")

    dtype = prototypes.dtype if prototypes.is_floating_point() else torch.float32
    p = F.normalize(prototypes.to(dtype), dim=-1, eps=_EPS)
    shift = mean_text.to(p.device, dtype) - mean_image.to(p.device, dtype)
    visual = p + shift[None, :]
    if vocab_text.shape[0] == 0 or p.shape[0] == 0:
        return F.normalize(visual, dim=-1, eps=_EPS)

    text = F.normalize(vocab_text.to(p.device, dtype), dim=-1, eps=_EPS)
    # Full precision: a softmax at temperature tau is sensitive to rounded similarities.
    with torch.autocast(device_type=p.device.type, enabled=False):
        sims = p @ text.t()
    # A stable sort: equal similarities keep vocabulary order, on every device.
    order_sims, order = torch.sort(sims, dim=1, descending=True, stable=True)
    k = min(int(topk), text.shape[0])
    top_sims, top_idx = order_sims[:, :k], order[:, :k]
    weights = torch.softmax(top_sims / float(tau), dim=1)
    text_part = torch.einsum("kj,kjd->kd", weights, text[top_idx])
    lam = float(lam)
    return F.normalize(lam * text_part + (1.0 - lam) * visual, dim=-1, eps=_EPS)
