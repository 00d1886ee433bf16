"""Tests of the frozen CLIP teacher on the tiny C2S-Tiny ViT (64x64 pretraining size, patch 8)."""

import json

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from c2s_d2.config import add_c2s_config
from c2s_d2.modeling.clip.loader import MODEL_CONFIG_DIR, build_open_clip, register_model_configs
from c2s_d2.modeling.clip.teacher import (
    ClipTeacher,
    build_teacher_from_cfg,
    interpolate_positional_embedding,
    teacher_input_size,
)

TINY = "C2S-Tiny"


@pytest.fixture(scope="module")
def clip_model():
    return build_open_clip(TINY, "", random_init_seed=0)


@pytest.fixture(scope="module")
def teacher(clip_model):
    return ClipTeacher(clip_model)


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 255.0


def _clip_normalise(images, clip_model):
    mean = torch.tensor(clip_model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(clip_model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    return (images / 255.0 - mean) / std


@pytest.mark.parametrize("h, w", [(64, 64), (96, 128), (128, 128)])
def test_dense_shapes_for_several_sizes(teacher, h, w):
    global_emb, dense = teacher(_images(2, h, w))
    assert global_emb.shape == (2, 64)
    assert dense.shape == (2, 64, h // 8, w // 8)
    assert torch.allclose(dense.norm(dim=1), torch.ones(2, h // 8, w // 8), atol=1e-5)
    assert torch.allclose(global_emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_input_size_rounding_and_short_side():
    assert teacher_input_size(70, 90, 8) == (72, 88)
    assert teacher_input_size(96, 128, 8, short_side=64) == (64, 88)  # 85.3 -> 88
    assert teacher_input_size(3, 5, 8) == (8, 8)
    teacher = ClipTeacher(build_open_clip(TINY, ""), input_size=64)
    assert teacher.dense_embeddings(_images(1, 96, 128)).shape == (1, 64, 8, 11)
    # Sizes that are not multiples of the patch are resized, not refused.
    dense = ClipTeacher(build_open_clip(TINY, "")).dense_embeddings(_images(1, 70, 90))
    assert dense.shape[-2:] == (9, 11)


def test_global_embedding_equals_open_clip_encode_image(teacher, clip_model):
    images = _images(3, 64, 64, seed=1)
    expected = clip_model.encode_image(_clip_normalise(images, clip_model), normalize=True)
    assert torch.allclose(teacher.image_embedding(images), expected, atol=1e-5)


def _self_only_dense(clip_model, images):
    """Reference dense embeddings: the last block run with each token attending only to itself."""
    visual = clip_model.visual
    x = visual.conv1(_clip_normalise(images, clip_model))  # sizes are multiples of 8: no resize
    b, c, h, w = x.shape
    tokens = torch.cat([visual.class_embedding.expand(b, 1, c), x.flatten(2).transpose(1, 2)], 1)
    pos = interpolate_positional_embedding(visual.positional_embedding, (8, 8), (h, w))
    tokens = visual.ln_pre(tokens + pos)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        tokens = block(tokens)
    n = tokens.shape[1]
    self_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    outputs = []
    for mask in (self_only, None):  # the second is the ordinary block, for contrast
        out = blocks[-1](tokens, attn_mask=mask)[:, 1:]
        out = F.normalize(visual.ln_post(out) @ visual.proj, dim=-1)
        outputs.append(out.transpose(1, 2).reshape(b, -1, h, w))
    return outputs


def test_dense_is_last_block_with_self_only_attention(teacher, clip_model):
    """MaskCLIP value path == the last block with attention restricted to each token itself."""
    images = _images(2, 96, 128, seed=2)
    expected, ordinary = _self_only_dense(clip_model, images)
    assert torch.allclose(teacher.dense_embeddings(images), expected, atol=1e-5)
    assert not torch.allclose(ordinary, expected, atol=1e-3)  # the check is not vacuous


@pytest.mark.parametrize(
    "variant, extra",
    [
        ("AvgPool", {"pool_type": "avg"}),
        ("AvgPoolLnAfter", {"pool_type": "avg", "final_ln_after_pool": True}),
        (
            "CustomBlock",
            {
                "scale_heads": True,
                "scale_attn_inner": True,
                "scale_attn": True,
                "ls_init_value": 0.5,
            },
        ),
    ],
)
def test_other_vit_layouts(tmp_path, variant, extra):
    cfg = json.loads((MODEL_CONFIG_DIR / "C2S-Tiny.json").read_text())
    cfg["vision_cfg"].update(extra)
    path = tmp_path / f"C2S-Test-{variant}.json"
    path.write_text(json.dumps(cfg))
    (name,) = register_model_configs([str(path)])
    model = build_open_clip(name, "", random_init_seed=4)
    for p in model.visual.parameters():  # head scales / layer scales away from their init
        if p.ndim == 3 or p.shape == (64,):
            p.data.uniform_(0.5, 1.5)
    teacher = ClipTeacher(model)
    images = _images(2, 64, 96, seed=5)
    expected, _ = _self_only_dense(model, images)
    assert torch.allclose(teacher.dense_embeddings(images), expected, atol=1e-5)
    square = _images(2, 64, 64, seed=6)
    reference = model.encode_image(_clip_normalise(square, model), normalize=True)
    assert torch.allclose(teacher.image_embedding(square), reference, atol=1e-5)


def test_positional_interpolation_is_identity_at_pretraining_grid_and_bicubic_otherwise():
    pos = torch.randn(1 + 4 * 4, 5)
    assert interpolate_positional_embedding(pos, (4, 4), (4, 4)) is pos
    out = interpolate_positional_embedding(pos, (4, 4), (8, 6))
    assert out.shape == (1 + 48, 5) and torch.equal(out[0], pos[0])
    # A constant grid stays constant under bicubic interpolation.
    const = torch.cat([torch.zeros(1, 2), torch.full((16, 2), 3.0)])
    assert torch.allclose(
        interpolate_positional_embedding(const, (4, 4), (7, 9))[1:], 3.0 * torch.ones(63, 2)
    )


def test_teacher_is_frozen_and_stays_in_eval(teacher):
    parent = torch.nn.Sequential(teacher, torch.nn.Linear(2, 2))
    parent.train()
    assert parent[1].training and not teacher.training
    assert not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    images = _images(1, 64, 64).requires_grad_(True)
    global_emb, dense = teacher(images)
    assert not global_emb.requires_grad and not dense.requires_grad


def test_region_embeddings(teacher):
    dense = teacher.dense_embeddings(_images(2, 64, 64, seed=3))  # [2, 64, 8, 8]
    full = torch.ones(1, 64, 64, dtype=torch.bool)
    left = torch.zeros(1, 64, 64, dtype=torch.bool)
    left[:, :, :32] = True
    empty = torch.zeros(1, 64, 64, dtype=torch.bool)
    regions = teacher.region_embeddings(dense, [torch.cat([full, left, empty]), full[:0]])
    assert regions[0].shape == (3, 64) and regions[1].shape == (0, 64)
    assert torch.allclose(regions[0][0], F.normalize(dense[0].mean(dim=(1, 2)), dim=0), atol=1e-6)
    assert torch.allclose(regions[0][1], F.normalize(dense[0, :, :, :4].mean(dim=(1, 2)), dim=0))
    assert torch.equal(regions[0][2], torch.zeros(64))
    with pytest.raises(ValueError, match="1 mask sets for a batch of 2"):
        teacher.region_embeddings(dense, [full])


def test_region_weights_are_area_fractions():
    # Hand check: a 2x2 grid with embeddings e0..e3; a mask covering all of cell 0 and half
    # of cell 1 (4x4 mask) weighs them 1 and 0.5: mean = (e0 + 0.5 e1) / 1.5.
    dense = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])[None]  # [1,2,2,2]
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1
    mask[0, :2, 2] = 1
    (region,) = ClipTeacher.region_embeddings(dense, [mask])
    assert torch.allclose(region[0], F.normalize(torch.tensor([1.0, 0.5]), dim=0))


def test_non_vit_models_are_refused():
    with pytest.raises(TypeError, match="ViT"):
        ClipTeacher(torch.nn.Linear(2, 2))


def test_build_teacher_from_cfg():
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.MODEL.CLIP.MODEL_NAME = TINY
    cfg.MODEL.CLIP.PRETRAINED = ""
    cfg.MODEL.CLIP.MODEL_CONFIG_FILES = ["C2S-Tiny.json"]
    cfg.MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE = 96
    teacher = build_teacher_from_cfg(cfg)
    assert teacher.input_size == 96 and teacher.embed_dim == 64
    assert teacher.dense_embeddings(_images(1, 64, 128)).shape == (1, 64, 12, 24)


# ---------------------------------------------------------------------------- one-pass last block
def _two_pass_reference(teacher, images):
    """The teacher's former forward, kept as the reference: the last block ran twice, once in full
    (global output) and once with its attention replaced by the value path (dense output)."""
    v = teacher.visual
    x = teacher.preprocess(images)
    patches = v.conv1(x)
    b, c, h, w = patches.shape
    tokens = torch.cat([v.class_embedding.view(1, 1, c).expand(b, 1, c), patches.flatten(2).mT], 1)
    pos = interpolate_positional_embedding(v.positional_embedding, teacher.pretrain_grid, (h, w))
    tokens = v.ln_pre(tokens + pos)
    blocks = v.transformer.resblocks
    for block in blocks[:-1]:
        tokens = block(tokens)
    last = blocks[-1]
    final = last(tokens)
    width = tokens.shape[-1]
    attn = last.attn
    normed = last.ln_1(tokens)
    value = F.linear(normed, attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
    if isinstance(attn, torch.nn.MultiheadAttention):
        branch = attn.out_proj(value)
    else:
        if attn.head_scale is not None:
            heads = attn.num_heads
            value = value.reshape(b, -1, heads, width // heads) * attn.head_scale.view(1, 1, -1, 1)
            value = value.reshape(b, -1, width)
        branch = last.ln_attn(attn.out_proj(attn.ln_inner(value)))
    dense = tokens + last.ls_1(branch)
    dense = (dense + last.ls_2(last.mlp(last.ln_2(dense))))[:, 1:]
    if v.pool_type == "tok":
        pooled = v.ln_post(final[:, 0])
    elif v.final_ln_after_pool:
        pooled = v.ln_post(final[:, 1:].mean(dim=1))
    else:
        pooled = v.ln_post(final[:, 1:]).mean(dim=1)
    dense = F.normalize(v.ln_post(dense) @ v.proj, dim=-1).mT.reshape(b, -1, h, w)
    return F.normalize(pooled @ v.proj, dim=-1), dense


def _variant_model(tmp_path, variant, extra):
    cfg = json.loads((MODEL_CONFIG_DIR / "C2S-Tiny.json").read_text())
    cfg["vision_cfg"].update(extra)
    path = tmp_path / f"C2S-OnePass-{variant}.json"
    path.write_text(json.dumps(cfg))
    (name,) = register_model_configs([str(path)])
    model = build_open_clip(name, "", random_init_seed=7)
    for p in model.visual.parameters():  # scales and biases away from their init values
        if p.ndim == 3 or p.shape == (64,) or p.ndim == 1:
            p.data.add_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


@pytest.mark.parametrize(
    "variant, extra",
    [
        ("Default", {}),
        ("AvgPool", {"pool_type": "avg"}),
        ("CustomBlock", {"scale_heads": True, "scale_attn_inner": True, "ls_init_value": 0.5}),
        ("ScaledAttn", {"scale_heads": True, "scale_attn": True}),
    ],
)
def test_one_pass_last_block_equals_the_two_pass_reference(tmp_path, variant, extra):
    # (open_clip's scaled cosine attention fails in open_clip itself: bmm on 4-D tensors)
    model = _variant_model(tmp_path, variant, extra)
    teacher = ClipTeacher(model)
    images = _images(2, 64, 96, seed=11)
    expected_global, expected_dense = _two_pass_reference(teacher, images)
    calls = []
    mlp = model.visual.transformer.resblocks[-1].mlp
    handle = mlp.register_forward_hook(lambda *a: calls.append(1))
    global_emb, dense = teacher(images)
    handle.remove()
    assert len(calls) == 1  # the last block's MLP runs once (it ran twice before)
    assert (global_emb - expected_global).abs().max() <= 1e-5
    assert (dense - expected_dense).abs().max() <= 1e-5
    # not vacuous: the global path is not the value path
    assert not torch.allclose(global_emb, F.normalize(dense.mean(dim=(2, 3)), dim=1), atol=1e-3)


def test_teacher_dtype_setting():
    from c2s_d2.modeling.clip.teacher import resolve_teacher_dtype

    from c2s_d2.modeling.clip.teacher import cpu_has_native_bf16

    want = torch.bfloat16 if cpu_has_native_bf16() else None
    assert resolve_teacher_dtype("auto", "cpu") is want
    assert resolve_teacher_dtype("fp32", "cpu") is None
    assert resolve_teacher_dtype("BF16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="'fp16' runs on CUDA only"):
        resolve_teacher_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="TEACHER_DTYPE: 'half' is not one of"):
        resolve_teacher_dtype("half", "cpu")
    with pytest.raises(ValueError, match="TEACHER_DTYPE: 'fp8'"):
        ClipTeacher(build_open_clip(TINY, ""), dtype="fp8")


def test_bf16_teacher_on_cpu_is_close_to_fp32(clip_model):
    images = _images(2, 64, 64, seed=12)
    g32, d32 = ClipTeacher(clip_model, dtype="fp32")(images)
    g16, d16 = ClipTeacher(clip_model, dtype="bf16")(images)
    assert g16.dtype == d16.dtype == torch.float32  # outputs are float32 in every precision
    assert not torch.equal(d16, d32)  # bf16 really ran
    # unit vectors: cosine = dot product; bf16 keeps ~3 significant digits
    assert (g16 * g32).sum(-1).min() > 0.99 and (d16 * d32).sum(1).min() > 0.99


def test_bf16_on_cpu_runs_a_bf16_copy_and_stays_close_to_fp32():
    """TEACHER_DTYPE bf16 on CPU: a bfloat16 copy of the frozen tower (not autocast), kept out of
    the state dict; float32 outputs within bfloat16 noise of the float32 teacher."""
    torch.manual_seed(0)
    model = build_open_clip(TINY, "")
    fp32 = ClipTeacher(model, dtype="fp32")
    low = ClipTeacher(model, dtype="bf16")
    images = torch.rand(2, 3, 64, 80) * 255
    g32, d32 = fp32(images)
    g16, d16 = low(images)
    assert g16.dtype == d16.dtype == torch.float32
    assert low.tower("cpu").conv1.weight.dtype == torch.bfloat16
    assert low.visual.conv1.weight.dtype == torch.float32  # the module's own weights untouched
    assert set(low.state_dict()) == set(fp32.state_dict())
    assert all(v.dtype == torch.float32 for v in low.state_dict().values())
    cos_g = F.cosine_similarity(g16, g32, dim=1)
    cos_d = F.cosine_similarity(d16, d32, dim=1)
    assert cos_g.min() > 0.99 and cos_d.min() > 0.99
    assert not torch.equal(g16, g32)  # it did run in reduced precision
