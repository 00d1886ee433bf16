"""C2S as a whole: a training step of every variant, inference parity with the plain student,
checkpoint compatibility, the inference-only comparisons, and eval-only without the CLIP image
encoder in a fresh process."""

import os
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from fvcore.nn import FlopCountAnalysis

from c2s_d2 import add_c2s_config
from c2s_d2.config import inference_cfg
from c2s_d2.data import C2SSemanticDatasetMapper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "MODEL.CLIP.PRETRAINED", "",
    "MODEL.C2S.DEC_LAYERS", "2",
    "MODEL.C2S.NUM_OBJECT_QUERIES", "8",
    "MODEL.C2S.HIDDEN_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.CONV_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.MASK_DIM", "64",
    "MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE", "64",
    "MODEL.C2S.DISTILL.LATENT.VOCABULARY", "",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
VARIANTS = [
    "zs_baseline_R18",
    "c2s_global_R18",
    "c2s_local_R18",
    "c2s_local_nolatent_R18",
    "c2s_full_R18",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("c2s")
    env = {
        "DETECTRON2_DATASETS": str(root / "datasets"),
        "C2S_MINIWORLD_NUM_TRAIN": "8",
        "C2S_MINIWORLD_NUM_VAL": "2",
    }
    with pytest.MonkeyPatch.context() as mp:  # restores the environment afterwards
        for k, v in env.items():
            mp.setenv(k, v)
        yield root


def make_cfg(name, extra=()):
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/miniworld", name + ".yaml"))
    cfg.merge_from_list(SMALL + list(extra))
    return cfg


def batch(cfg, n=2):
    mapper = C2SSemanticDatasetMapper(cfg, True)
    return [mapper(r) for r in DatasetCatalog.get("c2s_miniworld_train")[:n]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_of_every_variant(world, variant):
    torch.manual_seed(0)
    cfg = make_cfg(variant)
    model = build_model(cfg).train()
    fed = []  # how many latent regions each call gives the latent memory
    memory = getattr(getattr(model, "distiller", None), "latent_memory", None)
    if memory is not None:
        update_and_assign = memory.update_and_assign

        def counting_update_and_assign(regions, **kwargs):
            fed.append(regions.shape[0])
            return update_and_assign(regions, **kwargs)

        memory.update_and_assign = counting_update_and_assign
    losses = model(batch(cfg))
    d = cfg.MODEL.C2S.DISTILL
    assert ("loss_global_distill" in losses) == (d.ENABLED and d.GLOBAL.ENABLED)
    assert ("loss_local_distill" in losses) == (d.ENABLED and d.LOCAL.ENABLED)
    assert {"loss_ce", "loss_mask", "loss_dice"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert any(n.startswith("classifier.class_proj") for n in grads)
    if "loss_global_distill" in losses:
        assert any(n.startswith("distiller.global_proj") for n in grads)
        assert any(n.startswith("query_decoder.global_feat") for n in grads)
    if d.ENABLED and d.LATENT.ENABLED:
        # one call per step; from an empty memory every region it was given is counted once
        assert len(fed) == 1 and int(model.distiller.latent_memory.counts.sum()) == fed[0]
        assert "distiller.latent_memory.prototypes" in model.state_dict()
    # the teacher is never part of the model's weights
    assert not any("teacher" in k or "visual" in k for k in model.state_dict())


def test_inference_parity_with_plain_student(world):
    base = build_model(inference_cfg(make_cfg("zs_baseline_R18"))).eval()
    c2s = build_model(inference_cfg(make_cfg("c2s_full_R18"))).eval()
    n_base = sum(p.numel() for p in base.parameters())
    n_c2s = sum(p.numel() for p in c2s.parameters())
    assert n_base == n_c2s
    inputs = [{"image": torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)}]
    flops = [
        FlopCountAnalysis(m, (inputs,)).unsupported_ops_warnings(False).total() for m in (base, c2s)
    ]
    assert flops[0] == flops[1] > 0
    # while the training model has extra, training-only parameters
    train_model = build_model(make_cfg("c2s_full_R18"))
    assert sum(p.numel() for p in train_model.parameters()) > n_c2s


def test_c2s_checkpoint_loads_into_inference_model(world, tmp_path):
    train_model = build_model(make_cfg("c2s_full_R18"))
    DetectionCheckpointer(train_model, save_dir=str(tmp_path)).save("ckpt")
    model = build_model(inference_cfg(make_cfg("c2s_full_R18")))
    incompatible = model.load_state_dict(torch.load(tmp_path / "ckpt.pth")["model"], strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, train_model.state_dict()[k])


@pytest.mark.parametrize("mode", ["teacher_dense", "two_stage"])
def test_inference_only_comparisons(world, mode):
    cfg = inference_cfg(make_cfg("c2s_full_R18", ["MODEL.C2S.INFERENCE_MODE", mode]))
    model = build_model(cfg).eval()
    model.set_vocabulary(["grass", "water", "moss"])
    out = model([{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)}])[0]["sem_seg"]
    assert out.shape == (3, 96, 128) and torch.isfinite(out).all()
    assert model._teacher is not None  # these comparisons do use the teacher at test time


def test_eval_only_never_builds_clip_image_encoder(world, tmp_path):
    out = tmp_path / "train"
    env = dict(os.environ, PYTHONPATH=ROOT, C2S_CACHE=str(tmp_path / "cache"))
    cfg_file = os.path.join(ROOT, "configs/miniworld/c2s_full_R18.yaml")
    args = ["--config-file", cfg_file]
    subprocess.run(
        [sys.executable, "train_net.py", *args, *SMALL, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )  # fmt: skip
    # a fresh process in which building any CLIP image tower or teacher raises
    script = (
        "import sys, open_clip.model as m, c2s_d2.modeling.clip.teacher as t\n"
        "def boom(*a, **k): raise RuntimeError('CLIP image encoder built at inference')\n"
        "m._build_vision_tower = boom\n"
        "t.ClipTeacher.__init__ = boom\n"
        "sys.argv = ['train_net.py'] + sys.argv[1:]\n"
        "import runpy; runpy.run_path('train_net.py', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *args, "--eval-only", *SMALL, "MODEL.WEIGHTS",
         str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path / "eval")],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mIoU-unseen" in proc.stdout
    assert "CLIP image encoder built" not in proc.stderr
