"""Prompt templates for the CLIP text encoder (prompt ensembling).

A template is a sentence with one ``"{}"`` where the class name goes. ``get_templates`` accepts
a set name from ``TEMPLATES`` or a text file with one template per line (``#`` starts a comment).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import List, Sequence, Union

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES


def read_templates_file(path: Union[str, Path]) -> List[str]:
    """Templates from a text file: one per line; blank lines and ``#`` comments are skipped."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"prompt template file not found: {path}")
    with open(path, "r", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    templates = [line for line in lines if line and not line.startswith("#")]
    return check_templates(templates, source=str(path))


def check_templates(templates: Sequence[str], source: str = "templates") -> List[str]:
    """Refuse an empty list and templates without exactly one ``"{}"``; returns a list copy."""
    templates = list(templates)
    if len(templates) == 0:
        raise ValueError(f"{source}: no prompt templates")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"{source}: template {t!r} must contain exactly one '{{}}'")
    return templates


def _sentences(templates) -> List[str]:
    """open_clip's templates are functions of the class name; ours are strings with ``"{}"``."""
    return check_templates([t("{}") for t in templates], source="open_clip.zero_shot_metadata")


# The sets as open_clip ships them (open_clip.zero_shot_metadata): the 80 templates of CLIP's
# ImageNet zero-shot evaluation (Radford et al., 2021) and the 7-template subset CLIP's authors
# found best for ImageNet ensembling, in the same order as before (tests/test_library_helpers.py).
TEMPLATES: Mapping[str, List[str]] = MappingProxyType(
    {
        "imagenet80": _sentences(OPENAI_IMAGENET_TEMPLATES),
        "short": _sentences(SIMPLE_IMAGENET_TEMPLATES),
        "single": ["a photo of a {}."],
    }
)


def get_templates(spec: Union[str, Sequence[str]]) -> List[str]:
    """Resolve a template spec: a set name (``"imagenet80"``, ``"short"``, ``"single"``), a path
    to a text file, or a list of templates. Returns a new list of templates."""
    if not isinstance(spec, str):
        return check_templates(spec)
    if spec in TEMPLATES:
        return list(TEMPLATES[spec])
    if os.path.isfile(os.path.expanduser(spec)):
        return read_templates_file(spec)
    raise ValueError(
        f"unknown prompt templates {spec!r}: use one of {list(TEMPLATES)} "
        f"or the path of a text file with one template per line"
    )
