"""Build frozen open_clip models for the teacher and the text encoder.

This module and its siblings in ``c2s_d2.modeling.clip`` are the only code that imports open_clip.

Weights (``pretrained``) come from one of:

* an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``): downloaded by open_clip;
* a tag of weights shipped with this package (``SHIPPED_WEIGHTS``), e.g. ``"miniworld"`` for
  ``C2S-Tiny-Text32``: the tiny CLIP that tools/pretrain_miniworld_clip.py trained on the
  mini-world, the teacher of ``make run``;
* a local checkpoint file (any value with a path separator or a ``.pt/.pth/.bin/.safetensors``
  suffix): an open_clip state dict, or one of OpenAI's original TorchScript archives
  (``ViT-B-16.pt``);
* ``""``: random weights, deterministic given ``random_init_seed`` (tests, the mini-world);
* nothing, when ``model_name`` is ``"hf-hub:org/repo"``: the hub repository's own weights.

Activation (``quick_gelu``, config key ``MODEL.CLIP.QUICK_GELU``): OpenAI trained CLIP with
QuickGELU (``x * sigmoid(1.702 x)``), most other weights use GELU, and a state dict does not say
which. ``"auto"`` takes it from the pretrained tag (open_clip's ``openai`` tags say QuickGELU),
from the file when the file records it (a TorchScript archive keeps its modules' class names; a
state dict extracted from OpenAI's archive keeps its ``input_resolution`` / ``context_length`` /
``vocab_size`` entries), else from the architecture (``*-quickgelu`` names). A plain state dict of
an architecture for which open_clip knows QuickGELU-trained weights (``ViT-B-16``: ``openai``,
``metaclip_*``...) and GELU ones is ambiguous and refused: set ``"true"`` or ``"false"``.

Random weights are defined tower by tower so that a text-only build and a full build agree: the
text tower is the one open_clip builds right after ``torch.manual_seed(seed)``; the image tower
is the one ``open_clip.create_model`` builds after the same seed. Both run in a forked RNG, so the
caller's global RNG state is untouched.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickletools
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from open_clip.convert import convert_state_dict
from open_clip.model import _build_text_tower, convert_to_custom_text_state_dict
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from torch import nn

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
HF_HUB_PREFIX = "hf-hub:"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# (model name, tag) -> file in SHIPPED_WEIGHTS_DIR, in open_clip's state-dict format
SHIPPED_WEIGHTS: Dict[Tuple[str, str], str] = {
    ("C2S-Tiny-Text32", "miniworld"): "C2S-Tiny-Text32_miniworld.pt",
}

QUICK_GELU_KEY = "MODEL.CLIP.QUICK_GELU"
# entries of OpenAI's TorchScript CLIP state dicts that are not weights
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
BIG_VISION_SUFFIXES = (".npz", ".npy")  # SigLIP weights, read by open_clip itself

_registered_config_paths: Set[str] = set()


# ------------------------------------------------------------------------------------ registry
def _register_package_configs() -> None:
    """Make the package's own architectures (``C2S-Tiny``...) known to open_clip, once."""
    if str(MODEL_CONFIG_DIR) not in _registered_config_paths:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered_config_paths.add(str(MODEL_CONFIG_DIR))


def _resolve_config_file(path: str) -> Path:
    """Find an architecture JSON: absolute, else in the package's model_configs/, else cwd."""
    candidates = []
    p = Path(os.path.expanduser(path))
    names = [p] if p.suffix == ".json" else [p, p.with_name(p.name + ".json")]
    for name in names:
        if name.is_absolute():
            candidates.append(name)
        else:
            candidates += [MODEL_CONFIG_DIR / name, Path.cwd() / name]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"open_clip model config {path!r} not found (looked at: {looked})")


def register_model_configs(paths: Sequence[str]) -> List[str]:
    """Register open_clip architecture JSON files; returns the model names they define.

    A relative path (or a bare name such as ``"C2S-Tiny"``) is looked up in the package's
    ``model_configs/`` folder first, then in the current directory. The model name is the file
    stem, as in open_clip.
    """
    _register_package_configs()
    names = []
    for path in paths:
        resolved = _resolve_config_file(str(path))
        try:
            with open(resolved, "r", encoding="utf-8") as f:
                model_cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"open_clip model config {resolved} is not valid JSON: {e}") from e
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
        if missing:
            # open_clip would skip such a file silently; say why the model stays unknown.
            raise ValueError(f"open_clip model config {resolved} lacks keys {missing}")
        in_package_dir = resolved.parent == MODEL_CONFIG_DIR
        if str(resolved) not in _registered_config_paths and not in_package_dir:
            open_clip.add_model_config(resolved)
            _registered_config_paths.add(str(resolved))
        names.append(resolved.stem)
    return names


