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
6. mask logits upsampled (bilinear) to the padded size, cropped to [H, W];
7. semantic inference: ``sem_seg[k] = sum_q softmax(logits_q)[k] * sigmoid(mask_q)``, the
   "no object" column dropped after the softmax.

Output ``sem_seg`` float32 [K, H, W], the same as ``model([{"image": x}])[0]["sem_seg"]`` for an
input ``x`` already at the test resize. H, W and K are dynamic in the exported graphs.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExportableStudent", "TextTower", "check_exportable"]


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
        features = self.backbone(x)
        mask_features, multi_scale = self.pixel_decoder(features)
        out: Dict[str, torch.Tensor] = self.query_decoder(multi_scale, mask_features, 0)
        class_embeds = self.classifier.embed(out["query_embeds"][0])  # [Q, d]
        logits = self.classifier(class_embeds, text_embeddings)  # [Q, K + 1]
        masks = F.interpolate(
            out["pred_masks"], size=x.shape[-2:], mode="bilinear", align_corners=False
        )[0, :, :h, :w]
        probs = F.softmax(logits, dim=-1)[:, :-1]  # [Q, K]
        q = probs.shape[0]
        sig = masks.sigmoid()
        # einsum("qk,qhw->khw") as a matmul: [K, Q] @ [Q, H*W]
        return (probs.t() @ sig.reshape(q, -1)).reshape(-1, h, w)


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
