"""The two mIoU conventions of the evaluator: detectron2's (main keys) and mmsegmentation's
(``*_mmseg`` keys). Hand-computed confusion matrices, then a run against detectron2's own
``SemSegEvaluator`` and an independent per-image histogram reference (mmseg's way of counting)."""

import math
import os
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from c2s_d2.data.zero_shot import register_zero_shot_sem_seg
from c2s_d2.evaluation.sem_seg_evaluator import (
    C2SSemSegEvaluator,
    compute_zero_shot_metrics,
    mmseg_class_iou,
)

CLASSES = ["cat", "dog", "sky", "bird"]
MM_KEYS = ("mIoU_mmseg", "mIoU-seen_mmseg", "mIoU-unseen_mmseg", "hIoU_mmseg")


def test_predicted_but_absent_class_is_zero_under_mmseg_and_left_out_under_detectron2():
    # rows = GT, cols = prediction. "bird" (id 3, unseen) has no GT pixel but is predicted once.
    conf = np.array([[2, 0, 0, 1], [0, 1, 1, 0], [0, 0, 3, 0], [0, 0, 0, 0]])
    m = compute_zero_shot_metrics(conf, CLASSES, seen_ids=[0, 1], unseen_ids=[2, 3])
    # Per class: cat 2/(3+2-2) = 2/3, dog 1/(2+1-1) = 1/2, sky 3/(3+4-3) = 3/4, bird 0/(0+1-0) = 0.
    np.testing.assert_allclose(mmseg_class_iou(conf), [2 / 3, 1 / 2, 3 / 4, 0.0])
    # detectron2: bird left out.
    assert m["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert m["mIoU-unseen"] == pytest.approx(75.0)
    assert m["hIoU"] == pytest.approx(100 * 21 / 32)  # 2 * (7/12) * (3/4) / (7/12 + 3/4)
    # mmseg: bird counts as 0.
    assert m["mIoU_mmseg"] == pytest.approx(100 * 23 / 48)  # (2/3 + 1/2 + 3/4 + 0) / 4
    assert m["mIoU-seen_mmseg"] == pytest.approx(100 * 7 / 12)  # same seen classes
    assert m["mIoU-unseen_mmseg"] == pytest.approx(100 * 3 / 8)  # (3/4 + 0) / 2
    assert m["hIoU_mmseg"] == pytest.approx(100 * 21 / 46)  # 2 * (7/12) * (3/8) / (23/24)
    assert "IoU-bird" not in m  # per-class keys stay detectron2's


def test_absent_and_never_predicted_class_is_skipped_by_both():
    # "bird" has neither GT nor prediction: union 0 -> NaN in mmseg, skipped by nanmean.
    conf = np.array([[2, 0, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
    iou_mm = mmseg_class_iou(conf)
    assert math.isnan(iou_mm[3])
    # cat 2/(2+3-2), dog 1/(2+1-1), sky 3/(4+4-3)
    np.testing.assert_allclose(iou_mm[:3], [2 / 3, 1 / 2, 3 / 5])
    m = compute_zero_shot_metrics(conf, CLASSES, seen_ids=[0, 1], unseen_ids=[2, 3])
    assert m["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 3 / 5) / 3)
    assert m["mIoU-unseen"] == pytest.approx(60.0)
    for d2_key, mm_key in zip(("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU"), MM_KEYS):
        assert m[mm_key] == pytest.approx(m[d2_key])


def test_conventions_coincide_when_every_class_is_present():
    conf = np.array([[3, 1, 0], [0, 2, 2], [1, 0, 1]])  # test_evaluator's hand-computed matrix
    m = compute_zero_shot_metrics(conf, CLASSES[:3], seen_ids=[0, 1], unseen_ids=[2])
    assert m["mIoU_mmseg"] == pytest.approx(125.0 / 3)  # (0.6 + 0.4 + 0.25) / 3
    assert m["mIoU-seen_mmseg"] == pytest.approx(50.0)
    assert m["mIoU-unseen_mmseg"] == pytest.approx(25.0)
    assert m["hIoU_mmseg"] == pytest.approx(100 / 3)
    for d2_key, mm_key in zip(("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU"), MM_KEYS):
        assert m[mm_key] == pytest.approx(m[d2_key])


def test_unseen_group_without_ground_truth_but_predicted():
    # "sky" (the only unseen class) has no GT pixel but takes one "dog" pixel.
    conf = np.array([[2, 0, 0], [1, 1, 1], [0, 0, 0]])
    m = compute_zero_shot_metrics(conf, CLASSES[:3], seen_ids=[0, 1], unseen_ids=[2])
    assert math.isnan(m["mIoU-unseen"]) and math.isnan(m["hIoU"])  # detectron2: no unseen class
    assert m["mIoU-unseen_mmseg"] == 0.0 and m["hIoU_mmseg"] == 0.0  # mmseg: sky scored 0
    # cat 2/(2+3-2) = 2/3, dog 1/(3+1-1) = 1/3: seen identical in both conventions.
    assert m["mIoU-seen_mmseg"] == pytest.approx(m["mIoU-seen"]) == pytest.approx(50.0)
    assert m["mIoU_mmseg"] == pytest.approx(100 / 3)  # (2/3 + 1/3 + 0) / 3


def test_group_with_zero_union_is_nan_in_both():
    conf = np.array([[2, 0, 0], [1, 1, 0], [0, 0, 0]])  # sky neither present nor predicted
    m = compute_zero_shot_metrics(conf, CLASSES[:3], seen_ids=[0, 1], unseen_ids=[2])
    assert math.isnan(m["mIoU-unseen_mmseg"]) and math.isnan(m["hIoU_mmseg"])
    assert m["mIoU_mmseg"] == pytest.approx(m["mIoU"])


# ------------------------------------------------ against detectron2 and an mmseg-style reference


def _labels_and_predictions(num_images: int = 3, size: int = 6):
    """GT never holds "bird" (id 3); predictions put it on a few pixels, plus a 255 border."""
    rng = np.random.default_rng(7)
    out = []
    for _ in range(num_images):
        gt = rng.integers(0, 3, size=(size, size)).astype(np.uint8)
        gt[0, :] = 255
        pred = gt.astype(np.int64) % 4
        flip = rng.random((size, size)) < 0.35
        pred[flip] = rng.integers(0, 4, size=int(flip.sum()))
        pred[1, 1] = 3  # bird predicted at least once on a scored pixel
        out.append((gt, pred))
    return out


def _histogram_reference(pairs, num_classes: int) -> np.ndarray:
    """Per-class IoU the way mmseg counts it: per-image histograms of intersection, prediction
    and label over the scored pixels, summed over the dataset, then intersect / union."""
    inter = np.zeros(num_classes)
    area_pred = np.zeros(num_classes)
    area_label = np.zeros(num_classes)
    for gt, pred in pairs:
        keep = gt != 255
        g, p = gt[keep].astype(np.int64), pred[keep]
        inter += np.bincount(p[p == g], minlength=num_classes)
        area_pred += np.bincount(p, minlength=num_classes)
        area_label += np.bincount(g, minlength=num_classes)
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


def test_matches_detectron2_semsegevaluator_and_mmseg_reference(tmp_path):
    from detectron2.evaluation import SemSegEvaluator

    pairs = _labels_and_predictions()
    records = []
    for i, (gt, _) in enumerate(pairs):
        path = str(tmp_path / f"gt{i}.png")
        Image.fromarray(gt).save(path)
        records.append({"file_name": str(tmp_path / f"img{i}.jpg"), "sem_seg_file_name": path})
    name = f"c2s_test_mmseg_{uuid.uuid4().hex[:8]}"
    register_zero_shot_sem_seg(
        name,
        load_records=lambda: [dict(r) for r in records],
        class_names=CLASSES,
        unseen_ids=[2, 3],
        split="eval",
    )
    ours = C2SSemSegEvaluator(name, distributed=False)
    theirs = SemSegEvaluator(name, distributed=False)
    ours.reset()
    theirs.reset()
    for rec, (_, pred) in zip(records, pairs):
        scores = torch.nn.functional.one_hot(torch.from_numpy(pred), 4).permute(2, 0, 1).float()
        inp = {"file_name": rec["file_name"]}
        ours.process([inp], [{"sem_seg": scores}])
        theirs.process([inp], [{"sem_seg": scores}])
    m = ours.evaluate()["sem_seg"]
    d2 = theirs.evaluate()["sem_seg"]
    for key in ("mIoU", "fwIoU", "mACC"):
        assert m[key] == pytest.approx(d2[key])
    assert m["pAcc"] == pytest.approx(d2["pACC"])
    ref = _histogram_reference(pairs, 4)
    assert ref[3] == 0.0  # bird: predicted, never in the GT
    assert m["mIoU_mmseg"] == pytest.approx(100 * np.nanmean(ref))
    assert m["mIoU-unseen_mmseg"] == pytest.approx(100 * np.nanmean(ref[[2, 3]]))
    assert m["mIoU_mmseg"] < m["mIoU"]  # the zero of "bird" lowers the mmseg mean
    assert os.path.isfile(records[0]["sem_seg_file_name"])


def test_class_argmax_equals_torch_argmax_with_ties_and_nan():
    import torch

    from c2s_d2.evaluation.sem_seg_evaluator import class_argmax

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (100, 7, 9), generator=g).float()  # many ties
    assert torch.equal(class_argmax(scores), scores.argmax(dim=0))
    scores = torch.rand(100, 7, 9, generator=g)
    assert torch.equal(class_argmax(scores), scores.argmax(dim=0))
    scores[37, 3, 4] = float("nan")
    assert torch.equal(class_argmax(scores), scores.argmax(dim=0))
    assert class_argmax(scores)[3, 4] == 37
