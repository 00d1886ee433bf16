"""Prompt templates for the CLIP text encoder (prompt ensembling).

A template is a sentence with one ``"{}"`` where the class name goes. ``get_templates`` accepts
a set name from ``TEMPLATES`` or a text file with one template per line (``#`` starts a comment).
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Mapping
from typing import Dict, Iterator, List, Sequence, Union

_IMAGENET80_FILE = Path(__file__).resolve().parent / "templates_imagenet80.txt"


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


# The 7-template subset CLIP's authors found best for ImageNet ensembling.
_SHORT = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


class _TemplateSets(Mapping):
    """Template sets by name; sets kept in data files are read on first use."""

    def __init__(self, inline: Dict[str, List[str]], files: Dict[str, Path]) -> None:
        self._sets = dict(inline)
        self._files = dict(files)

    def __getitem__(self, name: str) -> List[str]:
        if name not in self._sets and name in self._files:
            self._sets[name] = read_templates_file(self._files[name])
        return self._sets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._sets) | set(self._files)))

    def __len__(self) -> int:
        return len(set(self._sets) | set(self._files))


TEMPLATES: Mapping[str, List[str]] = _TemplateSets(
    inline={"short": _SHORT, "single": ["a photo of a {}."]},
    files={"imagenet80": _IMAGENET80_FILE},
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
