#!/usr/bin/env python
"""Train and evaluate every C2S variant on the mini-world, over several seeds.

    python tools/benchmark_miniworld.py                 # 3 seeds, full schedule (hours on CPU)
    python tools/benchmark_miniworld.py --quick         # 1 seed, short schedule (<= 10 min)
    python tools/benchmark_miniworld.py --seeds 0 1 --iters 500 --teacher PATH

Variants: the zero-shot baseline, global only, local only, local without latent classes and
full C2S (trained), plus teacher-only dense and two-stage (evaluated; two-stage uses the
baseline's student). All use the same CLIP (the teacher, ``--teacher``) for the text side, so the
only difference is distillation. Each run's metrics are read back from its output folder, so an
interrupted benchmark resumes where it stopped. Writes ``docs/BENCHMARKS_MINIWORLD.md`` (``--markdown``),
a bar chart (``--chart``) and JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "miniworld")
TRAINED = [
    ("zs_baseline", "zs_baseline_R18.yaml", "zero-shot baseline (no distillation)"),
    ("c2s_global", "c2s_global_R18.yaml", "C2S global only"),
    ("c2s_local", "c2s_local_R18.yaml", "C2S local only (with latent classes)"),
    ("c2s_local_nolatent", "c2s_local_nolatent_R18.yaml", "C2S local only, no latent classes"),
    ("c2s_full", "c2s_full_R18.yaml", "full C2S"),
]
EVAL_ONLY = [
    ("teacher_dense", "teacher_dense.yaml", "teacher-only dense (MaskCLIP-style)"),
    ("two_stage", "two_stage_R18.yaml", "two-stage (baseline student + teacher per mask)"),
]
KEYS = ("mIoU-seen", "mIoU-unseen", "hIoU", "mIoU")
DEFAULT_TEACHER = os.path.join(ROOT, "output", "miniworld_clip", "clip_tiny.pt")


def metrics_path(out_dir: str) -> str:
    return os.path.join(out_dir, "inference", "c2s_miniworld_val", "sem_seg_metrics.json")


def read_metrics(out_dir: str) -> Optional[Dict[str, float]]:
    path = metrics_path(out_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return data.get("sem_seg", data)


def run_train_net(args: List[str], log: str) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), *args]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"train_net.py failed (log: {log}):\n{tail}")


def run_variant(name, config, seed, opts, out_root, eval_only_weights=None) -> Dict[str, float]:
    out = os.path.join(out_root, name, f"seed{seed}")
    cached = read_metrics(out)
    if cached is not None:
        print(f"  {name} seed {seed}: cached")
        return cached
    os.makedirs(out, exist_ok=True)
    args = ["--config-file", os.path.join(CONFIGS, config)]
    if eval_only_weights is not None:
        args.append("--eval-only")
    args += [*opts, "SEED", str(seed), "OUTPUT_DIR", out]
    if eval_only_weights is not None:
        args += ["MODEL.WEIGHTS", eval_only_weights]
    else:
        args.insert(0, "--resume")
    start = time.time()
    run_train_net(args, os.path.join(out, "benchmark.log"))
    metrics = read_metrics(out)
    if metrics is None:
        raise RuntimeError(f"{name} seed {seed}: no metrics written under {out}")
    print(f"  {name} seed {seed}: {time.time() - start:.0f} s  " + fmt_row(metrics))
    return metrics


def fmt_row(m: Dict[str, float]) -> str:
    return "  ".join(f"{k} {m.get(k, float('nan')):.1f}" for k in KEYS)


def summarise(runs: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict[str, List[float]]]:
    """Per variant and metric: [mean, std (0 for one seed), n]."""
    out = {}
    for name, ms in runs.items():
        out[name] = {}
        for k in KEYS:
            vals = [m[k] for m in ms if m.get(k) is not None]
            mean = statistics.fmean(vals) if vals else float("nan")
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[name][k] = [mean, std, len(vals)]
    return out


def markdown(summary, labels, meta) -> str:
    lines = [
        "# Mini-world benchmark",
        "",
        f"Produced by `python tools/benchmark_miniworld.py {meta['argv']}` on {meta['date']} "
        f"({meta['seeds']} seed(s), {meta['iters']} iterations each, teacher `{meta['teacher']}`).",
        "Mean and standard deviation over seeds, in percent, on `c2s_miniworld_val` "
        "(12 seen / 4 unseen materials).",
        "",
        "| variant | mIoU-seen | mIoU-unseen | hIoU | mIoU |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        cells = [f"{s[k][0]:.1f} ± {s[k][1]:.1f}" for k in KEYS]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines += ["", "![mini-world benchmark](benchmark_miniworld.png)", ""]
    return "\n".join(lines)


def bar_chart(summary, labels, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.27
    for j, k in enumerate(KEYS[:3]):
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(xs, [summary[n][k][0] for n in names], width, yerr=[summary[n][k][1] for n in names],
               label=k, capsize=2)  # fmt: skip
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([labels[n] for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_title("Mini-world: seen / unseen / harmonic mIoU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER (default: config's)")
    p.add_argument("--quick", action="store_true", help="1 seed, 150 iterations (<= 10 min)")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="tiny CLIP checkpoint of the teacher")
    p.add_argument("--output", default=os.path.join(ROOT, "output", "benchmark_miniworld"))
    p.add_argument("--markdown", default=os.path.join(ROOT, "docs", "BENCHMARKS_MINIWORLD.md"))
    p.add_argument("--chart", default=os.path.join(ROOT, "docs", "benchmark_miniworld.png"))
    p.add_argument("--json", default=None)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="extra config overrides")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.iters = args.iters or 150
    if args.teacher and not os.path.isfile(args.teacher):
        print(
            f"benchmark_miniworld.py: error: teacher weights not found: {args.teacher} "
            "(run python tools/pretrain_miniworld_clip.py, or --teacher '' for random weights)",
            file=sys.stderr,
        )
        return 2
    opts = ["MODEL.CLIP.PRETRAINED", args.teacher, *args.opts]
    if args.iters:
        opts += ["SOLVER.MAX_ITER", str(args.iters), "SOLVER.CHECKPOINT_PERIOD", str(args.iters)]
    labels = {n: label for n, _, label in TRAINED + EVAL_ONLY}
    runs: Dict[str, List[Dict[str, float]]] = {n: [] for n in labels}
    for seed in args.seeds:
        print(f"seed {seed}")
        for name, config, _ in TRAINED:
            runs[name].append(run_variant(name, config, seed, opts, args.output))
        base_w = os.path.join(args.output, "zs_baseline", f"seed{seed}", "model_final.pth")
        for name, config, _ in EVAL_ONLY:
            runs[name].append(run_variant(name, config, seed, opts, args.output, base_w))
    summary = summarise(runs)
    meta = {
        "argv": " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "seeds": len(args.seeds),
        "iters": args.iters or "config",
        "teacher": os.path.relpath(args.teacher, ROOT) if args.teacher else "random",
    }
    print("\n" + markdown(summary, labels, meta))
    if args.markdown:
        os.makedirs(os.path.dirname(args.markdown), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(markdown(summary, labels, meta))
    if args.chart:
        bar_chart(summary, labels, args.chart)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
