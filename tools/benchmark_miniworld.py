#!/usr/bin/env python
"""Train and evaluate every C2S variant on the mini-world, over several seeds.

    python tools/benchmark_miniworld.py                 # 3 seeds, full schedule (hours on CPU)
    python tools/benchmark_miniworld.py --quick         # 1 seed, short schedule (<= 10 min)
    python tools/benchmark_miniworld.py --jobs 5 --device cuda  # one GPU, five runs at a time
    python tools/benchmark_miniworld.py --seeds 0 1 --iters 500 --teacher PATH

Variants: the zero-shot baseline, global only, local only, local without latent classes and
full C2S (trained), the baseline and full C2S in the strict inductive setting (training images
holding an unseen pixel dropped), full C2S trained from the teacher-feature cache
(``tools/cache_teacher_features.py``, built once under ``<output>/teacher_cache``), plus
teacher-only dense and two-stage (evaluated; two-stage uses the baseline's student) and the
transfer evaluation: the baseline's and full C2S's weights evaluated on the transfer mini-world
(``c2s_miniworld_transfer_val``: other layouts, scales, lighting and 6 new materials). The
baseline, full C2S, the cached variant and the transfer evaluations run over ``--main-seeds``
(default 5 seeds), the other variants over ``--seeds`` (default 3).

No stale results: every run folder holds ``run_key.json`` (a fingerprint of the package's code,
``train_net.py`` and the mini-world configs; the config and overrides; the teacher's weights;
the dataset's generator version and parameters). A finished run is read back only when its key
equals the current one; a stale run is deleted and rerun. ``--records DIR`` (default
``docs/benchmark_miniworld_runs`` for the default output) keeps each finished run's key and
metrics, a few KiB tracked in git, so that a benchmark spanning several machines resumes from
them; an evaluation whose record is gone retrains its source when the weights are gone too. Runs train with ``--deterministic``. All use the same CLIP (the teacher) for the text side, so the only
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
import threading
import time
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "miniworld")
STRICT = ["DATASETS.ZERO_SHOT_SETTING", "inductive_strict"]
CACHE_OPT = "MODEL.C2S.DISTILL.TEACHER_CACHE"
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
    (
        "c2s_full_cached",
        "c2s_full_R18_bs8_1k.yaml",
        "full C2S, teacher-feature cache",
        [CACHE_OPT, "{cache}"],
    ),
]
MAIN = ("zs_baseline", "c2s_full")  # the paired comparison: over --main-seeds
MAIN_SEEDED = MAIN + ("c2s_full_cached",)  # variants over --main-seeds
VAL = "c2s_miniworld_val"
TRANSFER = "c2s_miniworld_transfer_val"
TEST_TRANSFER = ["DATASETS.TEST", f"('{TRANSFER}',)"]
# name, config, label, extra overrides, the trained variant whose weights it evaluates, dataset
EVAL_ONLY = [
    (
        "transfer_zs_baseline",
        "zs_baseline_R18_bs8_1k.yaml",
        "zero-shot baseline on the transfer set",
        TEST_TRANSFER,
        "zs_baseline",
        TRANSFER,
    ),
    (
        "transfer_c2s_full",
        "c2s_full_R18_bs8_1k.yaml",
        "full C2S on the transfer set",
        TEST_TRANSFER,
        "c2s_full",
        TRANSFER,
    ),
    (
        "teacher_dense",
        "teacher_dense.yaml",
        "teacher-only dense (MaskCLIP-style)",
        [],
        "zs_baseline",
        VAL,
    ),
    (
        "two_stage",
        "two_stage_R18.yaml",
        "two-stage (baseline student + teacher per mask)",
        [],
        "zs_baseline",
        VAL,
    ),
]
TRANSFER_PAIR = ("transfer_zs_baseline", "transfer_c2s_full")
CACHE_PAIR = ("c2s_full", "c2s_full_cached")
KEY_FILE = "run_key.json"
KEYS = ("mIoU-seen", "mIoU-unseen", "hIoU", "mIoU")
FILTER_KEYS = ("seen_filter_rejected_pct", "latent_reseeds")
DOCS = os.path.join(ROOT, "docs")
PROGRESS_EVERY_S = 60
_ITER_RE = re.compile(r"(?:eta: (\S+)\s+)?iter: (\d+)")
BEGIN, END = "<!-- benchmark_miniworld:begin -->", "<!-- benchmark_miniworld:end -->"


def metrics_path(out_dir: str, dataset: str = VAL) -> str:
    return os.path.join(out_dir, "inference", dataset, "sem_seg_metrics.json")


def read_metrics(out_dir: str, dataset: str = VAL) -> Optional[Dict[str, float]]:
    path = metrics_path(out_dir, dataset)
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


def record_path(records: str, name: str, seed: int) -> str:
    return os.path.join(records, name, f"seed{seed}.json")


def _matchable(key: Dict) -> Dict:
    """A key without the weights file's hash (a retrained source has the same run key) and
    without where the teacher-feature cache lies (its content follows from the teacher, the
    dataset and the config, which the key holds): a record matches from any output folder."""
    out = {k: v for k, v in key.items() if k != "eval_weights"}
    opts = list(out.get("opts") or [])
    for i in range(len(opts) - 1):
        if opts[i] == CACHE_OPT:
            opts[i + 1] = "{cache}"
    if "opts" in out:
        out["opts"] = opts
    return out


def read_record(records: Optional[str], name: str, seed: int, key: Dict) -> Optional[Dict]:
    """The recorded metrics of run ``name``/``seed`` when the record's key equals ``key``."""
    if not records:
        return None
    try:
        with open(record_path(records, name, seed)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec.get("metrics") if _matchable(rec.get("key") or {}) == _matchable(key) else None


@lru_cache(maxsize=None)
def machine_info() -> Dict:
    """Where a run ran: CPU model, torch's CPU kernel set and versions. Not part of a run key:
    deterministic mode makes a run bit-identical on one machine, but another CPU (another
    kernel set, e.g. AVX2 vs AVX-512) rounds differently and the same seed gives other
    numbers, so a record says which machine produced it. Probed once per process (cached;
    callers copy before adding to it)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")))
    except (OSError, StopIteration):
        pass
    probe = (
        "import torch, numpy; print(torch.__version__, torch.backends.cpu.get_cpu_capability(),"
        " numpy.__version__)"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    torch_v, capability, numpy_v = (out + ["unknown"] * 3)[:3]
    return dict(
        cpu=cpu,
        cpu_capability=capability,
        torch=torch_v,
        numpy=numpy_v,
        python=sys.version.split()[0],
    )


def write_record(
    records: Optional[str], name: str, seed: int, key: Dict, metrics: Dict, seconds=None
) -> None:
    """Keep a finished run's key and metrics (a few KiB, tracked in git): the benchmark resumes
    on another machine from the records where the run folders (weights, logs) are gone. The
    record also says where and when the run ran (``machine``; not matched on read-back)."""
    if not records:
        return
    path = record_path(records, name, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    machine = dict(machine_info(), date=time.strftime("%Y-%m-%d"))
    if seconds is not None:
        machine["seconds"] = round(seconds)
    with open(tmp, "w") as f:
        json.dump({"key": key, "metrics": metrics, "machine": machine}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def key_digest(key: Dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def run_variant(
    name,
    config,
    seed,
    opts,
    out_root,
    eval_only_weights=None,
    threads=0,
    code="",
    dataset=VAL,
    records=None,
    source_key=None,
    need_weights=False,
    prepare=None,
) -> Tuple[Dict[str, float], Dict]:
    """Train (or, with ``eval_only_weights``, evaluate) one variant and seed; returns its
    metrics and run key. Reads back a finished run folder with the same key, else a record with
    the same key (``records``; not when ``need_weights``: the caller needs the weights file).
    ``prepare()`` runs before a run that has to train or evaluate."""
    out = os.path.join(out_root, name, f"seed{seed}")
    key = run_key(config, [*opts, "SEED", str(seed)], eval_only_weights, code)
    if source_key is not None:
        key["eval_source"] = key_digest(source_key)
    stored = read_key(out)
    if os.path.isdir(out) and stored != key:
        why = "no key" if stored is None else ", ".join(k for k in key if stored.get(k) != key[k])
        print(f"  {name} seed {seed}: stale ({why}): rerun", flush=True)
        shutil.rmtree(out)
    cached = read_metrics(out, dataset)
    if cached is not None:
        print(f"  {name} seed {seed}: cached")
        metrics = dict(cached, **(read_filter_stats(out) or {}))
        if read_record(records, name, seed, key) is None:
            write_record(records, name, seed, key, metrics)
        return metrics, key
    if not need_weights:
        recorded = read_record(records, name, seed, key)
        if recorded is not None:
            print(f"  {name} seed {seed}: recorded")
            return recorded, key
    if prepare is not None:
        prepare()
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
    metrics = read_metrics(out, dataset)
    if metrics is None:
        raise RuntimeError(f"{name} seed {seed}: no metrics written under {out}")
    seconds = time.time() - start
    print(f"  {name} seed {seed}: {seconds:.0f} s  " + fmt_row(metrics), flush=True)
    metrics = dict(metrics, **(read_filter_stats(out) or {}))
    write_record(records, name, seed, key, metrics, seconds)
    return metrics, key


def run_scheduled(tasks: List, deps: Dict, work, jobs: int, results: Dict) -> Dict:
    """Run ``work(task)`` for every task on ``jobs`` threads and return ``results`` filled with
    ``{task: work(task)}``. A free thread takes the first task, in the order of ``tasks``, whose
    dependency (``deps[task]``, another task) has finished, so an evaluation never holds a
    thread while its source trains. The first error stops the scheduling and is raised."""
    pending, errors = list(tasks), []
    cond = threading.Condition()

    def worker() -> None:
        while True:
            with cond:
                while True:
                    if errors or not pending:
                        return
                    ready = [t for t in pending if t not in deps or deps[t] in results]
                    if ready:
                        task = ready[0]
                        pending.remove(task)
                        break
                    cond.wait()
            try:
                out = work(task)
            except BaseException as e:  # noqa: B902 (re-raised in the caller's thread)
                with cond:
                    errors.append(e)
                    cond.notify_all()
                return
            with cond:
                results[task] = out
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def build_teacher_cache(cache_dir: str, config: str, opts: List[str], threads: int) -> None:
    """``tools/cache_teacher_features.py`` for the mini-world's training images (resumable: a
    complete cache is checked and kept)."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "cache_teacher_features.py")]
    cmd += ["--config-file", os.path.join(CONFIGS, config), "--output", cache_dir, *opts]
    env = dict(os.environ)
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.makedirs(cache_dir, exist_ok=True)
    log = os.path.join(cache_dir, "cache.log")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"cache_teacher_features.py failed (log: {log}):\n{tail}")


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


