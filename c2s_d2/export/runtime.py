"""Torch-free runtime of an exported c2s-d2 student: ONNX Runtime, numpy and OpenCV only.

``tools/run_onnx.py`` is its command line. This module imports neither torch, detectron2 nor
open_clip (nor the c2s_d2 package, whose ``__init__`` imports detectron2): load it by path, e.g.
``importlib.util.spec_from_file_location("c2s_runtime", ".../c2s_d2/export/runtime.py")``. It
loads ``tokenizer.py`` from its own folder the same way. Pillow is used, when installed, for the
test resize (it is what detectron2's ``ResizeTransform`` uses, so the resized image is the one
``DefaultPredictor`` gives the model); without it OpenCV resizes (``INTER_AREA`` when shrinking,
``INTER_LINEAR`` when enlarging).

Pipeline of :meth:`ExportedStudent.predict` for an image [H0, W0, 3] uint8 in BGR order:

1. channel order of ``export.json``'s ``input_format``;
2. ``ResizeShortestEdge(min_size_test, max_size_test)`` -> [H, W] (detectron2's rounding);
3. ``student.onnx`` (normalisation, padding, student, classifier, semantic inference) -> scores
   [K, H, W];
4. the scores resized (bilinear, half-pixel centres) back to [H0, W0]. (The PyTorch model
   resizes the mask logits before the sigmoid instead; class maps agree except near boundaries.)

Class text embeddings come from ``tools/embed_names.py`` (``vocab.npz``, bitwise the PyTorch
model's) or from ``text_tower.onnx`` + :class:`ClipBpeTokenizer`: every template of
``export.json`` with the name put in, each prompt embedding unit-norm (the tower does that),
averaged per class and normalised again -- the project's prompt ensembling.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

try:
    from .tokenizer import ClipBpeTokenizer
except ImportError:  # loaded by path, outside the package: load the tokenizer next to this file
    _name = "c2s_export_tokenizer"
    if _name not in sys.modules:
        _spec = importlib.util.spec_from_file_location(
            _name, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.py")
        )
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[_name] = _module
        _spec.loader.exec_module(_module)
    ClipBpeTokenizer = sys.modules[_name].ClipBpeTokenizer

try:  # optional: the resize detectron2's DefaultPredictor uses
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

__all__ = [
    "ExportedStudent",
    "EXPORT_INFO",
    "colour_palette",
    "overlay",
    "parse_names",
    "read_export_info",
    "read_names_file",
    "read_vocab",
    "resize_shortest_edge_shape",
]

EXPORT_INFO = "export.json"
STUDENT_ONNX = "student.onnx"
TEXT_TOWER_ONNX = "text_tower.onnx"
TEXT_BATCH = 64  # prompts per text-tower run


# ------------------------------------------------------------------------------------ inputs
def parse_names(text: str, source: str = "--names") -> List[str]:
    """``"cat, dog,grass"`` -> ``["cat", "dog", "grass"]``; refuses empty and duplicate names
    (case-insensitive), like demo/demo.py's ``--vocabulary``."""
    names = [n.strip() for n in text.split(",")]
    return check_names(names, source, example=text)


def check_names(names: Sequence[str], source: str, example: Optional[str] = None) -> List[str]:
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        shown = example if example is not None else names
        raise ValueError(f"{source} {shown!r}: empty class name (give e.g. 'cat,dog,grass')")
    lowered = [n.lower() for n in names]
    dups = sorted({n for n in lowered if lowered.count(n) > 1})
    if dups:
        raise ValueError(f"{source}: duplicate class names {dups}")
    return names


def read_names_file(path: str) -> List[str]:
    """One class name per line; blank lines and lines starting with ``#`` are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--names-file not found: {path}")
    with open(path, "r", encoding="utf-8") as f:
        names = [line.strip() for line in f]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(f"--names-file {path}: no class names in it")
    return check_names(names, f"--names-file {path}")


def read_vocab(path: str) -> Tuple[List[str], np.ndarray]:
    """``vocab.npz`` of tools/embed_names.py -> (names, embeddings float32 [K, d])."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--vocab not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["names"]]
            emb = np.asarray(data["embeddings"], dtype=np.float32)
    except KeyError as e:
        raise ValueError(f"--vocab {path}: no {e} array (write it with tools/embed_names.py)")
    except (OSError, ValueError) as e:
        raise ValueError(f"--vocab {path}: not a vocabulary .npz file ({e})") from e
    if emb.ndim != 2 or emb.shape[0] != len(names) or emb.shape[0] == 0:
        raise ValueError(f"--vocab {path}: embeddings of shape {emb.shape} for {len(names)} names")
    if not np.isfinite(emb).all():
        raise ValueError(f"--vocab {path}: embeddings contain NaN/inf")
    return names, emb


