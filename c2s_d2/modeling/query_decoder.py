"""Transformer query decoder with N object queries and G global (CLS) queries.

Object queries follow masked attention (each query attends to the pixels of its previous mask,
cycling over three memory scales, with deep supervision); CLS queries attend to all pixels and
condense the image for global distillation. Object queries never attend to CLS queries, so
dropping the CLS queries at inference changes no object output and costs nothing.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn

C2S_TRANSFORMER_DECODER_REGISTRY = Registry("C2S_TRANSFORMER_DECODER")
C2S_TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Query decoders of c2s-d2: ``forward(multi_scale, mask_features, num_global)`` returns a dict with
``pred_masks`` [B, N, h, w], ``query_embeds`` [B, N, C], ``aux_outputs`` and, when
``num_global > 0``, ``global_embeds`` [B, G, C].
"""


def build_query_decoder(
    cfg, in_channels: int, mask_dim: int, num_global_queries: Optional[int] = None
) -> nn.Module:
    """The decoder named by ``MODEL.C2S.TRANSFORMER_DECODER.NAME``.

    ``num_global_queries`` (default: ``MODEL.C2S.NUM_GLOBAL_QUERIES``) is how many CLS queries to
    build: the model passes 0 when nothing would train them (global distillation off).
    """
    name = cfg.MODEL.C2S.TRANSFORMER_DECODER.NAME
    extra = {} if num_global_queries is None else {"num_global_queries": num_global_queries}
    return C2S_TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_dim, **extra)


