"""The tensor math of C2S distillation (docs/METHOD.md): losses, pseudo-masks, latent classes,
latent text embeddings and the latent vocabulary. Nothing here imports CLIP: everything takes
tensors and runs on their device.
"""

from .latent_classes import (
    LatentClassMemory,
    RunningMean,
    all_reduce_sum,
    gather_from_all_processes,
    is_distributed,
)
from .latent_text import latent_text_embeddings
from .latent_vocabulary import (
    build_latent_vocabulary,
    default_latent_vocabulary,
    filter_vocabulary,
    imagenet_category_names,
    load_synonym_table,
    load_vocabulary_file,
    normalize_name,
    unseen_names_of_registered_datasets,
)
from .losses import GLOBAL_LOSS_KINDS, global_distillation_loss, local_distillation_loss
from .pseudo_masks import (
    connected_components,
    ignored_cells_from_labels,
    pseudo_masks_from_ignored_area,
    pseudo_masks_from_ignored_area_batch,
    score_regions,
)

__all__ = [
    "GLOBAL_LOSS_KINDS",
    "LatentClassMemory",
    "RunningMean",
    "all_reduce_sum",
    "build_latent_vocabulary",
    "connected_components",
    "default_latent_vocabulary",
    "filter_vocabulary",
    "gather_from_all_processes",
    "global_distillation_loss",
    "ignored_cells_from_labels",
    "imagenet_category_names",
    "is_distributed",
    "latent_text_embeddings",
    "load_synonym_table",
    "load_vocabulary_file",
    "local_distillation_loss",
    "normalize_name",
    "pseudo_masks_from_ignored_area",
    "pseudo_masks_from_ignored_area_batch",
    "score_regions",
    "unseen_names_of_registered_datasets",
]