def _unknown_model_error(model_name: str) -> ValueError:
    close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
    hint = f" Close matches: {close}." if close else ""
    return ValueError(
        f"unknown open_clip model {model_name!r}.{hint} Use a name from open_clip.list_models(), "
        f"'hf-hub:org/repo', or register an architecture JSON with register_model_configs() "
        f"(config key MODEL.CLIP.MODEL_CONFIG_FILES; files in {MODEL_CONFIG_DIR} are found "
        f"by name)."
    )


def get_model_config(model_name: str, config_files: Sequence[str] = ()) -> Dict:
    """The open_clip architecture dict of a registered (non hf-hub) model name."""
    register_model_configs(config_files)
    model_cfg = open_clip.get_model_config(model_name.replace("/", "-"))
    if model_cfg is None:
        raise _unknown_model_error(model_name)
    return model_cfg


# ------------------------------------------------------------------------------------ weights
def is_checkpoint_path(pretrained: str) -> bool:
    """True when ``pretrained`` names a file rather than an open_clip tag."""
    seps = [s for s in ("/", os.sep, os.altsep) if s]
    return any(s in pretrained for s in seps) or pretrained.lower().endswith(CHECKPOINT_SUFFIXES)


def shipped_weights_file(model_name: str, pretrained: str) -> Optional[str]:
    """The packaged checkpoint of ``(model_name, pretrained)``, or None when it is not one."""
    name = SHIPPED_WEIGHTS.get((model_name, pretrained))
    if name is None:
        return None
    path = SHIPPED_WEIGHTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped CLIP weights {model_name}/{pretrained} missing: {path} (reinstall c2s-d2, "
            f"or recreate them with tools/pretrain_miniworld_clip.py --model {model_name})"
        )
    return str(path)


def parse_quick_gelu(value: Union[str, bool, None]) -> Optional[bool]:
    """``MODEL.CLIP.QUICK_GELU`` -> ``None`` ("auto"), ``True`` ("true") or ``False`` ("false")."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return None if text == "auto" else text == "true"
    raise ValueError(
        f"{QUICK_GELU_KEY} {value!r}: expected 'auto', 'true' (QuickGELU, as OpenAI trained CLIP) "
        f"or 'false' (GELU)"
    )


def weights_identity(
    pretrained: str, seed: int = 0, model_name: str = "", quick_gelu: Union[str, bool] = "auto"
) -> str:
    """A string naming the weights, for cache keys.

    ``"tag:<tag>"``, ``"file:<abs path>:<size>:<mtime_ns>:act=<quick_gelu>"`` (so a rewritten
    checkpoint changes it), ``"shipped:<tag>:<sha256 prefix>"``, ``"random:<seed>"``, or
    ``"hf-hub"`` for hub models (their name already says it). An explicit ``quick_gelu``
    (``"true"``/``"false"``) adds ``":quick_gelu=<value>"``: the activation changes the features.
    """
    setting = parse_quick_gelu(quick_gelu)
    suffix = "" if setting is None else f":quick_gelu={str(setting).lower()}"
    if model_name.startswith(HF_HUB_PREFIX):
        return "hf-hub" + suffix
    if not pretrained:
        return f"random:{int(seed)}" + suffix
    shipped = shipped_weights_file(model_name, pretrained)
    if shipped is not None:
        import hashlib

        with open(shipped, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        return f"shipped:{pretrained}:{digest}" + suffix
    if is_checkpoint_path(pretrained):
        path = os.path.abspath(os.path.expanduser(pretrained))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP checkpoint file not found: {pretrained}")
        st = os.stat(path)
        # "act=": files were read with GELU before the activation was decided per file
        act = "auto" if setting is None else str(setting).lower()
        return f"file:{path}:{st.st_size}:{st.st_mtime_ns}:act={act}"
    return f"tag:{pretrained}" + suffix


def _short(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to ``limit`` characters."""
    text = " ".join(str(e).split())
    text = text.split(". ")[0]
    return (text[:limit] + "...") if len(text) > limit else text


