#!/usr/bin/env python
"""Prepare PASCAL VOC 2012 (+ SBD augmented) labels for c2s-d2 (20 classes, 15 seen / 5 unseen).

Input (under the datasets root, ``--root`` or ``$DETECTRON2_DATASETS``, default ``./datasets``)::

    VOCdevkit/VOC2012/JPEGImages/*.jpg                       images (not read here)
    VOCdevkit/VOC2012/SegmentationClass/*.png                official labels (palette PNGs)
    VOCdevkit/VOC2012/SegmentationClassAug/*.png             SBD-augmented labels (index PNGs)
    VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt         the 1,449 val images
    VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt    optional train-aug list

Output::

    VOCdevkit/VOC2012/annotations_detectron2/{train_aug,val}/*.png   ids 0..19, 255 = ignore
    VOCdevkit/VOC2012/annotations_detectron2/{train_aug,val}.txt     the split lists

The train-aug split (10,582 images) is ``trainaug.txt`` (or ``train_aug.txt``) if present, else
every ``SegmentationClassAug`` stem; val images are always removed from it. The list comes in
either of DeepLab's two formats: one image stem per line (``2007_000032``), or two columns
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``; the stem of the first
column is used); any other line is refused with its file and line number. A label is read from
``SegmentationClass`` when the image has one there, else from ``SegmentationClassAug``; palette
PNGs are read by palette index, never by colour. Background (raw 0) becomes 255 (not a class),
raw 1..20 become 0..19, raw 255 (object boundaries) stays 255. The split list of a split is
written last, so a split whose list exists was converted completely.

Usage: ``python datasets/prepare_voc.py [--root DIR] [--workers N]``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import List, Optional, Sequence

from _prepare_common import (
    PrepareError,
    SplitSummary,
    convert_split,
    dataset_root,
    load_class_json,
    offset_lut,
    read_split_list,
    require_dir,
    run_cli,
    write_split_list,
)

logger = logging.getLogger("c2s_d2.prepare")

VOC_DIR = os.path.join("VOCdevkit", "VOC2012")
OUT_DIR = "annotations_detectron2"
TRAIN_AUG_LISTS = ("trainaug.txt", "train_aug.txt")
_STEM = re.compile(r"[A-Za-z0-9_-]+")


def voc_class_names() -> List[str]:
    """The 20 class names in class-id order."""
    return [c["name"] for c in load_class_json("voc")["classes"]]


def _train_aug_line_stem(fields: List[str]) -> Optional[str]:
    """The image stem of one list line split into fields, or None if it is in neither format."""
    if len(fields) == 1:
        return fields[0] if _STEM.fullmatch(fields[0]) else None
    if len(fields) == 2:
        stem, image_ext = os.path.splitext(os.path.basename(fields[0]))
        label_stem, label_ext = os.path.splitext(os.path.basename(fields[1]))
        ok_ext = image_ext.lower() == ".jpg" and label_ext.lower() == ".png"
        if _STEM.fullmatch(stem) and stem == label_stem and ok_ext:
            return stem
    return None


def read_train_aug_list(path: str) -> List[str]:
    """Image stems of a train-aug list in either DeepLab format (see the module docstring).

    Raises ``PrepareError`` naming the file and line number of the first line in neither format.
    """
    stems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            stem = _train_aug_line_stem(fields)
            if stem is None:
                shown = line.strip()
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                raise PrepareError(
                    f"{path}, line {number}: {shown!r} is neither an image stem ('2007_000032') "
                    "nor two columns '/JPEGImages/<stem>.jpg /SegmentationClassAug/<stem>.png'"
                )
            stems.append(stem)
    if not stems:
        raise PrepareError(f"split list is empty: {path}")
    return stems


def train_aug_stems(voc: str, val_stems: Sequence[str]) -> List[str]:
    """The train-aug image stems: the list file if present, else all Aug labels, minus val."""
    list_dir = os.path.join(voc, "ImageSets", "Segmentation")
    aug_dir = os.path.join(voc, "SegmentationClassAug")
    for name in TRAIN_AUG_LISTS:
        if os.path.isfile(os.path.join(list_dir, name)):
            stems = read_train_aug_list(os.path.join(list_dir, name))
            break
    else:
        require_dir(
            aug_dir,
            "the SBD-augmented labels: unzip SegmentationClassAug there, or put a trainaug.txt "
            f"list into {list_dir}",
        )
        stems = sorted(f[:-4] for f in os.listdir(aug_dir) if f.endswith(".png"))
    val = set(val_stems)
    kept = sorted(set(stems) - val)
    if len(kept) < len(set(stems)):
        logger.info("train-aug: %d val images left out", len(set(stems)) - len(kept))
    if not kept:
        raise PrepareError(f"no train-aug images outside val found in {aug_dir}")
    return kept


def label_source(voc: str, stem: str) -> str:
    """The raw label of ``stem``: official palette PNG first, else the augmented one."""
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        path = os.path.join(voc, folder, stem + ".png")
        if os.path.isfile(path):
            return path
    raise PrepareError(
        f"no label for image {stem}: neither {os.path.join(voc, 'SegmentationClass', stem)}.png "
        f"nor {os.path.join(voc, 'SegmentationClassAug', stem)}.png exists"
    )


def prepare_voc(
    root: Optional[str] = None, workers: int = 0, progress: bool = True
) -> List[SplitSummary]:
    """Convert the VOC val and train-aug labels; returns the summaries (train_aug, val)."""
    root = dataset_root(root)
    voc = require_dir(os.path.join(root, VOC_DIR), "unpack VOCtrainval_11-May-2012.tar there")
    require_dir(os.path.join(voc, "SegmentationClass"), "part of VOCtrainval_11-May-2012.tar")
    if not os.path.isdir(os.path.join(voc, "JPEGImages")):
        logger.warning(
            "image folder %s not found: the dataset will not load without it",
            os.path.join(voc, "JPEGImages"),
        )
    val_stems = read_split_list(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"))
    splits = {"train_aug": train_aug_stems(voc, val_stems), "val": sorted(set(val_stems))}
    num_classes = len(voc_class_names())
    lut = offset_lut(num_classes)
    summaries = []
    for split, stems in splits.items():
        dst_dir = os.path.join(voc, OUT_DIR, split)
        tasks = [(label_source(voc, s), os.path.join(dst_dir, s + ".png")) for s in stems]
        summaries.append(convert_split(split, tasks, lut, num_classes, workers, progress))
        write_split_list(os.path.join(voc, OUT_DIR, split + ".txt"), stems)
    return summaries


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(prepare_voc, voc_class_names, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
