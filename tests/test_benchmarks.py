"""COCO-Stuff / VOC / Context: class data, preparation scripts, lazy registration, configs."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import c2s_d2.data.datasets.builtin_benchmarks as bb
from c2s_d2.config import add_c2s_config
from c2s_d2.data.zero_shot import DatasetNotPreparedError, apply_label_lut
from fixtures_benchmarks import (
    REPO_ROOT,
    import_prepare_script,
    write_coco_stuff_fixture,
    write_pcontext_fixture,
    write_voc_fixture,
)

common = import_prepare_script("_prepare_common")
prep_coco = import_prepare_script("prepare_coco_stuff")
prep_voc = import_prepare_script("prepare_voc")
prep_context = import_prepare_script("prepare_pcontext")

# Hand-built raw -> dataset id maps for every raw value the fixtures write.
COCO_MAP = {0: 0, 11: 255, 20: 19, 24: 23, 32: 28, 33: 29, 40: 36, 56: 51, 86: 76, 91: 80,
            99: 88, 105: 94, 123: 112, 144: 133, 147: 136, 148: 137, 168: 157, 171: 160,
            181: 170, 255: 255}  # fmt: skip
VOC_MAP = {0: 255, 1: 0, 5: 4, 15: 14, 16: 15, 17: 16, 18: 17, 19: 18, 20: 19, 255: 255}
CONTEXT_MAP = {0: 255, 1: 0, 7: 6, 8: 7, 15: 14, 20: 19, 25: 24, 32: 31, 34: 33, 49: 48,
               55: 54, 59: 58, 255: 255}  # fmt: skip
COCO_UNSEEN = [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]
COCO_UNSEEN_RAW = [20, 24, 32, 33, 40, 56, 86, 99, 105, 123, 144, 147, 148, 168, 171]
COCO_UNSEEN_NAMES = ["cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors",
                     "cardboard", "clouds", "grass", "playingfield", "river", "road", "tree",
                     "wall-concrete"]  # fmt: skip
VOC_UNSEEN_NAMES = ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]
CONTEXT_UNSEEN = [19, 33, 48, 14, 7, 24, 6, 54, 31, 0]
CONTEXT_UNSEEN_NAMES = ["cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tvmonitor",
                        "keyboard", "aeroplane"]  # fmt: skip


def expected(raw: np.ndarray, mapping: dict) -> np.ndarray:
    return np.vectorize(mapping.__getitem__, otypes=[np.uint8])(raw)


def read_png(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


# ----------------------------------------------------------------------------- class data
def test_class_lists_and_splits_match_benchmarks_md():
    coco, voc, context = (bb.load_class_data(d) for d in ("coco_stuff", "voc", "pcontext"))
    assert (len(coco.class_names), len(voc.class_names), len(context.class_names)) == (171, 20, 59)
    assert list(coco.unseen_ids) == COCO_UNSEEN
    assert [coco.class_names[i] for i in COCO_UNSEEN] == COCO_UNSEEN_NAMES
    assert [coco.raw_ids[i] for i in COCO_UNSEEN] == COCO_UNSEEN_RAW
    # 80 things (COCO ids 1..90 with gaps, raw = id - 1) then the 91 stuff raw ids 91..181
    assert (
        coco.raw_ids[:3] == (0, 1, 2) and coco.raw_ids[79] == 89 and len(set(coco.raw_ids)) == 171
    )
    assert list(coco.raw_ids[80:]) == list(range(91, 182))
    assert coco.class_names[80] == "banner" and coco.class_names[170] == "wood"
    assert list(voc.unseen_ids) == [15, 16, 17, 18, 19]
    assert [voc.class_names[i] for i in voc.unseen_ids] == VOC_UNSEEN_NAMES
    assert sorted(context.unseen_ids) == sorted(CONTEXT_UNSEEN)
    assert [context.class_names[i] for i in CONTEXT_UNSEEN] == CONTEXT_UNSEEN_NAMES
    assert voc.raw_ids is None


def test_text_names_are_readable_and_distinct():
    voc, coco = bb.load_class_data("voc"), bb.load_class_data("coco_stuff")
    synonyms = dict(zip(voc.class_names, voc.text_names))
    assert synonyms["pottedplant"][0] == "potted plant"
    assert synonyms["tvmonitor"] == ("tv monitor", "television")
    coco_syn = dict(zip(coco.class_names, coco.text_names))
    assert coco_syn["wall-concrete"] == ("concrete wall",)
    assert coco_syn["playingfield"][0] == "playing field"
    assert coco_syn["building-other"] == ("building",)
    for data in (voc, coco, bb.load_class_data("pcontext")):
        flat = [s for syn in data.text_names for s in syn]
        assert len(flat) == len(set(flat)), "a synonym names two classes"
    cases = {"tree-merged": "tree", "wall-other-merged": "wall", "desk-stuff": "desk",
             "floor-wood": "wood floor", "window-blind": "window blind", "tvmonitor": "tv monitor"}  # fmt: skip
    assert {k: bb.readable_class_name(k) for k in cases} == cases


def test_class_data_mismatch_is_refused(tmp_path, monkeypatch):
    text = open(os.path.join(bb._DATA_DIR, "voc.json")).read()
    (tmp_path / "voc.json").write_text(text.replace('"unseen_ids": [15', '"unseen_ids": [14'))
    monkeypatch.setattr(bb, "_DATA_DIR", str(tmp_path))
    bb.load_class_data.cache_clear()
    try:
        with pytest.raises(ValueError, match="voc.json.*unseen"):
            bb.load_class_data("voc")
    finally:
        bb.load_class_data.cache_clear()


# ----------------------------------------------------------------------------- registration
def test_registration_is_lazy_and_names_the_prepare_command(tmp_path, monkeypatch):
    names = [s.name for s in bb.BENCHMARK_SPLITS]
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    def no_disk(*args, **kwargs):
        raise AssertionError("registration touched the disk")

    with monkeypatch.context() as m:
        for fn in ("isdir", "isfile", "exists"):
            m.setattr(os.path, fn, no_disk)
        m.setattr(os, "listdir", no_disk)
        assert bb.register_all_benchmarks() == names
    assert bb.register_all_benchmarks() == []  # idempotent
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(DatasetNotPreparedError) as e:
        DatasetCatalog.get("c2s_coco_stuff_val")
    assert str(tmp_path / "coco" / "val2017") in str(e.value)
    assert f"python datasets/prepare_coco_stuff.py --root {tmp_path}" in str(e.value)
    with pytest.raises(DatasetNotPreparedError, match="train_aug.txt.*prepare_voc.py"):
        DatasetCatalog.get("c2s_voc_train")


def check_loaded(dataset, splits, labels, mapping, monkeypatch, root):
    """Records of both registered splits hold the hand-mapped labels; training LUT hides unseen."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    data = bb.load_class_data(dataset)
    for name, raw_split in splits:
        records = DatasetCatalog.get(name)
        assert sorted(r["image_id"] for r in records) == sorted(labels[raw_split])
        for r in records:
            assert os.path.isfile(r["file_name"])
            label = read_png(r["sem_seg_file_name"])
            np.testing.assert_array_equal(
                label, expected(labels[raw_split][r["image_id"]], mapping)
            )
    eval_meta, train_meta = MetadataCatalog.get(splits[1][0]), MetadataCatalog.get(splits[0][0])
    assert eval_meta.stuff_classes == list(data.class_names)
    assert eval_meta.unseen_class_ids == sorted(data.unseen_ids)
    seen = [n for i, n in enumerate(data.class_names) if i not in data.unseen_ids]
    assert train_meta.stuff_classes == seen
    assert not set(train_meta.stuff_classes) & {data.class_names[i] for i in data.unseen_ids}
    lut = np.asarray(train_meta.label_lut)
    assert all(lut[i] == 255 for i in data.unseen_ids) and lut[255] == 255
    return lut, label


