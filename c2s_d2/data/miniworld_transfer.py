"""The transfer mini-world: an evaluation set whose scenes differ from the mini-world's.

The mini-world (``c2s_d2.data.miniworld``) is the evidence for the zero-shot setting; this set is
the evidence for the *transfer* setting the field reports (train on one dataset, evaluate on
another with its own vocabulary). A model trained on the mini-world is evaluated here, as a
COCO-Stuff model is on ADE20K, with no retraining and the set's own class names:

* **other materials**: the 22 classes are the mini-world's 16 and 6 materials absent from every
  mini-world scene, label, class list and caption (``TRANSFER_MATERIALS``: coral, slate, bamboo,
  denim, clay, amethyst). Only the teacher knows them, from its own pretraining scenes, as CLIP
  knows the web's concepts; their names are excluded from the student's latent vocabulary like
  every unseen name of a registered dataset;
* **other layouts**: parallel bands, concentric rings or a grid of cells, never the mini-world's
  power diagrams;
* **other scales**: texture periods vary by ``exp(U(-0.7, 0.7))`` (mini-world: ``U(-0.3, 0.3)``);
* **other lighting**: a global brightness of ``U(0.6, 1.3)``, a colour tint of ``U(0.88, 1.12)``
  per channel and an illumination gradient three times the mini-world's.

Labels: uint8 ids 0..21 (0..15 the mini-world's materials in its order, 16..21 the new ones) and
255 on 1-px region borders only. Scenes hold 2-5 materials; an anchor cycles through all 22.

On disk (``root``, default ``$DETECTRON2_DATASETS/miniworld_transfer``)::

    images/val/<id>.png   labels/val/<id>.png   captions_val.json   MANIFEST.json (written last)

Generated from its own seed (``TRANSFER_SEED``), which must differ from the student's and the
teacher's seeds; like the mini-world, generated on first use (about 2 s for 200 images).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from .miniworld import (
    IGNORE_LABEL,
    IMAGE_EXT,
    MANIFEST_NAME,
    MINIWORLD_CLASSES,
    TRANSFER_CLASSES,
    _generation_lock,
    _pixel_grid,
    _render_material,
    _write_json,
    _write_png,
    caption_for,
    read_manifest,
)

__all__ = [
    "NEW_IDS",
    "TRANSFER_GENERATOR_VERSION",
    "TRANSFER_SEED",
    "TRANSFER_WORLD_CLASSES",
    "default_transfer_root",
    "ensure_transfer_world",
    "render_transfer_scene",
]

logger = logging.getLogger(__name__)

TRANSFER_GENERATOR_VERSION = 1
TRANSFER_SEED = 2000
TRANSFER_FOLDER = "miniworld_transfer"
# the set's vocabulary: the mini-world's materials, then the new ones ("teacher" palette order)
TRANSFER_WORLD_CLASSES: List[str] = MINIWORLD_CLASSES + TRANSFER_CLASSES
NEW_IDS: List[int] = list(range(len(MINIWORLD_CLASSES), len(TRANSFER_WORLD_CLASSES)))
LAYOUTS = ("bands", "rings", "grid")
_MIN_SHARE = 0.06  # every region covers at least this share of the frame
_SPLIT_CODE = 7  # the RNG stream of this set (the mini-world uses 0 and 1 for train / val)


def default_transfer_root() -> str:
    """``$DETECTRON2_DATASETS/miniworld_transfer`` (``./datasets/...`` if the variable is unset)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), TRANSFER_FOLDER)


def _cut_by_quantiles(rng: np.random.Generator, value: np.ndarray, k: int) -> np.ndarray:
    """Regions 0..k-1 of ``value`` split at random quantiles (each share >= ``_MIN_SHARE``)."""
    while True:
        shares = rng.dirichlet(np.full(k, 2.0))
        if shares.min() >= _MIN_SHARE:
            break
    cuts = np.quantile(value, np.cumsum(shares)[:-1])
    return np.searchsorted(cuts, value, side="right")


def _transfer_layout(rng: np.random.Generator, size: int, k: int) -> Tuple[np.ndarray, str]:
    """Partition of the frame into ``k`` regions: bands, rings or a grid of cells."""
    kind = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
    yy, xx = _pixel_grid(size)
    if kind == "bands":  # parallel bands at any angle, edges bent by a slow wave
        angle = rng.uniform(0, np.pi)
        t = xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))
        wave = rng.uniform(0, 0.06 * size) * np.sin(
            (xx * np.sin(angle) - yy * np.cos(angle)) * (2 * np.pi / rng.uniform(0.5, 1.5) / size)
        )
        regions = _cut_by_quantiles(rng, t + wave.astype(np.float32), k)
    elif kind == "rings":  # concentric ellipses around a centre anywhere in the frame
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        aspect = float(np.exp(rng.uniform(-0.5, 0.5)))
        r = np.hypot((xx - cx) * aspect, (yy - cy) / aspect)
        regions = _cut_by_quantiles(rng, r, k)
    else:  # a grid of rows x cols cells, every region at least one cell
        while True:
            rows, cols = int(rng.integers(2, 4)), int(rng.integers(2, 4))
            if rows * cols >= k:
                break
        owner = np.concatenate([rng.permutation(k), rng.integers(0, k, rows * cols - k)])
        owner = owner[rng.permutation(rows * cols)]
        row_cuts = np.sort(rng.uniform(0.2, 0.8, rows - 1)) * size
        col_cuts = np.sort(rng.uniform(0.2, 0.8, cols - 1)) * size
        cell = np.searchsorted(row_cuts, yy) * cols + np.searchsorted(col_cuts, xx)
        regions = owner[cell]
    return regions.astype(np.int64), kind


