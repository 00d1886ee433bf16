"""Every relative link of README.md and docs/*.md points to an existing file (and heading), and
every config path the docs name exists."""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CONFIG_RE = re.compile(r"configs/[A-Za-z0-9_./-]+\.yaml")


def without_code_blocks(text: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> Set[str]:
    """Anchors of a Markdown file's headings, with GitHub's -1, -2 suffixes for repeats."""
    with open(path, encoding="utf-8") as f:
        text = without_code_blocks(f.read())
    seen: Dict[str, int] = {}
    out: Set[str] = set()
    for line in text.splitlines():
        m = HEADING_RE.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: str) -> List[Tuple[str, str]]:
    """(target file, anchor) of every relative link in ``path`` (code blocks excluded)."""
    with open(path, encoding="utf-8") as f:
        text = without_code_blocks(f.read())
    out = []
    for target in LINK_RE.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (
            os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        )
        out.append((resolved, anchor))
    return out


def test_slug_on_hand_examples():
    assert slug("Results on the mini-world (2-core CPU)") == "results-on-the-mini-world-2-core-cpu"
    assert (
        slug("The mini-world teacher (`tools/pretrain_miniworld_clip.py`)")
        == "the-mini-world-teacher-toolspretrain_miniworld_clippy"
    )
    assert slug("Evaluation (`--eval-only`)") == "evaluation---eval-only"


def test_link_parser_on_hand_example(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text(
        "# Top\n[x](b.md#part) ![i](img.png) [web](https://x.org)\n```\n[no](c.md)\n```\n"
        "[self](#top)\n"
    )
    links = relative_links(str(doc))
    assert links == [(str(tmp_path / "b.md"), "part"), (str(tmp_path / "img.png"), ""),
                     (str(doc), "top")]  # fmt: skip
    assert anchors(str(doc)) == {"top"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_point_to_existing_files_and_headings(doc):
    broken = []
    for target, anchor in relative_links(doc):
        if not os.path.exists(target):
            broken.append(f"{os.path.relpath(target, ROOT)} (missing file)")
        elif anchor and target.endswith(".md") and anchor not in anchors(target):
            broken.append(f"{os.path.relpath(target, ROOT)}#{anchor} (no such heading)")
    assert not broken, f"{os.path.relpath(doc, ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_named_config_files_exist(doc):
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    missing = sorted(
        {p for p in CONFIG_RE.findall(text) if not os.path.isfile(os.path.join(ROOT, p))}
    )
    assert not missing, f"{os.path.relpath(doc, ROOT)} names missing configs: {missing}"


def test_main_docs_exist_and_readme_links_them():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in ("INSTALL.md", "GETTING_STARTED.md", "MODEL_ZOO.md"):
        assert os.path.isfile(os.path.join(ROOT, "docs", name)), name
        assert f"(docs/{name})" in readme, name
    assert "(LICENSE)" in readme and os.path.isfile(os.path.join(ROOT, "LICENSE"))
