#!/usr/bin/env python
"""Export a trained c2s-d2 student for deployment without PyTorch or CLIP's image tower.

    python tools/export_model.py --config-file configs/miniworld/c2s_full_R18_bs8_1k.yaml \
        --output export/miniworld_c2s MODEL.WEIGHTS output/miniworld_c2s_full_R18/model_final.pth

writes to ``--output`` (a folder, created if missing):

* ``student.onnx`` (``--format onnx``, opset 17): ``image`` float32 [1, 3, H, W] (0..255, the
  config's ``INPUT.FORMAT`` channel order, already resized like DefaultPredictor) +
  ``text_embeddings`` float32 [K, d] (unit-norm rows, used as given) -> ``sem_seg`` [K, H, W];
  the graph normalises the pixels, pads to the size divisibility, runs the student and the
  text-embedding classifier (logit scale, "no object" dropped after the softmax) and
  upsamples the masks back to [H, W]. H, W and K are dynamic.
* ``student.torchscript.pt`` (``--format torchscript``): the same module, traced.
* ``text_tower.onnx`` + ``bpe_simple_vocab_16e6.txt.gz``: the CLIP text tower (int64 tokens
  [K, 77] -> unit-norm embeddings [K, d]) and the BPE merges of the torch-free tokenizer
  (with ``onnx``; ``--skip-text-tower`` when the CLIP weights are not at hand).
* ``export.json``: input format, test resize, size divisibility, embedding size, templates,
  tokenizer, config and weights paths, versions, and the self-check of every exported model
  against PyTorch (at the trace size and at another size and K).

Class embeddings for ``student.onnx``: ``tools/embed_names.py`` (bitwise the PyTorch model's), or
``text_tower.onnx`` through ``tools/run_onnx.py --names``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2s_d2.export.exporter import FORMATS, export_all  # noqa: E402
from c2s_d2.utils.errors import is_user_error, one_line_error  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--output", required=True, help="export folder (created if missing)")
    p.add_argument("--format", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--skip-text-tower", action="store_true", help="do not export text_tower.onnx")
    p.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    p.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="export even when MODEL.WEIGHTS is empty (an untrained student: for testing only)",
    )
    p.add_argument("--verbose", action="store_true", help="INFO logging and tracebacks")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(name)s %(levelname)s: %(message)s",
    )
    opts = [o for o in args.opts if o != "--"]
    try:
        info = export_all(
            args.config_file,
            args.output,
            opts,
            formats=args.format,
            text_tower=not args.skip_text_tower,
            allow_random_weights=args.allow_random_weights,
            verify=not args.no_verify,
        )
    except Exception as e:
        if not is_user_error(e, scripts=(__file__,)):
            raise
        if args.verbose:
            traceback.print_exception(type(e), e, e.__traceback__)
        print(f"export_model.py: error: {one_line_error(e)}", file=sys.stderr, flush=True)
        return 2
    for name in info["files"]:
        print(os.path.join(args.output, name))
    checks = info["max_abs_diff_vs_pytorch"]
    if checks:
        print(
            "max |difference| vs PyTorch: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