def sine_position_encoding(x: torch.Tensor, num_feats: int) -> torch.Tensor:
    """2-D sine/cosine position encoding [B, 2*num_feats, H, W] for a feature map ``x``."""
    b, _, h, w = x.shape
    y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w)
    x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None, :].expand(h, w)
    scale = 2 * math.pi
    y_embed = y_embed / (h + 1e-6) * scale
    x_embed = x_embed / (w + 1e-6) * scale
    dim_t = torch.arange(num_feats, device=x.device, dtype=torch.float32)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    px = x_embed[..., None] / dim_t
    py = y_embed[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=3).flatten(2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=3).flatten(2)
    pos = torch.cat((py, px), dim=2).permute(2, 0, 1)
    return pos[None].expand(b, -1, -1, -1).to(x.dtype)


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DecoderLayer(nn.Module):
    """Cross-attention -> self-attention -> FFN, post-norm (or pre-norm)."""

    def __init__(self, dim: int, nheads: int, dim_ff: int, pre_norm: bool):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, nheads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, nheads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim_ff), nn.ReLU(), nn.Linear(dim_ff, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.pre_norm = pre_norm

    def _block(self, i: int, x: torch.Tensor, fn) -> torch.Tensor:
        if self.pre_norm:
            return x + fn(self.norms[i](x))
        return self.norms[i](x + fn(x))

    def forward(
        self,
        q: torch.Tensor,
        q_pos: torch.Tensor,
        memory: torch.Tensor,
        mem_pos: torch.Tensor,
        cross_mask: Optional[torch.Tensor],
        self_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        q = self._block(
            0,
            q,
            lambda x: self.cross_attn(
                x + q_pos, memory + mem_pos, memory, attn_mask=cross_mask, need_weights=False
            )[0],
        )
        q = self._block(
            1,
            q,
            lambda x: self.self_attn(
                x + q_pos, x + q_pos, x, attn_mask=self_mask, need_weights=False
            )[0],
        )
        return self._block(2, q, self.ffn)


@C2S_TRANSFORMER_DECODER_REGISTRY.register()
class C2SQueryDecoder(nn.Module):
    """Masked-attention query decoder over three memory scales, with optional CLS queries."""

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_dim: int,
        *,
        hidden_dim: int,
        num_object_queries: int,
        num_global_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        enforce_input_proj: bool,
        deep_supervision: bool,
    ):
        """
        Args:
            in_channels: channels of the multi-scale memory.
            mask_dim: channels of the mask features (the mask embeddings' size).
            hidden_dim: query width.
            num_object_queries: N.
            num_global_queries: G (CLS queries; 0 builds none).
            nheads, dim_feedforward, dec_layers, pre_norm: transformer shape.
            enforce_input_proj: project the memory even when its width equals ``hidden_dim``.
            deep_supervision: return predictions of every layer in ``aux_outputs``.
        """
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"MODEL.C2S.DEC_LAYERS must be >= 1, got {dec_layers}")
        self.num_levels = 3
        self.nheads = nheads
        self.num_object_queries = num_object_queries
        self.num_global_queries = num_global_queries
        self.deep_supervision = deep_supervision
        self.object_feat = nn.Embedding(num_object_queries, hidden_dim)
        self.object_pos = nn.Embedding(num_object_queries, hidden_dim)
        if num_global_queries > 0:
            self.global_feat = nn.Embedding(num_global_queries, hidden_dim)
            self.global_pos = nn.Embedding(num_global_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_levels, hidden_dim)
        # layer i reads memory level i % 3: with fewer than 3 layers the last levels are never
        # read, and projections built for them would get no gradient (an error under DDP)
        self.input_proj = nn.ModuleList(
            (
                nn.Conv2d(in_channels, hidden_dim, 1)
                if in_channels != hidden_dim or enforce_input_proj
                else nn.Identity()
            )
            for _ in range(min(dec_layers, self.num_levels))
        )
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, nheads, dim_feedforward, pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_dim: int) -> Dict:
        c = cfg.MODEL.C2S
        return {
            "in_channels": in_channels,
            "mask_dim": mask_dim,
            "hidden_dim": c.HIDDEN_DIM,
            "num_object_queries": c.NUM_OBJECT_QUERIES,
            "num_global_queries": c.NUM_GLOBAL_QUERIES,
            "nheads": c.NHEADS,
            "dim_feedforward": c.DIM_FEEDFORWARD,
            "dec_layers": c.DEC_LAYERS,
            "pre_norm": c.PRE_NORM,
            "enforce_input_proj": c.ENFORCE_INPUT_PROJ,
            "deep_supervision": c.DEEP_SUPERVISION,
        }

    def _predict(self, q: torch.Tensor, mask_features: torch.Tensor, attn_size):
        """Masks and the attention mask (for the next layer) from object queries ``q``."""
        q = self.decoder_norm(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        small = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        # True = blocked: attend only where the previous mask is > 0.5; empty masks see everything.
        blocked = small.sigmoid().flatten(2) < 0.5
        # (not an in-place masked assignment: the ONNX exporter mis-broadcasts that one)
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return q, masks, blocked.detach()

    def forward(
        self, multi_scale: List[torch.Tensor], mask_features: torch.Tensor, num_global: int = 0
    ) -> Dict[str, torch.Tensor]:
        if num_global > self.num_global_queries:
            raise ValueError(f"asked for {num_global} CLS queries, built {self.num_global_queries}")
        b = mask_features.shape[0]
        memories, mem_pos, sizes = [], [], []
        for lvl, feat in enumerate(multi_scale[: self.num_levels]):
            sizes.append(feat.shape[-2:])
            if lvl >= len(self.input_proj):
                continue  # a level no layer reads (fewer than 3 layers): only its size is used
            pos = sine_position_encoding(feat, self.object_feat.embedding_dim // 2)
            mem = self.input_proj[lvl](feat) + self.level_embed.weight[lvl][None, :, None, None]
            memories.append(mem.flatten(2).transpose(1, 2))
            mem_pos.append(pos.flatten(2).transpose(1, 2))

        n, g = self.num_object_queries, num_global
        q = self.object_feat.weight[None].expand(b, -1, -1)
        q_pos = self.object_pos.weight[None].expand(b, -1, -1)
        if g > 0:
            q = torch.cat([q, self.global_feat.weight[None, :g].expand(b, -1, -1)], dim=1)
            q_pos = torch.cat([q_pos, self.global_pos.weight[None, :g].expand(b, -1, -1)], dim=1)
            # object rows may not look at CLS columns: CLS queries never change object outputs
            self_mask = torch.zeros(n + g, n + g, dtype=torch.bool, device=q.device)
            self_mask[:n, n:] = True
        else:
            self_mask = None

        predictions = []
        obj, masks, blocked = self._predict(q[:, :n], mask_features, sizes[0])
        predictions.append({"pred_masks": masks, "query_embeds": obj})
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            cross = blocked
            if g > 0:
                free = torch.zeros(b, g, cross.shape[-1], dtype=torch.bool, device=cross.device)
                cross = torch.cat([cross, free], dim=1)
            cross = cross.repeat_interleave(self.nheads, dim=0)
            q = layer(q, q_pos, memories[lvl], mem_pos[lvl], cross, self_mask)
            next_size = sizes[(i + 1) % self.num_levels]
            obj, masks, blocked = self._predict(q[:, :n], mask_features, next_size)
            predictions.append({"pred_masks": masks, "query_embeds": obj})

        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1] if self.deep_supervision else []
        if g > 0:
            out["global_embeds"] = self.decoder_norm(q[:, n:])
        return out
