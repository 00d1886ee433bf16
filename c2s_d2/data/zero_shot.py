"""The zero-shot registration convention shared by every dataset of c2s-d2.

A dataset with classes ``0..C-1`` (its own ids, as stored in its label PNGs, 255 = ignore) and a
list of unseen ids is registered twice:

* an **evaluation set** whose metadata lists every class (``stuff_classes``), with
  ``seen_class_ids`` / ``unseen_class_ids`` so that one evaluator serves every split;
* a **training set** in the inductive setting whose metadata lists the *seen classes only*:
  ``stuff_classes`` holds the seen names (in dataset order), and ``label_lut`` maps every dataset
  id to its training id (its index among the seen classes) or to 255 for unseen ids. Unseen names
  therefore never appear in anything the training side reads, and unseen pixels become 255 in the
  mapper before anything reaches the model.

Metadata keys (both kinds): ``stuff_classes``, ``text_names`` (list of synonym lists, used by
the text encoder; the evaluator reports ``stuff_classes``), ``seen_class_ids``,
``unseen_class_ids``, ``ignore_label`` (255), ``evaluator_type`` (``"c2s_sem_seg"``),
``zero_shot_split`` (``"train"`` or ``"eval"``), ``image_root``, ``sem_seg_root``.
Training sets also carry ``label_lut`` and ``num_dataset_classes``.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

IGNORE_LABEL = 255
EVALUATOR_TYPE = "c2s_sem_seg"
# "inductive": unseen pixels become 255 and unseen names never reach training;
# "inductive_strict": besides, training images holding any unseen pixel are dropped.
ZERO_SHOT_SETTINGS = ("inductive", "inductive_strict")


class DatasetNotPreparedError(FileNotFoundError):
    """A registered dataset's folder or file is missing on disk."""


def check_class_split(class_names: Sequence[str], unseen_ids: Sequence[int]) -> List[int]:
    """Validate a split and return the seen ids (sorted)."""
    n = len(class_names)
    if n == 0 or n >= IGNORE_LABEL:
        raise ValueError(f"a dataset needs 1..254 classes, got {n}")
    if len(set(class_names)) != n:
        dup = sorted({c for c in class_names if list(class_names).count(c) > 1})
        raise ValueError(f"duplicate class names: {dup}")
    bad = [i for i in unseen_ids if not 0 <= int(i) < n]
    if bad:
        raise ValueError(f"unseen ids {bad} outside 0..{n - 1}")
    unseen = set(int(i) for i in unseen_ids)
    return [i for i in range(n) if i not in unseen]


def build_label_lut(num_classes: int, keep_ids: Sequence[int]) -> np.ndarray:
    """LUT over 0..255: ``keep_ids[j] -> j``, other class ids -> 255, 255 -> 255.

    Ids >= ``num_classes`` (other than 255) map to -1 so that the mapper can refuse them.
    """
    lut = np.full(256, -1, dtype=np.int16)
    lut[:num_classes] = IGNORE_LABEL
    lut[IGNORE_LABEL] = IGNORE_LABEL
    for j, i in enumerate(keep_ids):
        lut[int(i)] = j
    return lut


def apply_label_lut(label: np.ndarray, lut: np.ndarray, file_name: str = "<label>") -> np.ndarray:
    """Map a uint8 label map through ``lut``; refuse ids outside the class range.

    Returns a uint8 array with training ids and 255.
    """
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"{file_name}: label values outside 0..255")
        label = label.astype(np.uint8)
    out = np.asarray(lut)[label]
    if (out < 0).any():
        bad = sorted(set(np.unique(label[out < 0]).tolist()))
        n_valid = int((np.asarray(lut)[:255] >= 0).sum())
        raise ValueError(
            f"{file_name}: label ids {bad} outside the class range 0..{n_valid - 1} (or 255)"
        )
    return out.astype(np.uint8)


