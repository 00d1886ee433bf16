from . import datasets  # noqa: F401  (registers the datasets, lazily)
from .dataset_mapper import C2SSemanticDatasetMapper  # noqa: F401
from .zero_shot import register_zero_shot_sem_seg  # noqa: F401
