"""c2s-d2: CLIP-to-Seg distillation for zero-shot semantic segmentation on Detectron2.

Importing the package registers its models, datasets and evaluators (lazily: no disk access).
"""

from . import data, evaluation, modeling  # noqa: F401  (registration)
from .config import add_c2s_config  # noqa: F401
