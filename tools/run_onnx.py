#!/usr/bin/env python
"""Segment images with an exported student on ONNX Runtime: no torch, detectron2 or open_clip.

    python tools/run_onnx.py --model export/miniworld_c2s --input photo.jpg pictures/*.png \
        --names "grass,water,brick" --output out/
    python tools/run_onnx.py --model export/miniworld_c2s --input photo.jpg \
        --vocab vocab.npz --output out/

Needs onnxruntime, numpy and OpenCV (Pillow, when installed, for DefaultPredictor's exact resize;
ftfy, when installed, for the tokenizer's text repair, as open_clip). Each image is resized like
detectron2's DefaultPredictor (ResizeShortestEdge with the export's test sizes), segmented by
``student.onnx``, and its scores resized back to the original size. ``--names`` embeds the names
with ``text_tower.onnx`` (prompt ensembling over the export's templates); ``--vocab`` reads the
embeddings of tools/embed_names.py. For each input ``out/<name>.png`` holds the class indices
(uint8; uint16 above 256 classes) and ``out/<name>_overlay.png`` a coloured, labelled overlay.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import List, Optional, Sequence

import cv2

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIME = os.path.join(os.path.dirname(HERE), "c2s_d2", "export", "runtime.py")


def load_runtime():
    """c2s_d2/export/runtime.py, loaded by path: importing the c2s_d2 package would import
    torch and detectron2."""
    name = "c2s_export_runtime"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RUNTIME)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def image_files(inputs: Sequence[str]) -> List[str]:
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, n)
                for n in os.listdir(path)
                if n.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"))
            )
            if not found:
                raise FileNotFoundError(f"--input: folder {path} has no images")
            files += found
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"--input: image not found: {path}")
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="export folder of tools/export_model.py")
    p.add_argument("--input", nargs="+", required=True, help="image files or folders")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--vocab", help="vocab.npz of tools/embed_names.py")
    group.add_argument("--names", help='comma-separated class names, e.g. "cat,dog,grass"')
    p.add_argument("--output", required=True, help="output folder (created if missing)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (0: all)")
    args = p.parse_args(argv)
    rt = load_runtime()
    try:
        files = image_files(args.input)
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise NotADirectoryError(f"--output {args.output} is a file; give a folder")
        model = rt.ExportedStudent(args.model, threads=args.threads)
        if args.vocab is not None:
            names, emb = rt.read_vocab(args.vocab)
        else:
            names = rt.parse_names(args.names)
            emb = model.embed_names(names)
        if emb.shape[1] != model.embed_dim:
            raise ValueError(
                f"--vocab {args.vocab}: embeddings of size {emb.shape[1]}, the student expects "
                f"{model.embed_dim} (made with another CLIP model?)"
            )
        os.makedirs(args.output, exist_ok=True)
        failed = 0
        stems: set = set()
        for path in files:
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None:
                print(f"run_onnx.py: error: cannot read image {path}", file=sys.stderr)
                failed += 1
                continue
            stem = os.path.splitext(os.path.basename(path))[0]
            base, k = stem, 0
            while base in stems:
                k += 1
                base = f"{stem}-{k}"
            stems.add(base)
            class_map = model.segment(image, emb)
            index_path, overlay_path = rt.write_outputs(
                image, class_map, names, os.path.join(args.output, base)
            )
            present = ", ".join(names[i] for i in sorted(set(class_map.flatten().tolist())))
            print(f"{path} -> {index_path}, {overlay_path}: {present}", flush=True)
    except (OSError, ValueError, KeyError) as e:
        print(f"run_onnx.py: error: {str(e).splitlines()[0] if str(e) else repr(e)}",
              file=sys.stderr)  # fmt: skip
        return 2
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
