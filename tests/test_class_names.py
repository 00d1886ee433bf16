"""The shared class-name normaliser, the inductive-split guard and the latent-vocabulary filter
that use it, and the packaging around them (ImageNet names file, setup.py, detectron2 message).

Every variant list is written here, not read from the project's tables.
"""

import ast
import fnmatch
import itertools
import os
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import c2s_d2.modeling.meta_arch as meta_arch
from c2s_d2.data.class_names import (
    compact_forms,
    expand_with_synonyms,
    name_words,
    names_match,
    normalize_name,
    singular,
    synonym_groups,
)
from c2s_d2.data.zero_shot import register_zero_shot_sem_seg
from c2s_d2.modeling.distillation.latent_vocabulary import (
    IMAGENET_CLASSES_FILE,
    filter_vocabulary,
    imagenet_category_names,
    unseen_names_of_registered_datasets,
)
from c2s_d2.modeling.meta_arch import check_inductive_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (written variant, the class name it must equal)
SAME_NAME = [
    ("cows", "cow"),
    ("Cow", "cow"),
    ("COW", "cow"),
    ("tvmonitor", "tv monitor"),
    ("tv-monitor", "tv monitor"),
    ("tv_monitor", "tv monitor"),
    ("TV monitor", "tv monitor"),
    ("TV-Monitors", "tvmonitor"),
    ("pottedplant", "potted plant"),
    ("potted plants", "potted plant"),
    ("Potted-Plants", "pottedplant"),
    ("playingfield", "playing field"),
    ("playing_fields", "playing field"),
    ("playingfields", "playing field"),
    ("buses", "bus"),
    ("glasses", "glass"),
    ("boxes", "box"),
    ("ponies", "pony"),
    ("benches", "bench"),
    ("dishes", "dish"),
    ("skies", "sky"),
    ("movies", "movie"),
    ("houses", "house"),
    ("horses", "horse"),
    ("potatoes", "potato"),
    ("shoes", "shoe"),
    ("leaves", "leaf"),
    ("bookshelves", "bookshelf"),
    ("skis", "ski"),
    ("people", "person"),
    ("wall-concrete", "wall concrete"),
    ("sports balls", "sports ball"),
    ("sportsball", "sports ball"),
    ("Teddy Bear's", "teddy bear"),
    ("café", "cafe"),
]
# pairs that must stay different
DIFFERENT = [
    ("grass", "glass"),
    ("cat", "catamaran"),
    ("bus", "business"),
    ("cloth", "clothes"),
    ("car", "cart"),
    ("glass", "glasses case"),
]
# words the plural rules must leave alone
KEEP = ["grass", "glass", "bus", "cactus", "tennis", "business", "species", "canvas", "lens"]


@pytest.mark.parametrize("variant,name", SAME_NAME)
def test_variants_normalise_alike(variant, name):
    assert names_match(variant, name) and names_match(name, variant)
    assert compact_forms(variant) & compact_forms(name)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_different_names_stay_different(a, b):
    assert not names_match(a, b)


def test_singular_by_hand():
    pairs = {
        "cows": "cow", "ponies": "pony", "ties": "tie", "churches": "church",
        "brushes": "brush", "boxes": "box", "glasses": "glass", "buses": "bus",
        "cactuses": "cactus", "blouses": "blouse", "heroes": "hero", "toes": "toe",
        "canoes": "canoe", "knives": "knife", "snowmen": "snowman", "women": "woman",
        "headaches": "headache", "gases": "gas", "lenses": "lens", "clouds": "cloud",
    }  # fmt: skip
    assert {p: singular(p) for p in pairs} == pairs
    assert [singular(w) for w in KEEP] == KEEP
    assert singular("specimen") == "specimen" and singular("gas") == "gas"


def test_words_and_compact_forms_by_hand():
    assert name_words("jack-o'-lantern") == ("jack", "o", "lantern")
    assert name_words("  TV__Monitor!! ") == ("tv", "monitor")
    assert normalize_name("Potted Plants") == ("potted", "plant")
    # last word singular, and every word singular
    assert compact_forms("Sports Balls") == {"sportsball", "sportball"}
    assert compact_forms("tv_monitor") == {"tvmonitor"}
    assert compact_forms("?!") == frozenset()


