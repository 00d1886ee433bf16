#!/usr/bin/env python
"""Compute the CLIP teacher's outputs once per training image: the teacher-feature cache.

    python tools/cache_teacher_features.py --config-file configs/coco_stuff/c2s_R50.yaml \\
        --output cache/coco_stuff_vitb16 [--shards 4 --shard-id 0] [KEY VALUE ...]

Then train with ``MODEL.C2S.DISTILL.TEACHER_CACHE cache/coco_stuff_vitb16``: the mapper reads
each image's cached dense map and global embedding and applies the image's resize / crop / flip
to the map; the teacher is never built (c2s_d2/data/teacher_cache.py says what is approximated).

* Every training image is encoded whole, at the reference scale (c2s_d2/data/teacher_cache.py);
  dense maps and global embeddings are stored as memory-mapped float16 ``.npy`` files per shard,
  with an index JSON (file name -> shard, offset, grid) and the fingerprint of the teacher.
* ``--shards N --shard-id I``: shard I of N (every N-th image), one process or GPU per shard;
  ``index.json`` is written by whichever shard finishes last (or by any later run).
* Resumable: a killed run continues from its last flush (``--flush-every`` images); a complete
  shard is skipped.
* The bytes per image and the total are printed before the teacher is built.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Dict, Iterator, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import get_detection_dataset_dicts  # noqa: E402

from c2s_d2 import add_c2s_config  # noqa: E402  (also registers the datasets)
from c2s_d2.data.dataset_mapper import read_image_checked  # noqa: E402
from c2s_d2.utils.errors import is_user_error, one_line_error  # noqa: E402
from c2s_d2.data.teacher_cache import (  # noqa: E402
    build_shard_plan,
    cache_fingerprint,
    merge_shard_indexes,
    plan_bytes,
    write_shard,
)

logger = logging.getLogger("cache_teacher_features")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TiB"


class _Images(torch.utils.data.Dataset):
    """Plan entries -> (entry, RGB uint8 [3, H, W]) read by data-loader workers."""

    def __init__(self, plan: Sequence[Dict]) -> None:
        self.plan = list(plan)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        e = self.plan[i]
        image = read_image_checked(e["file_name"], "RGB")
        if list(image.shape[:2]) != list(e["image_size"]):
            raise ValueError(
                f"image {e['file_name']} is {image.shape[1]}x{image.shape[0]}, its dataset record "
                f"says {e['image_size'][1]}x{e['image_size'][0]}"
            )
        return e, torch.from_numpy(image.transpose(2, 0, 1).copy())


def teacher_encoder(teacher, plan: Sequence[Dict], device: str, num_workers: int):
    """``encode_items(start)`` of :func:`write_shard` for a :class:`ClipTeacher`."""

    def encode_items(start: int) -> Iterator[Tuple[Dict, torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            _Images(plan[start:]), batch_size=None, num_workers=num_workers
        )
        for entry, image in loader:
            g, dense = teacher(image[None].to(device).float(), size=tuple(entry["input_size"]))
            yield entry, g[0], dense[0]

    return encode_items


def progress_callback(total: int, shard_id: int):
    """``(update(done), close())``: a tqdm bar when tqdm is installed, else a log line every 5 %."""
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"shard {shard_id}", unit="img")

        def update(done: int) -> None:
            bar.n = done
            bar.refresh()

        return update, bar.close
    except ImportError:
        state = {"next": 0, "t0": time.perf_counter(), "first": None}
        step = max(1, total // 20)

        def update(done: int) -> None:
            if state["first"] is None:
                state["first"] = done - 1
            if done >= state["next"] or done == total:
                rate = (done - state["first"]) / max(time.perf_counter() - state["t0"], 1e-9)
                print(f"shard {shard_id}: {done}/{total} images ({rate:.1f} img/s)", flush=True)
                state["next"] = done + step

        return update, lambda: None


def load_cfg(args):
    cfg = get_cfg()
    add_c2s_config(cfg)
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file}: no such file")
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg


def run(args, encoder_factory=None) -> Dict:
    """Write shard ``--shard-id`` and merge the index if every shard is done; a summary dict.

    ``encoder_factory(plan) -> encode_items`` replaces the CLIP teacher (tests)."""
    cfg = load_cfg(args)
    output = args.output or cfg.MODEL.C2S.DISTILL.TEACHER_CACHE
    if not output:
        raise SystemExit("give --output DIR (or MODEL.C2S.DISTILL.TEACHER_CACHE)")
    fingerprint = cache_fingerprint(cfg)
    records = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    plan = build_shard_plan(records, args.shard_id, args.shards, fingerprint)
    distinct = len({r["file_name"] for r in records})
    size = plan_bytes(plan, fingerprint["embed_dim"])
    per_image = size / max(len(plan), 1)
    print(
        f"teacher-feature cache {output}: {fingerprint['model']} ({fingerprint['weights']}), "
        f"reference short side {fingerprint['reference_short_side']} -> teacher input "
        f"{fingerprint['teacher_input_size']}, d={fingerprint['embed_dim']}, float16\n"
        f"shard {args.shard_id} of {args.shards}: {len(plan)} images, {human(per_image)} per "
        f"image on average, {human(size)} for the shard; about {human(per_image * distinct)} "
        f"for all {distinct} images",
        flush=True,
    )
    if args.dry_run:
        return {"output": output, "plan": plan, "bytes": size, "status": "dry-run"}
    if encoder_factory is None:
        from c2s_d2.modeling.clip.teacher import build_teacher_from_cfg

        device = args.device or cfg.MODEL.DEVICE
        teacher = build_teacher_from_cfg(cfg).to(device)
        encode_items = teacher_encoder(teacher, plan, device, args.num_workers)
    else:
        encode_items = encoder_factory(plan)
    os.makedirs(output, exist_ok=True)
    update, close = progress_callback(len(plan), args.shard_id)
    try:
        status = write_shard(
            output,
            args.shard_id,
            args.shards,
            plan,
            fingerprint,
            encode_items,
            flush_every=args.flush_every,
            on_image=update,
        )
    finally:
        close()
    if status == "complete":
        print(f"shard {args.shard_id} of {args.shards} is complete already: skipped")
    index = merge_shard_indexes(output, args.shards)
    if index:
        print(f"cache complete: {index}; train with MODEL.C2S.DISTILL.TEACHER_CACHE {output}")
    else:
        print(f"shard {args.shard_id} done; the index is written when every shard is done")
    return {"output": output, "plan": plan, "bytes": size, "status": status, "index": index}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, help="the training config")
    p.add_argument("--output", default="", help="cache folder (default: TEACHER_CACHE)")
    p.add_argument("--shards", type=int, default=1, help="number of shards")
    p.add_argument("--shard-id", type=int, default=0, help="the shard this process writes")
    p.add_argument("--device", default="", help="teacher device (default: MODEL.DEVICE)")
    p.add_argument("--num-workers", type=int, default=2, help="image-reading worker processes")
    p.add_argument("--flush-every", type=int, default=64, help="images between flushes")
    p.add_argument("--dry-run", action="store_true", help="print the size estimate and stop")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.shards < 1 or not 0 <= args.shard_id < args.shards:
        p.error(f"--shard-id {args.shard_id} must be in 0..{args.shards - 1} (--shards)")
    if args.flush_every < 1 or args.num_workers < 0:
        p.error("--flush-every must be >= 1 and --num-workers >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except Exception as e:  # input errors (files, config keys, a mismatched cache) in one line
        if not is_user_error(e, scripts=(__file__,)):
            raise
        sys.exit(f"cache_teacher_features.py: error: {one_line_error(e)}")


if __name__ == "__main__":
    main()