def _transfer_lighting(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, colour tint, a strong illumination gradient and sensor noise -> uint8."""
    size = rgb.shape[0]
    yy, xx = _pixel_grid(size)
    gx, gy = rng.uniform(-0.45, 0.45, 2) / size
    light = (1 + gx * (xx - size / 2) + gy * (yy - size / 2)) * rng.uniform(0.6, 1.3)
    tint = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    noise = rng.normal(0, 4.0, rgb.shape).astype(np.float32)
    return np.clip(rgb * light[..., None] * tint + noise, 0, 255).astype(np.uint8)


def render_transfer_scene(
    seed: int, index: int, size: int = 128
) -> Tuple[np.ndarray, np.ndarray, List[int], str]:
    """Scene ``index`` of the transfer set from its own RNG.

    Returns ``(image, label, material_ids, layout)``: image uint8 (size, size, 3) RGB; label
    uint8 (size, size), ids into ``TRANSFER_WORLD_CLASSES`` and 255 on 1-px region borders; the
    materials present in decreasing order of area; the layout kind.
    """
    n = len(TRANSFER_WORLD_CLASSES)
    rng = np.random.default_rng([int(seed), _SPLIT_CODE, int(index)])
    order = np.random.default_rng([int(seed), _SPLIT_CODE, 2**31]).permutation(n)
    anchor = int(order[index % n])
    k = int(rng.integers(2, 6))
    others = [i for i in range(n) if i != anchor]
    materials = [anchor] + [int(i) for i in rng.choice(others, k - 1, replace=False)]
    materials = [materials[i] for i in rng.permutation(k)]
    regions, layout = _transfer_layout(rng, size, k)
    rgb = np.empty((size, size, 3), np.float32)
    for r, material_id in enumerate(materials):
        mask = regions == r
        rgb[mask] = _render_material(material_id, size, rng, "teacher", scale_jitter=0.7)[mask]
    label = np.asarray(materials, np.uint8)[regions]
    border = np.zeros((size, size), bool)
    border[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    border[:-1, :] |= regions[:-1, :] != regions[1:, :]
    label[border] = IGNORE_LABEL
    counts = np.bincount(label[~border], minlength=n)
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    return _transfer_lighting(rgb, rng), label, present, layout


def ensure_transfer_world(
    root: Optional[str] = None, num_val: int = 200, size: int = 128, seed: int = TRANSFER_SEED
) -> Dict:
    """Generate the transfer set under ``root`` unless its manifest matches; returns it."""
    root = default_transfer_root() if root is None else root
    for key, value in (("num_val", num_val), ("size", size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"transfer mini-world parameter {key} must be an integer: {value!r}")
    if num_val < 1 or size < 16 or seed < 0:
        raise ValueError(
            f"transfer mini-world needs num_val >= 1, size >= 16, seed >= 0: "
            f"num_val={num_val}, size={size}, seed={seed}"
        )
    params = {"num_val": int(num_val), "size": int(size), "seed": int(seed)}
    with _generation_lock(root):
        manifest = read_manifest(root)
        if (
            manifest.get("generator_version") == TRANSFER_GENERATOR_VERSION
            and manifest.get("params") == params
            and manifest.get("classes") == TRANSFER_WORLD_CLASSES
        ):
            return manifest
        start = time.perf_counter()
        manifest_path = os.path.join(root, MANIFEST_NAME)
        if os.path.exists(manifest_path):
            os.remove(manifest_path)
        dirs = [os.path.join(root, kind, "val") for kind in ("images", "labels")]
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            for f in os.listdir(d):
                if f.endswith(IMAGE_EXT) or ".tmp" in f:
                    os.remove(os.path.join(d, f))
        captions, layouts = {}, {}
        for i in range(params["num_val"]):
            image, label, present, layout = render_transfer_scene(seed, i, size)
            image_id = f"{i:06d}"
            _write_png(os.path.join(dirs[0], image_id + IMAGE_EXT), image)
            _write_png(os.path.join(dirs[1], image_id + ".png"), label)
            captions[image_id] = caption_for(present, "teacher")  # same ids
            layouts[layout] = layouts.get(layout, 0) + 1
        _write_json(os.path.join(root, "captions_val.json"), captions)
        manifest = {
            "generator_version": TRANSFER_GENERATOR_VERSION,
            "params": params,
            "counts": {"val": params["num_val"]},
            "layouts": layouts,
            "classes": TRANSFER_WORLD_CLASSES,
            "new_ids": NEW_IDS,
            "image_ext": IMAGE_EXT,
        }
        _write_json(manifest_path, manifest)
        logger.info("generated transfer mini-world %s in %.1f s", root, time.perf_counter() - start)
        return manifest