def test_coco_stuff_prepare_and_load(tmp_path, monkeypatch):
    labels = write_coco_stuff_fixture(str(tmp_path))
    summaries = prep_coco.prepare_coco_stuff(root=str(tmp_path), progress=False)
    assert [(s.name, s.written, s.skipped) for s in summaries] == [
        ("train2017", 3, 0),
        ("val2017", 2, 0),
    ]
    wood = sum((expected(x, COCO_MAP) == 170).sum() for x in labels["train2017"].values())
    assert summaries[0].pixel_counts[170] == wood > 0
    splits = [("c2s_coco_stuff_train", "train2017"), ("c2s_coco_stuff_val", "val2017")]
    lut, label = check_loaded("coco_stuff", splits, labels, COCO_MAP, monkeypatch, tmp_path)
    # hand-checked training ids: seen 0 -> 0, banner 80 -> 73 (7 unseen ids below), wood 170 -> 155
    assert (lut[0], lut[80], lut[170]) == (0, 73, 155)
    train = apply_label_lut(label, lut)
    assert set(np.unique(train[np.isin(label, COCO_UNSEEN)])) == {255}
    assert set(np.unique(train)) == {0, 73, 155, 255}


def test_voc_prepare_reads_palette_indices_and_builds_train_aug(tmp_path, monkeypatch):
    labels = write_voc_fixture(str(tmp_path))
    summaries = prep_voc.prepare_voc(root=str(tmp_path), progress=False)
    assert [(s.name, s.written) for s in summaries] == [("train_aug", 3), ("val", 2)]
    out = tmp_path / "VOCdevkit" / "VOC2012" / "annotations_detectron2"
    assert (out / "train_aug.txt").read_text().split() == [
        "2007_000032",
        "2008_000002",
        "2008_000003",
    ]
    assert (out / "val.txt").read_text().split() == ["2007_000033", "2007_000042"]
    splits = [("c2s_voc_train", "train_aug"), ("c2s_voc_val", "val")]
    lut, label = check_loaded("voc", splits, labels, VOC_MAP, monkeypatch, tmp_path)
    assert list(lut[:20]) == list(range(15)) + [255] * 5
    assert set(np.unique(apply_label_lut(label, lut))) == {0, 4, 14, 255}


