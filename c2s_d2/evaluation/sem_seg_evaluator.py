"""Zero-shot semantic-segmentation evaluation: mIoU over seen, unseen and all classes, and hIoU.

One evaluator serves every split of a dataset registered with
:func:`c2s_d2.data.zero_shot.register_zero_shot_sem_seg`: the registered metadata is the single
source of truth for class names and for which dataset ids are seen or unseen.

Averaging policy of the main keys (``mIoU``, ``mIoU-seen``, ``mIoU-unseen``, ``hIoU``, ``mACC``,
``fwIoU``, ``IoU-<name>``), identical to detectron2's ``SemSegEvaluator``:

* a class with no ground-truth pixel is left out of every mean and gets no ``IoU-<name>`` key;
* a group (seen or unseen) with no ground-truth pixel at all reports ``float("nan")`` as its
  mean, and ``hIoU`` is then NaN too (a harmonic mean of a missing group is undefined);
* otherwise ``hIoU = 2 * S * U / (S + U)``, and 0 when ``S + U == 0``.

Two conventions: detectron2 and mmsegmentation
-----------------------------------------------
Zero-shot papers built on mmsegmentation (ZegCLIP-style tables) score a class that is *predicted
but absent from the ground truth* as IoU 0; detectron2 leaves it out. Both compute per-class
IoU = TP / (TP + FP + FN) from the confusion matrix summed over the whole dataset; they differ only
in which classes enter the mean:

* detectron2 (``detectron2/evaluation/sem_seg_evaluation.py``, ``SemSegEvaluator.evaluate``):
  ``acc_valid = pos_gt > 0``, ``iou_valid = acc_valid & (union > 0)``; ``mIoU`` averages IoU over
  the classes with at least one ground-truth pixel only.
* mmsegmentation (``mmseg/evaluation/metrics/iou_metric.py``, ``IoUMetric.total_area_to_metrics``,
  and ``mmseg/core/evaluation/metrics.py`` in 0.x, which ZegCLIP uses): ``IoU = intersect /
  union`` for every class, then ``np.nanmean``. A class absent from the ground truth but predicted
  somewhere has union > 0 and intersect 0: IoU 0, counted in the mean. A class neither present
  nor predicted has union 0: IoU NaN (0/0), skipped by ``nanmean``. ZegCLIP's seen / unseen
  means are ``nanmean`` over ``IoU[seen_idx]`` / ``IoU[unseen_idx]`` of that same array.

So ``mIoU_mmseg <= mIoU`` always (the extra classes add zeros), with equality exactly when no
class is predicted while absent from the ground truth; the same holds per group, except that a
group with no ground-truth pixel (NaN here) is 0 under mmseg when one of its classes is
predicted. Over a whole benchmark's evaluation set
every class is usually present and the two agree. Pixel accuracy (mmseg ``aAcc``) and mean class
accuracy (mmseg ``mAcc``: NaN where a class has no ground truth, skipped) are the same in both.
The mmseg-convention keys are ``mIoU_mmseg``, ``mIoU-seen_mmseg``, ``mIoU-unseen_mmseg`` and
``hIoU_mmseg`` (a group whose classes all have union 0 is NaN, as ``nanmean`` of nothing); the
log shows both conventions side by side.

In the saved metrics JSON, NaN is written as ``null`` so that the file stays strict JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image
from tabulate import tabulate

from c2s_d2.data.zero_shot import IGNORE_LABEL

logger = logging.getLogger(__name__)


def class_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Per-pixel class of the highest score: ``scores`` [C, H, W] -> int64 [H, W], exactly
    ``scores.argmax(dim=0)`` (the first class on ties, NaN counts as the largest).

    On CPU with many classes, a running maximum over the classes (three in-place passes over one
    [H, W] plane per class) replaces ``argmax(dim=0)``, whose strided reduction over the class
    axis is slow there: 847 classes at 512x512, one thread, 1.0 s instead of 2.5 s
    (``tools/benchmark_evaluator.py``). Elsewhere (CUDA, few classes) it is ``argmax``.
    """
    if scores.device.type != "cpu" or scores.shape[0] < 64 or scores.dtype != torch.float32:
        return scores.argmax(dim=0)
    best = scores[0].clone()
    index = torch.zeros(scores.shape[1:], dtype=torch.int64)
    higher = torch.empty(scores.shape[1:], dtype=torch.bool)
    for c in range(1, scores.shape[0]):
        torch.gt(scores[c], best, out=higher)
        torch.maximum(best, scores[c], out=best)
        index.masked_fill_(higher, c)
    if torch.isnan(best).any():  # maximum propagates NaN: let argmax place it as it does
        return scores.argmax(dim=0)
    return index


