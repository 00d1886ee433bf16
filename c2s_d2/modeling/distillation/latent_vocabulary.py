"""The latent vocabulary: generic concept names for latent text embeddings (docs/METHOD.md).

Default: the 1000 ImageNet category names (torchvision's list, shipped as
``c2s_d2/data/imagenet_classes.txt``). In the inductive setting every name equal or related to an
evaluation-unseen class must go before training. A vocabulary name is removed when, after
normalisation by the shared normaliser :mod:`c2s_d2.data.class_names` (case, accents, apostrophes
and separators do not count, plurals are made singular), for any *forbidden term*:

* **words**: the term equals the name or a run of its whole words, spaces ignored (so "tv
  monitor" == "tvmonitor", and "cat" removes "tiger cat" but not "catamaran");
* **closed compound**: a word of the name is 3+ letters followed by the term, and the term has
  4+ letters (English compounds end with their head: "boat" removes "speedboat", "bird" removes
  "hummingbird"; "eagle" keeps "beagle");
* **hyponym**: the name equals (normalised) a hyponym listed for the term's entry.

Forbidden terms are the excluded names themselves plus, for every entry of the synonym table
(``c2s_d2/data/latent_vocabulary_synonyms.json``) whose key or one of whose synonyms equals an
excluded name, the key and all its synonyms (the entry's hyponyms are removed by exact match).
Removal errs on the generous side: a few innocent names go too ("lawn mower" for "grass",
"screwdriver" for "river").
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from detectron2.data import MetadataCatalog

from ...data.class_names import (
    SYNONYM_FILE,
    compact_forms,
    load_synonym_table,
    name_words,
    normalize_name,
    singular,
)

__all__ = [
    "IMAGENET_CLASSES_FILE",
    "SYNONYM_FILE",
    "build_latent_vocabulary",
    "default_latent_vocabulary",
    "filter_vocabulary",
    "imagenet_category_names",
    "load_synonym_table",
    "load_vocabulary_file",
    "normalize_name",
    "unseen_names_of_registered_datasets",
]

logger = logging.getLogger(__name__)

# torchvision's ImageNet category names (torchvision.models._meta._IMAGENET_CATEGORIES, a private
# name), one per line in class-index order, generated once and shipped with the package.
IMAGENET_CLASSES_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "data",
    "imagenet_classes.txt",
)
_NUM_IMAGENET_CLASSES = 1000
_MIN_COMPOUND_HEAD = 4
_MIN_COMPOUND_MODIFIER = 3


def _forms(names: Iterable[str]) -> Set[str]:
    """Every compact form (c2s_d2.data.class_names.compact_forms) of every name."""
    out: Set[str] = set()
    for n in names:
        out |= compact_forms(n)
    return out


def _forbidden_terms(
    excluded_names: Iterable[str], table: Dict[str, Dict[str, Tuple[str, ...]]]
) -> Tuple[Set[str], Tuple[str, ...], Set[str]]:
    """Compact forbidden terms: matched as words, as compound heads; hyponyms (exact)."""
    words = _forms(excluded_names)
    hyponyms: Set[str] = set()
    for key, entry in table.items():
        group = _forms([key, *entry["synonyms"]])
        if group & words:
            words |= group
            hyponyms |= _forms(entry["hyponyms"])
    heads = tuple(sorted(t for t in words if len(t) >= _MIN_COMPOUND_HEAD))
    return words, heads, hyponyms


def _is_forbidden(name: str, words: Set[str], heads: Tuple[str, ...], hyponyms: Set[str]) -> bool:
    raw = name_words(name)
    parts = tuple(singular(w) for w in raw)
    if compact_forms(name) & hyponyms:
        return True
    for i in range(len(parts)):
        for j in range(i + 1, len(parts) + 1):
            # the run of words i..j-1 in both compact forms: last word singular, all singular
            if {"".join(raw[i : j - 1]) + parts[j - 1], "".join(parts[i:j])} & words:
                return True
    return any(
        p.endswith(t) and len(p) - len(t) >= _MIN_COMPOUND_MODIFIER for p in parts for t in heads
    )


def filter_vocabulary(
    names: Sequence[str],
    excluded_names: Iterable[str],
    synonym_table: Optional[Dict[str, Dict[str, Tuple[str, ...]]]] = None,
) -> Tuple[List[str], List[str]]:
    """Remove every name equal or related to an excluded name (rules of the module docstring).

    Returns:
        ``(kept, removed)``, both in the input order (duplicates dropped).
    """
    excluded = [str(n) for n in excluded_names]
    table = load_synonym_table() if synonym_table is None else synonym_table
    words, heads, hyponyms = _forbidden_terms(excluded, table)
    kept, removed, seen = [], [], set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        (removed if _is_forbidden(name, words, heads, hyponyms) else kept).append(name)
    logger.info(
        "latent vocabulary: removed %d of %d names equal or related to %d excluded (unseen) names",
        len(removed),
        len(seen),
        len(set(excluded)),
    )
    return kept, removed


def imagenet_category_names(path: Optional[str] = None) -> List[str]:
    """The 1000 ImageNet category names in class-index order (torchvision's list, all distinct).

    Read from ``c2s_d2/data/imagenet_classes.txt`` (or ``path``): one name per line.
    """
    return list(_read_imagenet_classes(os.path.abspath(path or IMAGENET_CLASSES_FILE)))


@lru_cache(maxsize=2)
def _read_imagenet_classes(path: str) -> Tuple[str, ...]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            names = tuple(line.rstrip("\r\n") for line in f)
    except OSError as e:
        raise FileNotFoundError(f"ImageNet class list not readable: {path}: {e}") from e
    for i, n in enumerate(names):
        if not n.strip() or n != n.strip():
            raise ValueError(f"{path}: line {i + 1} is empty or has surrounding spaces: {n!r}")
    if len(names) != _NUM_IMAGENET_CLASSES or len(set(names)) != len(names):
        raise ValueError(
            f"{path}: expected {_NUM_IMAGENET_CLASSES} distinct names, one per line; got "
            f"{len(names)} lines, {len(set(names))} distinct"
        )
    return names


def default_latent_vocabulary(excluded_names: Iterable[str]) -> Tuple[List[str], List[str]]:
    """ImageNet names minus every name equal or related to ``excluded_names``: (names, removed)."""
    return filter_vocabulary(imagenet_category_names(), excluded_names)


def load_vocabulary_file(path: str) -> List[str]:
    """Names from a text file: one per line; blank lines and ``#`` comments skipped; no repeats."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"latent vocabulary file not found: {path} (MODEL.C2S.DISTILL.LATENT.VOCABULARY)"
        )
    with open(path, "r", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    names = list(dict.fromkeys(s for s in lines if s and not s.startswith("#")))
    if not names:
        raise ValueError(f"latent vocabulary file {path} holds no names")
    return names


def build_latent_vocabulary(
    spec: str, excluded_names: Iterable[str]
) -> Tuple[List[str], List[str]]:
    """The vocabulary named by ``MODEL.C2S.DISTILL.LATENT.VOCABULARY``: (names, removed).

    ``"imagenet"``: the default vocabulary; ``""``/``"none"``: empty; otherwise a file path
    (:func:`load_vocabulary_file`), filtered by the same rules.
    """
    spec = str(spec).strip()
    if spec.lower() in ("", "none"):
        return [], []
    if spec.lower() == "imagenet":
        return default_latent_vocabulary(excluded_names)
    return filter_vocabulary(load_vocabulary_file(spec), excluded_names)


def unseen_names_of_registered_datasets() -> List[str]:
    """Names (and text synonyms) of the unseen classes of every registered dataset, sorted.

    Reads detectron2's ``MetadataCatalog``: every dataset whose metadata has non-empty
    ``unseen_class_ids`` and ``stuff_classes`` (the evaluation sets of c2s_d2.data.zero_shot)
    contributes ``stuff_classes[i]`` and every name of ``text_names[i]`` for its unseen ids.
    """
    names: Set[str] = set()
    for dataset in MetadataCatalog.list():
        meta = MetadataCatalog.get(dataset)
        unseen = getattr(meta, "unseen_class_ids", None)
        classes = getattr(meta, "stuff_classes", None)
        if not unseen or classes is None:
            continue
        text_names = getattr(meta, "text_names", None)
        for i in unseen:
            if not 0 <= int(i) < len(classes):
                raise ValueError(f"dataset {dataset}: unseen class id {i} outside its class list")
            names.add(str(classes[int(i)]))
            if text_names is not None:
                names.update(str(t) for t in text_names[int(i)])
    return sorted(names)
