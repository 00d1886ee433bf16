"""Your own data: a folder of images, a folder of label PNGs and a class file.

:func:`register_folder_dataset` registers **one name per call**, as a training set
(``split="train"``: the inductive split, seen classes only) or as an evaluation set
(``split="eval"``: every class), through the same
:func:`c2s_d2.data.zero_shot.register_zero_shot_sem_seg` as the built-in benchmarks, so the same
integrity guards apply: a training set's metadata holds only the seen names and a ``label_lut``
sending unseen ids to 255 (the mapper applies it before anything reaches the model), and the
model's ``check_inductive_split`` refuses a training class whose name (or synonym), once
normalised by :mod:`c2s_d2.data.class_names`, is an unseen class of an evaluation set. The class
file is checked when read: a seen name or synonym that normalises to an unseen one is refused there
already.

Without Python: the environment variable ``C2S_CUSTOM_DATASETS`` holds entries
``NAME,SPLIT,IMAGE_DIR,LABEL_DIR,CLASS_FILE`` separated by ``;`` (or new lines); every entry is
registered when ``c2s_d2`` is imported (in every process of a multi-GPU run, which inherits the
environment).

Folders: an image ``IMAGE_DIR/<stem>.<ext>`` (``.jpg .jpeg .png .bmp .tif .tiff .webp``) pairs
with the label ``LABEL_DIR/<stem>.png``. A label PNG holds class ids, 255 = ignore:

* an 8-bit single-channel PNG (PIL mode ``L``; 16-bit ``I;16`` files are read the same way): the
  pixel value is the class id;
* a palette PNG (mode ``P``): the **palette index** is the class id, the palette's colours are
  never looked at (detectron2 and PIL read mode ``P`` as indices);
* an RGB(A) colour PNG cannot be read directly: convert it once with
  ``tools/check_dataset.py ... --write-index-labels OUT_DIR``, which maps colours to ids through
  the colours of the class file (:func:`convert_color_labels`).

Class file (:func:`read_class_file`), a text file::

    # comments and blank lines are ignored
    0: road, street              # id: name[, synonym...]
    1: car, automobile @ 0 0 142 # "@ R G B" (or "@ #00008e"): the colour of an RGB label
    2: tree
    unseen: tree                 # names or ids, comma-separated; "unseen:" alone = none
    ignore: 0 0 0                # RGB labels only: a colour written as 255 (may repeat)

Ids are ``0..C-1``, each exactly once (any order), ``C <= 254``. The name and its synonyms are
all given to the text encoder (their embeddings are averaged). A ``.json`` class file in the
built-in format (``c2s_d2/data/datasets/voc.json``: ``classes`` with ``id``, ``name``, optional
``text_names`` and ``color``; ``unseen_ids`` and/or ``unseen_names``; optional ``ignore_colors``)
is read too; there ``text_names``, when given, replace the name for the text encoder.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog

from ..class_names import compact_forms, names_match
from ..zero_shot import (
    IGNORE_LABEL,
    DatasetNotPreparedError,
    check_class_split,
    register_zero_shot_sem_seg,
)

__all__ = [
    "ENV_VAR",
    "IMAGE_EXTS",
    "CheckReport",
    "ClassFile",
    "Problem",
    "check_folder_dataset",
    "convert_color_labels",
    "list_folder_pairs",
    "read_class_file",
    "register_folder_dataset",
    "register_from_env",
]

ENV_VAR = "C2S_CUSTOM_DATASETS"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXT = ".png"
Color = Tuple[int, int, int]


# ---------------------------------------------------------------------------------- class file
@dataclass(frozen=True)
class ClassFile:
    """The classes of a custom dataset, index = class id (as stored in the label PNGs)."""

    path: str
    class_names: Tuple[str, ...]
    text_names: Tuple[Tuple[str, ...], ...]
    unseen_ids: Tuple[int, ...]
    colors: Tuple[Optional[Color], ...]  # per class; None where the file gives none
    ignore_colors: Tuple[Color, ...] = ()

    @property
    def seen_ids(self) -> List[int]:
        return [i for i in range(len(self.class_names)) if i not in set(self.unseen_ids)]


def _err(path: str, where: str, what: str) -> ValueError:
    return ValueError(f"class file {path}{where}: {what}")


def _parse_color(text: str, path: str, where: str) -> Color:
    text = text.strip()
    m = re.fullmatch(r"#([0-9a-fA-F]{6})", text)
    if m:
        v = int(m.group(1), 16)
        return (v >> 16, (v >> 8) & 255, v & 255)
    parts = [p for p in re.split(r"[\s,]+", text) if p]
    if len(parts) == 3 and all(p.isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    raise _err(path, where, f"colour {text!r} is not 'R G B' (0..255) or '#RRGGBB'")


def _resolve_unseen(entries: Sequence, names: Sequence[str], path: str) -> List[int]:
    """Unseen entries (ids, or names compared through the shared normaliser) -> class ids."""
    ids = []
    for e in entries:
        if isinstance(e, int) or (isinstance(e, str) and e.strip().isdigit()):
            i = int(e)
            if not 0 <= i < len(names):
                raise _err(path, "", f"unseen id {i} is not a class id (0..{len(names) - 1})")
            ids.append(i)
            continue
        exact = [i for i, n in enumerate(names) if n == e]
        hits = exact or [i for i, n in enumerate(names) if names_match(n, str(e))]
        if len(hits) != 1:
            what = "matches no class" if not hits else f"matches {[names[i] for i in hits]}"
            raise _err(path, "", f"unseen name {e!r} {what}")
        ids.append(hits[0])
    return sorted(set(ids))


def _read_text_class_file(path: str, lines: List[str]):
    by_id: Dict[int, Tuple[Tuple[str, ...], Optional[Color], int]] = {}
    unseen = None
    ignore_colors: List[Color] = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        where = f", line {n}"
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s+#\s.*$", "", line)  # a trailing "  # comment"
        m = re.fullmatch(r"(unseen|ignore)\s*:(.*)", line, flags=re.IGNORECASE)
        if m and m.group(1).lower() == "unseen":
            if unseen is not None:
                raise _err(path, where, "a second 'unseen:' line")
            unseen = [e.strip() for e in m.group(2).split(",") if e.strip()]
            continue
        if m:
            ignore_colors.append(_parse_color(m.group(2), path, where))
            continue
        m = re.fullmatch(r"(\d+)\s*:(.*)", line)
        if not m:
            raise _err(
                path,
                where,
                f"{raw.strip()!r} is not 'ID: NAME[, SYNONYM...]', 'unseen: ...' or "
                "'ignore: R G B'",
            )
        cid = int(m.group(1))
        names_part, _, color_part = m.group(2).partition("@")
        names = tuple(s.strip() for s in names_part.split(","))
        if not names or not all(names):
            raise _err(path, where, f"class {cid}: empty name or synonym in {names_part.strip()!r}")
        if cid in by_id:
            raise _err(path, where, f"class id {cid} already given on line {by_id[cid][2]}")
        color = _parse_color(color_part, path, where) if color_part.strip() else None
        by_id[cid] = (names, color, n)
    if unseen is None:
        raise _err(path, "", "no 'unseen:' line (write 'unseen:' alone for none)")
    return by_id, unseen, ignore_colors


def _read_json_class_file(path: str, text: str):
    try:
        data = json.loads(text)
        classes = data["classes"]
        by_id = {}
        for k, c in enumerate(classes):
            cid, name = int(c["id"]), str(c["name"])
            if cid in by_id:
                raise _err(path, "", f"class id {cid} given twice")
            texts = tuple(c.get("text_names") or [name])
            color = tuple(int(v) for v in c["color"]) if c.get("color") is not None else None
            by_id[cid] = ((name,) + texts, color, k)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        if isinstance(e, ValueError) and str(e).startswith("class file"):
            raise
        raise _err(path, "", f"not a class file in the built-in JSON format ({e})") from None
    unseen = list(data.get("unseen_ids", []))
    names = {cid: v[0][0] for cid, v in by_id.items()}
    if "unseen_names" in data:
        if "unseen_ids" in data and [names.get(int(i)) for i in unseen] != list(
            data["unseen_names"]
        ):
            raise _err(path, "", f"unseen_ids {unseen} do not name unseen_names")
        unseen = unseen or list(data["unseen_names"])
    elif "unseen_ids" not in data:
        raise _err(path, "", "no 'unseen_ids' or 'unseen_names' (give [] for none)")
    ignore_colors = [tuple(int(v) for v in c) for c in data.get("ignore_colors", [])]
    return by_id, unseen, ignore_colors


def read_class_file(path: str) -> ClassFile:
    """Read and check a class file (text or ``.json``, see the module docstring).

    Refused, with a one-line ``ValueError`` naming the file (and line): a bad line, ids that are
    not ``0..C-1`` each once, two classes with the same normalised name, an unseen entry naming no
    class, a seen name or synonym that normalises to an unseen class's name or synonym (it would
    carry the unseen class into training), and repeated colours.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read class file {path}: {e.strerror or e}") from None
    json_texts = path.lower().endswith(".json")
    if json_texts:
        by_id, unseen_entries, ignore_colors = _read_json_class_file(path, text)
    else:
        by_id, unseen_entries, ignore_colors = _read_text_class_file(path, text.splitlines())
    if not by_id:
        raise _err(path, "", "no class")
    n = len(by_id)
    missing = sorted(set(range(n)) - set(by_id))
    if missing:
        extra = sorted(set(by_id) - set(range(n)))
        raise _err(
            path, "", f"class ids must be 0..{n - 1}, each once: missing {missing}, beyond {extra}"
        )
    names = [by_id[i][0][0] for i in range(n)]
    # JSON text_names replace the name (built-in convention); text synonyms add to it.
    texts = [by_id[i][0][1:] if json_texts else by_id[i][0] for i in range(n)]
    try:
        check_class_split(names, [])
    except ValueError as e:
        raise _err(path, "", str(e)) from None
    for i in range(n):
        for j in range(i):
            if names_match(names[i], names[j]):
                raise _err(path, "", f"classes {j} {names[j]!r} and {i} {names[i]!r} are one name")
    unseen = _resolve_unseen(unseen_entries, names, path)
    forms_of_unseen = {}
    for i in unseen:
        for t in (names[i], *texts[i]):
            for form in compact_forms(t):
                forms_of_unseen.setdefault(form, names[i])
    for i in range(n):
        if i in unseen:
            continue
        for t in (names[i], *texts[i]):
            hit = sorted(compact_forms(t) & set(forms_of_unseen))
            if hit:
                raise _err(
                    path,
                    "",
                    f"seen class {names[i]!r} has the name {t!r}, which is the unseen "
                    f"class {forms_of_unseen[hit[0]]!r} once normalised ({hit[0]!r}): it would "
                    "carry the unseen class into training",
                )
    colors = [by_id[i][1] for i in range(n)]
    given = [c for c in colors if c is not None] + list(ignore_colors)
    dup = sorted({c for c in given if given.count(c) > 1})
    if dup:
        raise _err(path, "", f"colours {dup} given to more than one class (or ignore)")
    return ClassFile(
        path=os.path.abspath(path),
        class_names=tuple(names),
        text_names=tuple(tuple(t) for t in texts),
        unseen_ids=tuple(unseen),
        colors=tuple(colors),
        ignore_colors=tuple(ignore_colors),
    )