@dataclass
class _ResolvedModel:
    """What a model name + ``pretrained`` value resolve to, before anything is built."""

    model_cfg: Dict
    checkpoint: Optional[str]  # local file with the weights (None: random or a tag)
    quick_gelu: bool  # what the architecture (and the tag) say; see _decide_quick_gelu
    tag_cfg: Optional[Dict] = None  # open_clip's entry for a pretrained tag
    tag: str = ""
    model_name: str = ""
    source: str = "random"  # "random", "tag", "shipped", "file" or "hf-hub"

    def checkpoint_file(self) -> Optional[str]:
        """The local weights file; downloads (or finds in open_clip's cache) a tag's file."""
        if self.tag_cfg is not None:
            from open_clip.pretrained import download_pretrained

            try:
                return download_pretrained(self.tag_cfg)
            except Exception as e:  # offline machines land here: say what to do instead
                raise FileNotFoundError(self._offline_message(e)) from e
        return self.checkpoint

    def _offline_message(self, e: BaseException) -> str:
        url, hint = self.tag_cfg.get("url", ""), ""
        if not url and self.tag_cfg.get("hf_hub"):
            url = "https://huggingface.co/" + self.tag_cfg["hf_hub"].rstrip("/")
            if self.tag_cfg.get("quick_gelu"):
                hint = f", and {QUICK_GELU_KEY} true (these weights were trained with QuickGELU)"
        where = f"download {url}" if url else "download the weights file"
        return (
            f"could not download the CLIP weights {self.model_name} / tag {self.tag!r} "
            f"({type(e).__name__}: {_short(e)}); {where} and set MODEL.CLIP.PRETRAINED to the "
            f"file's path{hint}"
        )


def _resolve_hf_hub(repo_id: str) -> Tuple[Dict, str]:
    """(model_cfg, checkpoint path) of an hf-hub repository, downloaded by open_clip."""
    from open_clip.pretrained import download_pretrained_from_hf

    model_cfg = open_clip.get_model_config(HF_HUB_PREFIX + repo_id)
    return model_cfg, download_pretrained_from_hf(repo_id)


def _resolve(model_name: str, pretrained: str, config_files: Sequence[str]) -> _ResolvedModel:
    register_model_configs(config_files)
    if model_name.startswith(HF_HUB_PREFIX):
        if pretrained:
            logger.warning(
                "pretrained=%r ignored: %s brings its own weights", pretrained, model_name
            )
        try:
            model_cfg, checkpoint = _resolve_hf_hub(model_name[len(HF_HUB_PREFIX) :])
        except Exception as e:  # offline, or no such repository
            raise FileNotFoundError(
                f"could not download {model_name} ({type(e).__name__}: {_short(e)}); download "
                f"the repository's open_clip weights file and set MODEL.CLIP.PRETRAINED to its "
                f"path, with MODEL.CLIP.MODEL_NAME the architecture it was trained with"
            ) from e
        return _ResolvedModel(
            model_cfg, checkpoint, bool(model_cfg.get("quick_gelu")), None, "", model_name, "hf-hub"
        )
    model_cfg = get_model_config(model_name)
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if not pretrained:
        return _ResolvedModel(model_cfg, None, quick_gelu, model_name=model_name)
    shipped = shipped_weights_file(model_name, pretrained)
    if shipped is not None:
        return _ResolvedModel(
            model_cfg, shipped, quick_gelu, model_name=model_name, source="shipped"
        )
    if is_checkpoint_path(pretrained):
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP checkpoint file not found: {pretrained}")
        return _ResolvedModel(model_cfg, path, quick_gelu, model_name=model_name, source="file")
    tag_cfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
        tags += [t for m, t in SHIPPED_WEIGHTS if m == model_name]
        raise ValueError(
            f"unknown open_clip pretrained tag {pretrained!r} for model {model_name!r} "
            f"(known tags: {tags}); give a tag, a checkpoint file path, or '' for random weights"
        )
    quick_gelu = quick_gelu or bool(tag_cfg.get("quick_gelu", False))
    return _ResolvedModel(model_cfg, None, quick_gelu, tag_cfg, pretrained, model_name, "tag")


