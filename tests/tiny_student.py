"""Config overrides that shrink the mini-world student for fast tests (shared by the test files)."""

TINY_STUDENT = [
    "MODEL.C2S.DEC_LAYERS", "2",
    "MODEL.C2S.NUM_OBJECT_QUERIES", "8",
    "MODEL.C2S.HIDDEN_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.CONV_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.MASK_DIM", "64",
]  # fmt: skip
