"""Tiny raw-format fixtures of the transfer sets: ADE20K-150, ADE20K-847 (full release), PASCAL
Context full annotations (.mat) and VOC 2012 val.

Each ``write_*`` writes a few small files under a datasets root in the dataset's downloaded layout
and returns the raw values it wrote as ``{stem: (H, W) array}`` (for ADE20K-847 the full-release
class values ``(R // 10) * 256 + G``), so that tests can build expectations by hand.
"""

from __future__ import annotations

import os
import pickle
from typing import Dict, Sequence

import numpy as np
from PIL import Image

from fixtures_benchmarks import tiled_label, write_image, write_label, write_voc_fixture

Raw = Dict[str, np.ndarray]

# ADE20K-150: 0 = other (ignored), both ends of 1..150
ADE150_RAW_VALUES = (0, 1, 2, 75, 150)
ADE150_VAL = ("ADE_val_00000001", "ADE_val_00000002")

# ADE20K-847: full-release values. 2978 wall (class 0), 312 building (1), 3148 adding machine
# (846, the last class), 14 airplane (94); 0 unlabelled and 5 (not among the 847) are ignored.
ADE847_FULL_VALUES = (0, 2978, 312, 3148, 14, 5)
ADE847_VAL = ("ADE_val_00000001", "ADE_val_00000002")  # 16x12, and 20x14
ADE847_LARGE = "ADE_val_00001999"  # 530x513: resized to 529x512
ADE847_TRAIN = "ADE_train_00000001"  # in the index, never prepared

# PASCAL Context LabelMap values: 0 unlabelled, 1 accordion (not in the 59), 2 aeroplane, 9 bag,
# 458 wood, 459 the last of the 459 classes
CONTEXT_FULL_VALUES = (0, 1, 2, 9, 458, 459)
CONTEXT_VAL = ("2008_000008", "2008_000015")
CONTEXT_NO_MAT = "2008_000019"  # in the val list, no .mat file: left out


def write_ade150_fixture(root: str, values: Sequence[int] = ADE150_RAW_VALUES) -> Raw:
    """ADEChallengeData2016/{images,annotations}/validation."""
    ade = os.path.join(root, "ADEChallengeData2016")
    raw = {}
    for k, stem in enumerate(ADE150_VAL):
        write_image(os.path.join(ade, "images", "validation", stem + ".jpg"), 12, k)
        label = tiled_label(values, 12, shift=k)
        write_label(os.path.join(ade, "annotations", "validation", stem + ".png"), label)
        raw[stem] = label
    return raw


def encode_ade_seg(values: np.ndarray, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 ``_seg.png`` whose ``(R // 10) * 256 + G`` is ``values``: R carries a
    0..9 remainder (dropped by // 10) and B random instance bits, as in the real files."""
    rng = np.random.default_rng(seed)
    r = (values // 256) * 10 + rng.integers(0, 10, values.shape)
    g = values % 256
    b = rng.integers(0, 256, values.shape)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def _write_ade_pair(release: str, folder: str, stem: str, values: np.ndarray, seed: int) -> None:
    path = os.path.join(os.path.dirname(release), folder)
    if not folder.startswith("ADE20K_2021_17_01"):
        path = os.path.join(release, folder)
    os.makedirs(path, exist_ok=True)
    h, w = values.shape
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(os.path.join(path, stem + ".jpg"), quality=95)
    Image.fromarray(encode_ade_seg(values, seed)).save(os.path.join(path, stem + "_seg.png"))


def write_ade847_fixture(root: str, large: bool = False) -> Raw:
    """ADE20K_2021_17_01 with index_ade20k.pkl, images and RGB ``_seg.png`` class maps.

    The first val image's folder is given relative to the datasets root (as in the real index),
    the second relative to the release folder; a training image is listed too. With ``large``,
    a 530x513 image (short side over 512) is added.
    """
    release = os.path.join(root, "ADE20K_2021_17_01")
    os.makedirs(release, exist_ok=True)
    entries = [
        ("ADE20K_2021_17_01/images/ADE/validation/cultural/abbey", ADE847_VAL[0], (12, 16)),
        ("images/ADE/validation/nature/zoo", ADE847_VAL[1], (14, 20)),
        ("ADE20K_2021_17_01/images/ADE/training/home/bedroom", ADE847_TRAIN, (8, 8)),
    ]
    if large:
        entries.append(
            ("ADE20K_2021_17_01/images/ADE/validation/cultural/abbey", ADE847_LARGE, (513, 530))
        )
    raw = {}
    for k, (folder, stem, (h, w)) in enumerate(entries):
        if stem == ADE847_LARGE:  # four quadrants: nearest resizing keeps their values
            values = np.zeros((h, w), dtype=np.int64)
            values[: h // 2, : w // 2] = 2978
            values[: h // 2, w // 2 :] = 312
            values[h // 2 :, : w // 2] = 3148
        else:
            flat = np.resize(np.asarray(ADE847_FULL_VALUES, dtype=np.int64), h * w)
            values = np.roll(flat, k).reshape(h, w)
        _write_ade_pair(release, folder, stem, values, k)
        raw[stem] = values
    index = {
        "folder": [e[0] for e in entries],
        "filename": [e[1] + ".jpg" for e in entries],
        "objectnames": ["-"] * 3688,  # present in the real index; not read
    }
    with open(os.path.join(release, "index_ade20k.pkl"), "wb") as f:
        pickle.dump(index, f)
    return raw


def write_labels_txt(path: str, names: Sequence[str]) -> None:
    """labels.txt of the full release: ``k: name`` lines, names without spaces."""
    with open(path, "w") as f:
        f.write("".join(f"{k}: {n.replace(' ', '')}\n" for k, n in enumerate(names, 1)))


def write_pcontext_full_fixture(root: str, names459: Sequence[str]) -> Raw:
    """VOCdevkit/VOC2010 with JPEGImages, trainval/*.mat (LabelMap), labels.txt and the val list."""
    from scipy.io import savemat

    context = os.path.join(root, "VOCdevkit", "VOC2010")
    os.makedirs(os.path.join(context, "trainval"), exist_ok=True)
    raw = {}
    for k, stem in enumerate(CONTEXT_VAL):
        write_image(os.path.join(context, "JPEGImages", stem + ".jpg"), 10, k)
        flat = np.resize(np.asarray(CONTEXT_FULL_VALUES, dtype=np.uint16), 100)
        label = np.roll(flat, k).reshape(10, 10)
        savemat(os.path.join(context, "trainval", stem + ".mat"), {"LabelMap": label})
        raw[stem] = label
    write_image(os.path.join(context, "JPEGImages", CONTEXT_NO_MAT + ".jpg"), 10, 9)
    with open(os.path.join(context, "pascalcontext_val.txt"), "w") as f:
        f.write("".join(s + "\n" for s in (*CONTEXT_VAL, CONTEXT_NO_MAT)))
    write_labels_txt(os.path.join(context, "labels.txt"), names459)
    return raw


def write_voc_val_fixture(root: str) -> Raw:
    """VOCdevkit/VOC2012 (palette SegmentationClass, val.txt): fixtures_benchmarks' VOC."""
    return write_voc_fixture(root)["val"]
