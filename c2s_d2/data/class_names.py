"""One normaliser for class names, shared by every zero-shot integrity check.

Two checks compare class names: the inductive-split guard
(:func:`c2s_d2.modeling.meta_arch.check_inductive_split`: no training class may be an unseen class
of an evaluation set) and the latent-vocabulary filter
(:mod:`c2s_d2.modeling.distillation.latent_vocabulary`: no latent concept name may be related to
an unseen class). Both compare names through this module, so that a name written differently is
still the same name:

* case, accents and apostrophes do not count ("Cow", "COW", "jack-o'-lantern");
* spaces, hyphens, underscores and other punctuation are all separators, and separators do not
  count: names are compared in *compact form*, the words joined without separators, so closed
  compounds equal open ones ("tvmonitor" == "tv monitor" == "TV-monitor" == "tv_monitor");
* plural and singular are equal: :func:`singular` maps both to the same word ("cows" and "cow",
  "ponies" and "pony", "boxes" and "box", "buses" and "bus", "glasses" and "glass") and leaves
  singular words that end in "s" alone ("grass", "glass", "bus", "cactus", "tennis");
* synonyms: the datasets' ``text_names`` synonym lists (detectron2 ``MetadataCatalog``) and the
  synonym table ``c2s_d2/data/latent_vocabulary_synonyms.json`` (:func:`load_synonym_table`,
  :func:`synonym_groups`, :func:`expand_with_synonyms`).

A name has up to two compact forms (:func:`compact_forms`): its last word made singular (plurals
of English compounds sit on the last word: "potted plants", "sports ball") and every word made
singular ("sport balls"). Two names are equal when their form sets meet (:func:`names_match`).
Whole compact forms are compared, never substrings: "cat" is not "catamaran", "bus" is not
"business", "grass" is not "glass".

:func:`singular` is a heuristic applied to both sides of every comparison alike: it need not give
the dictionary singular, only the same word for a singular and its plural.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from functools import lru_cache
from typing import Dict, FrozenSet, Iterable, Optional, Set, Tuple

__all__ = [
    "SYNONYM_FILE",
    "compact_forms",
    "compact_name",
    "expand_with_synonyms",
    "load_synonym_table",
    "name_words",
    "names_match",
    "normalize_name",
    "singular",
    "synonym_groups",
]

SYNONYM_FILE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "latent_vocabulary_synonyms.json"
)

SynonymTable = Dict[str, Dict[str, Tuple[str, ...]]]

# Singular words ending in "s" that the rules below would otherwise shorten.
_INVARIANT = frozenset(
    "alias atlas bias canvas lens christmas chaos cosmos asbestos rhinoceros species series news "
    "mathematics physics gymnastics athletics aerobics measles".split()
)
# Whole-word plurals the rules get wrong.
_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "people": "person",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "oxen": "ox",
    "lives": "life",
    "axes": "axe",
    "gases": "gas",
    "lenses": "lens",
    "quizzes": "quiz",
    "cacti": "cactus",
    "fungi": "fungus",
    "octopi": "octopus",
    # plurals in "-is" / "-us" (singular words with those endings are kept as they are)
    "skis": "ski",
    "taxis": "taxi",
    "kiwis": "kiwi",
    "bikinis": "bikini",
    "martinis": "martini",
    "safaris": "safari",
    "emus": "emu",
    "gnus": "gnu",
    "menus": "menu",
    "tutus": "tutu",
}
_IRREGULAR.update({w + "es": w for w in ("atlas", "bias", "canvas", "alias")})
# Plural endings of closed compounds too ("bookshelves", "housewives", "snowmen").
_IRREGULAR_SUFFIXES = (
    ("knives", "knife"),
    ("wives", "wife"),
    ("leaves", "leaf"),
    ("loaves", "loaf"),
    ("wolves", "wolf"),
    ("shelves", "shelf"),
    ("halves", "half"),
    ("calves", "calf"),
    ("thieves", "thief"),
    ("scarves", "scarf"),
    ("hooves", "hoof"),
    ("women", "woman"),
    ("men", "man"),
)
# Words that end in "men" without being plurals of "-man".
_NOT_MEN_PLURALS = frozenset(
    "specimen abdomen omen regimen hymen stamen semen acumen albumen bitumen lumen cyclamen ramen "
    "amen dolmen rumen".split()
)
# Nouns in "-ie" (their plural "-ies" keeps the "ie"); matched as word endings.
_IE_NOUNS = tuple(
    "movie cookie zombie brownie hoodie collie genie beanie smoothie rookie pixie selfie prairie "
    "calorie magpie potpie necktie bowtie birdie budgie goalie hippie eyrie lingerie".split()
)
# Nouns in "-che" (their plural "-ches" keeps the "e"); matched as word endings.
_CHE_NOUNS = tuple(
    "headache toothache backache moustache mustache niche cache avalanche quiche cliche creche "
    "brioche cloche psyche".split()
)
# Nouns in "-oe" (their plural "-oes" keeps the "e"): word endings, then whole words.
_OE_SUFFIXES = ("shoes", "canoes", "oboes", "floes", "sloes")
_OE_WORDS = frozenset("toes hoes does tiptoes mistletoes throes".split())

_APOSTROPHES = re.compile("['\u2018\u2019\u02bc`]")
_SEPARATORS = re.compile(r"[^0-9a-z]+")


def singular(word: str) -> str:
    """The singular of one lower-case word (a heuristic: same result for singular and plural).

    Handles "-ies" ("ponies" -> "pony", "movies" -> "movie"), "-ches"/"-shes"/"-xes"/"-sses"/
    "-zzes"/"-uses"/"-oes" ("benches", "dishes", "boxes", "glasses", "buses", "potatoes"),
    other "-s" ("cows", "horses", "houses"), a few irregular plurals ("men", "mice", "shelves",
    "skis") and keeps singulars ending in "ss", "us", "is" ("grass", "bus", "cactus", "tennis").
    """
    w = word
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    for plural, one in _IRREGULAR_SUFFIXES:
        if w.endswith(plural) and w not in _NOT_MEN_PLURALS:
            return w[: -len(plural)] + one
    if len(w) <= 3 or not w.endswith("s") or w in _INVARIANT or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies"):
        if len(w) == 4 or w.endswith(tuple(n + "s" for n in _IE_NOUNS)):
            return w[:-1]  # "ties", "pies", "movies"
        return w[:-3] + "y"  # "ponies", "skies"
    if w.endswith("es"):
        stem = w[:-2]
        if stem.endswith(("ch", "sh")) and not w.endswith(tuple(n + "s" for n in _CHE_NOUNS)):
            return stem  # "benches", "dishes"
        if stem.endswith(("x", "ss", "zz")):
            return stem  # "boxes", "glasses", "buzzes"
        if stem.endswith("us") and not stem.endswith(("ous", "aus")):
            return stem  # "buses", "cactuses"; but "houses", "blouses", "causes" keep the "e"
        if stem.endswith("o") and not (w.endswith(_OE_SUFFIXES) or w in _OE_WORDS):
            return stem  # "potatoes", "heroes"; but "shoes", "canoes", "toes" keep the "e"
    return w[:-1]


def name_words(name: str) -> Tuple[str, ...]:
    """Words of a name as written: lower case, accents and apostrophes dropped, split at every
    character that is not a letter or digit ("TV-Monitors" -> ("tv", "monitors"))."""
    text = unicodedata.normalize("NFKD", str(name).lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _APOSTROPHES.sub("", text)
    return tuple(w for w in _SEPARATORS.split(text) if w)


def normalize_name(name: str) -> Tuple[str, ...]:
    """Words of a name, each made singular ("TV-Monitors" -> ("tv", "monitor"))."""
    return tuple(singular(w) for w in name_words(name))


def compact_name(name: str) -> str:
    """The words of :func:`normalize_name` joined without separators ("TV-Monitors" ->
    "tvmonitor")."""
    return "".join(normalize_name(name))


def _forms_of_words(words: Tuple[str, ...]) -> FrozenSet[str]:
    if not words:
        return frozenset()
    return frozenset(
        {"".join(words[:-1]) + singular(words[-1]), "".join(singular(w) for w in words)}
    )


def compact_forms(name: str) -> FrozenSet[str]:
    """The compact forms of a name: the last word singular, and every word singular.

    "Sports balls" -> {"sportsball", "sportball"}; "tv_monitor" -> {"tvmonitor"}; a name with no
    letter or digit has none.
    """
    return _forms_of_words(name_words(name))


def names_match(a: str, b: str) -> bool:
    """Whether two names are the same name once normalised (no synonyms involved)."""
    return bool(compact_forms(a) & compact_forms(b))


@lru_cache(maxsize=4)
def _read_synonym_table(path: str) -> SynonymTable:
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the latent-vocabulary synonym table {path}: {e}") from e
    entries = raw.get("entries") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected an object with an 'entries' object")
    table = {}
    for key, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) - {"synonyms", "hyponyms"}:
            raise ValueError(f"{path}: entry {key!r} must hold only 'synonyms' and 'hyponyms'")
        lists = {k: entry.get(k, []) for k in ("synonyms", "hyponyms")}
        for k, v in lists.items():
            if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
                raise ValueError(f"{path}: entry {key!r}: '{k}' must be a list of names")
        table[key] = {k: tuple(v) for k, v in lists.items()}
    return table


def load_synonym_table(path: Optional[str] = None) -> SynonymTable:
    """The synonym table: ``{class name: {"synonyms": (...), "hyponyms": (...)}}``.

    Default: ``c2s_d2/data/latent_vocabulary_synonyms.json``. Raises ``ValueError`` naming the
    file for an unreadable or malformed table.
    """
    return _read_synonym_table(os.path.abspath(path or SYNONYM_FILE))


def synonym_groups(table: Optional[SynonymTable] = None) -> Tuple[Tuple[str, FrozenSet[str]], ...]:
    """Per table entry, ``(key, compact forms of the key and of all its synonyms)``.

    ``table`` defaults to :func:`load_synonym_table`; hyponyms are not synonyms and stay out.
    """
    table = load_synonym_table() if table is None else table
    groups = []
    for key, entry in table.items():
        forms: Set[str] = set(compact_forms(key))
        for s in entry.get("synonyms", ()):
            forms |= compact_forms(s)
        groups.append((key, frozenset(forms)))
    return tuple(groups)


def expand_with_synonyms(
    names: Iterable[str],
    groups: Iterable[Tuple[str, FrozenSet[str]]],
    exclude: Iterable[str] = (),
) -> Dict[str, str]:
    """Compact forms of ``names`` and of their synonyms: ``{form: where it comes from}``.

    Every form of every name is kept (value: ``"name '<name>'"``). A synonym group (from
    :func:`synonym_groups`) that shares a form with the names adds all its forms (value:
    ``"synonym table entry '<key>'"``), except the forms in ``exclude``.
    """
    out: Dict[str, str] = {}
    for n in names:
        for f in sorted(compact_forms(n)):
            out.setdefault(f, f"name {str(n)!r}")
    excluded = set(exclude)
    own = set(out)
    for key, forms in groups:
        if forms & own:
            for f in sorted(forms - excluded):
                out.setdefault(f, f"synonym table entry {key!r}")
    return out
