"""``train_net.py --eval-only`` on tiny COCO-Stuff / VOC / PASCAL Context fixtures.

For each benchmark, the real config (``configs/<dataset>/zs_baseline_R50.yaml``, R-50 student) is
run offline: the tiny CLIP text encoder replaces ViT-B/16, the checkpoint is a randomly
initialised model of the same config written by the test, and test images are small. The run
must report the zero-shot metrics under the dataset's registered evaluation name, with per-class
IoU keys in the dataset's own class names. A dataset that is not prepared must stop the command
with one line naming the missing path and the prepare command.
"""

import json
import os
import re
import subprocess
import sys
from typing import Dict, List

import pytest
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from c2s_d2 import add_c2s_config
from fixtures_benchmarks import REPO_ROOT, prepare_benchmark_fixtures, write_voc_fixture

DATASETS = ("coco_stuff", "voc", "pcontext")
VAL_NAME = {d: f"c2s_{d}_val" for d in DATASETS}
# Offline and small: tiny random CLIP text encoder, one prompt template, 64-pixel test images.
OFFLINE = [
    "MODEL.DEVICE", "cpu",
    "MODEL.CLIP.MODEL_NAME", "C2S-Tiny",
    "MODEL.CLIP.PRETRAINED", "",
    "MODEL.CLIP.MODEL_CONFIG_FILES", '["C2S-Tiny.json"]',
    "MODEL.CLIP.TEXT_TEMPLATES", "single",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
# Classes with ground-truth pixels in the val fixtures (tests/fixtures_benchmarks.py), worked out
# by hand from the raw values each fixture writes and each dataset's raw -> id rule.
VAL_CLASSES = {
    # raw 0, 20, 24, 32, 33, 40, 56, 86, 91, 99, 105, 123, 144, 147, 148, 168, 171, 181
    # (raw 11 is a dropped COCO id and 255 is unlabelled: both ignored)
    "coco_stuff": [
        "person", "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors",
        "banner", "cardboard", "clouds", "grass", "playingfield", "river", "road", "tree",
        "wall-concrete", "wood",
    ],
    # raw 1, 5, 15..20 -> ids 0, 4, 14..19 (raw 0 = background is ignored)
    "voc": [
        "aeroplane", "bottle", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    ],
    # raw k -> k - 1 for k in 1, 7, 8, 15, 20, 25, 32, 34, 49, 55, 59
    "pcontext": [
        "aeroplane", "bird", "boat", "cat", "cow", "fence", "keyboard", "motorbike", "sofa",
        "tvmonitor", "wood",
    ],
}  # fmt: skip
HEADLINE = r"mIoU ([\d.]+) \| mIoU-seen ([\d.]+) \| mIoU-unseen ([\d.]+) \| hIoU ([\d.]+)"
HEADLINE_KEYS = ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU")


def config_file(dataset: str) -> str:
    return os.path.join(REPO_ROOT, "configs", dataset, "zs_baseline_R50.yaml")


def subprocess_env(datasets_root: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(DETECTRON2_DATASETS=datasets_root, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="2")
    # C2S_CACHE comes from conftest: the text embeddings computed here are reused by the child.
    return env


def train_net(args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train_net.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_initial_checkpoint(dataset: str, save_dir: str) -> str:
    """A randomly initialised model of the dataset's R-50 config, saved as detectron2 does."""
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(config_file(dataset))
    cfg.merge_from_list(OFFLINE + ["MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    os.makedirs(save_dir, exist_ok=True)
    DetectionCheckpointer(model, save_dir=save_dir).save("model_init")
    return os.path.join(save_dir, "model_init.pth")


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory) -> Dict[str, Dict]:
    """Prepare the three fixtures once, then run --eval-only on each benchmark."""
    root = tmp_path_factory.mktemp("benchmarks_eval")
    datasets_root = str(root / "datasets")
    prepare_benchmark_fixtures(datasets_root)
    env = subprocess_env(datasets_root)
    runs = {}
    for dataset in DATASETS:
        weights = write_initial_checkpoint(dataset, str(root / "ckpt" / dataset))
        output_dir = str(root / "output" / dataset)
        proc = train_net(
            ["--config-file", config_file(dataset), "--eval-only", "MODEL.WEIGHTS", weights,
             "OUTPUT_DIR", output_dir, *OFFLINE],
            env,
        )  # fmt: skip
        os.remove(weights)  # about 170 MB each: do not leave them in the pytest temp folders
        runs[dataset] = {"proc": proc, "output_dir": output_dir, "weights": weights}
    return runs


@pytest.mark.parametrize("dataset", DATASETS)
def test_eval_only_prints_zero_shot_headline(eval_runs, dataset):
    run = eval_runs[dataset]
    proc = run["proc"]
    assert proc.returncode == 0, f"{dataset}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # the checkpoint written above was loaded, and it matched the model key for key
    assert f"Loading from {run['weights']}" in proc.stdout
    assert "not found in the checkpoint" not in proc.stdout + proc.stderr
    assert "not used by the model" not in proc.stdout + proc.stderr
    lines = re.findall(rf"^\[{VAL_NAME[dataset]}\] {HEADLINE}$", proc.stdout, re.MULTILINE)
    assert len(lines) == 1, proc.stdout[-3000:]


@pytest.mark.parametrize("dataset", DATASETS)
def test_eval_only_saves_metrics_with_dataset_class_names(eval_runs, dataset):
    run = eval_runs[dataset]
    assert run["proc"].returncode == 0, run["proc"].stderr[-3000:]
    path = os.path.join(run["output_dir"], "inference", VAL_NAME[dataset], "sem_seg_metrics.json")
    with open(path) as f:
        metrics = json.load(f)
    for key in HEADLINE_KEYS:
        # every group has ground-truth pixels in the fixtures, so no metric may be null (NaN)
        assert isinstance(metrics.get(key), float), (key, metrics.get(key))
        assert 0.0 <= metrics[key] <= 100.0
    seen, unseen = metrics["mIoU-seen"], metrics["mIoU-unseen"]
    hiou = 2 * seen * unseen / (seen + unseen) if seen + unseen > 0 else 0.0
    assert metrics["hIoU"] == pytest.approx(hiou)
    # exactly the classes present in the val ground truth, under the dataset's own names
    iou_keys = {k for k in metrics if k.startswith("IoU-")}
    assert iou_keys == {f"IoU-{name}" for name in VAL_CLASSES[dataset]}
    # the printed headline is the saved file's numbers
    printed = re.search(rf"^\[{VAL_NAME[dataset]}\] {HEADLINE}$", run["proc"].stdout, re.MULTILINE)
    assert printed is not None
    assert list(printed.groups()) == [f"{metrics[k]:.1f}" for k in HEADLINE_KEYS]


@pytest.mark.parametrize(
    "dataset, raw_only, missing",
    [
        # nothing downloaded: the first folder looked for is named
        ("coco_stuff", False, os.path.join("coco", "val2017")),
        # raw VOC present but prepare_voc.py never run: its split list is named
        ("voc", True, os.path.join("VOCdevkit", "VOC2012", "annotations_detectron2", "val.txt")),
    ],
)
def test_unprepared_dataset_one_line_error(tmp_path, dataset, raw_only, missing):
    datasets_root = str(tmp_path / "datasets")
    os.makedirs(datasets_root)
    if raw_only:
        write_voc_fixture(datasets_root)
    proc = train_net(
        ["--config-file", config_file(dataset), "--eval-only", "--allow-random-weights",
         "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path / "output"), *OFFLINE],
        subprocess_env(datasets_root),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("train_net.py: error:"), last
    assert os.path.join(datasets_root, missing) in last, last
    assert f"python datasets/prepare_{dataset}.py --root {datasets_root}" in last, last
