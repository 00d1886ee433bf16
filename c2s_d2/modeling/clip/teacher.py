"""The frozen CLIP teacher: global, dense (MaskCLIP-style) and region embeddings.

The teacher wraps the image tower of an open_clip ViT (``open_clip.transformer.VisionTransformer``).
One forward gives both outputs:

* global embedding ``g_T``: the usual CLIP image embedding, ``proj(ln_post(CLS))`` after all
  blocks (or the token average for ``pool_type="avg"`` models);
* dense embeddings: the tokens entering the last block take its *value path only*, as in
  MaskCLIP's ViT code: with ``x`` the input of the last block,
  ``y = x + ls_1(out_proj(W_v ln_1(x) + b_v))`` (the query-key attention is skipped: each token
  "attends" to itself), ``y = y + ls_2(mlp(ln_2(y)))``, then ``proj(ln_post(y))`` per patch token.
  This equals running the last block with an attention mask that lets every token see only
  itself, which is what the tests check.

The last block runs once for both outputs (:func:`last_block_global_and_dense`): ``ln_1`` and the
q/k/v projection are computed once; the global path attends with the class-token query only
(all queries for average pooling), the dense path takes the value rows of the patch tokens, and
the rest of the block (output projection, residual, MLP) runs once on both sets of tokens
concatenated. Before, the block ran twice in full (ordinary block + value-path block).

Positional embeddings are interpolated (bicubic) when the patch grid differs from the
pretraining grid, so any input size that is a multiple of the patch size works; other sizes are
resized first. Every output is L2-normalised and float32; everything runs under
``torch.no_grad`` (not ``inference_mode``: the outputs enter losses whose backward saves them,
which inference tensors refuse), with the parameters frozen, and optionally in reduced precision
(``MODEL.C2S.DISTILL.TEACHER_DTYPE``, see :func:`resolve_teacher_dtype`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import ContextManager, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import get_model_preprocess_cfg
from open_clip.transformer import Attention, VisionTransformer
from torch import nn

from .loader import build_open_clip

logger = logging.getLogger(__name__)


def teacher_input_size(
    height: int, width: int, patch_size: int, short_side: Optional[int] = None
) -> Tuple[int, int]:
    """Size the teacher runs at: short side scaled to ``short_side`` (if given), then each side
    rounded to the nearest multiple of the patch size (at least one patch)."""
    height, width = int(height), int(width)  # traced sizes (fvcore) are tensors
    if short_side:
        scale = short_side / min(height, width)
        height, width = height * scale, width * scale
    return tuple(max(patch_size, int(round(s / patch_size)) * patch_size) for s in (height, width))


def interpolate_positional_embedding(
    pos_embed: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]
) -> torch.Tensor:
    """[1 + gh*gw, C] class + grid positional embeddings -> [1 + h*w, C] (bicubic on the grid)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls_pos, grid_pos = pos_embed[:1], pos_embed[1:]
    grid_pos = grid_pos.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=new_grid, mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, grid_pos.flatten(2)[0].T], dim=0)


