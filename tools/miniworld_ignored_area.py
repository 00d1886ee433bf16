#!/usr/bin/env python
"""Composition of the mini-world training set's ignored area (label 255 in the inductive setting).

    python tools/miniworld_ignored_area.py [--num 2000] [--seed 0] [--size 128]
    python tools/miniworld_ignored_area.py --seen-filter [--num 200] [--teacher PATH]

In the inductive training set the ignored area is the union of the unseen materials (mapped to 255
by the label LUT) and the pixels the labels leave unlabelled (region borders, clutter of unnamed
materials, blurred patches). This re-renders the scenes with their hidden parts
(``render_scene_with_parts``) and prints, as a markdown table, which share of the ignored area is
what, and how many training images the strict inductive setting keeps.

``--seen-filter`` measures the calibrated seen/latent filter (``CalibratedSeenFilter``) with the
mini-world teacher on each kind of region: the threshold is the ``--quantile`` of the ground-truth
seen segments' best seen-text cosines (as in training), and the table gives the share of each kind
of region the filter finds seen-like (left alone) or latent.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2s_d2.data.miniworld import MINIWORLD_UNSEEN_IDS, render_scene_with_parts  # noqa: E402

PARTS = (
    ("unseen material, labelled (255 through the LUT)", "unseen_labelled"),
    ("unlabelled: clutter of unnamed materials", "clutter"),
    ("unlabelled: blur over a seen material", "blur_seen"),
    ("unlabelled: blur over an unseen material", "blur_unseen"),
    ("unlabelled: region borders", "border"),
)


def composition(num: int, seed: int = 0, size: int = 128) -> Dict[str, float]:
    """Pixel counts of each part of the ignored area over ``num`` training scenes."""
    counts = {key: 0 for _, key in PARTS}
    counts.update(pixels=0, images=num, strict_kept=0)
    for i in range(num):
        _, label, _, parts = render_scene_with_parts(seed, "train", i, size)
        unseen = np.isin(parts["materials"], MINIWORLD_UNSEEN_IDS)
        counts["unseen_labelled"] += int(np.isin(label, MINIWORLD_UNSEEN_IDS).sum())
        counts["clutter"] += int(parts["clutter"].sum())
        counts["blur_seen"] += int((parts["blur"] & ~unseen).sum())
        counts["blur_unseen"] += int((parts["blur"] & unseen).sum())
        counts["border"] += int(parts["border"].sum())
        counts["pixels"] += label.size
        counts["strict_kept"] += int(not np.isin(label, MINIWORLD_UNSEEN_IDS).any())
    return counts


def markdown(c: Dict[str, float]) -> str:
    ignored = sum(c[key] for _, key in PARTS)
    lines = [
        f"Ignored area of the inductive training set ({c['images']} scenes): "
        f"{100 * ignored / c['pixels']:.1f} % of all pixels.",
        "",
        "| part of the ignored area | share of it | share of all pixels |",
        "|---|---:|---:|",
    ]
    for label, key in PARTS:
        lines.append(
            f"| {label} | {100 * c[key] / ignored:.1f} % | {100 * c[key] / c['pixels']:.1f} % |"
        )
    unseen = c["unseen_labelled"] + c["blur_unseen"]
    lines += [
        "",
        f"Unseen material makes {100 * unseen / ignored:.1f} % of the ignored area; the other "
        f"{100 * (ignored - unseen) / ignored:.1f} % is seen material or unnamed clutter. "
        f"The strict inductive setting keeps {c['strict_kept']} of {c['images']} training "
        "images (those without an unseen pixel).",
    ]
    return "\n".join(lines)


REGION_KINDS = (
    ("ground-truth seen segments (calibration)", "gt_seen"),
    ("unseen-material segments", "unseen"),
    ("blur over a seen material", "blur_seen"),
    ("blur over an unseen material", "blur_unseen"),
    ("clutter of unnamed materials", "clutter"),
)


def seen_filter_rates(
    num: int, teacher_weights: str, quantile: float = 0.25, seed: int = 0, size: int = 128
) -> Dict[str, Dict[str, float]]:
    """Best seen-text cosine of every region kind, and the share the calibrated filter rejects."""
    import torch

    from c2s_d2.data.miniworld import MINIWORLD_CLASSES
    from c2s_d2.modeling.clip.loader import build_open_clip
    from c2s_d2.modeling.clip.teacher import ClipTeacher
    from c2s_d2.modeling.clip.text_encoder import text_embeddings
    from c2s_d2.modeling.distillation.pseudo_masks import best_seen_similarity

    model_name = "C2S-Tiny-Text32"
    seen_ids = [i for i in range(len(MINIWORLD_CLASSES)) if i not in MINIWORLD_UNSEEN_IDS]
    seen_text = text_embeddings(
        [MINIWORLD_CLASSES[i] for i in seen_ids], model_name, teacher_weights
    )
    teacher = ClipTeacher(build_open_clip(model_name, teacher_weights))
    best: Dict[str, List[float]] = {key: [] for _, key in REGION_KINDS}
    min_pixels = (size // 16) ** 2  # at least one teacher cell
    for i in range(num):
        image, label, _, parts = render_scene_with_parts(seed, "train", i, size)
        with torch.no_grad():
            dense = teacher(torch.from_numpy(image).permute(2, 0, 1)[None].float())[1]
        unseen = np.isin(parts["materials"], MINIWORLD_UNSEEN_IDS)
        masks = {key: [] for _, key in REGION_KINDS}
        for m in np.unique(label):
            if m != 255:
                masks["unseen" if m in MINIWORLD_UNSEEN_IDS else "gt_seen"].append(label == m)
        masks["blur_seen"].append(parts["blur"] & ~unseen)
        masks["blur_unseen"].append(parts["blur"] & unseen)
        masks["clutter"].append(parts["clutter"])
        for key, ms in masks.items():
            ms = [m for m in ms if m.sum() >= min_pixels]
            if ms:
                t = torch.from_numpy(np.stack(ms))
                emb = teacher.region_embeddings(dense, [t])[0]
                best[key] += best_seen_similarity(emb, seen_text).tolist()
    gt = torch.tensor(best["gt_seen"], dtype=torch.float64)
    threshold = float(torch.quantile(gt, quantile))
    out = {"threshold": {"value": threshold}}
    for _, key in REGION_KINDS:
        vals = np.asarray(best[key])
        out[key] = {
            "n": int(vals.size),
            "mean_best_seen_cos": float(vals.mean()) if vals.size else float("nan"),
            "seen_like_pct": float(100 * (vals >= threshold).mean()) if vals.size else float("nan"),
            "absolute_0.9_seen_like_pct": float(100 * (vals >= 0.9).mean()) if vals.size else 0.0,
        }
    return out


def seen_filter_markdown(r: Dict[str, Dict[str, float]], quantile: float) -> str:
    lines = [
        f"Calibrated threshold ({quantile:.2f}-quantile of the ground-truth seen segments' best "
        f"seen cosines): {r['threshold']['value']:.3f}.",
        "",
        "| region kind | regions | mean best seen cosine | seen-like (calibrated) | "
        "seen-like (absolute 0.9) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key in REGION_KINDS:
        v = r[key]
        lines.append(
            f"| {label} | {v['n']} | {v['mean_best_seen_cos']:.3f} | {v['seen_like_pct']:.1f} % "
            f"| {v['absolute_0.9_seen_like_pct']:.1f} % |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num", type=int, default=2000, help="training scenes (default: all 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seen-filter", action="store_true", help="measure the seen/latent filter")
    p.add_argument("--teacher", default="miniworld", help="teacher weights (default: shipped)")
    p.add_argument("--quantile", type=float, default=0.25, help="PSEUDO_MASK.SEEN_QUANTILE")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error(f"--num must be >= 1, got {args.num}")
    if args.seen_filter:
        rates = seen_filter_rates(args.num, args.teacher, args.quantile, args.seed, args.size)
        print(seen_filter_markdown(rates, args.quantile))
        return 0
    print(markdown(composition(args.num, args.seed, args.size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