def paired_differences(runs, pair=MAIN) -> Dict[int, Dict[str, float]]:
    """``pair[1]`` minus ``pair[0]`` (default: full C2S minus the baseline), per seed both ran."""
    if not all(n in runs for n in pair):
        return {}
    base, full = runs[pair[0]], runs[pair[1]]
    return {s: {k: full[s][k] - base[s][k] for k in KEYS} for s in sorted(set(base) & set(full))}


def _paired_table(diffs: Dict[int, Dict[str, float]], keys=KEYS, headers=None) -> List[str]:
    headers = headers or keys
    lines = ["| seed | " + " | ".join(headers) + " |", "|---|" + "---|" * len(keys)]
    for sd, d in diffs.items():
        lines.append(f"| {sd} | " + " | ".join(f"{d[k]:+.1f}" for k in keys) + " |")
    mean = {k: statistics.fmean(d[k] for d in diffs.values()) for k in keys}
    wins = {k: sum(d[k] > 0 for d in diffs.values()) for k in keys}
    lines.append(
        "| mean (seeds better) | "
        + " | ".join(f"{mean[k]:+.1f} ({wins[k]}/{len(diffs)})" for k in keys)
        + " |"
    )
    return lines


def _per_seed_rows(runs, names, labels) -> List[str]:
    seeds = sorted({sd for n in names for sd in runs[n]})
    lines = ["| variant | " + " | ".join(f"seed {sd}" for sd in seeds) + " |"]
    lines += ["|---|" + "---|" * len(seeds)]
    for name in names:
        cells = []
        for sd in seeds:
            m = runs[name].get(sd)
            cells.append(
                "-"
                if m is None
                else " / ".join(f"{m[k]:.1f}" for k in ("mIoU-seen", "mIoU-unseen", "hIoU"))
            )
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary, runs, labels, meta) -> str:
    main = [n for n in summary if n not in TRANSFER_PAIR]
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
    for name in main:
        s = summary[name]
        cells = [f"{s[k][0]:.1f} ± {s[k][1]:.1f}" for k in KEYS]
        rate = s.get("seen_filter_rejected_pct")
        rate_cell = f"{rate[0]:.1f} %" if rate else "-"
        lines.append(
            f"| {labels[name]} | {s[KEYS[0]][2]} | " + " | ".join(cells) + f" | {rate_cell} |"
        )
    lines += ["", "Per seed (mIoU-seen / mIoU-unseen / hIoU):", ""]
    lines += _per_seed_rows(runs, main, labels)
    diffs = paired_differences(runs)
    if diffs:
        lines += ["", "Full C2S minus the baseline, paired by seed:", ""] + _paired_table(diffs)
    cached = paired_differences(runs, CACHE_PAIR)
    if cached:
        lines += ["", "Teacher-feature cache minus the online teacher (full C2S), paired by seed:"]
        lines += [""] + _paired_table(cached)
    transfer = [n for n in TRANSFER_PAIR if n in summary]
    if transfer:
        lines += [
            "",
            "### Transfer: the same models on the transfer mini-world",
            "",
            "The baseline and full C2S models above, evaluated with no retraining on "
            "`c2s_miniworld_transfer_val` (other layouts, scales and lighting; 22 classes). "
            "Here *old* is the mean IoU over the mini-world's 16 materials and *new* over the 6 "
            "materials no mini-world scene, label or name holds (hIoU: their harmonic mean).",
            "",
            "| model | seeds | old | new | hIoU | mIoU |",
            "|---|---|---|---|---|---|",
        ]
        for name in transfer:
            s = summary[name]
            cells = [f"{s[k][0]:.1f} ± {s[k][1]:.1f}" for k in KEYS]
            lines.append(f"| {labels[name]} | {s[KEYS[0]][2]} | " + " | ".join(cells) + " |")
        lines += ["", "Per seed (old / new / hIoU):", ""]
        lines += _per_seed_rows(runs, transfer, labels)
        tdiffs = paired_differences(runs, TRANSFER_PAIR)
        if tdiffs:
            lines += ["", "Full C2S minus the baseline on the transfer set, paired by seed:", ""]
            lines += _paired_table(tdiffs, headers=("old", "new", "hIoU", "mIoU"))
    lines += ["", "![mini-world benchmark](benchmark_miniworld.png)", ""]
    return "\n".join(lines)


