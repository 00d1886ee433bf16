"""Real-size smoke test (slow, CPU): what a user does with ``configs/coco_stuff/c2s_R50.yaml``.

Nothing is shrunk but the data and the run length: the R-50 student with its 512x512 crop and
the ViT-B/16 CLIP teacher (at 448 px) of the config, on COCO-Stuff in its downloaded layout.

1. COCO-Stuff raw fixtures at a realistic size (4 train and 2 val images of 640x480, blocky raw
   label maps), prepared by ``datasets/prepare_coco_stuff.py``;
2. stand-ins for the downloads: a random-weight open_clip ``ViT-B-16`` state dict (for
   ``MODEL.CLIP.PRETRAINED``) and a random torchvision ResNet-50 converted by
   ``tools/convert_torchvision_to_d2.py`` (for ``MODEL.WEIGHTS``: the config's ``detectron2://``
   ImageNet file cannot be downloaded offline);
3. ``train_net.py`` for 2 iterations of batch 2 (detectron2 evaluates once at the end):
   exit 0, ``model_final.pth``, finite losses, the backbone started from the converted file;
4. ``train_net.py --eval-only`` with that checkpoint: the zero-shot headline;
5. ``demo/demo.py`` on a val image: an overlay PNG of the image's size.

The time of each step is printed on the terminal once the tests of this file are done.
Run: ``pytest tests/test_real_size_smoke.py --run-slow``: about 3 min on a busy 2-core CPU with one
thread (2.5 min of it training, 74 s of which encode the 863 latent-vocabulary prompts).
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_benchmarks import (
    COCO_RAW_VALUES,
    REPO_ROOT,
    import_prepare_script,
    write_label,
)

pytestmark = pytest.mark.slow

CONFIG = os.path.join(REPO_ROOT, "configs", "coco_stuff", "c2s_R50.yaml")
VAL_NAME = "c2s_coco_stuff_val"
HEIGHT, WIDTH, BLOCK = 480, 640, 80  # COCO's typical image size; 6 x 8 label blocks
N_TRAIN, N_VAL = 4, 2
HEADLINE = (
    rf"^\[{VAL_NAME}\] mIoU ([\d.]+) \| mIoU-seen ([\d.]+) \| mIoU-unseen ([\d.]+) "
    r"\| hIoU ([\d.]+)$"
)
TIMEOUT = 3600  # seconds per command (training on a busy 2-core CPU takes several minutes)

TIMINGS: Dict[str, float] = {}  # step -> seconds, printed at the end of the session


def blocky_label(values, shift: int) -> np.ndarray:
    """A (HEIGHT, WIDTH) uint8 map of BLOCK x BLOCK squares, each one value of ``values``
    (in turn, starting at ``shift``): regions of real size, not single pixels."""
    rows, cols = HEIGHT // BLOCK, WIDTH // BLOCK
    ids = np.resize(np.roll(np.asarray(values, dtype=np.uint8), -shift), rows * cols)
    return np.kron(ids.reshape(rows, cols), np.ones((BLOCK, BLOCK), dtype=np.uint8))


def write_coco_stuff_real_size(root: str) -> Dict[str, List[str]]:
    """coco/{train2017,val2017}/*.jpg and the raw stuffthingmaps, as downloaded; each image's
    colour follows its label (one colour per raw value, plus noise). Returns the image paths."""
    palette = np.random.default_rng(0).integers(0, 256, (256, 3))
    images: Dict[str, List[str]] = {}
    for split, n in (("train2017", N_TRAIN), ("val2017", N_VAL)):
        images[split] = []
        for k in range(n):
            stem = f"{k + 1 + (0 if split == 'train2017' else 100):012d}"
            label = blocky_label(COCO_RAW_VALUES, shift=3 * k + (split == "val2017"))
            noise = np.random.default_rng(k).normal(0, 20, (HEIGHT, WIDTH, 3))
            rgb = np.clip(palette[label] + noise, 0, 255).astype(np.uint8)
            path = os.path.join(root, "coco", split, stem + ".jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(rgb).save(path, quality=90)
            images[split].append(path)
            raw = os.path.join(root, "coco", "stuffthingmaps_trainval2017", split, stem + ".png")
            write_label(raw, label)
    return images


def run_timed(step: str, args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    TIMINGS[step] = time.monotonic() - start
    return proc


def failure(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module", autouse=True)
def report_timings(request):
    """Print the time of each step on the terminal at the end (past pytest's output capture)."""
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not TIMINGS or capture is None:
        return
    with capture.global_and_fixture_disabled():
        print()
        for step, seconds in TIMINGS.items():
            print(f"[real-size smoke] {step}: {seconds:.1f} s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared datasets, the two weight files and the command environment."""
    import open_clip
    import torchvision

    start = time.monotonic()
    root = tmp_path_factory.mktemp("real_size")
    datasets = str(root / "datasets")
    images = write_coco_stuff_real_size(datasets)
    prepare = import_prepare_script("prepare_coco_stuff")
    prepare.prepare_coco_stuff(root=datasets, workers=0, progress=False)

    # stands in for OpenAI's ViT-B/16 (its weights cannot be downloaded here)
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    clip_file = str(root / "ViT-B-16.pt")
    torch.save(clip.state_dict(), clip_file)
    del clip

    # stands in for detectron2://ImageNetPretrained/torchvision/R-50.pkl, made as users make R-101
    resnet = torchvision.models.resnet50(weights=None)
    torchvision_file = str(root / "resnet50.pth")
    torch.save(resnet.state_dict(), torchvision_file)
    r50 = str(root / "R-50.pkl")
    env = dict(os.environ)
    env.update(
        DETECTRON2_DATASETS=datasets,
        C2S_CACHE=str(root / "c2s_cache"),  # fresh: the text embeddings are encoded here
        FVCORE_CACHE=str(root / "fvcore_cache"),  # nothing from a user's download cache
        PYTHONPATH=REPO_ROOT,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
    )
    proc = subprocess.run(
        [sys.executable, "tools/convert_torchvision_to_d2.py", torchvision_file, r50],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, failure(proc)
    TIMINGS["fixtures, CLIP file, R-50 conversion"] = time.monotonic() - start
    yield {
        "root": root,
        "env": env,
        "images": images,
        "clip_file": clip_file,
        "r50": r50,
        "resnet_conv": resnet.state_dict()["layer1.0.conv1.weight"].clone(),
    }
    for big in (clip_file, torchvision_file, r50):  # about 1 GB: not kept in pytest's temp
        if os.path.exists(big):
            os.remove(big)


def common_opts(setup) -> List[str]:
    return [
        "MODEL.DEVICE", "cpu",
        "DATALOADER.NUM_WORKERS", "0",
        "MODEL.CLIP.PRETRAINED", setup["clip_file"],
        # an open_clip state dict does not record the activation; OpenAI's ViT-B/16 (the
        # config's tag) was trained with QuickGELU
        "MODEL.CLIP.QUICK_GELU", "true",
        # one prompt per name: the config's imagenet80 would be 80 x ~1240 names (the classes
        # and the ImageNet latent vocabulary) = 99k prompts, about 2 h of text encoding on CPU
        "MODEL.CLIP.TEXT_TEMPLATES", "single",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(setup):
    out = str(setup["root"] / "train")
    proc = run_timed(
        "train_net.py, 2 iterations of batch 2 (with text encoding, final evaluation)",
        ["train_net.py", "--config-file", CONFIG, *common_opts(setup),
         "MODEL.WEIGHTS", setup["r50"], "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
         "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out],
        setup["env"],
    )  # fmt: skip
    yield {"proc": proc, "out": out}
    for name in os.listdir(out) if os.path.isdir(out) else ():
        if name.endswith(".pth"):
            os.remove(os.path.join(out, name))


@pytest.fixture(scope="module")
def evaluated(setup, trained):
    assert trained["proc"].returncode == 0, failure(trained["proc"])
    out = str(setup["root"] / "eval")
    weights = os.path.join(trained["out"], "model_final.pth")
    proc = run_timed(
        "train_net.py --eval-only on 2 val images",
        ["train_net.py", "--config-file", CONFIG, "--eval-only", *common_opts(setup),
         "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out],
        setup["env"],
    )  # fmt: skip
    return {"proc": proc, "out": out, "weights": weights}


@pytest.fixture(scope="module")
def demo_run(setup, trained):
    assert trained["proc"].returncode == 0, failure(trained["proc"])
    image = setup["images"]["val2017"][0]
    out = str(setup["root"] / "demo")
    proc = run_timed(
        "demo/demo.py on one val image",
        ["demo/demo.py", "--config-file", CONFIG, "--input", image, "--output", out,
         "--opts", *common_opts(setup),
         "MODEL.WEIGHTS", os.path.join(trained["out"], "model_final.pth")],
        setup["env"],
    )  # fmt: skip
    return {"proc": proc, "image": image, "out": out}


def test_training_writes_final_checkpoint_with_finite_losses(setup, trained):
    proc, out = trained["proc"], trained["out"]
    assert proc.returncode == 0, failure(proc)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    # detectron2 writes the last iteration's losses at the end (then the final evaluation's
    # metrics, under iteration 2)
    training = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in training] == [1], records  # 2 iterations: 0 and 1
    losses = {k: v for k, v in training[0].items() if "loss" in k}
    # full C2S: the distillation terms are trained too, not only the segmentation losses
    assert {"loss_global_distill", "loss_local_distill"} <= set(losses), sorted(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses


def test_training_started_from_the_converted_r50(setup, trained):
    """The converted torchvision file reached the backbone (detectron2's name matching): after
    2 steps at the backbone's learning rate (1e-5) its weights are still those of the file."""
    assert trained["proc"].returncode == 0, failure(trained["proc"])
    state = torch.load(
        os.path.join(trained["out"], "model_final.pth"), map_location="cpu", weights_only=False
    )["model"]
    (key,) = [k for k in state if k.endswith("backbone.res2.0.conv1.weight")]
    expected = setup["resnet_conv"]
    assert state[key].shape == expected.shape
    assert torch.allclose(state[key], expected, atol=1e-3), float(
        (state[key] - expected).abs().max()
    )


def test_eval_only_prints_zero_shot_headline(evaluated):
    proc = evaluated["proc"]
    assert proc.returncode == 0, failure(proc)
    assert f"Loading from {evaluated['weights']}" in proc.stdout + proc.stderr
    printed = re.findall(HEADLINE, proc.stdout, re.MULTILINE)
    assert len(printed) == 1, proc.stdout[-3000:]
    path = os.path.join(evaluated["out"], "inference", VAL_NAME, "sem_seg_metrics.json")
    with open(path) as f:
        metrics = json.load(f)
    keys = ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU")
    assert list(printed[0]) == [f"{metrics[k]:.1f}" for k in keys]


def test_demo_writes_overlay_of_image_size(demo_run):
    proc = demo_run["proc"]
    assert proc.returncode == 0, failure(proc)
    stem = os.path.splitext(os.path.basename(demo_run["image"]))[0]
    written = os.path.join(demo_run["out"], stem + ".png")
    assert f"{demo_run['image']} -> {written}:" in proc.stdout, proc.stdout[-3000:]
    with Image.open(written) as overlay:
        assert overlay.size == (WIDTH, HEIGHT)