def read_export_info(model_dir: str) -> Dict:
    """``<model_dir>/export.json`` (what tools/export_model.py wrote), checked."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {model_dir}: not a folder (give the export folder)")
    path = os.path.join(model_dir, EXPORT_INFO)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--model {model_dir}: no {EXPORT_INFO} (run tools/export_model.py)"
        )
    with open(path, "r", encoding="utf-8") as f:
        try:
            info = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from e
    need = ("input_format", "min_size_test", "max_size_test", "embed_dim", "templates")
    missing = [k for k in need if k not in info]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if info["input_format"] not in ("RGB", "BGR"):
        raise ValueError(f"{path}: input_format {info['input_format']!r} is not RGB or BGR")
    return info


def resize_shortest_edge_shape(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """(new_h, new_w) of detectron2's ``ResizeShortestEdge.get_output_shape``."""
    size = short * 1.0
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_image(image: np.ndarray, newh: int, neww: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [newh, neww, 3] as detectron2's ``ResizeTransform`` (PIL bilinear)."""
    h, w = image.shape[:2]
    if (h, w) == (newh, neww):
        return image
    if Image is not None:
        return np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))
    interp = cv2.INTER_AREA if newh * neww < h * w else cv2.INTER_LINEAR
    return cv2.resize(image, (neww, newh), interpolation=interp)


def resize_scores(scores: np.ndarray, h: int, w: int) -> np.ndarray:
    """[K, h0, w0] float32 -> [K, h, w], bilinear with half-pixel centres (like
    ``F.interpolate(align_corners=False)``), in chunks of 512 channels (OpenCV's limit)."""
    if scores.shape[1:] == (h, w):
        return scores
    out = np.empty((scores.shape[0], h, w), dtype=np.float32)
    for s in range(0, scores.shape[0], 512):
        chunk = np.ascontiguousarray(scores[s : s + 512].transpose(1, 2, 0))
        r = cv2.resize(chunk, (w, h), interpolation=cv2.INTER_LINEAR)
        out[s : s + 512] = r.reshape(h, w, -1).transpose(2, 0, 1)
    return out