def test_expand_with_synonyms():
    groups = synonym_groups({"sofa": {"synonyms": ("couch", "settee"), "hyponyms": ("futon",)}})
    assert groups == (("sofa", frozenset({"sofa", "couch", "settee"})),)
    got = expand_with_synonyms(["Couches"], groups, exclude={"settee"})
    assert got == {"couch": "name 'Couches'", "sofa": "synonym table entry 'sofa'"}
    assert expand_with_synonyms(["chair"], groups) == {"chair": "name 'chair'"}


# ------------------------------------------------------------------ inductive-split guard

TEST_TABLE = {
    "road": {"synonyms": ("street", "pavement"), "hyponyms": ()},
    "truck": {"synonyms": ("lorry",), "hyponyms": ()},
}
_counter = itertools.count()


@pytest.fixture
def registry(monkeypatch):
    """Registers datasets under unique names; the guard sees TEST_TABLE as its synonym table."""
    monkeypatch.setattr(meta_arch, "synonym_groups", lambda: synonym_groups(TEST_TABLE))
    names = []

    def register(classes, unseen_ids, split, text_names=None):
        name = f"c2s_test_class_names_{split}_{next(_counter)}"
        register_zero_shot_sem_seg(
            name,
            load_records=list,
            class_names=classes,
            unseen_ids=unseen_ids,
            split=split,
            text_names=text_names,
        )
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def split_pair(registry, train_class, unseen_class, unseen_text=None):
    """An evaluation set with one seen ("lamp") and one unseen class; a training set with "wood"
    and ``train_class``."""
    text = None if unseen_text is None else [["lamp"], unseen_text]
    test = registry(["lamp", unseen_class], [1], "eval", text)
    train = registry(["wood", train_class], [], "train")
    return train, test


@pytest.mark.parametrize("variant,name", SAME_NAME)
def test_guard_refuses_a_variant_of_an_unseen_class(registry, variant, name):
    train, test = split_pair(registry, variant, name)
    with pytest.raises(ValueError) as info:
        check_inductive_split([train], [test])
    message = str(info.value)
    assert f"{variant!r}" in message and f"{train!r}" in message and f"{test}:{name}" in message


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_guard_accepts_different_names(registry, a, b):
    for train_class, unseen_class in ((a, b), (b, a)):
        train, test = split_pair(registry, train_class, unseen_class)
        check_inductive_split([train], [test])


def test_guard_uses_the_text_names_of_both_sides(registry):
    # the unseen class "couch" lists "sofa" among its text names
    train, test = split_pair(registry, "Sofas", "couch", unseen_text=["couch", "sofa"])
    with pytest.raises(ValueError, match=rf"'Sofas' of '{train}' is the unseen class {test}:couch"):
        check_inductive_split([train], [test])
    # a training class whose own text names hold a variant of the unseen class
    test = registry(["sky", "zebra crossing"], [1], "eval")
    train = registry(["dirt", "crossing"], [], "train", [["dirt"], ["crossing", "Zebra-Crossings"]])
    with pytest.raises(ValueError, match=rf"'Zebra-Crossings' of '{train}'.*{test}:zebra crossing"):
        check_inductive_split([train], [test])


def test_guard_uses_the_synonym_table(registry):
    train, test = split_pair(registry, "lorries", "truck")
    with pytest.raises(ValueError, match=rf"{test}:truck .*synonym table entry 'truck'"):
        check_inductive_split([train], [test])
    # the table works both ways: the unseen class is the synonym, the training class the key
    train, test = split_pair(registry, "Trucks", "lorry")
    with pytest.raises(ValueError, match=rf"{test}:lorry"):
        check_inductive_split([train], [test])


def test_guard_ignores_table_synonyms_that_the_evaluation_set_labels_as_seen(registry):
    # the evaluation set has both "road" (unseen) and "pavement" (seen): different classes there
    test = registry(["pavement", "road"], [1], "eval")
    check_inductive_split([registry(["pavement", "dirt"], [], "train")], [test])
    with pytest.raises(ValueError, match=rf"'streets' of .* is the unseen class {test}:road"):
        check_inductive_split([registry(["streets", "dirt"], [], "train")], [test])
    # an evaluation set without a "pavement" class: the synonym counts
    other = registry(["sky", "road"], [1], "eval")
    with pytest.raises(ValueError, match=rf"{other}:road"):
        check_inductive_split([registry(["pavement", "dirt"], [], "train")], [test, other])


