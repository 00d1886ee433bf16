"""Training mapper for zero-shot semantic segmentation.

Reads image + label, maps dataset ids to training ids through the training set's ``label_lut``
(unseen ids -> 255 in the inductive setting, before anything reaches the model), applies random
resize / crop / flip, and builds per-class instance targets for mask classification.
"""

from __future__ import annotations

import copy
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances
from PIL import UnidentifiedImageError

from .teacher_cache import open_teacher_cache_from_cfg
from .zero_shot import IGNORE_LABEL, ZERO_SHOT_SETTINGS, apply_label_lut

__all__ = [
    "C2SSemanticDatasetMapper",
    "check_label_size",
    "read_image_checked",
    "read_label_checked",
]

logger = logging.getLogger(__name__)


def read_image_checked(file_name: str, fmt: str) -> np.ndarray:
    """Read an image; an unreadable file raises ``ValueError`` naming it."""
    try:
        return utils.read_image(file_name, format=fmt)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {file_name}: {e}") from e


def read_label_checked(file_name: str) -> np.ndarray:
    """Read a single-channel label PNG as [H, W]; refuse unreadable or multi-channel files.

    8-bit labels come back as uint8. 16-bit labels (sets with more than 254 classes, ignore label
    65535) come back as float32, which holds every 16-bit value exactly: detectron2's resize
    takes float arrays but not uint16 or int32 ones.
    """
    try:
        label = utils.read_image(file_name)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read label {file_name}: {e}") from e
    if label.ndim != 2:
        raise ValueError(f"label {file_name} has shape {label.shape}; expected a single channel")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 65535):
            raise ValueError(f"label {file_name} holds values outside 0..65535")
        label = label.astype(np.float32)
    return label


def check_label_size(file_name: str, image: np.ndarray, label_file: str, label: np.ndarray) -> None:
    """Refuse a label [H, W] whose size differs from its image [H, W, 3], naming both files."""
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"image/label size mismatch: {file_name} is {image.shape[1]}x{image.shape[0]}, "
            f"{label_file} is {label.shape[1]}x{label.shape[0]}"
        )


