#!/usr/bin/env python
"""Prepare COCO-Stuff 164K labels for c2s-d2 (171 classes, 156 seen / 15 unseen).

Input (under the datasets root, ``--root`` or ``$DETECTRON2_DATASETS``, default ``./datasets``)::

    coco/{train2017,val2017}/*.jpg                              images (not read here)
    coco/stuffthingmaps_trainval2017/{train2017,val2017}/*.png  raw COCO-Stuff ids, 255 = unlabeled

Output::

    coco/stuffthingmaps_detectron2/{train2017,val2017}/*.png    class ids 0..170, 255 = ignore

A raw PNG value is the COCO category id minus one (0 = person, ..., 181 = wood). The 171 classes
are COCO's 80 thing ids followed by the 91 stuff ids; the raw id of each class is the ``raw_id``
field of ``c2s_d2/data/datasets/coco_stuff.json``. The 11 COCO ids that the 2017 release dropped
(e.g. "street sign") never occur in real files and are mapped to 255 should they appear.

Usage: ``python datasets/prepare_coco_stuff.py [--root DIR] [--workers N]`` (re-running skips
finished files and repairs broken ones).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional, Sequence

from _prepare_common import (
    PrepareError,
    SplitSummary,
    convert_split,
    dataset_root,
    load_class_json,
    raw_id_lut,
    require_dir,
    run_cli,
)

logger = logging.getLogger("c2s_d2.prepare")

SPLITS = ("train2017", "val2017")
RAW_DIR = os.path.join("coco", "stuffthingmaps_trainval2017")
OUT_DIR = os.path.join("coco", "stuffthingmaps_detectron2")
# raw values 0..181 that belong to no class: COCO category ids dropped from the 2017 release.
NUM_RAW_IDS = 182


def coco_stuff_class_names() -> List[str]:
    """The 171 class names in class-id order."""
    return [c["name"] for c in load_class_json("coco_stuff")["classes"]]


def coco_stuff_raw_ids() -> List[int]:
    """Raw stuffthingmaps value of each class, in class-id order (length 171)."""
    return [int(c["raw_id"]) for c in load_class_json("coco_stuff")["classes"]]


def prepare_coco_stuff(
    root: Optional[str] = None,
    workers: int = 0,
    progress: bool = True,
    splits: Sequence[str] = SPLITS,
) -> List[SplitSummary]:
    """Convert the raw COCO-Stuff label PNGs of ``splits``; returns one summary per split."""
    root = dataset_root(root)
    raw_ids = coco_stuff_raw_ids()
    unused = sorted(set(range(NUM_RAW_IDS)) - set(raw_ids))
    lut = raw_id_lut(raw_ids, unused_raw_ids=unused)
    summaries = []
    for split in splits:
        src_dir = require_dir(
            os.path.join(root, RAW_DIR, split),
            f"unzip COCO-Stuff's stuffthingmaps_trainval2017.zip into {os.path.join(root, 'coco')}",
        )
        if not os.path.isdir(os.path.join(root, "coco", split)):
            logger.warning(
                "image folder %s not found: the dataset will not load without it",
                os.path.join(root, "coco", split),
            )
        stems = sorted(f[:-4] for f in os.listdir(src_dir) if f.endswith(".png"))
        if not stems:
            raise PrepareError(f"no *.png label files in {src_dir}")
        dst_dir = os.path.join(root, OUT_DIR, split)
        tasks = [
            (os.path.join(src_dir, s + ".png"), os.path.join(dst_dir, s + ".png")) for s in stems
        ]
        summaries.append(convert_split(split, tasks, lut, len(raw_ids), workers, progress))
    return summaries


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(prepare_coco_stuff, coco_stuff_class_names, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
