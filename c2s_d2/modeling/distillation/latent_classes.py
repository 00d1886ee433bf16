"""Latent classes: an online memory of prototypes over the latent regions of a training run.

``LatentClassMemory`` holds ``K_LATENT`` prototypes (unit vectors in CLIP's embedding space) and
runs an EMA k-means over the teacher embeddings of the latent regions (docs/METHOD.md):

* **fill**: empty slots take the first incoming regions, in slot order then region order;
* **assign**: every other region joins its nearest filled prototype (cosine similarity);
* **update**: ``p_k <- normalise(m * p_k + (1 - m) * mean of the normalised regions assigned to
  k)``, for every prototype that received regions this step;
* **re-seed**: a slot that received no region for ``reseed_after`` steps (the first regions can
  fill a slot with an outlier that never attracts anything) takes the region of this step that
  is farthest from every prototype (lowest best cosine), so that no slot stays dead.

Under ``torch.distributed`` every process feeds the regions gathered from all processes (rank
order, then local order) through these steps, so all processes keep identical prototypes; the
memory is deterministic given the seed and the data order. ``RunningMean`` keeps the running
means of image and text embeddings used for the modality-gap shift of latent text embeddings.
Everything here is a buffer: it is saved in checkpoints and never trained by gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn

__all__ = [
    "LatentClassMemory",
    "RunningMean",
    "all_reduce_sum",
    "gather_from_all_processes",
    "is_distributed",
]

_EPS = 1e-6


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return comm.get_world_size() > 1  # detectron2's: 1 without an initialised process group


@torch.no_grad()
def gather_from_all_processes(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x [N_i, ...]`` of every process in rank order (``[sum_i N_i, ...]``).

    Each process may hold a different ``N_i`` (rows are padded for ``all_gather``). Every process
    must call this, even with ``N_i = 0``. A no-op without a multi-process group.
    """
    if not is_distributed():
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    if longest == 0:
        return x
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:c] for g, c in zip(gathered, counts)], dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all processes (a new tensor); ``x`` itself without a process group."""
    if not is_distributed():
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class LatentClassMemory(nn.Module):
    """``K_LATENT`` latent-class prototypes updated by online EMA k-means.

    Buffers (persistent): ``prototypes [K, d]`` (unit rows; zero rows for empty slots),
    ``counts [K]`` (regions absorbed per slot, 0 = empty) and ``initialized`` (all slots filled).
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.99, reseed_after: int = 0):
        """
        Args:
            num_classes: number of latent classes ``K_LATENT``
                (``MODEL.C2S.DISTILL.LATENT.NUM_CLASSES``).
            dim: CLIP embedding size ``d``.
            momentum: EMA momentum ``m`` in ``[0, 1]`` (``MODEL.C2S.DISTILL.LATENT.MOMENTUM``).
            reseed_after: re-seed a slot idle for this many steps (0: never;
                ``MODEL.C2S.DISTILL.LATENT.RESEED_AFTER``).
        """
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"LATENT.NUM_CLASSES must be >= 1, got {num_classes}")
        if int(dim) < 1:
            raise ValueError(f"latent prototype size must be >= 1, got {dim}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"LATENT.MOMENTUM must be in [0, 1], got {momentum}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.momentum = float(momentum)
        if int(reseed_after) < 0:
            raise ValueError(f"LATENT.RESEED_AFTER must be >= 0, got {reseed_after}")
        self.reseed_after = int(reseed_after)
        self.register_buffer("prototypes", torch.zeros(self.num_classes, self.dim))
        self.register_buffer("counts", torch.zeros(self.num_classes, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(False))
        # steps since each slot last received a region; re-seeds done so far
        self.register_buffer("idle_steps", torch.zeros(self.num_classes, dtype=torch.int64))
        self.register_buffer("reseeds", torch.zeros((), dtype=torch.int64))

    @property
    def filled(self) -> torch.Tensor:
        """``[K]`` bool: slots holding a prototype."""
        return self.counts > 0

    def _normalised(self, regions: torch.Tensor) -> torch.Tensor:
        if regions.dim() != 2 or regions.shape[1] != self.dim:
            raise ValueError(f"latent regions must be [R, {self.dim}], got {tuple(regions.shape)}")
        regions = regions.detach().to(self.prototypes.device, self.prototypes.dtype)
        return F.normalize(regions, dim=-1, eps=_EPS)

    @torch.no_grad()
    def assign(self, regions: torch.Tensor) -> torch.Tensor:
        """Nearest filled prototype (cosine) of each region: ``[R, d] -> [R]`` int64.

        Returns -1 for every region while no slot is filled.
        """
        r = self._normalised(regions)
        if r.shape[0] == 0 or not bool(self.filled.any()):
            return torch.full((r.shape[0],), -1, dtype=torch.int64, device=r.device)
        # Full precision under mixed-precision training: every process must agree exactly.
        with torch.autocast(device_type=r.device.type, enabled=False):
            sims = r @ self.prototypes.t()
        sims = sims.masked_fill(~self.filled[None, :], -float("inf"))
        return sims.argmax(dim=1)

    @torch.no_grad()
    def fill_empty_slots(self, regions: torch.Tensor) -> int:
        """Put the first regions into the empty slots (ascending slot order); return how many."""
        r = self._normalised(regions)
        empty = torch.nonzero(~self.filled).flatten()
        n = min(int(empty.numel()), int(r.shape[0]))
        if n > 0:
            self.prototypes[empty[:n]] = r[:n]
            self.counts[empty[:n]] = 1
            self.initialized.fill_(bool(self.filled.all()))
        return n

    @torch.no_grad()
    def update(self, regions: torch.Tensor, assignments: torch.Tensor) -> None:
        """EMA update: ``p_k <- normalise(m p_k + (1 - m) mean_{r: a_r = k} normalise(x_r))``.

        Args:
            regions: ``[R, d]`` region embeddings (the same on every process).
            assignments: ``[R]`` prototype ids; negative ids are skipped.
        """
        r = self._normalised(regions)
        a = assignments.to(r.device).long()
        if a.shape != (r.shape[0],):
            raise ValueError(f"assignments must be [{r.shape[0]}], got {tuple(a.shape)}")
        if (a >= self.num_classes).any():
            raise ValueError(f"assignments must be < {self.num_classes} (K_LATENT)")
        keep = a >= 0
        r, a = r[keep], a[keep]
        if r.shape[0] == 0:
            return
        # A one-hot matmul instead of index_add_: deterministic on every device.
        onehot = F.one_hot(a, self.num_classes).to(r.dtype).t()
        n = onehot.sum(dim=1)
        with torch.autocast(device_type=r.device.type, enabled=False):
            mean = (onehot @ r) / n.clamp_min(1.0)[:, None]
        moved = F.normalize(self.momentum * self.prototypes + (1 - self.momentum) * mean, dim=-1)
        hit = n > 0
        self.prototypes.copy_(torch.where(hit[:, None], moved, self.prototypes))
        self.counts.add_(n.round().long())

    @torch.no_grad()
    def update_and_assign(self, regions: torch.Tensor, synchronize: bool = True) -> torch.Tensor:
        """One training step of the memory; returns the latent class of each local region.

        Gathers the regions of all processes (``synchronize``), fills empty slots, assigns the
        remaining regions and updates the prototypes with them, then assigns the local regions
        to the updated prototypes. Every process must call this each step (even with ``R = 0``).

        Args:
            regions: ``[R, d]`` teacher embeddings of this process's latent regions.

        Returns:
            ``[R]`` int64 latent class ids in ``0..K-1``.
        """
        r = self._normalised(regions)
        everyone = gather_from_all_processes(r) if synchronize else r
        was_filled = self.filled.clone()
        used = self.fill_empty_slots(everyone)
        hit = self.filled & ~was_filled
        rest = everyone[used:]
        if rest.shape[0] > 0:
            assigned = self.assign(rest)
            self.update(rest, assigned)
            hit[assigned] = True
        self.idle_steps.add_(1)
        self.idle_steps[hit] = 0
        if self.reseed_after > 0:
            self.reseed_idle_slots(everyone)
        return self.assign(r)

    @torch.no_grad()
    def reseed_idle_slots(self, regions: torch.Tensor) -> int:
        """Give each slot idle for ``reseed_after`` steps the region of ``regions [R, d]``
        farthest from every prototype (one region per slot, ascending slot order); returns how
        many slots were re-seeded."""
        stale = torch.nonzero(self.filled & (self.idle_steps >= self.reseed_after)).flatten()
        r = self._normalised(regions)
        n = min(int(stale.numel()), int(r.shape[0]))
        if n == 0:
            return 0
        with torch.autocast(device_type=r.device.type, enabled=False):
            sims = r @ self.prototypes.t()
        best = sims.masked_fill(~self.filled[None, :], -float("inf")).max(dim=1).values
        far = torch.sort(best, stable=True).indices[:n]
        self.prototypes[stale[:n]] = r[far]
        self.counts[stale[:n]] = 1
        self.idle_steps[stale[:n]] = 0
        self.reseeds.add_(n)
        return n


class RunningMean(nn.Module):
    """Running mean of embeddings ``[d]`` (a persistent buffer ``value``).

    ``momentum=None``: the exact mean of every row seen so far; otherwise an EMA
    ``value <- m * value + (1 - m) * batch mean`` (the first batch sets it).
    """

    def __init__(self, dim: int, momentum: Optional[float] = None):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"running-mean size must be >= 1, got {dim}")
        if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"running-mean momentum must be in [0, 1], got {momentum}")
        self.dim = int(dim)
        self.momentum = None if momentum is None else float(momentum)
        self.register_buffer("value", torch.zeros(self.dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, x: torch.Tensor, synchronize: bool = True) -> None:
        """Add the rows of ``x [N, d]`` (summed over all processes when ``synchronize``)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"running mean expects [N, {self.dim}], got {tuple(x.shape)}")
        x = x.detach().to(self.value.device, torch.float64)
        # Sum and count travel together: one collective, exact counts in float64.
        packed = torch.cat([x.sum(dim=0), x.new_tensor([float(x.shape[0])])])
        if synchronize:
            packed = all_reduce_sum(packed)
        total, n = packed[:-1], int(packed[-1].item())
        if n == 0:
            return
        old = self.value.to(torch.float64)
        if self.momentum is None:
            new = old + (total - n * old) / (int(self.count) + n)
        elif int(self.count) == 0:
            new = total / n
        else:
            new = self.momentum * old + (1 - self.momentum) * total / n
        self.value.copy_(new.to(self.value.dtype))
        self.count.add_(n)
