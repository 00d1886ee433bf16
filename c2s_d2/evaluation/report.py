"""One-line summaries of evaluation results."""

from __future__ import annotations

import math
from typing import Mapping

HEADLINE_KEYS = ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU")


def format_headline(results: Mapping) -> str:
    """``"mIoU 41.2 | mIoU-seen 50.3 | mIoU-unseen 12.0 | hIoU 19.4"`` from ``{"sem_seg": {...}}``."""
    r = results.get("sem_seg", results)
    parts = []
    for k in HEADLINE_KEYS:
        v = r.get(k, float("nan"))
        parts.append(f"{k} {'n/a' if v is None or math.isnan(v) else f'{v:.1f}'}")
    return " | ".join(parts)
