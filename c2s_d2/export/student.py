"""The inference student as one traceable module: image + class text embeddings -> scores.

``ExportableStudent`` wraps the parts of a trained :class:`~c2s_d2.modeling.meta_arch.C2SSegmentor`
that run at inference (backbone, pixel decoder, query decoder, text-embedding classifier) and
nothing else: no CLIP image tower, no teacher, no distillation branch, no CLS query. Its forward
is the PyTorch model's semantic inference (``C2SSegmentor.inference`` with
``INFERENCE_MODE "student"``) for one image that is already at the test resize:

1. ``image`` float32 [1, 3, H, W] holds 0..255 values in the config's ``INPUT.FORMAT`` channel
   order (``"RGB"`` or ``"BGR"``), exactly what detectron2's ``DefaultPredictor`` feeds the model
   after its ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``;
2. pixel normalisation ``(image - MODEL.PIXEL_MEAN) / MODEL.PIXEL_STD``;
3. zero padding (after normalisation, as ``ImageList.from_tensors``) on the bottom and right to
   multiples of ``MODEL.C2S.SIZE_DIVISIBILITY``;
4. the student: backbone -> pixel decoder -> query decoder (last layer's masks and query
   embeddings);
5. class logits ``exp(log_logit_scale) * [cos(e_q, t_1..t_K), cos(e_q, no_object)]`` against the
   given ``text_embeddings`` [K, d], used as given (the graph does *not* L2-normalise them: give
   unit-norm rows, as ``tools/embed_names.py`` writes and the PyTorch model uses);
6. mask logits upsampled (bilinear) to the padded size;
7. semantic inference: ``sem_seg[k] = sum_q softmax(logits_q)[k] * sigmoid(mask_q)``, the
   "no object" column dropped after the softmax, cropped to [H, W].

Output ``sem_seg`` float32 [K, H, W], the same as ``model([{"image": x}])[0]["sem_seg"]`` for an
input ``x`` already at the test resize. H, W and K are dynamic in the exported graphs.

The graph computes this with fewer operations than the PyTorch model, with the same results up
to float rounding:

* attention masks of the query decoder: ``C2SQueryDecoder`` computes every layer's masks at
  the mask-feature resolution and resizes them to the next memory size; here the mask features
  are resized to the three memory sizes once and the masks computed there (resizing is linear);
* step 7 is one [K, Q] @ [Q, H' W'] matmul on the padded size, then one crop (the output copy);
* in the ONNX export only (``torch.onnx.is_in_onnx_export()``): the stride-1 3x3 convolutions
  of a detectron2 ``ResNet`` backbone and of the ``C2SFPNPixelDecoder`` by Winograd F(4x4, 3x3)
  (:func:`winograd_conv3x3`), 2.25x fewer multiply-adds, their outputs within about 1e-5 of
  the direct convolution's range. The PyTorch forward (and so the TorchScript export and the
  exporter's self-check reference) keeps the direct convolutions.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from torch import nn

from ..modeling.pixel_decoder import C2SFPNPixelDecoder
from ..modeling.query_decoder import C2SQueryDecoder, sine_position_encoding

__all__ = ["ExportableStudent", "TextTower", "check_exportable", "winograd_conv3x3"]


def check_exportable(model: nn.Module) -> None:
    """Refuse models whose inference needs more than the student (one line naming the key)."""
    from ..modeling.meta_arch import C2SSegmentor

    if not isinstance(model, C2SSegmentor):
        raise ValueError(
            f"MODEL.META_ARCHITECTURE builds {type(model).__name__}; only C2SSegmentor students "
            "can be exported"
        )
    if model.inference_mode != "student":
        raise ValueError(
            f"MODEL.C2S.INFERENCE_MODE is {model.inference_mode!r}: that comparison runs the CLIP "
            "teacher at test time and cannot be exported; export with INFERENCE_MODE student"
        )


# Winograd F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# CVPR 2016): a 4x4 output tile of a 3x3 convolution is A^T [(G g G^T) * (B^T d B)] A for its
# 6x6 input tile d and kernel g, 36 multiplications per input channel instead of 144.
_WINO_BT = (
    (4.0, 0.0, -5.0, 0.0, 1.0, 0.0),
    (0.0, -4.0, -4.0, 1.0, 1.0, 0.0),
    (0.0, 4.0, -4.0, -1.0, 1.0, 0.0),
    (0.0, -2.0, -1.0, 2.0, 1.0, 0.0),
    (0.0, 2.0, -1.0, -2.0, 1.0, 0.0),
    (0.0, 4.0, 0.0, -5.0, 0.0, 1.0),
)
_WINO_G = (
    (1 / 4, 0.0, 0.0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0.0, 0.0, 1.0),
)
_WINO_AT = (
    (1.0, 1.0, 1.0, 1.0, 1.0, 0.0),
    (0.0, 1.0, -1.0, 2.0, -2.0, 0.0),
    (0.0, 1.0, 1.0, 4.0, 4.0, 0.0),
    (0.0, 1.0, -1.0, 8.0, -8.0, 1.0),
)


class _DepthToSpace4(torch.autograd.Function):
    """[1, 16 K, h, w] (channel (4 i + j) K + k) -> [1, K, 4 h, 4 w] (pixel (4 r + i, 4 c + j)):
    ONNX ``DepthToSpace`` (blocksize 4, ``DCR``), faster in ONNX Runtime than the equivalent
    5-D ``Transpose``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        _, c, h, w = y.shape
        y = y.reshape(1, 4, 4, c // 16, h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(1, c // 16, 4 * h, 4 * w)

    @staticmethod
    def symbolic(g, y):
        return g.op("DepthToSpace", y, blocksize_i=4, mode_s="DCR")


def winograd_eligible(conv: nn.Module) -> bool:
    """A plain 3x3 convolution (stride 1, padding 1, no dilation, one group, zero padding)."""
    return (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def winograd_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], aligned: bool
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` of a 3x3 kernel on ``x`` [1, C, H, W] by
    Winograd F(4x4, 3x3), as a graph of ops that ONNX Runtime runs fast: the input tiles'
    transform as two grouped convolutions (6-tap columns, then rows, stride 4), the 36
    products as one batched [36, K, C] @ [36, C, tiles] matmul (the kernel transform depends
    on weights only: ONNX Runtime folds it when it loads the model), the output transform as a
    [16, 36] matmul and a ``DepthToSpace``.
    2.25x fewer multiply-adds than the direct convolution; results differ from it by float
    rounding (about 1e-5 of the output's range).

    ``aligned``: H and W are known to be multiples of 4; otherwise the input is zero-padded
    to multiples of 4 and the output cropped.
    """
    k, c = int(weight.shape[0]), int(weight.shape[1])
    h, w = x.shape[-2], x.shape[-1]
    if aligned:
        xp = F.pad(x, [1, 1, 1, 1])
    else:
        xp = F.pad(x, [1, 1 + (4 - w % 4) % 4, 1, 1 + (4 - h % 4) % 4])
    h4, w4 = (xp.shape[-2] - 2) // 4, (xp.shape[-1] - 2) // 4
    bt = torch.tensor(_WINO_BT, dtype=x.dtype, device=x.device)
    g = torch.tensor(_WINO_G, dtype=weight.dtype, device=weight.device)
    at = torch.tensor(_WINO_AT, dtype=x.dtype, device=x.device)
    # B^T d B: columns (6 taps, stride 4 down), then rows; channels ordered (c, a, b)
    v = F.conv2d(xp, bt.reshape(6, 1, 6, 1).repeat(c, 1, 1, 1), stride=(4, 1), groups=c)
    v = F.conv2d(v, bt.reshape(6, 1, 1, 6).repeat(6 * c, 1, 1, 1), stride=(1, 4), groups=6 * c)
    v = v.reshape(c, 36, -1).transpose(0, 1)  # [36, C, tiles]
    u = (g @ weight @ g.t()).permute(2, 3, 0, 1).reshape(36, k, c)  # G g G^T
    m = (u @ v).reshape(36, -1)  # [36, K * tiles]
    at2 = (at[:, None, :, None] * at[None, :, None, :]).reshape(16, 36)  # A^T (.) A, (i, j)
    # [16 (i, j), K, h/4, w/4] -> [1, K, h, w] with y[k, 4r + i, 4c + j] = tile (r, c) output (i, j)
    y = _DepthToSpace4.apply((at2 @ m).reshape(1, 16 * k, h4, w4))
    if not aligned:
        y = y[:, :, :h, :w]
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


class _CropToImage(torch.autograd.Function):
    """``scores[:, :H, :W]`` for the size of ``image`` [1, 3, H, W], exported as one ONNX
    ``Slice`` over both axes (indexing exports one ``Slice``, and so one copy, per axis)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return scores[:, : image.shape[-2], : image.shape[-1]]

    @staticmethod
    def symbolic(g, scores, image):
        size = g.op("Shape", image, start_i=2, end_i=4)
        zeros = g.op("Constant", value_t=torch.tensor([0, 0], dtype=torch.int64))
        axes = g.op("Constant", value_t=torch.tensor([1, 2], dtype=torch.int64))
        return g.op("Slice", scores, zeros, size, axes)


def _crop(scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    if torch.onnx.is_in_onnx_export():
        return _CropToImage.apply(scores, image)
    return scores[:, : image.shape[-2], : image.shape[-1]]


class ExportableStudent(nn.Module):
    """Backbone + pixel decoder + query decoder + text classifier of a trained student.

    Shares the modules (and so the weights) of the model it is built from. The model's
    distiller, CLS queries and lazily built teacher are not referenced.
    """

    def __init__(self, model: nn.Module) -> None:
        """
        Args:
            model: a ``C2SSegmentor`` with ``INFERENCE_MODE "student"`` (best built from
                ``inference_cfg(cfg)``); it is put in eval mode.
        """
        super().__init__()
        check_exportable(model)
        model.eval()
        self.backbone = model.backbone
        self.pixel_decoder = model.pixel_decoder
        self.query_decoder = model.query_decoder
        self.classifier = model.classifier
        self.size_divisibility = int(model.size_divisibility)
        self.input_format = str(model.input_format)
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("pixel_std", model.pixel_std.detach().clone().view(1, -1, 1, 1))
        self._strides = {k: int(v.stride) for k, v in self.backbone.output_shape().items()}
        self.eval()

    @property
    def embed_dim(self) -> int:
        return int(self.classifier.embed_dim)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """[1, 3, H, W] -> [1, 3, H', W'] zero-padded bottom/right to multiples of the
        size divisibility (``ImageList.from_tensors`` with ``pad_value 0``)."""
        d = self.size_divisibility
        if d <= 1:
            return x
        h, w = x.shape[-2], x.shape[-1]
        pad_h = (h + (d - 1)) // d * d - h
        pad_w = (w + (d - 1)) // d * d - w
        return F.pad(x, [0, pad_w, 0, pad_h], value=0.0)

    def _conv3x3(self, conv: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
        """``conv(x)`` (a detectron2 ``Conv2d``: convolution, norm, activation), the
        convolution by Winograd when it is a plain 3x3 one; ``stride``: x's stride in the
        image, which tells whether its size is a multiple of 4 in every padded input."""
        if not winograd_eligible(conv):
            return conv(x)
        d = self.size_divisibility
        x = winograd_conv3x3(x, conv.weight, conv.bias, d > 0 and d % (4 * stride) == 0)
        if getattr(conv, "norm", None) is not None:
            x = conv.norm(x)
        if getattr(conv, "activation", None) is not None:
            x = conv.activation(x)
        return x

    def _backbone(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The backbone; in the ONNX export of a detectron2 ``ResNet``, ``ResNet.forward`` with
        the stride-1 3x3 convolutions of its blocks by Winograd (a bottleneck's 3x3 convolution
        has stride 1 when the stride is in the 1x1 one, detectron2's default)."""
        bb = self.backbone
        if not (torch.onnx.is_in_onnx_export() and type(bb) is ResNet and bb.num_classes is None):
            return bb(x)
        outputs: Dict[str, torch.Tensor] = {}
        x = bb.stem(x)
        if "stem" in bb._out_features:
            outputs["stem"] = x
        for name, stage in zip(bb.stage_names, bb.stages):
            stride = bb._out_feature_strides[name]
            for block in stage:
                if type(block) is BottleneckBlock:
                    x = self._bottleneck(block, x, stride)
                elif type(block) is BasicBlock:
                    x = self._basic_block(block, x, stride)
                else:
                    x = block(x)
            if name in bb._out_features:
                outputs[name] = x
        return outputs

    def _bottleneck(self, block: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
        """``BottleneckBlock.forward`` (output at ``stride``), its 3x3 convolution by
        :meth:`_conv3x3`."""
        out = F.relu(block.conv1(x))
        out = F.relu(self._conv3x3(block.conv2, out, stride))
        out = block.conv3(out)
        shortcut = block.shortcut(x) if block.shortcut is not None else x
        return F.relu(out + shortcut)

    def _basic_block(self, block: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
        """``BasicBlock.forward`` (R-18/34; output at ``stride``), its 3x3 convolutions by
        :meth:`_conv3x3` (the first one where it has stride 1)."""
        out = F.relu(self._conv3x3(block.conv1, x, stride))
        out = self._conv3x3(block.conv2, out, stride)
        shortcut = block.shortcut(x) if block.shortcut is not None else x
        return F.relu(out + shortcut)

    def _pixel_decode(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The pixel decoder; in the ONNX export, ``C2SFPNPixelDecoder.forward`` with its 3x3
        convolutions by Winograd (:func:`winograd_conv3x3`; they are about 40 % of the
        student's multiply-adds at 512 px, and ONNX Runtime has no fast 3x3 algorithm)."""
        pd = self.pixel_decoder
        if not (torch.onnx.is_in_onnx_export() and type(pd) is C2SFPNPixelDecoder):
            return pd(features)
        strides = [self._strides[f] for f in pd.in_features]
        outs: List[torch.Tensor] = []
        prev = None
        for idx in reversed(range(len(pd.in_features))):  # coarse to fine
            x = pd.lateral_convs[idx](features[pd.in_features[idx]])
            if prev is not None:
                x = x + F.interpolate(prev, size=x.shape[-2:], mode="nearest")
            prev = self._conv3x3(pd.output_convs[idx], x, strides[idx])
            outs.append(prev)
        return self._conv3x3(pd.mask_features, outs[-1], strides[0]), outs[:3]

    def _decode(
        self, multi_scale: List[torch.Tensor], mask_features: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The query decoder without CLS queries -> (last layer's mask embeddings [1, Q, C],
        query embeddings [1, Q, d_q]).

        ``C2SQueryDecoder.forward`` computes every layer's masks at the mask-feature
        resolution and resizes them (bilinear) to the next layer's memory size for its
        attention mask. Resizing is linear per channel, so resizing the mask features to the
        three memory sizes once and taking the mask embeddings' dot products there gives the
        same attention masks (up to float rounding) for a fraction of the cost. Other query
        decoders are called as they are.
        """
        qd = self.query_decoder
        if type(qd) is not C2SQueryDecoder:
            out: Dict[str, torch.Tensor] = qd(multi_scale, mask_features, 0)
            return out["pred_masks"], out["query_embeds"]
        memories, mem_pos, small_features = [], [], []
        for lvl, feat in enumerate(multi_scale[: qd.num_levels]):
            small = F.interpolate(
                mask_features, size=feat.shape[-2:], mode="bilinear", align_corners=False
            )
            small_features.append(small.flatten(2))  # [1, C, h_l * w_l]
            if lvl >= len(qd.input_proj):
                continue
            pos = sine_position_encoding(feat, qd.object_feat.embedding_dim // 2)
            mem = qd.input_proj[lvl](feat) + qd.level_embed.weight[lvl][None, :, None, None]
            memories.append(mem.flatten(2).transpose(1, 2))
            mem_pos.append(pos.flatten(2).transpose(1, 2))

        def blocked(q: torch.Tensor, lvl: int) -> torch.Tensor:
            small = qd.mask_embed(qd.decoder_norm(q)) @ small_features[lvl]  # [1, Q, h_l*w_l]
            mask = small.sigmoid() < 0.5
            return (mask & ~mask.all(-1, keepdim=True)).repeat_interleave(qd.nheads, dim=0)

        q = qd.object_feat.weight[None]
        q_pos = qd.object_pos.weight[None]
        cross = blocked(q, 0)
        last = len(qd.layers) - 1
        for i, layer in enumerate(qd.layers):
            q = layer(
                q, q_pos, memories[i % qd.num_levels], mem_pos[i % qd.num_levels], cross, None
            )
            if i < last:
                cross = blocked(q, (i + 1) % qd.num_levels)
        obj = qd.decoder_norm(q)
        return qd.mask_embed(obj) @ mask_features.flatten(2), obj

    def forward(self, image: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image: float32 [1, 3, H, W], 0..255, ``INPUT.FORMAT`` channel order, at the test
                resize.
            text_embeddings: float32 [K, d] class text embeddings (unit-norm rows; used as
                given).
        Returns:
            sem_seg: float32 [K, H, W] class scores (see the module docstring).
        """
        h, w = image.shape[-2], image.shape[-1]
        x = self._pad((image - self.pixel_mean) / self.pixel_std)
        features = self._backbone(x)
        mask_features, multi_scale = self._pixel_decode(features)
        masks, query_embeds = self._decode(multi_scale, mask_features)
        class_embeds = self.classifier.embed(query_embeds[0])  # [Q, d]
        logits = self.classifier(class_embeds, text_embeddings)  # [Q, K + 1]
        # [K, Q]: the softmax over classes taken on the transposed logits, so that the matmul
        # below reads a contiguous left operand
        probs_t = F.softmax(logits.t(), dim=0)[:-1]
        q = probs_t.shape[1]
        hp, wp = x.shape[-2], x.shape[-1]
        masks = masks.reshape(1, q, mask_features.shape[-2], mask_features.shape[-1])
        masks = F.interpolate(masks, size=(hp, wp), mode="bilinear", align_corners=False)
        # einsum("qk,qhw->khw") as a matmul [K, Q] @ [Q, H'*W'] on the padded size; cropping
        # the [K, H', W'] result is the one copy into the output (reshapes here are free)
        scores = probs_t @ masks.sigmoid().reshape(q, -1)
        return _crop(scores.reshape(-1, hp, wp), image)


class TextTower(nn.Module):
    """CLIP text tower for export: int64 tokens [K, L] -> unit-norm prompt embeddings [K, d].

    The normalisation is the one the project's text encoder applies to each prompt before
    prompt ensembling (``ensemble_prompt_embeddings``); averaging over templates/synonyms and
    normalising again is left to the caller (``c2s_d2.export.runtime``).
    """

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower.eval()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower.encode_text(tokens).float(), dim=-1)
