"""Teacher-feature cache: the CLIP teacher's outputs computed once per training image.

Written by ``tools/cache_teacher_features.py``; read by the training mapper
(``MODEL.C2S.DISTILL.TEACHER_CACHE``), after which the distiller takes the teacher's outputs from
the batch instead of running the teacher.

What is stored, per training image (file name):

* ``dense``: the teacher's MaskCLIP dense embeddings ``[h, w, d]`` (float16, unit norm) of the
  *whole* image at one fixed scale, the **reference scale**: the image resized as the training
  resize would at the reference short side ``R`` (``ResizeShortestEdge`` to ``R``, long side
  capped at ``INPUT.MAX_SIZE_TRAIN``), then scaled by ``T / R`` (``T`` =
  ``MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE``) and rounded to multiples of the patch size. ``R`` is
  the crop's short side with an absolute crop (``INPUT.CROP``: at that scale a ``C x C`` crop
  reaches the teacher at ``T``, exactly as in online training, so the cached cells have the
  online cells' size in image pixels), else the median of ``INPUT.MIN_SIZE_TRAIN``. For the
  COCO-Stuff config (R = 512, T = 448, ViT-B/16) a 640x480 image is cached at 597x448 -> 592x448
  pixels, a 37x28 grid.
* ``global``: the teacher's global image embedding ``[d]`` of the same whole-image input.

Storage: per shard, ``shard-IIIII-of-NNNNN.dense.npy`` (float16 ``[cells, d]``, the images' grids
one after the other in row-major order) and ``...global.npy`` (float16 ``[images, d]``), read
memory-mapped; ``index.json`` maps each file name to its shard, row, cell offset, grid and image
size, and holds the fingerprint of the teacher and the settings (a cache built for another
teacher or other settings is refused). The float16 dense map costs ``h * w * d * 2`` bytes per
image: 37 * 28 * 512 * 2 = 1.06 MB for a 640x480 COCO image (42 * 28 cells, 1.2 MB, for
640x427), so 125 to 143 GB for the 118,287 COCO-Stuff training images
(``tools/cache_teacher_features.py`` prints the estimate from the real image sizes first).

What the cache approximates (compared with the online teacher):

* scale: each training crop's dense map is the reference-scale map resampled (bilinearly, at
  the centres of the teacher cells of the batch canvas) through the same resize / crop / flip
  as the image (:func:`source_affine` reads detectron2's transform objects). Exact for flips
  and for crops aligned with the cached cells at the reference scale; at other scales the
  teacher would have seen the content at another resolution;
* context: the online teacher sees only the crop (attention over the crop's tokens); the cache
  saw the whole image;
* global embedding: the whole-image embedding stands for the crop's (and for its flip);
* colour augmentation (``INPUT.COLOR_AUG_SSD``) is not seen by the cached teacher;
* precision: float16 storage (relative error about 5e-4 on unit vectors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
from functools import lru_cache
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T

__all__ = [
    "INDEX_FILE",
    "TeacherFeatureCache",
    "build_shard_plan",
    "cache_fingerprint",
    "cached_teacher_outputs",
    "merge_shard_indexes",
    "open_teacher_cache_from_cfg",
    "reference_input_size",
    "source_affine",
    "write_shard",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
INDEX_FILE = "index.json"
STORAGE_DTYPE = np.float16
# fingerprint keys that must agree between a cache and the config that reads it
COMPARED_KEYS = (
    "format",
    "model",
    "architecture_sha256",
    "weights",
    "quick_gelu",
    "embed_dim",
    "patch_size",
    "teacher_input_size",
    "reference_short_side",
    "max_size",
    "storage_dtype",
)


# ------------------------------------------------------------------------------- fingerprint
@lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_name(clip) -> str:
    """Weights identity: the tag / hub name / random seed, or the sha256 of a checkpoint file
    (not its path: a cache moves between machines)."""
    from ..modeling.clip.loader import is_checkpoint_path, shipped_weights_file, weights_identity

    pretrained = clip.PRETRAINED
    if (
        pretrained
        and is_checkpoint_path(pretrained)
        and not shipped_weights_file(clip.MODEL_NAME, pretrained)
    ):
        path = os.path.abspath(os.path.expanduser(pretrained))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP checkpoint file not found: {pretrained}")
        st = os.stat(path)
        return "sha256:" + _file_sha256(path, st.st_size, st.st_mtime_ns)
    return weights_identity(pretrained, clip.RANDOM_INIT_SEED, clip.MODEL_NAME, "auto")


def reference_short_side(cfg) -> int:
    """``R`` of the module docstring: the absolute crop's short side, else the median of
    ``INPUT.MIN_SIZE_TRAIN``."""
    inp = cfg.INPUT
    if inp.CROP.ENABLED and inp.CROP.TYPE == "absolute":
        return int(min(inp.CROP.SIZE))
    return int(round(statistics.median(list(inp.MIN_SIZE_TRAIN))))


def cache_fingerprint(cfg) -> Dict:
    """What a cache depends on: teacher (name, architecture, weights), input size, reference
    scale and storage dtype. ``computed_with`` (the teacher's precision setting) is recorded but
    not compared."""
    from ..modeling.clip.loader import get_model_config

    clip, d = cfg.MODEL.CLIP, cfg.MODEL.C2S.DISTILL
    arch = get_model_config(clip.MODEL_NAME, tuple(clip.MODEL_CONFIG_FILES))
    patch = arch["vision_cfg"].get("patch_size", 16)
    return {
        "format": CACHE_FORMAT,
        "model": clip.MODEL_NAME,
        "architecture_sha256": hashlib.sha256(
            json.dumps(arch, sort_keys=True).encode()
        ).hexdigest(),
        "weights": _weights_name(clip),
        "quick_gelu": str(clip.QUICK_GELU).lower(),
        "embed_dim": int(arch["embed_dim"]),
        "patch_size": int(patch if isinstance(patch, int) else patch[0]),
        "teacher_input_size": int(d.TEACHER_INPUT_SIZE or 0),
        "reference_short_side": reference_short_side(cfg),
        "max_size": int(cfg.INPUT.MAX_SIZE_TRAIN),
        "storage_dtype": np.dtype(STORAGE_DTYPE).name,
        "computed_with": str(d.TEACHER_DTYPE).lower(),
    }


def check_fingerprint(found: Dict, expected: Dict, path: str) -> None:
    """Refuse a cache whose fingerprint differs from the config's (one line naming the file)."""
    for key in COMPARED_KEYS:
        if found.get(key) != expected.get(key):
            raise ValueError(
                f"teacher-feature cache {path} was built for another teacher or other settings: "
                f"{key} is {found.get(key)!r} there, {expected.get(key)!r} in the config; "
                "rebuild it with tools/cache_teacher_features.py (or fix "
                "MODEL.C2S.DISTILL.TEACHER_CACHE)"
            )


# ------------------------------------------------------------------------------- geometry
def reference_input_size(fingerprint: Dict, height: int, width: int) -> Tuple[int, int]:
    """Teacher input size (multiples of the patch) of a whole ``height x width`` image at the
    reference scale (module docstring)."""
    r, max_size = fingerprint["reference_short_side"], fingerprint["max_size"]
    h, w = T.ResizeShortestEdge.get_output_shape(int(height), int(width), r, max_size)
    factor = fingerprint["teacher_input_size"] / r if fingerprint["teacher_input_size"] else 1.0
    p = fingerprint["patch_size"]
    return tuple(max(p, int(round(s * factor / p)) * p) for s in (h, w))


def _inverse(t) -> np.ndarray:
    """3x3 matrix mapping a point (x, y, 1) of the frame after ``t`` to the frame before it
    (continuous pixel coordinates: pixel i spans [i, i + 1))."""
    m = np.eye(3)
    if isinstance(t, (T.ResizeTransform, T.ScaleTransform)):
        m[0, 0], m[1, 1] = t.w / t.new_w, t.h / t.new_h
    elif isinstance(t, T.CropTransform):
        m[0, 2], m[1, 2] = t.x0, t.y0
    elif isinstance(t, T.PadTransform):
        m[0, 2], m[1, 2] = -t.x0, -t.y0
    elif isinstance(t, T.HFlipTransform):
        m[0, 0], m[0, 2] = -1.0, t.width
    elif isinstance(t, T.VFlipTransform):
        m[1, 1], m[1, 2] = -1.0, t.height
    elif not isinstance(t, (T.NoOpTransform, T.BlendTransform, T.ColorTransform)):
        raise ValueError(
            f"teacher-feature cache (MODEL.C2S.DISTILL.TEACHER_CACHE): augmentation "
            f"{type(t).__name__} is not supported (only resize, crop, pad, flip and colour)"
        )
    return m


def source_affine(transforms: Iterable, source_hw: Sequence[int]) -> torch.Tensor:
    """[2, 3] float64 map from a point (x, y, 1) of the augmented image (pixels) to the original
    image in ``grid_sample`` coordinates (-1 .. 1 over the image, ``align_corners=False``).

    ``transforms``: detectron2 transforms (a ``TransformList`` or a list) in the order applied.
    """
    m = np.eye(3)
    for t in getattr(transforms, "transforms", transforms):
        m = m @ _inverse(t)
    height, width = source_hw
    to_unit = np.array([[2.0 / width, 0, -1.0], [0, 2.0 / height, -1.0], [0, 0, 1]])
    return torch.from_numpy((to_unit @ m)[:2])


def cached_teacher_outputs(
    batched_inputs: Sequence[Dict],
    canvas_hw: Sequence[int],
    grid_hw: Sequence[int],
    device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The teacher's outputs for a batch, from the mapper's ``teacher_cache`` entries.

    Each teacher cell ``(i, j)`` of the ``grid_hw`` grid over the padded batch canvas
    ``canvas_hw`` (what the online teacher computes) takes the cached map bilinearly sampled at
    the cell centre ``((j + 0.5) W / w, (i + 0.5) H / h)`` mapped to the original image; cells
    beyond the image take the nearest edge value.

    Returns:
        ``(global [B, d], dense [B, d, h, w])``, float32, unit norm.
    """
    (canvas_h, canvas_w), (h, w) = canvas_hw, grid_hw
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (canvas_h / h)
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (canvas_w / w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1)  # [h, w, 3]
    dense, globals_ = [], []
    for x in batched_inputs:
        entry = x.get("teacher_cache")
        if entry is None:
            raise ValueError(
                f"MODEL.C2S.DISTILL.TEACHER_CACHE is set but the training input "
                f"{x.get('file_name', '?')} has no cached teacher features (the training mapper "
                "must be C2SSemanticDatasetMapper, built with the same config)"
            )
        grid = (points @ entry["to_source"].T).to(device=device, dtype=torch.float32)
        source = entry["dense"].to(device=device, dtype=torch.float32)[None]  # [1, d, h0, w0]
        sampled = F.grid_sample(
            source, grid[None], mode="bilinear", padding_mode="border", align_corners=False
        )
        dense.append(F.normalize(sampled[0], dim=0))
        globals_.append(F.normalize(entry["global"].to(device=device, dtype=torch.float32), dim=0))
    return torch.stack(globals_), torch.stack(dense)


# ------------------------------------------------------------------------------- writing
def shard_stem(directory: str, shard_id: int, num_shards: int) -> str:
    return os.path.join(directory, f"shard-{shard_id:05d}-of-{num_shards:05d}")


def _atomic_json(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"teacher-feature cache file {path} is unreadable: {e}") from e


def image_size(record: Dict) -> Tuple[int, int]:
    """(height, width) of a record's image as detectron2 reads it (EXIF orientation applied):
    from the record when it says, else from the file header."""
    if "height" in record and "width" in record:
        return int(record["height"]), int(record["width"])
    from PIL import Image

    with Image.open(record["file_name"]) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def build_shard_plan(
    records: Sequence[Dict], shard_id: int, num_shards: int, fingerprint: Dict
) -> List[Dict]:
    """The images of shard ``shard_id`` (every ``num_shards``-th distinct file name, in dataset
    order) with their size, teacher input size, grid and cell offset."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"--shard-id {shard_id} is outside 0..{num_shards - 1} (--shards)")
    names = list(dict.fromkeys(r["file_name"] for r in records))
    by_name = {r["file_name"]: r for r in records}
    plan, offset, p = [], 0, fingerprint["patch_size"]
    for row, name in enumerate(names[shard_id::num_shards]):
        height, width = image_size(by_name[name])
        size = reference_input_size(fingerprint, height, width)
        grid = (size[0] // p, size[1] // p)
        plan.append(
            {"file_name": name, "row": row, "offset": offset, "image_size": [height, width],
             "input_size": list(size), "grid": list(grid)}
        )  # fmt: skip
        offset += grid[0] * grid[1]
    return plan


def plan_bytes(plan: Sequence[Dict], embed_dim: int) -> int:
    """Bytes a shard's dense and global arrays take."""
    item = np.dtype(STORAGE_DTYPE).itemsize
    cells = sum(e["grid"][0] * e["grid"][1] for e in plan)
    return (cells + len(plan)) * embed_dim * item


def _plan_sha(plan: Sequence[Dict]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


Encoder = Callable[[Dict, Dict], Tuple[torch.Tensor, torch.Tensor]]


def write_shard(
    directory: str,
    shard_id: int,
    num_shards: int,
    plan: Sequence[Dict],
    fingerprint: Dict,
    encode_items: Callable[[int], Iterable[Tuple[Dict, torch.Tensor, torch.Tensor]]],
    flush_every: int = 64,
    on_image: Optional[Callable[[int], None]] = None,
) -> str:
    """Write (or finish) one shard; ``"complete"`` if it was complete already, else ``"written"``.

    Args:
        plan: :func:`build_shard_plan`'s entries of this shard.
        encode_items: ``encode_items(start)`` yields ``(plan entry, global [d], dense [d, h, w])``
            for the plan's entries from index ``start`` on, in order.
        flush_every: the arrays are flushed and the progress file rewritten every this many
            images: a killed run resumes from the last flush.
        on_image: called after each image with the number of images done (progress bar).
    """
    stem = shard_stem(directory, shard_id, num_shards)
    index_path, progress_path = stem + ".index.json", stem + ".progress.json"
    plan_sha = _plan_sha(plan)
    if os.path.isfile(index_path):
        done = _read_json(index_path)
        check_fingerprint(done.get("fingerprint", {}), fingerprint, index_path)
        if done.get("plan_sha256") != plan_sha:
            raise ValueError(
                f"teacher-feature cache shard {index_path} holds other images than this dataset's "
                "shard: use another --output folder or delete the shard's files"
            )
        return "complete"
    d = fingerprint["embed_dim"]
    cells = sum(e["grid"][0] * e["grid"][1] for e in plan)
    dense_path, global_path = stem + ".dense.npy", stem + ".global.npy"
    start = 0
    if os.path.isfile(progress_path):
        state = _read_json(progress_path)
        check_fingerprint(state.get("fingerprint", {}), fingerprint, progress_path)
        if state.get("plan_sha256") != plan_sha:
            raise ValueError(
                f"teacher-feature cache progress file {progress_path} belongs to another dataset "
                "shard: use another --output folder or delete the shard's files"
            )
        start = int(state["done"])
    if start > 0 and os.path.isfile(dense_path) and os.path.isfile(global_path):
        dense = np.load(dense_path, mmap_mode="r+")
        glob = np.load(global_path, mmap_mode="r+")
        if dense.shape != (cells, d) or glob.shape != (len(plan), d):
            raise ValueError(f"teacher-feature cache shard {dense_path} has the wrong shape")
        logger.info("shard %d: resuming after %d of %d images", shard_id, start, len(plan))
    else:
        start = 0
        os.makedirs(directory, exist_ok=True)
        dense = np.lib.format.open_memmap(dense_path, "w+", STORAGE_DTYPE, (max(cells, 1), d))
        glob = np.lib.format.open_memmap(global_path, "w+", STORAGE_DTYPE, (max(len(plan), 1), d))

    def commit(done: int) -> None:
        dense.flush()
        glob.flush()
        _atomic_json(
            progress_path, {"fingerprint": fingerprint, "plan_sha256": plan_sha, "done": done}
        )

    done = start
    for entry, g, dmap in encode_items(start):
        if entry is not plan[done] and entry != plan[done]:
            raise RuntimeError(f"encoder out of order at image {done} of shard {shard_id}")
        h, w = entry["grid"]
        if tuple(dmap.shape) != (d, h, w) or tuple(g.shape) != (d,):
            raise ValueError(
                f"{entry['file_name']}: teacher outputs {tuple(g.shape)}, {tuple(dmap.shape)}; "
                f"expected ({d},), ({d}, {h}, {w})"
            )
        off = entry["offset"]
        dense[off : off + h * w] = dmap.permute(1, 2, 0).reshape(h * w, d).cpu().numpy()
        glob[entry["row"]] = g.cpu().numpy()
        done += 1
        if done % flush_every == 0:
            commit(done)
        if on_image is not None:
            on_image(done)
    if done != len(plan):
        raise RuntimeError(f"shard {shard_id}: {done} of {len(plan)} images encoded")
    commit(done)
    del dense, glob
    _atomic_json(
        index_path,
        {"fingerprint": fingerprint, "plan_sha256": plan_sha, "images": list(plan)},
    )
    os.remove(progress_path)
    return "written"


def merge_shard_indexes(directory: str, num_shards: int) -> Optional[str]:
    """Write ``index.json`` once every shard is complete; its path, or ``None`` (shards left)."""
    parts = [shard_stem(directory, i, num_shards) + ".index.json" for i in range(num_shards)]
    if not all(os.path.isfile(p) for p in parts):
        return None
    images, fingerprint = {}, None
    for shard, path in enumerate(parts):
        data = _read_json(path)
        if fingerprint is None:
            fingerprint = data["fingerprint"]
        check_fingerprint(data["fingerprint"], fingerprint, path)
        for e in data["images"]:
            # [shard, row, cell offset, grid h, grid w, image height, image width]
            images[e["file_name"]] = [shard, e["row"], e["offset"], *e["grid"], *e["image_size"]]
    out = os.path.join(directory, INDEX_FILE)
    _atomic_json(out, {"fingerprint": fingerprint, "num_shards": num_shards, "images": images})
    return out


# ------------------------------------------------------------------------------- reading
class TeacherFeatureCache:
    """A finished cache folder, checked against a config's fingerprint; shards are opened
    memory-mapped on first use in each process (data-loader workers included)."""

    def __init__(self, directory: str, expected_fingerprint: Optional[Dict] = None) -> None:
        self.directory = directory
        self.index_path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(self.index_path):
            raise FileNotFoundError(
                f"teacher-feature cache index {self.index_path} not found "
                "(MODEL.C2S.DISTILL.TEACHER_CACHE): build or finish it with "
                "tools/cache_teacher_features.py"
            )
        data = _read_json(self.index_path)
        self.fingerprint = data.get("fingerprint", {})
        if expected_fingerprint is not None:
            check_fingerprint(self.fingerprint, expected_fingerprint, self.index_path)
        self.num_shards = int(data["num_shards"])
        self.images = data["images"]
        self._arrays: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> Dict:  # workers reopen the memory maps
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def _shard(self, shard: int) -> Tuple[np.ndarray, np.ndarray]:
        if shard not in self._arrays:
            stem = shard_stem(self.directory, shard, self.num_shards)
            self._arrays[shard] = (
                np.load(stem + ".dense.npy", mmap_mode="r"),
                np.load(stem + ".global.npy", mmap_mode="r"),
            )
        return self._arrays[shard]

    def read(self, file_name: str) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
        """(dense [d, h, w] float16, global [d] float16, cached image (height, width))."""
        e = self.images.get(file_name)
        if e is None:
            raise KeyError(
                f"image {file_name} is not in the teacher-feature cache {self.index_path}: "
                "rebuild the cache for this training set"
            )
        shard, row, offset, h, w, height, width = e
        dense, glob = self._shard(shard)
        d = dense.shape[1]
        cells = np.array(dense[offset : offset + h * w])  # a copy: the map stays read-only
        dmap = torch.from_numpy(cells).reshape(h, w, d).permute(2, 0, 1).contiguous()
        return dmap, torch.from_numpy(np.array(glob[row])), (height, width)

    def lookup(self, file_name: str, transforms, image_hw: Sequence[int]) -> Dict:
        """The mapper's ``teacher_cache`` entry of an image augmented by ``transforms``.

        Args:
            image_hw: size of the image as read, before augmentation (checked against the cache).
        Returns:
            ``dense`` [d, h0, w0] float16, ``global`` [d] float16, ``to_source`` [2, 3] float64
            (augmented-image pixels -> ``grid_sample`` coordinates of the cached map).
        """
        dense, glob, cached_hw = self.read(file_name)
        if tuple(cached_hw) != tuple(int(s) for s in image_hw):
            raise ValueError(
                f"image {file_name} is {image_hw[1]}x{image_hw[0]}, the teacher-feature cache "
                f"{self.index_path} has it as {cached_hw[1]}x{cached_hw[0]}: rebuild the cache"
            )
        return {"dense": dense, "global": glob, "to_source": source_affine(transforms, cached_hw)}


def open_teacher_cache_from_cfg(cfg) -> Optional[TeacherFeatureCache]:
    """The cache of ``MODEL.C2S.DISTILL.TEACHER_CACHE`` checked against ``cfg`` (None: unset or
    distillation off)."""
    d = cfg.MODEL.C2S.DISTILL
    if not d.ENABLED or not d.TEACHER_CACHE:
        return None
    return TeacherFeatureCache(d.TEACHER_CACHE, cache_fingerprint(cfg))