TEACHER_DTYPES = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (oneDNN's check: AVX512-BF16
    or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_teacher_dtype(setting: str, device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The compute dtype of the teacher on ``device`` (``None``: plain float32).

    ``"auto"``: bfloat16 on a CUDA device that supports it, float16 on other CUDA devices; on CPU
    bfloat16 where the CPU computes it natively (AVX512-BF16 / AMX, as oneDNN reports:
    ``cpu_has_native_bf16``), float32 elsewhere. ``"fp32"``, ``"bf16"``, ``"fp16"``: that
    precision (``"fp16"`` on CPU is refused). On CUDA the teacher runs under autocast; on CPU it
    runs on a bfloat16 copy of its frozen weights instead, because CPU autocast is pathologically
    slow here (PyTorch 2.14, AMX CPU, ViT-B/16 at 448 px, batch 2, 1 thread: float32 3.6 s,
    bfloat16 weights 0.95 s, bfloat16 autocast 61 s). Outputs are float32 in every case
    (bfloat16 weights: cosine to float32 >= 0.9999 on that ViT-B/16).
    """
    setting = str(setting).lower()
    if setting not in TEACHER_DTYPES:
        raise ValueError(
            f"MODEL.C2S.DISTILL.TEACHER_DTYPE: {setting!r} is not one of {list(TEACHER_DTYPES)}"
        )
    on_cuda = torch.device(device).type == "cuda"
    if setting == "auto":
        if not on_cuda:
            return torch.bfloat16 if cpu_has_native_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if setting == "fp16" and not on_cuda:
        raise ValueError(
            "MODEL.C2S.DISTILL.TEACHER_DTYPE: 'fp16' runs on CUDA only; use 'bf16' or 'fp32' on CPU"
        )
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def _attention_parts(block: nn.Module):
    """(q/k/v weight [3C, C], bias [3C] or None, heads, Attention module or None) of a block."""
    attn = block.attn
    if isinstance(attn, nn.MultiheadAttention):  # open_clip's default ResidualAttentionBlock
        return attn.in_proj_weight, attn.in_proj_bias, attn.num_heads, None
    if isinstance(attn, Attention):  # open_clip's CustomResidualAttentionBlock
        return attn.in_proj_weight, attn.in_proj_bias, attn.num_heads, attn
    raise TypeError(f"MaskCLIP dense features do not support attention {type(attn).__name__}")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, C] -> [N, H, L, C / H]."""
    n, length, width = x.shape
    return x.reshape(n, length, heads, width // heads).transpose(1, 2)


def last_block_global_and_dense(
    block: nn.Module, x: torch.Tensor, all_queries: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The last ViT block run once for the global and the MaskCLIP dense outputs.

    Args:
        block: an open_clip ``ResidualAttentionBlock`` or ``CustomResidualAttentionBlock``.
        x: [N, 1 + L, C] tokens entering the block (class token first).
        all_queries: compute the ordinary block output for every token (average pooling);
            False: for the class token only (class-token pooling).

    Returns:
        ``(ordinary [N, Lg, C], dense [N, L, C])``: the ordinary block output of the class token
        (``Lg = 1``) or of all ``1 + L`` tokens, and the value-path output of the ``L`` patch
        tokens (query-key attention replaced by each token attending to itself).
    """
    weight, bias, heads, custom = _attention_parts(block)
    width = x.shape[-1]
    h = block.ln_1(x)  # once for both paths
    n_glob = h.shape[1] if all_queries else 1
    # one projection: q rows for the global queries, k and v rows for every token
    q = F.linear(h[:, :n_glob], weight[:width], None if bias is None else bias[:width])
    kv = F.linear(h, weight[width:], None if bias is None else bias[width:])
    k, v = kv.split(width, dim=-1)
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    if custom is not None:
        if custom.logit_scale is not None:  # open_clip 3.3 itself fails on these (4-D bmm)
            raise TypeError("the CLIP teacher does not support scaled cosine attention")
        qh, kh = custom.ln_q(qh), custom.ln_k(kh)
    attended = F.scaled_dot_product_attention(qh, kh, vh)  # [N, H, Lg, C / H]
    # the value path of the patch tokens joins the attended global tokens from here on
    mixed = torch.cat([attended, vh[:, :, 1:]], dim=2)
    if custom is not None and custom.head_scale is not None:  # per-head output scale [H, 1, 1]
        mixed = mixed * custom.head_scale
    mixed = mixed.transpose(1, 2).reshape(x.shape[0], -1, width)
    if custom is not None:
        mixed = block.ln_attn(custom.out_proj(custom.ln_inner(mixed)))
    else:
        mixed = block.attn.out_proj(mixed)
    residual = torch.cat([x[:, :n_glob], x[:, 1:]], dim=1)
    y = residual + block.ls_1(mixed)
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return y[:, :n_glob], y[:, n_glob:]


def _value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention branch of ``block`` with query-key attention replaced by identity.

    x: [N, L, C] (batch first) normalised input of the attention -> [N, L, C]. (Used with
    gradients by tools/pretrain_miniworld_clip.py; the teacher uses
    :func:`last_block_global_and_dense`.)
    """
    weight, bias, heads, custom = _attention_parts(block)
    width = x.shape[-1]
    v = F.linear(x, weight[2 * width :], None if bias is None else bias[2 * width :])
    if custom is None:
        return block.attn.out_proj(v)
    if custom.head_scale is not None:  # per-head output scale, [H, 1, 1]
        n, length = v.shape[:2]
        v = v.reshape(n, length, heads, -1) * custom.head_scale.view(1, 1, -1, 1)
        v = v.reshape(n, length, width)
    return block.ln_attn(custom.out_proj(custom.ln_inner(v)))


def _value_path_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block with its attention replaced by the value path (residuals and MLP kept)."""
    y = x + block.ls_1(_value_path(block, block.ln_1(x)))
    return y + block.ls_2(block.mlp(block.ln_2(y)))


class ClipTeacher(nn.Module):
    """Frozen CLIP image encoder giving global, dense and region embeddings (never trained).

    Args:
        clip_model: an open_clip model whose ``.visual`` is a ``VisionTransformer``; only the
            image tower is kept.
        input_size: short side the images are resized to (``None``: keep the size, rounded to a
            multiple of the patch size).
        dtype: precision setting of :func:`resolve_teacher_dtype` ("auto", "fp32", "bf16",
            "fp16"), resolved on the device of each call.
    """

    def __init__(
        self, clip_model: nn.Module, input_size: Optional[int] = None, dtype: str = "fp32"
    ) -> None:
        super().__init__()
        visual = getattr(clip_model, "visual", clip_model)
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"the CLIP teacher needs a ViT image tower for dense embeddings, got "
                f"{type(visual).__name__}"
            )
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise ValueError("the CLIP teacher supports ViTs pooled by class token or average")
        if visual.proj is None or not getattr(visual.transformer, "batch_first", True):
            raise ValueError("the CLIP teacher needs a projected, batch-first ViT image tower")
        self.visual = visual
        self.input_size = int(input_size) if input_size else None
        if str(dtype).lower() not in TEACHER_DTYPES:
            raise ValueError(
                f"MODEL.C2S.DISTILL.TEACHER_DTYPE: {dtype!r} is not one of {list(TEACHER_DTYPES)}"
            )
        self.dtype_setting = str(dtype).lower()
        self.patch_size = int(visual.patch_size[0])
        if visual.patch_size[0] != visual.patch_size[1]:
            raise ValueError(f"non-square patches {visual.patch_size} are not supported")
        self.pretrain_grid = tuple(visual.grid_size)
        self.embed_dim = int(visual.output_dim)
        preprocess = get_model_preprocess_cfg(clip_model)
        mean = torch.tensor(preprocess.get("mean", OPENAI_DATASET_MEAN), dtype=torch.float32)
        std = torch.tensor(preprocess.get("std", OPENAI_DATASET_STD), dtype=torch.float32)
        # CLIP statistics are on 0..1 images; ours arrive in 0..255.
        self.register_buffer("pixel_mean", (mean * 255.0).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", (std * 255.0).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "ClipTeacher":
        """The teacher stays in eval mode whatever its parent asks."""
        return super().train(False)

    # ---------------------------------------------------------------------------- preprocessing
    def preprocess(
        self,
        images: torch.Tensor,
        size: Optional[Tuple[int, int]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """[B, 3, H, W] RGB in 0..255 -> [B, 3, H', W'] CLIP-normalised, H', W' multiples of the
        patch size (see ``teacher_input_size``), or ``size`` when given."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher images must be [B, 3, H, W] RGB, got {tuple(images.shape)}")
        dtype = dtype or self.visual.conv1.weight.dtype
        x = images.float()  # resized and normalised in float32, then cast to the tower's dtype
        if size is None:
            size = teacher_input_size(*x.shape[-2:], self.patch_size, self.input_size)
        elif any(int(s) <= 0 or int(s) % self.patch_size for s in size):
            raise ValueError(
                f"teacher input size {tuple(size)}: not multiples of {self.patch_size}"
            )
        size = tuple(int(s) for s in size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return ((x - self.pixel_mean) / self.pixel_std).to(dtype)

    def _global_pool(self, tokens: torch.Tensor, v: Optional[nn.Module] = None) -> torch.Tensor:
        """Final tokens [B, 1 + h*w, C] ([B, 1, C]: the class token alone, for class-token
        pooling) -> [B, C] pooled and normalised as open_clip does."""
        v = self.visual if v is None else v
        if v.pool_type == "tok":
            return v.ln_post(tokens[:, 0])  # LayerNorm is per token: pool and norm commute
        if v.final_ln_after_pool:
            return v.ln_post(tokens[:, 1:].mean(dim=1))
        return v.ln_post(tokens[:, 1:]).mean(dim=1)

    # ---------------------------------------------------------------------------- embeddings
    def autocast(self, device: Union[str, torch.device]) -> ContextManager:
        """Autocast to the precision of ``dtype_setting`` on a CUDA ``device``; a no-op on CPU
        (reduced precision runs there on bfloat16 weights, see :meth:`tower`) and for float32."""
        dtype = resolve_teacher_dtype(self.dtype_setting, device)
        if dtype is None or torch.device(device).type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def tower(self, device: Union[str, torch.device]) -> nn.Module:
        """The image tower that runs on ``device``: the float32 one, or on CPU in bfloat16 a
        bfloat16 copy of it (made once, kept outside the module tree: not in ``state_dict``)."""
        dtype = resolve_teacher_dtype(self.dtype_setting, device)
        if dtype is None or torch.device(device).type == "cuda":
            return self.visual
        copy_ = self.__dict__.get("_visual_low")
        if copy_ is None or next(copy_.parameters()).device != self.visual.conv1.weight.device:
            copy_ = copy.deepcopy(self.visual).to(dtype)
            self.__dict__["_visual_low"] = copy_
        return copy_

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, size: Optional[Tuple[int, int]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] RGB 0..255 -> (global [B, d], dense [B, d, h, w]), unit norm,
        float32.

        ``h, w`` are the teacher input size (``size`` if given, else ``teacher_input_size``)
        divided by the patch size.
        """
        v = self.tower(images.device)
        with self.autocast(images.device):
            x = self.preprocess(images, size, dtype=v.conv1.weight.dtype)
            patches = v.conv1(x)  # [B, C, h, w]
            b, c, h, w = patches.shape
            cls_token = v.class_embedding.view(1, 1, c).expand(b, 1, c).to(patches.dtype)
            tokens = torch.cat([cls_token, patches.flatten(2).transpose(1, 2)], dim=1)
            pos = interpolate_positional_embedding(
                v.positional_embedding, self.pretrain_grid, (h, w)
            )
            tokens = v.ln_pre(tokens + pos.to(tokens.dtype))
            blocks = v.transformer.resblocks
            for block in blocks[:-1]:
                tokens = block(tokens)
            final, dense = last_block_global_and_dense(blocks[-1], tokens, v.pool_type != "tok")
            global_emb = self._global_pool(final, v) @ v.proj
            dense = v.ln_post(dense) @ v.proj  # [B, h*w, d]
        dense = F.normalize(dense.float(), dim=-1).transpose(1, 2).reshape(b, -1, h, w)
        return F.normalize(global_emb.float(), dim=-1), dense

    @torch.no_grad()
    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] RGB 0..255 -> global CLIP image embeddings [B, d], unit norm."""
        return self(images)[0]

    @torch.no_grad()
    def dense_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] RGB 0..255 -> MaskCLIP dense embeddings [B, d, h, w], unit norm."""
        return self(images)[1]

    @staticmethod
    @torch.no_grad()
    def region_embeddings(dense: torch.Tensor, masks: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Masked averages of dense embeddings, re-normalised.

        Args:
            dense: [B, d, h, w] dense embeddings.
            masks: B tensors [R_i, H, W] (bool or 0..1), any H, W: resized to (h, w) by area
                averaging, so a cell's weight is the fraction of it the region covers.

        Returns:
            B tensors [R_i, d], unit norm (all zeros for an empty mask).
        """
        if len(masks) != dense.shape[0]:
            raise ValueError(f"{len(masks)} mask sets for a batch of {dense.shape[0]} images")
        out = []
        for emb, m in zip(dense, masks):
            if m.ndim != 3:
                raise ValueError(f"region masks must be [R, H, W], got {tuple(m.shape)}")
            if m.shape[0] == 0:
                out.append(emb.new_zeros(0, emb.shape[0]))
                continue
            weights = F.interpolate(m[:, None].to(emb.dtype), size=emb.shape[-2:], mode="area")
            weights = weights.flatten(1)  # [R, h*w]
            sums = weights @ emb.flatten(1).T  # [R, d]
            means = sums / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
            out.append(F.normalize(means, dim=-1))
        return out


def build_teacher_from_cfg(cfg) -> ClipTeacher:
    """The teacher of ``cfg.MODEL.CLIP`` at ``cfg.MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE``, in the
    precision of ``cfg.MODEL.C2S.DISTILL.TEACHER_DTYPE``."""
    clip = cfg.MODEL.CLIP
    model = build_open_clip(
        clip.MODEL_NAME,
        clip.PRETRAINED,
        random_init_seed=clip.RANDOM_INIT_SEED,
        config_files=tuple(clip.MODEL_CONFIG_FILES),
        quick_gelu=clip.QUICK_GELU,
    )
    d = cfg.MODEL.C2S.DISTILL
    teacher = ClipTeacher(model, input_size=d.TEACHER_INPUT_SIZE, dtype=d.TEACHER_DTYPE)
    logger.info(
        "CLIP teacher %s, input short side %s, precision %s",
        clip.MODEL_NAME,
        teacher.input_size,
        teacher.dtype_setting,
    )
    return teacher
