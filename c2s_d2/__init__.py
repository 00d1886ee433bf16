"""c2s-d2: CLIP-to-Seg distillation for zero-shot semantic segmentation on Detectron2.

Importing the package registers its models, datasets and evaluators (lazily: no disk access).
"""

try:
    import detectron2  # noqa: F401
except ModuleNotFoundError as e:  # the one dependency pip cannot find under its own name
    if e.name != "detectron2":
        raise
    raise ImportError(
        "c2s_d2 needs detectron2, which is not installed. On Python 3.10: "
        "pip install -e .[d2wheel] (installs sal-detectron2==0.7.2, a build of detectron2); "
        "otherwise build detectron2 from source first: pip install --no-build-isolation "
        "'git+https://github.com/facebookresearch/detectron2.git' (see README, Installation)"
    ) from e

from . import data, evaluation, modeling  # noqa: F401  (registration)
from .config import add_c2s_config  # noqa: F401
