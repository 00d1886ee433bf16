"""Shared machinery of the benchmark preparation scripts (prepare_coco_stuff / voc / pcontext).

Each script turns a dataset's raw label PNGs into label PNGs holding the dataset's class ids
(``0..C-1``, 255 = ignore) through a 256-entry lookup table. This module provides:

* reading raw label PNGs as *index* maps (mode "L" or palette "P"; never RGB colours),
* an idempotent, parallel conversion loop: finished outputs are verified (complete PNG, right
  size, valid ids) and skipped; broken ones are rewritten; every write goes through a temporary
  file and ``os.replace`` so a final file name is always a complete PNG,
* a summary (images written / skipped / repaired, pixels per class),
* the command line shared by the three scripts (``--root``, ``--workers``, ``--no-progress``).

Only numpy, Pillow and tqdm are needed: the scripts run without torch or detectron2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

IGNORE_LABEL = 255
# The class data files are the single source of truth for names, ids and the COCO-Stuff raw map.
CLASS_DATA_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "c2s_d2", "data", "datasets"
)
_PNG_END = b"IEND\xaeB`\x82"  # the last 8 bytes of every complete PNG
_TMP_MARK = ".tmp-"


class PrepareError(RuntimeError):
    """A missing folder or a bad input file; the message is one line naming the path."""


def dataset_root(root: Optional[str] = None) -> str:
    """``root`` if given, else ``$DETECTRON2_DATASETS``, else ``"datasets"`` (detectron2's rule)."""
    return root or os.environ.get("DETECTRON2_DATASETS", "datasets")


def load_class_json(dataset: str) -> Dict:
    """Read ``c2s_d2/data/datasets/<dataset>.json`` and check that its ids are 0..C-1 in order."""
    path = os.path.join(CLASS_DATA_DIR, dataset + ".json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    ids = [c["id"] for c in data["classes"]]
    if ids != list(range(data["num_classes"])):
        raise PrepareError(f"{path}: class ids are not 0..{data['num_classes'] - 1} in order")
    return data


def require_dir(path: str, hint: str) -> str:
    """Return ``path`` or raise ``PrepareError`` naming it (with what to do about it)."""
    if not os.path.isdir(path):
        raise PrepareError(f"folder not found: {path} ({hint})")
    return path


def read_split_list(path: str) -> List[str]:
    """Image stems of a split file (one per line, blank lines ignored)."""
    if not os.path.isfile(path):
        raise PrepareError(f"split list not found: {path}")
    with open(path, encoding="utf-8") as f:
        stems = [line.strip().split()[0] for line in f if line.strip()]
    if not stems:
        raise PrepareError(f"split list is empty: {path}")
    return stems


def write_split_list(path: str, stems: Sequence[str]) -> None:
    """Write a split file atomically (the registration reads it as the split's image list)."""
    tmp = f"{path}{_TMP_MARK}{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(s + "\n" for s in stems))
    os.replace(tmp, path)


def offset_lut(num_classes: int) -> np.ndarray:
    """LUT for datasets whose raw 0 is background: ``0 -> 255``, ``k -> k-1``, ``255 -> 255``.

    Other raw values map to -1 (refused as corrupt input).
    """
    lut = np.full(256, -1, dtype=np.int16)
    lut[0] = IGNORE_LABEL
    lut[1 : num_classes + 1] = np.arange(num_classes)
    lut[IGNORE_LABEL] = IGNORE_LABEL
    return lut


def raw_id_lut(raw_ids: Sequence[int], unused_raw_ids: Sequence[int] = ()) -> np.ndarray:
    """LUT ``raw_ids[j] -> j``; ``unused_raw_ids`` and 255 -> 255; any other value -> -1."""
    if len(set(raw_ids)) != len(raw_ids) or not all(0 <= r < IGNORE_LABEL for r in raw_ids):
        raise PrepareError(f"raw ids must be distinct values in 0..254, got {list(raw_ids)}")
    lut = np.full(256, -1, dtype=np.int16)
    lut[list(unused_raw_ids)] = IGNORE_LABEL
    lut[list(raw_ids)] = np.arange(len(raw_ids))
    lut[IGNORE_LABEL] = IGNORE_LABEL
    return lut


def read_index_png(path: str) -> np.ndarray:
    """Decode a label PNG as its index map, (H, W) uint8: palette indices for mode "P"."""
    if not os.path.isfile(path):
        raise PrepareError(f"label file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P"):
                raise PrepareError(
                    f"label file {path} has mode {img.mode!r}; expected a grayscale ('L') or "
                    "palette ('P') PNG holding class indices, not colours"
                )
            return np.array(img, dtype=np.uint8)
    except PrepareError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise PrepareError(f"corrupt label file {path}: {e}") from None


def _verified_output(dst: str, size: Tuple[int, int], num_classes: int) -> Optional[np.ndarray]:
    """The decoded output if ``dst`` is a complete, valid label PNG of ``size`` (W, H), else None."""
    try:
        with open(dst, "rb") as f:
            f.seek(-len(_PNG_END), os.SEEK_END)
            if f.read() != _PNG_END:
                return None
        with Image.open(dst) as img:
            img.load()
            if img.mode != "L" or img.size != tuple(size):
                return None
            label = np.array(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError):
        return None
    values = np.unique(label)
    if ((values >= num_classes) & (values != IGNORE_LABEL)).any():
        return None
    return label


def write_png_atomic(label: np.ndarray, dst: str) -> None:
    """Write a (H, W) uint8 label PNG (mode "L") so that ``dst`` is never seen half-written."""
    tmp = f"{dst}{_TMP_MARK}{os.getpid()}"
    Image.fromarray(label).save(tmp, format="PNG")
    os.replace(tmp, dst)


def convert_one(
    task: Tuple[str, str], lut: np.ndarray, num_classes: int
) -> Tuple[str, Optional[np.ndarray], str]:
    """Convert one raw label ``(src, dst)``; returns (status, pixel counts over 0..255, error).

    status is "written", "skipped" (a valid output existed), "repaired" (a broken output was
    rewritten) or "error" (with a one-line message naming the input file).
    """
    src, dst = task
    try:
        status = "written"
        if os.path.exists(dst) and os.path.isfile(src):
            with Image.open(src) as img:  # header only: the output must match the input's size
                size = img.size
            done = _verified_output(dst, size, num_classes)
            if done is not None:
                return "skipped", np.bincount(done.ravel(), minlength=256), ""
            status = "repaired"
        raw = read_index_png(src)
        mapped = lut[raw]
        if (mapped < 0).any():
            bad = np.unique(raw[mapped < 0]).tolist()
            raise PrepareError(f"label file {src} holds values {bad} outside the dataset's ids")
        out = mapped.astype(np.uint8)
        write_png_atomic(out, dst)
        return status, np.bincount(out.ravel(), minlength=256), ""
    except PrepareError as e:
        return "error", None, str(e)
    except (OSError, ValueError, SyntaxError) as e:
        return "error", None, f"corrupt label file {src}: {e}"


@dataclass
class SplitSummary:
    """Outcome of one split: counts of files and pixels per output id (0..255)."""

    name: str
    written: int = 0
    skipped: int = 0
    repaired: int = 0
    pixel_counts: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))

    @property
    def num_images(self) -> int:
        return self.written + self.skipped + self.repaired


