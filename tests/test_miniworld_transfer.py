"""The transfer mini-world (c2s_d2.data.miniworld_transfer) and the teacher's 22-material palette:
new materials reach only the teacher's scenes and the transfer set, never the student."""

import json
import os

import numpy as np
import pytest

from c2s_d2.data import miniworld as mw
from c2s_d2.data import miniworld_transfer as mt


@pytest.fixture
def tiny_worlds(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("C2S_MINIWORLD_NUM_TRAIN", "24")
    monkeypatch.setenv("C2S_MINIWORLD_NUM_VAL", "4")
    monkeypatch.setenv("C2S_MINIWORLD_SIZE", "48")
    monkeypatch.setenv("C2S_MINIWORLD_TEACHER_NUM_TRAIN", "30")
    monkeypatch.setenv("C2S_MINIWORLD_TRANSFER_NUM_VAL", "25")
    return tmp_path


def test_new_names_are_not_mini_world_names_in_any_form():
    from c2s_d2.data.class_names import compact_forms

    old = set().union(*(compact_forms(n) for n in mw.MINIWORLD_CLASSES))
    for name in mw.TRANSFER_CLASSES:
        assert not compact_forms(name) & old, name
    assert mt.TRANSFER_WORLD_CLASSES[: len(mw.MINIWORLD_CLASSES)] == mw.MINIWORLD_CLASSES
    assert [mt.TRANSFER_WORLD_CLASSES[i] for i in mt.NEW_IDS] == mw.TRANSFER_CLASSES
    assert mt.NEW_IDS == [16, 17, 18, 19, 20, 21]
    assert mw.palette_classes("teacher") == mt.TRANSFER_WORLD_CLASSES
    with pytest.raises(ValueError, match="unknown mini-world palette 'nope'"):
        mw.palette_classes("nope")


def test_student_scenes_never_draw_a_new_material_the_teachers_do():
    student = [mw.render_scene(0, "train", i, 32) for i in range(40)]
    assert all(
        max(present) < 16 and (label[label != 255] < 16).all() for _, label, present in student
    )
    teacher = [mw.render_scene(1000, "train", i, 32, palette="teacher") for i in range(40)]
    with_new = [present for _, _, present in teacher if max(present) >= 16]
    assert len(with_new) >= 10  # 6 of 22 materials: most scenes of 2-6 hold one
    caption = mw.caption_for(with_new[0], "teacher")
    assert any(name in caption for name in mw.TRANSFER_CLASSES)
    with pytest.raises(ValueError, match="material_id 16 outside 0..15"):
        mw.render_material_patch(16, 16, np.random.default_rng(0))
    patch = mw.render_material_patch(16, 16, np.random.default_rng(0), palette="teacher")
    assert patch.shape == (16, 16, 3) and patch.dtype == np.uint8


def test_cut_by_quantiles_gives_the_drawn_shares():
    rng = np.random.default_rng(0)
    value = np.arange(10000, dtype=np.float64).reshape(100, 100)
    for k in (2, 3, 5):
        regions = mt._cut_by_quantiles(rng, value, k)
        shares = np.bincount(regions.ravel(), minlength=k) / value.size
        assert len(shares) == k and shares.min() >= mt._MIN_SHARE - 1e-3
        # regions are bands of increasing value: region r holds smaller values than r + 1
        assert all(value[regions == r].max() < value[regions == r + 1].min() for r in range(k - 1))


def test_transfer_scenes_layouts_labels_and_lighting():
    layouts, present_all = set(), set()
    for i in range(44):
        image, label, present, layout = mt.render_transfer_scene(mt.TRANSFER_SEED, i, 64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert set(np.unique(label)) - {255} == set(present)
        assert 2 <= len(present) <= 5
        assert (label == 255).mean() < 0.15  # only 1-px region borders are unlabelled
        layouts.add(layout)
        present_all.update(present)
    assert layouts == set(mt.LAYOUTS)
    assert present_all == set(range(22))  # the anchor cycles through every class
    a = mt.render_transfer_scene(mt.TRANSFER_SEED, 3, 64)
    b = mt.render_transfer_scene(mt.TRANSFER_SEED, 3, 64)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()  # seeded per scene
    # a transfer scene is none of the mini-world's (its RNG stream differs for any seed)
    assert not (mw.render_scene(mt.TRANSFER_SEED, "val", 3, 64)[0] == a[0]).all()


def test_transfer_set_registers_generates_and_is_refused_as_student_seed(tiny_worlds, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from c2s_d2.data.datasets.register_miniworld import TRANSFER_DATASET

    records = DatasetCatalog.get(TRANSFER_DATASET)
    assert len(records) == 25
    meta = MetadataCatalog.get(TRANSFER_DATASET)
    assert list(meta.stuff_classes) == mt.TRANSFER_WORLD_CLASSES
    assert list(meta.unseen_class_ids) == mt.NEW_IDS
    root = tiny_worlds / "datasets" / "miniworld_transfer"
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["params"] == {"num_val": 25, "size": 48, "seed": mt.TRANSFER_SEED}
    assert all(str(root) in r["file_name"] for r in records)
    monkeypatch.setenv("C2S_MINIWORLD_SEED", str(mt.TRANSFER_SEED))
    with pytest.raises(ValueError, match="seed of the transfer mini-world"):
        DatasetCatalog.get("c2s_miniworld_train")
    with pytest.raises(ValueError, match="num_val=0"):
        mt.ensure_transfer_world(str(tiny_worlds / "x"), num_val=0)


def test_new_names_never_reach_the_student(tiny_worlds):
    """Student captions and labels hold none of the 6; the latent vocabulary drops their
    relatives (they are unseen names of a registered dataset)."""
    from detectron2.data import DatasetCatalog

    from c2s_d2.modeling.distillation.latent_vocabulary import (
        build_latent_vocabulary,
        unseen_names_of_registered_datasets,
    )

    DatasetCatalog.get("c2s_miniworld_train")  # generates the student's mini-world
    root = tiny_worlds / "datasets" / "miniworld"
    for split in ("train", "val"):
        captions = json.loads((root / f"captions_{split}.json").read_text())
        text = " ".join(captions.values())
        assert not any(name in text for name in mw.TRANSFER_CLASSES)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["classes"] == mw.MINIWORLD_CLASSES
    excluded = unseen_names_of_registered_datasets()
    assert set(mw.TRANSFER_CLASSES) <= set(excluded)
    names, removed = build_latent_vocabulary("imagenet", excluded)
    for relative in ("coral reef", "brain coral", "coral fungus"):
        assert relative in removed and relative not in names


def test_teacher_folder_of_another_palette_is_regenerated(tiny_worlds):
    root = str(tiny_worlds / "teacher_like")
    old = mw.ensure_miniworld(root, num_train=6, num_val=1, size=32, seed=1000)
    assert old["classes"] == mw.MINIWORLD_CLASSES
    new = mw.ensure_miniworld(root, palette="teacher", num_train=6, num_val=1, size=32, seed=1000)
    assert new["classes"] == mw.palette_classes("teacher") and new["palette"] == "teacher"
    again = mw.ensure_miniworld(root, palette="teacher", num_train=6, num_val=1, size=32, seed=1000)
    assert again == new
    assert os.path.isfile(os.path.join(root, "captions_train.json"))
