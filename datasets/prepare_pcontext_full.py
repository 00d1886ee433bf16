#!/usr/bin/env python
"""Prepare PASCAL Context-459 and Context-59 val labels from the full annotations (evaluation only).

Input (under the datasets root, ``--root`` or ``$DETECTRON2_DATASETS``, default ``./datasets``):
``VOCtrainval_03-May-2010.tar`` and the full PASCAL Context annotations ``trainval.tar.gz``
(https://cs.stanford.edu/~roozbeh/pascal-context/) unpacked into ``VOCdevkit/VOC2010``::

    VOCdevkit/VOC2010/JPEGImages/*.jpg            images (only their sizes are read here)
    VOCdevkit/VOC2010/trainval/<stem>.mat         'LabelMap': (H, W) uint16, k in 1..459 is the
                                                  class of line "k: name" of labels.txt, 0 = none
    VOCdevkit/VOC2010/labels.txt                  optional: checked against our 459 names
    the val list, the first found of: --val-list FILE, VOCdevkit/VOC2010/pascalcontext_val.txt,
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt, VOCdevkit/VOC2010/ImageSets/Main/val.txt

Output::

    VOCdevkit/VOC2010/annotations_detectron2/pc459_val/*.png    16-bit: k -> k-1, 0 -> 65535
    VOCdevkit/VOC2010/annotations_detectron2/pc59_full_val/*.png  8-bit: 59-class ids, else 255
    VOCdevkit/VOC2010/annotations_detectron2/{pc459_val,pc59_full_val}.txt  split lists (last)

Context-459 keeps every class of labels.txt (k -> k-1) and ignores unlabelled pixels (0), as
fc-clip / ODISE do; SAN and CAT-Seg use the same k -> k-1. Context-59 keeps the standard 59
classes (mmsegmentation's, SAN's and CAT-Seg's subset: ``pc59_full_ids`` of pcontext_459.json,
in pcontext.json's class order) and ignores every other class and unlabelled pixels; the peers
build it from ``trainval_merged.json`` with the same ids. A val image without a .mat file is
left out with a warning (as CAT-Seg does). Needs scipy (``scipy.io.loadmat``).

Usage: ``python datasets/prepare_pcontext_full.py [--root DIR] [--workers N] [--val-list FILE]
[--sets 459,59]``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from functools import partial
from typing import List, Optional, Sequence, Tuple

import numpy as np
from _prepare_common import (
    PrepareError,
    dataset_root,
    load_class_json,
    read_split_list,
    require_dir,
    write_split_list,
)
from _prepare_transfer import (
    IGNORE_16,
    TaskResult,
    TransferSummary,
    guarded,
    image_size,
    label_counts,
    load_transfer_classes,
    run_tasks,
    run_transfer_cli,
    verified_label,
    write_label_atomic,
)

logger = logging.getLogger("c2s_d2.prepare")

CONTEXT_DIR = os.path.join("VOCdevkit", "VOC2010")
OUT_DIR = "annotations_detectron2"
VAL_LISTS = (
    "pascalcontext_val.txt",
    os.path.join("ImageSets", "SegmentationContext", "val.txt"),
    os.path.join("ImageSets", "Main", "val.txt"),
)
NUM_FULL = 459
_LABEL_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.+?)\s*$")


def pcontext_459_class_names() -> List[str]:
    return [c["name"] for c in load_transfer_classes("pcontext_459")["classes"]]


def pcontext_59_class_names() -> List[str]:
    return [c["name"] for c in load_class_json("pcontext")["classes"]]


def full_lut(which: str) -> Tuple[np.ndarray, int, int]:
    """(LUT over LabelMap values 0..459, number of classes, ignore label) of "459" or "59"."""
    if which == "459":
        lut = np.empty(NUM_FULL + 1, dtype=np.int64)
        lut[0] = IGNORE_16
        lut[1:] = np.arange(NUM_FULL)
        return lut, NUM_FULL, IGNORE_16
    full_ids = load_transfer_classes("pcontext_459")["pc59_full_ids"]
    lut = np.full(NUM_FULL + 1, 255, dtype=np.int64)
    lut[full_ids] = np.arange(len(full_ids))
    return lut, len(full_ids), 255


def read_label_map(path: str) -> np.ndarray:
    """The (H, W) 'LabelMap' of a PASCAL Context .mat file; refuses anything else, naming it."""
    from scipy.io import loadmat

    if not os.path.isfile(path):
        raise PrepareError(f"annotation file not found: {path}")
    try:
        mat = loadmat(path)
    except (OSError, ValueError, TypeError) as e:
        raise PrepareError(f"corrupt annotation file {path}: {e}") from None
    if "LabelMap" not in mat:
        raise PrepareError(
            f"{path} has no 'LabelMap' (keys: {sorted(k for k in mat if k[0] != '_')})"
        )
    label = np.asarray(mat["LabelMap"])
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise PrepareError(
            f"{path}: 'LabelMap' must be a 2-D integer array, got {label.dtype} {label.shape}"
        )
    if label.size and (label.min() < 0 or label.max() > NUM_FULL):
        bad = np.unique(label[(label < 0) | (label > NUM_FULL)]).tolist()[:10]
        raise PrepareError(f"{path}: 'LabelMap' values {bad} outside 0..{NUM_FULL}")
    return label


def convert_mat(task: Tuple[str, str, str], which: str) -> TaskResult:
    """Convert one ``(mat file, output PNG, image)`` to the "459" or "59" class ids."""
    src, dst, image = task
    lut, num_classes, ignore = full_lut(which)

    def body() -> TaskResult:
        status = "written"
        if os.path.exists(dst):
            done = verified_label(dst, image_size(image), num_classes, ignore)
            if done is not None:
                return "skipped", label_counts(done, num_classes, ignore), ""
            status = "repaired"
        out = lut[read_label_map(src)].astype(np.uint16 if ignore == IGNORE_16 else np.uint8)
        write_label_atomic(out, dst)
        return status, label_counts(out, num_classes, ignore), ""

    return guarded(body, src)


def check_labels_txt(path: str, names: Sequence[str]) -> None:
    """Compare labels.txt ("k: name" lines) with our 459 names, spaces and case aside."""
    if not os.path.isfile(path):
        logger.warning("%s not found: the 459 class names are not checked against it", path)
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            m = _LABEL_LINE.match(line)
            if not m:
                continue
            k, name = int(m.group(1)), m.group(2)
            if not 1 <= k <= len(names):
                raise PrepareError(f"{path}, line {number}: class id {k} outside 1..{len(names)}")
            ours = names[k - 1]
            if name.replace(" ", "").lower() != ours.replace(" ", "").lower():
                raise PrepareError(
                    f"{path}, line {number}: class {k} is {name!r}, pcontext_459.json says {ours!r}"
                )


def find_val_list(context: str, val_list: Optional[str]) -> str:
    if val_list:
        return val_list
    for rel in VAL_LISTS:
        if os.path.isfile(os.path.join(context, rel)):
            return os.path.join(context, rel)
    raise PrepareError(
        "no PASCAL Context val list: give --val-list FILE or put one of "
        + ", ".join(os.path.join(context, rel) for rel in VAL_LISTS)
    )


def prepare_pcontext_full(
    root: Optional[str] = None,
    workers: int = 0,
    progress: bool = True,
    val_list: Optional[str] = None,
    sets: str = "459,59",
) -> List[TransferSummary]:
    """Convert the val .mat files to Context-459 and/or Context-59; one summary per set."""
    which = [s.strip() for s in sets.split(",") if s.strip()]
    if not which or any(s not in ("459", "59") for s in which):
        raise PrepareError(f"--sets {sets!r}: expected a comma-separated subset of 459,59")
    context = require_dir(
        os.path.join(dataset_root(root), CONTEXT_DIR), "unpack VOCtrainval_03-May-2010.tar there"
    )
    mat_dir = require_dir(
        os.path.join(context, "trainval"),
        "unpack PASCAL Context's full annotations trainval.tar.gz into VOCdevkit/VOC2010",
    )
    names459 = pcontext_459_class_names()
    check_labels_txt(os.path.join(context, "labels.txt"), names459)
    list_path = find_val_list(context, val_list)
    stems = sorted(set(read_split_list(list_path)))
    kept = [s for s in stems if os.path.isfile(os.path.join(mat_dir, s + ".mat"))]
    if len(kept) < len(stems):
        logger.warning("%d of %d val images in %s have no .mat file in %s: left out",
                       len(stems) - len(kept), len(stems), list_path, mat_dir)  # fmt: skip
    if not kept:
        raise PrepareError(
            f"none of the {len(stems)} images of {list_path} has a .mat in {mat_dir}"
        )
    summaries = []
    for w in which:
        name = "pc459_val" if w == "459" else "pc59_full_val"
        names = names459 if w == "459" else pcontext_59_class_names()
        dst_dir = os.path.join(context, OUT_DIR, name)
        tasks = [
            (os.path.join(mat_dir, s + ".mat"), os.path.join(dst_dir, s + ".png"),
             os.path.join(context, "JPEGImages", s + ".jpg"))
            for s in kept
        ]  # fmt: skip
        fn = partial(convert_mat, which=w)
        summaries.append(run_tasks(name, tasks, fn, names, [dst_dir], workers, progress))
        write_split_list(os.path.join(context, OUT_DIR, name + ".txt"), kept)
    return summaries


def _add_arguments(parser) -> None:
    parser.add_argument("--val-list", default=None, help="val image stems, one a line")
    parser.add_argument("--sets", default="459,59", help="which sets to write (default 459,59)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_transfer_cli(
        prepare_pcontext_full, __doc__.split("\n")[0], argv, add_arguments=_add_arguments
    )


if __name__ == "__main__":
    sys.exit(main())