def _remove_stale_temporaries(folder: str) -> None:
    """Delete temporary files left by an interrupted run (their final names were never made)."""
    for name in os.listdir(folder):
        if _TMP_MARK in name:
            os.remove(os.path.join(folder, name))


def convert_split(
    name: str,
    tasks: Sequence[Tuple[str, str]],
    lut: np.ndarray,
    num_classes: int,
    workers: int = 0,
    progress: bool = True,
) -> SplitSummary:
    """Convert every ``(src, dst)`` of a split, in parallel when ``workers > 1``.

    Raises ``PrepareError`` naming the first bad input file (after all others are done).
    """
    for folder in sorted({os.path.dirname(dst) for _, dst in tasks}):
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temporaries(folder)
    summary = SplitSummary(name)
    errors: List[str] = []
    fn = partial(convert_one, lut=lut, num_classes=num_classes)
    bar = tqdm(total=len(tasks), desc=name, unit="img", disable=not progress, dynamic_ncols=True)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, min(64, len(tasks) // (4 * workers)))
            results = pool.map(fn, tasks, chunksize=chunk)
            _collect(results, summary, errors, bar)
    else:
        _collect(map(fn, tasks), summary, errors, bar)
    bar.close()
    if errors:
        more = f" (and {len(errors) - 1} more bad input files)" if len(errors) > 1 else ""
        raise PrepareError(errors[0] + more)
    return summary


def _collect(results, summary: SplitSummary, errors: List[str], bar: tqdm) -> None:
    for status, counts, error in results:
        bar.update(1)
        if status == "error":
            errors.append(error)
            continue
        setattr(summary, status, getattr(summary, status) + 1)
        summary.pixel_counts += counts


def format_summary(summaries: Sequence[SplitSummary], class_names: Sequence[str]) -> str:
    """A table: images written/skipped/repaired per split, then pixels per class and split."""
    lines = ["split: written / skipped / repaired"]
    for s in summaries:
        lines.append(
            f"  {s.name}: {s.written} / {s.skipped} / {s.repaired} ({s.num_images} images)"
        )
    width = max(len(n) for n in class_names)
    header = f"{'id':>4} {'class':<{width}} " + " ".join(f"{s.name:>14}" for s in summaries)
    lines += ["pixels per class:", header]
    rows = [(str(i), n, i) for i, n in enumerate(class_names)] + [("255", "(ignore)", 255)]
    for idx, cname, out_id in rows:
        counts = " ".join(f"{int(s.pixel_counts[out_id]):>14d}" for s in summaries)
        lines.append(f"{idx:>4} {cname:<{width}} {counts}")
    empty = [n for i, n in enumerate(class_names) if all(s.pixel_counts[i] == 0 for s in summaries)]
    if empty:
        lines.append(f"classes without any pixel: {', '.join(empty)}")
    return "\n".join(lines)


def run_cli(
    prepare: Callable[..., List],
    class_names: Optional[Callable[[], Sequence[str]]],
    description: str,
    argv: Optional[Sequence[str]] = None,
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
    summarize: Optional[Callable[[List], str]] = None,
) -> int:
    """Command line shared by the scripts; returns the exit code (1 with a one-line error).

    ``prepare`` gets ``root``, ``workers``, ``progress`` and the arguments ``add_arguments`` adds,
    by name; the result is printed by ``summarize`` (default: ``format_summary`` with
    ``class_names()``).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="worker processes (0 or 1: convert in this process)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    if add_arguments is not None:
        add_arguments(parser)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    progress = not args.pop("no_progress")
    try:
        summaries = prepare(progress=progress, **args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summarize is None:
        print(format_summary(summaries, class_names()))
    else:
        print(summarize(summaries))
    return 0
