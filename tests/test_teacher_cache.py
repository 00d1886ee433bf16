"""The teacher-feature cache (c2s_d2/data/teacher_cache.py, tools/cache_teacher_features.py):
writing for a tiny dataset, resuming after a kill, sharding, the geometry of cached maps under
the mapper's resize / crop / flip, training from the cache without the teacher, refusals."""

import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from PIL import Image

from c2s_d2 import add_c2s_config
from c2s_d2.data import C2SSemanticDatasetMapper
from c2s_d2.data.teacher_cache import (
    INDEX_FILE,
    TeacherFeatureCache,
    cache_fingerprint,
    cached_teacher_outputs,
    reference_input_size,
    shard_stem,
)
from c2s_d2.engine.train_loader import build_resumable_train_loader
from c2s_d2.modeling.clip.teacher import ClipTeacher, build_teacher_from_cfg, teacher_input_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "c2s_teacher_cache_test_train"
SIZES = [(64, 96), (80, 64), (64, 64), (72, 96)]  # (height, width) of the fixture images
PATCH = 8  # C2S-Tiny-Text32

_spec = importlib.util.spec_from_file_location(
    "cache_teacher_features", os.path.join(ROOT, "tools", "cache_teacher_features.py")
)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_data")
    g = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate(SIZES):
        image = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.full((h, w), 255, dtype=np.uint8)
        label[: h // 2] = i % 3
        label[h // 2 :, : w // 2] = (i + 1) % 3
        Image.fromarray(image).save(root / f"img{i}.png")
        Image.fromarray(label).save(root / f"lbl{i}.png")
        records.append(
            {"file_name": str(root / f"img{i}.png"), "sem_seg_file_name": str(root / f"lbl{i}.png")}
        )
    if DATASET not in DatasetCatalog.list():
        DatasetCatalog.register(DATASET, lambda: [dict(r) for r in records])
        MetadataCatalog.get(DATASET).set(stuff_classes=["grass", "water", "sky"], ignore_label=255)
    return records


def make_cfg(*extra):
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/miniworld/c2s_full_R18.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.CLIP.PRETRAINED", "",
            "MODEL.C2S.DEC_LAYERS", "2",
            "MODEL.C2S.NUM_OBJECT_QUERIES", "8",
            "MODEL.C2S.HIDDEN_DIM", "64",
            "MODEL.C2S.PIXEL_DECODER.CONV_DIM", "64",
            "MODEL.C2S.PIXEL_DECODER.MASK_DIM", "64",
            "MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE", "64",
            "MODEL.C2S.DISTILL.PSEUDO_MASK.MIN_AREA", "2",
            "MODEL.C2S.DISTILL.LATENT.VOCABULARY", "",
            "DATASETS.TRAIN", f"('{DATASET}',)",
            "DATASETS.TEST", "()",
            "INPUT.MIN_SIZE_TRAIN", "(64, 80)",
            "INPUT.MAX_SIZE_TRAIN", "256",
            "INPUT.CROP.SIZE", "(64, 64)",
            "SOLVER.IMS_PER_BATCH", "2",
            "DATALOADER.NUM_WORKERS", "0",
            *extra,
        ]
    )  # fmt: skip
    return cfg


def cfg_args(cfg_file, output, *extra):
    return tool.parse_args(
        ["--config-file", cfg_file, "--output", str(output), "--num-workers", "0", *extra]
    )


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory, dataset):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(make_cfg().dump())
    return str(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, cfg_file):
    out = tmp_path_factory.mktemp("cache") / "c"
    summary = tool.run(cfg_args(cfg_file, out, "--flush-every", "3"))
    assert summary["status"] == "written" and summary["index"]
    return out


def read_array(directory, shard, shards, kind):
    return np.load(shard_stem(str(directory), shard, shards) + f".{kind}.npy")