def test_voc_trainaug_list_is_used_minus_val(tmp_path):
    write_voc_fixture(str(tmp_path), trainaug_list=True)
    os.remove(tmp_path / "VOCdevkit/VOC2012/SegmentationClassAug/2008_000003.png")
    with pytest.raises(common.PrepareError, match="no label for image 2008_000003"):
        prep_voc.prepare_voc(root=str(tmp_path), progress=False)
    write_voc_fixture(str(tmp_path), trainaug_list=True)
    prep_voc.prepare_voc(root=str(tmp_path), progress=False)
    listed = (tmp_path / "VOCdevkit/VOC2012/annotations_detectron2/train_aug.txt").read_text()
    assert listed.split() == ["2007_000032", "2008_000002", "2008_000003"]  # val image dropped


def test_pcontext_prepare_and_load(tmp_path, monkeypatch):
    labels = write_pcontext_fixture(str(tmp_path))
    prep_context.prepare_pcontext(root=str(tmp_path), progress=False)
    splits = [("c2s_pcontext_train", "train"), ("c2s_pcontext_val", "val")]
    lut, label = check_loaded("pcontext", splits, labels, CONTEXT_MAP, monkeypatch, tmp_path)
    assert (lut[0], lut[1], lut[58]) == (255, 0, 48)