# ------------------------------------------------------------------------------------ files
@dataclass
class ClipCheckpoint:
    """The weights of a CLIP checkpoint file and what the file says about itself."""

    path: str
    state_dict: Dict[str, torch.Tensor]
    form: str  # "torchscript", "openai-state-dict" or "state-dict"
    quick_gelu: Optional[bool]  # the activation the file records (None: it does not say)


def _is_torchscript_archive(path: str) -> bool:
    """TorchScript archives (``torch.jit.save``, OpenAI's CLIP files) hold ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())


def _script_activation(module: torch.jit.ScriptModule) -> Optional[bool]:
    """QuickGELU (True) or GELU (False) from the class names kept in a TorchScript module."""
    names = {getattr(m, "original_name", type(m).__name__) for m in module.modules()}
    quick, gelu = "QuickGELU" in names, "GELU" in names
    return quick if quick != gelu else None


def _pickle_strings(path: str, limit: int = 200_000) -> Tuple[Set[str], List[str]]:
    """(strings, globals) named in the pickle of a ``torch.save`` file, read without running it.

    ``globals`` are the ``module.name`` of the Python objects the pickle would build.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
            data = z.read(names[0]) if names else b""
    else:
        with open(path, "rb") as f:
            data = f.read(4 << 20)
    strings: Set[str] = set()
    found: List[str] = []
    recent: List[str] = []
    try:
        for i, (op, arg, _) in enumerate(pickletools.genops(data)):
            if i > limit:
                break
            if isinstance(arg, str):
                strings.add(arg)
                recent = (recent + [arg])[-2:]
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(recent) == 2:
                found.append(".".join(recent))
    except Exception:  # a torn or unknown stream: what was read so far is enough
        pass
    return strings, found


_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x93NUMPY", "a NumPy .npy array"),
)


