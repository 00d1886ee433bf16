#!/usr/bin/env python
"""Check your own dataset before training: every problem in one list, then a summary.

    python tools/check_dataset.py IMAGE_DIR LABEL_DIR CLASS_FILE [--split train|eval]
    python tools/check_dataset.py IMAGE_DIR LABEL_DIR CLASS_FILE --write-index-labels OUT_DIR

Errors (exit code 1): unreadable class file or folder, image without label, two images with one
stem, unreadable / corrupt image or label, image and label of different sizes, label ids neither
in the class file nor 255, RGB colour labels, unsupported PNG modes. Warnings: label without image,
palette and single-channel labels mixed, classes without pixels. Information (``--split train``):
unseen classes present in the training labels. The summary gives the counts and the pixel share of
every class. The formats are described in ``c2s_d2/data/datasets/custom.py`` and in
datasets/README.md ("Your own data").

``--write-index-labels OUT_DIR`` first converts every label of LABEL_DIR to an 8-bit index PNG
in OUT_DIR (RGB colours through the class file's colours), then checks OUT_DIR.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image_dir")
    parser.add_argument("label_dir")
    parser.add_argument("class_file")
    parser.add_argument(
        "--split",
        choices=("train", "eval"),
        default="train",
        help="train: report unseen classes found in the labels (default); eval: every class",
    )
    parser.add_argument("--workers", type=int, default=4, help="reading threads (default 4)")
    parser.add_argument("--max-per-kind", type=int, default=20, help="problems shown per kind")
    parser.add_argument(
        "--write-index-labels",
        metavar="OUT_DIR",
        help="convert the labels to index PNGs in OUT_DIR, then check OUT_DIR",
    )
    args = parser.parse_args(argv)

    from c2s_d2.data.datasets.custom import check_folder_dataset, convert_color_labels

    label_dir = args.label_dir
    if args.write_index_labels:
        try:
            n = convert_color_labels(args.label_dir, args.write_index_labels, args.class_file)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {n} index labels to {args.write_index_labels}")
        label_dir = args.write_index_labels
    report = check_folder_dataset(
        args.image_dir, label_dir, args.class_file, split=args.split, workers=args.workers
    )
    print(f"checking images {args.image_dir}, labels {label_dir}, classes {args.class_file}")
    print(report.format(max_per_kind=args.max_per_kind))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
