"""tools/miniworld_ignored_area.py: the composition adds up to the inductive ignored area."""

import importlib.util
import os

import numpy as np

from c2s_d2.data import miniworld as mw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "miniworld_ignored_area", os.path.join(ROOT, "tools", "miniworld_ignored_area.py")
)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_parts_add_up_to_the_inductive_ignored_area(capsys):
    c = tool.composition(6, seed=0, size=48)
    ignored = strict = 0
    for i in range(6):
        _, label, _ = mw.render_scene(0, "train", i, 48)
        unseen = np.isin(label, mw.MINIWORLD_UNSEEN_IDS)
        ignored += int(((label == 255) | unseen).sum())  # what the training LUT leaves at 255
        strict += int(not unseen.any())
    assert sum(c[key] for _, key in tool.PARTS) == ignored
    assert c["strict_kept"] == strict and c["pixels"] == 6 * 48 * 48
    assert tool.main(["--num", "3", "--size", "48"]) == 0
    out = capsys.readouterr().out
    assert "| unlabelled: clutter of unnamed materials |" in out and "of 3 training" in out