# ------------------------------------------------------------------------------ writing
def test_cache_holds_the_teachers_whole_image_outputs(cache_dir, dataset, capsys):
    cfg = make_cfg()
    fp = cache_fingerprint(cfg)
    # the reference scale: R = crop short side 64, T = 64 -> the whole image at short side 64
    assert reference_input_size(fp, 64, 96) == (64, 96)
    assert reference_input_size(fp, 80, 64) == (80, 64)
    cache = TeacherFeatureCache(str(cache_dir), fp)
    assert len(cache.images) == len(SIZES)
    teacher = build_teacher_from_cfg(cfg)
    for r, (h, w) in zip(dataset, SIZES):
        dense, glob, hw = cache.read(r["file_name"])
        assert hw == (h, w) and dense.dtype == torch.float16
        image = torch.from_numpy(np.array(Image.open(r["file_name"]))).permute(2, 0, 1)[None]
        size = reference_input_size(fp, h, w)  # 72x96 -> 64x85.3 -> 64x88
        g_ref, d_ref = teacher(image.float(), size=size)
        assert dense.shape == (64, size[0] // PATCH, size[1] // PATCH)
        # float16 storage of unit vectors: half a unit in the last place, 2^-11 ~ 4.9e-4
        assert (dense.float() - d_ref[0]).abs().max() < 1e-3
        assert (glob.float() - g_ref[0]).abs().max() < 1e-3


def test_size_estimate_is_printed_first(cfg_file, tmp_path, capsys):
    summary = tool.run(cfg_args(cfg_file, tmp_path / "dry", "--dry-run"))
    out = capsys.readouterr().out
    # 8x12 + 10x8 + 8x8 + 8x11 cells (72x96 is cached at 64x88) + 4 global rows, 64 dims, 2 bytes
    cells = 96 + 80 + 64 + 88
    assert summary["bytes"] == (cells + 4) * 64 * 2
    assert f"{(cells + 4) * 64 * 2 / 1024:.1f} KiB for the shard" in out
    assert "per image on average" in out and not (tmp_path / "dry").exists()


def test_resume_after_a_kill_and_skip_when_complete(cache_dir, cfg_file, tmp_path):
    teacher = build_teacher_from_cfg(make_cfg())
    calls = []

    def factory(limit):
        def make(plan):
            encode = tool.teacher_encoder(teacher, plan, "cpu", 0)

            def items(start):
                for n, item in enumerate(encode(start)):
                    if n == limit:
                        raise KeyboardInterrupt("simulated kill")
                    calls.append(item[0]["file_name"])
                    yield item

            return items

        return make

    out = tmp_path / "resumed"
    args = cfg_args(cfg_file, out, "--flush-every", "2")
    with pytest.raises(KeyboardInterrupt):
        tool.run(args, encoder_factory=factory(3))  # killed during the 4th image
    assert not (out / INDEX_FILE).exists() and len(calls) == 3
    calls.clear()
    summary = tool.run(args, encoder_factory=factory(None))
    # the last flush was after 2 images: images 3 and 4 are encoded again, not 1 and 2
    assert calls == [r["file_name"] for r in summary["plan"][2:]]
    for kind in ("dense", "global"):
        assert np.array_equal(read_array(out, 0, 1, kind), read_array(cache_dir, 0, 1, kind))
    calls.clear()
    assert tool.run(args, encoder_factory=factory(None))["status"] == "complete"
    assert calls == []  # a complete shard is skipped


def test_shards_merge_into_one_index(cache_dir, cfg_file, tmp_path):
    out = tmp_path / "sharded"
    first = tool.run(cfg_args(cfg_file, out, "--shards", "2", "--shard-id", "1"))
    assert first["index"] is None and len(first["plan"]) == 2
    second = tool.run(cfg_args(cfg_file, out, "--shards", "2", "--shard-id", "0"))
    assert second["index"]
    sharded, single = TeacherFeatureCache(str(out)), TeacherFeatureCache(str(cache_dir))
    assert set(sharded.images) == set(single.images)
    for name in single.images:
        a, b = sharded.read(name), single.read(name)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------ geometry
def _cell_local_teacher(image, size, weight):
    """A teacher whose cell embedding depends on that cell's pixels only (mean colour through a
    fixed linear map): its map of a flipped / cropped image is the flipped / cropped map."""
    x = image.float()[None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    cells = F.avg_pool2d(x, PATCH)[0]  # [3, h, w]
    return torch.einsum("dc,chw->dhw", weight, cells / 255.0) + weight[:, :1, None]


def _cache_with(tmp_path, image, weight):
    """A one-image cache written by the cell-local teacher; (cache, file name)."""
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    records = [{"file_name": str(path), "height": image.shape[0], "width": image.shape[1]}]
    from c2s_d2.data.teacher_cache import build_shard_plan, merge_shard_indexes, write_shard

    fp = cache_fingerprint(make_cfg())
    plan = build_shard_plan(records, 0, 1, fp)

    def items(start):
        for e in plan[start:]:
            src = torch.from_numpy(image).permute(2, 0, 1)
            dense = _cell_local_teacher(src, e["input_size"], weight)
            yield e, dense.mean(dim=(1, 2)), dense

    write_shard(str(tmp_path / "cache"), 0, 1, plan, fp, items)
    merge_shard_indexes(str(tmp_path / "cache"), 1)
    return TeacherFeatureCache(str(tmp_path / "cache"), fp), str(path)


def _compare(cache, name, image, transforms, weight):
    """(cached map through the transforms, the teacher's map of the transformed image)."""
    out = transforms.apply_image(image)
    canvas = out.shape[:2]
    size = teacher_input_size(*canvas, PATCH, 64)
    entry = cache.lookup(name, transforms, image.shape[:2])
    inputs = [{"teacher_cache": entry}]
    _, cached = cached_teacher_outputs(inputs, canvas, (size[0] // 8, size[1] // 8), "cpu")
    online = _cell_local_teacher(torch.from_numpy(out.copy()).permute(2, 0, 1), size, weight)
    # the cache stores float16; the resampler normalises
    return cached[0], F.normalize(online.half().float(), dim=0)


WEIGHT = torch.randn(64, 3, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "steps",
    [
        [T.ResizeTransform(64, 96, 64, 96), T.HFlipTransform(96)],
        [T.ResizeTransform(64, 96, 64, 96), T.VFlipTransform(64)],
        [T.ResizeTransform(64, 96, 64, 96), T.CropTransform(16, 0, 64, 64), T.HFlipTransform(64)],
        [T.CropTransform(24, 0, 64, 64), T.VFlipTransform(64), T.HFlipTransform(64)],
    ],
)
def test_flips_and_cell_aligned_crops_are_exact(tmp_path, steps):
    """At the reference scale, flips and crops on cell boundaries move whole cells: the cached
    map through the mapper's transforms equals the teacher's map of the transformed image up
    to float rounding (bilinear weights 1 and 0 at cell centres)."""
    image = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # noise
    cache, name = _cache_with(tmp_path, image, WEIGHT)
    cached, online = _compare(cache, name, image, T.TransformList(steps), WEIGHT)
    assert cached.shape == online.shape
    assert (cached - online).abs().max() < 1e-5
    # not vacuous: without the last flip the maps differ
    unflipped, _ = _compare(cache, name, image, T.TransformList(steps[:-1]), WEIGHT)
    assert unflipped.shape == online.shape and (unflipped - online).abs().max() > 1e-2


def test_rescaled_unaligned_crop_within_interpolation_tolerance(tmp_path):
    """Resize x1.25, a crop off the cell grid, a flip: the cached cells no longer coincide with
    the teacher's, so the map is resampled. On a smooth image (a colour ramp) a cell-local
    teacher's map is linear in position, which bilinear resampling reproduces exactly; what
    remains is float16 storage (~5e-4 on unit vectors) and uint8 rounding of the resized ramp:
    measured 3e-4 on interior cells (border cells are clamped, not extrapolated), bound 1e-3.
    Misplacing the crop by one pixel of the resized image costs 1.7e-3 (measured), so the bound
    checks the geometry to the pixel."""
    ys, xs = np.mgrid[0:64, 0:96]
    image = np.stack([xs * 2.5, ys * 3.5, 255 - xs * 1.5], -1).clip(0, 255).astype(np.uint8)
    cache, name = _cache_with(tmp_path, image, WEIGHT)
    steps = [
        T.ResizeTransform(64, 96, 80, 120),
        T.CropTransform(13, 5, 64, 64),
        T.HFlipTransform(64),
    ]
    cached, online = _compare(cache, name, image, T.TransformList(steps), WEIGHT)
    interior = (slice(None), slice(1, -1), slice(1, -1))
    assert (cached - online)[interior].abs().max() < 1e-3
    shifted = [steps[0], T.CropTransform(14, 5, 64, 64), steps[2]]
    wrong, _ = _compare(cache, name, image, T.TransformList(shifted), WEIGHT)
    assert (wrong - online)[interior].abs().max() > 1e-3


def test_identity_at_reference_scale_equals_the_online_teacher(cache_dir, dataset):
    """Real tiny teacher: an image kept whole at the reference scale gets the online teacher's
    outputs from the cache (float16 rounding only)."""
    cfg = make_cfg()
    cache = TeacherFeatureCache(str(cache_dir), cache_fingerprint(cfg))
    teacher = build_teacher_from_cfg(cfg)
    r, (h, w) = dataset[0], SIZES[0]
    image = np.array(Image.open(r["file_name"]))
    transforms = T.TransformList([T.ResizeTransform(h, w, h, w), T.NoOpTransform()])
    entry = cache.lookup(r["file_name"], transforms, (h, w))
    g, dense = cached_teacher_outputs([{"teacher_cache": entry}], (h, w), (h // 8, w // 8), "cpu")
    g_ref, d_ref = teacher(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    assert (dense - d_ref).abs().max() < 2e-3 and (g - g_ref).abs().max() < 2e-3


# ------------------------------------------------------------------------------ training
def test_two_training_steps_from_the_cache_never_run_the_teacher(cache_dir, monkeypatch):
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the CLIP teacher ran although the cache is set")

    monkeypatch.setattr(ClipTeacher, "forward", forbidden)
    monkeypatch.setattr(ClipTeacher, "__init__", forbidden)
    pooled = []  # masks per call of region_embeddings
    pool = ClipTeacher.region_embeddings

    def counting(dense, masks):
        pooled.append([int(m.shape[0]) for m in masks])
        return pool(dense, masks)

    monkeypatch.setattr(ClipTeacher, "region_embeddings", staticmethod(counting))
    cfg = make_cfg("MODEL.C2S.DISTILL.TEACHER_CACHE", str(cache_dir))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    # set-up builds the (empty) latent vocabulary, not the teacher
    assert set(model.distiller.prepare("cpu")) == {"vocabulary_text_s"}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = iter(build_resumable_train_loader(cfg, C2SSemanticDatasetMapper(cfg, True)))
    for _ in range(2):
        batch = next(loader)
        assert all(x["teacher_cache"]["dense"].shape[0] == 64 for x in batch)
        pooled.clear()
        losses = model(batch)
        assert {"loss_global_distill", "loss_local_distill", "loss_ce"} <= set(losses)
        # one pooling of the pseudo-masks, one of all ground-truth segments (shared by the seen
        # filter and the local pairs; the local pairs used to pool the matched ones again)
        n_gt = [len(x["instances"]) for x in batch]
        assert len(pooled) == 2 and pooled[0] == n_gt
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert calls == [] and model.distiller._teacher is None


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "override, key",
    [
        (["MODEL.CLIP.RANDOM_INIT_SEED", "1"], "weights"),
        (["MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE", "96"], "teacher_input_size"),
        (["INPUT.CROP.SIZE", "(48, 48)"], "reference_short_side"),
    ],
)
def test_a_cache_of_another_teacher_or_setting_is_refused(cache_dir, override, key):
    cfg = make_cfg("MODEL.C2S.DISTILL.TEACHER_CACHE", str(cache_dir), *override)
    with pytest.raises(ValueError) as err:
        C2SSemanticDatasetMapper(cfg, True)
    message = str(err.value)
    assert "\n" not in message
    assert f"{os.path.join(str(cache_dir), INDEX_FILE)} was built for another teacher" in message
    assert f"{key} is" in message


def test_missing_or_incomplete_cache_is_refused(cache_dir, tmp_path, dataset):
    cfg = make_cfg("MODEL.C2S.DISTILL.TEACHER_CACHE", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="index .*none/index.json not found"):
        C2SSemanticDatasetMapper(cfg, True)
    partial = tmp_path / "partial"
    shutil.copytree(cache_dir, partial)
    cache = TeacherFeatureCache(str(partial))
    del cache.images[dataset[1]["file_name"]]
    with pytest.raises(KeyError, match="img1.png is not in the teacher-feature cache"):
        cache.lookup(dataset[1]["file_name"], [], SIZES[1])
    with pytest.raises(ValueError, match="img0.png is 64x80, the teacher-feature cache"):
        cache.lookup(dataset[0]["file_name"], [], (80, 64))
    with pytest.raises(ValueError, match="augmentation RotationTransform is not supported"):
        cache.lookup(dataset[0]["file_name"], [T.RotationTransform(64, 96, 10)], SIZES[0])
