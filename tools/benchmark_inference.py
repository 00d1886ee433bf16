#!/usr/bin/env python
"""Inference cost of the C2S student against the baseline and the teacher-based comparisons.

Four models, built in one process from the COCO-Stuff configs at real size (R-50 student with
random init, ViT-B/16 teacher with random weights, 512x512 input) or tiny (``--quick``):

(a) ``baseline``: the ZS baseline student;
(b) ``c2s_student``: the C2S student (``inference_cfg`` of the C2S config: no distillation branch,
    no CLS query);
(c) ``two_stage``: the C2S student's masks, each of its N queries classified by the teacher on a
    masked crop of ``--two-stage-crop`` px (zsseg-style; ``INFERENCE_MODE two_stage``);
(d) ``teacher_dense``: the teacher alone, dense (MaskCLIP-style; ``INFERENCE_MODE teacher_dense``)
    at the C2S config's ``TEACHER_INPUT_SIZE``;
(e) ``onnx_runtime``: (b) exported to ONNX (``c2s_d2.export``, as ``tools/export_model.py`` does)
    and run by ONNX Runtime on the CPU with ``--threads`` intra-op threads, 1 inter-op thread and
    all graph optimisations, timed in the same round robin as the PyTorch models (the printed
    "ONNX Runtime / PyTorch C2S student" latency ratio); its parameters and GFLOPs are (b)'s
    (the same function; the exported graph computes it with fewer multiply-adds, e.g. Winograd
    3x3 convolutions: see ``c2s_d2.export.student``), its largest score difference to (b) is
    reported. ``--no-onnx`` skips it.

For each: parameters used at inference (the teacher is built lazily and kept outside the module
tree, so it is counted explicitly: student + teacher for (c), teacher only for (d)), GFLOPs by
fvcore's ``FlopCountAnalysis`` (1 multiply-add = 1 flop; attention kernels that fvcore does not
know are counted by handles below) and the median latency of one image; ratios are to (b).

    python tools/benchmark_inference.py --json out/inf.json --markdown out/inf.md
    python tools/benchmark_inference.py --quick        # tiny models at 128 px (tests)
    python tools/benchmark_inference.py --models c2s_student --runs 9   # (b) vs (e) only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _bench_common import add_common_args, env_note, load_cfg, median  # noqa: E402
from _bench_common import run_description, setup_run, timed, write_json  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402

from c2s_d2.config import inference_cfg  # noqa: E402
from c2s_d2.export.exporter import export_student_onnx  # noqa: E402
from c2s_d2.export.student import ExportableStudent  # noqa: E402
from c2s_d2.modeling.clip import teacher as teacher_module  # noqa: E402

MODELS = ("baseline", "c2s_student", "two_stage", "teacher_dense")
LABELS = {
    "baseline": "(a) ZS baseline student",
    "c2s_student": "(b) C2S student",
    "two_stage": "(c) two-stage (student + teacher per mask)",
    "teacher_dense": "(d) teacher-only dense",
    "onnx_runtime": "(e) C2S student, ONNX Runtime",
}
REFERENCE = "c2s_student"
ONNX = "onnx_runtime"


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def sdpa_flop_jit(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention: q [.., Lq, D], k [.., Lk, D], v [.., Lk, Dv] ->
    Lq*Lk*D (scores) + Lq*Lk*Dv (weighted sum) multiply-adds per batch element."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return _prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def native_mha_flop_jit(inputs, outputs) -> int:
    """aten::_native_multi_head_attention (nn.MultiheadAttention's inference fast path):
    query [B, Lq, E], key/value [B, Lk, E]: q/k/v and output projections + attention."""
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    b, lq, e = _prod(q[:-2]), q[-2], q[-1]
    lk = k[-2]
    return b * (lq * e * e + 2 * lk * e * e + 2 * lq * lk * e + lq * e * e)


ATTENTION_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::_native_multi_head_attention": native_mha_flop_jit,
}


@contextmanager
def traceable_teacher() -> Iterator[None]:
    """Under ``torch.jit.trace`` image sizes are tensors and ``teacher_input_size`` fails on
    ``round(tensor)``; give it Python ints while fvcore traces (sizes are fixed here anyway)."""
    original = teacher_module.teacher_input_size

    def int_sizes(height, width, patch_size, short_side=None):
        return original(int(height), int(width), patch_size, short_side)

    teacher_module.teacher_input_size = int_sizes
    try:
        yield
    finally:
        teacher_module.teacher_input_size = original


def gflops(module: torch.nn.Module, inputs: tuple) -> float:
    """fvcore GFLOPs (multiply-adds) of ``module(*inputs)``, attention included."""
    with traceable_teacher(), torch.no_grad():
        analysis = FlopCountAnalysis(module, inputs).set_op_handle(**ATTENTION_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total() / 1e9


class GlobalEmbedding(torch.nn.Module):
    """The teacher's global output only (what two-stage classification uses)."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)[0]


def build_models(args: argparse.Namespace) -> Dict[str, torch.nn.Module]:
    """The four models in eval mode, teachers built (they are lazy)."""
    c2s_cfg = load_cfg(args.c2s_config, args)
    cfgs = {
        "baseline": load_cfg(args.baseline_config, args),
        "c2s_student": c2s_cfg,
        "two_stage": load_cfg(args.c2s_config, args, ["MODEL.C2S.INFERENCE_MODE", "two_stage"]),
        "teacher_dense": load_cfg(
            args.c2s_config, args, ["MODEL.C2S.INFERENCE_MODE", "teacher_dense"]
        ),
    }
    crop = args.two_stage_crop or (None if args.quick else 224)
    if crop:  # quick mode keeps the tiny config's teacher size
        cfgs["two_stage"].merge_from_list(["MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE", str(crop)])
    models = {}
    for name in [m for m in MODELS if m in args.models]:
        torch.manual_seed(args.seed)  # (a) and (b) get the same initial weights
        models[name] = build_model(inference_cfg(cfgs[name])).eval()
        if name in ("two_stage", "teacher_dense"):
            models[name].teacher()
    return models


def count_params(name: str, model: torch.nn.Module) -> Dict[str, int]:
    """Parameters that run at inference: the teacher lives outside the module tree."""
    student = sum(p.numel() for p in model.parameters())
    teacher = model._teacher
    t = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    used = {"baseline": student, "c2s_student": student, "two_stage": student + t}
    return {"params": used.get(name, t), "params_student": student, "params_teacher": t}


class OnnxRuntimeStudent:
    """The C2S student exported to ONNX (in a temporary folder) on an ONNX Runtime CPU session:
    ``intra_op_num_threads`` = ``threads``, 1 inter-op thread, all graph optimisations."""

    def __init__(self, model: torch.nn.Module, image: torch.Tensor, threads: int) -> None:
        import onnxruntime as ort

        student = ExportableStudent(model)
        self.image = image.float()[None]  # what DefaultPredictor feeds: float 0..255
        self.bank = model.test_bank.detach().float().cpu()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "student.onnx")
            export_student_onnx(student, path, self.image, self.bank)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(
                path, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        self.feed = {"image": self.image.numpy(), "text_embeddings": self.bank.numpy()}
        self.onnxruntime_version = ort.__version__

    def __call__(self):
        return self.session.run(None, self.feed)[0]

    def max_diff(self, model: torch.nn.Module, inputs: List[Dict]) -> float:
        """Largest |score difference| to the PyTorch model on the benchmark image."""
        with torch.no_grad():
            want = model(inputs)[0]["sem_seg"]
        return float((torch.from_numpy(self()) - want).abs().max())


def two_stage_costs(model: torch.nn.Module) -> Dict:
    teacher = model._teacher
    crop = teacher.input_size or 224
    one_crop = (torch.rand(1, 3, crop, crop) * 255,)
    return {
        "two_stage": {
            "crop_size": crop,
            "num_masks": model.query_decoder.num_object_queries,
            # what two-stage needs (the global embedding); the trace drops the unused dense path
            "teacher_gflops_per_crop": gflops(GlobalEmbedding(teacher), one_crop),
            # what the teacher's forward runs: global and dense outputs
            "teacher_gflops_per_crop_executed": gflops(teacher, one_crop),
        }
    }


def run(args: argparse.Namespace) -> Dict:
    setup_run(args)
    models = build_models(args)
    g = torch.Generator().manual_seed(args.seed)
    image = torch.randint(0, 256, (3, args.size, args.size), dtype=torch.uint8, generator=g)
    inputs = [{"image": image, "height": args.size, "width": args.size}]
    results: Dict[str, Dict] = {name: count_params(name, m) for name, m in models.items()}
    calls = {name: (lambda m=model: m(inputs)) for name, model in models.items()}
    ort_student = None
    if args.onnx:
        ort_student = OnnxRuntimeStudent(models[REFERENCE], image, args.threads)
        calls[ONNX] = ort_student
        results[ONNX] = dict(results[REFERENCE])
    latencies: Dict[str, List[float]] = {name: [] for name in calls}
    for name, call in calls.items():
        for _ in range(args.warmup):
            call()
    # round robin, so that a busy machine slows every model alike
    for r in range(args.runs):
        for name, call in calls.items():
            if name != "two_stage" or r < args.two_stage_runs:
                latencies[name].append(timed(call, args.device))
    for name, model in models.items():
        results[name]["gflops"] = gflops(model, (inputs,))
    if ort_student is not None:
        results[ONNX]["gflops"] = results[REFERENCE]["gflops"]  # (b)'s: the same function
        results[ONNX]["max_abs_diff_vs_pytorch"] = ort_student.max_diff(models[REFERENCE], inputs)
    for name in calls:
        results[name]["latencies_s"] = latencies[name]
        results[name]["latency_s"] = median(latencies[name])
    ref = results[REFERENCE]
    for r in results.values():
        r["ratios"] = {
            k: r[k] / ref[k] if ref[k] else float("nan") for k in ("params", "gflops", "latency_s")
        }
    out = {"run": run_description(args), "models": results, "reference": REFERENCE}
    out["run"].update({"runs": args.runs, "two_stage_runs": args.two_stage_runs})
    if "two_stage" in models:
        out.update(two_stage_costs(models["two_stage"]))
    if "teacher_dense" in models:
        out["teacher_dense_input_size"] = models["teacher_dense"]._teacher.input_size
    if ort_student is not None:
        out["onnx_runtime"] = {
            "latency_ratio_to_pytorch_student": results[ONNX]["ratios"]["latency_s"],
            "threads": args.threads,
            "inter_op_threads": 1,
            "graph_optimization": "ORT_ENABLE_ALL",
            "onnxruntime": ort_student.onnxruntime_version,
            "max_abs_diff_vs_pytorch": results[ONNX]["max_abs_diff_vs_pytorch"],
        }
    return out


def markdown_table(result: Dict) -> str:
    rows = [
        "| model | params (M) | x C2S | GFLOPs | x C2S | latency (s) | x C2S |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [*MODELS, ONNX]:
        if name not in result["models"]:
            continue
        r = result["models"][name]
        q = r["ratios"]
        rows.append(
            f"| {LABELS[name]} | {r['params'] / 1e6:.2f} | {q['params']:.2f} | {r['gflops']:.2f} "
            f"| {q['gflops']:.2f} | {r['latency_s']:.3f} | {q['latency_s']:.2f} |"
        )
    return "\n".join(rows) + "\n"


def report(result: Dict) -> None:
    r = result["run"]
    print(
        f"inference, {'quick (tiny models)' if r['quick'] else 'real size'}: one "
        f"{r['size']}x{r['size']} image, {r['threads']} threads, device {r['device']}; latency "
        f"median of {r['runs']} runs ({r['two_stage_runs']} for two-stage); GFLOPs by fvcore "
        "(multiply-adds)"
    )
    ts = result.get("two_stage")
    if ts is not None:
        print(
            f"two-stage: {ts['num_masks']} masks, teacher crops {ts['crop_size']} px, "
            f"{ts['teacher_gflops_per_crop']:.2f} GFLOPs per crop (the teacher's forward runs "
            f"{ts['teacher_gflops_per_crop_executed']:.2f}: its unused dense output is not "
            "counted)"
        )
    if "teacher_dense_input_size" in result:
        print(f"teacher-only dense at {result['teacher_dense_input_size']} px")
    print(markdown_table(result), end="")
    for name in [n for n in [*MODELS, ONNX] if n in result["models"]]:
        m = result["models"][name]
        q = m["ratios"]
        print(
            f"ratio to C2S student: {name} params {q['params']:.3f}x ({m['params']:,}), "
            f"GFLOPs {q['gflops']:.3f}x ({m['gflops']:.2f}), latency {q['latency_s']:.2f}x "
            f"({m['latency_s']:.3f} s; runs {[round(x, 3) for x in m['latencies_s']]})"
        )
    if "onnx_runtime" in result:
        o = result["onnx_runtime"]
        print(
            f"ONNX Runtime / PyTorch C2S student latency: "
            f"{o['latency_ratio_to_pytorch_student']:.2f}x ({o['threads']} intra-op thread(s), "
            f"1 inter-op, ORT_ENABLE_ALL, onnxruntime {o['onnxruntime']}); max |score difference| "
            f"{o['max_abs_diff_vs_pytorch']:.2e}"
        )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--runs", type=int, default=3, help="timed runs of each model")
    p.add_argument("--two-stage-runs", type=int, default=1, help="timed runs of two-stage")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each model first")
    p.add_argument(
        "--two-stage-crop",
        type=int,
        default=None,
        help="teacher crop size of two-stage in px (default 224, zsseg's; quick: the config's)",
    )
    p.add_argument("--markdown", default="", help="write the table to this Markdown file")
    p.add_argument(
        "--no-onnx",
        dest="onnx",
        action="store_false",
        help="skip the ONNX Runtime row (e): export of the C2S student, timed on ONNX Runtime",
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        help="models to measure (default: all; the C2S student, the reference, always runs)",
    )
    args = p.parse_args(argv)
    args.models = sorted(set(args.models) | {REFERENCE}, key=MODELS.index)
    if min(args.runs, args.two_stage_runs) < 1 or args.warmup < 0:
        p.error("--runs and --two-stage-runs must be >= 1, --warmup >= 0")
    args.two_stage_runs = min(args.two_stage_runs, args.runs)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    note = env_note(args)
    if note:
        print(note)
    result = run(args)
    report(result)
    write_json(args.json, result)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(markdown_table(result))
        print(f"table written to {args.markdown}")
    return result


if __name__ == "__main__":
    main()