def _describe_unreadable(path: str) -> str:
    """What a file that torch.load cannot read looks like, for the error message."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        return "an empty file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if zipfile.is_zipfile(path):
        return "a zip archive that is not a PyTorch checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data (not a PyTorch, TorchScript or safetensors file)"
    first = next((line for line in text.splitlines() if line.strip()), "")
    return f"a text file (it starts with {first.strip()[:40]!r})"


_EXPECTED = (
    "expected CLIP weights: an open_clip state dict (.pt/.bin/.safetensors) or one of OpenAI's "
    "TorchScript .pt files"
)
_D2_MARKERS = {
    "iteration",
    "optimizer",
    "scheduler",
    "trainer",
    "__author__",
    "matching_heuristics",
}
_D2_MODEL_PREFIXES = (
    "backbone.",
    "sem_seg_head.",
    "pixel_decoder.",
    "query_decoder.",
    "roi_heads.",
)


def _not_clip(path: str, what: str) -> ValueError:
    return ValueError(f"MODEL.CLIP.PRETRAINED {path} {what}; {_EXPECTED}")


def _detectron2_error(path: str, keys: Sequence[str]) -> ValueError:
    shown = ", ".join(repr(k) for k in sorted(keys)[:6])
    return _not_clip(
        path,
        f"looks like a detectron2 checkpoint (top-level keys {shown}), e.g. a c2s-d2 student, "
        f"which goes to MODEL.WEIGHTS",
    )


def _looks_like_clip(keys: Sequence[str]) -> bool:
    roots = ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale")
    # image_encoder. / text_encoder.: third-party layouts that open_clip converts (MobileCLIP)
    prefixes = ("visual.", "text.", "image_encoder.", "text_encoder.")
    return any(k.startswith(prefixes) or k in roots for k in keys)


def read_clip_checkpoint(path: str) -> ClipCheckpoint:
    """Read a CLIP checkpoint file: an open_clip state dict (``.pt``/``.bin``/``.safetensors``,
    optionally under ``"state_dict"``, keys optionally prefixed by ``module.``) or a TorchScript
    archive such as OpenAI's ``ViT-B-16.pt``.

    Refuses, with one line naming the file and what it looks like: unreadable files (an image,
    a text file...), detectron2 checkpoints (a student) and state dicts without CLIP keys.
    """
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return _checked(path, load_file(path, device="cpu"), "state-dict")
        except Exception as e:
            raise _not_clip(path, f"is not a readable safetensors file ({_short(e)})") from e
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": still the reader
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            msg = f"is a TorchScript archive that cannot be loaded ({_short(e)})"
            raise _not_clip(path, msg) from e
        state_dict = dict(module.state_dict())
        info = _checked(path, state_dict, "torchscript")
        info.quick_gelu = _script_activation(module)
        return info
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not zipfile.is_zipfile(path) and not _is_legacy_pickle(path):
            raise _not_clip(path, f"is not a PyTorch checkpoint: it looks like "
                            f"{_describe_unreadable(path)}") from e  # fmt: skip
        strings, found = _pickle_strings(path)
        if "model" in strings and strings & _D2_MARKERS:
            raise _detectron2_error(path, ["model", *sorted(strings & _D2_MARKERS)]) from e
        allowed = ("torch._utils.", "torch._tensor.", "collections.", "__builtin__.", "builtins.")
        objects = ", ".join(
            dict.fromkeys(g for g in found if not g.startswith(allowed) and "Storage" not in g)
        )
        raise _not_clip(
            path,
            f"holds Python objects that torch.load(weights_only=True) refuses "
            f"({objects[:120] or _short(e)}): save a state dict instead",
        ) from e
    return _checked(path, obj, "state-dict")


def _is_legacy_pickle(path: str) -> bool:
    """Pre-zip ``torch.save`` files and plain pickles start with the pickle PROTO opcode."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _checked(path: str, obj, form: str) -> ClipCheckpoint:
    """Unwrap a loaded object into a CLIP state dict, refusing what is not one."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        raise _detectron2_error(path, list(obj.keys()))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # open_clip training checkpoints
    if not isinstance(obj, dict) or not obj:
        raise _not_clip(path, f"holds {type(obj).__name__ if obj else 'nothing'}, not a state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    keys = list(obj.keys())
    if not _looks_like_clip(keys):
        what = f"holds {len(keys)} entries but no CLIP weights (first keys: {keys[:4]})"
        if any(k.startswith(_D2_MODEL_PREFIXES) for k in keys):
            what = f"looks like the weights of a detectron2 model (keys {keys[:3]}...)"
        raise _not_clip(path, what)
    quick_gelu = None
    if all(k in obj for k in OPENAI_EXTRA_KEYS):  # a state dict of OpenAI's TorchScript model
        form, quick_gelu = ("openai-state-dict" if form == "state-dict" else form), True
    state_dict = {k: v for k, v in obj.items() if k not in OPENAI_EXTRA_KEYS}
    return ClipCheckpoint(path, state_dict, form, quick_gelu)


def _quick_gelu_tags(model_name: str) -> Tuple[List[str], List[str]]:
    """(QuickGELU tags, GELU tags) open_clip knows for the architecture ``model_name``."""
    name = model_name.replace("/", "-")
    quick, gelu = [], []
    for tag in open_clip.list_pretrained_tags_by_model(name):
        (quick if open_clip.get_pretrained_cfg(name, tag).get("quick_gelu") else gelu).append(tag)
    return quick, gelu


def _decide_quick_gelu(
    resolved: _ResolvedModel, setting: Optional[bool], ckpt: Optional[ClipCheckpoint]
) -> bool:
    """The activation to build: the explicit setting, else what the tag, file or config say.

    Refuses a plain state dict of an architecture with both QuickGELU- and GELU-trained weights.
    """
    file_says = ckpt.quick_gelu if ckpt is not None and resolved.source == "file" else None
    if setting is not None:
        if file_says is not None and file_says != setting:
            logger.warning(
                "%s %s overrides the file: %s records %s",
                QUICK_GELU_KEY,
                str(setting).lower(),
                ckpt.path,
                "QuickGELU" if file_says else "GELU",
            )
        return setting
    if resolved.source != "file":
        return resolved.quick_gelu
    if file_says is not None:
        return file_says
    if ckpt is None:  # big_vision files: read by open_clip, the architecture decides
        return resolved.quick_gelu
    if resolved.quick_gelu:
        return True  # the architecture itself is a QuickGELU one ("ViT-B-16-quickgelu")
    quick_tags, gelu_tags = _quick_gelu_tags(resolved.model_name)
    if quick_tags:
        if ckpt.form == "torchscript":
            kind = "a TorchScript archive naming neither GELU nor QuickGELU"
        else:
            kind = "a state dict, which does not record the activation"
        raise ValueError(
            f"cannot tell whether CLIP checkpoint {ckpt.path} ({resolved.model_name}) was trained "
            f"with QuickGELU (like open_clip tags {quick_tags[:3]}) or GELU (like "
            f"{gelu_tags[:2] or 'other weights'}): it is {kind}; set {QUICK_GELU_KEY} true "
            f"(e.g. OpenAI's weights) or false"
        )
    return False


# ------------------------------------------------------------------------------------ towers
class ClipTextTower(nn.Module):
    """The text tower of an open_clip model, built without its image tower.

    ``encode_text`` matches ``open_clip.CLIP.encode_text`` on the same weights.
    """

    def __init__(self, text: nn.Module, model_name: str = "") -> None:
        super().__init__()
        self.text = text
        self.model_name = model_name
        self.context_length = getattr(text, "context_length", None)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens [N, L] int64 -> text embeddings [N, d] (unit norm when ``normalize``)."""
        out = self.text(tokens)
        if isinstance(out, tuple):  # towers configured with output_tokens return (pooled, tokens)
            out = out[0]
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)


