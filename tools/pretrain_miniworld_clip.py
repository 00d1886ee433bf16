#!/usr/bin/env python
"""Pretrain a tiny open_clip model on the mini-world: the teacher's "web pretraining".

    python tools/pretrain_miniworld_clip.py [--output PATH] [--quick] [--seed N] [--steps N] ...

CLIP's contrastive training (symmetric InfoNCE, learnable temperature) on captions naming every
material, seen and unseen, as web captions name everything: the mini-world's 16 and the 6
materials of the transfer set (``c2s_d2.data.miniworld_transfer``), which no mini-world scene,
label or name holds. The teacher learns from its **own** scenes (``c2s_miniworld_teacher_train_all``:
generated from another seed than the student's mini-world, with the 22 materials, so it never
sees an image the student trains or is evaluated on, nor a transfer-set scene): those scenes with
their captions, scene crops captioned by the materials covering them (from the labels), and single-material
patches with varied prompts. The teacher's MaskCLIP dense embeddings (value path of the last
block), averaged over the image, meet the same loss, so that patch tokens carry the semantics.
Captions naming the same set of materials count as positives of each other.

Writes a float16 state dict in open_clip's format, which ``build_open_clip(model_name,
pretrained=<path>)`` loads, then evaluates the teacher built from it (zero-shot accuracy on
single-material patches, seen / unseen / transfer, global / dense; dense segmentation of the
mini-world's val scenes and of the transfer set) and
saves that report next to it as ``<stem>_zero_shot.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog  # noqa: E402

import c2s_d2  # noqa: E402, F401  (registers the mini-world datasets)
from c2s_d2.data.miniworld import IGNORE_LABEL, MINIWORLD_CLASSES  # noqa: E402
from c2s_d2.data.miniworld import MINIWORLD_UNSEEN_IDS, palette_classes  # noqa: E402
from c2s_d2.data.miniworld import render_material_patch  # noqa: E402
from c2s_d2.data.miniworld_transfer import NEW_IDS, TRANSFER_WORLD_CLASSES  # noqa: E402
from c2s_d2.data.datasets.register_miniworld import TEACHER_DATASET  # noqa: E402
from c2s_d2.data.datasets.register_miniworld import TRANSFER_DATASET  # noqa: E402
from c2s_d2.evaluation.sem_seg_evaluator import compute_zero_shot_metrics  # noqa: E402
from c2s_d2.modeling.clip.loader import build_open_clip, get_tokenizer  # noqa: E402
from c2s_d2.modeling.clip.teacher import ClipTeacher, _value_path_block  # noqa: E402
from c2s_d2.modeling.clip.teacher import interpolate_positional_embedding  # noqa: E402
from c2s_d2.modeling.clip.templates import get_templates  # noqa: E402
from c2s_d2.modeling.clip.text_encoder import text_embeddings  # noqa: E402

logger = logging.getLogger("pretrain_miniworld_clip")

# The teacher's vocabulary: the mini-world's 16 materials (ids 0..15), then the 6 materials of the
# transfer set (16..21), which no mini-world scene, label or name holds.
TEACHER_CLASSES = palette_classes("teacher")
NUM_MATERIALS = len(TEACHER_CLASSES)
MINIWORLD_IDS = list(range(len(MINIWORLD_CLASSES)))
SEEN_IDS = [i for i in MINIWORLD_IDS if i not in MINIWORLD_UNSEEN_IDS]
GROUPS = {
    "seen": SEEN_IDS,
    "unseen": MINIWORLD_UNSEEN_IDS,
    "transfer": NEW_IDS,
    "all": list(range(NUM_MATERIALS)),
}
_OWN_SINGLE = ["a photo of {}.", "{}", "{} texture", "a close-up photo of {}.", "a patch of {}."]
_OWN_SINGLE += ["the surface of {}.", "a picture of {}.", "a texture of {}."]
# Prompt variety for one material: our phrasings plus the ensembling sets the project uses.
SINGLE_TEMPLATES = _OWN_SINGLE + get_templates("short") + get_templates("imagenet80")
MULTI_TEMPLATES = ["a scene of {}", "a photo of {}.", "{}", "an image of {}.", "a picture with {}."]
MIN_CROP_SHARE = 0.15  # a material names a crop when it covers this share of its labelled pixels
# mode -> (steps, batch size, training scenes used (None: all), eval patches per material)
MODES = {"default": (1200, 256, None, 50), "quick": (60, 96, 200, 20)}


# ------------------------------------------------------------------------------------ data
def read_image(path: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """``cv2.imread`` that names the file it cannot read (colour images come back RGB)."""
    image = cv2.imread(path, flags)
    if image is None:
        raise OSError(f"cannot read image file {path}")
    return np.ascontiguousarray(image[..., ::-1]) if image.ndim == 3 else image


class SceneBank:
    """The teacher's pretraining scenes in memory: images, labels, captions."""

    def __init__(self, max_scenes: Optional[int] = None, dataset: str = TEACHER_DATASET):
        records = DatasetCatalog.get(dataset)[:max_scenes]  # generates the folder on first use
        # The records carry the paths in use (the metadata's paths were fixed at import time).
        image_dir = os.path.dirname(records[0]["file_name"])
        root, split = os.path.dirname(os.path.dirname(image_dir)), os.path.basename(image_dir)
        captions_file = os.path.join(root, f"captions_{split}.json")
        with open(captions_file, "r", encoding="utf-8") as f:
            captions = json.load(f)
        missing = [r["image_id"] for r in records if r["image_id"] not in captions]
        if missing:
            raise KeyError(f"{captions_file} lacks the captions of images {missing[:5]}")
        self.captions = [captions[r["image_id"]] for r in records]
        self.images = np.stack([read_image(r["file_name"]) for r in records])
        self.labels = np.stack([read_image(r["sem_seg_file_name"], 0) for r in records])
        logger.info("%d training scenes from %s", len(records), root)


