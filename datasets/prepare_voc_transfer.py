#!/usr/bin/env python
"""Prepare PASCAL VOC 2012 val labels as transfer sets VOC-20 and VOC-21 (evaluation only).

Input (under the datasets root, ``--root`` or ``$DETECTRON2_DATASETS``, default ``./datasets``),
``VOCtrainval_11-May-2012.tar`` unpacked (the SBD labels are not needed)::

    VOCdevkit/VOC2012/JPEGImages/*.jpg                      images (not read here)
    VOCdevkit/VOC2012/SegmentationClass/*.png               palette PNGs: 0 = background,
                                                            1..20 = classes, 255 = object borders
    VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt        the 1,449 val images

Output::

    VOCdevkit/VOC2012/annotations_detectron2/voc20_val/*.png   0 -> 255, k in 1..20 -> k-1
    VOCdevkit/VOC2012/annotations_detectron2/voc21_val/*.png   0 = background, k -> k (--with-bg)
    VOCdevkit/VOC2012/annotations_detectron2/voc{20,21}_val.txt  split lists (written last)

VOC-20 (PAS-20, background ignored) is what SAN, CAT-Seg and fc-clip report; VOC-21 (PAS-21,
background as class 0, fc-clip's convention) is written only with ``--with-bg``. Raw 255 stays
255 in both. Palette PNGs are read by palette index, never by colour.

Usage: ``python datasets/prepare_voc_transfer.py [--root DIR] [--workers N] [--with-bg]``.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import List, Optional, Sequence

import numpy as np
from _prepare_common import (
    dataset_root,
    load_class_json,
    offset_lut,
    read_split_list,
    require_dir,
    write_split_list,
)
from _prepare_transfer import TransferSummary, convert_index_png, run_tasks, run_transfer_cli

VOC_DIR = os.path.join("VOCdevkit", "VOC2012")
OUT_DIR = "annotations_detectron2"
BACKGROUND = "background"


def voc20_class_names() -> List[str]:
    """The 20 VOC class names in class-id order (from voc.json)."""
    return [c["name"] for c in load_class_json("voc")["classes"]]


def voc21_lut() -> np.ndarray:
    """Raw 0..20 kept as they are (0 = background), 255 stays 255, anything else -1."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[:21] = np.arange(21)
    lut[255] = 255
    return lut


def prepare_voc_transfer(
    root: Optional[str] = None, workers: int = 0, progress: bool = True, with_bg: bool = False
) -> List[TransferSummary]:
    """Convert the val labels to VOC-20 (and VOC-21 with ``with_bg``); one summary per set."""
    voc = require_dir(
        os.path.join(dataset_root(root), VOC_DIR), "unpack VOCtrainval_11-May-2012.tar there"
    )
    label_dir = require_dir(
        os.path.join(voc, "SegmentationClass"), "part of VOCtrainval_11-May-2012.tar"
    )
    stems = sorted(set(read_split_list(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"))))
    names20 = voc20_class_names()
    sets = [("voc20_val", offset_lut(len(names20)), names20)]
    if with_bg:
        sets.append(("voc21_val", voc21_lut(), [BACKGROUND] + names20))
    summaries = []
    for name, lut, names in sets:
        dst_dir = os.path.join(voc, OUT_DIR, name)
        tasks = [
            (os.path.join(label_dir, s + ".png"), os.path.join(dst_dir, s + ".png")) for s in stems
        ]
        fn = partial(convert_index_png, lut=lut, num_classes=len(names), ignore=255)
        summaries.append(run_tasks(name, tasks, fn, names, [dst_dir], workers, progress))
        write_split_list(os.path.join(voc, OUT_DIR, name + ".txt"), stems)
    return summaries


def _add_arguments(parser) -> None:
    parser.add_argument(
        "--with-bg", action="store_true", help="also write VOC-21 (background = class 0)"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_transfer_cli(
        prepare_voc_transfer, __doc__.split("\n")[0], argv, add_arguments=_add_arguments
    )


if __name__ == "__main__":
    sys.exit(main())
