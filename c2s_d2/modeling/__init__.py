from .meta_arch import C2SSegmentor  # noqa: F401  (registers the meta-architecture)
from .pixel_decoder import C2S_PIXEL_DECODER_REGISTRY  # noqa: F401
from .query_decoder import C2S_TRANSFORMER_DECODER_REGISTRY  # noqa: F401