def materials_by_area(label: np.ndarray, min_share: float) -> List[int]:
    """Materials covering >= ``min_share`` of the labelled pixels, largest first (else the top;
    none when no pixel is labelled)."""
    counts = np.bincount(label[label != IGNORE_LABEL], minlength=NUM_MATERIALS)[:NUM_MATERIALS]
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    return [i for i in present if counts[i] >= min_share * counts.sum()] or present[:1]


def multi_caption(ids: Sequence[int], rng: np.random.Generator) -> str:
    """A caption naming materials ``ids``, e.g. "a photo of grass, ice and lava."."""
    names = [TEACHER_CLASSES[i] for i in ids]
    if rng.random() < 0.5:  # area order is a cue that prompts at test time never give
        names = [names[i] for i in rng.permutation(len(names))]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return MULTI_TEMPLATES[rng.integers(len(MULTI_TEMPLATES))].replace("{}", listed)


def sample_batch(
    bank: SceneBank, rng: np.random.Generator, batch_size: int, image_size: int
) -> Tuple[np.ndarray, List[str], List[frozenset]]:
    """One batch: 1/4 whole scenes, 2/5 scene crops, the rest single-material patches.

    Crops and patches span 32..96 px at the scenes' own scale (the scale the teacher sees), then
    are resized to ``image_size``. Returns images uint8 [B, S, S, 3] RGB, B captions and B
    material sets (the positives of the loss).
    """
    n_scene, n_crop = batch_size // 4, (2 * batch_size) // 5
    images, captions, groups = [], [], []
    side = bank.images.shape[1]
    for k in range(batch_size):
        if k < n_scene + n_crop:
            i = int(rng.integers(len(bank.images)))
            image, label = bank.images[i], bank.labels[i]
            if k < n_scene:
                ids = materials_by_area(label, 0.0)
                caption = bank.captions[i] if rng.random() < 0.5 else multi_caption(ids, rng)
            else:
                # a crop names the materials covering it; a crop of unlabelled pixels only
                # (clutter, blur) names nothing: draw another (the whole scene after 20 tries)
                scene_image, scene_label = image, label
                for _ in range(20):
                    c = int(rng.integers(min(32, side), min(96, side) + 1))
                    y, x = (int(v) for v in rng.integers(0, side - c + 1, 2))
                    label = scene_label[y : y + c, x : x + c]
                    if (label != IGNORE_LABEL).any():
                        image = scene_image[y : y + c, x : x + c]
                        break
                else:
                    image, label = scene_image, scene_label
                ids = materials_by_area(label, MIN_CROP_SHARE)
                caption = multi_caption(ids, rng)
        else:
            ids = [int(rng.integers(NUM_MATERIALS))]
            image = render_material_patch(ids[0], int(rng.integers(32, 97)), rng, "teacher")
            template = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
            caption = template.replace("{}", TEACHER_CLASSES[ids[0]])
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
        images.append(image[:, ::-1] if rng.random() < 0.5 else image)
        captions.append(caption)
        groups.append(frozenset(ids))
    return np.ascontiguousarray(np.stack(images)), captions, groups


