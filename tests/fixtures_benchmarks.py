"""Tiny raw-format fixtures of COCO-Stuff, PASCAL VOC 2012 and PASCAL Context.

Each ``write_*_fixture(root)`` writes a few small images and raw label PNGs under a datasets root,
exactly in the dataset's downloaded layout, and returns the raw labels it wrote as
``{split: {stem: (H, W) uint8 array}}`` so that tests can build expectations.
``prepare_benchmark_fixtures(root)`` writes all three and runs the preparation scripts, leaving a
root that ``c2s_d2.data.datasets.builtin_benchmarks`` loads (for end-to-end tests).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Dict, Sequence

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS_DIR = os.path.join(REPO_ROOT, "datasets")

Labels = Dict[str, Dict[str, np.ndarray]]

# Raw values written by default: every unseen class, both ends of the id range, 255, and for
# COCO-Stuff a dropped COCO id (11 = "street sign").
COCO_RAW_VALUES = (
    0,
    11,
    20,
    24,
    32,
    33,
    40,
    56,
    86,
    91,
    99,
    105,
    123,
    144,
    147,
    148,
    168,
    171,
    181,
    255,
)
VOC_RAW_VALUES = (0, 1, 5, 15, 16, 17, 18, 19, 20, 255)
CONTEXT_RAW_VALUES = (0, 1, 7, 8, 15, 20, 25, 32, 34, 49, 55, 59, 255)

VOC_VAL = ("2007_000033", "2007_000042")
VOC_TRAIN = ("2007_000032",)  # in VOC's own train list: palette PNG in SegmentationClass
SBD_ONLY = ("2008_000002", "2008_000003")  # only in SegmentationClassAug
CONTEXT_TRAIN = ("2008_000002", "2008_000003", "2008_000007")
CONTEXT_VAL = ("2008_000008", "2008_000015")


def voc_palette() -> list:
    """The standard PASCAL VOC colour map (index -> RGB), flattened to 768 ints."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):  # the index's bits are spread over the high bits of R, G, B
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def tiled_label(values: Sequence[int], size: int, shift: int) -> np.ndarray:
    """A (size, size) uint8 map holding every value of ``values``, rolled by ``shift``."""
    flat = np.resize(np.asarray(values, dtype=np.uint8), size * size)
    return np.roll(flat, shift).reshape(size, size)


def write_image(path: str, size: int, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=90)


def write_label(path: str, label: np.ndarray, palette: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(label)  # 2-D uint8 -> mode "L"
    if palette:  # a real VOC PNG: mode "P" (same indices), colours from the VOC palette
        img.putpalette(voc_palette())
    img.save(path)


def write_coco_stuff_fixture(
    root: str,
    values: Sequence[int] = COCO_RAW_VALUES,
    n_train: int = 3,
    n_val: int = 2,
    size: int = 16,
) -> Labels:
    """coco/{train2017,val2017}/*.jpg and coco/stuffthingmaps_trainval2017/<split>/*.png."""
    labels: Labels = {}
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        labels[split] = {}
        for k in range(n):
            stem = f"{k + 1 + (0 if split == 'train2017' else 100):012d}"
            write_image(os.path.join(root, "coco", split, stem + ".jpg"), size, k)
            label = tiled_label(values, size, shift=k)
            path = os.path.join(root, "coco", "stuffthingmaps_trainval2017", split, stem + ".png")
            write_label(path, label)
            labels[split][stem] = label
    return labels


def write_voc_fixture(
    root: str, values: Sequence[int] = VOC_RAW_VALUES, size: int = 16, trainaug_list: bool = False
) -> Labels:
    """VOCdevkit/VOC2012 with palette SegmentationClass, SegmentationClassAug and ImageSets.

    SegmentationClassAug holds every image (val too, as the real archive does); with
    ``trainaug_list`` a ``trainaug.txt`` lists the train-aug images plus one val image.
    """
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    labels: Labels = {"train_aug": {}, "val": {}}
    for k, stem in enumerate(VOC_VAL + VOC_TRAIN + SBD_ONLY):
        write_image(os.path.join(voc, "JPEGImages", stem + ".jpg"), size, k)
        label = tiled_label(values, size, shift=k)
        if stem not in SBD_ONLY:
            write_label(os.path.join(voc, "SegmentationClass", stem + ".png"), label, palette=True)
        write_label(os.path.join(voc, "SegmentationClassAug", stem + ".png"), label)
        labels["val" if stem in VOC_VAL else "train_aug"][stem] = label
    sets = os.path.join(voc, "ImageSets", "Segmentation")
    os.makedirs(sets, exist_ok=True)
    for name, stems in (("val", VOC_VAL), ("train", VOC_TRAIN)):
        with open(os.path.join(sets, name + ".txt"), "w") as f:
            f.write("".join(s + "\n" for s in stems))
    if trainaug_list:
        with open(os.path.join(sets, "trainaug.txt"), "w") as f:
            f.write("".join(s + "\n" for s in VOC_TRAIN + SBD_ONLY + VOC_VAL[:1]))
    return labels


def write_pcontext_fixture(
    root: str, values: Sequence[int] = CONTEXT_RAW_VALUES, size: int = 16
) -> Labels:
    """VOCdevkit/VOC2010 in mmsegmentation's converted layout (labels 0..59, 0 = background)."""
    context = os.path.join(root, "VOCdevkit", "VOC2010")
    labels: Labels = {"train": {}, "val": {}}
    for split, stems in (("train", CONTEXT_TRAIN), ("val", CONTEXT_VAL)):
        for k, stem in enumerate(stems):
            write_image(os.path.join(context, "JPEGImages", stem + ".jpg"), size, k)
            label = tiled_label(values, size, shift=k + 5 * (split == "val"))
            write_label(os.path.join(context, "SegmentationClassContext", stem + ".png"), label)
            labels[split][stem] = label
        sets = os.path.join(context, "ImageSets", "SegmentationContext")
        os.makedirs(sets, exist_ok=True)
        with open(os.path.join(sets, split + ".txt"), "w") as f:
            f.write("".join(s + "\n" for s in stems))
    return labels


def import_prepare_script(name: str) -> ModuleType:
    """Import ``datasets/<name>.py`` (e.g. "prepare_voc") as a module."""
    if DATASETS_DIR not in sys.path:
        sys.path.insert(0, DATASETS_DIR)
    return importlib.import_module(name)


def prepare_benchmark_fixtures(root: str) -> Dict[str, Labels]:
    """Write the three raw fixtures under ``root`` and prepare them (in this process)."""
    labels = {
        "coco_stuff": write_coco_stuff_fixture(root),
        "voc": write_voc_fixture(root),
        "pcontext": write_pcontext_fixture(root),
    }
    for dataset in labels:
        script = import_prepare_script(f"prepare_{dataset}")
        getattr(script, f"prepare_{dataset}")(root=root, workers=0, progress=False)
    return labels
