"""Tests of the zero-shot semantic-segmentation evaluator (hand-computed metrics, errors, 2 ranks)."""

import json
import math
import os
import socket
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from c2s_d2.data.zero_shot import register_zero_shot_sem_seg
from c2s_d2.evaluation.sem_seg_evaluator import C2SSemSegEvaluator, compute_zero_shot_metrics

CLASSES = ["cat", "dog", "sky"]
UNSEEN = [2]
NUM_IMAGES = 4


# ---------------------------------------------------------------- pure metrics, by hand


def test_metrics_hand_computed_three_classes():
    # rows = GT, cols = prediction. TP = 3, 2, 1; GT sums 4, 4, 2; prediction sums 4, 3, 3.
    conf = np.array([[3, 1, 0], [0, 2, 2], [1, 0, 1]])
    m = compute_zero_shot_metrics(conf, CLASSES, seen_ids=[0, 1], unseen_ids=[2])
    # IoU: cat 3/(4+4-3) = 0.6, dog 2/(4+3-2) = 0.4, sky 1/(2+3-1) = 0.25.
    assert m["IoU-cat"] == pytest.approx(60.0)
    assert m["IoU-dog"] == pytest.approx(40.0)
    assert m["IoU-sky"] == pytest.approx(25.0)
    assert m["mIoU"] == pytest.approx(125.0 / 3)
    assert m["mIoU-seen"] == pytest.approx(50.0)
    assert m["mIoU-unseen"] == pytest.approx(25.0)
    assert m["hIoU"] == pytest.approx(2 * 50 * 25 / 75)  # 33.33
    assert m["pAcc"] == pytest.approx(60.0)  # 6 / 10
    assert m["mACC"] == pytest.approx(175.0 / 3)  # (3/4 + 2/4 + 1/2) / 3
    assert m["fwIoU"] == pytest.approx(45.0)  # 0.4*0.6 + 0.4*0.4 + 0.2*0.25


def test_class_without_ground_truth_is_left_out_of_every_mean():
    # "bird" (id 3, unseen) is predicted once but never in the ground truth.
    conf = np.array([[2, 0, 0, 1], [0, 1, 1, 0], [0, 0, 3, 0], [0, 0, 0, 0]])
    names = CLASSES + ["bird"]
    m = compute_zero_shot_metrics(conf, names, seen_ids=[0, 1], unseen_ids=[2, 3])
    # IoU: cat 2/3, dog 1/2, sky 3/4 ; bird absent (counting it as 0 would halve the unseen mean).
    assert "IoU-bird" not in m
    assert m["mIoU"] == pytest.approx(100 * 23 / 36)
    assert m["mIoU-seen"] == pytest.approx(100 * 7 / 12)
    assert m["mIoU-unseen"] == pytest.approx(75.0)
    assert m["mACC"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 3)
    assert all(not math.isnan(v) for v in m.values())


