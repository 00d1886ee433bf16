"""Pseudo-masks from the ignored area, and latent-region scoring (docs/METHOD.md).

The ignored area of a training image (label 255: unseen classes and unlabelled pixels) is cut
into regions on the teacher's grid:

1. **Clustering.** The teacher's dense embeddings of the ignored cells are L2-normalised and
   clustered by k-means with the distance ``dist(x, c) = 1 - <f_x, mu_c> + spatial_weight *
   ||p_x - pi_c||^2``, where ``f_x`` is the cell's normalised embedding, ``p_x`` its (row, col)
   position scaled to ``[0, 1]``, ``mu_c`` the re-normalised mean embedding of cluster ``c`` and
   ``pi_c`` its mean position. Initialisation is k-means++ (each next centre drawn with
   probability proportional to its distance to the nearest chosen centre) from a seeded CPU
   ``torch.Generator``, so results are reproducible on any device. ``iters`` Lloyd steps follow;
   an empty cluster keeps its centre.
2. **Choice of k (per image).** Every ``k`` in ``2..k_max`` is clustered ``n_init`` times from
   different k-means++ draws (all candidates at once). A candidate is *admissible* when each of
   its ``k`` clusters has at least ``min_area`` cells. Among admissible candidates, the one with
   the largest mean simplified silhouette ``s_x = (b_x - a_x) / max(a_x, b_x)`` (``a_x``: distance
   to its own centre, ``b_x``: to the nearest other centre) wins, provided that silhouette is at
   least ``min_silhouette``; otherwise ``k = 1`` (the whole ignored area). The silhouette also
   discards restarts stuck in a poor local optimum.
3. **Connected components.** Each cluster is split into 4-connected components by iterative label
   propagation (every cell takes the largest label among itself and its 4 neighbours inside the
   cluster, until nothing changes); components with fewer than ``min_area`` cells are dropped.

Guarantee: a returned mask covers ignored cells only, never a labelled cell.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .latent_classes import gather_from_all_processes

__all__ = [
    "connected_components",
    "ignored_cells_from_labels",
    "pseudo_masks_from_ignored_area",
    "pseudo_masks_from_ignored_area_batch",
    "score_regions",
    "best_seen_similarity",
    "CalibratedSeenFilter",
]

_EPS = 1e-6


def ignored_cells_from_labels(
    sem_seg: torch.Tensor, grid_size: Sequence[int], ignore_label: int = 255
) -> torch.Tensor:
    """Teacher-grid cells whose pixels are *all* ignored.

    Padding is not an ignored area: callers mark pixels outside each image's true size with any
    value other than ``ignore_label`` (the distiller uses -1), so they count as "not ignored".

    Args:
        sem_seg: ``[H, W]`` or ``[B, H, W]`` integer label map (training ids, ``ignore_label``).
        grid_size: ``(h, w)`` of the teacher grid.

    Returns:
        ``[h, w]`` or ``[B, h, w]`` bool; a cell holding any labelled (or padding) pixel is not
        ignored, so a pseudo-mask upsampled to the image never covers a labelled pixel.
    """
    if sem_seg.dim() not in (2, 3):
        raise ValueError(f"sem_seg must be [H, W] or [B, H, W], got {tuple(sem_seg.shape)}")
    single = sem_seg.dim() == 2
    labelled = (sem_seg != ignore_label).float().reshape(-1, 1, *sem_seg.shape[-2:])
    ignored = F.adaptive_max_pool2d(labelled, tuple(int(s) for s in grid_size))[:, 0] == 0
    return ignored[0] if single else ignored


@torch.no_grad()
def connected_components(masks: torch.Tensor) -> torch.Tensor:
    """4-connected components of each mask, by iterative max-label propagation.

    Args:
        masks: ``[M, h, w]`` bool.

    Returns:
        ``[M, h, w]`` int64: 0 outside the masks; inside, the component's id, which is unique over
        the whole batch (1 + the largest flat index ``m * h * w + i`` of the component's cells).
    """
    if masks.dim() != 3:
        raise ValueError(f"connected_components expects [M, h, w] masks, got {tuple(masks.shape)}")
    masks = masks.bool()
    m, h, w = masks.shape
    ids = torch.arange(1, m * h * w + 1, device=masks.device, dtype=torch.int64).view(m, h, w)
    labels = torch.where(masks, ids, torch.zeros_like(ids))
    # A component's label can travel at most h * w steps; the loop normally stops much earlier.
    for _ in range(max(h * w, 1)):
        grown = labels.clone()
        grown[:, 1:, :] = torch.maximum(grown[:, 1:, :], labels[:, :-1, :])
        grown[:, :-1, :] = torch.maximum(grown[:, :-1, :], labels[:, 1:, :])
        grown[:, :, 1:] = torch.maximum(grown[:, :, 1:], labels[:, :, :-1])
        grown[:, :, :-1] = torch.maximum(grown[:, :, :-1], labels[:, :, 1:])
        # Labels flow only inside the mask (within the cluster), never across its border.
        grown = torch.where(masks, grown, torch.zeros_like(grown))
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels


def _cluster_distances(
    feats: torch.Tensor,
    pos: torch.Tensor,
    centres: torch.Tensor,
    centre_pos: torch.Tensor,
    spatial_weight: float,
) -> torch.Tensor:
    """``[B, P, N, K]`` k-means distances of ``feats [B, N, d]`` to ``centres [B, P, K, d]``."""
    dist = 1.0 - torch.einsum("bnd,bpkd->bpnk", feats, centres)
    if spatial_weight > 0:
        diff = pos[None, None, :, None, :] - centre_pos[:, :, None, :, :]
        dist = dist + spatial_weight * diff.pow(2).sum(-1)
    return dist.clamp_min(0.0)


def _kmeans_candidates(
    feats: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor,
    ks: torch.Tensor,
    iters: int,
    spatial_weight: float,
    uniforms: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-means of every candidate (a number of clusters ``ks[p]``) of every image at once.

    Args:
        feats: ``[B, N, d]`` normalised cell embeddings; pos: ``[N, 2]``; valid: ``[B, N]`` bool.
        ks: ``[P]`` number of clusters of each candidate (``k_max = ks.max()`` slots are used).
        uniforms: ``[B, P, k_max]`` numbers in ``[0, 1)`` driving the k-means++ draws.

    Returns:
        distances ``[B, P, N, k_max]`` (inf for slots ``>= k``), assignments ``[B, P, N]`` and
        cluster sizes ``[B, P, k_max]`` (ignored cells only).
    """
    b, n, d = feats.shape
    p = ks.numel()
    k_max = int(uniforms.shape[-1])
    dev = feats.device
    slot_ok = torch.arange(k_max, device=dev)[None, :] < ks[:, None]
    inf = torch.tensor(float("inf"), device=dev)
    validf = valid.to(feats.dtype)[:, None, :].expand(b, p, n)

    # k-means++: slot j is drawn with probability ~ distance to the nearest of slots < j.
    weights = validf.clone()
    chosen = torch.zeros(b, p, k_max, dtype=torch.int64, device=dev)
    nearest = torch.full((b, p, n), float("inf"), device=dev, dtype=feats.dtype)
    first_valid = valid.to(torch.int64).argmax(dim=1)[:, None].expand(b, p)
    for j in range(k_max):
        cum = weights.cumsum(dim=-1)
        target = uniforms[:, :, j : j + 1] * cum[:, :, -1:]
        idx = torch.searchsorted(cum.contiguous(), target.contiguous(), right=True).squeeze(-1)
        # Nothing left to draw (all remaining cells coincide with centres): reuse a valid cell.
        idx = torch.where(cum[:, :, -1] > 0, idx.clamp_max(n - 1), first_valid)
        chosen[:, :, j] = idx
        centre = feats.gather(1, idx[..., None].expand(b, p, d))[:, :, None, :]
        d_new = _cluster_distances(feats, pos, centre, pos[idx][:, :, None, :], spatial_weight)
        nearest = torch.minimum(nearest, d_new[..., 0])
        weights = nearest * validf

    centres = feats.gather(1, chosen.reshape(b, p * k_max, 1).expand(b, p * k_max, d)).view(
        b, p, k_max, d
    )
    centre_pos = pos[chosen]
    for step in range(iters + 1):
        dist = _cluster_distances(feats, pos, centres, centre_pos, spatial_weight)
        dist = torch.where(slot_ok[None, :, None, :], dist, inf)
        assign = dist.argmin(dim=-1)
        onehot = F.one_hot(assign, k_max).to(feats.dtype) * validf[..., None]
        sizes = onehot.sum(dim=2)
        if step == iters:
            break
        has = (sizes > 0)[..., None]
        sums = torch.einsum("bpnk,bnd->bpkd", onehot, feats)
        # An empty cluster keeps its previous centre.
        centres = torch.where(has, F.normalize(sums, dim=-1, eps=_EPS), centres)
        mean_pos = torch.einsum("bpnk,nc->bpkc", onehot, pos) / sizes.clamp_min(1.0)[..., None]
        centre_pos = torch.where(has, mean_pos, centre_pos)
    return dist, assign, sizes


def _simplified_silhouette(
    dist: torch.Tensor, assign: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean simplified silhouette ``[B, P]`` over the valid cells."""
    own = dist.gather(-1, assign[..., None]).squeeze(-1)
    other = dist.scatter(-1, assign[..., None], float("inf")).min(dim=-1).values
    sil = (other - own) / torch.maximum(own, other).clamp_min(_EPS)
    sil = torch.where(torch.isfinite(sil), sil, torch.zeros_like(sil))
    validf = valid.to(sil.dtype)[:, None, :]
    return (sil * validf).sum(-1) / validf.sum(-1).clamp_min(1.0)


def _check_pseudo_mask_args(k_max: int, iters: int, min_area: int, spatial_weight: float) -> None:
    if int(k_max) < 1:
        raise ValueError(f"PSEUDO_MASK.K_MAX must be >= 1, got {k_max}")
    if int(iters) < 0:
        raise ValueError(f"PSEUDO_MASK.KMEANS_ITERS must be >= 0, got {iters}")
    if int(min_area) < 1:
        raise ValueError(f"PSEUDO_MASK.MIN_AREA must be >= 1, got {min_area}")
    if float(spatial_weight) < 0:
        raise ValueError(f"PSEUDO_MASK.SPATIAL_WEIGHT must be >= 0, got {spatial_weight}")


def _choose_clusters(
    feats: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor,
    k_max: int,
    iters: int,
    min_area: int,
    spatial_weight: float,
    min_silhouette: float,
    n_init: int,
    generator: torch.Generator,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Cluster id of every cell ``[B, N]``: the best admissible candidate, else ``labels`` (k=1)."""
    b, n, _ = feats.shape
    dev = feats.device
    # Candidates: every k in 2..k_max, n_init restarts each (all clustered at once).
    ks = torch.arange(2, k_max + 1, device=dev).repeat_interleave(int(n_init))
    uniforms = torch.rand((b, ks.numel(), k_max), generator=generator).to(dev)
    dist, assign, sizes = _kmeans_candidates(
        feats, pos.to(feats.dtype), valid, ks, iters, float(spatial_weight), uniforms
    )
    in_use = torch.arange(k_max, device=dev)[None, :] < ks[:, None]
    admissible = ((sizes >= min_area) | ~in_use[None]).all(dim=-1)
    score = _simplified_silhouette(dist, assign, valid)
    score = torch.where(admissible, score, torch.full_like(score, -float("inf")))
    best_score, best = score.max(dim=1)
    chosen = assign.gather(1, best[:, None, None].expand(b, 1, n)).squeeze(1)
    return torch.where((best_score >= min_silhouette)[:, None], chosen, labels)


@torch.no_grad()
def pseudo_masks_from_ignored_area_batch(
    dense: torch.Tensor,
    ignore_mask: torch.Tensor,
    k_max: int = 4,
    iters: int = 10,
    min_area: int = 16,
    spatial_weight: float = 0.0,
    min_silhouette: float = 0.25,
    n_init: int = 3,
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
) -> List[torch.Tensor]:
    """Pseudo-masks of a batch of images (the algorithm of the module docstring).

    Args:
        dense: ``[B, d, h, w]`` teacher dense embeddings (normalised here along ``d``).
        ignore_mask: ``[B, h, w]`` bool, True on ignored cells (label 255 at grid resolution).
        k_max: largest number of clusters per image.
        iters: Lloyd iterations after the k-means++ initialisation.
        min_area: smallest cluster (for choosing k) and smallest kept region, in cells.
        spatial_weight: weight of the squared position distance (positions scaled to [0, 1]).
        min_silhouette: a ``k >= 2`` must reach this mean silhouette to beat ``k = 1``.
        n_init: k-means++ restarts per ``k``; the restart with the best silhouette competes.
        generator: CPU generator for the k-means++ draws; default ``torch.Generator()`` seeded
            with ``seed`` at each call (the same inputs then give the same masks).

    Returns:
        One ``[R_b, h, w]`` bool tensor per image, on ``dense``'s device, ordered by cluster then
        by the component's last cell in raster order.
    """
    if dense.dim() != 4 or ignore_mask.dim() != 3:
        raise ValueError(
            "pseudo-masks expect dense [B, d, h, w] and ignore_mask [B, h, w], got "
            f"{tuple(dense.shape)} and {tuple(ignore_mask.shape)}"
        )
    b, _, h, w = dense.shape
    if tuple(ignore_mask.shape) != (b, h, w):
        raise ValueError(
            f"ignore_mask {tuple(ignore_mask.shape)} does not match dense {tuple(dense.shape)}"
        )
    _check_pseudo_mask_args(k_max, iters, min_area, spatial_weight)
    if int(n_init) < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    k_max, min_area = int(k_max), int(min_area)
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    elif generator.device.type != "cpu":
        raise ValueError("pseudo-masks need a CPU torch.Generator (draws are moved to the device)")
    dev = dense.device
    n = h * w
    valid = ignore_mask.reshape(b, n).bool().to(dev)
    feats = F.normalize(dense.float().reshape(b, -1, n).transpose(1, 2), dim=-1, eps=_EPS)
    rows, cols = torch.meshgrid(
        torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij"
    )
    pos = torch.stack([rows.reshape(-1) / max(h - 1, 1), cols.reshape(-1) / max(w - 1, 1)], 1)

    # Cluster labels per cell: -1 on labelled cells, else the chosen k's assignment (k=1 -> 0).
    labels = torch.zeros(b, n, dtype=torch.int64, device=dev)
    # Mixed-precision training must not turn the clustering into float16.
    with torch.autocast(device_type=dev.type, enabled=False):
        if k_max >= 2 and n > 0:
            labels = _choose_clusters(
                feats,
                pos,
                valid,
                k_max,
                iters,
                min_area,
                spatial_weight,
                min_silhouette,
                n_init,
                generator,
                labels,
            )
    labels = torch.where(valid, labels, torch.full_like(labels, -1))

    cluster_masks = labels.view(b, 1, h, w) == torch.arange(k_max, device=dev).view(1, -1, 1, 1)
    components = connected_components(cluster_masks.reshape(b * k_max, h, w))
    ids, areas = torch.unique(components[components > 0], return_counts=True)
    ids = ids[areas >= min_area]
    owner = torch.div(ids - 1, n, rounding_mode="floor")
    masks = components[owner] == ids[:, None, None]
    image_of_region = torch.div(owner, k_max, rounding_mode="floor")
    # Belt and braces: a pseudo-mask may never cover a labelled cell.
    masks = masks & ignore_mask.bool().to(dev)[image_of_region]
    per_image = torch.bincount(image_of_region, minlength=b).tolist()
    return list(torch.split(masks, per_image, dim=0))


def pseudo_masks_from_ignored_area(
    dense: torch.Tensor,
    ignore_mask: torch.Tensor,
    k_max: int = 4,
    iters: int = 10,
    min_area: int = 16,
    spatial_weight: float = 0.0,
    min_silhouette: float = 0.25,
    n_init: int = 3,
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
) -> torch.Tensor:
    """Pseudo-masks of one image.

    Args:
        dense: ``[d, h, w]`` teacher dense embeddings; ignore_mask: ``[h, w]`` bool.
        Others: see :func:`pseudo_masks_from_ignored_area_batch`.

    Returns:
        ``[R, h, w]`` bool masks, each inside ``ignore_mask``, each of ``>= min_area`` cells.
    """
    if dense.dim() != 3 or ignore_mask.dim() != 2:
        raise ValueError(
            "pseudo_masks_from_ignored_area expects dense [d, h, w] and ignore_mask [h, w], got "
            f"{tuple(dense.shape)} and {tuple(ignore_mask.shape)}"
        )
    return pseudo_masks_from_ignored_area_batch(
        dense[None],
        ignore_mask[None],
        k_max=k_max,
        iters=iters,
        min_area=min_area,
        spatial_weight=spatial_weight,
        min_silhouette=min_silhouette,
        n_init=n_init,
        generator=generator,
        seed=seed,
    )[0]


def best_seen_similarity(region_embeds: torch.Tensor, seen_text: torch.Tensor) -> torch.Tensor:
    """``[R]`` best cosine similarity of each region embedding ``[R, d]`` to ``seen_text [S, d]``
    (``-inf`` when ``S = 0``), in float32."""
    if region_embeds.dim() != 2 or seen_text.dim() != 2:
        raise ValueError(
            "best_seen_similarity expects region_embeds [R, d] and seen_text [S, d], got "
            f"{tuple(region_embeds.shape)} and {tuple(seen_text.shape)}"
        )
    if seen_text.shape[0] == 0 or region_embeds.shape[0] == 0:
        return torch.full((region_embeds.shape[0],), -float("inf"), device=region_embeds.device)
    if region_embeds.shape[1] != seen_text.shape[1]:
        raise ValueError(
            f"region embeddings of size {region_embeds.shape[1]} vs seen text embeddings of "
            f"size {seen_text.shape[1]}"
        )
    r = F.normalize(region_embeds.float(), dim=-1, eps=_EPS)
    t = F.normalize(seen_text.float().to(r.device), dim=-1, eps=_EPS)
    with torch.autocast(device_type=r.device.type, enabled=False):
        return (r @ t.t()).max(dim=1).values


class CalibratedSeenFilter(nn.Module):
    """The seen/latent filter, calibrated on the labelled seen segments (any CLIP scale).

    Absolute image-text cosines depend on the CLIP model (about 0.2-0.35 for OpenAI's ViT-B/16,
    0.5-0.8 for the mini-world's tiny CLIP), so a fixed threshold fires at one scale and never at
    another. Here the threshold is measured on the same teacher, in the same step: it is the
    ``quantile`` of the best seen-text cosines of the **ground-truth seen segments** of the batch
    (gathered from all processes), smoothed over steps by an EMA (``momentum``). A pseudo region
    is *seen-like* (an unlabelled seen object, left alone) when its best seen cosine reaches that
    threshold, i.e. when it matches a seen class at least as well as ``1 - quantile`` of the
    labelled seen segments match theirs; the others are latent. Only seen labels and seen names
    are used. ``mode="absolute"`` compares with the fixed ``absolute_threshold`` instead.

    Buffers (saved in checkpoints): ``threshold`` (the EMA), ``steps`` (calibrated steps),
    ``regions`` / ``rejected`` (pseudo regions scored / found seen-like so far).
    """

    def __init__(
        self,
        mode: str = "calibrated",
        quantile: float = 0.25,
        momentum: float = 0.9,
        absolute_threshold: float = 0.9,
    ):
        super().__init__()
        if mode not in ("calibrated", "absolute"):
            raise ValueError(
                f"PSEUDO_MASK.SEEN_FILTER must be 'calibrated' or 'absolute', got {mode!r}"
            )
        if not 0.0 <= float(quantile) <= 1.0:
            raise ValueError(f"PSEUDO_MASK.SEEN_QUANTILE must be in [0, 1], got {quantile}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"seen-filter momentum must be in [0, 1), got {momentum}")
        self.mode = mode
        self.quantile = float(quantile)
        self.momentum = float(momentum)
        self.absolute_threshold = float(absolute_threshold)
        self.register_buffer("threshold", torch.tensor(float("inf")))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("regions", torch.zeros((), dtype=torch.int64))
        self.register_buffer("rejected", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def calibrate(self, gt_best_seen: torch.Tensor, synchronize: bool = True) -> float:
        """Update the threshold with the best seen cosines ``[N]`` of this step's ground-truth
        seen segments (every process must call this each step, even with ``N = 0``)."""
        if self.mode == "absolute":
            self.threshold.fill_(self.absolute_threshold)
            return self.absolute_threshold
        x = gt_best_seen.detach().float().reshape(-1, 1).to(self.threshold.device)
        x = gather_from_all_processes(x) if synchronize else x
        x = x[torch.isfinite(x)]
        if x.numel() > 0:
            q = torch.quantile(x.double(), self.quantile).to(self.threshold.dtype)
            if int(self.steps) == 0:
                self.threshold.copy_(q)
            else:
                self.threshold.mul_(self.momentum).add_((1 - self.momentum) * q)
            self.steps.add_(1)
        return float(self.threshold)

    @torch.no_grad()
    def is_latent(self, best_seen: torch.Tensor) -> torch.Tensor:
        """``[R]`` bool: regions whose best seen cosine ``[R]`` stays below the threshold
        (all regions before any calibration)."""
        latent = best_seen.float() < self.threshold.to(best_seen.device)
        self.regions.add_(int(latent.numel()))
        self.rejected.add_(int((~latent).sum()))
        return latent


def score_regions(
    region_embeds: torch.Tensor, seen_text: torch.Tensor, seen_threshold: float
) -> torch.Tensor:
    """Which pseudo-mask regions are latent (unseen-like).

    A region whose best cosine similarity to the seen text embeddings is at least
    ``seen_threshold`` is an unlabelled seen object and is left alone; the others are latent.

    Args:
        region_embeds: ``[R, d]`` teacher region embeddings ``t_r``.
        seen_text: ``[S, d]`` seen-class text embeddings (``S = 0``: every region is latent).

    Returns:
        ``[R]`` bool, True for latent regions.
    """
    # no seen class (S = 0): the best cosine is -inf, so every region is latent
    return best_seen_similarity(region_embeds, seen_text) < seen_threshold