# ------------------------------------------------------------------------------- folders, records
def _folder_files(folder: str, exts: Sequence[str]) -> Dict[str, List[str]]:
    """``{stem: [file names]}`` of the files of ``folder`` with one of ``exts`` (any case)."""
    out: Dict[str, List[str]] = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in exts and os.path.isfile(os.path.join(folder, f)):
            out.setdefault(stem, []).append(f)
    return out


def list_folder_pairs(image_dir: str, label_dir: str) -> List[Dict]:
    """Detectron2 records of every image of ``image_dir`` with its ``label_dir/<stem>.png``.

    Raises ``DatasetNotPreparedError`` naming a missing folder, an empty image folder, an image
    without a label or two images with one stem; ``tools/check_dataset.py`` lists every problem.
    """
    hint = f" (check with: python tools/check_dataset.py {image_dir} {label_dir} CLASS_FILE)"
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise DatasetNotPreparedError(f"dataset folder not found: {folder}{hint}")
    images = _folder_files(image_dir, IMAGE_EXTS)
    if not images:
        raise DatasetNotPreparedError(f"no image ({' '.join(IMAGE_EXTS)}) in {image_dir}{hint}")
    records = []
    for stem, files in images.items():
        if len(files) > 1:
            raise DatasetNotPreparedError(f"images {files} in {image_dir} share a stem{hint}")
        img = os.path.join(image_dir, files[0])
        lab = os.path.join(label_dir, stem + LABEL_EXT)
        if not os.path.isfile(lab):
            raise DatasetNotPreparedError(f"label not found for image {img}: {lab}{hint}")
        records.append({"file_name": img, "sem_seg_file_name": lab, "image_id": stem})
    return records