# ----------------------------------------------------------------------------- idempotence, errors
def test_rerun_skips_and_repairs_truncated_output(tmp_path):
    labels = write_pcontext_fixture(str(tmp_path))
    prep_context.prepare_pcontext(root=str(tmp_path), progress=False)
    out = tmp_path / "VOCdevkit/VOC2010/annotations_detectron2/pc59_val/2008_000008.png"
    data = out.read_bytes()
    out.write_bytes(data[:-6])  # cut inside the final IEND chunk: pixels still decode
    (out.parent / "2008_000015.png.tmp-123").write_bytes(b"partial")
    train, val = prep_context.prepare_pcontext(root=str(tmp_path), progress=False)
    assert (train.written, train.skipped, train.repaired) == (0, 3, 0)
    assert (val.written, val.skipped, val.repaired) == (0, 1, 1)
    assert out.read_bytes() == data
    assert not (out.parent / "2008_000015.png.tmp-123").exists()
    np.testing.assert_array_equal(
        read_png(out), expected(labels["val"]["2008_000008"], CONTEXT_MAP)
    )
    # pixel counts cover skipped files too
    assert val.pixel_counts[255] == sum(
        (expected(x, CONTEXT_MAP) == 255).sum() for x in labels["val"].values()
    )


def test_missing_folder_and_corrupt_input_errors(tmp_path):
    with pytest.raises(
        common.PrepareError, match="folder not found: .*stuffthingmaps_trainval2017"
    ):
        prep_coco.prepare_coco_stuff(root=str(tmp_path), progress=False)
    write_voc_fixture(str(tmp_path))
    bad = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000042.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(common.PrepareError, match=f"corrupt label file {bad}"):
        prep_voc.prepare_voc(root=str(tmp_path), progress=False)
    Image.new("RGB", (16, 16)).save(bad)
    with pytest.raises(common.PrepareError, match=f"{bad} has mode 'RGB'"):
        prep_voc.prepare_voc(root=str(tmp_path), progress=False)
    Image.fromarray(np.full((16, 16), 21, np.uint8)).save(bad)
    with pytest.raises(common.PrepareError, match=r"holds values \[21\]"):
        prep_voc.prepare_voc(root=str(tmp_path), progress=False)


def test_cli_runs_in_parallel_and_fails_with_one_line(tmp_path):
    write_coco_stuff_fixture(str(tmp_path))
    script = os.path.join(REPO_ROOT, "datasets", "prepare_coco_stuff.py")
    cmd = [sys.executable, script, "--root", str(tmp_path), "--workers", "2", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "train2017: 3 / 0 / 0" in run.stdout and "val2017: 2 / 0 / 0" in run.stdout
    assert "wall-concrete" in run.stdout and "classes without any pixel" in run.stdout
    shutil.rmtree(tmp_path / "coco" / "stuffthingmaps_trainval2017" / "val2017")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    missing = str(tmp_path / "coco" / "stuffthingmaps_trainval2017" / "val2017")
    assert run.stderr.strip().count("\n") == 0 and missing in run.stderr


# ----------------------------------------------------------------------------- configs
CONFIGS = [
    ("coco_stuff", "c2s_coco_stuff", 80000, 32),
    ("voc", "c2s_voc", 20000, 16),
    ("pcontext", "c2s_pcontext", 40000, 16),
]


@pytest.mark.parametrize("dataset,prefix,max_iter,batch", CONFIGS)
def test_configs_merge(dataset, prefix, max_iter, batch):
    for depth in (50, 101):
        cfg = get_cfg()
        add_c2s_config(cfg)
        cfg.merge_from_file(
            os.path.join(REPO_ROOT, "configs", dataset, f"zs_baseline_R{depth}.yaml")
        )
        assert cfg.DATASETS.TRAIN == (f"{prefix}_train",)
        assert cfg.DATASETS.TEST == (f"{prefix}_val",)
        assert all(name in DatasetCatalog.list() for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH) == (max_iter, batch)
        assert cfg.MODEL.RESNETS.DEPTH == depth and tuple(cfg.INPUT.CROP.SIZE) == (512, 512)
        assert cfg.INPUT.CROP.TYPE == "absolute" and cfg.INPUT.SIZE_DIVISIBILITY == 512
        assert cfg.MODEL.C2S.NUM_OBJECT_QUERIES == 100
        assert cfg.MODEL.CLIP.TEXT_TEMPLATES == "imagenet80"
        assert cfg.MODEL.WEIGHTS.endswith(f"R-{depth}.pkl")
