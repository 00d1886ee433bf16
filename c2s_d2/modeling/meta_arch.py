"""The student: a mask-classification segmentor with a text-embedding classifier.

Registered as ``C2SSegmentor`` in detectron2's ``META_ARCH_REGISTRY``. The class bank (text
embeddings of the class names) is read from the registered metadata: the training set's seen
classes in training mode, the evaluated dataset's classes (or any vocabulary given to
:meth:`C2SSegmentor.set_vocabulary`) in eval mode.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import nn

from ..data.class_names import compact_forms, expand_with_synonyms, synonym_groups
from .c2s_distiller import C2SDistiller
from .clip.teacher import build_teacher_from_cfg
from .clip.text_encoder import text_embeddings_from_cfg
from .criterion import SetCriterion, build_set_criterion
from .pixel_decoder import build_pixel_decoder
from .query_decoder import build_query_decoder
from .text_classifier import TextEmbeddingClassifier
from .zero_shot_baselines import teacher_dense_scores, two_stage_query_probs

INFERENCE_MODES = ("student", "teacher_dense", "two_stage")
# parameters that only training builds (CLS queries, distillation heads and memories)
TRAINING_ONLY_PREFIXES = ("distiller.", "query_decoder.global_feat.", "query_decoder.global_pos.")

logger = logging.getLogger(__name__)

__all__ = ["C2SSegmentor", "check_inductive_split", "class_text_names"]


def class_text_names(dataset_name: str) -> List[List[str]]:
    """Per class, the names given to the text encoder, from the registered metadata."""
    meta = MetadataCatalog.get(dataset_name)
    if not meta.get("stuff_classes", None):
        raise KeyError(
            f"dataset {dataset_name!r} has no 'stuff_classes' in its metadata "
            "(is it registered? see c2s_d2/data/datasets/)"
        )
    return [list(t) for t in meta.get("text_names", [[c] for c in meta.stuff_classes])]


def check_inductive_split(train_names: Sequence[str], test_names: Sequence[str]) -> None:
    """Zero-shot integrity: no unseen class name of an evaluation set may be a training class.

    Names are compared by the shared normaliser (c2s_d2.data.class_names: case, separators,
    closed compounds, plurals). An unseen class stands for its name, its ``text_names`` and the
    synonyms of the synonym table entries it matches, except table synonyms that name a seen
    class of the same evaluation set (that set labels them as different classes, e.g.
    COCO-Stuff's "pavement" and "road"). A training class stands for its name and its
    ``text_names``. Evaluation splits (``zero_shot_split == "eval"``) may not be trained on.

    Raises ``ValueError`` naming the training dataset, the training name and the unseen class
    (``dataset:class``).
    """
    groups = synonym_groups()
    unseen: Dict[str, Tuple[str, str]] = {}  # compact form -> ("dataset:class", origin)
    for name in test_names:
        meta = MetadataCatalog.get(name)
        ids = set(int(i) for i in meta.get("unseen_class_ids", []))
        if not ids:
            continue
        classes = meta.stuff_classes
        texts = meta.get("text_names", None) or [[c] for c in classes]
        seen = [n for k in range(len(classes)) if k not in ids for n in [classes[k], *texts[k]]]
        seen_forms = expand_with_synonyms(seen, ())
        for i in sorted(ids):
            forms = expand_with_synonyms([classes[i], *texts[i]], groups, exclude=seen_forms)
            for form, origin in forms.items():
                unseen.setdefault(form, (f"{name}:{classes[i]}", origin))
    for name in train_names:
        meta = MetadataCatalog.get(name)
        if meta.get("zero_shot_split", "train") != "train":
            raise ValueError(
                f"zero-shot integrity: DATASETS.TRAIN has {name!r}, an evaluation split with "
                "all classes; train on the matching '_train' dataset"
            )
        for cls, texts in zip(meta.get("stuff_classes", []), class_text_names(name)):
            for t in [cls, *texts]:
                for form in sorted(compact_forms(t)):
                    if form in unseen:
                        label, origin = unseen[form]
                        raise ValueError(
                            f"zero-shot integrity: training class name {t!r} of {name!r} is the "
                            f"unseen class {label} (normalised {form!r}, matched through {origin}); "
                            "remove it from the training set"
                        )


@META_ARCH_REGISTRY.register()
class C2SSegmentor(nn.Module):
    """MaskFormer-style student with N object queries, optional CLS queries and a text classifier."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        query_decoder: nn.Module,
        classifier: TextEmbeddingClassifier,
        criterion: SetCriterion,
        encode_names: Callable[[List[List[str]]], torch.Tensor],
        train_class_names: List[List[str]],
        test_class_names: Optional[List[List[str]]],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        input_format: str = "RGB",
        distiller: Optional[nn.Module] = None,
        inference_mode: str = "student",
        teacher_factory: Optional[Callable[[], nn.Module]] = None,
    ):
        """
        Args:
            backbone, pixel_decoder, query_decoder, classifier: the student's parts.
            criterion: segmentation loss (matching + CE + BCE + Dice).
            encode_names: maps per-class synonym lists to normalised text embeddings [K, d].
            train_class_names: text names of the training (seen) classes.
            test_class_names: text names of the default evaluation classes (None: the train ones).
            pixel_mean, pixel_std: input normalisation.
            size_divisibility: pad inputs to a multiple of this.
            distiller: optional C2S distillation branch (training only, see c2s_distiller.py).
            inference_mode: "student" (C2S / baseline), or the comparisons that need the teacher
                at test time: "teacher_dense" (MaskCLIP-style) and "two_stage" (zsseg-style).
            teacher_factory: builds the CLIP teacher for those comparisons (lazily).
        """
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.query_decoder = query_decoder
        self.classifier = classifier
        self.criterion = criterion
        self.distiller = distiller
        if inference_mode not in INFERENCE_MODES:
            raise KeyError(
                f"MODEL.C2S.INFERENCE_MODE: {inference_mode!r} is not one of {INFERENCE_MODES}"
            )
        self.inference_mode = inference_mode
        self.teacher_factory = teacher_factory
        self.__dict__["_teacher"] = None  # inference comparisons only; never saved
        self._register_load_state_dict_pre_hook(self._drop_training_only_keys)
        self.encode_names = encode_names
        self.size_divisibility = size_divisibility
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # class banks are not weights: they change with the dataset and are never checkpointed
        self.register_buffer("train_bank", encode_names(train_class_names), False)
        self.train_class_names = train_class_names
        self.set_vocabulary(test_class_names or train_class_names)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        c = cfg.MODEL.C2S
        if not cfg.DATASETS.TRAIN:
            raise KeyError("DATASETS.TRAIN is empty: the seen classes come from the training set")
        check_inductive_split(cfg.DATASETS.TRAIN, cfg.DATASETS.TEST)
        train_names = class_text_names(cfg.DATASETS.TRAIN[0])
        test_names = class_text_names(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        clip_cfg = cfg.clone()

        def encode_names(names: List[List[str]]) -> torch.Tensor:
            return text_embeddings_from_cfg(clip_cfg, names)

        backbone = build_backbone(cfg)
        pixel_decoder = build_pixel_decoder(cfg, backbone.output_shape())
        shapes = backbone.output_shape()
        used = getattr(pixel_decoder, "in_features", list(shapes))
        idle = [f for f in shapes if shapes[f].stride > max(shapes[u].stride for u in used)]
        if idle:  # their layers would get no gradient: an error under DDP
            raise ValueError(
                f"backbone features {idle} feed nothing (MODEL.C2S.PIXEL_DECODER.IN_FEATURES is "
                f"{list(used)}): remove them from the backbone's MODEL.RESNETS.OUT_FEATURES"
            )
        # CLS queries only where global distillation trains them (C2SDistiller.uses_global_queries):
        # a parameter without gradient stops multi-process (DDP) training
        g = c.DISTILL.GLOBAL
        trains_cls = c.DISTILL.ENABLED and g.ENABLED and g.WEIGHT > 0
        if c.NUM_GLOBAL_QUERIES > 0 and not trains_cls:
            logger.info(
                f"MODEL.C2S.NUM_GLOBAL_QUERIES {c.NUM_GLOBAL_QUERIES}: no CLS query built, global "
                "distillation is off (MODEL.C2S.DISTILL.ENABLED, DISTILL.GLOBAL.ENABLED/WEIGHT)"
            )
        query_decoder = build_query_decoder(
            cfg,
            c.PIXEL_DECODER.CONV_DIM,
            c.PIXEL_DECODER.MASK_DIM,
            c.NUM_GLOBAL_QUERIES if trains_cls else 0,
        )
        # the same call as __init__ makes: its second run is a cache hit, not a second CLIP build
        embed_dim = int(encode_names(train_names).shape[-1])
        classifier = TextEmbeddingClassifier(
            c.HIDDEN_DIM, embed_dim, c.CLASSIFIER.LOGIT_SCALE, c.CLASSIFIER.LEARNABLE_LOGIT_SCALE
        )
        criterion = build_set_criterion(cfg)
        distiller = None
        if c.DISTILL.ENABLED:
            distiller = C2SDistiller(cfg, embed_dim)
            if distiller.uses_global_queries and c.NUM_GLOBAL_QUERIES < 1:
                raise KeyError(
                    "MODEL.C2S.NUM_GLOBAL_QUERIES must be >= 1 when "
                    "MODEL.C2S.DISTILL.GLOBAL.ENABLED is True"
                )
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "query_decoder": query_decoder,
            "classifier": classifier,
            "criterion": criterion,
            "encode_names": encode_names,
            "train_class_names": train_names,
            "test_class_names": test_names,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "size_divisibility": c.SIZE_DIVISIBILITY,
            "distiller": distiller,
            "inference_mode": c.INFERENCE_MODE,
            "teacher_factory": lambda: build_teacher_from_cfg(clip_cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ vocabulary
    def set_vocabulary(self, class_names: Sequence) -> None:
        """Set the evaluation classes: a list of names or of synonym lists."""
        names = [[n] if isinstance(n, str) else list(n) for n in class_names]
        if len(names) == 0:
            raise ValueError("empty vocabulary: give at least one class name")
        flat = [n.strip() for syn in names for n in syn]
        if any(not n for n in flat):
            raise ValueError(f"empty class name in vocabulary {names}")
        firsts = [syn[0].strip().lower() for syn in names]
        dups = sorted({n for n in firsts if firsts.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate class names in vocabulary: {dups}")
        bank = self.encode_names(names)
        self.test_class_names = names
        if hasattr(self, "test_bank"):
            self.test_bank = bank.to(self.device)
        else:
            self.register_buffer("test_bank", bank, False)

    def set_vocabulary_from_dataset(self, dataset_name: str) -> None:
        self.set_vocabulary(class_text_names(dataset_name))

    # ------------------------------------------------------------------ forward
    def _features(self, images: torch.Tensor, num_global: int) -> Dict[str, torch.Tensor]:
        features = self.backbone(images)
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.query_decoder(multi_scale, mask_features, num_global)

    def _classify(self, outputs: Dict, bank: torch.Tensor) -> None:
        for out in [outputs, *outputs.get("aux_outputs", [])]:
            out["class_embeds"] = self.classifier.embed(out["query_embeds"])
            out["pred_logits"] = self.classifier(out["class_embeds"], bank)

    def preprocess(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess(batched_inputs)
        if self.training:
            return self._training_losses(batched_inputs, images)
        return self.inference(batched_inputs, images)

    def _training_losses(
        self, batched_inputs: List[Dict], images: ImageList
    ) -> Dict[str, torch.Tensor]:
        uses_cls = self.distiller is not None and self.distiller.uses_global_queries
        num_global = self.query_decoder.num_global_queries if uses_cls else 0
        outputs = self._features(images.tensor, num_global)
        targets = self.prepare_targets(batched_inputs, images)
        bank = self.train_bank
        num_classes = bank.shape[0]
        for t in targets:
            if t["labels"].numel() and int(t["labels"].max()) >= num_classes:
                # Only training ids of seen classes may reach the model (inductive guard).
                raise ValueError(
                    f"training target id {int(t['labels'].max())} >= number of seen classes "
                    f"{num_classes}: labels were not mapped through the training set's label_lut"
                )
        if self.distiller is not None:
            return self.distiller(self, images, outputs, targets, batched_inputs)
        self._classify(outputs, bank)
        losses = self.criterion(outputs, targets)
        return self.criterion.weight_losses(losses)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        h, w = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            masks = inst.gt_masks
            padded = masks.new_zeros((masks.shape[0], h, w))
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            targets.append({"labels": inst.gt_classes, "masks": padded})
        return targets

    def _drop_training_only_keys(self, state_dict, prefix, *args, **kwargs) -> None:
        """A model built for inference loads a C2S training checkpoint without warnings."""
        own = set(self.state_dict().keys())
        for key in list(state_dict.keys()):
            name = key[len(prefix) :]
            if name.startswith(TRAINING_ONLY_PREFIXES) and name not in own:
                del state_dict[key]

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            if self.teacher_factory is None:
                raise ValueError(f"INFERENCE_MODE {self.inference_mode!r} needs a CLIP teacher")
            self.__dict__["_teacher"] = self.teacher_factory()
        return self._teacher.to(self.device)

    def _rgb(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised student input -> RGB 0..255 (what the teacher takes)."""
        x = images * self.pixel_std + self.pixel_mean
        return x.flip(1) if self.input_format == "BGR" else x

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        if self.inference_mode == "teacher_dense":
            return self._teacher_dense_inference(batched_inputs, images)
        outputs = self._features(images.tensor, 0)
        self._classify(outputs, self.test_bank)
        results = []
        for i, x in enumerate(batched_inputs):
            masks = F.interpolate(
                outputs["pred_masks"][i : i + 1],
                size=images.tensor.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )[0]
            logits = outputs["pred_logits"][i]
            if self.inference_mode == "two_stage":
                logits = self._two_stage_logits(images.tensor[i], masks, logits)
            h = x.get("height", images.image_sizes[i][0])
            w = x.get("width", images.image_sizes[i][1])
            masks = sem_seg_postprocess(masks, images.image_sizes[i], h, w)
            results.append({"sem_seg": semantic_inference(logits, masks)})
        return results

    def _two_stage_logits(self, image: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor):
        """Student masks, classes from the teacher; the student's no-object score is kept."""
        teacher = self.teacher()
        probs = two_stage_query_probs(
            teacher, self._rgb(image[None])[0], masks, self.test_bank, teacher.input_size or 224
        )
        keep = 1 - logits.softmax(-1)[:, -1:]
        # log-probabilities: semantic_inference's softmax gives back probs * keep and 1 - keep
        return torch.cat([probs * keep, 1 - keep], dim=1).clamp_min(1e-12).log()

    def _teacher_dense_inference(self, batched_inputs: List[Dict], images: ImageList):
        _, dense = self.teacher()(self._rgb(images.tensor))
        results = []
        for i, x in enumerate(batched_inputs):
            scores = teacher_dense_scores(
                dense[i],
                self.test_bank,
                images.tensor.shape[-2:],
                self.classifier.log_logit_scale.exp(),
            )
            h = x.get("height", images.image_sizes[i][0])
            w = x.get("width", images.image_sizes[i][1])
            results.append({"sem_seg": sem_seg_postprocess(scores, images.image_sizes[i], h, w)})
        return results


def semantic_inference(logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """MaskFormer semantic inference.

    Args:
        logits: [Q, K + 1] class logits (last = no object).
        mask_logits: [Q, H, W].
    Returns:
        [K, H, W] scores: sum over queries of softmax(logits)[:, :K] x sigmoid(mask).
    """
    probs = F.softmax(logits, dim=-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", probs, mask_logits.sigmoid())
