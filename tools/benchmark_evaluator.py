#!/usr/bin/env python
"""Cost of the evaluator at ADE20K-847 size: milliseconds per image, next to a model forward.

Writes ``--images`` random 16-bit ground-truth PNGs (``--size`` square, ``--classes`` classes,
16x16 blocks, a tenth of them ignored = 65535) into a temporary folder, registers them as an evaluation
set, and times ``C2SSemSegEvaluator.process`` on (C, H, W) float32 score tensors (the model's
``sem_seg`` output) split into its parts: the argmax over classes, reading the 16-bit PNG, and the
confusion-matrix update (one ``np.bincount`` of ``gt * C + pred``). Then it times ``evaluate``
(metrics from the C x C matrix, per-class log table, saved JSON and matrix), which runs once per
dataset and is also shown spread over the images of ADE20K-847's val set (2,000).

The reference forward time (``--forward-ms``, default 111 ms) is ZegCLIP's published inference
speed, 9.0 images/s for ViT-B/16 at 512x512 on a 1080 Ti (../shared/design/benchmarks.md); on a
CPU the model is slower still, so the share printed is an upper bound.

python tools/benchmark_evaluator.py [--classes 847] [--size 512] [--images 8] [--queries 100] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from c2s_d2.evaluation import C2SSemSegEvaluator  # noqa: E402
from c2s_d2.evaluation.sem_seg_evaluator import class_argmax  # noqa: E402
from c2s_d2.modeling.meta_arch import semantic_inference  # noqa: E402

DATASET = "c2s_benchmark_evaluator_tmp"
ADE847_VAL_IMAGES = 2000


def write_ground_truth(folder: str, n: int, size: int, classes: int, seed: int) -> List[str]:
    """``n`` random (size, size) 16-bit label PNGs, piecewise constant like real labels (16x16
    blocks of random classes, a tenth of the blocks ignored); returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    blocks = (size + 15) // 16
    for k in range(n):
        grid = rng.integers(0, classes, (blocks, blocks)).astype(np.uint16)
        grid[rng.random((blocks, blocks)) < 0.1] = 65535
        gt = np.kron(grid, np.ones((16, 16), dtype=np.uint16))[:size, :size]
        path = os.path.join(folder, f"{k:04d}.png")
        Image.fromarray(gt).save(path)
        paths.append(path)
    return paths


def median_ms(values: List[float]) -> float:
    return 1000 * statistics.median(values)


