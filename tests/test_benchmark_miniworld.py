"""The mini-world benchmark's smallest mode: every variant trains/evaluates and the report is
written (2 iterations, tiny data, a random-weight teacher)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "MODEL.C2S.DEC_LAYERS", "1",
    "MODEL.C2S.NUM_OBJECT_QUERIES", "6",
    "MODEL.C2S.HIDDEN_DIM", "32",
    "MODEL.C2S.PIXEL_DECODER.CONV_DIM", "32",
    "MODEL.C2S.PIXEL_DECODER.MASK_DIM", "32",
    "MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE", "64",
    "MODEL.C2S.DISTILL.LATENT.VOCABULARY", "",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def test_smallest_mode_writes_table_and_chart(tmp_path):
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=str(tmp_path / "datasets"),
        C2S_MINIWORLD_NUM_TRAIN="6",
        C2S_MINIWORLD_NUM_VAL="2",
        C2S_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=ROOT,
    )
    md, chart, js = tmp_path / "B.md", tmp_path / "b.png", tmp_path / "b.json"
    md.write_text("# Benchmarks\n\nother sections stay\n")
    cmd = [sys.executable, "tools/benchmark_miniworld.py", "--seeds", "0", "--iters", "2",
           "--teacher", "", "--output", str(tmp_path / "out"), "--markdown", str(md),
           "--chart", str(chart), "--json", str(js), "--opts", *TINY]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = md.read_text()
    assert table.startswith("# Benchmarks\n\nother sections stay\n")
    assert table.count("<!-- benchmark_miniworld:begin -->") == 1
    for label in ("zero-shot baseline", "full C2S", "teacher-only dense", "two-stage"):
        assert label in table
    assert chart.stat().st_size > 1000
    summary = json.loads(js.read_text())["summary"]
    assert set(summary) == {"zs_baseline", "c2s_global", "c2s_local", "c2s_local_nolatent",
                            "c2s_full", "teacher_dense", "two_stage"}  # fmt: skip
    for s in summary.values():
        assert s["mIoU-seen"][2] == 1  # one seed each
    # a second call reads every run back from disk instead of training again
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("cached") == 7
    # the section is replaced, not appended again
    again = md.read_text()
    assert again.count("<!-- benchmark_miniworld:begin -->") == 1 and "other sections" in again
    # --variants: a subset (two-stage pulls in the baseline it evaluates), read back from disk
    n = len(TINY) + 1  # "--opts" and the overrides stay last
    sub = [*cmd[:-n], "--variants", "two_stage", *cmd[-n:]]
    proc = subprocess.run(sub, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads(js.read_text())["summary"]) == {"zs_baseline", "two_stage"}
    bad = subprocess.run([*cmd[:2], "--variants", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown variant" in bad.stderr
