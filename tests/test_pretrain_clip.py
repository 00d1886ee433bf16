"""Tests of tools/pretrain_miniworld_clip.py: the loss, the encoders, the data, one tiny run."""

import importlib.util
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from c2s_d2.data.miniworld import IGNORE_LABEL, MINIWORLD_CLASSES
from c2s_d2.modeling.clip.loader import build_open_clip, get_tokenizer
from c2s_d2.modeling.clip.teacher import ClipTeacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "pretrain_miniworld_clip", os.path.join(ROOT, "tools", "pretrain_miniworld_clip.py")
)
pretrain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain)


def test_clip_loss_hand_checked():
    emb = torch.eye(2)  # image i matches text i with cosine 1, the other with 0
    scale = torch.tensor(1.0)
    # distinct groups: CLIP's cross-entropy, -log(e / (e + 1)) in both directions
    distinct = pretrain.multi_positive_clip_loss(emb, emb, scale, ["a", "b"])
    assert distinct.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # one group: each row's target is (1/2, 1/2): -(1/2)(log p_match + log p_other)
    same = pretrain.multi_positive_clip_loss(emb, emb, scale, ["a", "a"])
    assert same.item() == pytest.approx(math.log(1 + math.e) - 0.5, abs=1e-6)


def test_clip_loss_equals_cross_entropy_for_distinct_groups():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    logits = 3.0 * img @ txt.T
    expected = (
        F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))
    ) / 2
    got = pretrain.multi_positive_clip_loss(img, txt, torch.tensor(3.0), list(range(5)))
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_encoders_match_open_clip_and_the_teacher():
    model = build_open_clip("C2S-Tiny", "", random_init_seed=3)
    tokens = get_tokenizer("C2S-Tiny")(["a photo of moss.", "a scene of grass, ice and lava"])
    assert torch.allclose(
        pretrain.encode_text_truncated(model, tokens), model.encode_text(tokens), atol=1e-5
    )
    teacher = ClipTeacher(model)
    images = torch.rand(2, 3, 128, 128) * 255  # 16x16 grid: interpolated positional embeddings
    global_t, dense_t = teacher(images)
    global_s, dense_s = pretrain.encode_image_global_dense(model.visual, teacher.preprocess(images))
    assert torch.allclose(global_s, global_t, atol=1e-5)
    assert torch.allclose(dense_s.transpose(1, 2).reshape(dense_t.shape), dense_t, atol=1e-5)


def test_crop_materials_by_area():
    label = np.full((10, 10), 3, np.uint8)
    label[:, 7:] = 5  # 30 px
    label[0, :] = 7  # 10 px (the 0.15 share cut drops it)
    label[9, :] = IGNORE_LABEL  # not counted
    assert pretrain.materials_by_area(label, 0.15) == [3, 5]
    assert pretrain.materials_by_area(label, 0.0) == [3, 5, 7]
    assert pretrain.materials_by_area(label, 0.99) == [3]  # at least the largest one


def test_bad_input_gets_a_clear_error(tmp_path):
    missing = str(tmp_path / "missing.png")
    with pytest.raises(OSError, match="missing.png"):
        pretrain.read_image(missing)
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--steps", "0"])


class _FakeBank:
    def __init__(self):
        self.images = np.random.default_rng(0).integers(0, 255, (3, 128, 128, 3), dtype=np.uint8)
        self.labels = np.zeros((3, 128, 128), np.uint8)
        self.labels[:, :, 64:] = 9  # grass | ice; a crop of 32..96 px shows one or both
        self.captions = ["a scene of grass and ice"] * 3


def test_sample_batch_is_seeded_and_captions_name_the_materials():
    bank = _FakeBank()
    a = pretrain.sample_batch(bank, np.random.default_rng(1), 20, 64)
    b = pretrain.sample_batch(bank, np.random.default_rng(1), 20, 64)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    images, captions, groups = a
    assert images.shape == (20, 64, 64, 3) and images.dtype == np.uint8
    for caption, group in zip(captions, groups):
        assert len(group) >= 1
        assert all(pretrain.TEACHER_CLASSES[i] in caption for i in group), (caption, group)
    assert all(len(g) == 1 for g in groups[13:])  # 5 scenes, 8 crops, 7 material patches
    assert all(g == {0, 9} for g in groups[:5])  # whole scenes show both materials


