"""The mini-world benchmark's smallest mode (2 iterations, tiny data, a random-weight teacher):
the report, the paired / transfer / cache tables, run keys and records on a subset of variants;
every variant end to end in the slow suite."""

import json
import os
import shutil
import subprocess
import sys

import pytest

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


def _env(tmp_path):
    return dict(
        os.environ,
        DETECTRON2_DATASETS=str(tmp_path / "datasets"),
        C2S_MINIWORLD_NUM_TRAIN="10",
        C2S_MINIWORLD_NUM_VAL="2",
        C2S_MINIWORLD_TRANSFER_NUM_VAL="2",
        C2S_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=ROOT,
    )


def _cmd(tmp_path, *extra):
    md, chart, js = tmp_path / "B.md", tmp_path / "b.png", tmp_path / "b.json"
    return [sys.executable, "tools/benchmark_miniworld.py", "--seeds", "0", "--iters", "2",
            "--teacher", "", "--output", str(tmp_path / "out"), "--markdown", str(md),
            "--chart", str(chart), "--json", str(js), *extra, "--opts", *TINY]  # fmt: skip


def _run(cmd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_report_keys_transfer_cache_and_records(tmp_path):
    env, md, js = _env(tmp_path), tmp_path / "B.md", tmp_path / "b.json"
    md.write_text("# Benchmarks\n\nother sections stay\n")
    subset = ["--variants", "transfer_zs_baseline", "transfer_c2s_full", "c2s_full_cached"]
    cmd = _cmd(tmp_path, *subset)
    _run(cmd, env)
    table = md.read_text()
    assert table.startswith("# Benchmarks\n\nother sections stay\n")
    assert table.count("<!-- benchmark_miniworld:begin -->") == 1
    assert (tmp_path / "b.png").stat().st_size > 1000
    runs = json.loads(js.read_text())["runs"]
    # the transfer evaluations pull in the trained models they evaluate
    assert set(runs) == {"zs_baseline", "c2s_full", "c2s_full_cached", "transfer_zs_baseline",
                         "transfer_c2s_full"}  # fmt: skip
    assert "paired by seed" in table and "| 0 |" in table  # per-seed paired differences
    d = runs["c2s_full"]["0"]["hIoU"] - runs["zs_baseline"]["0"]["hIoU"]
    assert f"{d:+.1f}" in table
    # the transfer rows evaluate the baseline's and C2S's own weights on the transfer set
    assert "Transfer: the same models on the transfer mini-world" in table
    assert "| seed | old | new | hIoU | mIoU |" in table  # the transfer set's paired table
    for name, source in (
        ("transfer_zs_baseline", "zs_baseline"),
        ("transfer_c2s_full", "c2s_full"),
    ):
        log = (tmp_path / "out" / name / "seed0" / "benchmark.log").read_text()
        assert f"{source}/seed0/model_final.pth" in log and "c2s_miniworld_transfer_val" in log
        metrics = tmp_path / "out" / name / "seed0" / "inference" / "c2s_miniworld_transfer_val"
        assert (metrics / "sem_seg_metrics.json").is_file()
    # the cached variant trains from the cache that the benchmark built
    log = (tmp_path / "out" / "c2s_full_cached" / "seed0" / "benchmark.log").read_text()
    assert "TEACHER_CACHE" in log and (tmp_path / "out" / "teacher_cache" / "index.json").is_file()
    assert "Teacher-feature cache minus the online teacher" in table
    # every run is keyed: code, config, teacher, dataset; runs trained deterministically
    key = json.loads((tmp_path / "out" / "c2s_full" / "seed0" / "run_key.json").read_text())
    assert set(key) >= {"code", "config", "opts", "teacher", "dataset"}
    assert key["teacher"] == "random-weights" and key["dataset"]["generator_version"] >= 2
    log = (tmp_path / "out" / "c2s_full" / "seed0" / "benchmark.log").read_text()
    assert "deterministic=True" in log
    # the latent variants report the seen filter's statistics (from metrics.json)
    assert "seen_filter_rejected_pct" in runs["c2s_full"]["0"]
    # a second call reads every run back from disk instead of training again
    assert _run(cmd, env).count(": cached") == 5
    # a run whose key differs (here: another code version) is stale: rerun, not read back
    key_file = tmp_path / "out" / "c2s_full_cached" / "seed0" / "run_key.json"
    key_file.write_text(json.dumps(dict(json.loads(key_file.read_text()), code="old")))
    out = _run(cmd, env)
    assert "c2s_full_cached seed 0: stale (code): rerun" in out and out.count(": cached") == 4
    assert md.read_text().count("<!-- benchmark_miniworld:begin -->") == 1  # replaced
    # records: with the run folders gone, the runs are read back from their records
    records = tmp_path / "records"
    rec = _cmd(tmp_path, "--records", str(records), *subset)
    _run(rec, env)
    assert (records / "transfer_c2s_full" / "seed0.json").is_file()
    base_rec = records / "zs_baseline" / "seed0.json"
    machine = json.loads(base_rec.read_text())["machine"]
    assert machine["cpu_capability"] not in ("", "unknown") and machine["torch"] != "unknown"
    # where a run ran is kept, not matched: another machine's record is read back
    other = dict(json.loads(base_rec.read_text()), machine={"cpu_capability": "AVX2"})
    base_rec.write_text(json.dumps(other))
    before = json.loads(js.read_text())["runs"]
    for name in ("c2s_full", "transfer_c2s_full", "zs_baseline", "transfer_zs_baseline"):
        shutil.rmtree(tmp_path / "out" / name)
    out = _run(rec, env)
    assert out.count(": recorded") == 4 and "weights needed" not in out, out
    assert json.loads(js.read_text())["runs"] == before
    # from another output folder too: where the teacher-feature cache lies is not in a key
    moved = [str(tmp_path / "out2") if a == str(tmp_path / "out") else a for a in rec]
    out = _run(moved, env)
    assert out.count(": recorded") == 5 and "teacher-feature cache: " not in out, out
    # a record of another code version is not read back: the run trains again
    path = records / "c2s_full" / "seed0.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), key={"code": "old"})))
    out = _run(rec, env)
    assert "\n  c2s_full seed 0: recorded" not in "\n" + out
    assert (tmp_path / "out" / "c2s_full" / "seed0" / "model_final.pth").is_file()
    assert "transfer_c2s_full seed 0: recorded" in out  # its source's run key is unchanged
    assert "teacher-feature cache: " not in out  # the cached run is read back: no cache build
    bad = subprocess.run([*cmd[:2], "--variants", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown variant" in bad.stderr


@pytest.mark.slow
def test_every_variant_trains_and_evaluates(tmp_path):
    env, md, js = _env(tmp_path), tmp_path / "B.md", tmp_path / "b.json"
    _run(_cmd(tmp_path), env, timeout=1800)
    table = md.read_text()
    for label in ("zero-shot baseline", "full C2S", "teacher-only dense", "two-stage"):
        assert label in table
    summary = json.loads(js.read_text())["summary"]
    assert set(summary) == {"zs_baseline", "c2s_global", "c2s_local", "c2s_local_nolatent",
                            "c2s_full", "zs_baseline_strict", "c2s_full_strict", "c2s_full_cached",
                            "teacher_dense", "two_stage", "transfer_zs_baseline",
                            "transfer_c2s_full"}  # fmt: skip
    for s in summary.values():
        assert s["mIoU-seen"][2] == 1  # one seed each


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "benchmark_miniworld", os.path.join(ROOT, "tools", "benchmark_miniworld.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scheduler_never_holds_a_thread_for_a_waiting_evaluation():
    """Tasks [train a, eval of a, train b] on 2 threads: b starts while a trains (a waits for b
    to start: a scheduler that parks the second thread on the evaluation would time out)."""
    import threading

    bm = _benchmark_module()
    b_started, order = threading.Event(), []

    def work(task):
        order.append(("start", task))
        if task == "a":
            assert b_started.wait(timeout=10), "b did not start while a ran"
        if task == "b":
            b_started.set()
        order.append(("end", task))
        return task.upper()

    done = bm.run_scheduled(["a", "eval_a", "b"], {"eval_a": "a"}, work, 2, {})
    assert done == {"a": "A", "eval_a": "EVAL_A", "b": "B"}
    assert order.index(("start", "eval_a")) > order.index(("end", "a"))
    # one thread: the list's order, an evaluation right after its source
    order.clear()
    b_started.set()
    bm.run_scheduled(["a", "eval_a", "b"], {"eval_a": "a"}, work, 1, {})
    assert [t for kind, t in order if kind == "start"] == ["a", "eval_a", "b"]

    def failing(task):
        if task == "a":
            raise RuntimeError("train_net.py failed")
        return task

    with pytest.raises(RuntimeError, match="train_net.py failed"):
        bm.run_scheduled(["a", "eval_a", "b"], {"eval_a": "a"}, failing, 2, {})
