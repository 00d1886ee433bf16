"""Export a trained c2s-d2 student to ONNX / TorchScript, and the CLIP text tower to ONNX.

Used by ``tools/export_model.py``; see :mod:`c2s_d2.export.student` for what the exported
student computes. Files written to the output folder:

* ``student.onnx``: inputs ``image`` float32 [1, 3, H, W] (0..255, ``INPUT.FORMAT`` order, at the
  test resize) and ``text_embeddings`` float32 [K, d]; output ``sem_seg`` float32 [K, H, W];
  H, W, K dynamic; opset 17, legacy (TorchScript-based) exporter.
* ``student.torchscript.pt``: the same module, ``torch.jit.trace``-d (sizes and K stay dynamic:
  shapes are traced as values; checked at another size and K after tracing).
* ``text_tower.onnx``: ``tokens`` int64 [K, L] -> ``embeddings`` float32 [K, d], unit norm (each
  prompt, before prompt ensembling), plus CLIP's BPE merges file for the torch-free tokenizer.
* ``export.json``: what a runtime needs (input format, test resize, size divisibility, embedding
  size, templates, tokenizer) and where the export came from (config, weights, versions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from ..config import add_c2s_config, inference_cfg
from ..engine import C2SCheckpointer
from ..modeling.clip.loader import build_open_clip, get_tokenizer
from ..modeling.clip.templates import get_templates
from .student import ExportableStudent, TextTower

logger = logging.getLogger(__name__)

OPSET = 17
FORMATS = ("onnx", "torchscript")
STUDENT_ONNX = "student.onnx"
STUDENT_TS = "student.torchscript.pt"
TEXT_TOWER_ONNX = "text_tower.onnx"
EXPORT_INFO = "export.json"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# largest |difference| accepted between an exported model and PyTorch in the self-check
CHECK_TOLERANCE = 1e-3

__all__ = [
    "build_student_model",
    "export_all",
    "export_student_onnx",
    "export_student_torchscript",
    "export_text_tower_onnx",
    "load_cfg",
]


def load_cfg(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """The c2s-d2 config of ``config_file`` with ``opts`` (KEY VALUE ...) merged, on the CPU."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file not found: {config_file}")
    if len(opts) % 2:
        raise ValueError(f"config overrides need KEY VALUE pairs, got {list(opts)}")
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def build_student_model(cfg: CfgNode, allow_random_weights: bool = False) -> torch.nn.Module:
    """The inference model of ``cfg`` (``inference_cfg``: no distiller, no CLS query) with
    ``MODEL.WEIGHTS`` loaded (every key required), in eval mode on the CPU.

    Refuses an empty ``MODEL.WEIGHTS`` (unless ``allow_random_weights``), a missing weights
    file, and a model that cannot be exported (``MODEL.C2S.INFERENCE_MODE`` other than
    ``student``, another meta-architecture).
    """
    weights = cfg.MODEL.WEIGHTS
    if not weights and not allow_random_weights:
        raise ValueError(
            "MODEL.WEIGHTS is empty: give the trained student, e.g. MODEL.WEIGHTS "
            "output/.../model_final.pth (or --allow-random-weights to export an untrained model)"
        )
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS file not found: {weights}")
    if cfg.MODEL.META_ARCHITECTURE != "C2SSegmentor":
        raise ValueError(
            f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r}: only C2SSegmentor "
            "students can be exported"
        )
    if cfg.MODEL.C2S.INFERENCE_MODE != "student":
        raise ValueError(
            f"MODEL.C2S.INFERENCE_MODE is {cfg.MODEL.C2S.INFERENCE_MODE!r}: that comparison runs "
            "the CLIP teacher at test time and cannot be exported (use 'student')"
        )
    model = build_model(inference_cfg(cfg))
    if weights:
        C2SCheckpointer(model, require_all_keys=True).load(weights)
    return model.eval()


