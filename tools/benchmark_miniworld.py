#!/usr/bin/env python
"""Train and evaluate every C2S variant on the mini-world, over several seeds.

    python tools/benchmark_miniworld.py                 # 3 seeds, full schedule (hours on CPU)
    python tools/benchmark_miniworld.py --quick         # 1 seed, short schedule (<= 10 min)
    python tools/benchmark_miniworld.py --jobs 5 --device cuda  # one GPU, five runs at a time
    python tools/benchmark_miniworld.py --seeds 0 1 --iters 500 --teacher PATH

Variants: the zero-shot baseline, global only, local only, local without latent classes and
full C2S (trained), the baseline and full C2S in the strict inductive setting (training images
holding an unseen pixel dropped), plus teacher-only dense and two-stage (evaluated; two-stage
uses the baseline's student). The baseline and full C2S run over ``--main-seeds`` (default 5
seeds), the other variants over ``--seeds`` (default 3).

No stale results: every run folder holds ``run_key.json`` (a fingerprint of the package's code,
``train_net.py`` and the mini-world configs; the config and overrides; the teacher's weights;
the dataset's generator version and parameters). A finished run is read back only when its key
equals the current one; a stale run is deleted and rerun. Runs train with ``--deterministic``. All use the same CLIP (the teacher) for the text side, so the only
difference is distillation: by default the configs' teacher, the tiny CLIP pretrained on the
mini-world that ships with the package (``C2S-Tiny-Text32`` + ``miniworld``); ``--teacher PATH``
uses another checkpoint, ``--teacher ''`` random weights. Each run's metrics are read back from
its output folder, so an interrupted benchmark resumes where it stopped. Writes its table into
the mini-world section of ``docs/BENCHMARKS.md`` (``--markdown``; other sections are kept), a bar
chart (``--chart``) and JSON (``--json``). ``--quick`` writes under ``output/`` instead.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "miniworld")
STRICT = ["DATASETS.ZERO_SHOT_SETTING", "inductive_strict"]
# name, config, label, extra overrides
TRAINED = [
    ("zs_baseline", "zs_baseline_R18_bs8_1k.yaml", "zero-shot baseline (no distillation)", []),
    ("c2s_global", "c2s_global_R18_bs8_1k.yaml", "C2S global only", []),
    ("c2s_local", "c2s_local_R18_bs8_1k.yaml", "C2S local only (with latent classes)", []),
    (
        "c2s_local_nolatent",
        "c2s_local_nolatent_R18_bs8_1k.yaml",
        "C2S local only, no latent classes",
        [],
    ),
    ("c2s_full", "c2s_full_R18_bs8_1k.yaml", "full C2S", []),
    (
        "zs_baseline_strict",
        "zs_baseline_R18_bs8_1k.yaml",
        "zero-shot baseline, strict inductive",
        STRICT,
    ),
    ("c2s_full_strict", "c2s_full_R18_bs8_1k.yaml", "full C2S, strict inductive", STRICT),
]
MAIN = ("zs_baseline", "c2s_full")  # the paired comparison: over --main-seeds
EVAL_ONLY = [
    ("teacher_dense", "teacher_dense.yaml", "teacher-only dense (MaskCLIP-style)", []),
    ("two_stage", "two_stage_R18.yaml", "two-stage (baseline student + teacher per mask)", []),
]
KEY_FILE = "run_key.json"
KEYS = ("mIoU-seen", "mIoU-unseen", "hIoU", "mIoU")
FILTER_KEYS = ("seen_filter_rejected_pct", "latent_reseeds")
DOCS = os.path.join(ROOT, "docs")
PROGRESS_EVERY_S = 60
_ITER_RE = re.compile(r"(?:eta: (\S+)\s+)?iter: (\d+)")
BEGIN, END = "<!-- benchmark_miniworld:begin -->", "<!-- benchmark_miniworld:end -->"


def metrics_path(out_dir: str) -> str:
    return os.path.join(out_dir, "inference", "c2s_miniworld_val", "sem_seg_metrics.json")


def read_metrics(out_dir: str) -> Optional[Dict[str, float]]:
    path = metrics_path(out_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return data.get("sem_seg", data)


def last_progress(log: str) -> str:
    """'iter N, eta H:MM:SS' from Detectron2's last metrics line in ``log``, or 'starting'."""
    try:
        with open(log, errors="replace") as f:
            f.seek(max(0, os.path.getsize(log) - 20000))
            hits = _ITER_RE.findall(f.read())
    except OSError:
        hits = []
    if not hits:
        return "starting"
    eta, it = hits[-1]
    return f"iter {int(it) + 1}" + (f", eta {eta}" if eta else "")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_fingerprint() -> str:
    """sha256 over the package's code and data files, train_net.py and the mini-world configs."""
    files = []
    for pattern in ("c2s_d2/**/*.py", "c2s_d2/**/*.json", "c2s_d2/**/*.txt", "configs/**/*.yaml"):
        files += glob.glob(os.path.join(ROOT, pattern), recursive=True)
    files.append(os.path.join(ROOT, "train_net.py"))
    h = hashlib.sha256()
    for f in sorted(set(files)):
        if "_zero_shot.json" in f:  # the teacher's report is not code
            continue
        h.update(os.path.relpath(f, ROOT).encode() + b"\0" + open(f, "rb").read() + b"\0")
    return h.hexdigest()