def class_iou_and_accuracy(conf: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class IoU and accuracy (fractions) from a confusion matrix.

    Args:
        conf: (C, C) pixel counts, rows = ground truth, columns = prediction.

    Returns:
        iou: (C,) float64, TP / (TP + FP + FN); NaN where the class has no ground-truth pixel.
        acc: (C,) float64, TP / (TP + FN); NaN where the class has no ground-truth pixel.
        present: (C,) bool, whether the class has at least one ground-truth pixel.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    pred = conf.sum(axis=0)
    present = gt > 0
    iou = np.full(conf.shape[0], np.nan)
    acc = np.full(conf.shape[0], np.nan)
    # Only present classes are divided: their denominators are > 0, so no warnings and no NaN leak.
    iou[present] = tp[present] / (gt[present] + pred[present] - tp[present])
    acc[present] = tp[present] / gt[present]
    return iou, acc, present


def mmseg_class_iou(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU in mmsegmentation's convention (``total_area_to_metrics``).

    Args:
        conf: (C, C) pixel counts, rows = ground truth, columns = prediction.

    Returns:
        (C,) float64 ``intersect / union``: 0 for a class predicted but absent from the ground
        truth, NaN only where the union is 0 (class neither present nor predicted).
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(axis=1) + conf.sum(axis=0) - tp
    iou = np.full(conf.shape[0], np.nan)
    scored = union > 0
    iou[scored] = tp[scored] / union[scored]
    return iou


def _group_mean(values: np.ndarray, present: np.ndarray, ids: Sequence[int]) -> float:
    """Mean of ``values`` over the ``ids`` that are present; NaN when none is."""
    keep = [i for i in ids if present[i]]
    return float(np.mean(values[keep])) if keep else float("nan")


def _harmonic_iou(seen: float, unseen: float) -> float:
    """``2 S U / (S + U)``; NaN when either group is NaN, 0 when ``S + U == 0``."""
    if math.isnan(seen) or math.isnan(unseen):
        return float("nan")
    if seen + unseen == 0:
        return 0.0
    return 2 * seen * unseen / (seen + unseen)


def compute_zero_shot_metrics(
    conf: np.ndarray,
    class_names: Sequence[str],
    seen_ids: Sequence[int],
    unseen_ids: Sequence[int],
) -> Dict[str, float]:
    """Zero-shot segmentation metrics, in percent, from a confusion matrix.

    Args:
        conf: (C, C) non-negative pixel counts, rows = ground truth, columns = prediction.
        class_names: C names; per-class keys are ``"IoU-<name>"``.
        seen_ids, unseen_ids: disjoint dataset ids in ``0..C-1``. Classes in neither group count
            in ``mIoU`` only.

    Returns:
        ``mIoU``, ``mIoU-seen``, ``mIoU-unseen``, ``hIoU``, ``pAcc``, ``fwIoU``, ``mACC`` (the
        detectron2 convention), ``mIoU_mmseg``, ``mIoU-seen_mmseg``, ``mIoU-unseen_mmseg``,
        ``hIoU_mmseg`` (the mmsegmentation convention) and ``IoU-<name>`` for every class with
        ground-truth pixels. See the module docstring for absent classes and empty groups (NaN).
    """
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be (C, C), got shape {conf.shape}")
    num_classes = conf.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class matrix")
    if (conf < 0).any():
        raise ValueError("confusion matrix has negative counts")
    seen = [int(i) for i in seen_ids]
    unseen = [int(i) for i in unseen_ids]
    bad = [i for i in seen + unseen if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"seen/unseen ids {bad} outside 0..{num_classes - 1}")
    both = sorted(set(seen) & set(unseen))
    if both:
        raise ValueError(f"ids {both} are both seen and unseen")

    iou, acc, present = class_iou_and_accuracy(conf)
    gt_pixels = conf.sum(axis=1).astype(np.float64)
    total = float(gt_pixels.sum())
    all_ids = list(range(num_classes))

    miou_seen = _group_mean(iou, present, seen)
    miou_unseen = _group_mean(iou, present, unseen)
    hiou = _harmonic_iou(miou_seen, miou_unseen)
    # mmsegmentation's convention: every class with union > 0 counts (see the module docstring).
    iou_mm = mmseg_class_iou(conf)
    scored_mm = ~np.isnan(iou_mm)
    mm_seen = _group_mean(iou_mm, scored_mm, seen)
    mm_unseen = _group_mean(iou_mm, scored_mm, unseen)

    if total > 0:
        pacc = float(np.trace(conf)) / total
        fwiou = float(np.sum(gt_pixels[present] / total * iou[present]))
    else:
        pacc = fwiou = float("nan")

    metrics: Dict[str, float] = OrderedDict()
    metrics["mIoU"] = 100 * _group_mean(iou, present, all_ids)
    metrics["mIoU-seen"] = 100 * miou_seen
    metrics["mIoU-unseen"] = 100 * miou_unseen
    metrics["hIoU"] = 100 * hiou
    metrics["pAcc"] = 100 * pacc
    metrics["fwIoU"] = 100 * fwiou
    metrics["mACC"] = 100 * _group_mean(acc, present, all_ids)
    metrics["mIoU_mmseg"] = 100 * _group_mean(iou_mm, scored_mm, all_ids)
    metrics["mIoU-seen_mmseg"] = 100 * mm_seen
    metrics["mIoU-unseen_mmseg"] = 100 * mm_unseen
    metrics["hIoU_mmseg"] = 100 * _harmonic_iou(mm_seen, mm_unseen)
    for i in all_ids:
        if present[i]:
            metrics[f"IoU-{class_names[i]}"] = 100 * float(iou[i])
    return metrics


def _atomic_write(path: str, write_fn, mode: str) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class C2SSemSegEvaluator(DatasetEvaluator):
    """Confusion-matrix evaluator for zero-shot semantic segmentation (evaluator_type
    ``"c2s_sem_seg"``).

    ``process`` reads each image's ground-truth PNG (dataset ids, 255 = ignore) and compares it
    with the argmax of ``outputs[i]["sem_seg"]``, a (C, H, W) score tensor at the ground-truth
    resolution. ``evaluate`` sums the (C, C) confusion matrices over processes and returns
    ``{"sem_seg": compute_zero_shot_metrics(...)}`` on the main process, ``{}`` elsewhere.
    """

    def __init__(
        self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None
    ) -> None:
        """
        Args:
            dataset_name: a registered evaluation set; its metadata gives ``stuff_classes``,
                ``seen_class_ids``, ``unseen_class_ids`` and ``ignore_label``.
            distributed: sum the confusion matrices of all processes before computing metrics.
            output_dir: if set, ``sem_seg_confusion.npy`` and ``sem_seg_metrics.json`` are
                written there by the main process.
        """
        meta = MetadataCatalog.get(dataset_name)
        if not hasattr(meta, "stuff_classes"):
            raise KeyError(f"dataset '{dataset_name}' has no 'stuff_classes' in its metadata")
        self._dataset_name = dataset_name
        self._class_names: List[str] = list(meta.stuff_classes)
        self._num_classes = len(self._class_names)
        # A dataset registered without a split is scored as all-seen (unseen mean is NaN).
        self._seen_ids = list(meta.get("seen_class_ids", range(self._num_classes)))
        self._unseen_ids = list(meta.get("unseen_class_ids", []))
        self._ignore_label = int(meta.get("ignore_label", IGNORE_LABEL))
        self._distributed = distributed
        self._output_dir = output_dir
        self._gt_file_of: Optional[Dict[str, str]] = None
        self.reset()

    def reset(self) -> None:
        self._conf = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)

    def _gt_file(self, inp: Dict) -> str:
        """The label PNG of one input: its own key if the mapper kept it, else the catalog's."""
        if "sem_seg_file_name" in inp:
            return inp["sem_seg_file_name"]
        if "file_name" not in inp:
            raise KeyError("evaluator input has neither 'file_name' nor 'sem_seg_file_name'")
        if self._gt_file_of is None:
            # Built lazily: loading the records may touch the disk.
            self._gt_file_of = {
                r["file_name"]: r["sem_seg_file_name"]
                for r in DatasetCatalog.get(self._dataset_name)
            }
        try:
            return self._gt_file_of[inp["file_name"]]
        except KeyError:
            raise KeyError(
                f"image {inp['file_name']} is not in dataset '{self._dataset_name}'"
            ) from None

    def _read_gt(self, path: str) -> np.ndarray:
        """(H, W) int64 ground truth in dataset ids, from an 8-bit or a 16-bit PNG; refuses ids
        outside 0..C-1 and the dataset's ``ignore_label`` (255, or 65535 for 16-bit sets)."""
        with PathManager.open(path, "rb") as f:
            gt = np.asarray(Image.open(f))
        if gt.ndim != 2:
            raise ValueError(f"{path}: ground truth must be a single-channel PNG, got {gt.shape}")
        gt = gt.astype(np.int64)
        bad = (gt < 0) | ((gt >= self._num_classes) & (gt != self._ignore_label))
        if bad.any():
            ids = sorted(np.unique(gt[bad]).tolist())
            raise ValueError(
                f"{path}: ground-truth ids {ids} outside 0..{self._num_classes - 1} "
                f"(or {self._ignore_label} = ignore)"
            )
        return gt

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        """Add one batch to the confusion matrix.

        Args:
            inputs: dicts with ``file_name`` (and optionally ``sem_seg_file_name``).
            outputs: dicts with ``sem_seg``, a (C, H, W) score tensor.
        """
        for inp, out in zip(inputs, outputs):
            gt_path = self._gt_file(inp)
            scores = out["sem_seg"]
            if scores.ndim != 3 or scores.shape[0] != self._num_classes:
                raise ValueError(
                    f"{gt_path}: prediction must be ({self._num_classes}, H, W) scores, "
                    f"got {tuple(scores.shape)}"
                )
            pred = class_argmax(scores).to(device="cpu", dtype=torch.int64).numpy()
            gt = self._read_gt(gt_path)
            if pred.shape != gt.shape:
                raise ValueError(
                    f"{gt_path}: prediction size {pred.shape} differs from ground truth {gt.shape}"
                )
            scored = gt != self._ignore_label
            # Row-major index gt * C + pred counts each (gt, pred) pair in one bincount.
            idx = gt[scored] * self._num_classes + pred[scored]
            self._conf += np.bincount(idx, minlength=self._num_classes**2).reshape(
                self._num_classes, self._num_classes
            )

    def evaluate(self) -> Dict:
        """Return ``{"sem_seg": metrics}`` on the main process (``{}`` on the others)."""
        conf = self._conf
        if self._distributed:
            comm.synchronize()
            gathered = comm.all_gather(self._conf)
            if not comm.is_main_process():
                return {}
            conf = np.sum(gathered, axis=0, dtype=np.int64)

        metrics = compute_zero_shot_metrics(
            conf, self._class_names, self._seen_ids, self._unseen_ids
        )
        self._log_table(conf, metrics)
        if self._output_dir:
            self._save(conf, metrics)
        return OrderedDict({"sem_seg": metrics})

    def _save(self, conf: np.ndarray, metrics: Dict[str, float]) -> None:
        PathManager.mkdirs(self._output_dir)
        _atomic_write(
            os.path.join(self._output_dir, "sem_seg_confusion.npy"),
            lambda f: np.save(f, conf),
            "wb",
        )
        # NaN -> null: strict JSON readers reject NaN.
        clean = {k: (None if math.isnan(v) else v) for k, v in metrics.items()}
        _atomic_write(
            os.path.join(self._output_dir, "sem_seg_metrics.json"),
            lambda f: json.dump(clean, f, indent=2),
            "w",
        )

    def _log_table(self, conf: np.ndarray, metrics: Dict[str, float]) -> None:
        """Log per-class IoU / accuracy with a seen/unseen column and the mmseg-convention IoU,
        then the summary of both conventions side by side."""
        iou, acc, present = class_iou_and_accuracy(conf)
        iou_mm = mmseg_class_iou(conf)
        seen, unseen = set(self._seen_ids), set(self._unseen_ids)
        rows = []
        for i, name in enumerate(self._class_names):
            group = "seen" if i in seen else ("unseen" if i in unseen else "-")
            mm = "n/a" if np.isnan(iou_mm[i]) else f"{100 * iou_mm[i]:.2f}"
            if present[i]:
                rows.append([i, name, group, f"{100 * iou[i]:.2f}", f"{100 * acc[i]:.2f}", mm])
            else:
                rows.append([i, name, group, "no GT", "no GT", mm])
        table = tabulate(
            rows,
            headers=["id", "class", "split", "IoU", "Acc", "IoU (mmseg)"],
            tablefmt="pipe",
            disable_numparse=True,
        )
        summary_keys = ["mIoU", "mIoU-seen", "mIoU-unseen", "hIoU", "pAcc", "fwIoU", "mACC"]
        mm_keys = ["mIoU_mmseg", "mIoU-seen_mmseg", "mIoU-unseen_mmseg", "hIoU_mmseg"]
        summary = tabulate(
            [
                ["detectron2"] + [f"{metrics[k]:.2f}" for k in summary_keys],
                ["mmseg"] + [f"{metrics[k]:.2f}" for k in mm_keys] + ["", "", ""],
            ],
            headers=["convention"] + summary_keys,
            tablefmt="pipe",
            disable_numparse=True,
        )
        logger.info("Semantic segmentation on %s:\n%s\n%s", self._dataset_name, table, summary)
