"""Build frozen open_clip models for the teacher and the text encoder.

This module and its siblings in ``c2s_d2.modeling.clip`` are the only code that imports open_clip.

Weights (``pretrained``) come from one of:

* an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``): downloaded by open_clip;
* a tag of weights shipped with this package (``SHIPPED_WEIGHTS``), e.g. ``"miniworld"`` for
  ``C2S-Tiny-Text32``: the tiny CLIP that tools/pretrain_miniworld_clip.py trained on the
  mini-world, the teacher of ``make run``;
* a local checkpoint file (any value with a path separator or a ``.pt/.pth/.bin/.safetensors``
  suffix), in open_clip's state-dict format;
* ``""``: random weights, deterministic given ``random_init_seed`` (tests, the mini-world);
* nothing, when ``model_name`` is ``"hf-hub:org/repo"``: the hub repository's own weights.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict as _open_clip_load_state_dict
from open_clip.model import _build_text_tower, convert_to_custom_text_state_dict
from open_clip.model import resize_text_pos_embed
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


def weights_identity(pretrained: str, seed: int = 0, model_name: str = "") -> str:
    """A string naming the weights, for cache keys.

    ``"tag:<tag>"``, ``"file:<abs path>:<size>:<mtime_ns>"`` (so a rewritten checkpoint changes
    it), ``"shipped:<tag>:<sha256 prefix>"``, ``"random:<seed>"``, or ``"hf-hub"`` for hub models
    (their name already says it).
    """
    if model_name.startswith(HF_HUB_PREFIX):
        return "hf-hub"
    if not pretrained:
        return f"random:{int(seed)}"
    shipped = shipped_weights_file(model_name, pretrained)
    if shipped is not None:
        import hashlib

        with open(shipped, "rb") as f:
            return f"shipped:{pretrained}:{hashlib.sha256(f.read()).hexdigest()[:16]}"
    if is_checkpoint_path(pretrained):
        path = os.path.abspath(os.path.expanduser(pretrained))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP checkpoint file not found: {pretrained}")
        st = os.stat(path)
        return f"file:{path}:{st.st_size}:{st.st_mtime_ns}"
    return f"tag:{pretrained}"


@dataclass
class _ResolvedModel:
    """What a model name + ``pretrained`` value resolve to, before anything is built."""

    model_cfg: Dict
    checkpoint: Optional[str]  # local file with open_clip weights (None: random or a tag)
    quick_gelu: bool  # OpenAI tags were trained with QuickGELU; their configs may not say so
    tag_cfg: Optional[Dict] = None  # open_clip's entry for a pretrained tag
    tag: str = ""

    def checkpoint_file(self) -> Optional[str]:
        """The local weights file; downloads (or finds in open_clip's cache) a tag's file."""
        if self.tag_cfg is not None:
            from open_clip.pretrained import download_pretrained

            try:
                return download_pretrained(self.tag_cfg)
            except Exception as e:  # offline machines land here: say what to do instead
                raise RuntimeError(
                    f"could not fetch the CLIP weights of tag {self.tag!r} ({e}); set "
                    f"MODEL.CLIP.PRETRAINED to a local checkpoint file, or '' for random weights"
                ) from e
        return self.checkpoint


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
        model_cfg, checkpoint = _resolve_hf_hub(model_name[len(HF_HUB_PREFIX) :])
        return _ResolvedModel(model_cfg, checkpoint, bool(model_cfg.get("quick_gelu")))
    model_cfg = get_model_config(model_name)
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if not pretrained:
        return _ResolvedModel(model_cfg, None, quick_gelu)
    shipped = shipped_weights_file(model_name, pretrained)
    if shipped is not None:
        return _ResolvedModel(model_cfg, shipped, quick_gelu)
    if is_checkpoint_path(pretrained):
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP checkpoint file not found: {pretrained}")
        return _ResolvedModel(model_cfg, path, quick_gelu)
    tag_cfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
        tags += [t for m, t in SHIPPED_WEIGHTS if m == model_name]
        raise ValueError(
            f"unknown open_clip pretrained tag {pretrained!r} for model {model_name!r} "
            f"(known tags: {tags}); give a tag, a checkpoint file path, or '' for random weights"
        )
    quick_gelu = quick_gelu or bool(tag_cfg.get("quick_gelu", False))
    return _ResolvedModel(model_cfg, None, quick_gelu, tag_cfg, pretrained)


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


def _text_state_dict(checkpoint: str, tower: nn.Module, custom_text: bool) -> Dict:
    """The text-tower part of an open_clip checkpoint, with the tower's own key names."""
    state_dict = _open_clip_load_state_dict(checkpoint)
    if custom_text:
        state_dict = convert_to_custom_text_state_dict(state_dict)
    if hasattr(tower, "positional_embedding"):
        resize_text_pos_embed(state_dict, tower)
    prefix = "text." if custom_text else ""
    wanted = set(tower.state_dict().keys())
    text_sd = {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix) and k[len(prefix) :] in wanted
    }
    missing = sorted(wanted - set(text_sd))
    if missing:
        raise RuntimeError(f"CLIP checkpoint {checkpoint} lacks text-tower keys {missing[:8]}")
    return text_sd


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def build_open_clip(
    model_name: str,
    pretrained: str,
    random_init_seed: int = 0,
    config_files: Sequence[str] = (),
    text_only: bool = False,
) -> Union[nn.Module, ClipTextTower]:
    """Build a frozen (eval mode, ``requires_grad=False``) open_clip model on the CPU.

    Args:
        model_name: open_clip architecture name (``"ViT-B-16"``, ``"C2S-Tiny"``) or
            ``"hf-hub:org/repo"``.
        pretrained: open_clip tag, local checkpoint file, or ``""`` for random weights.
        random_init_seed: seed of the random weights (used when ``pretrained == ""``).
        config_files: architecture JSON files to register first (see ``register_model_configs``).
        text_only: build only the text tower (a ``ClipTextTower``); the image tower is never
            constructed and only the text keys of the checkpoint are read.

    Returns:
        The open_clip model (``encode_image``/``encode_text``/``.visual``) or a ``ClipTextTower``.
    """
    resolved = _resolve(model_name, pretrained, config_files)
    custom_text = _uses_custom_text(resolved.model_cfg)
    if text_only:
        checkpoint = resolved.checkpoint_file()  # before building: fail fast when offline
        tower = _random_text_tower(resolved.model_cfg, resolved.quick_gelu, random_init_seed)
        if checkpoint:
            tower.load_state_dict(_text_state_dict(checkpoint, tower, custom_text), strict=True)
        logger.info("built the text tower of %s (weights: %s)", model_name, pretrained or "random")
        return _freeze(ClipTextTower(tower, model_name))

    if model_name.startswith(HF_HUB_PREFIX):
        model = open_clip.create_model(model_name)
    elif not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_init_seed)
            # pretrained_text=False: no base weights download for HF text towers either.
            model = open_clip.create_model(model_name, pretrained=None, pretrained_text=False)
        # Same text weights as a text-only build with this seed (see the module docstring).
        text = _random_text_tower(resolved.model_cfg, resolved.quick_gelu, random_init_seed)
        target = model.text if custom_text else model
        unexpected = target.load_state_dict(text.state_dict(), strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"text tower keys {unexpected[:8]} not found in {model_name}")
    else:
        # A tag goes to open_clip by name (it downloads and checks the file itself).
        source = resolved.checkpoint or pretrained
        model = open_clip.create_model(
            model_name, pretrained=source, force_quick_gelu=resolved.quick_gelu
        )
    logger.info("built %s (weights: %s)", model_name, pretrained or "random")
    return _freeze(model)


def get_tokenizer(model_name: str, config_files: Sequence[str] = ()):
    """open_clip's tokenizer for ``model_name``: ``tokenizer(list[str]) -> [N, L]`` int64."""
    if not model_name.startswith(HF_HUB_PREFIX):
        get_model_config(model_name, config_files)  # clear error for unknown names
    return open_clip.get_tokenizer(model_name)