def _uses_custom_text(model_cfg: Dict) -> bool:
    """Whether open_clip builds a CustomTextCLIP (text tower under ``.text``) for this config."""
    return bool(model_cfg.get("custom_text")) or "hf_model_name" in model_cfg.get("text_cfg", {})


def _random_text_tower(model_cfg: Dict, quick_gelu: bool, seed: int) -> nn.Module:
    text_cfg = dict(model_cfg["text_cfg"])
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # weights come from our checkpoint or the seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=quick_gelu)


def _text_state_dict(ckpt: ClipCheckpoint, tower: nn.Module, custom_text: bool) -> Dict:
    """The text-tower part of a CLIP checkpoint, with the tower's own key names."""
    state_dict = dict(ckpt.state_dict)
    if custom_text:
        state_dict = convert_to_custom_text_state_dict(state_dict)
    if hasattr(tower, "positional_embedding"):
        _resize(ckpt.path, resize_text_pos_embed, state_dict, tower)
    prefix = "text." if custom_text else ""
    wanted = set(tower.state_dict().keys())
    text_sd = {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix) and k[len(prefix) :] in wanted
    }
    missing = sorted(wanted - set(text_sd))
    if missing:
        raise ValueError(f"CLIP checkpoint {ckpt.path} lacks text-tower keys {missing[:8]}")
    _check_shapes(ckpt.path, text_sd, tower.state_dict())
    return text_sd


def _resize(path: str, resize_fn, state_dict: Dict, model: nn.Module) -> None:
    """open_clip's positional-embedding interpolation; its width asserts become one line."""
    try:
        resize_fn(state_dict, model)
    except AssertionError as e:
        raise ValueError(
            f"CLIP checkpoint {path} does not fit the architecture (MODEL.CLIP.MODEL_NAME): {e}"
        ) from e


def _check_shapes(path: str, loaded: Dict, expected: Dict) -> None:
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in loaded.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(
            f"CLIP checkpoint {path} does not fit the architecture (MODEL.CLIP.MODEL_NAME): "
            f"shapes in the file vs the model: {wrong[:4]}"
        )


def _load_full_state_dict(model: nn.Module, ckpt: ClipCheckpoint) -> None:
    """Load every weight of ``model`` from ``ckpt`` (as open_clip's ``load_checkpoint`` does)."""
    state_dict = convert_state_dict(model, dict(ckpt.state_dict))
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for name in ("logit_scale", "logit_bias"):
        own = getattr(model, name, None)
        if name in state_dict and own is not None and own.ndim != state_dict[name].ndim:
            state_dict[name] = state_dict[name].reshape(own.shape)
    if "logit_bias" not in state_dict and getattr(model, "logit_bias", None) is not None:
        state_dict["logit_bias"] = torch.zeros_like(model.logit_bias)
    _resize(ckpt.path, resize_pos_embed, state_dict, model)
    _resize(ckpt.path, resize_text_pos_embed, state_dict, model)
    expected = model.state_dict()
    # TorchScript archives also save buffers that open_clip keeps out of its state dicts
    transient = {n for n, _ in model.named_buffers()} - set(expected)
    state_dict = {k: v for k, v in state_dict.items() if k not in transient}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"CLIP checkpoint {ckpt.path} does not fit the architecture (MODEL.CLIP.MODEL_NAME): "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    _check_shapes(ckpt.path, state_dict, expected)
    model.load_state_dict(state_dict, strict=True)