def _example_image(cfg: CfgNode, size_divisibility: int) -> torch.Tensor:
    """A random 0..255 image [1, 3, h, w] at the test size, w not a multiple of the size
    divisibility (so padding is part of the trace)."""
    short = cfg.INPUT.MIN_SIZE_TEST
    short = int(short[0] if isinstance(short, (list, tuple)) else short)
    short = min(max(short, 32), 512)
    g = torch.Generator().manual_seed(0)
    extra = max(size_divisibility // 2, 1) if size_divisibility > 1 else 8
    return torch.rand(1, 3, short, short + extra, generator=g) * 255


def _other_inputs(bank: torch.Tensor, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A second image size and vocabulary size, unlike the trace example's."""
    g = torch.Generator().manual_seed(1)
    h, w = image.shape[-2:]
    other = torch.rand(1, 3, max(int(w) - 24, 40), max(int(h) - 8, 40), generator=g) * 255
    k = bank.shape[0] + 3
    emb = F.normalize(torch.randn(k, bank.shape[1], generator=g), dim=-1)
    return other, emb


def _check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    if tuple(got.shape) != tuple(want.shape):
        raise RuntimeError(f"{name}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if not diff <= CHECK_TOLERANCE:
        raise RuntimeError(f"{name}: differs from PyTorch by {diff:.3g} (> {CHECK_TOLERANCE})")
    return diff


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Tracer warnings are expected (shapes are traced as values) and torch.jit's deprecation
    notices are not ours: keep the log readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_student_onnx(
    student: ExportableStudent, path: str, image: torch.Tensor, bank: torch.Tensor
) -> None:
    """``student`` -> ONNX at ``path`` (opset 17, dynamic H, W, K)."""
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            student,
            (image, bank),
            path,
            input_names=["image", "text_embeddings"],
            output_names=["sem_seg"],
            dynamic_axes={
                "image": {2: "height", 3: "width"},
                "text_embeddings": {0: "num_classes"},
                "sem_seg": {0: "num_classes", 1: "height", 2: "width"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def export_student_torchscript(
    student: ExportableStudent, path: str, image: torch.Tensor, bank: torch.Tensor
) -> None:
    """``student`` -> ``torch.jit.trace`` archive at ``path``."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(student, (image, bank), check_trace=False)
        traced.save(path)


def build_text_tower(cfg: CfgNode) -> TextTower:
    clip = cfg.MODEL.CLIP
    tower = build_open_clip(
        clip.MODEL_NAME,
        clip.PRETRAINED,
        clip.RANDOM_INIT_SEED,
        tuple(clip.MODEL_CONFIG_FILES),
        text_only=True,
        quick_gelu=clip.QUICK_GELU,
    )
    return TextTower(tower).eval()


def tokenizer_info(cfg: CfgNode) -> Dict:
    """What the torch-free tokenizer needs, or ``{"type": <class name>}`` when the model's
    tokenizer is not CLIP's BPE one (then the runtime needs a vocab.npz)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    tok = get_tokenizer(cfg.MODEL.CLIP.MODEL_NAME, tuple(cfg.MODEL.CLIP.MODEL_CONFIG_FILES))
    plain = (
        isinstance(tok, SimpleTokenizer)
        and getattr(tok, "reduction_fn", None) is None
        and getattr(tok, "clean_fn", None) is open_clip.tokenizer._clean_lower
        and len(tok.encoder) == 49408
    )
    if not plain:
        return {"type": type(tok).__name__, "context_length": getattr(tok, "context_length", None)}
    return {
        "type": "clip_bpe",
        "context_length": int(tok.context_length),
        "bpe_file": BPE_FILE,
        "sot_token_id": int(tok.sot_token_id),
        "eot_token_id": int(tok.eot_token_id),
        "_bpe_source": default_bpe(),
    }


def export_text_tower_onnx(tower: TextTower, path: str, tokens: torch.Tensor) -> None:
    """``tower`` -> ONNX at ``path``: ``tokens`` int64 [K, L] -> ``embeddings`` [K, d]."""
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            tower,
            (tokens,),
            path,
            input_names=["tokens"],
            output_names=["embeddings"],
            dynamic_axes={"tokens": {0: "num_prompts"}, "embeddings": {0: "num_prompts"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _ort_session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def check_output_dir(output: str) -> None:
    """Refuse an output folder that is a file (or lies below one)."""
    path = os.path.abspath(output)
    probe = path
    while probe and not os.path.exists(probe):
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if os.path.exists(probe) and not os.path.isdir(probe):
        where = "is a file" if probe == path else f"lies below the file {probe}"
        raise NotADirectoryError(f"--output {output} {where}; give a folder")


def export_all(
    config_file: str,
    output: str,
    opts: Sequence[str] = (),
    formats: Sequence[str] = FORMATS,
    text_tower: bool = True,
    allow_random_weights: bool = False,
    verify: bool = True,
) -> Dict:
    """Export the student of ``config_file`` (+ ``opts``) to ``output``; returns export.json's
    content. ``verify`` runs each exported model against PyTorch at the trace size and at
    another size and K (max |difference| <= 1e-3, recorded in export.json)."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--format {list(formats)}: choose from {list(FORMATS)}")
    check_output_dir(output)
    cfg = load_cfg(config_file, opts)
    model = build_student_model(cfg, allow_random_weights)
    student = ExportableStudent(model)
    bank = model.test_bank.detach().float().cpu()
    image = _example_image(cfg, student.size_divisibility)
    os.makedirs(output, exist_ok=True)
    checks: Dict[str, float] = {}
    cases = [(image, bank), _other_inputs(bank, image)] if verify else []
    with torch.no_grad():
        expected = [student(x, e) for x, e in cases]
    files: List[str] = []
    if "onnx" in formats:
        path = os.path.join(output, STUDENT_ONNX)
        export_student_onnx(student, path, image, bank)
        files.append(STUDENT_ONNX)
        if verify:
            sess = _ort_session(path)
            for i, ((x, e), want) in enumerate(zip(cases, expected)):
                got = sess.run(None, {"image": x.numpy(), "text_embeddings": e.numpy()})[0]
                checks[f"onnx_case{i}"] = _check_close(STUDENT_ONNX, torch.from_numpy(got), want)
    if "torchscript" in formats:
        path = os.path.join(output, STUDENT_TS)
        export_student_torchscript(student, path, image, bank)
        files.append(STUDENT_TS)
        if verify:
            with _quiet():
                traced = torch.jit.load(path)
            with torch.no_grad():
                for i, ((x, e), want) in enumerate(zip(cases, expected)):
                    checks[f"torchscript_case{i}"] = _check_close(STUDENT_TS, traced(x, e), want)
    tok = tokenizer_info(cfg)
    if text_tower and "onnx" in formats:
        tower = build_text_tower(cfg)
        tokenizer = get_tokenizer(
            cfg.MODEL.CLIP.MODEL_NAME, tuple(cfg.MODEL.CLIP.MODEL_CONFIG_FILES)
        )
        tokens = tokenizer(["a photo of a cat.", "grass", "itap of a large traffic light."])
        path = os.path.join(output, TEXT_TOWER_ONNX)
        export_text_tower_onnx(tower, path, tokens[:2])
        files.append(TEXT_TOWER_ONNX)
        if verify:
            with torch.no_grad():
                want = tower(tokens)
            got = _ort_session(path).run(None, {"tokens": tokens.numpy()})[0]
            checks["text_tower"] = _check_close(TEXT_TOWER_ONNX, torch.from_numpy(got), want)
        if tok["type"] == "clip_bpe":
            shutil.copyfile(tok["_bpe_source"], os.path.join(output, BPE_FILE))
            files.append(BPE_FILE)
    tok.pop("_bpe_source", None)
    info = export_info(cfg, config_file, student, tok, files, checks)
    with open(os.path.join(output, EXPORT_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return info


def export_info(
    cfg: CfgNode,
    config_file: str,
    student: ExportableStudent,
    tokenizer: Dict,
    files: Sequence[str],
    checks: Dict[str, float],
) -> Dict:
    import onnx

    try:
        import onnxruntime

        ort_version: Optional[str] = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        ort_version = None
    min_size = cfg.INPUT.MIN_SIZE_TEST
    weights = cfg.MODEL.WEIGHTS
    return {
        "format_version": 1,
        "files": list(files) + [EXPORT_INFO],
        "student_inputs": {
            "image": "float32 [1, 3, H, W], 0..255, input_format channel order, at the test resize",
            "text_embeddings": "float32 [K, embed_dim], unit-norm rows (not normalised in the graph)",
        },
        "student_outputs": {"sem_seg": "float32 [K, H, W] class scores"},
        "input_format": student.input_format,
        "min_size_test": list(min_size) if isinstance(min_size, (list, tuple)) else int(min_size),
        "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
        "size_divisibility": student.size_divisibility,
        "pixel_mean": [float(v) for v in student.pixel_mean.flatten()],
        "pixel_std": [float(v) for v in student.pixel_std.flatten()],
        "embed_dim": student.embed_dim,
        "logit_scale": float(student.classifier.log_logit_scale.exp()),
        "num_queries": int(student.query_decoder.num_object_queries),
        "templates": get_templates(cfg.MODEL.CLIP.TEXT_TEMPLATES),
        "tokenizer": tokenizer,
        "clip_model": cfg.MODEL.CLIP.MODEL_NAME,
        "clip_pretrained": cfg.MODEL.CLIP.PRETRAINED,
        "config_file": os.path.abspath(config_file),
        "weights": os.path.abspath(weights) if weights and "://" not in weights else weights,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort_version,
        "max_abs_diff_vs_pytorch": checks,
    }