_REGISTERED: Dict[str, Tuple[str, str, str, str]] = {}


def register_folder_dataset(
    name: str, image_dir: str, label_dir: str, class_file: str, split: str = "train"
) -> str:
    """Register one custom dataset (lazily: only the class file is read now).

    Args:
        name: the registered name, e.g. ``"mydata_train"``; used in ``DATASETS.TRAIN/TEST``.
        image_dir: folder of images (``<stem>.<ext>``, see ``IMAGE_EXTS``).
        label_dir: folder of label PNGs ``<stem>.png`` (class ids, 255 = ignore).
        class_file: class names, synonyms and unseen classes (see the module docstring).
        split: ``"train"`` (inductive training set: seen classes only, unseen pixels -> 255) or
            ``"eval"`` (every class; seen / unseen ids for the evaluator).
    Returns ``name``. Registering the same name again with the same arguments does nothing;
    with other arguments, or a name already registered elsewhere, it raises ``ValueError``.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"custom dataset {name!r}: split must be 'train' or 'eval', got {split!r}")
    args = (os.path.abspath(image_dir), os.path.abspath(label_dir), os.path.abspath(class_file))
    key = args + (split,)
    if name in _REGISTERED and _REGISTERED[name] == key:
        return name
    if name in DatasetCatalog.list():
        raise ValueError(f"custom dataset {name!r}: the name is already registered")
    classes = read_class_file(class_file)
    image_dir, label_dir, _ = args
    register_zero_shot_sem_seg(
        name,
        load_records=lambda: list_folder_pairs(image_dir, label_dir),
        class_names=classes.class_names,
        unseen_ids=classes.unseen_ids,
        split=split,
        text_names=classes.text_names,
        image_root=image_dir,
        sem_seg_root=label_dir,
        class_file=classes.path,
    )
    _REGISTERED[name] = key
    return name


def register_from_env(value: Optional[str] = None) -> List[str]:
    """Register the entries of ``$C2S_CUSTOM_DATASETS`` (or of ``value``); returns the names.

    Format: ``NAME,SPLIT,IMAGE_DIR,LABEL_DIR,CLASS_FILE`` entries separated by ``;`` or new
    lines. A malformed entry raises ``ValueError`` naming the variable and the entry.
    """
    value = os.environ.get(ENV_VAR, "") if value is None else value
    names = []
    for entry in re.split(r"[;\n]", value):
        if not entry.strip():
            continue
        parts = [p.strip() for p in entry.split(",")]
        if len(parts) != 5 or not all(parts):
            raise ValueError(
                f"{ENV_VAR}: entry {entry.strip()!r} is not "
                "'NAME,SPLIT,IMAGE_DIR,LABEL_DIR,CLASS_FILE'"
            )
        name, split, image_dir, label_dir, class_file = parts
        try:
            names.append(register_folder_dataset(name, image_dir, label_dir, class_file, split))
        except ValueError as e:
            raise ValueError(f"{ENV_VAR}: {e}") from None
    return names


# ------------------------------------------------------------------------------ label conversion
def _label_kind(mode: str) -> str:
    if mode in ("L", "I;16", "I;16B", "I;16L", "I"):
        return "index"
    if mode == "P":
        return "palette"
    if mode in ("RGB", "RGBA"):
        return "rgb"
    return "unsupported"


def convert_color_labels(label_dir: str, out_dir: str, class_file: str) -> int:
    """Write every ``label_dir/*.png`` as an 8-bit index PNG in ``out_dir``; returns the count.

    RGB(A) labels are mapped through the class file's colours (a class colour -> its id, an
    ``ignore`` colour -> 255; alpha is dropped); index and palette labels are written with their
    ids unchanged. A colour not in the class file raises ``ValueError`` naming the file and the
    colour.
    """
    from PIL import Image

    classes = read_class_file(class_file)
    table = {c: i for i, c in enumerate(classes.colors) if c is not None}
    table.update({c: IGNORE_LABEL for c in classes.ignore_colors})
    os.makedirs(out_dir, exist_ok=True)
    count = 0
    for stem, files in _folder_files(label_dir, (LABEL_EXT,)).items():
        path = os.path.join(label_dir, files[0])
        with Image.open(path) as img:
            kind = _label_kind(img.mode)
            if kind == "rgb":
                if not table:
                    raise ValueError(
                        f"{path}: RGB label, but class file {classes.path} gives no colours"
                    )
                rgb = np.asarray(img.convert("RGB")).astype(np.int64)
                # one integer per colour, then one lookup per distinct colour
                code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
                uniq, inverse = np.unique(code.ravel(), return_inverse=True)
                colors = [(int(u) >> 16, (int(u) >> 8) & 255, int(u) & 255) for u in uniq]
                bad = [c for c in colors if c not in table]
                if bad:
                    raise ValueError(f"{path}: colours {bad[:5]} are not in {classes.path}")
                ids = np.array([table[c] for c in colors], dtype=np.uint8)
                label = ids[inverse].reshape(code.shape)
            elif kind in ("index", "palette"):
                label = np.asarray(img)
                if label.max(initial=0) > 255:
                    raise ValueError(f"{path}: label values above 255")
                label = label.astype(np.uint8)
            else:
                raise ValueError(f"{path}: unsupported label PNG mode {img.mode!r}")
        Image.fromarray(label, mode="L").save(os.path.join(out_dir, stem + LABEL_EXT))
        count += 1
    return count


# ---------------------------------------------------------------------------------------- checker
@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check_folder_dataset`."""

    level: str  # "error" (exit code 1), "warning" or "info"
    kind: str  # e.g. "missing-label", "size-mismatch", "unknown-id"
    message: str


@dataclass
class CheckReport:
    """What :func:`check_folder_dataset` found, and the pixel counts of the readable labels."""

    classes: Optional[ClassFile]
    split: str
    problems: List[Problem] = field(default_factory=list)
    num_images: int = 0
    num_labels: int = 0
    num_pairs: int = 0
    label_kinds: Dict[str, int] = field(default_factory=dict)
    pixels: Optional[np.ndarray] = None  # (C,) pixels of each class over the readable labels
    images_with: Optional[np.ndarray] = None  # (C,) labels holding each class
    ignore_pixels: int = 0

    @property
    def errors(self) -> List[Problem]:
        return [p for p in self.problems if p.level == "error"]

    def add(self, level: str, kind: str, message: str) -> None:
        self.problems.append(Problem(level, kind, message))

    def kinds(self, level: Optional[str] = None) -> set:
        return {p.kind for p in self.problems if level is None or p.level == level}

    def format(self, max_per_kind: int = 20) -> str:
        """The readable report: every problem (``max_per_kind`` of a kind), then the summary."""
        lines = []
        shown: Dict[str, int] = {}
        for p in sorted(self.problems, key=lambda p: ("error warning info".split().index(p.level))):
            shown[p.kind] = shown.get(p.kind, 0) + 1
            if shown[p.kind] <= max_per_kind:
                lines.append(f"{p.level.upper():7s} [{p.kind}] {p.message}")
        for kind, n in shown.items():
            if n > max_per_kind:
                lines.append(f"        [{kind}] ... and {n - max_per_kind} more")
        if not self.problems:
            lines.append("no problem found")
        lines.append("")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.label_kinds.items())) or "none"
        lines.append(
            f"{self.num_images} images, {self.num_labels} labels, {self.num_pairs} pairs; "
            f"label files: {kinds}; split: {self.split}"
        )
        if self.classes is not None and self.pixels is not None:
            total = int(self.pixels.sum()) + self.ignore_pixels
            unseen = set(self.classes.unseen_ids)
            lines.append(
                f"{'id':>4}  {'class':24s} {'split':6s} {'pixels':>12s} {'share':>7s}  images"
            )
            for i, name in enumerate(self.classes.class_names):
                share = 100.0 * self.pixels[i] / total if total else 0.0
                lines.append(
                    f"{i:>4}  {name[:24]:24s} {'unseen' if i in unseen else 'seen':6s} "
                    f"{int(self.pixels[i]):>12d} {share:>6.2f}%  {int(self.images_with[i])}"
                )
            share = 100.0 * self.ignore_pixels / total if total else 0.0
            lines.append(
                f"{255:>4}  {'(ignore)':24s} {'':6s} {self.ignore_pixels:>12d} {share:>6.2f}%"
            )
        n_err = len(self.errors)
        n_warn = sum(p.level == "warning" for p in self.problems)
        lines.append(f"{n_err} error(s), {n_warn} warning(s)")
        return "\n".join(lines)


def _exif_size(img) -> Tuple[int, int]:
    """(width, height) after the EXIF rotation that detectron2's ``read_image`` applies."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: detectron2 ignores it too
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _inspect_pair(image_path: Optional[str], label_path: Optional[str]) -> Dict:
    """Read one image and / or label fully; return sizes, label kind and id histogram, or errors."""
    from PIL import Image

    out: Dict = {}
    if image_path is not None:
        try:
            with Image.open(image_path) as img:
                img.load()
                out["image_size"] = _exif_size(img)
        except Exception as e:  # noqa: BLE001 - any decoding failure is reported
            out["image_error"] = f"{type(e).__name__}: {e}"
    if label_path is not None:
        try:
            with Image.open(label_path) as img:
                img.load()
                out["label_mode"] = img.mode
                out["label_size"] = img.size
                arr = np.asarray(img)
        except Exception as e:  # noqa: BLE001
            out["label_error"] = f"{type(e).__name__}: {e}"
            return out
        kind = _label_kind(out["label_mode"])
        out["label_kind"] = kind
        if kind == "rgb":
            rgb = arr[..., :3]
            out["gray_rgb"] = bool(
                (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
            )
        elif kind in ("index", "palette"):
            values, counts = np.unique(arr, return_counts=True)
            out["hist"] = dict(zip(values.tolist(), counts.tolist()))
    return out


def check_folder_dataset(
    image_dir: str,
    label_dir: str,
    class_file: str,
    split: str = "train",
    workers: int = 4,
) -> CheckReport:
    """Check a custom dataset before training; every problem goes into the report.

    Errors: unreadable class file or folder, image without label, two images with one stem,
    unreadable / corrupt image or label, image and label sizes that differ, label ids neither in
    the class file nor 255, RGB labels (convert them) and unsupported PNG modes. Warnings: label
    without image, palette and index labels mixed, classes without any pixel. Information
    (``split="train"``): unseen classes present in the training labels (ignored in the inductive
    setting, their images dropped in ``inductive_strict``).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    report = CheckReport(classes=None, split=split)
    try:
        report.classes = read_class_file(class_file)
    except ValueError as e:
        report.add("error", "class-file", str(e))
    missing_dir = False
    for what, folder in (("image", image_dir), ("label", label_dir)):
        if not os.path.isdir(folder):
            report.add("error", "folder", f"{what} folder not found: {folder}")
            missing_dir = True
    if missing_dir:
        return report
    images = _folder_files(image_dir, IMAGE_EXTS)
    labels = {s: f[0] for s, f in _folder_files(label_dir, (LABEL_EXT,)).items()}
    report.num_images, report.num_labels = len(images), len(labels)
    if not images:
        report.add("error", "folder", f"no image ({' '.join(IMAGE_EXTS)}) in {image_dir}")
    for stem, files in images.items():
        if len(files) > 1:
            report.add("error", "ambiguous-image", f"images {files} in {image_dir} share a stem")
        if stem not in labels:
            image = os.path.join(image_dir, files[0])
            report.add("error", "missing-label", f"image {image} has no label {stem}{LABEL_EXT}")
    for stem, f in labels.items():
        if stem not in images:
            report.add(
                "warning", "missing-image", f"label {os.path.join(label_dir, f)} has no image"
            )

    stems = sorted(set(images) | set(labels))
    jobs = [
        (
            os.path.join(image_dir, images[s][0]) if s in images else None,
            os.path.join(label_dir, labels[s]) if s in labels else None,
        )
        for s in stems
    ]
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        results = list(pool.map(lambda j: _inspect_pair(*j), jobs))

    num_classes = len(report.classes.class_names) if report.classes else None
    if num_classes is not None:
        report.pixels = np.zeros(num_classes, dtype=np.int64)
        report.images_with = np.zeros(num_classes, dtype=np.int64)
    unknown: Dict[int, List[str]] = {}
    for (image_path, label_path), r in zip(jobs, results):
        if "image_error" in r:
            report.add(
                "error", "unreadable-image", f"cannot read image {image_path}: {r['image_error']}"
            )
        if "label_error" in r:
            report.add(
                "error", "unreadable-label", f"cannot read label {label_path}: {r['label_error']}"
            )
            continue
        if label_path is None:
            continue
        kind = r["label_kind"]
        report.label_kinds[kind] = report.label_kinds.get(kind, 0) + 1
        if kind == "rgb":
            hint = (
                "its three channels are equal: save it as a single-channel PNG"
                if r["gray_rgb"]
                else "convert its colours to ids with tools/check_dataset.py --write-index-labels"
            )
            report.add("error", "rgb-label", f"label {label_path} is an RGB colour PNG; {hint}")
        elif kind == "unsupported":
            report.add(
                "error",
                "unsupported-label-mode",
                f"label {label_path} has PNG mode {r['label_mode']!r}; expected an 8-bit "
                "single-channel (L) or palette (P) PNG",
            )
        if image_path is not None and "image_size" in r and r["image_size"] != r["label_size"]:
            (iw, ih), (lw, lh) = r["image_size"], r["label_size"]
            report.add(
                "error",
                "size-mismatch",
                f"image {image_path} is {iw}x{ih}, label {label_path} is {lw}x{lh}",
            )
        if image_path is not None and "image_error" not in r:
            report.num_pairs += 1
        hist = r.get("hist")
        if hist is None or num_classes is None:
            continue
        for v, c in hist.items():
            if v == IGNORE_LABEL:
                report.ignore_pixels += c
            elif 0 <= v < num_classes:
                report.pixels[v] += c
                report.images_with[v] += 1
            else:
                unknown.setdefault(int(v), []).append(label_path)
    for v, files in sorted(unknown.items()):
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        report.add(
            "error",
            "unknown-id",
            f"label id {v} is not a class of {class_file} (0..{num_classes - 1}) nor {IGNORE_LABEL}"
            f" (ignore): in {len(files)} label(s): {', '.join(files[:3])}{more}",
        )
    if report.label_kinds.get("index") and report.label_kinds.get("palette"):
        report.add(
            "warning",
            "mixed-label-kinds",
            f"{report.label_kinds['palette']} palette PNGs and {report.label_kinds['index']} "
            "single-channel PNGs: both are read by index (a palette PNG's index is its class id, "
            "its colours are ignored); check that the palette files use the class ids as indices",
        )
    if report.label_kinds.get("rgb") and (
        report.label_kinds.get("index") or report.label_kinds.get("palette")
    ):
        report.add(
            "error",
            "mixed-label-kinds",
            f"{report.label_kinds['rgb']} RGB colour PNGs mixed with "
            f"{report.label_kinds.get('index', 0) + report.label_kinds.get('palette', 0)} "
            "index / palette PNGs",
        )
    if report.classes is not None and report.pixels is not None and report.num_labels:
        names = report.classes.class_names
        for i in report.classes.unseen_ids:
            if split == "train" and report.pixels[i]:
                report.add(
                    "info",
                    "unseen-in-train",
                    f"unseen class {i} {names[i]!r}: {int(report.pixels[i])} pixels in "
                    f"{int(report.images_with[i])} training label(s); the inductive setting "
                    "ignores them (255), inductive_strict drops those images",
                )
        empty = [
            f"{i} {names[i]!r}"
            for i in range(len(names))
            if not report.pixels[i] and (split == "eval" or i not in report.classes.unseen_ids)
        ]
        if empty:
            report.add(
                "warning", "class-without-pixels", f"no pixel of class(es) {', '.join(empty)}"
            )
    return report


# Registered on import (every process of a multi-process run imports c2s_d2). A bad entry must
# not make `import c2s_d2` fail with a traceback: it is kept and raised by `check_env_datasets`,
# which train_net.py calls where its one-line refusals are printed.
_ENV_ERROR: Optional[ValueError] = None


def check_env_datasets() -> None:
    """Raise the error ``$C2S_CUSTOM_DATASETS`` gave on import, if any (``ValueError``)."""
    if _ENV_ERROR is not None:
        raise _ENV_ERROR


try:
    register_from_env()
except ValueError as _e:
    _ENV_ERROR = _e
    logging.getLogger(__name__).error(str(_e))
