#!/usr/bin/env python
"""Training-step cost of full C2S against the zero-shot baseline, at real size, on a synthetic batch.

Three models alternate: the ZS baseline, full C2S with the online teacher, and full C2S reading
a teacher-feature cache (c2s_d2/data/teacher_cache.py) written for the synthetic batch before
timing (the cached model never builds or runs the teacher; the mapper's cache look-up, which
runs in data-loader workers in training, is timed apart as ``cache_lookup_per_image_s``).

Both models are built in the same process from the COCO-Stuff configs (R-50 student with random
init, ViT-B/16 teacher and text tower with random weights: no download), and trained on the same
synthetic batch (random images, label maps with several segments and an ignored area). After
warm-up, steps of the models alternate, so that a busy machine slows both alike. A step is
forward + backward + optimizer step (the project's optimizer, gradient clipping included).

Inside the C2S step, timing wrappers (installed by this script only) measure the teacher forward,
the pseudo-mask clustering, latent mining (region embeddings, seen scoring, latent memory, latent
text embeddings), the matching of pseudo regions to queries and the local-distillation pairs.

Besides wall-clock seconds, the process CPU time of each step is recorded: with one thread it
barely depends on other processes. On a shared machine use one thread (the default): with two
threads on two busy cores, each op waits for the descheduled thread, and a step that takes 6.7 s
alone took 16 to 34 s.

    python tools/benchmark_train.py                   # real size: 512 px, batch 2, 1 thread
    python tools/benchmark_train.py --steps 7 --json out/train.json
    python tools/benchmark_train.py --quick --steps 2 # tiny models at 128 px (tests)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _bench_common import add_common_args, env_note, load_cfg, median  # noqa: E402
from _bench_common import run_description, setup_run, synchronize, synthetic_batch  # noqa: E402
from _bench_common import write_json  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from c2s_d2.modeling import c2s_distiller  # noqa: E402
from c2s_d2.modeling.c2s_distiller import C2SDistiller  # noqa: E402
from c2s_d2.modeling.clip.teacher import ClipTeacher  # noqa: E402
from c2s_d2.data.teacher_cache import (  # noqa: E402
    TeacherFeatureCache,
    build_shard_plan,
    cache_fingerprint,
    merge_shard_indexes,
    write_shard,
)
from c2s_d2.solver import build_c2s_optimizer  # noqa: E402

TARGET_RATIO = 1.3  # issue 14: online teacher
TARGET_RATIO_CACHED = 1.05  # issue 14: teacher-feature cache
# (owner, attribute, section name): what the timing wrappers measure inside a C2S step
TIMED_SECTIONS = (
    (ClipTeacher, "forward", "teacher_forward"),
    (c2s_distiller, "pseudo_masks_from_ignored_area_batch", "pseudo_masks"),
    (C2SDistiller, "_pseudo_regions", "pseudo_regions"),
    (C2SDistiller, "_latent_bank", "latent_bank"),
    (C2SDistiller, "_match_pseudo_regions", "pseudo_matching"),
    (C2SDistiller, "_local_pairs", "local_pairs"),
    (c2s_distiller, "cached_teacher_outputs", "teacher_cache"),
)


class SectionTimer:
    """Accumulates wall-clock seconds of wrapped functions per section, step by step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.current: Dict[str, float] = defaultdict(float)

    def wrap(self, fn: Callable, name: str) -> Callable:
        @functools.wraps(fn)
        def timed_fn(*args, **kwargs):
            synchronize(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.current[name] += time.perf_counter() - t0
                self.current[name + "_cpu"] += time.process_time() - c0

        return timed_fn

    def pop(self) -> Dict[str, float]:
        """The seconds of each section since the last call."""
        out, self.current = dict(self.current), defaultdict(float)
        return out

    @contextmanager
    def installed(self) -> Iterator["SectionTimer"]:
        """Patch every ``TIMED_SECTIONS`` attribute with its timing wrapper; restore on exit."""
        saved = []
        try:
            for owner, attr, name in TIMED_SECTIONS:
                original = getattr(owner, attr)  # plain functions (no static/class methods)
                saved.append((owner, attr, original))
                setattr(owner, attr, self.wrap(original, name))
            yield self
        finally:
            for owner, attr, original in reversed(saved):
                setattr(owner, attr, original)


def exclusive_sections(raw: Dict[str, float], suffix: str = "") -> Dict[str, float]:
    """Nested section times -> disjoint parts of the C2S step (seconds; ``suffix="_cpu"``: the
    process CPU time)."""

    def get(name: str) -> float:
        return raw.get(name + suffix, 0.0)

    return {
        "teacher_forward": get("teacher_forward"),
        # the cached model's stand-in for the teacher: resampling the cached maps
        **({"teacher_cache": get("teacher_cache")} if "teacher_cache" in raw else {}),
        "pseudo_masks": get("pseudo_masks"),
        # region embeddings, seen scoring, latent memory update + latent text embeddings
        "latent_mining": get("pseudo_regions") - get("pseudo_masks") + get("latent_bank"),
        "pseudo_matching": get("pseudo_matching"),
        "local_pairs": get("local_pairs"),
    }


class StepRunner:
    """A model and its optimizer; ``step`` runs forward + backward + optimizer step."""

    def __init__(self, cfg, device: str) -> None:
        self.model = build_model(cfg).train()
        self.optimizer = build_c2s_optimizer(cfg, self.model)
        self.device = device
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self, batch: List[Dict]) -> Dict[str, float]:
        """Seconds of forward, backward, optimizer and the whole step (wall clock), and the
        process CPU time of the step (``step_cpu``: less sensitive to other processes)."""
        synchronize(self.device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        losses = self.model(batch)
        loss = sum(losses.values())
        synchronize(self.device)
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        synchronize(self.device)
        t2 = time.perf_counter()
        self.optimizer.step()
        synchronize(self.device)
        t3 = time.perf_counter()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {float(loss)}: {sorted(losses)}")
        cpu = time.process_time() - c0
        times = {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}
        return {**times, "step_cpu": cpu}


def write_synthetic_cache(runner: StepRunner, cfg, batch: List[Dict], directory: str) -> List[Dict]:
    """Write a teacher-feature cache for the synthetic batch with the C2S model's teacher and
    return the batch with the mapper's ``teacher_cache`` entries (no augmentation)."""
    from detectron2.data import transforms as T

    fingerprint = cache_fingerprint(cfg)
    records = [
        {"file_name": f"synthetic_{i}.png", "height": x["height"], "width": x["width"]}
        for i, x in enumerate(batch)
    ]
    plan = build_shard_plan(records, 0, 1, fingerprint)
    teacher = runner.model.distiller.teacher(torch.device(runner.device))

    def items(start):
        for entry, x in zip(plan[start:], batch[start:]):
            image = runner.model._rgb(
                (x["image"].to(runner.device).float() - runner.model.pixel_mean)
                / runner.model.pixel_std
            )
            g, dense = teacher(image[None], size=tuple(entry["input_size"]))
            yield entry, g[0], dense[0]

    write_shard(directory, 0, 1, plan, fingerprint, items)
    merge_shard_indexes(directory, 1)
    cache = TeacherFeatureCache(directory, fingerprint)
    identity = T.TransformList([])
    return [
        {**x, "teacher_cache": cache.lookup(r["file_name"], identity, (x["height"], x["width"]))}
        for r, x in zip(records, batch)
    ]


def summarize(steps: Sequence[Dict[str, float]]) -> Dict:
    keys = steps[0].keys() if steps else ()
    out = {f"{k}_s": median([s[k] for s in steps]) for k in keys}
    out["steps_s"] = [s["step"] for s in steps]
    return out


def run(args: argparse.Namespace) -> Dict:
    setup_run(args)
    batch_opts = ["SOLVER.IMS_PER_BATCH", str(args.batch)]
    base_cfg = load_cfg(args.baseline_config, args, batch_opts)
    c2s_cfg = load_cfg(args.c2s_config, args, batch_opts)
    if not c2s_cfg.MODEL.C2S.DISTILL.ENABLED:
        raise SystemExit(f"{args.c2s_config}: MODEL.C2S.DISTILL.ENABLED is False (not C2S)")

    setup: Dict[str, float] = {}
    t0 = time.perf_counter()
    baseline = StepRunner(base_cfg, args.device)
    setup["build_baseline_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    c2s = StepRunner(c2s_cfg, args.device)
    setup["build_c2s_s"] = time.perf_counter() - t0
    # one-off parts built before training (the trainer does this at construction)
    for k, v in c2s.model.distiller.prepare(args.device).items():
        setup[f"c2s_prepare_{k}"] = v
    num_seen = int(c2s.model.train_bank.shape[0])
    batch = synthetic_batch(args.batch, args.size, num_seen, seed=args.seed)

    with tempfile.TemporaryDirectory(prefix="c2s_bench_cache_") as cache_dir:
        t0 = time.perf_counter()
        cached_batch = write_synthetic_cache(c2s, c2s_cfg, batch, cache_dir)
        setup["write_cache_s"] = time.perf_counter() - t0
        cached_cfg = c2s_cfg.clone()
        cached_cfg.merge_from_list(["MODEL.C2S.DISTILL.TEACHER_CACHE", cache_dir])
        t0 = time.perf_counter()
        cached = StepRunner(cached_cfg, args.device)
        setup["build_c2s_cached_s"] = time.perf_counter() - t0
        # the same initial weights as the online C2S model: only the teacher path differs
        cached.model.load_state_dict(c2s.model.state_dict())
        for k, v in cached.model.distiller.prepare(args.device).items():
            setup[f"c2s_cached_prepare_{k}"] = v
        cache = TeacherFeatureCache(cache_dir)
        from detectron2.data import transforms as T

        t0 = time.perf_counter()
        for i, x in enumerate(cached_batch):
            cache.lookup(f"synthetic_{i}.png", T.TransformList([]), (x["height"], x["width"]))
        setup["cache_lookup_per_image_s"] = (time.perf_counter() - t0) / len(cached_batch)

        runners = {
            "baseline": (baseline, batch),
            "c2s": (c2s, batch),
            "c2s_cached": (cached, cached_batch),
        }
        timer = SectionTimer(args.device)
        records: Dict[str, List[Dict[str, float]]] = {name: [] for name in runners}
        sections: Dict[str, List[Dict[str, float]]] = {"c2s": [], "c2s_cached": []}
        sections_cpu: Dict[str, List[Dict[str, float]]] = {"c2s": [], "c2s_cached": []}
        with timer.installed():
            for i in range(args.warmup):
                for name, (runner, data) in runners.items():
                    setup[f"{name}_warmup_step{i}_s"] = runner.step(data)["step"]
            timer.pop()
            names = list(runners)
            for i in range(args.steps):
                # rotate the order, so no model always runs right after another
                order = names[i % len(names) :] + names[: i % len(names)]
                for name in order:
                    runner, data = runners[name]
                    records[name].append(runner.step(data))
                    raw = timer.pop()
                    if name in sections:
                        sections[name].append(exclusive_sections(raw))
                        sections_cpu[name].append(exclusive_sections(raw, "_cpu"))

    result = {"run": run_description(args), "setup": setup, "target_ratio": TARGET_RATIO}
    result["run"].update({"batch": args.batch, "steps": args.steps, "warmup": args.warmup})
    result["target_ratio_cached"] = TARGET_RATIO_CACHED
    result["baseline"] = {**summarize(records["baseline"]), "params": baseline.params}
    for name, runner in (("c2s", c2s), ("c2s_cached", cached)):
        result[name] = {**summarize(records[name]), "params": runner.params}
        for key, rows in (("sections_s", sections[name]), ("sections_cpu_s", sections_cpu[name])):
            result[name][key] = {k: median([s[k] for s in rows]) for k in rows[0]}
    for name, suffix in (("c2s", ""), ("c2s_cached", "_cached")):
        step, step_cpu = result[name]["step_s"], result[name]["step_cpu_s"]
        result["ratio" + suffix] = step / result["baseline"]["step_s"]
        result["ratio" + suffix + "_cpu"] = step_cpu / result["baseline"]["step_cpu_s"]
        result["shares" + suffix] = {k: v / step for k, v in result[name]["sections_s"].items()}
        result["shares" + suffix + "_cpu"] = {
            k: v / step_cpu for k, v in result[name]["sections_cpu_s"].items()
        }
    result["meets_target"] = result["ratio"] <= TARGET_RATIO
    result["meets_target_cached"] = result["ratio_cached"] <= TARGET_RATIO_CACHED
    teacher = c2s.model.distiller._teacher
    result["teacher"] = {
        "params": sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0,
        "input_size": c2s_cfg.MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE,
    }
    return result


def report(result: Dict) -> None:
    r = result["run"]
    print(
        f"training step, {'quick (tiny models)' if r['quick'] else 'real size'}: "
        f"{r['size']}x{r['size']} px, batch {r['batch']}, {r['threads']} threads, "
        f"device {r['device']}, median of {r['steps']} steps after {r['warmup']} warm-up"
    )
    labels = (("baseline", "ZS baseline"), ("c2s", "full C2S"), ("c2s_cached", "C2S cached"))
    for name, label in labels:
        s = result[name]
        print(
            f"{label:12s} step {s['step_s']:.3f} s (forward {s['forward_s']:.3f}, backward "
            f"{s['backward_s']:.3f}, optimizer {s['optimizer_s']:.3f}); "
            f"{s['params'] / 1e6:.2f} M trained params; steps {[round(x, 3) for x in s['steps_s']]}"
        )
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(f"ratio C2S/baseline: {result['ratio']:.3f} ({verdict} target <= {TARGET_RATIO})")
    verdict = "meets" if result["meets_target_cached"] else "MISSES"
    print(
        f"ratio C2S cached/baseline: {result['ratio_cached']:.3f} ({verdict} target <= "
        f"{TARGET_RATIO_CACHED}); process CPU time: {result['ratio_cached_cpu']:.3f}; cache "
        f"look-up {1000 * result['setup']['cache_lookup_per_image_s']:.2f} ms per image "
        "(data-loader side)"
    )
    extra = result["c2s"]["step_s"] - result["baseline"]["step_s"]
    print(f"extra seconds per C2S step: {extra:.3f}")
    parts = ", ".join(
        f"{k.replace('_', ' ')} {100 * result['shares'][k]:.1f}% ({v:.3f} s)"
        for k, v in result["c2s"]["sections_s"].items()
    )
    print(f"share of the C2S step: {parts}")
    print(
        f"ratio C2S/baseline (process CPU time): {result['ratio_cpu']:.3f} "
        f"(baseline {result['baseline']['step_cpu_s']:.3f} s, C2S {result['c2s']['step_cpu_s']:.3f} s)"
    )
    parts = ", ".join(
        f"{k.replace('_', ' ')} {100 * result['shares_cpu'][k]:.1f}% ({v:.3f} s)"
        for k, v in result["c2s"]["sections_cpu_s"].items()
    )
    print(f"share of the C2S step (process CPU time): {parts}")
    parts = ", ".join(
        f"{k.replace('_', ' ')} {100 * result['shares_cached'][k]:.1f}% ({v:.3f} s)"
        for k, v in result["c2s_cached"]["sections_s"].items()
        if k != "teacher_forward"
    )
    print(f"share of the cached C2S step: {parts}")
    print(
        f"teacher: {result['teacher']['params'] / 1e6:.2f} M params at input "
        f"{result['teacher']['input_size']}; one-off setup (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["setup"].items())
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--steps", type=int, default=5, help="measured steps of each model")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps of each model first")
    p.add_argument("--batch", type=int, default=2, help="images per step")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.batch < 1:
        p.error("--steps, --warmup and --batch must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    note = env_note(args)
    if note:
        print(note)
    result = run(args)
    report(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