def teacher_fingerprint(opts: List[str]) -> str:
    """sha256 of the teacher's weights file (the configs' shipped one unless overridden)."""
    pretrained = "miniworld"
    for k, v in zip(opts[::2], opts[1::2]):
        if k == "MODEL.CLIP.PRETRAINED":
            pretrained = v
    if pretrained == "":
        return "random-weights"
    if pretrained == "miniworld":
        pretrained = os.path.join(
            ROOT, "c2s_d2", "modeling", "clip", "weights", "C2S-Tiny-Text32_miniworld.pt"
        )
    return file_sha256(pretrained) if os.path.isfile(pretrained) else f"missing:{pretrained}"


def dataset_fingerprint() -> Dict:
    with open(os.path.join(ROOT, "c2s_d2", "data", "miniworld.py")) as f:
        version = re.search(r"^GENERATOR_VERSION = (\d+)", f.read(), re.M).group(1)
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("C2S_MINIWORLD_")}
    return {"generator_version": int(version), "env": env}


def run_key(config: str, opts: List[str], weights: Optional[str], code: str) -> Dict:
    return {
        "code": code,
        "config": config,
        "config_sha256": file_sha256(os.path.join(CONFIGS, config)),
        "opts": list(opts),
        "teacher": teacher_fingerprint(opts),
        "dataset": dataset_fingerprint(),
        "eval_weights": file_sha256(weights) if weights and os.path.isfile(weights) else weights,
    }


def read_key(out_dir: str) -> Optional[Dict]:
    try:
        with open(os.path.join(out_dir, KEY_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_filter_stats(out_dir: str) -> Optional[Dict[str, float]]:
    """Seen-filter and latent-memory statistics of a training run (its metrics.json)."""
    path = os.path.join(out_dir, "metrics.json")
    regions = rejected = 0.0
    last = {}
    try:
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "c2s/pseudo_regions" in rec:
                    regions += rec["c2s/pseudo_regions"]
                    rejected += rec.get("c2s/seen_filter_rejected", 0.0)
                    last = rec
    except OSError:
        return None
    if not last:
        return None
    return {
        "seen_filter_rejected_pct": 100.0 * rejected / regions if regions else float("nan"),
        "seen_filter_threshold": last.get("c2s/seen_filter_threshold", float("nan")),
        "latent_reseeds": last.get("c2s/latent_reseeds", float("nan")),
    }


def run_train_net(args: List[str], log: str, threads: int = 0, label: str = "run") -> None:
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), *args]
    env = dict(os.environ)
    if threads > 0:  # parallel jobs on one machine: no thread oversubscription
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                proc.wait(timeout=PROGRESS_EVERY_S)
                break
            except subprocess.TimeoutExpired:
                print(f"  {label}: {last_progress(log)}", flush=True)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"train_net.py failed (log: {log}):\n{tail}")