class _NoRandomInitWarning(logging.Filter):
    """Hide open_clip's "Model initialized randomly" when the weights are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _create_then_load(model_name: str, quick_gelu: bool) -> nn.Module:
    """open_clip's model with random weights (from the global RNG), to be filled from a file."""
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(
            model_name,
            pretrained=None,
            load_weights=False,
            pretrained_text=False,
            quick_gelu=quick_gelu,
        )
    finally:
        root.removeFilter(quiet)


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def build_open_clip(
    model_name: str,
    pretrained: str,
    random_init_seed: int = 0,
    config_files: Sequence[str] = (),
    text_only: bool = False,
    quick_gelu: Union[str, bool, None] = "auto",
) -> Union[nn.Module, ClipTextTower]:
    """Build a frozen (eval mode, ``requires_grad=False``) open_clip model on the CPU.

    Args:
        model_name: open_clip architecture name (``"ViT-B-16"``, ``"C2S-Tiny"``) or
            ``"hf-hub:org/repo"``.
        pretrained: open_clip tag, local checkpoint file (open_clip state dict or OpenAI
            TorchScript archive), or ``""`` for random weights.
        random_init_seed: seed of the random weights (used when ``pretrained == ""``).
        config_files: architecture JSON files to register first (see ``register_model_configs``).
        text_only: build only the text tower (a ``ClipTextTower``); the image tower is never
            constructed and only the text keys of the checkpoint are used.
        quick_gelu: ``"auto"`` (see the module docstring), ``"true"`` (QuickGELU) or ``"false"``
            (GELU): config key ``MODEL.CLIP.QUICK_GELU``.

    Returns:
        The open_clip model (``encode_image``/``encode_text``/``.visual``) or a ``ClipTextTower``.
    """
    setting = parse_quick_gelu(quick_gelu)
    resolved = _resolve(model_name, pretrained, config_files)
    custom_text = _uses_custom_text(resolved.model_cfg)
    path = resolved.checkpoint_file()  # before building: fail fast when offline
    big_vision = bool(path) and path.lower().endswith(BIG_VISION_SUFFIXES)
    ckpt = read_clip_checkpoint(path) if path and not big_vision else None
    act = _decide_quick_gelu(resolved, setting, ckpt)
    weights = pretrained or ("hub" if resolved.source == "hf-hub" else "random")
    if text_only:
        if big_vision:
            raise ValueError(f"CLIP checkpoint {path}: big_vision files load as full models only")
        tower = _random_text_tower(resolved.model_cfg, act, random_init_seed)
        if ckpt is not None:
            tower.load_state_dict(_text_state_dict(ckpt, tower, custom_text), strict=True)
        logger.info("built the text tower of %s (weights: %s, quick_gelu: %s)", model_name,
                    weights, act)  # fmt: skip
        return _freeze(ClipTextTower(tower, model_name))

    if ckpt is None and not big_vision:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_init_seed)
            # pretrained_text=False: no base weights download for HF text towers either.
            model = open_clip.create_model(
                model_name, pretrained=None, pretrained_text=False, quick_gelu=act
            )
        # Same text weights as a text-only build with this seed (see the module docstring).
        text = _random_text_tower(resolved.model_cfg, act, random_init_seed)
        target = model.text if custom_text else model
        unexpected = target.load_state_dict(text.state_dict(), strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"text tower keys {unexpected[:8]} not found in {model_name}")
    elif big_vision:
        model = open_clip.create_model(model_name, pretrained=path, quick_gelu=act)
    else:
        # Built from the global RNG (as open_clip.create_model(pretrained=file) did), then
        # every weight comes from the file.
        model = _create_then_load(model_name, act)
        _load_full_state_dict(model, ckpt)
    logger.info("built %s (weights: %s, quick_gelu: %s)", model_name, weights, act)
    return _freeze(model)


def get_tokenizer(model_name: str, config_files: Sequence[str] = ()):
    """open_clip's tokenizer for ``model_name``: ``tokenizer(list[str]) -> [N, L]`` int64."""
    if not model_name.startswith(HF_HUB_PREFIX):
        get_model_config(model_name, config_files)  # clear error for unknown names
    return open_clip.get_tokenizer(model_name)
