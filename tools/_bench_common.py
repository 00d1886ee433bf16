"""Shared parts of tools/benchmark_train.py and tools/benchmark_inference.py.

* configs at real size (R-50 student with random init, ViT-B/16 teacher and text tower with
  random weights) or in ``--quick`` mode (R-18-sized tiny student, the package's tiny CLIP, 128 px);
* a synthetic training batch (random images, label maps with several segments and an ignored
  area), so that no dataset is needed: the COCO-Stuff configs read their class names from
  metadata registered at import, without disk access;
* timing (median of wall-clock seconds) and output helpers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2.config import CfgNode, get_cfg  # noqa: E402

from c2s_d2 import add_c2s_config  # noqa: E402  (also registers models and datasets)
from c2s_d2.data.dataset_mapper import semantic_to_instances  # noqa: E402

BASELINE_CONFIG = "configs/coco_stuff/zs_baseline_R50_bs32_80k.yaml"
C2S_CONFIG = "configs/coco_stuff/c2s_R50_bs32_80k.yaml"
IGNORE_LABEL = 255

# Real size: no download (random weights); one prompt template, because prompt ensembling only
# changes the one-off text embeddings, not the cost of a step (80 templates x 1000 latent-vocabulary
# names through a random ViT-B/16 text tower would take an hour on CPU).
REAL_OPTS = [
    "MODEL.WEIGHTS", "",
    "MODEL.CLIP.PRETRAINED", "",
    "MODEL.CLIP.TEXT_TEMPLATES", "single",
]  # fmt: skip

# Quick mode: a tiny student and the package's tiny CLIP (C2S-Tiny, patch 8), for the tests.
QUICK_OPTS = [
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.C2S.NUM_OBJECT_QUERIES", "8",
    "MODEL.C2S.HIDDEN_DIM", "64",
    "MODEL.C2S.NHEADS", "4",
    "MODEL.C2S.DIM_FEEDFORWARD", "128",
    "MODEL.C2S.DEC_LAYERS", "2",
    "MODEL.C2S.TRAIN_NUM_POINTS", "1024",
    "MODEL.C2S.PIXEL_DECODER.CONV_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.MASK_DIM", "64",
    "MODEL.CLIP.MODEL_NAME", "C2S-Tiny",
    "MODEL.CLIP.PRETRAINED", "",
    "MODEL.CLIP.MODEL_CONFIG_FILES", "['C2S-Tiny.json']",
    "MODEL.CLIP.TEXT_TEMPLATES", "single",
    "MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE", "64",
    "MODEL.C2S.DISTILL.PSEUDO_MASK.MIN_AREA", "4",
]  # fmt: skip
QUICK_SIZE = 128


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by both benchmarks."""
    parser.add_argument("--baseline-config", default=BASELINE_CONFIG, help="ZS baseline config")
    parser.add_argument("--c2s-config", default=C2S_CONFIG, help="full C2S config")
    parser.add_argument("--size", type=int, default=512, help="square image side (px)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, threads that wait for each other "
        "at every op make multi-threaded timings erratic)",
    )
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE (cpu or cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny models at 128 px (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="INFO logging of c2s_d2")
    parser.add_argument(
        "--opts", nargs="*", default=[], help="extra KEY VALUE config overrides (both models)"
    )


def setup_run(args: argparse.Namespace) -> None:
    """Threads, seed, logging; ``--quick`` forces 128 px."""
    if args.quick:
        args.size = QUICK_SIZE
    if args.size % 32 or args.size <= 0:
        raise SystemExit(f"--size {args.size}: must be a positive multiple of 32")
    if len(args.opts) % 2:
        raise SystemExit(f"--opts needs KEY VALUE pairs, got {args.opts}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def load_cfg(path: str, args: argparse.Namespace, extra: Sequence[str] = ()) -> CfgNode:
    """A config file with the benchmark's overrides (real or quick), then ``--opts``, then
    ``extra``; not frozen."""
    full = path if os.path.isabs(path) else os.path.join(ROOT, path)
    if not os.path.isfile(full):
        raise SystemExit(f"config file not found: {full}")
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(full)
    cfg.merge_from_list(QUICK_OPTS if args.quick else REAL_OPTS)
    cfg.merge_from_list(["MODEL.DEVICE", args.device, *args.opts, *extra])
    return cfg


def synthetic_label_map(
    size: int, num_classes: int, generator: torch.Generator, num_segments: int = 8
) -> torch.Tensor:
    """[size, size] long label map: Voronoi cells of random seeds with random seen-class ids;
    about a third of the cells are ignored (255: unseen classes and unlabelled pixels)."""
    seeds = torch.rand(num_segments, 2, generator=generator) * size
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    grid = torch.stack([ys, xs], -1).float().view(-1, 1, 2)
    cell = ((grid - seeds[None]) ** 2).sum(-1).argmin(1).view(size, size)
    classes = torch.randperm(num_classes, generator=generator)[:num_segments]
    ignored = torch.zeros(num_segments, dtype=torch.bool)
    ignored[torch.randperm(num_segments, generator=generator)[: max(1, num_segments // 3)]] = True
    labels = torch.where(ignored, torch.full_like(classes, IGNORE_LABEL), classes)
    return labels[cell]


def synthetic_batch(batch: int, size: int, num_classes: int, seed: int = 0) -> List[Dict]:
    """Training inputs as the mapper gives them: ``image`` uint8 [3, S, S] (one colour per
    segment, plus noise), ``sem_seg`` long [S, S], ``instances`` (one mask per class)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        sem = synthetic_label_map(size, num_classes, g)
        palette = torch.randint(0, 256, (256, 3), generator=g).float()
        image = palette[sem.clamp(max=255)].permute(2, 0, 1)
        image = (image + 20 * torch.randn(image.shape, generator=g)).clamp(0, 255)
        out.append(
            {
                "image": image.to(torch.uint8),
                "sem_seg": sem,
                "instances": semantic_to_instances(sem),
                "height": size,
                "width": size,
            }
        )
    return out


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times are the work's (no-op on CPU)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of ``fn`` takes."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def write_json(path: str, data: Dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        print(f"results written to {path}")


def run_description(args: argparse.Namespace) -> Dict:
    """What was measured, for the JSON output."""
    return {
        "quick": bool(args.quick),
        "size": args.size,
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "baseline_config": args.baseline_config,
        "c2s_config": args.c2s_config,
        "opts": list(args.opts),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def env_note(args: argparse.Namespace) -> Optional[str]:
    """A warning line when the machine is busy: other processes slow a multi-threaded run far
    more than a single-threaded one (its threads wait for each other at every op)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load + args.threads > cpus:
        hint = "; prefer --threads 1" if args.threads > 1 else ""
        return f"note: load average {load:.1f} on {cpus} CPUs: wall-clock timings are noisy{hint}"
    return None