def run(args) -> Dict[str, float]:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_ground_truth(tmp, args.images, args.size, args.classes, args.seed)
        if DATASET in DatasetCatalog.list():
            DatasetCatalog.remove(DATASET)
            MetadataCatalog.remove(DATASET)
        DatasetCatalog.register(DATASET, lambda: [])
        MetadataCatalog.get(DATASET).set(
            stuff_classes=[f"class {i}" for i in range(args.classes)],
            seen_class_ids=list(range(args.classes)),
            unseen_class_ids=[],
            ignore_label=65535,
        )
        evaluator = C2SSemSegEvaluator(DATASET, distributed=False, output_dir=tmp)
        generator = torch.Generator().manual_seed(args.seed)
        scores = torch.rand((args.classes, args.size, args.size), generator=generator)
        argmax_s, torch_argmax_s, read_s, update_s, process_s = [], [], [], [], []
        for path in paths:
            start = time.perf_counter()
            scores.argmax(dim=0).numpy()
            torch_argmax_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            class_argmax(scores).numpy()  # what process() uses
            argmax_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            evaluator._read_gt(path)
            read_s.append(time.perf_counter() - start)
        evaluator.reset()
        for path in paths:  # the whole process() call, as inference_on_dataset makes it
            start = time.perf_counter()
            evaluator.process([{"sem_seg_file_name": path}], [{"sem_seg": scores}])
            process_s.append(time.perf_counter() - start)
        # the confusion-matrix update alone, on one image's labels
        gt = evaluator._read_gt(paths[0])
        pred = scores.argmax(dim=0).numpy().astype(np.int64)
        for _ in paths:
            start = time.perf_counter()
            scored = gt != 65535
            idx = gt[scored] * args.classes + pred[scored]
            np.bincount(idx, minlength=args.classes**2).reshape(args.classes, args.classes)
            update_s.append(time.perf_counter() - start)
        logging.getLogger("c2s_d2.evaluation.sem_seg_evaluator").setLevel(logging.WARNING)
        start = time.perf_counter()
        evaluator.evaluate()
        evaluate_s = time.perf_counter() - start
        del scores
        # the model's last step, which makes the (C, H, W) scores the evaluator reads
        semantic_s = float("nan")
        if args.queries > 0:
            logits = torch.randn((args.queries, args.classes + 1), generator=generator)
            masks = torch.randn((args.queries, args.size, args.size), generator=generator)
            start = time.perf_counter()
            semantic_inference(logits, masks)
            semantic_s = time.perf_counter() - start
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)
    process_ms = median_ms(process_s)
    evaluate_ms = 1000 * evaluate_s
    per_image_ms = process_ms + evaluate_ms / ADE847_VAL_IMAGES
    return {
        "classes": args.classes,
        "size": args.size,
        "images": args.images,
        "threads": args.threads,
        "argmax_ms": median_ms(argmax_s),
        "torch_argmax_ms": median_ms(torch_argmax_s),
        "read_gt_ms": median_ms(read_s),
        "confusion_update_ms": median_ms(update_s),
        "process_ms": process_ms,
        "evaluate_ms": evaluate_ms,
        "semantic_inference_ms": 1000 * semantic_s,
        "evaluator_without_argmax_ms": median_ms(read_s)
        + median_ms(update_s)
        + evaluate_ms / ADE847_VAL_IMAGES,
        "per_image_ms_over_2000": per_image_ms,
        "forward_ms_reference": args.forward_ms,
        "share_of_forward_pct": 100 * per_image_ms / args.forward_ms,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=847)
    parser.add_argument("--size", type=int, default=512, help="square image side (pixels)")
    parser.add_argument("--images", type=int, default=8, help="images timed (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the argmax")
    parser.add_argument("--forward-ms", type=float, default=111.0, help="reference model forward")
    parser.add_argument(
        "--queries", type=int, default=100, help="queries of the timed semantic_inference (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.classes < 1 or args.classes > 65535 or args.size < 1 or args.images < 1:
        parser.error("--classes must be 1..65535, --size and --images >= 1")
    r = run(args)
    print(
        f"evaluator, {r['classes']} classes, {r['size']}x{r['size']}, median of {r['images']} "
        f"images, {r['threads']} thread(s), CPU:\n"
        f"  process():            {r['process_ms']:8.1f} ms/image\n"
        f"    argmax over classes {r['argmax_ms']:8.1f} ms  (class_argmax; torch.argmax(dim=0): "
        f"{r['torch_argmax_ms']:.1f} ms)\n"
        f"    read 16-bit GT PNG  {r['read_gt_ms']:8.1f} ms\n"
        f"    confusion update    {r['confusion_update_ms']:8.1f} ms  (np.bincount of gt*C+pred)\n"
        f"  evaluate() once:      {r['evaluate_ms']:8.1f} ms  ({r['classes']}x{r['classes']} "
        f"matrix: metrics, log table, saved files)\n"
        f"  the model's semantic_inference ({args.queries} queries -> {r['classes']}x{r['size']}x"
        f"{r['size']} scores): {r['semantic_inference_ms']:.1f} ms\n"
        f"  evaluator without the argmax (read + update + evaluate/{ADE847_VAL_IMAGES}): "
        f"{r['evaluator_without_argmax_ms']:.1f} ms/image\n"
        f"  per image over {ADE847_VAL_IMAGES} val images: {r['per_image_ms_over_2000']:.1f} ms = "
        f"{r['share_of_forward_pct']:.1f}% of a {r['forward_ms_reference']:.0f} ms model forward"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
