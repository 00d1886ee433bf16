#!/usr/bin/env python
"""Prepare ADE20K-150 (SceneParsing) validation labels for c2s-d2 (evaluation only, 150 classes).

Input (under the datasets root, ``--root`` or ``$DETECTRON2_DATASETS``, default ``./datasets``),
``ADEChallengeData2016.zip`` unpacked::

    ADEChallengeData2016/images/validation/*.jpg         2,000 images (not read here)
    ADEChallengeData2016/annotations/validation/*.png    0 = other objects, 1..150 = classes

Output::

    ADEChallengeData2016/annotations_detectron2/validation/*.png   ids 0..149, 255 = ignore
    ADEChallengeData2016/annotations_detectron2/validation.txt     the split list (written last)

Raw 0 ("other objects", not one of the 150 classes) becomes 255, raw k in 1..150 becomes k-1
(the convention of Mask2Former, SAN, CAT-Seg and fc-clip). Any other raw value is refused.

Usage: ``python datasets/prepare_ade20k_150.py [--root DIR] [--workers N]``.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import partial
from typing import List, Optional, Sequence

from _prepare_common import PrepareError, dataset_root, offset_lut, require_dir, write_split_list
from _prepare_transfer import (
    TransferSummary,
    convert_index_png,
    load_transfer_classes,
    run_tasks,
    run_transfer_cli,
)

logger = logging.getLogger("c2s_d2.prepare")

ADE_DIR = "ADEChallengeData2016"
OUT_DIR = "annotations_detectron2"
SPLIT = "validation"


def ade20k_150_class_names() -> List[str]:
    """The 150 class names in class-id order."""
    return [c["name"] for c in load_transfer_classes("ade20k_150")["classes"]]


def prepare_ade20k_150(
    root: Optional[str] = None, workers: int = 0, progress: bool = True
) -> List[TransferSummary]:
    """Convert the 2,000 validation labels; returns the split's summary."""
    ade = require_dir(
        os.path.join(dataset_root(root), ADE_DIR), "unpack ADEChallengeData2016.zip there"
    )
    label_dir = require_dir(
        os.path.join(ade, "annotations", SPLIT), "part of ADEChallengeData2016.zip"
    )
    if not os.path.isdir(os.path.join(ade, "images", SPLIT)):
        logger.warning("image folder %s not found: the dataset will not load without it",
                       os.path.join(ade, "images", SPLIT))  # fmt: skip
    stems = sorted(f[:-4] for f in os.listdir(label_dir) if f.endswith(".png"))
    if not stems:
        raise PrepareError(f"no label PNGs in {label_dir}")
    names = ade20k_150_class_names()
    dst_dir = os.path.join(ade, OUT_DIR, SPLIT)
    tasks = [
        (os.path.join(label_dir, s + ".png"), os.path.join(dst_dir, s + ".png")) for s in stems
    ]
    fn = partial(convert_index_png, lut=offset_lut(len(names)), num_classes=len(names), ignore=255)
    summary = run_tasks(SPLIT, tasks, fn, names, [dst_dir], workers, progress)
    write_split_list(os.path.join(ade, OUT_DIR, SPLIT + ".txt"), stems)
    return [summary]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_transfer_cli(prepare_ade20k_150, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
