"""Class text embeddings from the CLIP text encoder, with prompt ensembling and a disk cache.

For class ``c`` with text names (synonyms) ``S_c`` and templates ``T``::

    t_c = normalise( mean over s in S_c, tau in T of normalise(E(tau(s))) )

where ``E`` is the CLIP text encoder. The result depends only on (model, weights, templates,
names); it is computed once and cached as a ``.pt`` file keyed by their sha1. With a cached file
no CLIP model (not even the text tower) is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .loader import HF_HUB_PREFIX, build_open_clip, get_model_config, get_tokenizer
from .loader import weights_identity
from .templates import get_templates

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
DEFAULT_BATCH_SIZE = 256  # prompts per text-encoder forward

ClassTextNames = Sequence[Union[str, Sequence[str]]]


def check_class_text_names(class_text_names: ClassTextNames) -> List[List[str]]:
    """Validate per-class synonym lists; a bare string counts as a one-name list.

    Raises ``ValueError`` for an empty class list, a class without names, or an empty name.
    """
    if len(class_text_names) == 0:
        raise ValueError("class_text_names is empty: no classes to embed")
    out = []
    for i, names in enumerate(class_text_names):
        names = [names] if isinstance(names, str) else list(names)
        if len(names) == 0:
            raise ValueError(f"class {i} has no text names")
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"class {i} has an empty or non-string text name: {name!r}")
        out.append([n.strip() for n in names])
    return out


def build_prompts(
    class_text_names: Sequence[Sequence[str]], templates: Sequence[str]
) -> Tuple[List[str], torch.Tensor]:
    """Every (class, synonym, template) sentence.

    Returns:
        prompts: list of P strings, class by class, synonym by synonym, template by template.
        class_index: [P] int64, the class of each prompt.
    """
    prompts, class_index = [], []
    for c, names in enumerate(class_text_names):
        for name in names:
            # str.replace, not format(): names may contain braces.
            prompts += [t.replace("{}", name) for t in templates]
            class_index += [c] * len(templates)
    return prompts, torch.tensor(class_index, dtype=torch.long)


def ensemble_prompt_embeddings(
    prompt_embeddings: torch.Tensor, class_index: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Prompt ensembling: [P, d] embeddings + [P] class ids -> [C, d] unit-norm class embeddings.

    Each prompt embedding is L2-normalised, averaged over its class (all synonyms and
    templates), and the mean is normalised again.
    """
    unit = F.normalize(prompt_embeddings.float(), dim=-1)
    sums = unit.new_zeros(num_classes, unit.shape[1]).index_add_(
        0, class_index.to(unit.device), unit
    )
    counts = torch.bincount(class_index, minlength=num_classes).to(unit)
    if (counts == 0).any():
        raise ValueError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no prompts")
    return F.normalize(sums / counts[:, None], dim=-1)


@torch.no_grad()
def encode_prompts(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[List[str]], torch.Tensor],
    prompts: Sequence[str],
    device: Union[str, torch.device] = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Encode prompts in batches: P strings -> [P, d] float32 (not normalised)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(list(prompts[start : start + batch_size])).to(device)
        out.append(encode_text(tokens).float())
    return torch.cat(out, dim=0)


def default_cache_dir() -> str:
    """``$C2S_CACHE/text_embeddings`` if ``$C2S_CACHE`` is set, else
    ``~/.cache/c2s_d2/text_embeddings``."""
    root = os.environ.get("C2S_CACHE") or os.path.join("~", ".cache", "c2s_d2")
    return os.path.join(os.path.expanduser(root), "text_embeddings")


