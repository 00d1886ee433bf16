"""Config keys of c2s-d2. ``add_c2s_config(cfg)`` is the only entry point.

Every switch of docs/METHOD.md is a key here, with its default.
"""

from detectron2.config import CfgNode as CN


def add_c2s_config(cfg: CN) -> None:
    """Add the c2s-d2 keys to a detectron2 config (in place)."""
    # ---------------------------------------------------------------- data
    cfg.INPUT.DATASET_MAPPER_NAME = "c2s_semantic"
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # "inductive": unseen pixels are ignored (255) and unseen names never reach training.
    # "inductive_strict": besides, every training image that contains an unseen pixel is dropped.
    cfg.DATASETS.ZERO_SHOT_SETTING = "inductive"

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # Stop with a message naming the loss term when a loss becomes NaN/inf.
    cfg.SOLVER.CHECK_FINITE_LOSS = True

    # ---------------------------------------------------------------- student
    cfg.MODEL.C2S = CN()
    c = cfg.MODEL.C2S
    c.NUM_OBJECT_QUERIES = 100
    # CLS queries for global distillation; built only when > 0, never used at inference.
    c.NUM_GLOBAL_QUERIES = 0
    c.HIDDEN_DIM = 256
    c.NHEADS = 8
    c.DIM_FEEDFORWARD = 2048
    c.DEC_LAYERS = 9
    c.PRE_NORM = False
    c.ENFORCE_INPUT_PROJ = False
    c.SIZE_DIVISIBILITY = 32
    c.DEEP_SUPERVISION = True

    # segmentation loss
    c.NO_OBJECT_WEIGHT = 0.1
    c.CLASS_WEIGHT = 2.0
    c.MASK_WEIGHT = 5.0
    c.DICE_WEIGHT = 5.0
    # > 0: point-sampled mask losses with importance sampling; 0: full resolution.
    c.TRAIN_NUM_POINTS = 12544
    c.OVERSAMPLE_RATIO = 3.0
    c.IMPORTANCE_SAMPLE_RATIO = 0.75

    c.PIXEL_DECODER = CN()
    c.PIXEL_DECODER.NAME = "C2SFPNPixelDecoder"
    c.PIXEL_DECODER.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    c.PIXEL_DECODER.CONV_DIM = 256
    c.PIXEL_DECODER.MASK_DIM = 256
    c.PIXEL_DECODER.NORM = "GN"

    c.TRANSFORMER_DECODER = CN()
    c.TRANSFORMER_DECODER.NAME = "C2SQueryDecoder"

    # text-embedding classifier
    c.CLASSIFIER = CN()
    c.CLASSIFIER.LOGIT_SCALE = 100.0
    c.CLASSIFIER.LEARNABLE_LOGIT_SCALE = False

    c.TEST = CN()
    c.TEST.SEMANTIC_ON = True

    # ---------------------------------------------------------------- CLIP (text encoder + teacher)
    cfg.MODEL.CLIP = CN()
    clip = cfg.MODEL.CLIP
    # open_clip model name ("ViT-B-16") or "hf-hub:org/repo".
    clip.MODEL_NAME = "ViT-B-16"
    # open_clip pretrained tag ("openai", "laion2b_s34b_b88k"), a local checkpoint file, or ""
    # for random weights (seeded by RANDOM_INIT_SEED; for tests and the mini-world).
    clip.PRETRAINED = "openai"
    # Activation: "auto" (from the tag, the file or the architecture; a plain state dict of e.g.
    # ViT-B-16 is refused as ambiguous), "true" (QuickGELU: OpenAI's weights) or "false" (GELU).
    clip.QUICK_GELU = "auto"
    clip.RANDOM_INIT_SEED = 0
    # Extra open_clip architecture JSON files to register (tiny models). Relative paths are
    # resolved against the package's model_configs/ folder first.
    clip.MODEL_CONFIG_FILES = []
    # Prompt templates: "imagenet80", "short" (7 templates), "single", or a path to a text file.
    clip.TEXT_TEMPLATES = "short"
    # Folder for the text-embedding cache ("" -> $C2S_CACHE or ~/.cache/c2s_d2).
    clip.TEXT_EMBED_CACHE_DIR = ""
    clip.TEXT_BATCH_SIZE = 256  # prompts per text-encoder forward (run on MODEL.DEVICE)

    # ---------------------------------------------------------------- distillation (C2S)
    cfg.MODEL.C2S.DISTILL = CN()
    d = cfg.MODEL.C2S.DISTILL
    d.ENABLED = False
    # teacher input size (short side); positional embeddings are interpolated when larger.
    d.TEACHER_INPUT_SIZE = 224
    # teacher precision: "auto" (bf16 autocast on CUDA with bf16, fp16 on other CUDA, fp32 on
    # CPU), "fp32", "bf16", "fp16" (CUDA only)
    d.TEACHER_DTYPE = "auto"
    # folder of a teacher-feature cache (tools/cache_teacher_features.py): training reads the
    # teacher's outputs from it instead of running the teacher; "" = online teacher
    d.TEACHER_CACHE = ""

    d.GLOBAL = CN()
    d.GLOBAL.ENABLED = False
    d.GLOBAL.WEIGHT = 1.0
    d.GLOBAL.LOSS = "cosine"  # or "l1"

    d.LOCAL = CN()
    d.LOCAL.ENABLED = False
    d.LOCAL.WEIGHT = 1.0
    # regions used: ground-truth seen segments and/or pseudo-masks
    d.LOCAL.USE_GT_SEGMENTS = True
    d.LOCAL.USE_PSEUDO_MASKS = True

    d.PSEUDO_MASK = CN()
    d.PSEUDO_MASK.K_MAX = 4
    d.PSEUDO_MASK.KMEANS_ITERS = 10
    d.PSEUDO_MASK.SPATIAL_WEIGHT = 0.0
    d.PSEUDO_MASK.MIN_AREA = 16  # in teacher-grid cells
    # seen/latent filter: "calibrated" (a pseudo region is seen-like when its best seen-text cosine
    # reaches the SEEN_QUANTILE quantile of the labelled seen segments' best cosines in the step,
    # EMA-smoothed: works at any CLIP scale) or "absolute" (compare with SEEN_THRESHOLD)
    d.PSEUDO_MASK.SEEN_FILTER = "calibrated"
    d.PSEUDO_MASK.SEEN_QUANTILE = 0.25
    d.PSEUDO_MASK.SEEN_THRESHOLD = 0.9
    # k >= 2 clusters must reach this mean silhouette to beat one cluster; k-means++ restarts
    d.PSEUDO_MASK.MIN_SILHOUETTE = 0.25
    d.PSEUDO_MASK.N_INIT = 3

    d.LATENT = CN()
    d.LATENT.ENABLED = False
    d.LATENT.NUM_CLASSES = 8  # K_LATENT
    d.LATENT.MOMENTUM = 0.99
    # re-seed a latent slot that received no region for this many steps (0: never)
    d.LATENT.RESEED_AFTER = 100
    d.LATENT.CLASS_WEIGHT = 1.0
    # latent vocabulary: "imagenet" (torchvision's names, unseen names removed) or a file path, "" = none
    d.LATENT.VOCABULARY = "imagenet"
    d.LATENT.TOPK = 5
    d.LATENT.TAU = 0.07
    d.LATENT.LAMBDA = 0.5

    # inference-only comparisons: "student" (default), "teacher_dense", "two_stage"
    cfg.MODEL.C2S.INFERENCE_MODE = "student"


def inference_cfg(cfg: CN) -> CN:
    """The config of the model built for inference: training-only parts (the distillation branch
    and the CLS queries) are not built, so the student costs what the plain student costs."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.C2S.DISTILL.ENABLED = False
    cfg.MODEL.C2S.NUM_GLOBAL_QUERIES = 0
    cfg.freeze()
    return cfg
