"""Registration of the real zero-shot benchmarks: COCO-Stuff 164K, PASCAL VOC 2012, PASCAL Context.

Each dataset is registered twice (see ``c2s_d2.data.zero_shot``): ``c2s_<dataset>_train``, the
inductive training set (seen classes only), and ``c2s_<dataset>_val``, the evaluation set (all
classes). Class names, text synonyms and the unseen ids come from one data file per dataset,
``<dataset>.json`` beside this module, checked when read.

Lazy: registering reads only those small package files. The datasets root is read from
``$DETECTRON2_DATASETS`` (default ``"datasets"``) when records are loaded; a missing folder or
split list raises ``DatasetNotPreparedError`` naming it and the prepare command. The metadata's
``image_root`` / ``sem_seg_root`` are resolved at registration time and are informative only.

Prepared layouts (written by ``datasets/prepare_<dataset>.py``; see datasets/README.md)::

    coco/{train2017,val2017}/*.jpg + coco/stuffthingmaps_detectron2/{train2017,val2017}/*.png
    VOCdevkit/VOC2012/JPEGImages/*.jpg + VOCdevkit/VOC2012/annotations_detectron2/{train_aug,val}
    VOCdevkit/VOC2010/JPEGImages/*.jpg + VOCdevkit/VOC2010/annotations_detectron2/pc59_{train,val}
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog

from ..zero_shot import (
    DatasetNotPreparedError,
    check_class_split,
    list_image_label_pairs,
    register_zero_shot_sem_seg,
)

_DATA_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class ClassData:
    """The classes of one benchmark, index = dataset id."""

    class_names: Tuple[str, ...]
    text_names: Tuple[Tuple[str, ...], ...]
    unseen_ids: Tuple[int, ...]
    raw_ids: Optional[Tuple[int, ...]] = None  # COCO-Stuff only: raw stuffthingmaps value per class


@dataclass(frozen=True)
class BenchmarkSplit:
    """One registered split; paths are relative to the datasets root."""

    name: str
    dataset: str  # "coco_stuff", "voc" or "pcontext": the JSON file and prepare script
    zero_shot_split: str  # "train" (inductive, seen classes only) or "eval"
    image_dir: str
    label_dir: str
    list_file: Optional[str] = None  # image stems, one a line; None: every image of image_dir


_VOC = "VOCdevkit/VOC2012"
_CONTEXT = "VOCdevkit/VOC2010"
BENCHMARK_SPLITS: Tuple[BenchmarkSplit, ...] = (
    BenchmarkSplit(
        "c2s_coco_stuff_train",
        "coco_stuff",
        "train",
        "coco/train2017",
        "coco/stuffthingmaps_detectron2/train2017",
    ),
    BenchmarkSplit(
        "c2s_coco_stuff_val",
        "coco_stuff",
        "eval",
        "coco/val2017",
        "coco/stuffthingmaps_detectron2/val2017",
    ),
    BenchmarkSplit(
        "c2s_voc_train",
        "voc",
        "train",
        f"{_VOC}/JPEGImages",
        f"{_VOC}/annotations_detectron2/train_aug",
        f"{_VOC}/annotations_detectron2/train_aug.txt",
    ),
    BenchmarkSplit(
        "c2s_voc_val",
        "voc",
        "eval",
        f"{_VOC}/JPEGImages",
        f"{_VOC}/annotations_detectron2/val",
        f"{_VOC}/annotations_detectron2/val.txt",
    ),
    BenchmarkSplit(
        "c2s_pcontext_train",
        "pcontext",
        "train",
        f"{_CONTEXT}/JPEGImages",
        f"{_CONTEXT}/annotations_detectron2/pc59_train",
        f"{_CONTEXT}/ImageSets/SegmentationContext/train.txt",
    ),
    BenchmarkSplit(
        "c2s_pcontext_val",
        "pcontext",
        "eval",
        f"{_CONTEXT}/JPEGImages",
        f"{_CONTEXT}/annotations_detectron2/pc59_val",
        f"{_CONTEXT}/ImageSets/SegmentationContext/val.txt",
    ),
)

# Spellings that need more than a suffix rule to read as English.
_COMPOUND_WORDS = {
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "diningtable": "dining table",
    "playingfield": "playing field",
    "waterdrops": "water drops",
    "bedclothes": "bed clothes",
}
_MATERIALS = {"brick", "concrete", "marble", "stone", "tile", "wood"}


def dataset_root() -> str:
    """The datasets root, read from the environment at call time (detectron2's convention)."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def prepare_command(dataset: str) -> str:
    """The command that prepares ``dataset`` under the current datasets root."""
    return f"python datasets/prepare_{dataset}.py --root {dataset_root()}"


def readable_class_name(name: str) -> str:
    """An English reading of a dataset class name, for the text encoder.

    Examples: "tree-merged" -> "tree", "building-other" -> "building", "desk-stuff" -> "desk",
    "wall-concrete" -> "concrete wall", "window-blind" -> "window blind",
    "pottedplant" -> "potted plant".
    """
    base = re.sub(r"(-(merged|other|stuff))+$", "", name)
    parts = base.split("-")
    if len(parts) == 2 and parts[1] in _MATERIALS:  # COCO-Stuff "<thing>-<material>"
        parts = parts[::-1]
    return " ".join(_COMPOUND_WORDS.get(p, p) for p in parts)


def _class_data_error(path: str, what: str) -> ValueError:
    return ValueError(f"class data file {path}: {what}")


@lru_cache(maxsize=None)
def load_class_data(dataset: str) -> ClassData:
    """Read and validate ``<dataset>.json``: ids 0..C-1 in order, unseen ids match unseen names.

    A class without ``text_names`` gets ``[readable_class_name(name)]``.
    """
    path = os.path.join(_DATA_DIR, dataset + ".json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    classes = data["classes"]
    if [c.get("id") for c in classes] != list(range(len(classes))):
        raise _class_data_error(path, "'classes' must list ids 0..C-1 in order")
    if len(classes) != data.get("num_classes"):
        raise _class_data_error(
            path, f"{len(classes)} classes, num_classes={data.get('num_classes')}"
        )
    names = tuple(c["name"] for c in classes)
    unseen = tuple(int(i) for i in data["unseen_ids"])
    check_class_split(names, unseen)
    named = [names[i] for i in unseen]
    if named != list(data["unseen_names"]):
        raise _class_data_error(
            path, f"unseen_ids name {named}, unseen_names say {data['unseen_names']}"
        )
    text_names = []
    for c in classes:
        synonyms = c.get("text_names") or [readable_class_name(c["name"])]
        if not all(isinstance(s, str) and s.strip() for s in synonyms):
            raise _class_data_error(path, f"class {c['name']!r}: empty or non-text synonym")
        text_names.append(tuple(synonyms))
    raw_ids = None
    if any("raw_id" in c for c in classes):
        raw_ids = tuple(int(c["raw_id"]) for c in classes)
        if len(set(raw_ids)) != len(raw_ids):
            raise _class_data_error(path, "raw_id values are not distinct")
    return ClassData(names, tuple(text_names), unseen, raw_ids)


def load_benchmark_records(split: BenchmarkSplit) -> List[Dict]:
    """Detectron2 dicts of a prepared split (``file_name``, ``sem_seg_file_name``, ``image_id``).

    Raises ``DatasetNotPreparedError`` naming the missing folder or list, with the prepare command.
    """
    return prepared_records(
        split.image_dir, split.label_dir, split.list_file, f"run: {prepare_command(split.dataset)}"
    )


def prepared_records(
    image_dir: str, label_dir: str, list_file: Optional[str], hint: str
) -> List[Dict]:
    """Image/label pairs of a prepared split under the datasets root (folders and optional list
    of stems relative to it); ``DatasetNotPreparedError`` naming what is missing, with ``hint``."""
    root = dataset_root()
    stems = None
    if list_file is not None:
        list_path = os.path.join(root, list_file)
        if not os.path.isfile(list_path):
            raise DatasetNotPreparedError(f"split list not found: {list_path} ({hint})")
        with open(list_path, encoding="utf-8") as f:
            stems = [line.split()[0] for line in f if line.strip()]
    return list_image_label_pairs(
        os.path.join(root, image_dir), os.path.join(root, label_dir), stems=stems, prepare_hint=hint
    )


def register_all_benchmarks() -> List[str]:
    """Register every split of ``BENCHMARK_SPLITS`` not yet registered; returns the new names."""
    registered = set(DatasetCatalog.list())
    root = dataset_root()
    new = []
    for split in BENCHMARK_SPLITS:
        if split.name in registered:
            continue
        data = load_class_data(split.dataset)
        register_zero_shot_sem_seg(
            split.name,
            load_records=lambda split=split: load_benchmark_records(split),
            class_names=data.class_names,
            unseen_ids=data.unseen_ids,
            split=split.zero_shot_split,
            text_names=data.text_names,
            image_root=os.path.join(root, split.image_dir),
            sem_seg_root=os.path.join(root, split.label_dir),
            benchmark=split.dataset,
        )
        new.append(split.name)
    return new


register_all_benchmarks()
