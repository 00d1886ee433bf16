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
        C2S_MINIWORLD_NUM_TRAIN="10",
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
                            "c2s_full", "zs_baseline_strict", "c2s_full_strict",
                            "teacher_dense", "two_stage"}  # fmt: skip
    for s in summary.values():
        assert s["mIoU-seen"][2] == 1  # one seed each
    assert "paired by seed" in table and "| 0 |" in table  # per-seed paired differences
    runs = json.loads(js.read_text())["runs"]
    d = runs["c2s_full"]["0"]["hIoU"] - runs["zs_baseline"]["0"]["hIoU"]
    assert f"{d:+.1f}" in table
    # every run is keyed: code, config, teacher, dataset; runs trained deterministically
    key = json.loads((tmp_path / "out" / "c2s_full" / "seed0" / "run_key.json").read_text())
    assert set(key) >= {"code", "config", "opts", "teacher", "dataset"}
    assert key["teacher"] == "random-weights" and key["dataset"]["generator_version"] >= 2
    log = (tmp_path / "out" / "c2s_full" / "seed0" / "benchmark.log").read_text()
    assert "deterministic=True" in log
    # the latent variants report the seen filter's statistics (from metrics.json)
    assert "seen_filter_rejected_pct" in runs["c2s_full"]["0"]
    # a second call reads every run back from disk instead of training again
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("cached") == 9
    # a run whose key differs (here: another code version) is stale: rerun, not read back
    key_file = tmp_path / "out" / "c2s_global" / "seed0" / "run_key.json"
    key_file.write_text(json.dumps(dict(json.loads(key_file.read_text()), code="old")))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "c2s_global seed 0: stale (code): rerun" in proc.stdout
    assert proc.stdout.count("cached") == 8
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
