"""A torch-free CLIP BPE tokenizer (the one open_clip's ``SimpleTokenizer`` implements).

Only the Python standard library is needed (``ftfy`` is used when it is installed, as open_clip
does; without it, text that needs ftfy's mojibake repair may tokenise differently). The BPE merges
come from CLIP's ``bpe_simple_vocab_16e6.txt.gz``, which ``tools/export_model.py`` copies next to
the exported models. This file imports nothing from c2s_d2, torch or open_clip, so a deployment
can load it by path.

Text is cleaned as open_clip's default ("lower"): ftfy, HTML unescaping (twice), whitespace
collapsed, lower case. It is split with the pattern::

    <start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+

(case-insensitive; implemented with ``unicodedata`` categories instead of the ``regex`` package),
each piece is byte-encoded and merged by BPE. A row is ``[sot, tokens..., eot]`` truncated to the
context length (the last kept token becomes ``eot``) and zero-padded.
"""

from __future__ import annotations

import gzip
import html
import unicodedata
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

try:  # optional, as in open_clip (which requires it)
    import ftfy
except ImportError:  # pragma: no cover
    ftfy = None

__all__ = ["ClipBpeTokenizer", "bytes_to_unicode"]

SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
NUM_MERGES = 49152 - 256 - 2  # merges CLIP's vocabulary uses (lines 1..48894 of the file)


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch).startswith("N")


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy, HTML unescape (twice), collapse whitespace, lower."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


def split_words(text: str) -> List[str]:
    """The pieces the CLIP pattern finds in ``text`` (module docstring), left to right: at each
    position the first alternative that matches wins; positions where none matches (white
    space) are skipped."""
    out: List[str] = []
    i, n = 0, len(text)
    lower = text.lower()
    while i < n:
        ch = text[i]
        special = next((s for s in SPECIAL_TOKENS if lower.startswith(s, i)), None)
        if special is not None:
            out.append(text[i : i + len(special)])
            i += len(special)
            continue
        contraction = next((c for c in CONTRACTIONS if lower.startswith(c, i)), None)
        if contraction is not None:
            out.append(text[i : i + len(contraction)])
            i += len(contraction)
            continue
        if _is_letter(ch):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(ch):
            j = i + 1
        elif ch.isspace():
            i += 1
            continue
        else:
            j = i + 1
            while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        out.append(text[i:j])
        i = j
    return out


def _pairs(word: Tuple[str, ...]) -> set:
    return {(a, b) for a, b in zip(word[:-1], word[1:])}


class ClipBpeTokenizer:
    """``tokenizer(["a photo of a cat."])`` -> int64 array [N, context_length]."""

    def __init__(self, bpe_path: str, context_length: int = 77) -> None:
        """
        Args:
            bpe_path: CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (gzip text, one merge a line).
            context_length: tokens per row (77 for CLIP).
        """
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(m.split()) for m in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{bpe_path}: not CLIP's BPE merges file ({len(merges)} merges)")
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += list(SPECIAL_TOKENS)
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache: Dict[str, str] = {t: t for t in SPECIAL_TOKENS}
        self.sot_token_id = self.encoder[SPECIAL_TOKENS[0]]
        self.eot_token_id = self.encoder[SPECIAL_TOKENS[1]]
        self.context_length = int(context_length)

    def bpe(self, token: str) -> str:
        """Byte-encoded word -> its BPE pieces joined by spaces (the last ends with ``</w>``)."""
        if token in self.cache:
            return self.cache[token]
        word: Tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: List[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without start/end tokens."""
        ids: List[int] = []
        for piece in split_words(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def __call__(self, texts: Sequence[str], context_length: Optional[int] = None) -> np.ndarray:
        """texts (N strings, or one string) -> int64 [N, context_length]."""
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out
