#!/usr/bin/env python
"""Prepare ADE20K-847 (the full ADE20K release) validation images and labels for c2s-d2.

Input (under the datasets root, ``--root`` or ``$DETECTRON2_DATASETS``, default ``./datasets``),
the full ADE20K release (https://groups.csail.mit.edu/vision/datasets/ADE20K/, registration
needed) unpacked::

    ADE20K_2021_17_01/index_ade20k.pkl                   the index: 'folder' and 'filename' lists
    ADE20K_2021_17_01/images/ADE/validation/.../ADE_val_XXXXXXXX.jpg        2,000 val images
    ADE20K_2021_17_01/images/ADE/validation/.../ADE_val_XXXXXXXX_seg.png    RGB class maps

A ``folder`` entry of the index starts with ``ADE20K_2021_17_01/`` (paths are relative to the
datasets root); a folder without that prefix is read relative to ``ADE20K_2021_17_01``.

Output::

    ADE20K_2021_17_01/images_detectron2/validation/ADE_val_XXXXXXXX.jpg       resized images
    ADE20K_2021_17_01/annotations_detectron2/validation/ADE_val_XXXXXXXX.png  16-bit labels
    ADE20K_2021_17_01/annotations_detectron2/validation.txt                   split list (last)

The conventions of Mask2Former / SAN / CAT-Seg / fc-clip (``prepare_ade20k_full_sem_seg.py``),
whose numbers are computed on these files: the full-release class of a pixel is
``(R // 10) * 256 + G`` of its ``_seg.png``; the 847 classes are the ``full_id`` values of
``ade20k_847.json`` (class id = position), every other value (0 = unlabelled, rarer classes) is
ignored (65535). An image whose short side exceeds 512 is resized to a short side of 512 (long
side ``round(long / short * 512)``; image bilinear, label nearest, with OpenCV), and every image
is written as JPEG at Pillow's default quality (75). Only the ``ADE_val_*`` images are prepared.

Usage: ``python datasets/prepare_ade20k_847.py [--root DIR] [--workers N]``.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from _prepare_common import PrepareError, dataset_root, require_dir, write_split_list
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
    verified_jpeg,
    verified_label,
    write_jpeg_atomic,
    write_label_atomic,
)

logger = logging.getLogger("c2s_d2.prepare")

RELEASE_DIR = "ADE20K_2021_17_01"
INDEX_FILE = "index_ade20k.pkl"
SPLIT = "validation"
MAX_SHORT_SIDE = 512
MAX_FULL_VALUE = (255 // 10) * 256 + 255  # the largest value (R // 10) * 256 + G can take


def ade20k_847_class_names() -> List[str]:
    return [c["name"] for c in load_transfer_classes("ade20k_847")["classes"]]


def full_value_lut() -> np.ndarray:
    """(MAX_FULL_VALUE + 1,) uint16: full-release class value -> 847-class id, else 65535."""
    full_ids = [c["full_id"] for c in load_transfer_classes("ade20k_847")["classes"]]
    lut = np.full(MAX_FULL_VALUE + 1, IGNORE_16, dtype=np.uint16)
    lut[full_ids] = np.arange(len(full_ids), dtype=np.uint16)
    return lut


def resized_size(width: int, height: int) -> Tuple[int, int]:
    """(W, H) after the peers' rule: short side capped at 512, long side rounded in proportion."""
    if width >= height > MAX_SHORT_SIDE:
        return round(width / float(height) * MAX_SHORT_SIDE), MAX_SHORT_SIDE
    if height >= width > MAX_SHORT_SIDE:
        return MAX_SHORT_SIDE, round(height / float(width) * MAX_SHORT_SIDE)
    return width, height


