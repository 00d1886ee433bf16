#!/usr/bin/env python
"""Prepare PASCAL Context (59 classes) labels for c2s-d2 (49 seen / 10 unseen).

Input (under the datasets root, ``--root`` or ``$DETECTRON2_DATASETS``, default ``./datasets``),
in the layout of mmsegmentation's PASCAL Context converter::

    VOCdevkit/VOC2010/JPEGImages/*.jpg                               images (not read here)
    VOCdevkit/VOC2010/SegmentationClassContext/*.png                 0 = background, 1..59
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt  4,996 / 5,104 images

Output::

    VOCdevkit/VOC2010/annotations_detectron2/pc59_{train,val}/*.png  ids 0..58, 255 = ignore

Background (raw 0) becomes 255 (not one of the 59 classes), raw k in 1..59 becomes k-1, raw 255
stays 255. The registered splits read their image lists from ``ImageSets/SegmentationContext``.

Usage: ``python datasets/prepare_pcontext.py [--root DIR] [--workers N]``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional, Sequence

from _prepare_common import (
    SplitSummary,
    convert_split,
    dataset_root,
    load_class_json,
    offset_lut,
    read_split_list,
    require_dir,
    run_cli,
)

logger = logging.getLogger("c2s_d2.prepare")

CONTEXT_DIR = os.path.join("VOCdevkit", "VOC2010")
SPLITS = ("train", "val")


def pcontext_class_names() -> List[str]:
    """The 59 class names in class-id order."""
    return [c["name"] for c in load_class_json("pcontext")["classes"]]


def prepare_pcontext(
    root: Optional[str] = None, workers: int = 0, progress: bool = True
) -> List[SplitSummary]:
    """Convert the PASCAL Context train and val labels; returns one summary per split."""
    root = dataset_root(root)
    context = require_dir(
        os.path.join(root, CONTEXT_DIR), "unpack VOCtrainval_03-May-2010.tar there"
    )
    label_dir = require_dir(
        os.path.join(context, "SegmentationClassContext"),
        "convert trainval_merged.json with mmsegmentation's tools/dataset_converters/pascal_context.py",
    )
    if not os.path.isdir(os.path.join(context, "JPEGImages")):
        logger.warning(
            "image folder %s not found: the dataset will not load without it",
            os.path.join(context, "JPEGImages"),
        )
    num_classes = len(pcontext_class_names())
    lut = offset_lut(num_classes)
    summaries = []
    for split in SPLITS:
        stems = read_split_list(
            os.path.join(context, "ImageSets", "SegmentationContext", split + ".txt")
        )
        dst_dir = os.path.join(context, "annotations_detectron2", f"pc59_{split}")
        tasks = [
            (os.path.join(label_dir, s + ".png"), os.path.join(dst_dir, s + ".png")) for s in stems
        ]
        summaries.append(convert_split(split, tasks, lut, num_classes, workers, progress))
    return summaries


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(prepare_pcontext, pcontext_class_names, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