def test_empty_group_is_nan_and_makes_hiou_nan():
    conf = np.array([[2, 0, 0], [1, 1, 0], [0, 0, 0]])  # no "sky" (the only unseen class) pixel
    m = compute_zero_shot_metrics(conf, CLASSES, seen_ids=[0, 1], unseen_ids=[2])
    assert math.isnan(m["mIoU-unseen"])
    assert math.isnan(m["hIoU"])
    assert m["mIoU-seen"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert m["mIoU"] == pytest.approx(m["mIoU-seen"])


def test_hiou_formula_and_zero_case():
    # cat (seen) IoU 1/(3+1-1) = 1/3, dog (unseen) 2/(2+4-2) = 1/2: hIoU = 2*(1/6)/(5/6) = 0.4.
    conf = np.array([[1, 2], [0, 2]])
    m = compute_zero_shot_metrics(conf, ["cat", "dog"], seen_ids=[0], unseen_ids=[1])
    assert m["mIoU-seen"] == pytest.approx(100 / 3)
    assert m["mIoU-unseen"] == pytest.approx(50.0)
    assert m["hIoU"] == pytest.approx(40.0)
    m0 = compute_zero_shot_metrics(
        np.array([[0, 3], [2, 0]]), ["cat", "dog"], seen_ids=[0], unseen_ids=[1]
    )
    assert m0["hIoU"] == 0.0


def test_metrics_reject_bad_split():
    conf = np.eye(3, dtype=np.int64)
    with pytest.raises(ValueError, match=r"\[1\].*both seen and unseen"):
        compute_zero_shot_metrics(conf, CLASSES, seen_ids=[0, 1], unseen_ids=[1, 2])
    with pytest.raises(ValueError, match=r"\[5\]"):
        compute_zero_shot_metrics(conf, CLASSES, seen_ids=[0, 1], unseen_ids=[5])
    with pytest.raises(ValueError, match="2 class names"):
        compute_zero_shot_metrics(conf, CLASSES[:2], seen_ids=[0], unseen_ids=[1])


# ---------------------------------------------------------------- tiny registered dataset


def _gt_label(index: int) -> np.ndarray:
    """(8, 8) uint8 dataset ids of image ``index``: every class present, a 255 border row."""
    rng = np.random.default_rng(100 + index)
    label = rng.integers(0, len(CLASSES), size=(8, 8)).astype(np.uint8)
    label[0, :] = 255
    return label


def _prediction(index: int) -> torch.Tensor:
    """(C, 8, 8) one-hot scores of image ``index``: GT with ~30% pixels flipped, noise on 255."""
    rng = np.random.default_rng(200 + index)
    pred = _gt_label(index).astype(np.int64) % len(CLASSES)
    flip = rng.random((8, 8)) < 0.3
    pred[flip] = rng.integers(0, len(CLASSES), size=int(flip.sum()))
    return torch.nn.functional.one_hot(torch.from_numpy(pred), len(CLASSES)).permute(2, 0, 1)


def _write_dataset(root: str, labels=None) -> list:
    """Write the label PNGs and return detectron2 records (images are never read)."""
    os.makedirs(root, exist_ok=True)
    records = []
    for i in range(NUM_IMAGES):
        label = _gt_label(i) if labels is None else labels[i]
        path = os.path.join(root, f"img{i}.png")
        Image.fromarray(label).save(path)
        records.append({"file_name": os.path.join(root, f"img{i}.jpg"), "sem_seg_file_name": path})
    return records


def _register(root: str, labels=None) -> str:
    records = _write_dataset(root, labels)
    name = f"c2s_test_eval_{uuid.uuid4().hex[:8]}"
    register_zero_shot_sem_seg(
        name,
        load_records=lambda: [dict(r) for r in records],
        class_names=CLASSES,
        unseen_ids=UNSEEN,
        split="eval",
    )
    return name


def _run(evaluator: C2SSemSegEvaluator, name_root: str, indices) -> dict:
    evaluator.reset()
    for i in indices:
        inp = {"file_name": os.path.join(name_root, f"img{i}.jpg"), "height": 8, "width": 8}
        evaluator.process([inp], [{"sem_seg": _prediction(i)}])
    return evaluator.evaluate()


def test_evaluator_matches_confusion_matrix_and_never_scores_255(tmp_path):
    root = str(tmp_path / "labels")
    name = _register(root)
    ev = C2SSemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "out"))
    res = _run(ev, root, range(NUM_IMAGES))["sem_seg"]
    # Reference confusion matrix computed with plain loops over the scored pixels.
    conf = np.zeros((3, 3), dtype=np.int64)
    for i in range(NUM_IMAGES):
        gt, pred = _gt_label(i), _prediction(i).argmax(0).numpy()
        for g, p in zip(gt.ravel(), pred.ravel()):
            if g != 255:
                conf[g, p] += 1
    assert conf.sum() == NUM_IMAGES * 7 * 8  # the 255 row of each image is not counted
    np.testing.assert_array_equal(ev._conf, conf)
    assert res == compute_zero_shot_metrics(conf, CLASSES, [0, 1], [2])
    assert {"mIoU", "mIoU-seen", "mIoU-unseen", "hIoU", "pAcc", "mACC"} <= set(res)
    # Saved files: the same matrix and metrics, strict JSON.
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "sem_seg_confusion.npy"), conf)
    saved = json.loads((tmp_path / "out" / "sem_seg_metrics.json").read_text())
    assert saved == pytest.approx(dict(res))
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".tmp_")]