def full_class_map(seg_path: str) -> np.ndarray:
    """(H, W) int32 full-release class values ``(R // 10) * 256 + G`` of a ``_seg.png``."""
    if not os.path.isfile(seg_path):
        raise PrepareError(f"class map not found: {seg_path}")
    with Image.open(seg_path) as img:
        img.load()
        if img.mode not in ("RGB", "RGBA"):
            raise PrepareError(f"class map {seg_path} has mode {img.mode!r}; expected RGB")
        seg = np.asarray(img)
    return (seg[:, :, 0].astype(np.int32) // 10) * 256 + seg[:, :, 1].astype(np.int32)


def convert_ade(task: Tuple[str, str, str]) -> TaskResult:
    """Convert one ``(source image, output image, output label)``."""
    src, dst_image, dst_label = task
    num_classes, ignore = len(ade20k_847_class_names()), IGNORE_16

    def body() -> TaskResult:
        import cv2

        size = image_size(src)
        if size is None:
            raise PrepareError(f"image not found or unreadable: {src}")
        out_size = resized_size(*size)
        status = "written"
        if os.path.exists(dst_label) or os.path.exists(dst_image):
            done = verified_label(dst_label, out_size, num_classes, ignore)
            if done is not None and verified_jpeg(dst_image, out_size):
                return "skipped", label_counts(done, num_classes, ignore), ""
            status = "repaired"
        seg_path = src[: -len(".jpg")] + "_seg.png"
        label = _lut()[full_class_map(seg_path)]
        with Image.open(src) as img:
            image = np.asarray(img.convert("RGB"))
        if label.shape != image.shape[:2]:
            raise PrepareError(
                f"{seg_path} is {label.shape[1]}x{label.shape[0]}, its image {src} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        if out_size != size:
            image = cv2.resize(image, out_size, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, out_size, interpolation=cv2.INTER_NEAREST)
        write_jpeg_atomic(image, dst_image)
        write_label_atomic(label, dst_label)
        return status, label_counts(label, num_classes, ignore), ""

    return guarded(body, src)


_LUT: Dict[str, np.ndarray] = {}


def _lut() -> np.ndarray:
    if "lut" not in _LUT:  # once per worker process
        _LUT["lut"] = full_value_lut()
    return _LUT["lut"]


def read_index(path: str) -> List[Tuple[str, str]]:
    """(folder, filename) pairs of ``index_ade20k.pkl``."""
    if not os.path.isfile(path):
        raise PrepareError(f"index not found: {path} (part of the full ADE20K release)")
    try:
        with open(path, "rb") as f:
            index = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise PrepareError(f"corrupt index {path}: {e}") from None
    if not isinstance(index, dict) or not {"folder", "filename"} <= set(index):
        raise PrepareError(f"{path}: expected a dict with 'folder' and 'filename' lists")
    folders, files = list(index["folder"]), list(index["filename"])
    if len(folders) != len(files):
        raise PrepareError(f"{path}: {len(folders)} folders for {len(files)} file names")
    return [(str(d), str(f)) for d, f in zip(folders, files)]


def prepare_ade20k_847(
    root: Optional[str] = None, workers: int = 0, progress: bool = True
) -> List[TransferSummary]:
    """Resize and convert the val images of the full release; returns the split's summary."""
    root = dataset_root(root)
    release = require_dir(os.path.join(root, RELEASE_DIR), "unpack the full ADE20K release there")
    entries = [(d, f) for d, f in read_index(os.path.join(release, INDEX_FILE))
               if f.startswith("ADE_val_")]  # fmt: skip
    if not entries:
        raise PrepareError(f"{os.path.join(release, INDEX_FILE)} lists no ADE_val_* image")
    image_dir = os.path.join(release, "images_detectron2", SPLIT)
    label_dir = os.path.join(release, "annotations_detectron2", SPLIT)
    tasks, stems = [], []
    for folder, filename in sorted(entries, key=lambda e: e[1]):
        parts = folder.replace("\\", "/").split("/")
        base = root if parts[0] == RELEASE_DIR else release
        stem = os.path.splitext(filename)[0]
        tasks.append((os.path.join(base, folder, filename), os.path.join(image_dir, stem + ".jpg"),
                      os.path.join(label_dir, stem + ".png")))  # fmt: skip
        stems.append(stem)
    if len(set(stems)) != len(stems):
        raise PrepareError(f"{os.path.join(release, INDEX_FILE)} lists a val image twice")
    names = ade20k_847_class_names()
    summary = run_tasks(SPLIT, tasks, convert_ade, names, [image_dir, label_dir], workers, progress)
    write_split_list(os.path.join(release, "annotations_detectron2", SPLIT + ".txt"), stems)
    return [summary]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_transfer_cli(prepare_ade20k_847, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
