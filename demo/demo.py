#!/usr/bin/env python
"""Segment images with a trained c2s-d2 student and your own class names.

    python demo/demo.py --config-file configs/miniworld/zs_baseline_R18.yaml \
        --input photo.jpg "more/*.png" --output out/ --vocabulary "grass,water,brick" \
        --opts MODEL.WEIGHTS output/miniworld_zs_baseline_R18/model_final.pth

Without ``--vocabulary``, the classes of ``--dataset`` (default: the config's first test set)
are used. Each input gets ``<output>/<name>.png``: the image with a coloured, labelled overlay.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

from c2s_d2 import add_c2s_config  # noqa: E402
from c2s_d2.config import inference_cfg  # noqa: E402
from c2s_d2.engine import C2SCheckpointer  # noqa: E402
from c2s_d2.modeling.meta_arch import class_text_names  # noqa: E402
from c2s_d2.utils.errors import is_user_error, one_line_error  # noqa: E402


def parse_vocabulary(text: str) -> List[str]:
    """``"cat, dog,grass"`` -> ``["cat", "dog", "grass"]``; refuses empty and duplicate names."""
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise ValueError(f"--vocabulary {text!r}: empty class name (give e.g. 'cat,dog,grass')")
    lowered = [n.lower() for n in names]
    dups = sorted({n for n in lowered if lowered.count(n) > 1})
    if dups:
        raise ValueError(f"--vocabulary: duplicate class names {dups}")
    return names


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files and globs -> sorted unique files; a pattern matching nothing is an error."""
    files: List[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"--input: no file matches {pattern}")
        files.extend(m for m in matches if os.path.isfile(m))
    return list(dict.fromkeys(files))


def build_predictor(
    config_file: str, opts: Sequence[str], vocabulary: Optional[List[str]], dataset: Optional[str]
):
    """A DefaultPredictor whose model classifies over ``vocabulary`` (or ``dataset``'s classes)."""
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    icfg = inference_cfg(cfg)
    icfg.defrost()
    icfg.MODEL.WEIGHTS = ""
    icfg.freeze()
    predictor = DefaultPredictor(icfg)
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


def overlay(image_rgb: np.ndarray, sem_seg: np.ndarray, labels: List[str]) -> np.ndarray:
    """RGB overlay of the class map ``sem_seg`` [H, W] with class names drawn on it."""
    meta = Metadata(name="vocabulary", stuff_classes=list(labels))
    vis = Visualizer(image_rgb, meta, instance_mode=ColorMode.IMAGE)
    return vis.draw_sem_seg(sem_seg, alpha=0.5).get_image()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--input", nargs="+", required=True, help="image files or globs")
    p.add_argument("--output", required=True, help="output folder (created if missing)")
    p.add_argument("--vocabulary", default=None, help='comma-separated names, e.g. "cat,dog,grass"')
    p.add_argument("--dataset", default=None, help="use this registered dataset's classes")
    p.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE"
    )
    args = p.parse_args(argv)
    setup_logger(name="c2s_d2")
    try:
        if not os.path.isfile(args.config_file):
            raise FileNotFoundError(f"config file not found: {args.config_file}")
        vocabulary = parse_vocabulary(args.vocabulary) if args.vocabulary is not None else None
        files = expand_inputs(args.input)
        os.makedirs(args.output, exist_ok=True)
        if not os.access(args.output, os.W_OK):
            raise PermissionError(f"--output folder is not writable: {args.output}")
        predictor, labels = build_predictor(args.config_file, args.opts, vocabulary, args.dataset)
        fmt = predictor.input_format
        for path in files:
            try:
                image = read_image(path, format=fmt)
            except Exception as e:  # PIL raises several types for unreadable files
                raise ValueError(f"cannot read image {path}: {e}") from e
            scores = predictor(image)["sem_seg"]
            sem_seg = scores.argmax(0).cpu().numpy()
            rgb = image if fmt == "RGB" else image[:, :, ::-1]
            out = overlay(rgb, sem_seg, labels)
            out_path = os.path.join(
                args.output, os.path.splitext(os.path.basename(path))[0] + ".png"
            )
            Image.fromarray(out).save(out_path)
            present = [labels[i] for i in np.unique(sem_seg)]
            print(f"{path} -> {out_path}: {', '.join(present)}")
    except Exception as e:
        if not is_user_error(e, scripts=(__file__,)):
            raise
        print(f"demo.py: error: {one_line_error(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
