"""The strict inductive setting: every training image holding an unseen pixel is dropped."""

import os

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from c2s_d2 import add_c2s_config
from c2s_d2.data import C2SSemanticDatasetMapper
from c2s_d2.data.miniworld import MINIWORLD_UNSEEN_IDS
from c2s_d2.data.zero_shot import drop_images_with_unseen_pixels, unseen_dataset_ids
from c2s_d2.engine.train_loader import build_resumable_train_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(root / "datasets"))
        mp.setenv("C2S_MINIWORLD_NUM_TRAIN", "24")
        mp.setenv("C2S_MINIWORLD_NUM_VAL", "2")
        yield root


def _cfg(setting):
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/miniworld/zs_baseline_R18.yaml"))
    cfg.merge_from_list(
        ["DATASETS.ZERO_SHOT_SETTING", setting, "DATALOADER.NUM_WORKERS", "0"]
        + ["SOLVER.IMS_PER_BATCH", "2"]
    )
    return cfg


def test_unseen_dataset_ids_come_from_the_lut():
    lut = [0, 255, 1, 255, 2] + [-1] * 250 + [255]
    assert unseen_dataset_ids(lut, 5) == [1, 3]


def test_drop_images_with_unseen_pixels_by_hand(tmp_path):
    records = []
    for i, values in enumerate([[0, 2, 255], [0, 3], [1, 1], [7]]):
        f = str(tmp_path / f"{i}.png")
        cv2.imwrite(f, np.array([values], np.uint8))
        records.append({"sem_seg_file_name": f, "image_id": str(i)})
    kept = drop_images_with_unseen_pixels(records, [3, 7])
    assert [r["image_id"] for r in kept] == ["0", "2"]
    assert drop_images_with_unseen_pixels(records, []) == records
    with pytest.raises(OSError, match="missing.png"):
        drop_images_with_unseen_pixels([{"sem_seg_file_name": str(tmp_path / "missing.png")}], [3])


def test_strict_training_set_holds_no_unseen_pixel(world):
    all_records = DatasetCatalog.get("c2s_miniworld_train")
    clean = [
        r["image_id"]
        for r in all_records
        if not np.isin(cv2.imread(r["sem_seg_file_name"], 0), MINIWORLD_UNSEEN_IDS).any()
    ]
    assert 0 < len(clean) < len(all_records)
    cfg = _cfg("inductive_strict")
    mapper = C2SSemanticDatasetMapper(cfg, True)
    loader = build_resumable_train_loader(cfg, mapper)
    kept = loader._loader.dataset.dataset._records  # the records the loader draws from
    assert sorted(r["image_id"] for r in kept) == sorted(clean)
    plain = build_resumable_train_loader(_cfg("inductive"), C2SSemanticDatasetMapper(cfg, True))
    assert len(plain._loader.dataset.dataset._records) == len(all_records)


def test_unknown_setting_is_refused(world):
    with pytest.raises(ValueError, match="ZERO_SHOT_SETTING='transductive'"):
        C2SSemanticDatasetMapper(_cfg("transductive"), True)
