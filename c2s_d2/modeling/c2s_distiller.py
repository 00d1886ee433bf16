"""C2S distillation: the training-only branch that distils a frozen CLIP teacher into the student.

Per training step (docs/METHOD.md):

1. teacher forward on the batch: global image embeddings ``g_T`` and dense embeddings (or,
   with ``MODEL.C2S.DISTILL.TEACHER_CACHE``, both read from the teacher-feature cache through
   the mapper: the teacher is then never built, see c2s_d2/data/teacher_cache.py);
2. global distillation: CLS-query outputs, projected to the CLIP space, pulled to ``g_T``;
3. pseudo-masks from the ignored area (label 255) of each image, on the teacher grid; pixels
   outside an image's true size (padding of the mapper or of the batch) are never ignored area;
4. latent class mining: pseudo regions not explained by a seen class (the calibrated seen filter,
   ``CalibratedSeenFilter``) join the online memory of latent prototypes; their latent text
   embeddings extend the class bank to [seen, latent];
5. segmentation loss with the extended bank (queries matched to latent regions get their latent
   class instead of "no object");
6. local distillation: the class embedding of the query matched to each region (ground-truth
   segments through the main matching, pseudo-masks among the remaining queries by mask cost)
   pulled to the teacher's region embedding.

The teacher and the latent-vocabulary text embeddings are built by :meth:`C2SDistiller.prepare`
(called by the trainer at construction, else on the first training step), never at inference;
the teacher is not a registered sub-module: it is never saved in checkpoints. The region
embeddings of the ground-truth segments are pooled once per step (seen-filter calibration and
local distillation share them). Latent memory and running means are buffers:
they are saved, so training resumes exactly.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..data.teacher_cache import cached_teacher_outputs

from .clip.teacher import ClipTeacher, build_teacher_from_cfg, teacher_input_size
from .clip.text_encoder import text_embeddings_from_cfg
from .distillation.latent_classes import LatentClassMemory, RunningMean
from .distillation.latent_text import latent_text_embeddings
from .distillation.latent_vocabulary import (
    build_latent_vocabulary,
    unseen_names_of_registered_datasets,
)
from .distillation.losses import global_distillation_loss, local_distillation_loss
from .distillation.pseudo_masks import (
    CalibratedSeenFilter,
    best_seen_similarity,
    ignored_cells_from_labels,
    pseudo_masks_from_ignored_area_batch,
)

PADDING_LABEL = -1  # pixels outside an image's true size: neither labelled nor ignored area

logger = logging.getLogger(__name__)

__all__ = ["C2SDistiller"]


def padded_semantic_labels(batched_inputs, size, device) -> torch.Tensor:
    """``[B, H, W]`` int64 training labels of a batch on the padded canvas ``size``.

    Pixels outside each image's true size get ``PADDING_LABEL`` (-1): the mapper's padding
    (``unpadded_size`` of its output) and the batch's padding (beyond ``sem_seg``) are neither a
    labelled area nor an ignored one, so no pseudo-mask, latent region or local pair forms there.
    """
    sem = torch.full((len(batched_inputs), *size), PADDING_LABEL, dtype=torch.long, device=device)
    for i, x in enumerate(batched_inputs):
        s = x["sem_seg"].to(device)
        uh, uw = (int(v) for v in x.get("unpadded_size", s.shape[-2:]))
        uh, uw = min(uh, s.shape[0], size[0]), min(uw, s.shape[1], size[1])
        sem[i, :uh, :uw] = s[:uh, :uw]
    return sem


class C2SDistiller(nn.Module):
    """Global + local distillation, pseudo-masks, latent classes and latent text embeddings."""

    @configurable
    def __init__(
        self,
        *,
        hidden_dim: int,
        embed_dim: int,
        teacher_factory,
        vocabulary_factory,
        global_weight: float,
        global_loss: str,
        local_weight: float,
        use_gt_segments: bool,
        use_pseudo_masks: bool,
        pseudo_mask_args: Dict,
        seen_threshold: float,
        latent_enabled: bool,
        num_latent: int,
        latent_momentum: float,
        seen_filter: str = "calibrated",
        seen_quantile: float = 0.25,
        latent_reseed_after: int = 0,
        latent_class_weight: float,
        latent_text_args: Dict,
        teacher_cache: bool = False,
        teacher_patch_size: int = 16,
        teacher_input_size: Optional[int] = None,
    ):
        """
        Args:
            hidden_dim: width of the decoder queries.
            embed_dim: CLIP embedding size d.
            teacher_factory: builds the frozen :class:`ClipTeacher` (called on the first step).
            vocabulary_factory: returns the latent-vocabulary text embeddings [V, d].
            global_weight: weight of L_glob (0 disables the global branch and its CLS queries).
            global_loss: "cosine" or "l1".
            local_weight: weight of L_loc (0 disables local distillation).
            use_gt_segments, use_pseudo_masks: which regions local distillation uses.
            pseudo_mask_args: keyword arguments of ``pseudo_masks_from_ignored_area_batch``.
            seen_threshold: with ``seen_filter="absolute"``, a pseudo region whose best seen-text
                cosine reaches this is not latent.
            seen_filter: "calibrated" (threshold = ``seen_quantile`` of the ground-truth seen
                segments' best seen cosines, see ``CalibratedSeenFilter``) or "absolute".
            seen_quantile: quantile of the calibrated filter.
            latent_reseed_after: re-seed a latent slot idle for this many steps (0: never).
            latent_enabled: mine latent classes and extend the bank with their embeddings.
            num_latent: K_LATENT.
            latent_momentum: EMA momentum of the latent prototypes.
            latent_class_weight: weight of the latent targets in the classification loss.
            latent_text_args: ``topk``, ``tau``, ``lam`` of ``latent_text_embeddings``.
            teacher_cache: take the teacher's outputs from the batch (``teacher_cache`` entries
                of the mapper) instead of running the teacher.
            teacher_patch_size, teacher_input_size: the teacher's patch size and input short side
                (the grid of the cached outputs; used with ``teacher_cache`` only).
        """
        super().__init__()
        if latent_enabled and not use_pseudo_masks:
            raise ValueError(
                "MODEL.C2S.DISTILL.LATENT.ENABLED True needs MODEL.C2S.DISTILL.LOCAL."
                "USE_PSEUDO_MASKS True: latent classes are mined from pseudo-masks (set "
                "LATENT.ENABLED False for local distillation on ground-truth segments only)"
            )
        self.teacher_factory = teacher_factory
        self.vocabulary_factory = vocabulary_factory
        self.global_weight = global_weight
        self.global_loss = global_loss
        self.local_weight = local_weight
        self.use_gt_segments = use_gt_segments
        self.use_pseudo_masks = use_pseudo_masks
        self.pseudo_mask_args = pseudo_mask_args
        self.seen_threshold = seen_threshold
        self.latent_enabled = latent_enabled
        self.latent_class_weight = latent_class_weight
        self.latent_text_args = latent_text_args
        self.teacher_cache = teacher_cache
        self.teacher_patch_size = teacher_patch_size
        self.teacher_input_size = teacher_input_size
        if global_weight > 0:
            self.global_proj = nn.Linear(hidden_dim, embed_dim)
        if latent_enabled:
            self.latent_memory = LatentClassMemory(
                num_latent, embed_dim, latent_momentum, latent_reseed_after
            )
            self.mean_region_embedding = RunningMean(embed_dim)
            self.seen_filter = CalibratedSeenFilter(seen_filter, seen_quantile, 0.9, seen_threshold)
        # not sub-modules: never in checkpoints, never moved by .to() (moved on use)
        self.__dict__["_teacher"] = None
        self.__dict__["_vocab_text"] = None

    @classmethod
    def from_config(cls, cfg, embed_dim: int) -> Dict:
        d = cfg.MODEL.C2S.DISTILL
        pm = d.PSEUDO_MASK
        clip_cfg = cfg.clone()

        def vocabulary_factory() -> torch.Tensor:
            excluded = unseen_names_of_registered_datasets()
            names, removed = build_latent_vocabulary(d.LATENT.VOCABULARY, excluded)
            logger.info(
                f"latent vocabulary {d.LATENT.VOCABULARY!r}: {len(names)} names kept, "
                f"{len(removed)} removed as equal or synonymous to an unseen class "
                f"({len(excluded)} unseen names of registered datasets)"
            )
            if not names:
                return torch.zeros(0, embed_dim)
            return text_embeddings_from_cfg(clip_cfg, [[n] for n in names])

        cache_args = {}
        if d.TEACHER_CACHE:
            from .clip.loader import get_model_config

            clip = cfg.MODEL.CLIP
            patch = get_model_config(clip.MODEL_NAME, tuple(clip.MODEL_CONFIG_FILES))[
                "vision_cfg"
            ].get("patch_size", 16)
            cache_args = {
                "teacher_cache": True,
                "teacher_patch_size": int(patch if isinstance(patch, int) else patch[0]),
                "teacher_input_size": d.TEACHER_INPUT_SIZE or None,
            }
        return {
            **cache_args,
            "hidden_dim": cfg.MODEL.C2S.HIDDEN_DIM,
            "embed_dim": embed_dim,
            "teacher_factory": lambda: build_teacher_from_cfg(clip_cfg),
            "vocabulary_factory": vocabulary_factory,
            "global_weight": d.GLOBAL.WEIGHT if d.GLOBAL.ENABLED else 0.0,
            "global_loss": d.GLOBAL.LOSS,
            "local_weight": d.LOCAL.WEIGHT if d.LOCAL.ENABLED else 0.0,
            "use_gt_segments": d.LOCAL.USE_GT_SEGMENTS,
            "use_pseudo_masks": d.LOCAL.USE_PSEUDO_MASKS,
            "pseudo_mask_args": {
                "k_max": pm.K_MAX,
                "iters": pm.KMEANS_ITERS,
                "min_area": pm.MIN_AREA,
                "spatial_weight": pm.SPATIAL_WEIGHT,
                "min_silhouette": pm.MIN_SILHOUETTE,
                "n_init": pm.N_INIT,
            },
            "seen_threshold": pm.SEEN_THRESHOLD,
            "seen_filter": pm.SEEN_FILTER,
            "seen_quantile": pm.SEEN_QUANTILE,
            "latent_enabled": d.LATENT.ENABLED,
            "num_latent": d.LATENT.NUM_CLASSES,
            "latent_momentum": d.LATENT.MOMENTUM,
            "latent_reseed_after": d.LATENT.RESEED_AFTER,
            "latent_class_weight": d.LATENT.CLASS_WEIGHT,
            "latent_text_args": {
                "topk": d.LATENT.TOPK,
                "tau": d.LATENT.TAU,
                "lam": d.LATENT.LAMBDA,
            },
        }

    # ------------------------------------------------------------------ lazy parts
    @property
    def uses_global_queries(self) -> bool:
        return self.global_weight > 0

    @property
    def needs_regions(self) -> bool:
        return self.local_weight > 0 or self.latent_enabled

    def prepare(self, device: Optional[torch.device] = None) -> Dict[str, float]:
        """Build the one-off parts before training: the teacher (unless features come from a
        cache) and the latent-vocabulary text embeddings (read from the text-embedding cache
        when encoded before). Returns the seconds each took."""
        import time

        times = {}
        device = torch.device(device or "cpu")
        if not self.teacher_cache and self._teacher is None:
            t0 = time.perf_counter()
            self.teacher(device)
            times["teacher_build_s"] = time.perf_counter() - t0
        if self.latent_enabled and self._vocab_text is None:
            t0 = time.perf_counter()
            self.vocabulary_text(device)
            times["vocabulary_text_s"] = time.perf_counter() - t0
        return times

    def teacher(self, device: torch.device):
        if self.teacher_cache:
            raise RuntimeError("the teacher is not built: its outputs come from the cache")
        if self._teacher is None:
            logger.info("building the CLIP teacher (training only)")
            self.__dict__["_teacher"] = self.teacher_factory()
        return self._teacher.to(device)

    def vocabulary_text(self, device: torch.device) -> torch.Tensor:
        if self._vocab_text is None:
            self.__dict__["_vocab_text"] = self.vocabulary_factory()
        return self._vocab_text.to(device)

    # ------------------------------------------------------------------ forward
    def forward(self, model, images, outputs: Dict, targets: List[Dict], batched_inputs) -> Dict:
        """All training losses of a C2S step (segmentation included), weighted."""
        x = images.tensor
        teacher = ClipTeacher  # region_embeddings is a static method
        if self.teacher_cache:
            grid = teacher_input_size(
                *x.shape[-2:], self.teacher_patch_size, self.teacher_input_size
            )
            grid = tuple(s // self.teacher_patch_size for s in grid)
            g_t, dense = cached_teacher_outputs(batched_inputs, x.shape[-2:], grid, x.device)
        else:
            g_t, dense = self.teacher(x.device)(model._rgb(x))
        losses: Dict[str, torch.Tensor] = {}

        if self.uses_global_queries:
            g_s = self.global_proj(outputs["global_embeds"])
            loss = global_distillation_loss(g_s, g_t, self.global_loss)
            losses["loss_global_distill"] = self.global_weight * loss

        seen_bank = model.train_bank
        # ground-truth segments pooled once: seen-filter calibration and local pairs share them
        gt_embeds = None
        if self.latent_enabled or (self.local_weight > 0 and self.use_gt_segments):
            gt_embeds = teacher.region_embeddings(dense, [t["masks"] for t in targets])
        regions = self._pseudo_regions(
            batched_inputs, x.shape[-2:], dense, teacher, seen_bank, targets, gt_embeds
        )
        bank = seen_bank
        if self.latent_enabled:
            bank = torch.cat([seen_bank, self._latent_bank(seen_bank)], dim=0)
        model._classify(outputs, bank)

        seg_losses, indices = model.criterion(outputs, targets, return_indices=True)
        pseudo_idx = self._match_pseudo_regions(model, outputs, regions, indices)
        if self.latent_enabled:
            seg_losses["loss_ce"] = self._ce_with_latent_targets(
                model, outputs, targets, indices, regions, pseudo_idx, seen_bank.shape[0]
            )
        losses.update(model.criterion.weight_losses(seg_losses))

        if self.local_weight > 0:
            s, t = self._local_pairs(
                outputs, targets, indices, regions, pseudo_idx, dense, teacher, gt_embeds
            )
            losses["loss_local_distill"] = self.local_weight * local_distillation_loss(s, t)
        return losses

    # ------------------------------------------------------------------ steps
    def _pseudo_regions(
        self, batched_inputs, size, dense, teacher, seen_bank, targets=None, gt_embeds=None
    ) -> List[Dict]:
        """Per image: pseudo masks on the grid [R, h, w], their teacher embeddings, latent ids.

        ``gt_embeds``: per image, the region embeddings [n_i, d] of all its ground-truth
        segments (computed here from ``targets`` when not given)."""
        b, _, h, w = dense.shape
        empty = {
            "masks": dense.new_zeros((0, h, w), dtype=torch.bool),
            "embeds": dense.new_zeros((0, dense.shape[1])),
            "latent": torch.zeros(0, dtype=torch.long, device=dense.device),
        }
        if not (self.needs_regions and self.use_pseudo_masks or self.latent_enabled):
            return [dict(empty) for _ in range(b)]
        sem = padded_semantic_labels(batched_inputs, size, dense.device)
        ignored = ignored_cells_from_labels(sem, (h, w))
        masks = pseudo_masks_from_ignored_area_batch(dense, ignored, **self.pseudo_mask_args)
        embeds = teacher.region_embeddings(dense, masks)
        out = [{"masks": m, "embeds": e} for m, e in zip(masks, embeds)]
        if not self.latent_enabled:
            return out
        # the seen filter's threshold, measured on this step's labelled seen segments
        gt_best = dense.new_zeros(0)
        if targets is not None:
            if gt_embeds is None:
                gt_embeds = teacher.region_embeddings(dense, [t["masks"] for t in targets])
            gt_best = best_seen_similarity(torch.cat(gt_embeds, dim=0), seen_bank)
        self.seen_filter.calibrate(gt_best)
        for r in out:
            r["is_latent"] = self.seen_filter.is_latent(
                best_seen_similarity(r["embeds"], seen_bank)
            )
        # every process calls the memory once per step (it synchronises across processes)
        all_latent = torch.cat([r["embeds"][r["is_latent"]] for r in out], dim=0)
        self.mean_region_embedding.update(torch.cat([r["embeds"] for r in out], dim=0))
        ids = self.latent_memory.update_and_assign(all_latent)
        start = 0
        for r in out:
            n = int(r["is_latent"].sum())
            r["latent"] = torch.full(
                (r["masks"].shape[0],), -1, dtype=torch.long, device=dense.device
            )
            r["latent"][r["is_latent"]] = ids[start : start + n].to(dense.device)
            start += n
        self._log_region_stats(out, gt_best)
        return out

    def _log_region_stats(self, regions: List[Dict], gt_best: torch.Tensor) -> None:
        """Seen-filter and latent-memory statistics in detectron2's event storage (metrics.json)."""
        try:
            from detectron2.utils.events import get_event_storage

            storage = get_event_storage()
        except (AssertionError, ImportError):  # outside a trainer (tests)
            return
        n = sum(int(r["masks"].shape[0]) for r in regions)
        seen = sum(int((~r["is_latent"]).sum()) for r in regions)
        storage.put_scalar("c2s/pseudo_regions", float(n), smoothing_hint=False)
        storage.put_scalar("c2s/seen_filter_rejected", float(seen), smoothing_hint=False)
        storage.put_scalar("c2s/seen_filter_threshold", float(self.seen_filter.threshold))
        storage.put_scalar("c2s/latent_slots_filled", float(self.latent_memory.filled.sum()))
        storage.put_scalar("c2s/latent_reseeds", float(self.latent_memory.reseeds))

    def _latent_bank(self, seen_bank: torch.Tensor) -> torch.Tensor:
        """Latent text embeddings [K, d] (zero rows for slots not filled yet)."""
        mem = self.latent_memory
        z = latent_text_embeddings(
            mem.prototypes,
            self.vocabulary_text(seen_bank.device),
            mean_image=self.mean_region_embedding.value,
            mean_text=F.normalize(seen_bank, dim=-1).mean(0),
            **self.latent_text_args,
        )
        return torch.where(mem.filled[:, None], z, torch.zeros_like(z)).to(seen_bank.dtype)

    def _match_pseudo_regions(self, model, outputs, regions, indices) -> List[Tuple]:
        """Match each image's pseudo regions to queries left unmatched by the main matching."""
        matches = []
        pred_masks = outputs["pred_masks"].detach()
        for i, r in enumerate(regions):
            q = pred_masks.shape[1]
            allowed = torch.ones(q, dtype=torch.bool, device=pred_masks.device)
            allowed[indices[i][0].to(pred_masks.device)] = False
            if r["masks"].shape[0] == 0:
                matches.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
                continue
            matches.append(
                model.criterion.matcher.match_by_mask_cost(
                    pred_masks[i], r["masks"].float(), allowed
                )
            )
        return matches

    def _ce_with_latent_targets(
        self, model, outputs, targets, indices, regions, pseudo_idx, n_seen
    ):
        """Cross-entropy over [seen, latent, no-object]: latent-region queries get latent ids."""
        logits = outputs["pred_logits"]
        num_classes = logits.shape[-1] - 1
        target = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)
        weight = torch.ones(logits.shape[:2], device=logits.device)
        for i, (src, tgt) in enumerate(indices):
            target[i, src] = targets[i]["labels"][tgt].to(logits.device)
        for i, (src, ridx) in enumerate(pseudo_idx):
            latent = regions[i]["latent"][ridx.to(logits.device)]
            keep = latent >= 0
            src = src.to(logits.device)[keep]
            target[i, src] = n_seen + latent[keep]
            weight[i, src] = self.latent_class_weight
        class_weight = torch.ones(num_classes + 1, device=logits.device)
        class_weight[-1] = model.criterion.no_object_weight
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        w = class_weight[target] * weight
        return (ce * w).sum() / w.sum().clamp_min(1e-6)

    def _local_pairs(
        self, outputs, targets, indices, regions, pseudo_idx, dense, teacher, gt_embeds=None
    ):
        """(student class embeddings [R, d], teacher region embeddings [R, d]) of all regions.

        ``gt_embeds``: per image, region embeddings of all ground-truth segments (pooled here,
        matched segments only, when not given)."""
        students, teachers = [], []
        embeds = outputs["class_embeds"]
        for i, (src, tgt) in enumerate(indices):
            if self.use_gt_segments and len(src) > 0:
                if gt_embeds is not None:
                    teachers.append(gt_embeds[i][tgt.to(gt_embeds[i].device)])
                else:
                    masks = targets[i]["masks"][tgt.to(dense.device)]
                    teachers.append(teacher.region_embeddings(dense[i : i + 1], [masks])[0])
                students.append(embeds[i, src.to(embeds.device)])
            if self.use_pseudo_masks and len(pseudo_idx[i][0]) > 0:
                q, r = pseudo_idx[i]
                teachers.append(regions[i]["embeds"][r.to(dense.device)])
                students.append(embeds[i, q.to(embeds.device)])
        if not students:
            d = embeds.shape[-1]
            return embeds.new_zeros((0, d)) + 0 * embeds.sum(), embeds.new_zeros((0, d))
        return torch.cat(students), torch.cat(teachers)
