"""The benchmark tools in their --quick mode (tiny models, 128 px), run as a user runs them: the
printed ratio lines, the JSON keys, and the sanity of the numbers."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
NUMBER = r"([0-9]+\.[0-9]+)"


def run_tool(script, args, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(TOOLS, script), "--quick", "--threads", "1"]
        + args
        + ["--json", str(out)],
        cwd=str(tmp_path),  # the tools must not depend on the working directory
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out) as f:
        return proc.stdout, json.load(f)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    return run_tool("benchmark_train.py", ["--steps", "2"], tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inference")
    md = tmp / "table.md"
    stdout, result = run_tool("benchmark_inference.py", ["--runs", "1", "--markdown", str(md)], tmp)
    return stdout, result, md.read_text()


def test_train_benchmark_prints_ratio_and_shares(train_run):
    stdout, result = train_run
    ratio = re.search(rf"ratio C2S/baseline: {NUMBER}", stdout)
    assert ratio, stdout
    assert float(ratio.group(1)) == pytest.approx(result["ratio"], abs=1e-3)
    assert re.search(r"share of the C2S step: teacher forward [0-9.]+%", stdout), stdout
    assert {"baseline", "c2s", "ratio", "ratio_cpu", "shares", "setup", "run"} <= set(result)
    assert set(result["shares"]) == {
        "teacher_forward",
        "pseudo_masks",
        "latent_mining",
        "pseudo_matching",
        "local_pairs",
    }


def test_train_benchmark_numbers_are_sane(train_run):
    _, result = train_run
    base, c2s = result["baseline"], result["c2s"]
    assert result["run"]["quick"] and result["run"]["size"] == 128 and result["run"]["steps"] == 2
    assert len(base["steps_s"]) == len(c2s["steps_s"]) == 2
    for s in (base, c2s):
        assert 0 < s["forward_s"] < s["step_s"]
    assert result["ratio"] == pytest.approx(c2s["step_s"] / base["step_s"])
    # the wrappers really ran inside the C2S step: the teacher forward and the clustering
    assert c2s["sections_s"]["teacher_forward"] > 0
    assert c2s["sections_s"]["pseudo_masks"] > 0
    assert 0 < sum(result["shares"].values()) < 1
    # only the C2S model has the CLS query and the distillation heads
    assert c2s["params"] > base["params"]
    assert result["teacher"]["params"] > 0 and result["teacher"]["input_size"] == 64


def test_inference_benchmark_prints_ratios_and_table(inference_run):
    stdout, result, table = inference_run
    for name in ("baseline", "c2s_student", "two_stage", "teacher_dense"):
        assert re.search(rf"ratio to C2S student: {name} params {NUMBER}x", stdout), stdout
        assert set(result["models"][name]) >= {
            "params",
            "params_student",
            "params_teacher",
            "gflops",
            "latency_s",
            "ratios",
        }
    assert table.startswith("| model | params (M)") and table.count("\n") == 7
    assert result["two_stage"]["num_masks"] == 8 and result["two_stage"]["crop_size"] == 64


def test_inference_benchmark_numbers_are_sane(inference_run):
    _, result, _ = inference_run
    m = result["models"]
    # the C2S student costs exactly what the baseline student costs
    assert m["c2s_student"]["params"] == m["baseline"]["params"] > 0
    assert m["c2s_student"]["gflops"] == m["baseline"]["gflops"] > 0
    assert m["c2s_student"]["ratios"]["gflops"] == 1.0
    # the teacher is counted where it runs, and only there
    assert m["c2s_student"]["params_teacher"] == 0
    teacher = m["two_stage"]["params_teacher"]
    assert teacher > 0 and m["teacher_dense"]["params_teacher"] == teacher
    assert m["two_stage"]["params"] == m["c2s_student"]["params"] + teacher
    assert m["teacher_dense"]["params"] == teacher
    # two-stage = student + one teacher forward per mask (8 crops of 64 px here)
    per_crop = result["two_stage"]["teacher_gflops_per_crop"]
    assert m["two_stage"]["gflops"] > m["c2s_student"]["gflops"]
    extra = m["two_stage"]["gflops"] - m["c2s_student"]["gflops"]
    assert 0.99 <= extra / (8 * per_crop) <= 1.1
    assert result["two_stage"]["teacher_gflops_per_crop_executed"] > per_crop
    assert m["teacher_dense"]["gflops"] > 0
    assert all(x > 0 for x in m["two_stage"]["latencies_s"])


def test_attention_flop_handles_hand_counted():
    """fvcore skips fused attention kernels; the tool's handles count them (multiply-adds)."""
    import torch
    from torch import nn

    sys.path.insert(0, TOOLS)
    from benchmark_inference import gflops

    torch.manual_seed(0)

    class Sdpa(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.rand(1, 2, 3, 4), torch.rand(1, 2, 5, 4), torch.rand(1, 2, 5, 6)
    # 2 heads x 3 queries x 5 keys x (4 for the scores + 6 for the weighted sum)
    assert gflops(Sdpa(), (q, k, v)) * 1e9 == pytest.approx(2 * 3 * 5 * (4 + 6))

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    # L=3, E=8: q/k/v projections 3*3*64, scores + weighted sum 2*3*3*8, output 3*64
    expected = 3 * 3 * 64 + 2 * 3 * 3 * 8 + 3 * 64
    assert gflops(SelfAttention().eval(), (torch.rand(1, 3, 8),)) * 1e9 == pytest.approx(expected)
