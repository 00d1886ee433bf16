#!/usr/bin/env python
"""Where the mini-world students go wrong: the large confusions of each benchmark run.

    python tools/miniworld_confusions.py [--output output/benchmark_miniworld]
        [--variants zs_baseline c2s_full] [--min-share 30]

Reads each run's confusion matrix (``<output>/<variant>/seed<N>/inference/c2s_miniworld_val/
sem_seg_confusion.npy``, rows = ground truth, columns = prediction, written by the evaluator) and
prints, per run, the share of seen pixels predicted as an unseen class and every ground-truth
class whose pixels go to one other class at ``--min-share`` percent or more. This is how the
benchmark notes trace a seed's failure to a class that absorbs others.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2s_d2.data.miniworld import MINIWORLD_CLASSES, MINIWORLD_UNSEEN_IDS  # noqa: E402

CONFUSION = os.path.join("inference", "c2s_miniworld_val", "sem_seg_confusion.npy")


def seen_to_unseen_share(conf: np.ndarray, unseen_ids: Sequence[int]) -> float:
    """Percent of the seen classes' ground-truth pixels that are predicted as an unseen class."""
    seen = np.setdiff1d(np.arange(conf.shape[0]), unseen_ids)
    total = conf[seen].sum()
    return 100.0 * conf[np.ix_(seen, unseen_ids)].sum() / total if total else float("nan")


def large_confusions(conf: np.ndarray, min_share: float) -> List[Tuple[int, int, float]]:
    """``(gt, pred, percent)`` for every off-diagonal cell holding at least ``min_share`` percent
    of its ground-truth row, largest first."""
    rows = conf.sum(axis=1, keepdims=True).astype(np.float64)
    share = np.divide(100.0 * conf, rows, out=np.zeros(conf.shape), where=rows > 0)
    np.fill_diagonal(share, 0.0)
    gt, pred = np.nonzero(share >= min_share)
    found = [(int(g), int(p), float(share[g, p])) for g, p in zip(gt, pred)]
    return sorted(found, key=lambda t: -t[2])


def find_runs(output: str, variants: Sequence[str]) -> Dict[Tuple[str, int], str]:
    """``{(variant, seed): confusion file}`` of the finished runs under ``output``."""
    runs = {}
    for variant in variants:
        for path in glob.glob(os.path.join(output, variant, "seed*", CONFUSION)):
            seed = re.search(r"seed(\d+)", path.split(os.sep)[-4]).group(1)
            runs[(variant, int(seed))] = path
    return runs


def report(runs: Dict[Tuple[str, int], str], min_share: float, names=MINIWORLD_CLASSES) -> str:
    lines = [
        "| run | seed | seen pixels -> unseen class (%) | confusions >= "
        f"{min_share:g} % of a class (gt -> prediction) |",
        "|:--|--:|--:|:--|",
    ]
    for (variant, seed), path in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        conf = np.load(path)
        if conf.shape != (len(names), len(names)):
            raise ValueError(f"{path}: confusion of shape {conf.shape}, expected {len(names)}^2")
        worst = ", ".join(
            f"{names[g]}{'*' if g in MINIWORLD_UNSEEN_IDS else ''} -> "
            f"{names[p]}{'*' if p in MINIWORLD_UNSEEN_IDS else ''} {s:.0f}"
            for g, p, s in large_confusions(conf, min_share)
        )
        share = seen_to_unseen_share(conf, MINIWORLD_UNSEEN_IDS)
        lines.append(f"| {variant} | {seed} | {share:.1f} | {worst or '-'} |")
    lines.append("")
    lines.append("`*` marks an unseen class.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="output/benchmark_miniworld")
    parser.add_argument("--variants", nargs="+", default=["zs_baseline", "c2s_full"])
    parser.add_argument("--min-share", type=float, default=30.0)
    args = parser.parse_args(argv)
    runs = find_runs(args.output, args.variants)
    if not runs:
        print(f"no finished run with a confusion matrix under {args.output}", file=sys.stderr)
        return 1
    print(report(runs, args.min_share))
    return 0


if __name__ == "__main__":
    sys.exit(main())