# ------------------------------------------------------------------------------------ model
class ExportedStudent:
    """The exported student (and text tower) of one export folder, on ONNX Runtime."""

    def __init__(self, model_dir: str, threads: int = 1, providers: Sequence[str] = ()) -> None:
        """
        Args:
            model_dir: folder written by tools/export_model.py.
            threads: ONNX Runtime intra-op threads (inter-op: 1); 0 lets it choose.
            providers: ONNX Runtime execution providers (default: CPU).
        """
        import onnxruntime as ort

        self.info = read_export_info(model_dir)
        self.model_dir = model_dir
        path = os.path.join(model_dir, STUDENT_ONNX)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--model {model_dir}: no {STUDENT_ONNX} (export --format onnx)"
            )
        self._ort = ort
        self._providers = list(providers) or ["CPUExecutionProvider"]
        self._threads = int(threads)
        self.session = self._session(path)
        self._text_session = None
        self._tokenizer = None

    def _session(self, path: str):
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        return self._ort.InferenceSession(path, sess_options=opts, providers=self._providers)

    @property
    def embed_dim(self) -> int:
        return int(self.info["embed_dim"])

    # -------------------------------------------------------------- text
    def tokenizer(self) -> ClipBpeTokenizer:
        if self._tokenizer is None:
            tok = self.info.get("tokenizer") or {}
            if tok.get("type") != "clip_bpe":
                raise ValueError(
                    f"{EXPORT_INFO}: tokenizer {tok.get('type')!r} is not supported by the "
                    "torch-free runtime; give --vocab from tools/embed_names.py instead"
                )
            bpe = os.path.join(self.model_dir, tok["bpe_file"])
            if not os.path.isfile(bpe):
                raise FileNotFoundError(f"--model {self.model_dir}: no {tok['bpe_file']}")
            self._tokenizer = ClipBpeTokenizer(bpe, int(tok["context_length"]))
        return self._tokenizer

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """P prompts -> unit-norm prompt embeddings float32 [P, d] (text_tower.onnx)."""
        if self._text_session is None:
            path = os.path.join(self.model_dir, TEXT_TOWER_ONNX)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"--model {self.model_dir}: no {TEXT_TOWER_ONNX} (exported with "
                    "--skip-text-tower?); give --vocab from tools/embed_names.py instead"
                )
            self._text_session = self._session(path)
        tokens = self.tokenizer()(list(prompts))
        out = [
            self._text_session.run(None, {"tokens": tokens[s : s + TEXT_BATCH]})[0]
            for s in range(0, len(tokens), TEXT_BATCH)
        ]
        return np.concatenate(out, axis=0).astype(np.float32)

    def embed_names(self, names: Sequence[str]) -> np.ndarray:
        """Class names -> unit-norm class embeddings float32 [K, d], prompt-ensembled over the
        export's templates (``str.replace`` of ``{}``, as the project's text encoder)."""
        templates = list(self.info["templates"])
        prompts = [t.replace("{}", n) for n in names for t in templates]
        emb = self.encode_prompts(prompts).reshape(len(names), len(templates), -1)
        unit = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        mean = unit.mean(axis=1)
        return (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)).astype(
            np.float32
        )

    # -------------------------------------------------------------- image
    def preprocess(self, image_bgr: np.ndarray) -> np.ndarray:
        """uint8 BGR [H0, W0, 3] -> float32 [1, 3, H, W] as DefaultPredictor feeds the model."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 [H, W, 3] BGR image, got {image_bgr.dtype} {image_bgr.shape}"
            )
        image = image_bgr[:, :, ::-1] if self.info["input_format"] == "RGB" else image_bgr
        image = np.ascontiguousarray(image)
        h, w = image.shape[:2]
        short = self.info["min_size_test"]
        short = int(short[0] if isinstance(short, (list, tuple)) else short)
        newh, neww = resize_shortest_edge_shape(h, w, short, int(self.info["max_size_test"]))
        image = resize_image(image, newh, neww)
        return np.ascontiguousarray(image.astype(np.float32).transpose(2, 0, 1))[None]

    def run(self, image: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """student.onnx: float32 [1, 3, H, W] + [K, d] -> scores [K, H, W]."""
        emb = np.ascontiguousarray(text_embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim:
            raise ValueError(
                f"text embeddings of shape {emb.shape}: the student expects [K, {self.embed_dim}] "
                "(a vocabulary from another CLIP model?)"
            )
        return self.session.run(None, {"image": image, "text_embeddings": emb})[0]

    def predict(self, image_bgr: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """Scores float32 [K, H0, W0] at the original size of the BGR image."""
        scores = self.run(self.preprocess(image_bgr), text_embeddings)
        return resize_scores(scores, *image_bgr.shape[:2])

    def segment(self, image_bgr: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """Class map int64 [H0, W0] (indices into the vocabulary)."""
        return self.predict(image_bgr, text_embeddings).argmax(0)


# ------------------------------------------------------------------------------------ output
def colour_palette(k: int) -> np.ndarray:
    """k distinct BGR colours uint8 [k, 3] (golden-ratio hues, fixed per index)."""
    hues = (np.arange(k) * 0.618033988749895) % 1.0
    hsv = np.stack(
        [hues * 180, np.full(k, 200 + 55 * (np.arange(k) % 2)), np.full(k, 230)], axis=-1
    )
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2BGR)[0]


def overlay(image_bgr: np.ndarray, class_map: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """BGR uint8 [H, W, 3]: the image blended 50/50 with the class colours, each present class
    named at the centre of its largest area."""
    palette = colour_palette(len(names))
    out = (0.5 * image_bgr + 0.5 * palette[class_map]).astype(np.uint8)
    scale = max(0.3, min(image_bgr.shape[:2]) / 600)
    for k in np.unique(class_map):
        mask = (class_map == k).astype(np.uint8)
        n, labels, stats, centres = cv2.connectedComponentsWithStats(mask, connectivity=4)
        if n < 2:
            continue
        big = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        x, y = (int(v) for v in centres[big])
        for colour, width in (((0, 0, 0), 3), ((255, 255, 255), 1)):
            cv2.putText(out, names[k], (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, width,
                        cv2.LINE_AA)  # fmt: skip
    return out


def write_outputs(
    image_bgr: np.ndarray, class_map: np.ndarray, names: Sequence[str], stem: str
) -> Tuple[str, str]:
    """``<stem>.png`` (class indices: uint8, or uint16 above 256 classes) and
    ``<stem>_overlay.png``; returns both paths."""
    index = class_map.astype(np.uint8 if len(names) <= 256 else np.uint16)
    paths = (stem + ".png", stem + "_overlay.png")
    for path, array in zip(paths, (index, overlay(image_bgr, class_map, names))):
        if not cv2.imwrite(path, array):
            raise OSError(f"could not write {path}")
    return paths