def test_predictions_on_ignored_pixels_change_nothing(tmp_path):
    root = str(tmp_path / "labels")
    name = _register(root)
    ev = C2SSemSegEvaluator(name, distributed=False)
    inp = {"file_name": os.path.join(root, "img0.jpg")}
    ev.process([inp], [{"sem_seg": _prediction(0)}])
    before = ev._conf.copy()
    ev.reset()
    scores = _prediction(0).clone()
    scores[:, 0, :] = 0
    scores[1, 0, :] = 5  # a different class everywhere on the ignored row
    ev.process([inp], [{"sem_seg": scores}])
    np.testing.assert_array_equal(ev._conf, before)


def test_out_of_range_ground_truth_id_names_file_and_ids(tmp_path):
    labels = [_gt_label(i) for i in range(NUM_IMAGES)]
    labels[1][3, 3], labels[1][4, 4] = 7, 254
    root = str(tmp_path / "labels")
    name = _register(root, labels)
    ev = C2SSemSegEvaluator(name, distributed=False)
    ev.process([{"file_name": os.path.join(root, "img0.jpg")}], [{"sem_seg": _prediction(0)}])
    with pytest.raises(ValueError, match=r"img1\.png.*\[7, 254\]"):
        ev.process([{"file_name": os.path.join(root, "img1.jpg")}], [{"sem_seg": _prediction(1)}])


def test_size_and_channel_mismatch_name_file(tmp_path):
    root = str(tmp_path / "labels")
    name = _register(root)
    ev = C2SSemSegEvaluator(name, distributed=False)
    inp = {"file_name": os.path.join(root, "img2.jpg")}
    with pytest.raises(ValueError, match=r"img2\.png.*\(8, 6\).*\(8, 8\)"):
        ev.process([inp], [{"sem_seg": torch.zeros(3, 8, 6)}])
    with pytest.raises(ValueError, match=r"img2\.png.*\(3, H, W\)"):
        ev.process([inp], [{"sem_seg": torch.zeros(4, 8, 8)}])
    with pytest.raises(KeyError, match="nope.jpg"):
        ev.process([{"file_name": "nope.jpg"}], [{"sem_seg": torch.zeros(3, 8, 8)}])


# ---------------------------------------------------------------- two processes (gloo)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    """One rank: register the dataset, process every other image, evaluate, dump the result."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        root = os.path.join(tmp, "labels")
        name = _register(root)  # spawned processes start with an empty DatasetCatalog
        ev = C2SSemSegEvaluator(name, distributed=True)
        result = _run(ev, root, range(rank, NUM_IMAGES, world_size))
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_merge_to_single_process_metrics(tmp_path):
    tmp = str(tmp_path)
    mp.spawn(_distributed_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
    root = os.path.join(tmp, "labels")
    single = _run(C2SSemSegEvaluator(_register(root), distributed=False), root, range(NUM_IMAGES))
    with open(os.path.join(tmp, "rank0.json")) as f:
        merged = json.load(f)
    with open(os.path.join(tmp, "rank1.json")) as f:
        assert json.load(f) == {}  # only the main process reports
    assert merged == json.loads(json.dumps(single))
    # Rank 0 alone scores differently, so the equality above needs the summed matrices.
    half = _run(C2SSemSegEvaluator(_register(root), distributed=False), root, [0, 2])
    assert half["sem_seg"]["mIoU"] != single["sem_seg"]["mIoU"]
    assert merged["sem_seg"]["mIoU-unseen"] > 0