def run_variant(
    name, config, seed, opts, out_root, eval_only_weights=None, threads=0, code=""
) -> Dict[str, float]:
    out = os.path.join(out_root, name, f"seed{seed}")
    key = run_key(config, [*opts, "SEED", str(seed)], eval_only_weights, code)
    stored = read_key(out)
    if os.path.isdir(out) and stored != key:
        why = "no key" if stored is None else ", ".join(k for k in key if stored.get(k) != key[k])
        print(f"  {name} seed {seed}: stale ({why}): rerun", flush=True)
        shutil.rmtree(out)
    cached = read_metrics(out)
    if cached is not None:
        print(f"  {name} seed {seed}: cached")
        return dict(cached, **(read_filter_stats(out) or {}))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, KEY_FILE), "w") as f:
        json.dump(key, f, indent=1)
    args = ["--config-file", os.path.join(CONFIGS, config), "--deterministic"]
    if eval_only_weights is not None:
        args.append("--eval-only")
    args += [*opts, "SEED", str(seed), "OUTPUT_DIR", out]
    if eval_only_weights is not None:
        args += ["MODEL.WEIGHTS", eval_only_weights]
    else:
        args.insert(0, "--resume")
    start = time.time()
    run_train_net(args, os.path.join(out, "benchmark.log"), threads, f"{name} seed {seed}")
    metrics = read_metrics(out)
    if metrics is None:
        raise RuntimeError(f"{name} seed {seed}: no metrics written under {out}")
    print(f"  {name} seed {seed}: {time.time() - start:.0f} s  " + fmt_row(metrics))
    return dict(metrics, **(read_filter_stats(out) or {}))


def configs_max_iter() -> str:
    """SOLVER.MAX_ITER of the mini-world configs (what runs use without ``--iters``)."""
    import yaml

    with open(os.path.join(CONFIGS, "Base-MiniWorld.yaml")) as f:
        return str(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])


def teacher_label(teacher: Optional[str], model: Optional[str]) -> str:
    if teacher is None:
        return "the configs' (shipped mini-world CLIP)"
    name = model or "config's model"
    return f"{name} + {os.path.relpath(teacher, ROOT)}" if teacher else f"{name}, random weights"


def write_section(path: str, table: str, chart: Optional[str]) -> None:
    """Put ``table`` between the benchmark's markers in ``path``, keeping the rest of the file."""
    if chart:
        rel = os.path.relpath(chart, os.path.dirname(os.path.abspath(path)))
        table = table.replace("](benchmark_miniworld.png)", f"]({rel})")
    section = f"{BEGIN}\n{table.rstrip()}\n{END}\n"
    text = open(path).read() if os.path.isfile(path) else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + section
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def fmt_row(m: Dict[str, float]) -> str:
    return "  ".join(f"{k} {m.get(k, float('nan')):.1f}" for k in KEYS)


def summarise(runs: Dict[str, Dict[int, Dict[str, float]]]) -> Dict[str, Dict[str, List[float]]]:
    """Per variant and metric: [mean, std (0 for one seed), n]."""
    out = {}
    for name, by_seed in runs.items():
        out[name] = {}
        for k in KEYS + FILTER_KEYS:
            vals = [m[k] for m in by_seed.values() if m.get(k) is not None]
            vals = [v for v in vals if v == v]  # NaN: not measured
            if not vals and k in FILTER_KEYS:
                continue
            mean = statistics.fmean(vals) if vals else float("nan")
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[name][k] = [mean, std, len(vals)]
    return out


def paired_differences(runs) -> Dict[int, Dict[str, float]]:
    """Full C2S minus the baseline, per seed both ran."""
    if not all(n in runs for n in MAIN):
        return {}
    base, full = runs[MAIN[0]], runs[MAIN[1]]
    return {s: {k: full[s][k] - base[s][k] for k in KEYS} for s in sorted(set(base) & set(full))}