def bar_chart(summary, labels, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary if n not in TRANSFER_PAIR]
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
        "--records",
        default=None,
        help="folder of finished runs' keys and metrics, read back when a run folder is gone "
        "(default: docs/benchmark_miniworld_runs for the default --output, else none)",
    )
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
        help="only these (default: all): " + " ".join(t[0] for t in TRAINED + EVAL_ONLY),
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
    if args.records is None and not args.output and not args.quick:
        args.records = os.path.join(DOCS, "benchmark_miniworld_runs")
    records = args.records or None
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
    labels = {t[0]: t[2] for t in TRAINED + EVAL_ONLY}
    unknown = sorted(set(args.variants or []) - set(labels))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {list(labels)}")
    wanted = set(args.variants or labels)
    evals = {n: (c, x, src, ds) for n, c, _, x, src, ds in EVAL_ONLY}
    wanted |= {evals[n][2] for n in wanted if n in evals}  # an evaluation reads its source's run
    labels = {n: label for n, label in labels.items() if n in wanted}
    threads = args.threads if args.threads is not None else (1 if args.jobs > 1 else 0)

    code = code_fingerprint()
    cache_dir = os.path.join(args.output, "teacher_cache")
    trained = {n: (c, [cache_dir if v == "{cache}" else v for v in x]) for n, c, _, x in TRAINED}

    def seeds_of(name: str) -> List[int]:
        return args.main_seeds if name in MAIN_SEEDED + TRANSFER_PAIR else args.seeds

    # Order: seed by seed, the paired comparison with the evaluations of its weights right
    # after each baseline / C2S run (weights do not outlive a machine; records do), then the
    # cached teacher, the strict setting and the other variants, each seed by seed.
    position = {"zs_baseline": 0, "transfer_zs_baseline": 1, "teacher_dense": 2, "two_stage": 3}
    position.update({"c2s_full": 4, "transfer_c2s_full": 5})

    def priority(task):
        name, seed = task
        group = 0 if name in position else 1 if name == "c2s_full_cached" else 2
        group += 1 if name.endswith("_strict") else 0 if group < 2 else 2
        return (group, seed, position.get(name, 0), name)

    tasks = sorted({(n, s) for n in labels for s in seeds_of(n)}, key=priority)
    for n, s in list(tasks):  # an evaluation needs its source's weights of the same seed
        if n in evals and (evals[n][2], s) not in tasks:
            tasks.append((evals[n][2], s))
    tasks.sort(key=priority)
    cache_lock, source_locks = threading.Lock(), {t: threading.Lock() for t in tasks}
    cache_ready = []

    def train(name: str, seed: int, need_weights: bool = False):
        config, extra = trained[name]

        def build_cache() -> None:
            with cache_lock:
                if not cache_ready:
                    print(f"  teacher-feature cache: {cache_dir}", flush=True)
                    build_teacher_cache(cache_dir, config, opts, threads)
                    cache_ready.append(True)

        return run_variant(
            name, config, seed, opts + extra, args.output, None, threads, code,
            records=records, need_weights=need_weights,
            prepare=build_cache if name == "c2s_full_cached" else None,
        )  # fmt: skip

    def evaluate(name: str, seed: int, source_result):
        config, extra, source, dataset = evals[name]
        _, source_key = source_result
        weights = os.path.join(args.output, source, f"seed{seed}", "model_final.pth")
        key = run_key(config, [*opts, *extra, "SEED", str(seed)], None, code)
        key["eval_source"] = key_digest(source_key)
        recorded = read_record(records, name, seed, key)
        if recorded is not None and not os.path.isfile(weights):
            print(f"  {name} seed {seed}: recorded")
            return recorded, key
        with source_locks[(source, seed)]:  # the source came from a record: train it again
            if not os.path.isfile(weights):
                print(f"  {source} seed {seed}: weights needed by {name}: train", flush=True)
                train(source, seed, need_weights=True)
        return run_variant(
            name, config, seed, opts + extra, args.output, weights, threads, code, dataset,
            records, source_key,
        )  # fmt: skip

    deps = {(n, s): (evals[n][2], s) for n, s in tasks if n in evals}
    done: Dict[tuple, tuple] = {}

    def work(task):
        name, seed = task
        if name in evals:
            return evaluate(name, seed, done[deps[task]])
        return train(name, seed)

    done = run_scheduled(tasks, deps, work, args.jobs, done)
    results = {task: out[0] for task, out in done.items()}
    runs: Dict[str, Dict[int, Dict[str, float]]] = {
        n: {s: results[(n, s)] for s in seeds_of(n)} for n in labels
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