def test_crops_of_unlabelled_pixels_are_drawn_again():
    """A crop of clutter / blur only names no material: it is redrawn, never captioned empty
    (a 2-material scene, labelled only in its top-left 24 x 24 px: most crops miss it)."""
    bank = _FakeBank()
    bank.labels[:] = 255
    bank.labels[:, :24, :12], bank.labels[:, :24, 12:24] = 3, 7  # sand | lava
    images, captions, groups = pretrain.sample_batch(bank, np.random.default_rng(2), 40, 64)
    crops = range(10, 26)  # 10 scenes, 16 crops, 14 patches
    for k in crops:
        assert groups[k] and groups[k] <= {3, 7}, (captions[k], groups[k])
        assert all(pretrain.TEACHER_CLASSES[i] in captions[k] for i in groups[k])


@pytest.fixture
def tiny_miniworld(tmp_path, monkeypatch):
    """A 16 + 4 image mini-world in a temporary folder."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("C2S_MINIWORLD_NUM_TRAIN", "16")
    monkeypatch.setenv("C2S_MINIWORLD_NUM_VAL", "4")
    monkeypatch.setenv("C2S_MINIWORLD_TEACHER_NUM_TRAIN", "16")
    monkeypatch.setenv("C2S_MINIWORLD_TRANSFER_NUM_VAL", "4")
    return tmp_path


def _image_digests(records):
    return {
        hashlib.sha256(pretrain.read_image(r["file_name"]).tobytes()).hexdigest() for r in records
    }


def test_teacher_pretrains_on_its_own_scenes_disjoint_from_the_students(tiny_miniworld):
    from detectron2.data import DatasetCatalog

    from c2s_d2.data.datasets.register_miniworld import TEACHER_DATA_SEED, teacher_data_params

    from c2s_d2.data.datasets.register_miniworld import miniworld_params_from_env

    assert teacher_data_params()["seed"] == TEACHER_DATA_SEED != miniworld_params_from_env()["seed"]
    bank = pretrain.SceneBank()
    teacher_records = DatasetCatalog.get(pretrain.TEACHER_DATASET)
    assert len(bank.images) == len(teacher_records) == 16
    assert all("miniworld_teacher" in r["file_name"] for r in teacher_records)
    student = DatasetCatalog.get("c2s_miniworld_train_all") + DatasetCatalog.get(
        "c2s_miniworld_val"
    )
    assert all("miniworld_teacher" not in r["file_name"] for r in student)
    teacher_digests = {hashlib.sha256(im.tobytes()).hexdigest() for im in bank.images}
    assert len(teacher_digests) == 16
    assert not teacher_digests & _image_digests(student)


def test_student_seed_equal_to_the_teachers_is_refused(tiny_miniworld, monkeypatch):
    from detectron2.data import DatasetCatalog

    from c2s_d2.data.datasets.register_miniworld import TEACHER_DATA_SEED

    monkeypatch.setenv("C2S_MINIWORLD_SEED", str(TEACHER_DATA_SEED))
    with pytest.raises(ValueError, match="teacher's pretraining scenes"):
        DatasetCatalog.get("c2s_miniworld_train")


def test_training_is_deterministic_given_the_seed(tiny_miniworld):
    args = pretrain.parse_args(["--quick", "--steps", "3", "--batch-size", "16", "--seed", "5"])
    with pretrain.torch_threads(1):
        runs = [pretrain.train(args) for _ in range(2)]
    states = [model.state_dict() for model, _ in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert runs[0][1]["loss_last"] == runs[1][1]["loss_last"]


def test_quick_run_writes_a_loadable_checkpoint_and_a_report(tiny_miniworld):
    out = str(tiny_miniworld / "clip" / "tiny.pt")
    argv = ["--quick", "--steps", "12", "--batch-size", "48", "--eval-per-material", "3"]
    report = pretrain.main(argv + ["--output", out])

    training = report["training"]
    assert training["steps_done"] == 12
    assert training["loss_last"] < training["loss_first"]
    with open(pretrain.report_path(out), "r", encoding="utf-8") as f:
        saved = json.load(f)
    for kind in ("global", "dense", "global_patch128", "dense_patch128"):
        assert set(saved[kind]) >= {"seen", "unseen", "transfer", "all"}
        assert 0.0 <= saved[kind]["seen"] <= 1.0 and 0.0 <= saved[kind]["unseen"] <= 1.0
        assert list(saved[kind]["per_class"]) == pretrain.TEACHER_CLASSES  # a 22-way choice
    assert "hIoU" in saved["dense_val_segmentation"]
    assert "hIoU" in saved["dense_transfer_segmentation"]

    stored = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    model = build_open_clip("C2S-Tiny-Text32", out)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in stored.items())
    random_init = build_open_clip("C2S-Tiny-Text32", "", random_init_seed=0).state_dict()
    assert not torch.allclose(loaded["visual.proj"], random_init["visual.proj"])
    text_tower = build_open_clip("C2S-Tiny-Text32", out, text_only=True)
    tokens = get_tokenizer("C2S-Tiny-Text32")(["a photo of moss."])
    assert torch.allclose(text_tower.encode_text(tokens), model.encode_text(tokens), atol=1e-5)
    global_emb, dense = ClipTeacher(model, input_size=128)(torch.rand(1, 3, 128, 128) * 255)
    assert global_emb.shape == (1, 64) and dense.shape == (1, 64, 16, 16)


def test_text32_checkpoint_is_small_and_loads(tmp_path):
    """C2S-Tiny-Text32 (text width 32): a float16 checkpoint small enough to ship (< 5 MiB)."""
    model = build_open_clip("C2S-Tiny-Text32", "", random_init_seed=1)
    path = str(tmp_path / "text32.pt")
    pretrain.save_checkpoint(model, path, {"note": "random weights"})
    assert os.path.getsize(path) < 5 * 2**20
    loaded = build_open_clip("C2S-Tiny-Text32", path).state_dict()
    assert all(torch.equal(loaded[k], v.half().float()) for k, v in model.state_dict().items())


def test_shipped_miniworld_teacher_knows_the_unseen_materials():
    """The packaged teacher (C2S-Tiny-Text32 + tag "miniworld", the configs' default) is a small
    file and is the pretrained one: it names unseen materials it was never given labels of, where
    random weights are near chance (1/16)."""
    from c2s_d2.modeling.clip.loader import shipped_weights_file, weights_identity
    from c2s_d2.modeling.clip.text_encoder import text_embeddings

    path = shipped_weights_file("C2S-Tiny-Text32", "miniworld")
    assert os.path.getsize(path) < 5 * 2**20
    assert weights_identity("miniworld", 0, "C2S-Tiny-Text32").startswith("shipped:miniworld:")
    truth = np.repeat(np.arange(len(MINIWORLD_CLASSES)), 4)
    rng = np.random.default_rng(123)
    patches = np.stack([pretrain.render_material_patch(int(c), 64, rng) for c in truth])
    images = torch.from_numpy(patches).permute(0, 3, 1, 2).float()
    accuracy = {}
    for weights in ("miniworld", ""):
        teacher = ClipTeacher(build_open_clip("C2S-Tiny-Text32", weights))
        names = text_embeddings(MINIWORLD_CLASSES, "C2S-Tiny-Text32", weights, templates="short")
        pred = (teacher(images)[0] @ names.T).argmax(1).numpy()
        unseen = np.isin(truth, pretrain.MINIWORLD_UNSEEN_IDS)
        accuracy[weights] = float(np.mean(pred[unseen] == truth[unseen]))
    assert accuracy["miniworld"] >= 0.9, accuracy
    assert accuracy[""] <= 0.5, accuracy


def test_shipped_miniworld_teacher_knows_the_transfer_materials():
    """The teacher's "web" names the 6 materials of the transfer set (no mini-world label or name
    holds them): among the 22 names it picks theirs for their patches."""
    from c2s_d2.modeling.clip.text_encoder import text_embeddings

    classes = pretrain.TEACHER_CLASSES
    truth = np.repeat(np.array(pretrain.GROUPS["transfer"]), 4)
    rng = np.random.default_rng(321)
    patches = np.stack([pretrain.render_material_patch(int(c), 64, rng, "teacher") for c in truth])
    images = torch.from_numpy(patches).permute(0, 3, 1, 2).float()
    teacher = ClipTeacher(build_open_clip("C2S-Tiny-Text32", "miniworld"))
    names = text_embeddings(classes, "C2S-Tiny-Text32", "miniworld", templates="short")
    pred = (teacher(images)[0] @ names.T).argmax(1).numpy()
    assert float(np.mean(pred == truth)) >= 0.9


def test_unknown_tag_lists_the_shipped_one():
    with pytest.raises(ValueError, match="miniworld"):
        build_open_clip("C2S-Tiny-Text32", "no-such-tag")