# ------------------------------------------------------------------------------------ model
def encode_image_global_dense(
    visual: torch.nn.Module, x: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ClipTeacher.forward`` with gradients: x [B, 3, H, W] CLIP-normalised ->
    (global [B, d], dense [B, h*w, d]), both unit norm."""
    patches = visual.conv1(x)
    b, c, h, w = patches.shape
    cls_token = visual.class_embedding.view(1, 1, c).expand(b, 1, c)
    tokens = torch.cat([cls_token, patches.flatten(2).transpose(1, 2)], dim=1)
    pos = interpolate_positional_embedding(visual.positional_embedding, visual.grid_size, (h, w))
    tokens = visual.ln_pre(tokens + pos)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        tokens = block(tokens)
    global_emb = visual.ln_post(blocks[-1](tokens)[:, 0]) @ visual.proj
    dense = visual.ln_post(_value_path_block(blocks[-1], tokens)[:, 1:]) @ visual.proj
    return F.normalize(global_emb, dim=-1), F.normalize(dense, dim=-1)


def encode_text_truncated(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on tokens [N, L] cut after the last end-of-text token -> [N, d]
    (exact: under the causal mask, the pooled end-of-text token never sees the padding)."""
    n = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :n]
    x = model.token_embedding(t) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(len(t)), t.argmax(dim=-1)]
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def multi_positive_clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, groups: Sequence
) -> torch.Tensor:
    """Symmetric InfoNCE; pairs with equal ``groups`` entries share the target mass.

    image_emb, text_emb: [B, d] unit norm; logit_scale: scalar (already exponentiated). With all
    groups distinct this is CLIP's loss, the mean of the two cross-entropies.
    """
    g = torch.tensor([list(dict.fromkeys(groups)).index(x) for x in groups])  # group ids
    positives = (g[:, None] == g[None, :]).float()
    target = positives / positives.sum(dim=1, keepdim=True)  # symmetric: serves both directions
    logits = logit_scale * image_emb @ text_emb.T
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (i2t + t2i) / 2


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, renamed to ``path`` once complete."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; ours are meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(model: torch.nn.Module, path: str, info: Dict) -> None:
    """Float16 state dict under ``"state_dict"`` (open_clip's format) + ``info``, atomically."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save({"state_dict": state, "c2s_pretrain": info}, f))


# ------------------------------------------------------------------------------------ training
def build_optimizer(model: torch.nn.Module, lr: float, steps: int):
    """AdamW (no weight decay on gains, biases, embeddings, temperature) + warmup and cosine."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_loss(model, tokenizer, images, captions, groups, dense_weight: float) -> torch.Tensor:
    """Global + pooled-dense contrastive losses of one batch; images CLIP-normalised."""
    global_emb, dense = encode_image_global_dense(model.visual, images)
    unique = list(dict.fromkeys(captions))  # each distinct caption is encoded once
    text = F.normalize(encode_text_truncated(model, tokenizer(unique)), dim=-1)
    text = text[torch.tensor([unique.index(c) for c in captions])]
    scale = model.logit_scale.exp()
    pooled = F.normalize(dense.mean(dim=1), dim=-1)  # the teacher's region embedding of the image
    loss = multi_positive_clip_loss(global_emb, text, scale, groups)
    return loss + dense_weight * multi_positive_clip_loss(pooled, text, scale, groups)