def list_image_label_pairs(
    image_root: str,
    sem_seg_root: str,
    image_ext: str = ".jpg",
    label_ext: str = ".png",
    stems: Optional[Sequence[str]] = None,
    prepare_hint: str = "",
) -> List[Dict]:
    """Pair images and labels by file stem.

    Raises ``DatasetNotPreparedError`` naming the missing folder (with ``prepare_hint``) or the
    first image without a label.
    """
    hint = f" ({prepare_hint})" if prepare_hint else ""
    for folder in (image_root, sem_seg_root):
        if not os.path.isdir(folder):
            raise DatasetNotPreparedError(f"dataset folder not found: {folder}{hint}")
    if stems is None:
        stems = sorted(
            f[: -len(image_ext)] for f in os.listdir(image_root) if f.endswith(image_ext)
        )
    if len(stems) == 0:
        raise DatasetNotPreparedError(f"no '*{image_ext}' images in {image_root}{hint}")
    records = []
    for stem in stems:
        img = os.path.join(image_root, stem + image_ext)
        lab = os.path.join(sem_seg_root, stem + label_ext)
        if not os.path.isfile(img):
            raise DatasetNotPreparedError(f"image not found: {img}{hint}")
        if not os.path.isfile(lab):
            raise DatasetNotPreparedError(f"label not found for image {img}: {lab}{hint}")
        records.append({"file_name": img, "sem_seg_file_name": lab, "image_id": stem})
    return records


def register_zero_shot_sem_seg(
    name: str,
    *,
    load_records: Callable[[], List[Dict]],
    class_names: Sequence[str],
    unseen_ids: Sequence[int],
    split: str,
    text_names: Optional[Sequence[Sequence[str]]] = None,
    image_root: str = "",
    sem_seg_root: str = "",
    **extra_metadata,
) -> None:
    """Register one zero-shot semantic-segmentation dataset (lazily: no disk access here).

    Args:
        name: registered name (ours; must not clash with detectron2's built-ins).
        load_records: returns detectron2 dicts with ``file_name``, ``sem_seg_file_name``
            (labels in dataset ids) and ``image_id``; called only when the dataset is used.
        class_names: the dataset's own class names, index = dataset id.
        unseen_ids: dataset ids of the unseen classes.
        split: ``"train"`` (inductive training set: seen classes only) or ``"eval"``.
        text_names: per class, the names given to the text encoder (synonyms averaged);
            defaults to ``[[name] for name in class_names]``.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    seen_ids = check_class_split(class_names, unseen_ids)
    unseen = sorted(int(i) for i in unseen_ids)
    if text_names is None:
        text_names = [[c] for c in class_names]
    if len(text_names) != len(class_names):
        raise ValueError(f"{name}: {len(text_names)} text names for {len(class_names)} classes")
    text_names = [list(t) if not isinstance(t, str) else [t] for t in text_names]

    DatasetCatalog.register(name, load_records)
    meta = MetadataCatalog.get(name)
    common = dict(
        ignore_label=IGNORE_LABEL,
        evaluator_type=EVALUATOR_TYPE,
        zero_shot_split=split,
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        **extra_metadata,
    )
    if split == "eval":
        meta.set(
            stuff_classes=list(class_names),
            text_names=text_names,
            seen_class_ids=seen_ids,
            unseen_class_ids=unseen,
            **common,
        )
    else:
        # Only seen names are stored: unseen names cannot leak into training through metadata.
        meta.set(
            stuff_classes=[class_names[i] for i in seen_ids],
            text_names=[text_names[i] for i in seen_ids],
            seen_class_ids=list(range(len(seen_ids))),
            unseen_class_ids=[],
            num_dataset_classes=len(class_names),
            label_lut=build_label_lut(len(class_names), seen_ids).tolist(),
            **common,
        )


def unseen_dataset_ids(label_lut: Sequence[int], num_dataset_classes: int) -> List[int]:
    """Dataset ids that a training LUT sends to 255: the unseen classes."""
    lut = np.asarray(label_lut)
    return [i for i in range(int(num_dataset_classes)) if int(lut[i]) == IGNORE_LABEL]


def _has_unseen_pixel(label_file: str, unseen: np.ndarray) -> bool:
    from PIL import Image  # as the mapper reads labels: a palette PNG gives its indices

    try:
        with Image.open(label_file) as img:
            label = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read label file {label_file}: {e}") from e
    return bool(np.isin(label, unseen).any())


def drop_images_with_unseen_pixels(
    records: List[Dict], unseen_ids: Sequence[int], num_threads: int = 4
) -> List[Dict]:
    """The strict inductive setting: keep only records whose label (dataset ids, as stored on
    disk) holds no pixel of an unseen class. Reads every label once (threads)."""
    from concurrent.futures import ThreadPoolExecutor

    unseen = np.asarray(sorted(int(i) for i in unseen_ids), dtype=np.int64)
    if unseen.size == 0:
        return list(records)
    files = [r["sem_seg_file_name"] for r in records]
    with ThreadPoolExecutor(max_workers=max(1, int(num_threads))) as pool:
        flags = list(pool.map(lambda f: _has_unseen_pixel(f, unseen), files))
    return [r for r, bad in zip(records, flags) if not bad]
