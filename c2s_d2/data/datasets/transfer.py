"""Registration of the open-vocabulary transfer sets (evaluation only).

A model trained on COCO-Stuff is evaluated by the field on five other datasets, with every class
of the set as the vocabulary (no seen/unseen split: ``unseen_class_ids`` is empty and the
headline number is mIoU):

==========================  =======  ======  ==================================================
registered name             classes  ignore  prepared by
==========================  =======  ======  ==================================================
``c2s_ade20k_150_val``      150      255     ``datasets/prepare_ade20k_150.py``
``c2s_ade20k_847_val``      847      65535   ``datasets/prepare_ade20k_847.py`` (16-bit labels)
``c2s_pcontext_459_val``    459      65535   ``datasets/prepare_pcontext_full.py`` (16-bit)
``c2s_pcontext_59_val``     59       255     ``datasets/prepare_pcontext_full.py``
``c2s_voc20_val``           20       255     ``datasets/prepare_voc_transfer.py``
``c2s_voc21_val``           21       255     ``datasets/prepare_voc_transfer.py --with-bg``
==========================  =======  ======  ==================================================

Class names come from ``ade20k_150.json``, ``ade20k_847.json`` and ``pcontext_459.json`` beside
this module (each names its source among the peers), and from ``pcontext.json`` / ``voc.json``
for Context-59 and VOC (VOC-21 adds "background" as class 0). Sets with more than 254 classes
store 16-bit label PNGs whose ignore label is 65535: the metadata's ``ignore_label`` says which,
and the mapper and evaluator read it from there.

Lazy like ``builtin_benchmarks``: registering reads only the small class files; the datasets
root (``$DETECTRON2_DATASETS``, default ``"datasets"``) is read when records are loaded, and a
missing folder or split list raises ``DatasetNotPreparedError`` naming it and the command to run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..zero_shot import EVALUATOR_TYPE
from .builtin_benchmarks import dataset_root, load_class_data, prepared_records

_DATA_DIR = os.path.dirname(os.path.abspath(__file__))
IGNORE_8 = 255
IGNORE_16 = 65535
BACKGROUND = "background"


@dataclass(frozen=True)
class TransferSet:
    """One registered transfer set; paths are relative to the datasets root."""

    name: str
    classes: str  # class data: a JSON of this folder, or "voc21" = "background" + voc.json
    prepare: str  # the command (relative to the repository) that prepares it
    image_dir: str
    label_dir: str
    list_file: str  # image stems, one a line, written last by the prepare script

    @property
    def ignore_label(self) -> int:
        return IGNORE_8 if len(load_transfer_class_names(self.classes)[0]) < 255 else IGNORE_16


_ADE = "ADEChallengeData2016"
_ADE_FULL = "ADE20K_2021_17_01"
_VOC = "VOCdevkit/VOC2012"
_CONTEXT = "VOCdevkit/VOC2010"
TRANSFER_SETS: Tuple[TransferSet, ...] = (
    TransferSet(
        "c2s_ade20k_150_val",
        "ade20k_150",
        "datasets/prepare_ade20k_150.py",
        f"{_ADE}/images/validation",
        f"{_ADE}/annotations_detectron2/validation",
        f"{_ADE}/annotations_detectron2/validation.txt",
    ),
    TransferSet(
        "c2s_ade20k_847_val",
        "ade20k_847",
        "datasets/prepare_ade20k_847.py",
        f"{_ADE_FULL}/images_detectron2/validation",
        f"{_ADE_FULL}/annotations_detectron2/validation",
        f"{_ADE_FULL}/annotations_detectron2/validation.txt",
    ),
    TransferSet(
        "c2s_pcontext_459_val",
        "pcontext_459",
        "datasets/prepare_pcontext_full.py",
        f"{_CONTEXT}/JPEGImages",
        f"{_CONTEXT}/annotations_detectron2/pc459_val",
        f"{_CONTEXT}/annotations_detectron2/pc459_val.txt",
    ),
    TransferSet(
        "c2s_pcontext_59_val",
        "pcontext",
        "datasets/prepare_pcontext_full.py",
        f"{_CONTEXT}/JPEGImages",
        f"{_CONTEXT}/annotations_detectron2/pc59_full_val",
        f"{_CONTEXT}/annotations_detectron2/pc59_full_val.txt",
    ),
    TransferSet(
        "c2s_voc20_val",
        "voc",
        "datasets/prepare_voc_transfer.py",
        f"{_VOC}/JPEGImages",
        f"{_VOC}/annotations_detectron2/voc20_val",
        f"{_VOC}/annotations_detectron2/voc20_val.txt",
    ),
    TransferSet(
        "c2s_voc21_val",
        "voc21",
        "datasets/prepare_voc_transfer.py --with-bg",
        f"{_VOC}/JPEGImages",
        f"{_VOC}/annotations_detectron2/voc21_val",
        f"{_VOC}/annotations_detectron2/voc21_val.txt",
    ),
)


@lru_cache(maxsize=None)
def load_transfer_class_names(
    classes: str,
) -> Tuple[Tuple[str, ...], Tuple[Tuple[str, ...], ...]]:
    """(class names, text names per class) of a transfer set's class data, validated.

    ``"pcontext"`` and ``"voc"`` are the zero-shot benchmarks' files (their split is not used
    here); ``"voc21"`` is "background" followed by the 20 VOC classes.
    """
    if classes in ("pcontext", "voc"):
        data = load_class_data(classes)
        return data.class_names, data.text_names
    if classes == "voc21":
        names, texts = load_transfer_class_names("voc")
        return (BACKGROUND,) + names, ((BACKGROUND,),) + texts
    path = os.path.join(_DATA_DIR, classes + ".json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    entries = data["classes"]
    if [c.get("id") for c in entries] != list(range(len(entries))):
        raise ValueError(f"class data file {path}: 'classes' must list ids 0..C-1 in order")
    if len(entries) != data.get("num_classes"):
        raise ValueError(
            f"class data file {path}: {len(entries)} classes, num_classes={data.get('num_classes')}"
        )
    names = tuple(c["name"] for c in entries)
    if len(set(names)) != len(names) or not all(n.strip() == n and n for n in names):
        raise ValueError(f"class data file {path}: names must be distinct and trimmed")
    texts = tuple(tuple(c.get("text_names") or [c["name"]]) for c in entries)
    return names, texts


def load_transfer_records(split: TransferSet) -> List[Dict]:
    """Detectron2 dicts (``file_name``, ``sem_seg_file_name``, ``image_id``) of a prepared set."""
    hint = f"run: python {split.prepare} --root {dataset_root()}"
    return prepared_records(split.image_dir, split.label_dir, split.list_file, hint)


def register_transfer_sets(sets: Optional[Tuple[TransferSet, ...]] = None) -> List[str]:
    """Register every transfer set not yet registered; returns the new names."""
    registered = set(DatasetCatalog.list())
    root = dataset_root()
    new = []
    for split in TRANSFER_SETS if sets is None else sets:
        if split.name in registered:
            continue
        names, texts = load_transfer_class_names(split.classes)
        DatasetCatalog.register(split.name, lambda split=split: load_transfer_records(split))
        MetadataCatalog.get(split.name).set(
            stuff_classes=list(names),
            text_names=[list(t) for t in texts],
            seen_class_ids=list(range(len(names))),  # transfer: every class is evaluated
            unseen_class_ids=[],
            ignore_label=split.ignore_label,
            evaluator_type=EVALUATOR_TYPE,
            zero_shot_split="eval",
            transfer=True,
            image_root=os.path.join(root, split.image_dir),
            sem_seg_root=os.path.join(root, split.label_dir),
            benchmark=split.classes,
        )
        new.append(split.name)
    return new


register_transfer_sets()