def text_embedding_cache_path(
    cache_dir: str,
    model_name: str,
    weights: str,
    templates: Sequence[str],
    class_text_names: Sequence[Sequence[str]],
    model_config: Optional[dict] = None,
) -> str:
    """The cache file of one (model, weights identity, templates, names) key."""
    key = {
        "version": CACHE_FORMAT_VERSION,
        "model_name": model_name,
        # A registered JSON edited in place must not reuse stale embeddings.
        "model_config": model_config,
        "weights": weights,
        "templates": list(templates),
        "class_text_names": [list(n) for n in class_text_names],
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
    return os.path.join(cache_dir, f"{slug}-{digest}.pt")


def _load_cached(path: str, class_text_names: List[List[str]]) -> Optional[torch.Tensor]:
    if not os.path.isfile(path):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        emb = data["embeddings"]
        ok = data["class_text_names"] == class_text_names and emb.shape[0] == len(class_text_names)
    except Exception as e:  # a truncated or foreign file: recompute rather than fail
        logger.warning("ignoring unreadable text-embedding cache %s (%s)", path, e)
        return None
    if not ok:
        logger.warning("ignoring text-embedding cache %s: its class names differ", path)
        return None
    return emb


def _save_atomically(path: str, data: dict) -> None:
    """torch.save to a temporary file in the same folder, then os.replace (no torn files)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def text_embeddings(
    class_text_names: ClassTextNames,
    model_name: str,
    pretrained: str,
    templates: Union[str, Sequence[str]] = "short",
    random_init_seed: int = 0,
    config_files: Sequence[str] = (),
    cache_dir: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Unit-norm class text embeddings [C, d] (prompt ensembling), cached on disk.

    Args:
        class_text_names: per class, its text names (synonyms are averaged); a string is one name.
        model_name, pretrained, random_init_seed, config_files: the CLIP model, as in
            ``loader.build_open_clip``.
        templates: a template set name, a template file path, or a list of templates.
        cache_dir: cache folder; ``None`` or ``""`` -> ``default_cache_dir()``.
        device: where the text encoder runs and where the result is returned.
    """
    names = check_class_text_names(class_text_names)
    template_list = get_templates(templates)
    model_config = None
    if not model_name.startswith(HF_HUB_PREFIX):
        model_config = get_model_config(model_name, config_files)  # registers, reads JSON only
    weights = weights_identity(pretrained, random_init_seed, model_name)
    path = text_embedding_cache_path(
        cache_dir or default_cache_dir(), model_name, weights, template_list, names, model_config
    )
    cached = _load_cached(path, names)
    if cached is not None:
        logger.info("text embeddings of %d classes read from %s", len(names), path)
        return cached.to(device)

    prompts, class_index = build_prompts(names, template_list)
    logger.info(
        "encoding %d prompts (%d classes x names x %d templates) with %s (%s)",
        len(prompts),
        len(names),
        len(template_list),
        model_name,
        weights,
    )
    text_model = build_open_clip(
        model_name, pretrained, random_init_seed, config_files, text_only=True
    ).to(device)
    tokenizer = get_tokenizer(model_name, config_files)
    prompt_emb = encode_prompts(text_model.encode_text, tokenizer, prompts, device, batch_size)
    emb = ensemble_prompt_embeddings(prompt_emb, class_index, len(names))
    _save_atomically(
        path,
        {
            "embeddings": emb.cpu(),
            "class_text_names": names,
            "templates": template_list,
            "model_name": model_name,
            "weights": weights,
            "format_version": CACHE_FORMAT_VERSION,
        },
    )
    logger.info("text embeddings cached at %s", path)
    return emb


def text_embeddings_from_cfg(
    cfg, class_text_names: ClassTextNames, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """``text_embeddings`` with the model, weights, templates and cache of ``cfg.MODEL.CLIP``."""
    clip = cfg.MODEL.CLIP
    return text_embeddings(
        class_text_names,
        model_name=clip.MODEL_NAME,
        pretrained=clip.PRETRAINED,
        templates=clip.TEXT_TEMPLATES,
        random_init_seed=clip.RANDOM_INIT_SEED,
        config_files=tuple(clip.MODEL_CONFIG_FILES),
        cache_dir=clip.TEXT_EMBED_CACHE_DIR or None,
        device=device,
    )
