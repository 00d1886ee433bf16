"""tools/miniworld_confusions.py on hand-made confusion matrices."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))

import miniworld_confusions as mc  # noqa: E402


def test_seen_to_unseen_share_by_hand():
    # classes 0, 1 seen; 2 unseen. rows = gt, cols = prediction.
    conf = np.array([[6, 0, 4], [1, 8, 1], [5, 0, 0]])
    # seen gt pixels: 10 + 10 = 20; predicted unseen: 4 + 1 = 5 -> 25 %
    assert mc.seen_to_unseen_share(conf, [2]) == 25.0


def test_large_confusions_by_hand():
    conf = np.array([[6, 0, 4], [1, 8, 1], [5, 0, 0], [0, 0, 0]])
    conf = np.pad(conf, ((0, 0), (0, 1)))
    # row 0: 4/10 = 40 % -> 2; row 2: 5/5 = 100 % -> 0; row 1: 10 % each; row 3 empty
    assert mc.large_confusions(conf, 30.0) == [(2, 0, 100.0), (0, 2, 40.0)]
    assert mc.large_confusions(conf, 50.0) == [(2, 0, 100.0)]


def test_report_reads_runs(tmp_path):
    n = len(mc.MINIWORLD_CLASSES)
    conf = np.eye(n, dtype=np.int64) * 10
    conf[1, 1], conf[1, 9] = 1, 9  # water -> ice (unseen) 90 %
    path = tmp_path / "c2s_full" / "seed3" / mc.CONFUSION
    path.parent.mkdir(parents=True)
    np.save(path, conf)
    runs = mc.find_runs(str(tmp_path), ["c2s_full", "zs_baseline"])
    assert list(runs) == [("c2s_full", 3)]
    text = mc.report(runs, 30.0)
    seen_total = 10 * (n - len(mc.MINIWORLD_UNSEEN_IDS))
    assert f"| c2s_full | 3 | {100 * 9 / seen_total:.1f} | water -> ice* 90 |" in text