def markdown(summary, runs, labels, meta) -> str:
    lines = [
        "## Mini-world benchmark",
        "",
        f"Produced by `python tools/benchmark_miniworld.py {meta['argv']}` on {meta['date']} "
        f"({meta['iters']} iterations each, teacher `{meta['teacher']}`, code fingerprint "
        f"`{meta['code'][:12]}`, deterministic mode).",
        "Mean ± standard deviation over seeds (n), in percent, on `c2s_miniworld_val` "
        "(12 seen / 4 unseen materials). Seen filter: share of pseudo regions the calibrated "
        "seen/latent filter found seen-like (left alone), over the training run.",
        "",
        "| variant | seeds | mIoU-seen | mIoU-unseen | hIoU | mIoU | seen filter |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        cells = [f"{s[k][0]:.1f} ± {s[k][1]:.1f}" for k in KEYS]
        rate = s.get("seen_filter_rejected_pct")
        rate_cell = f"{rate[0]:.1f} %" if rate else "-"
        lines.append(
            f"| {labels[name]} | {s[KEYS[0]][2]} | " + " | ".join(cells) + f" | {rate_cell} |"
        )
    lines += ["", "Per seed (mIoU-seen / mIoU-unseen / hIoU):", ""]
    seeds = sorted({sd for by_seed in runs.values() for sd in by_seed})
    lines += ["| variant | " + " | ".join(f"seed {sd}" for sd in seeds) + " |"]
    lines += ["|---|" + "---|" * len(seeds)]
    for name, by_seed in runs.items():
        cells = []
        for sd in seeds:
            m = by_seed.get(sd)
            cells.append(
                "-"
                if m is None
                else " / ".join(f"{m[k]:.1f}" for k in ("mIoU-seen", "mIoU-unseen", "hIoU"))
            )
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    diffs = paired_differences(runs)
    if diffs:
        lines += ["", "Full C2S minus the baseline, paired by seed:", ""]
        lines += ["| seed | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
        for sd, d in diffs.items():
            lines.append(f"| {sd} | " + " | ".join(f"{d[k]:+.1f}" for k in KEYS) + " |")
        mean = {k: statistics.fmean(d[k] for d in diffs.values()) for k in KEYS}
        wins = {k: sum(d[k] > 0 for d in diffs.values()) for k in KEYS}
        lines.append(
            "| mean (seeds better) | "
            + " | ".join(f"{mean[k]:+.1f} ({wins[k]}/{len(diffs)})" for k in KEYS)
            + " |"
        )
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
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    p.add_argument(
        "--main-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the baseline and full C2S (default: 0 1 2 3 4, or --seeds if given)",
    )
    p.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER (default: config's)")
    p.add_argument("--quick", action="store_true", help="1 seed, 150 iterations (<= 10 min)")
    p.add_argument(
        "--teacher",
        default=None,
        help="CLIP checkpoint of the teacher (default: the configs' shipped mini-world CLIP; "
        "'' for random weights)",
    )
    p.add_argument("--teacher-model", default=None, help="its open_clip architecture name")
    p.add_argument("--output", default=None, help="default: output/benchmark_miniworld[_quick]")
    p.add_argument("--markdown", default=None, help="default: docs/BENCHMARKS.md (section)")
    p.add_argument("--chart", default=None, help="default: docs/benchmark_miniworld.png")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--jobs", type=int, default=None, help="runs at a time (default 1; --quick: up to 4 CPUs)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per run (default: 1 when --jobs > 1, else torch's default)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="only these (default: all): " + " ".join(n for n, _, _, _ in TRAINED + EVAL_ONLY),
    )
    p.add_argument("--device", default="", help="MODEL.DEVICE of every run, e.g. cuda")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="extra config overrides")
    args = p.parse_args(argv)
    if args.main_seeds is None:
        args.main_seeds = args.seeds if args.seeds is not None else [0, 1, 2, 3, 4]
    if args.seeds is None:
        args.seeds = [0, 1, 2]
    if args.quick:
        args.seeds, args.main_seeds = args.seeds[:1], args.main_seeds[:1]
        args.iters = args.iters or 150
        args.jobs = args.jobs or min(4, os.cpu_count() or 1)
    args.jobs = args.jobs or 1
    where = os.path.join(ROOT, "output", "benchmark_miniworld_quick") if args.quick else None
    args.output = args.output or where or os.path.join(ROOT, "output", "benchmark_miniworld")
    args.markdown = args.markdown or os.path.join(where or DOCS, "BENCHMARKS.md")
    args.chart = args.chart or os.path.join(where or DOCS, "benchmark_miniworld.png")
    if args.teacher and not os.path.isfile(args.teacher):
        print(
            f"benchmark_miniworld.py: error: teacher weights not found: {args.teacher} "
            "(run python tools/pretrain_miniworld_clip.py, or --teacher '' for random weights)",
            file=sys.stderr,
        )
        return 2
    opts = []
    if args.teacher is not None:
        opts += ["MODEL.CLIP.PRETRAINED", args.teacher]
    if args.teacher_model:
        opts += ["MODEL.CLIP.MODEL_NAME", args.teacher_model]
    opts += args.opts
    if args.iters:
        opts += ["SOLVER.MAX_ITER", str(args.iters), "SOLVER.CHECKPOINT_PERIOD", str(args.iters)]
    if args.device:
        opts += ["MODEL.DEVICE", args.device]
    labels = {n: label for n, _, label, _ in TRAINED + EVAL_ONLY}
    unknown = sorted(set(args.variants or []) - set(labels))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {list(labels)}")
    wanted = set(args.variants or labels)
    if wanted & {n for n, _, _, _ in EVAL_ONLY}:
        wanted.add("zs_baseline")  # two-stage and teacher-dense read the baseline's run
    labels = {n: label for n, label in labels.items() if n in wanted}
    threads = args.threads if args.threads is not None else (1 if args.jobs > 1 else 0)

    code = code_fingerprint()

    def one(task):
        name, config, seed, weights, extra = task
        return run_variant(name, config, seed, opts + extra, args.output, weights, threads, code)

    def seeds_of(name: str) -> List[int]:
        return args.main_seeds if name in MAIN else args.seeds

    # trained variants first (``--jobs`` at a time): the paired comparison, then the strict
    # setting, then the other variants, each seed by seed; then the evaluations that read the
    # baseline's weights
    trained = [(n, c, s, None, x) for n, c, _, x in TRAINED if n in labels for s in seeds_of(n)]
    trained.sort(key=lambda t: (t[0] not in MAIN, not t[0].endswith("_strict"), t[2]))
    evals = [
        (n, c, s, os.path.join(args.output, "zs_baseline", f"seed{s}", "model_final.pth"), x)
        for n, c, _, x in EVAL_ONLY
        if n in labels
        for s in args.seeds
    ]
    results: Dict[tuple, Dict[str, float]] = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for phase in (trained, evals):
            for task, metrics in zip(phase, pool.map(one, phase)):
                results[(task[0], task[2])] = metrics
    runs: Dict[str, Dict[int, Dict[str, float]]] = {
        n: {s: results[(n, s)] for s in sorted({t[2] for t in trained + evals if t[0] == n})}
        for n in labels
    }
    summary = summarise(runs)
    meta = {
        "argv": " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "seeds": args.seeds,
        "main_seeds": args.main_seeds,
        "iters": args.iters or configs_max_iter(),
        "teacher": teacher_label(args.teacher, args.teacher_model),
        "code": code,
    }
    table = markdown(summary, runs, labels, meta)
    print("\n" + table)
    if args.markdown:
        write_section(args.markdown, table, args.chart)
    if args.chart:
        bar_chart(summary, labels, args.chart)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
