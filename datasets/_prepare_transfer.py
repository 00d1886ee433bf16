"""Shared machinery of the transfer-set preparation scripts (ADE20K-847, PASCAL Context-459/59).

The 8-bit sets (ADE20K-150, VOC-20/21) use ``_prepare_common`` as it is. This module adds what
sets with more than 255 classes need: label PNGs of 16 bits (uint16, mode ``"I;16"``, ignore =
65535), per-class pixel counts of any length, and a conversion loop over tasks that may write
more than one file (ADE20K-847 writes a resized image beside its label). Everything else follows
``_prepare_common``: verified outputs are skipped, broken ones rewritten, every write goes through
a temporary file and ``os.replace``, a bad input stops the script with a one-line message naming
the file, and the split list is written last.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from _prepare_common import (
    _PNG_END,
    _TMP_MARK,
    CLASS_DATA_DIR,
    PrepareError,
    _remove_stale_temporaries,
    read_index_png,
    run_cli,
)

IGNORE_16 = 65535  # ignore label of the 16-bit sets (the 8-bit ones keep 255)
_JPEG_END = b"\xff\xd9"

# (status, pixel counts [C + 1] with the ignored pixels last, error message)
TaskResult = Tuple[str, Optional[np.ndarray], str]


@lru_cache(maxsize=None)
def load_transfer_classes(dataset: str) -> Dict:
    """Read ``c2s_d2/data/datasets/<dataset>.json`` (cached: do not modify the result); its ids
    must be 0..C-1 in order."""
    path = os.path.join(CLASS_DATA_DIR, dataset + ".json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    ids = [c["id"] for c in data["classes"]]
    if ids != list(range(data["num_classes"])):
        raise PrepareError(f"{path}: class ids are not 0..{data['num_classes'] - 1} in order")
    return data


def ignore_label_for(num_classes: int) -> int:
    """255 for sets that fit 8-bit labels (< 255 classes), else 65535."""
    return 255 if num_classes < 255 else IGNORE_16


def label_counts(label: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """Pixels per class id of a (H, W) label: (C + 1,) int64, the ignored pixels last."""
    flat = label.ravel().astype(np.int64)
    flat = np.where(flat == ignore, num_classes, flat)
    return np.bincount(flat, minlength=num_classes + 1)


def check_label_ids(label: np.ndarray, num_classes: int, ignore: int, src: str) -> None:
    """Refuse a converted label holding ids outside 0..C-1 and ``ignore`` (names ``src``)."""
    bad = (label >= num_classes) & (label != ignore)
    if bad.any():
        values = np.unique(label[bad]).tolist()[:10]
        raise PrepareError(f"{src}: converted ids {values} outside 0..{num_classes - 1}")


def write_label_atomic(label: np.ndarray, dst: str) -> None:
    """Write a (H, W) uint8 (mode "L") or uint16 (mode "I;16") label PNG atomically."""
    if label.dtype not in (np.uint8, np.uint16):
        raise PrepareError(f"{dst}: labels are written as uint8 or uint16, got {label.dtype}")
    tmp = f"{dst}{_TMP_MARK}{os.getpid()}"
    Image.fromarray(label).save(tmp, format="PNG")
    os.replace(tmp, dst)


def write_jpeg_atomic(image: np.ndarray, dst: str) -> None:
    """Write an (H, W, 3) uint8 RGB image as JPEG (Pillow's default quality 75) atomically."""
    tmp = f"{dst}{_TMP_MARK}{os.getpid()}"
    Image.fromarray(image).save(tmp, format="JPEG")
    os.replace(tmp, dst)


def _file_ends_with(path: str, end: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < len(end):
            return False
        f.seek(-len(end), os.SEEK_END)
        return f.read() == end


def verified_label(
    dst: str, size: Optional[Tuple[int, int]], num_classes: int, ignore: int
) -> Optional[np.ndarray]:
    """The decoded label if ``dst`` is a complete label PNG of ``size`` (W, H) with valid ids, in
    8 bits when ``ignore`` is 255 and 16 bits otherwise; else None."""
    if size is None or not os.path.isfile(dst):
        return None
    mode = "L" if ignore == 255 else "I;16"
    try:
        if not _file_ends_with(dst, _PNG_END):
            return None
        with Image.open(dst) as img:
            img.load()
            if img.mode != mode or img.size != tuple(size):
                return None
            label = np.array(img)
    except (OSError, ValueError, SyntaxError):
        return None
    values = np.unique(label)
    if ((values >= num_classes) & (values != ignore)).any():
        return None
    return label


def verified_jpeg(dst: str, size: Tuple[int, int]) -> bool:
    """Whether ``dst`` is a complete JPEG of ``size`` (W, H)."""
    if not os.path.isfile(dst):
        return False
    try:
        if not _file_ends_with(dst, _JPEG_END):
            return False
        with Image.open(dst) as img:
            return img.format == "JPEG" and img.size == tuple(size)
    except (OSError, ValueError, SyntaxError):
        return False


def image_size(path: str) -> Optional[Tuple[int, int]]:
    """(W, H) from an image header, or None when the file is missing or unreadable."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError):
        return None


@dataclass
class TransferSummary:
    """Outcome of one split: file counts, pixels per class id (ignored pixels last)."""

    name: str
    class_names: Sequence[str]
    written: int = 0
    skipped: int = 0
    repaired: int = 0
    pixel_counts: np.ndarray = field(default=None)  # type: ignore[assignment]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __post_init__(self) -> None:
        if self.pixel_counts is None:
            self.pixel_counts = np.zeros(self.num_classes + 1, dtype=np.int64)

    @property
    def num_images(self) -> int:
        return self.written + self.skipped + self.repaired


def run_tasks(
    name: str,
    tasks: Sequence,
    fn: Callable[[object], TaskResult],
    class_names: Sequence[str],
    out_dirs: Sequence[str],
    workers: int = 0,
    progress: bool = True,
) -> TransferSummary:
    """Run ``fn`` (a picklable function of one task) on every task, in parallel when
    ``workers > 1``. Raises ``PrepareError`` naming the first bad input (after the others)."""
    for folder in sorted(set(out_dirs)):
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temporaries(folder)
    summary = TransferSummary(name, list(class_names))
    errors: List[str] = []
    bar = tqdm(total=len(tasks), desc=name, unit="img", disable=not progress, dynamic_ncols=True)

    def collect(results) -> None:
        for status, counts, error in results:
            bar.update(1)
            if status == "error":
                errors.append(error)
                continue
            setattr(summary, status, getattr(summary, status) + 1)
            summary.pixel_counts += counts

    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, min(64, len(tasks) // (4 * workers)))
            collect(pool.map(fn, tasks, chunksize=chunk))
    else:
        collect(map(fn, tasks))
    bar.close()
    if errors:
        more = f" (and {len(errors) - 1} more bad input files)" if len(errors) > 1 else ""
        raise PrepareError(errors[0] + more)
    return summary


def guarded(fn: Callable[[], TaskResult], src: str) -> TaskResult:
    """Run one task body; a bad input becomes an ``("error", None, message)`` result."""
    try:
        return fn()
    except PrepareError as e:
        return "error", None, str(e)
    except (OSError, ValueError, SyntaxError, KeyError) as e:
        return "error", None, f"corrupt input file {src}: {e}"


def convert_index_png(
    task: Tuple[str, str], lut: np.ndarray, num_classes: int, ignore: int
) -> TaskResult:
    """Convert one raw index PNG ``(src, dst)`` through ``lut`` (256 entries: raw value -> class
    id or ``ignore``, -1 = not a valid raw value); 8-bit output when ``ignore`` is 255."""
    src, dst = task

    def body() -> TaskResult:
        status = "written"
        if os.path.exists(dst):
            done = verified_label(dst, image_size(src), num_classes, ignore)
            if done is not None:
                return "skipped", label_counts(done, num_classes, ignore), ""
            status = "repaired"
        raw = read_index_png(src)
        mapped = lut[raw]
        if (mapped < 0).any():
            bad = np.unique(raw[mapped < 0]).tolist()
            raise PrepareError(f"label file {src} holds values {bad} outside the dataset's ids")
        out = mapped.astype(np.uint8 if ignore == 255 else np.uint16)
        write_label_atomic(out, dst)
        return status, label_counts(out, num_classes, ignore), ""

    return guarded(body, src)


def format_transfer_summary(summaries: Sequence[TransferSummary], max_listed: int = 30) -> str:
    """Files written / skipped / repaired per split; labelled and ignored pixels; empty classes."""
    lines = ["split: written / skipped / repaired"]
    for s in summaries:
        counts = s.pixel_counts
        with_pixels = int((counts[:-1] > 0).sum())
        lines.append(
            f"  {s.name}: {s.written} / {s.skipped} / {s.repaired} ({s.num_images} images); "
            f"{int(counts[:-1].sum())} labelled pixels, {int(counts[-1])} ignored; "
            f"{with_pixels} of {s.num_classes} classes have pixels"
        )
    for s in summaries:
        empty = [s.class_names[i] for i in np.flatnonzero(s.pixel_counts[:-1] == 0)]
        if empty:
            shown = "; ".join(empty[:max_listed])
            more = f" (and {len(empty) - max_listed} more)" if len(empty) > max_listed else ""
            lines.append(f"{s.name}: classes without any pixel: {shown}{more}")
    return "\n".join(lines)


def run_transfer_cli(
    prepare: Callable[..., List[TransferSummary]],
    description: str,
    argv: Optional[Sequence[str]] = None,
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
) -> int:
    """Command line shared by the transfer scripts (``run_cli`` with their summary); returns the
    exit code (1: one-line error). ``prepare`` gets ``root``, ``workers``, ``progress`` and the
    extra arguments by name.
    """
    return run_cli(
        prepare,
        None,
        description,
        argv,
        add_arguments=add_arguments,
        summarize=format_transfer_summary,
    )
