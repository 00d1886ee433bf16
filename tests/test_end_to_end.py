"""End to end on a tiny mini-world: train a few iterations, --eval-only in a fresh process,
DefaultPredictor with a custom vocabulary on a real photo, and the one-line errors."""

import json
import os
import subprocess
import sys

import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/miniworld/zs_baseline_R18.yaml")
# a smaller student so that the test stays fast; the architecture is the same
TINY = [
    "MODEL.C2S.DEC_LAYERS", "2",
    "MODEL.C2S.NUM_OBJECT_QUERIES", "8",
    "MODEL.C2S.HIDDEN_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.CONV_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.MASK_DIM", "64",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
METRIC_KEYS = ["mIoU", "mIoU-seen", "mIoU-unseen", "hIoU", "pAcc"]


def run(args, env, check=True):
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    e = dict(os.environ)
    e.update(
        DETECTRON2_DATASETS=str(root / "datasets"),
        C2S_MINIWORLD_NUM_TRAIN="12",
        C2S_MINIWORLD_NUM_VAL="4",
        C2S_CACHE=str(root / "cache"),
        PYTHONPATH=ROOT,
        OMP_NUM_THREADS="2",
    )
    e["E2E_ROOT"] = str(root)
    return e


@pytest.fixture(scope="module")
def trained(env):
    out = os.path.join(env["E2E_ROOT"], "train")
    run(
        ["train_net.py", "--config-file", CONFIG, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", out, *TINY],
        env,
    )
    return out


def test_train_saves_checkpoint_and_metrics(trained):
    assert os.path.isfile(os.path.join(trained, "model_final.pth"))
    with open(os.path.join(trained, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    lines = [json.loads(x) for x in open(os.path.join(trained, "metrics.json"))]
    assert any("total_loss" in x for x in lines)


def test_eval_only_reports_every_metric(trained, env):
    out = os.path.join(env["E2E_ROOT"], "eval")
    weights = os.path.join(trained, "model_final.pth")
    proc = run(
        ["train_net.py", "--config-file", CONFIG, "--eval-only", "MODEL.WEIGHTS", weights,
         "OUTPUT_DIR", out, *TINY],
        env,
    )  # fmt: skip
    assert "[c2s_miniworld_val] mIoU" in proc.stdout
    with open(os.path.join(out, "inference", "c2s_miniworld_val", "sem_seg_metrics.json")) as f:
        saved = json.load(f)
    metrics = saved.get("sem_seg", saved)
    for key in METRIC_KEYS:
        assert key in metrics, key
    per_class = [v for k, v in metrics.items() if k.startswith("IoU-")]
    assert per_class and metrics["mIoU"] == pytest.approx(sum(per_class) / len(per_class))


def test_default_predictor_custom_vocabulary(trained, env, monkeypatch):
    for k in (
        "DETECTRON2_DATASETS",
        "C2S_CACHE",
        "C2S_MINIWORLD_NUM_TRAIN",
        "C2S_MINIWORLD_NUM_VAL",
    ):
        monkeypatch.setenv(k, env[k])
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    from c2s_d2 import add_c2s_config

    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(TINY + ["MODEL.WEIGHTS", os.path.join(trained, "model_final.pth")])
    predictor = DefaultPredictor(cfg)
    vocabulary = ["person", "uniform", "flag", "wall"]
    predictor.model.set_vocabulary(vocabulary)
    photo = np.asarray(
        Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert(
            "RGB"
        )
    )
    scores = predictor(photo)["sem_seg"]
    assert tuple(scores.shape) == (len(vocabulary), *photo.shape[:2])
    # the score maps follow the vocabulary: the reversed vocabulary gives the reversed maps
    predictor.model.set_vocabulary(vocabulary[::-1])
    reversed_scores = predictor(photo)["sem_seg"]
    assert float((reversed_scores - scores.flip(0)).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="empty vocabulary"):
        predictor.model.set_vocabulary([])


def test_demo_writes_overlay(trained, env):
    out = os.path.join(env["E2E_ROOT"], "demo")
    photo = str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    proc = run(
        ["demo/demo.py", "--config-file", CONFIG, "--input", photo, "--output", out,
         "--vocabulary", "person,flag,wall",
         "--opts", "MODEL.WEIGHTS", os.path.join(trained, "model_final.pth"), *TINY],
        env,
    )  # fmt: skip
    written = os.path.join(out, "grace_hopper.png")
    assert os.path.isfile(written), proc.stdout
    assert Image.open(written).size == Image.open(photo).size


def _last_line(proc):
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def test_bad_input_one_line_errors(trained, env, tmp_path):
    weights = os.path.join(trained, "model_final.pth")
    # unknown config key
    p = run(
        ["train_net.py", "--config-file", CONFIG, "--eval-only", "MODEL.NOT_A_KEY", "1"], env, False
    )
    assert p.returncode != 0 and "MODEL.NOT_A_KEY" in _last_line(p) and "Traceback" not in p.stderr
    # empty vocabulary
    photo = str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    demo = ["demo/demo.py", "--config-file", CONFIG, "--output", str(tmp_path / "o")]
    p = run(
        [*demo, "--input", photo, "--vocabulary", " , ", "--opts", "MODEL.WEIGHTS", weights],
        env,
        False,
    )
    assert p.returncode == 2 and "empty class name" in _last_line(p)
    # unreadable image
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    p = run([*demo, "--input", str(bad), "--vocabulary", "cat", "--opts", "MODEL.WEIGHTS", weights,
             *TINY], env, False)  # fmt: skip
    assert p.returncode == 2 and str(bad) in _last_line(p) and "Traceback" not in p.stderr
    # missing config file
    p = run(["train_net.py", "--config-file", str(tmp_path / "nope.yaml")], env, False)
    assert p.returncode != 0 and "nope.yaml" in _last_line(p)