def train(args: argparse.Namespace) -> Tuple[torch.nn.Module, Dict]:
    """Train from the seeded random weights; returns the model (eval mode) and a run summary."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 0])
    model = build_open_clip(args.model, "", random_init_seed=args.seed)
    stats = ClipTeacher(model)  # the teacher's pixel normalisation (building it freezes the model)
    model.requires_grad_(True).train()
    tokenizer = get_tokenizer(args.model)
    bank, image_size = SceneBank(args.max_scenes), int(model.visual.image_size[0])
    optimizer, scheduler = build_optimizer(model, args.lr, args.steps)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        images, captions, groups = sample_batch(bank, rng, args.batch_size, image_size)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = (x - stats.pixel_mean) / stats.pixel_std
        loss = batch_loss(model, tokenizer, x, captions, groups, args.dense_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            scale = model.logit_scale.clamp_(0, math.log(100)).exp().item()  # CLIP's cap: 100
        losses.append(loss.item())
        elapsed = time.perf_counter() - start
        if step % 25 == 0 or step == args.steps - 1:
            logger.info("step %d loss %.4f scale %.1f", step, losses[-1], scale)
        if elapsed > args.minutes * 60 and step < args.steps - 1:
            logger.warning("%.1f min spent: training stops at step %d", args.minutes, step + 1)
            break
    k = max(1, len(losses) // 10)  # loss means over the first and the last tenth of the run
    summary = dict(vars(args), steps_done=len(losses), scenes=len(bank.images))
    summary.update(loss_first=float(np.mean(losses[:k])), loss_last=float(np.mean(losses[-k:])))
    summary.update(seconds=round(time.perf_counter() - start, 1))
    return model.eval(), summary


# ------------------------------------------------------------------------------------ evaluation
def group_accuracies(pred: np.ndarray, truth: np.ndarray) -> Dict:
    """Per-class accuracy (a 22-way choice) and its means over the mini-world's seen and unseen
    materials, the transfer set's new ones and all."""
    per_class = [float(np.mean(pred[truth == c] == c)) for c in range(NUM_MATERIALS)]
    out = {key: float(np.mean([per_class[i] for i in ids])) for key, ids in GROUPS.items()}
    return dict(out, per_class=dict(zip(TEACHER_CLASSES, per_class)))


def dense_segmentation_metrics(
    teacher: ClipTeacher,
    names_emb: torch.Tensor,
    dataset: str = "c2s_miniworld_val",
    classes: Sequence[str] = MINIWORLD_CLASSES,
    unseen_ids: Sequence[int] = MINIWORLD_UNSEEN_IDS,
) -> Dict[str, float]:
    """MaskCLIP-style segmentation of ``dataset`` (``names_emb``: one row per class of
    ``classes``): each pixel takes the nearest name."""
    n = len(classes)
    conf = np.zeros((n, n), np.int64)
    for r in DatasetCatalog.get(dataset):
        image, label = read_image(r["file_name"]), read_image(r["sem_seg_file_name"], 0)
        dense = teacher(torch.from_numpy(image).permute(2, 0, 1)[None].float())[1]
        logits = torch.einsum("bdhw,cd->bchw", dense, names_emb)
        logits = F.interpolate(logits, label.shape, mode="bilinear", align_corners=False)
        pred, keep = logits[0].argmax(0).numpy(), label != IGNORE_LABEL
        pairs = label[keep].astype(np.int64) * n + pred[keep]
        conf += np.bincount(pairs, minlength=conf.size).reshape(conf.shape)
    seen = [i for i in range(n) if i not in unseen_ids]
    metrics = compute_zero_shot_metrics(conf, list(classes), seen, list(unseen_ids))
    return {k: metrics[k] for k in ("mIoU-seen", "mIoU-unseen", "hIoU", "pAcc")}


