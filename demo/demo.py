#!/usr/bin/env python
"""Segment images with a trained c2s-d2 student and your own class names.

    python demo/demo.py --config-file configs/miniworld/zs_baseline_R18_bs8_1k.yaml \
        --input photo.jpg "more/*.png" pictures/ --output out/ --vocabulary "grass,water,brick" \
        --opts MODEL.WEIGHTS output/miniworld_zs_baseline_R18/model_final.pth

``--input`` takes files, globs and folders (a folder means every image directly in it). Without
``--vocabulary``, the classes of ``--dataset`` (default: the config's first test set) are used.

Each input gets a PNG with a coloured, labelled overlay. ``--output`` is a folder (created if
missing); with a single input it may also be an image file name (``out.png``). Outputs keep the
inputs' folders relative to their common parent, so ``a/x.jpg`` and ``b/x.jpg`` give
``out/a/x.png`` and ``out/b/x.png``; inputs that would still share a name (``x.jpg`` and ``x.png``
in one folder) get ``-1``, ``-2``, ... suffixes in input order. Every line printed says which
output belongs to which input.

Images are read in BGR order, the contract of detectron2's ``DefaultPredictor``, which converts
them to ``INPUT.FORMAT`` itself: the model sees exactly what the evaluation loader gives it.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

from c2s_d2 import add_c2s_config  # noqa: E402
from c2s_d2.config import inference_cfg  # noqa: E402
from c2s_d2.data.dataset_mapper import read_image_checked  # noqa: E402
from c2s_d2.engine import C2SCheckpointer  # noqa: E402
from c2s_d2.export.runtime import check_names  # noqa: E402
from c2s_d2.modeling.meta_arch import class_text_names  # noqa: E402
from c2s_d2.utils.errors import is_user_error, one_line_error  # noqa: E402

# what a folder given to --input is searched for (lower-case suffixes)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
GLOB_CHARS = "*?["


def parse_vocabulary(text: str) -> List[str]:
    """``"cat, dog,grass"`` -> ``["cat", "dog", "grass"]``; refuses empty and duplicate names."""
    return check_names(text.split(","), "--vocabulary", example=text)


def _images_in_folder(folder: str) -> List[str]:
    """The image files directly in ``folder`` (by suffix, see ``IMAGE_SUFFIXES``), sorted."""
    names = sorted(os.listdir(folder))
    return [
        os.path.join(folder, n)
        for n in names
        if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, n))
    ]


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files, globs and folders -> files, in the order given, without repeats.

    A folder (given or matched by a glob) stands for the images directly in it. A plain path that
    does not exist, a glob matching nothing and a folder without images are errors naming them.
    """
    files: List[str] = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if any(c in path for c in GLOB_CHARS) and not os.path.exists(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise FileNotFoundError(f"--input: no file matches {pattern}")
        elif not os.path.exists(path):
            raise FileNotFoundError(f"--input: image not found: {pattern}")
        else:
            matches = [path]
        for match in matches:
            if os.path.isdir(match):
                images = _images_in_folder(match)
                if not images and match == path:
                    raise FileNotFoundError(
                        f"--input: folder {pattern} has no images ({', '.join(IMAGE_SUFFIXES)})"
                    )
                files.extend(images)
            else:
                files.append(match)
    if not files:
        raise FileNotFoundError(f"--input: no image among {list(patterns)}")
    return list(dict.fromkeys(files))


def output_paths(files: Sequence[str], output: str) -> Dict[str, str]:
    """Where each input's overlay goes: ``{input: output PNG}``, never two inputs to one file.

    ``output`` is a folder, or, for a single input, an image file name (``out.png``). In a
    folder, an input keeps its path relative to the common parent folder of all inputs (suffix
    replaced by ``.png``); names that would still collide get ``-1``, ``-2``, ... in input order.
    Refuses an existing file (or an image file name) as the folder of several inputs, a path
    below a file, and an output that is one of the inputs.
    """
    _check_not_below_a_file(output)
    n = len(files)
    if output.lower().endswith(IMAGE_SUFFIXES) and not os.path.isdir(output):
        if n != 1:
            raise ValueError(
                f"--output {output} is an image file name, but {n} inputs need a folder"
            )
        out = {files[0]: output}
    elif os.path.exists(output) and not os.path.isdir(output):
        need = f"{n} inputs need a folder" if n > 1 else "give a folder or an image file name"
        raise NotADirectoryError(f"--output {output} is an existing file, but {need}")
    else:
        out = _folder_outputs(files, output)
    for src, dst in out.items():
        if os.path.exists(dst) and os.path.samefile(src, dst):
            raise ValueError(f"--output {output} would overwrite the input image {src}")
    return out


def _folder_outputs(files: Sequence[str], folder: str) -> Dict[str, str]:
    absolute = [os.path.abspath(f) for f in files]
    try:
        parent = os.path.commonpath([os.path.dirname(a) for a in absolute])
        relative = [os.path.relpath(a, parent) for a in absolute]
    except ValueError:  # different drives (Windows): no common parent
        relative = [os.path.basename(a) for a in absolute]
    taken: set = set()
    out: Dict[str, str] = {}
    for f, rel in zip(files, relative):
        stem = os.path.splitext(rel)[0]
        name, k = stem + ".png", 0
        while os.path.normcase(name) in taken:
            k += 1
            name = f"{stem}-{k}.png"
        taken.add(os.path.normcase(name))
        out[f] = os.path.join(folder, name)
    return out


def _check_not_below_a_file(path: str) -> None:
    """Refuse an output path one of whose parent folders is an existing file."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up
    if parent and not os.path.isdir(parent):
        raise NotADirectoryError(f"--output {path}: {parent} is a file, not a folder")


def build_predictor(
    config_file: str,
    opts: Sequence[str],
    vocabulary: Optional[List[str]],
    dataset: Optional[str],
    allow_random_weights: bool = False,
) -> Tuple[DefaultPredictor, List[str]]:
    """A DefaultPredictor whose model classifies over ``vocabulary`` (or ``dataset``'s classes).

    Returns the predictor and the class labels (one per output channel of ``sem_seg``). Refuses
    an empty ``MODEL.WEIGHTS`` unless ``allow_random_weights``.
    """
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS and not allow_random_weights:
        raise ValueError(
            "MODEL.WEIGHTS is empty: give the trained student with --opts MODEL.WEIGHTS <file> "
            "(or --allow-random-weights to run an untrained model)"
        )
    icfg = inference_cfg(cfg)
    icfg.defrost()
    icfg.MODEL.WEIGHTS = ""
    icfg.freeze()
    predictor = DefaultPredictor(icfg)
    if cfg.MODEL.WEIGHTS:
        # shape mismatches and unfilled tensors are errors (DetectionCheckpointer skips them)
        C2SCheckpointer(predictor.model, require_all_keys=True).load(cfg.MODEL.WEIGHTS)
    if vocabulary is not None:
        names, labels = vocabulary, vocabulary
    else:
        dataset = dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else cfg.DATASETS.TRAIN[0])
        names = class_text_names(dataset)
        labels = list(MetadataCatalog.get(dataset).stuff_classes)
    predictor.model.set_vocabulary(names)
    return predictor, labels


def read_bgr(path: str) -> np.ndarray:
    """The image at ``path`` as uint8 [H, W, 3] in BGR order (what DefaultPredictor expects)."""
    return read_image_checked(path, "BGR")


def segment(predictor: DefaultPredictor, image_bgr: np.ndarray) -> np.ndarray:
    """Class map int64 [H, W] (indices into the vocabulary) of a BGR image [H, W, 3]."""
    scores = predictor(image_bgr)["sem_seg"]  # [C, H, W]
    return scores.argmax(0).cpu().numpy()


def overlay(
    image_rgb: np.ndarray,
    sem_seg: np.ndarray,
    labels: List[str],
    colors: Optional[Sequence[Sequence[int]]] = None,
    scale: float = 1.0,
) -> np.ndarray:
    """RGB overlay of the class map ``sem_seg`` [H, W] with class names drawn on it.

    ``colors``: one RGB triple (0-255) per label (default: random colours); ``scale``: output
    size relative to the image (the overlay is [H * scale, W * scale, 3]).
    """
    meta = Metadata(name="vocabulary", stuff_classes=list(labels))
    if colors is not None:
        meta.stuff_colors = [tuple(int(c) for c in rgb) for rgb in colors]
    vis = Visualizer(image_rgb, meta, scale=scale, instance_mode=ColorMode.IMAGE)
    return vis.draw_sem_seg(sem_seg, alpha=0.5).get_image()


def _report(e: BaseException, verbose: bool) -> None:
    """One line on stderr (and the traceback first with ``--verbose``)."""
    if verbose:
        traceback.print_exception(type(e), e, e.__traceback__)
    print(f"demo.py: error: {one_line_error(e)}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--input", nargs="+", required=True, help="image files, globs or folders")
    p.add_argument(
        "--output",
        required=True,
        help="output folder (created if missing); with one input, may be a file name (out.png)",
    )
    p.add_argument("--vocabulary", default=None, help='comma-separated names, e.g. "cat,dog,grass"')
    p.add_argument("--dataset", default=None, help="use this registered dataset's classes")
    p.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="run even when MODEL.WEIGHTS is empty (an untrained student: for testing only)",
    )
    p.add_argument("--verbose", action="store_true", help="print tracebacks of errors too")
    p.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE"
    )
    args = p.parse_args(argv)
    setup_logger(name="c2s_d2")
    failed = 0
    try:
        if not os.path.isfile(args.config_file):
            raise FileNotFoundError(f"config file not found: {args.config_file}")
        vocabulary = parse_vocabulary(args.vocabulary) if args.vocabulary is not None else None
        files = expand_inputs(args.input)
        destinations = output_paths(files, args.output)
        for folder in {os.path.dirname(os.path.abspath(d)) for d in destinations.values()}:
            os.makedirs(folder, exist_ok=True)  # before the model is built: fail fast
        predictor, labels = build_predictor(
            args.config_file, args.opts, vocabulary, args.dataset, args.allow_random_weights
        )
        for path, out_path in destinations.items():
            try:
                image = read_bgr(path)
            except ValueError as e:  # one bad image: say which, go on with the others
                _report(e, args.verbose)
                failed += 1
                continue
            sem_seg = segment(predictor, image)
            out = overlay(image[:, :, ::-1], sem_seg, labels)
            Image.fromarray(out).save(out_path)
            present = [labels[i] for i in np.unique(sem_seg)]
            print(f"{path} -> {out_path}: {', '.join(present)}", flush=True)
    except Exception as e:
        if not is_user_error(e, scripts=(__file__,)):
            raise
        _report(e, args.verbose)
        return 2
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
