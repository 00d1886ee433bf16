"""Optimiser and learning-rate schedule: AdamW with a backbone multiplier, no weight decay on
norms and embeddings, full-model gradient clipping, and warmup + poly decay."""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Set

import torch
from detectron2.solver import build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler
from torch import nn

_NORMS = (
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.InstanceNorm2d,
)


def optimizer_param_groups(cfg, model: nn.Module) -> List[Dict[str, Any]]:
    """One group per parameter with its lr and weight decay (frozen parameters are skipped)."""
    s = cfg.SOLVER
    groups: List[Dict[str, Any]] = []
    seen: Set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr, wd = s.BASE_LR, s.WEIGHT_DECAY
            if module_name.startswith("backbone"):
                lr = lr * s.BACKBONE_MULTIPLIER
            is_norm = isinstance(module, _NORMS) or type(module).__name__.startswith(
                "FrozenBatchNorm"
            )
            if is_norm:
                wd = s.WEIGHT_DECAY_NORM
            # learnable embeddings (queries, level, no-object, logit scale) are not decayed
            if isinstance(module, nn.Embedding) or "embedding" in name or name == "log_logit_scale":
                wd = s.WEIGHT_DECAY_EMBED
            groups.append({"params": [p], "lr": lr, "weight_decay": wd})
    return groups


def _with_full_model_clipping(optim_cls, max_norm: float):
    class FullModelClipping(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(list(params), max_norm)
            return super().step(closure=closure)

    FullModelClipping.__name__ = f"{optim_cls.__name__}WithFullModelClipping"
    return FullModelClipping


def build_c2s_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`optimizer_param_groups`, with gradient clipping.

    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE``: "full_model" clips the global norm of all gradients;
    "value" / "norm" are detectron2's per-parameter clippings.
    """
    s = cfg.SOLVER
    groups = optimizer_param_groups(cfg, model)
    name = s.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV}
    else:
        raise KeyError(f"SOLVER.OPTIMIZER: unknown optimizer {s.OPTIMIZER!r} (ADAMW or SGD)")
    clip = s.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE)
    elif clip.ENABLED:
        optim_cls = maybe_add_gradient_clipping(cfg, optim_cls)
    return optim_cls(groups, lr=s.BASE_LR, **kwargs)


def build_c2s_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """Linear/constant warmup followed by poly decay ``(1 - t)^power`` over ``SOLVER.MAX_ITER``."""
    s = cfg.SOLVER
    name = s.LR_SCHEDULER_NAME
    if name != "WarmupPolyLR":
        return build_lr_scheduler(cfg, optimizer)
    poly = PolynomialDecayParamScheduler(1.0, s.POLY_LR_POWER)
    sched = WarmupParamScheduler(
        poly, s.WARMUP_FACTOR, min(s.WARMUP_ITERS / max(s.MAX_ITER, 1), 1.0), s.WARMUP_METHOD
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=s.MAX_ITER)