def test_guard_refuses_an_evaluation_split_in_training(registry):
    test = registry(["sky", "cow"], [1], "eval")
    with pytest.raises(ValueError, match=rf"DATASETS.TRAIN has '{test}', an evaluation split"):
        check_inductive_split([test], [])


def test_benchmark_splits_pass_the_guard_with_the_real_table():
    # registered lazily by c2s_d2 (metadata only, no disk): each train split against its val split
    for dataset in ("coco_stuff", "voc", "pcontext", "miniworld"):
        check_inductive_split([f"c2s_{dataset}_train"], [f"c2s_{dataset}_val"])
    # across datasets the guard does refuse: VOC's unseen "train" is a COCO-Stuff training class
    with pytest.raises(ValueError, match="'train' of 'c2s_coco_stuff_train'.*c2s_voc_val:train"):
        check_inductive_split(["c2s_coco_stuff_train"], ["c2s_voc_val"])


# ------------------------------------------------------------------ latent-vocabulary filter


@pytest.mark.parametrize("variant,name", SAME_NAME)
def test_vocabulary_filter_removes_variants(variant, name):
    kept, removed = filter_vocabulary([variant, "lamp"], [name], synonym_table={})
    assert (kept, removed) == (["lamp"], [variant])
    kept, removed = filter_vocabulary([name, "lamp"], [variant], synonym_table={})
    assert (kept, removed) == (["lamp"], [name])


def test_vocabulary_filter_keeps_different_names():
    vocab = ["glass", "catamaran", "business", "clothes"]
    assert filter_vocabulary(vocab, ["grass", "cat", "bus", "cloth"], synonym_table={}) == (
        vocab,
        [],
    )


def test_vocabulary_filter_uses_dataset_text_names(registry):
    registry(["teapot", "couch"], [1], "eval", [["teapot"], ["couch", "sofa"]])
    excluded = unseen_names_of_registered_datasets()
    assert "sofa" in excluded and "teapot" not in excluded
    kept, removed = filter_vocabulary(["Sofas", "couches", "teapot"], excluded, {})
    assert (kept, removed) == (["teapot"], ["Sofas", "couches"])


# ------------------------------------------------------------------ packaging

IMAGENET_KNOWN = {
    0: "tench",
    1: "goldfish",
    134: "crane bird",
    207: "golden retriever",
    517: "crane",
    638: "maillot",
    639: "maillot tank suit",
    999: "toilet tissue",
}


def test_imagenet_names_file():
    with open(IMAGENET_CLASSES_FILE, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" and len(lines) == 1001  # 1000 lines, each ended by a newline
    names = lines[:-1]
    assert len(set(names)) == 1000 and all(n and n == n.strip() for n in names)
    assert {i: names[i] for i in IMAGENET_KNOWN} == IMAGENET_KNOWN
    assert imagenet_category_names() == names


def test_imagenet_names_file_errors(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tench\ngoldfish\n")
    with pytest.raises(ValueError, match="short.txt: expected 1000 distinct names"):
        imagenet_category_names(str(short))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        imagenet_category_names(str(tmp_path / "missing.txt"))


def test_no_private_torchvision_name_at_run_time():
    source = open(os.path.join(ROOT, "c2s_d2/modeling/distillation/latent_vocabulary.py")).read()
    assert "from torchvision.models._meta import" not in source


def _setup_keywords():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
    )
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            pass  # names and calls (find_packages, LONG_DESCRIPTION)
    return out


def test_setup_declares_requirements_and_data_files():
    kw = _setup_keywords()
    requires = kw["install_requires"]
    for req in ["setuptools<81", "fvcore", "iopath", "torch", "open_clip_torch"]:
        assert req in requires, req
    assert kw["extras_require"]["d2wheel"] == ["sal-detectron2==0.7.2"]
    assert kw["python_requires"] == ">=3.10"
    data_files = ["data/imagenet_classes.txt", "data/latent_vocabulary_synonyms.json"]
    for rel in data_files:
        assert os.path.isfile(os.path.join(ROOT, "c2s_d2", rel)), rel
        assert any(fnmatch.fnmatch(rel, p) for p in kw["package_data"]["c2s_d2"]), rel


def test_import_without_detectron2_says_how_to_install_it():
    code = "import sys; sys.modules['detectron2'] = None; import c2s_d2"
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: c2s_d2 needs detectron2, which is not installed")
    assert "pip install -e .[d2wheel]" in last and "build detectron2 from source" in last
