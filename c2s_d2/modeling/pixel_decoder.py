"""Pixel decoder: a pure-PyTorch FPN producing mask features and multi-scale memory.

Registered in ``C2S_PIXEL_DECODER_REGISTRY`` so that other decoders (e.g. deformable attention)
can be plugged in by name through ``MODEL.C2S.PIXEL_DECODER.NAME``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init
from torch import nn

C2S_PIXEL_DECODER_REGISTRY = Registry("C2S_PIXEL_DECODER")
C2S_PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders of c2s-d2. A pixel decoder takes the backbone features and returns
``(mask_features [B, mask_dim, H/4, W/4], multi_scale [list of 3 tensors, coarse to fine])``.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    name = cfg.MODEL.C2S.PIXEL_DECODER.NAME
    return C2S_PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)


@C2S_PIXEL_DECODER_REGISTRY.register()
class C2SFPNPixelDecoder(nn.Module):
    """Top-down FPN over backbone levels (fine to coarse ``in_features``).

    ``multi_scale`` holds the three coarsest FPN outputs, coarse to fine (the memory the
    query decoder cycles over); ``mask_features`` is a 3x3 conv on the finest FPN output.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: str = "GN",
    ):
        """
        Args:
            input_shape: backbone feature shapes, only the features to use (fine to coarse).
            conv_dim: channels of the FPN outputs (= the query decoder's memory width).
            mask_dim: channels of the mask features.
            norm: detectron2 norm name ("GN", "BN", "" ...).
        """
        super().__init__()
        items = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in items]
        if len(self.in_features) < 3:
            raise ValueError(f"the pixel decoder needs >= 3 feature levels, got {self.in_features}")
        use_bias = norm == ""
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for _, spec in items:
            self.lateral_convs.append(
                Conv2d(spec.channels, conv_dim, 1, bias=use_bias, norm=get_norm(norm, conv_dim))
            )
            self.output_convs.append(
                Conv2d(
                    conv_dim,
                    conv_dim,
                    3,
                    padding=1,
                    bias=use_bias,
                    norm=get_norm(norm, conv_dim),
                    activation=F.relu,
                )
            )
        self.mask_features = Conv2d(conv_dim, mask_dim, 3, padding=1)
        for m in self.modules():
            if isinstance(m, Conv2d):
                weight_init.c2_xavier_fill(m)  # kaiming_uniform_(a=1), bias 0
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        p = cfg.MODEL.C2S.PIXEL_DECODER
        missing = [f for f in p.IN_FEATURES if f not in input_shape]
        if missing:
            raise KeyError(
                f"MODEL.C2S.PIXEL_DECODER.IN_FEATURES: {missing} not produced by the backbone "
                f"(it gives {sorted(input_shape)}; check MODEL.RESNETS.OUT_FEATURES)"
            )
        return {
            "input_shape": {k: input_shape[k] for k in p.IN_FEATURES},
            "conv_dim": p.CONV_DIM,
            "mask_dim": p.MASK_DIM,
            "norm": p.NORM,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        outs: List[torch.Tensor] = []
        prev = None
        # coarse to fine
        for idx in reversed(range(len(self.in_features))):
            x = self.lateral_convs[idx](features[self.in_features[idx]])
            if prev is not None:
                x = x + F.interpolate(prev, size=x.shape[-2:], mode="nearest")
            prev = self.output_convs[idx](x)
            outs.append(prev)
        return self.mask_features(outs[-1]), outs[:3]