class C2SSemanticDatasetMapper:
    """Map a dataset dict to the student's training inputs, or (``is_train=False``) to its
    evaluation inputs.

    Training output keys: ``image`` (uint8 [3, H, W] in ``image_format``), ``sem_seg`` (long
    [H, W], training ids, 255 ignore) and ``instances`` (``gt_classes`` [n], ``gt_masks``
    [n, H, W]): one instance per class present.

    Evaluation output: what detectron2's ``DatasetMapper(cfg, False)`` gives (``image`` resized to
    ``INPUT.MIN_SIZE_TEST``, ``height`` / ``width`` of the file, ``sem_seg`` [H, W] dataset ids),
    after the checks of training: unreadable or truncated files and a label whose size differs
    from its image are errors naming the file.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        label_lut: Optional[np.ndarray],
        size_divisibility: int = -1,
        teacher_cache=None,
    ):
        """
        Args:
            is_train: training mode; False: evaluation inputs (no label mapping, no padding).
            augmentations: detectron2 augmentations applied to image and label together.
            image_format: image format for ``read_image`` ("RGB" or "BGR").
            label_lut: int array of 256 entries mapping dataset ids to training ids
                (``-1`` = outside the class range); ``None`` keeps labels as they are.
            size_divisibility: pad to a multiple of this (-1: no padding here).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.label_lut = None if label_lut is None else np.asarray(label_lut, dtype=np.int16)
        self.size_divisibility = size_divisibility
        # c2s_d2.data.teacher_cache.TeacherFeatureCache: adds "teacher_cache" to training inputs
        self.teacher_cache = teacher_cache
        logger.info(f"[C2SSemanticDatasetMapper] augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        if not is_train:  # detectron2's test-time resize; the evaluator maps the labels itself
            return {
                "is_train": False,
                "augmentations": [
                    T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
                ],
                "image_format": cfg.INPUT.FORMAT,
                "label_lut": None,
            }
        augs = [
            T.ResizeShortestEdge(
                cfg.INPUT.MIN_SIZE_TRAIN,
                cfg.INPUT.MAX_SIZE_TRAIN,
                cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            )
        ]
        if cfg.INPUT.CROP.ENABLED:
            augs.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE,
                    cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                    IGNORE_LABEL,
                )
            )
        if cfg.INPUT.COLOR_AUG_SSD:
            augs.append(T.RandomBrightness(0.875, 1.125))
            augs.append(T.RandomContrast(0.5, 1.5))
            augs.append(T.RandomSaturation(0.5, 1.5))
        if cfg.INPUT.RANDOM_FLIP != "none":
            augs.append(
                T.RandomFlip(
                    horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                    vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
                )
            )
        lut = training_label_lut(cfg.DATASETS.TRAIN, cfg.DATASETS.ZERO_SHOT_SETTING)
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "label_lut": lut,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "teacher_cache": open_teacher_cache_from_cfg(cfg),
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        if not self.is_train:
            return self._evaluation_inputs(dataset_dict)
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image = read_image_checked(file_name, self.image_format)
        label_file = dataset_dict.get("sem_seg_file_name")
        if label_file is None:
            raise ValueError(f"image {file_name} has no label (sem_seg_file_name) in its record")
        label = read_label_checked(label_file)
        check_label_size(file_name, image, label_file, label)
        if self.label_lut is not None:
            label = apply_label_lut(label, self.label_lut, label_file)

        source_hw = image.shape[:2]
        aug_input = T.AugInput(image, sem_seg=label)
        transforms = self.augmentations(aug_input)
        image, label = aug_input.image, aug_input.sem_seg
        if self.teacher_cache is not None:  # the same resize / crop / flip as the image
            dataset_dict["teacher_cache"] = self.teacher_cache.lookup(
                file_name, transforms, source_hw
            )

        image_t = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        label_t = torch.as_tensor(label.astype(np.int64))
        # the true size: padding below is not an ignored area (the distiller excludes it)
        dataset_dict["unpadded_size"] = tuple(int(v) for v in image_t.shape[-2:])
        if self.size_divisibility > 0:
            h, w = image_t.shape[-2:]
            ph = (self.size_divisibility - h % self.size_divisibility) % self.size_divisibility
            pw = (self.size_divisibility - w % self.size_divisibility) % self.size_divisibility
            image_t = torch.nn.functional.pad(image_t, (0, pw, 0, ph), value=128)
            label_t = torch.nn.functional.pad(label_t, (0, pw, 0, ph), value=IGNORE_LABEL)

        dataset_dict["image"] = image_t
        dataset_dict["sem_seg"] = label_t
        dataset_dict["instances"] = semantic_to_instances(label_t)
        return dataset_dict

    def _evaluation_inputs(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image = read_image_checked(file_name, self.image_format)
        h, w = image.shape[:2]
        if (dataset_dict.setdefault("height", h), dataset_dict.setdefault("width", w)) != (h, w):
            raise ValueError(
                f"image {file_name} is {w}x{h}, its dataset record says "
                f"{dataset_dict['width']}x{dataset_dict['height']}"
            )
        # the evaluator reads the label again, from the catalog (as after detectron2's mapper)
        label_file = dataset_dict.pop("sem_seg_file_name", None)
        label = None
        if label_file is not None:
            label = read_label_checked(label_file)
            check_label_size(file_name, image, label_file, label)
        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        dataset_dict["image"] = torch.as_tensor(
            np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))
        )
        if label is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        return dataset_dict


def semantic_to_instances(label: torch.Tensor) -> Instances:
    """One instance per class id present in ``label`` [H, W] (255 excluded)."""
    classes = torch.unique(label)
    classes = classes[classes != IGNORE_LABEL]
    inst = Instances(tuple(label.shape))
    inst.gt_classes = classes.to(torch.int64)
    if len(classes) == 0:
        masks = torch.zeros((0, *label.shape), dtype=torch.bool)
    else:
        masks = label[None] == classes[:, None, None]
    inst.gt_masks = BitMasks(masks).tensor
    return inst


def training_label_lut(train_names, setting: str) -> Optional[np.ndarray]:
    """The LUT shared by all training datasets (they must agree on the seen class list)."""
    if setting not in ZERO_SHOT_SETTINGS:
        raise ValueError(
            f"DATASETS.ZERO_SHOT_SETTING={setting!r}: expected one of {list(ZERO_SHOT_SETTINGS)} "
            "(unseen pixels ignored, unseen names never used; strict: images with unseen "
            "pixels dropped too)"
        )
    luts, classes = [], []
    for name in train_names:
        meta = MetadataCatalog.get(name)
        lut = meta.get("label_lut", None)
        if lut is None and meta.get("unseen_class_ids", []):
            raise ValueError(
                f"training dataset {name} is an evaluation split (it lists unseen ids)"
            )
        luts.append(None if lut is None else np.asarray(lut, dtype=np.int16))
        classes.append(tuple(meta.get("stuff_classes", [])))
    if len(set(classes)) > 1:
        raise ValueError(f"training datasets {list(train_names)} have different class lists")
    if not luts or luts[0] is None:
        return None
    if any(lut is None or not np.array_equal(lut, luts[0]) for lut in luts):
        raise ValueError(f"training datasets {list(train_names)} have different label mappings")
    return luts[0]
