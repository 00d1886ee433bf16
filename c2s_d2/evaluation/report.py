"""Summaries of evaluation results: one line per dataset, and one table over several."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

HEADLINE_KEYS = ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU")


def format_headline(results: Mapping) -> str:
    """``"mIoU 41.2 | mIoU-seen 50.3 | mIoU-unseen 12.0 | hIoU 19.4"`` from ``{"sem_seg": {...}}``."""
    r = results.get("sem_seg", results)
    parts = []
    for k in HEADLINE_KEYS:
        v = r.get(k, float("nan"))
        parts.append(f"{k} {'n/a' if v is None or math.isnan(v) else f'{v:.1f}'}")
    return " | ".join(parts)


def _dataset_info(name: str) -> Tuple[Optional[int], bool]:
    """(number of classes, whether the set has a seen/unseen split) from its registered metadata."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    classes = meta.get("stuff_classes", None)
    return (len(classes) if classes else None), bool(meta.get("unseen_class_ids", []))


def format_results_table(
    results: Mapping[str, Mapping], has_split: Optional[Mapping[str, bool]] = None
) -> str:
    """A pipe table with one row per evaluated dataset (the order of ``results``).

    Columns: dataset, classes, mIoU, and mIoU-seen / mIoU-unseen / hIoU for the sets with a
    seen/unseen split ("-" for the others, e.g. the transfer sets, where every class is
    evaluated); "n/a" for a NaN (no ground-truth pixel in a group).

    Args:
        results: ``{dataset name: {"sem_seg": metrics}}`` as ``Trainer.test`` returns them.
        has_split: per dataset, whether to show the split columns; by default read from the
            registered metadata (a non-empty ``unseen_class_ids``).
    """
    from tabulate import tabulate

    def shown(v) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{v:.1f}"

    rows = []
    for name, res in results.items():
        r = res.get("sem_seg", res)
        num_classes, split = _dataset_info(name)
        if has_split is not None:
            split = bool(has_split.get(name, split))
        row = [name, "-" if num_classes is None else str(num_classes), shown(r.get("mIoU"))]
        if split:
            row += [shown(r.get(k)) for k in HEADLINE_KEYS[1:]]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    return tabulate(
        rows,
        headers=["dataset", "classes", *HEADLINE_KEYS],
        tablefmt="pipe",
        disable_numparse=True,
    )
