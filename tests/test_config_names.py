"""Config names state batch size and schedule (``<model>_bs<N>_<iters>.yaml``, as Mask2Former
names its configs); the old names are one-line aliases that resolve to the identical config."""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, Tuple

import pytest
import yaml
from detectron2.config import get_cfg

from c2s_d2 import add_c2s_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

# old name -> new name (paths under configs/)
RENAMED: Dict[str, str] = {
    "miniworld/zs_baseline_R18.yaml": "miniworld/zs_baseline_R18_bs8_1k.yaml",
    "miniworld/c2s_full_R18.yaml": "miniworld/c2s_full_R18_bs8_1k.yaml",
    "miniworld/c2s_global_R18.yaml": "miniworld/c2s_global_R18_bs8_1k.yaml",
    "miniworld/c2s_local_R18.yaml": "miniworld/c2s_local_R18_bs8_1k.yaml",
    "miniworld/c2s_local_nolatent_R18.yaml": "miniworld/c2s_local_nolatent_R18_bs8_1k.yaml",
    "coco_stuff/zs_baseline_R50.yaml": "coco_stuff/zs_baseline_R50_bs32_80k.yaml",
    "coco_stuff/zs_baseline_R101.yaml": "coco_stuff/zs_baseline_R101_bs32_80k.yaml",
    "coco_stuff/c2s_R50.yaml": "coco_stuff/c2s_R50_bs32_80k.yaml",
    "voc/zs_baseline_R50.yaml": "voc/zs_baseline_R50_bs16_20k.yaml",
    "voc/zs_baseline_R101.yaml": "voc/zs_baseline_R101_bs16_20k.yaml",
    "voc/c2s_R50.yaml": "voc/c2s_R50_bs16_20k.yaml",
    "pcontext/zs_baseline_R50.yaml": "pcontext/zs_baseline_R50_bs16_40k.yaml",
    "pcontext/zs_baseline_R101.yaml": "pcontext/zs_baseline_R101_bs16_40k.yaml",
    "pcontext/c2s_R50.yaml": "pcontext/c2s_R50_bs16_40k.yaml",
}
# configs without a training schedule of their own (used with --eval-only): no bs / iters in the
# name; config -> the inference mode it must set ("student": the student, on other test sets)
EVAL_ONLY = {
    "miniworld/teacher_dense.yaml": "teacher_dense",
    "miniworld/two_stage_R18.yaml": "two_stage",
    "coco_stuff/transfer_eval.yaml": "student",
}
NAME_RE = re.compile(r"_bs(\d+)_(\d+)(k?)\.yaml$")


def resolved(rel: str):
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, rel))
    return cfg


def batch_and_iters(rel: str) -> Tuple[int, int]:
    """(batch, iterations) that the file name states: ``_bs8_1k`` -> (8, 1000)."""
    m = NAME_RE.search(rel)
    assert m, f"{rel}: name does not end in _bs<N>_<iters>.yaml"
    return int(m.group(1)), int(m.group(2)) * (1000 if m.group(3) else 1)


def test_name_parser_on_hand_examples():
    assert batch_and_iters("coco_stuff/c2s_R50_bs32_80k.yaml") == (32, 80000)
    assert batch_and_iters("x/y_bs16_500.yaml") == (16, 500)
    with pytest.raises(AssertionError):
        batch_and_iters("miniworld/c2s_full_R18.yaml")


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_name_is_a_one_line_alias_of_the_new(old):
    new = RENAMED[old]
    with open(os.path.join(CONFIGS, old)) as f:
        text = f.read()
    assert yaml.safe_load(text) == {"_BASE_": os.path.basename(new)}
    assert f"renamed to {os.path.basename(new)}" in text
    assert resolved(old).dump() == resolved(new).dump()


@pytest.mark.parametrize("new", sorted(RENAMED.values()))
def test_new_name_states_resolved_batch_and_schedule(new):
    cfg = resolved(new)
    assert batch_and_iters(new) == (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER)
    # a renamed config never chains through an alias
    with open(os.path.join(CONFIGS, new)) as f:
        base = yaml.safe_load(f)["_BASE_"]
    assert os.path.join(os.path.dirname(new), base) not in RENAMED


def test_every_config_is_named_alias_or_eval_only():
    for path in sorted(glob.glob(os.path.join(CONFIGS, "*", "*.yaml"))):
        rel = os.path.relpath(path, CONFIGS)
        if os.path.basename(rel).startswith("Base-") or rel in RENAMED:
            continue
        if rel in EVAL_ONLY:
            assert resolved(rel).MODEL.C2S.INFERENCE_MODE == EVAL_ONLY[rel], rel
            continue
        assert NAME_RE.search(rel), (
            f"configs/{rel}: name a training config <variant>_<backbone>_bs<N>_<iters>.yaml, or "
            f"list an evaluation-only config in EVAL_ONLY of tests/test_config_names.py"
        )
        cfg = resolved(rel)
        assert batch_and_iters(rel) == (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER), rel


def test_eval_only_configs_exist():
    for rel in EVAL_ONLY:
        assert os.path.isfile(os.path.join(CONFIGS, rel)), rel
