"""The CLIP side of C2S: the only sub-package that imports open_clip.

* ``loader``: build frozen open_clip models (tag, hf-hub, local file, or seeded random weights).
* ``text_encoder``: class text embeddings with prompt ensembling, cached on disk.
* ``templates``: prompt template sets.
* ``teacher``: the frozen CLIP teacher (global, dense and region embeddings).

Everything outside this package takes tensors.
"""

from .loader import (  # noqa: F401
    ClipTextTower,
    build_open_clip,
    get_tokenizer,
    register_model_configs,
    weights_identity,
)
from .teacher import ClipTeacher, build_teacher_from_cfg  # noqa: F401
from .templates import TEMPLATES, get_templates  # noqa: F401
from .text_encoder import text_embeddings, text_embeddings_from_cfg  # noqa: F401