@torch.no_grad()
def evaluate_teacher(
    model_name: str, checkpoint: str, per_material: int, seed: int, templates: str = "short"
) -> Dict:
    """Zero-shot accuracy (22 names, prompt ensembling) of the teacher built from ``checkpoint``.

    Patches of 64 px (``global``; ``dense``: dense embeddings averaged over the patch) and of
    128 px, a scene's size (``*_patch128``), drawn from a stream training never used; plus
    ``dense_val_segmentation`` (the mini-world's val scenes, 16 names) and
    ``dense_transfer_segmentation`` (the transfer set, 22 names; "unseen" = its 6 new
    materials): scenes the teacher never saw.
    """
    teacher = ClipTeacher(build_open_clip(model_name, checkpoint))
    names_emb = text_embeddings(TEACHER_CLASSES, model_name, checkpoint, templates=templates)
    rng = np.random.default_rng([seed, 1])  # a stream the training never drew from
    truth = np.repeat(np.arange(NUM_MATERIALS), per_material)
    report = dict(model_name=model_name, checkpoint=os.path.abspath(checkpoint))
    report.update(templates=templates, per_material=per_material)
    for size, suffix in ((64, ""), (128, "_patch128")):
        patches = np.stack([render_material_patch(int(c), size, rng, "teacher") for c in truth])
        global_emb, dense = teacher(torch.from_numpy(patches).permute(0, 3, 1, 2).float())
        pooled = F.normalize(dense.mean(dim=(2, 3)), dim=-1)
        for kind, emb in (("global", global_emb), ("dense", pooled)):
            pred = (emb @ names_emb.T).argmax(dim=1).numpy()
            report[kind + suffix] = group_accuracies(pred, truth)
    miniworld_emb = names_emb[: len(MINIWORLD_CLASSES)]
    report["dense_val_segmentation"] = dense_segmentation_metrics(teacher, miniworld_emb)
    assert TRANSFER_WORLD_CLASSES == TEACHER_CLASSES  # same order: the rows of names_emb
    report["dense_transfer_segmentation"] = dense_segmentation_metrics(
        teacher, names_emb, TRANSFER_DATASET, TRANSFER_WORLD_CLASSES, NEW_IDS
    )
    return report


# ------------------------------------------------------------------------------------ command line
def report_path(checkpoint: str) -> str:
    """``out/clip_tiny.pt -> out/clip_tiny_zero_shot.json``."""
    return os.path.splitext(checkpoint)[0] + "_zero_shot.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--output",
        default="output/miniworld_clip/C2S-Tiny-Text32_miniworld.pt",
        help="a .pt file (the shipped teacher is c2s_d2/modeling/clip/weights/<this name>)",
    )
    p.add_argument("--quick", action="store_true", help="about a minute: few steps, small data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=18.0, help="stop training after this long")
    p.add_argument("--steps", type=int, help="training steps (default: by mode)")
    p.add_argument("--batch-size", type=int, help="default: by mode")
    p.add_argument("--eval-per-material", type=int, help="default: by mode")
    p.add_argument(
        "--model", default="C2S-Tiny-Text32", help="open_clip architecture name (shipped: this)"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--dense-weight", type=float, default=1.0, help="pooled dense loss weight")
    args = p.parse_args(argv)
    mode = MODES["quick" if args.quick else "default"]
    for key, value in zip(("steps", "batch_size", "max_scenes", "eval_per_material"), mode):
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("steps", "batch_size", "eval_per_material", "minutes", "threads"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    return args


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch CPU threads, then restore (main() may run inside the tests).

    The default is 1: on a shared 2-core machine, 2 threads waiting on each other ran 10x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Train, save the checkpoint, evaluate it as the teacher; returns the report."""
    args, start = parse_args(argv), time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in (logger.name, "c2s_d2"):  # open_clip's info chatter on the root logger stays off
        logging.getLogger(name).setLevel(logging.INFO)
    with torch_threads(args.threads):
        model, summary = train(args)
        save_checkpoint(model, args.output, summary)
        report = evaluate_teacher(args.model, args.output, args.eval_per_material, args.seed)
    report.update(training=summary, seconds_total=round(time.perf_counter() - start, 1))
    atomic_write(report_path(args.output), lambda f: f.write(json.dumps(report, indent=1).encode()))
    for kind in ("global", "dense", "global_patch128", "dense_patch128"):
        acc = report[kind]
        logger.info(
            "zero-shot %s: seen %.3f, unseen %.3f, transfer %.3f",
            kind,
            acc["seen"],
            acc["unseen"],
            acc["transfer"],
        )
    logger.info("dense segmentation of the val scenes: %s", report["dense_val_segmentation"])
    logger.info("dense segmentation of the transfer set: %s", report["dense_transfer_segmentation"])
    size = os.path.getsize(args.output) / 2**20
    logger.info("checkpoint %s (%.2f MiB), report %s", args.output, size, report_path(args.output))
    return report


if __name__ == "__main__":
    main()
