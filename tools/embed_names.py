#!/usr/bin/env python
"""Class text embeddings for an exported student, by the project's own text encoder.

    python tools/embed_names.py --config-file configs/miniworld/c2s_full_R18_bs8_1k.yaml \
        --names "grass,water,brick" --output vocab.npz

Uses ``MODEL.CLIP`` of the config (model, weights, templates, prompt ensembling, cache), i.e.
the call the PyTorch model makes in ``set_vocabulary``: the embeddings are bitwise the ones the
PyTorch model classifies with. ``--names-file`` reads one name per line (``#`` comments);
``--dataset`` takes a registered dataset's classes with their synonyms (``text_names``), the
model's default test vocabulary.

The ``.npz`` holds ``names`` (str [K], the labels), ``embeddings`` (float32 [K, d], unit-norm
rows), ``templates`` (str [T]) and ``clip_model`` (str); it loads without pickle.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from c2s_d2.export.exporter import load_cfg  # noqa: E402
from c2s_d2.export.runtime import parse_names, read_names_file  # noqa: E402
from c2s_d2.modeling.clip.templates import get_templates  # noqa: E402
from c2s_d2.modeling.clip.text_encoder import text_embeddings_from_cfg  # noqa: E402
from c2s_d2.utils.errors import is_user_error, one_line_error  # noqa: E402


def vocabulary(args: argparse.Namespace) -> Tuple[List[str], List[List[str]]]:
    """(labels, per-class text names) from --names, --names-file or --dataset."""
    if args.names is not None:
        names = parse_names(args.names)
        return names, [[n] for n in names]
    if args.names_file is not None:
        names = read_names_file(args.names_file)
        return names, [[n] for n in names]
    from detectron2.data import MetadataCatalog

    from c2s_d2.modeling.meta_arch import class_text_names

    texts = class_text_names(args.dataset)
    return list(MetadataCatalog.get(args.dataset).stuff_classes), texts


def check_output(path: str) -> None:
    """Refuse an output that is not a .npz name, or whose folder is a file."""
    if not path.endswith(".npz"):
        raise ValueError(f"--output {path}: give a .npz file name")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output {path} is a folder; give a .npz file name")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"--output {path}: {folder} is a file")


def save_vocab(path: str, names: Sequence[str], emb: np.ndarray, cfg) -> None:
    """names str [K], embeddings float32 [K, d], templates str [T], clip_model str."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(
        path,
        names=np.array(list(names), dtype=str),
        embeddings=emb,
        templates=np.array(get_templates(cfg.MODEL.CLIP.TEXT_TEMPLATES), dtype=str),
        clip_model=np.array(cfg.MODEL.CLIP.MODEL_NAME),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--names", help='comma-separated class names, e.g. "cat,dog,grass"')
    group.add_argument("--names-file", help="a text file with one class name per line")
    group.add_argument("--dataset", help="a registered dataset's classes (with synonyms)")
    p.add_argument("--output", required=True, help="the .npz file to write")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of errors too")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    opts = [o for o in args.opts if o != "--"]
    try:
        check_output(args.output)
        cfg = load_cfg(args.config_file, opts)
        labels, texts = vocabulary(args)
        # the call C2SSegmentor.set_vocabulary makes: same templates, ensembling and cache
        emb = text_embeddings_from_cfg(cfg, texts).cpu().numpy().astype(np.float32)
        save_vocab(args.output, labels, emb, cfg)
    except Exception as e:
        if not is_user_error(e, scripts=(__file__,)):
            raise
        if args.verbose:
            traceback.print_exception(type(e), e, e.__traceback__)
        print(f"embed_names.py: error: {one_line_error(e)}", file=sys.stderr, flush=True)
        return 2
    print(f"{args.output}: {len(labels)} classes x {emb.shape[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
