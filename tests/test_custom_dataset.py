"""Your own data: class file, registration (train / eval), integrity guards, env route, checker."""

import importlib.util
import os
import re
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from c2s_d2.data.dataset_mapper import read_label_checked, training_label_lut
from c2s_d2.data.datasets.custom import (
    check_folder_dataset,
    convert_color_labels,
    read_class_file,
    register_folder_dataset,
    register_from_env,
)
from c2s_d2.data.zero_shot import (
    DatasetNotPreparedError,
    apply_label_lut,
    drop_images_with_unseen_pixels,
)
from c2s_d2.evaluation.sem_seg_evaluator import C2SSemSegEvaluator
from c2s_d2.modeling.meta_arch import check_inductive_split
from tests.fixtures_benchmarks import voc_palette

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_TEXT = """# tiny street scenes
0: road, street
1: car, automobile @ 0 0 142
2: tree   # unseen below
unseen: tree
ignore: 0 0 0
"""
# (H, W) = (4, 6); every class, and 255 on the last column.
LABEL = np.array([[0, 0, 1, 1, 2, 255]] * 4, dtype=np.uint8)


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _write_image(path, h=4, w=6, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _write_label(path, label, palette=False):
    img = Image.fromarray(label)
    if palette:
        img.putpalette(voc_palette())
    img.save(path)


def _folder(tmp_path, n=3, class_text=CLASS_TEXT, labels=None):
    """images/{0..n-1}.jpg, labels/{..}.png, classes.txt; returns the three paths."""
    images, label_dir = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    label_dir.mkdir()
    for i in range(n):
        _write_image(images / f"{i}.jpg", seed=i)
        _write_label(label_dir / f"{i}.png", LABEL if labels is None else labels[i])
    class_file = tmp_path / "classes.txt"
    class_file.write_text(class_text)
    return str(images), str(label_dir), str(class_file)


# ---------------------------------------------------------------------------------- class file


def test_text_class_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(CLASS_TEXT)
    c = read_class_file(str(path))
    assert c.class_names == ("road", "car", "tree")
    assert c.text_names == (("road", "street"), ("car", "automobile"), ("tree",))
    assert c.unseen_ids == (2,) and c.seen_ids == [0, 1]
    assert c.colors == (None, (0, 0, 142), None)
    assert c.ignore_colors == ((0, 0, 0),)


def test_builtin_json_class_file_reads_the_same_as_registration():
    c = read_class_file(os.path.join(REPO, "c2s_d2", "data", "datasets", "voc.json"))
    meta = MetadataCatalog.get("c2s_voc_val")
    assert list(c.class_names) == meta.stuff_classes
    assert list(c.unseen_ids) == meta.unseen_class_ids == [15, 16, 17, 18, 19]
    assert [list(t) for t in c.text_names] == meta.text_names


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "0: road\n2: car\nunseen:\n",
            r"ids must be 0\.\.1, each once: missing \[1\], beyond \[2\]",
        ),
        ("0: road\n0: car\nunseen:\n", r"line 2: class id 0 already given on line 1"),
        ("0: road\n1: car\n", r"no 'unseen:' line"),
        ("0: road\n1: car\nunseen: boat\n", r"unseen name 'boat' matches no class"),
        ("0: road\n1: cars\n2: car\nunseen:\n", r"classes 1 'cars' and 2 'car' are one name"),
        ("0: road\nroad is grey\nunseen:\n", r"line 2: 'road is grey' is not 'ID: NAME"),
        ("0: road @ 1 2\nunseen:\n", r"line 1: colour '1 2'"),
        # a seen synonym that is the unseen class once normalised: would leak it into training
        (
            "0: road\n1: plant, Trees\n2: tree\nunseen: tree\n",
            r"seen class 'plant'.*'Trees'.*'tree'",
        ),
    ],
)
def test_bad_class_file_names_file_and_problem(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"class file .*bad\.txt") as e:
        read_class_file(str(path))
    assert e.match(message)


# ---------------------------------------------------------------------------------- registration


def test_registration_train_and_eval(tmp_path):
    images, labels, classes = _folder(tmp_path)
    train = register_folder_dataset(_name("my_train"), images, labels, classes, split="train")
    val = register_folder_dataset(_name("my_val"), images, labels, classes, split="eval")
    records = DatasetCatalog.get(train)
    assert [r["image_id"] for r in records] == ["0", "1", "2"]
    assert records[1]["file_name"] == os.path.join(images, "1.jpg")
    assert records[1]["sem_seg_file_name"] == os.path.join(labels, "1.png")
    assert DatasetCatalog.get(val) == records

    mt, mv = MetadataCatalog.get(train), MetadataCatalog.get(val)
    assert mt.stuff_classes == ["road", "car"]  # the unseen name is not in training metadata
    assert mt.text_names == [["road", "street"], ["car", "automobile"]]
    assert mt.ignore_label == mv.ignore_label == 255
    assert mt.zero_shot_split == "train" and mv.zero_shot_split == "eval"
    assert mt.num_dataset_classes == 3 and mt.unseen_class_ids == []
    assert mt.label_lut[:3] == [0, 1, 255] and mt.label_lut[255] == 255
    assert mv.stuff_classes == ["road", "car", "tree"]
    assert mv.seen_class_ids == [0, 1] and mv.unseen_class_ids == [2]
    # the same metadata keys as the built-in benchmarks (plus the class file)
    for mine, builtin in ((mt, "c2s_voc_train"), (mv, "c2s_voc_val")):
        expected = set(MetadataCatalog.get(builtin).as_dict()) - {"benchmark"}
        assert set(mine.as_dict()) - {"class_file"} == expected
    # the evaluator reads the eval set's split
    ev = C2SSemSegEvaluator(val, distributed=False)
    assert ev._unseen_ids == [2] and ev._class_names == ["road", "car", "tree"]
    # same arguments again: nothing happens; another folder under the name: refused
    assert register_folder_dataset(train, images, labels, classes, split="train") == train
    with pytest.raises(ValueError, match="already registered"):
        register_folder_dataset(train, images, labels, classes, split="eval")


def test_missing_label_is_refused_at_load_naming_the_file(tmp_path):
    images, labels, classes = _folder(tmp_path)
    os.remove(os.path.join(labels, "1.png"))
    name = register_folder_dataset(_name("my_train"), images, labels, classes)
    with pytest.raises(DatasetNotPreparedError, match=r"1\.jpg.*1\.png.*check_dataset"):
        DatasetCatalog.get(name)


def test_env_route_registers_without_python(tmp_path):
    images, labels, classes = _folder(tmp_path)
    a, b = _name("env_train"), _name("env_val")
    value = f"{a},train,{images},{labels},{classes};\n{b}, eval, {images}, {labels}, {classes}"
    assert register_from_env(value) == [a, b]
    assert MetadataCatalog.get(a).stuff_classes == ["road", "car"]
    assert MetadataCatalog.get(b).unseen_class_ids == [2]
    assert register_from_env(value) == [a, b]  # idempotent (every process imports it)
    with pytest.raises(ValueError, match=r"C2S_CUSTOM_DATASETS: entry 'x,train' is not"):
        register_from_env("x,train")
    with pytest.raises(ValueError, match=r"C2S_CUSTOM_DATASETS: .*split must be"):
        register_from_env(f"{_name('x')},test,{images},{labels},{classes}")


# ---------------------------------------------------------------------------------- guards


def test_guard_refuses_unseen_names_as_for_builtin_sets(tmp_path):
    images, labels, classes = _folder(tmp_path)
    train = register_folder_dataset(_name("g_train"), images, labels, classes, "train")
    val = register_folder_dataset(_name("g_val"), images, labels, classes, "eval")
    check_inductive_split([train], [val])  # the proper pair passes
    with pytest.raises(ValueError, match=r"an evaluation split with all classes"):
        check_inductive_split([val], [val])
    # another class file where the unseen "tree" is a seen class ("Trees"): refused by name
    other = tmp_path / "other.txt"
    other.write_text("0: road\n1: Trees\n2: sky\nunseen: sky\n")
    leak = register_folder_dataset(_name("leak_train"), images, labels, str(other), "train")
    with pytest.raises(ValueError, match=rf"'Trees' of '{leak}' is the unseen class {val}:tree"):
        check_inductive_split([leak], [val])
    # exactly the guard of the built-in sets: a seen "couch" meets VOC's unseen "sofa" synonym
    couch = tmp_path / "couch.txt"
    couch.write_text("0: couch\n1: lamp\nunseen: lamp\n")
    leak2 = register_folder_dataset(_name("couch_train"), images, labels, str(couch), "train")
    with pytest.raises(ValueError, match=r"'couch' .* is the unseen class c2s_voc_val:sofa"):
        check_inductive_split([leak2], ["c2s_voc_val"])


def test_unseen_labels_never_reach_training_palette_and_index(tmp_path):
    labels = [LABEL, LABEL, np.array([[0, 1, 1, 0, 255, 0]] * 4, np.uint8)]
    images, label_dir, classes = _folder(tmp_path, labels=labels)
    # the first label as a palette PNG: read by palette index, like the index PNGs
    _write_label(os.path.join(label_dir, "0.png"), LABEL, palette=True)
    assert Image.open(os.path.join(label_dir, "0.png")).mode == "P"
    train = register_folder_dataset(_name("lab_train"), images, label_dir, classes, "train")
    lut = training_label_lut([train], "inductive")
    for rec in DatasetCatalog.get(train):
        label = read_label_checked(rec["sem_seg_file_name"])  # what the mapper reads
        mapped = apply_label_lut(label, lut, rec["sem_seg_file_name"])
        assert set(np.unique(mapped)) <= {0, 1, 255}
    mapped0 = apply_label_lut(read_label_checked(os.path.join(label_dir, "0.png")), lut)
    np.testing.assert_array_equal(mapped0[0], [0, 0, 1, 1, 255, 255])
    # inductive_strict: images holding an unseen pixel are dropped (palette PNG included)
    kept = drop_images_with_unseen_pixels(DatasetCatalog.get(train), [2])
    assert [r["image_id"] for r in kept] == ["2"]


# ---------------------------------------------------------------------------------- checker


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "check_dataset_tool", os.path.join(REPO, "tools", "check_dataset.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checker_passes_a_clean_folder(tmp_path, capsys):
    images, labels, classes = _folder(tmp_path)
    report = check_folder_dataset(images, labels, classes, split="eval")
    assert report.problems == []
    assert (report.num_images, report.num_labels, report.num_pairs) == (3, 3, 3)
    assert report.label_kinds == {"index": 3}
    assert report.pixels.tolist() == [24, 24, 12] and report.ignore_pixels == 12
    assert _load_tool().main([images, labels, classes, "--split", "eval"]) == 0
    out = capsys.readouterr().out
    assert "no problem found" in out and "0 error(s)" in out
    assert " 33.33%" in out  # road: 24 of 72 pixels


def _break_missing_label(d):
    os.remove(os.path.join(d["labels"], "1.png"))


def _break_missing_image(d):
    os.remove(os.path.join(d["images"], "1.jpg"))


def _break_size(d):
    _write_image(os.path.join(d["images"], "1.jpg"), h=5, w=6)


def _break_unknown_id(d):
    bad = LABEL.copy()
    bad[0, 0], bad[1, 1] = 7, 254
    _write_label(os.path.join(d["labels"], "2.png"), bad)


def _break_mixed_palette(d):
    _write_label(os.path.join(d["labels"], "0.png"), LABEL, palette=True)


def _break_rgb(d):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = (0, 0, 142)
    Image.fromarray(rgb).save(os.path.join(d["labels"], "0.png"))


def _break_corrupt_image(d):
    with open(os.path.join(d["images"], "2.jpg"), "r+b") as f:
        f.truncate(40)


def _break_corrupt_label(d):
    with open(os.path.join(d["labels"], "2.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nnot a png")


def _break_ambiguous(d):
    _write_image(os.path.join(d["images"], "0.png"))


def _break_class_file(d):
    with open(d["classes"], "w") as f:
        f.write("0: road\n")


@pytest.mark.parametrize(
    "breaker, level, kind, text",
    [
        (_break_missing_label, "error", "missing-label", r"1\.jpg has no label 1\.png"),
        (_break_missing_image, "warning", "missing-image", r"1\.png has no image"),
        (_break_size, "error", "size-mismatch", r"1\.jpg is 6x5, label .*1\.png is 6x4"),
        (_break_unknown_id, "error", "unknown-id", r"label id 7 .*2\.png"),
        (_break_mixed_palette, "warning", "mixed-label-kinds", r"1 palette PNGs and 2 single"),
        (_break_rgb, "error", "rgb-label", r"0\.png is an RGB colour PNG"),
        (_break_rgb, "error", "mixed-label-kinds", r"1 RGB colour PNGs mixed with 2"),
        (_break_corrupt_image, "error", "unreadable-image", r"cannot read image .*2\.jpg"),
        (_break_corrupt_label, "error", "unreadable-label", r"cannot read label .*2\.png"),
        (_break_ambiguous, "error", "ambiguous-image", r"\['0\.jpg', '0\.png'\]"),
        (_break_class_file, "error", "class-file", r"no 'unseen:' line"),
        (lambda d: None, "info", "unseen-in-train", r"unseen class 2 'tree': 12 pixels in 3"),
    ],
)
def test_checker_finds_each_problem(tmp_path, breaker, level, kind, text):
    images, labels, classes = _folder(tmp_path)
    breaker({"images": images, "labels": labels, "classes": classes})
    report = check_folder_dataset(images, labels, classes, split="train")
    found = [p for p in report.problems if p.kind == kind]
    assert found and all(p.level == level for p in found)
    assert re.search(text, found[0].message), found[0].message
    if breaker is _break_unknown_id:  # one line per bad id
        assert [p.message.split()[2] for p in found] == ["7", "254"]
    else:
        assert len(found) == 1
    if level != "error":  # warnings and information alone never fail the check
        assert report.errors == []


def test_checker_exit_code_and_one_list(tmp_path, capsys):
    images, labels, classes = _folder(tmp_path)
    _break_missing_label({"labels": labels})
    _break_unknown_id({"labels": labels})
    assert _load_tool().main([images, labels, classes]) == 1
    out = capsys.readouterr().out
    assert "[missing-label]" in out and "[unknown-id]" in out and "3 error(s)" in out


def test_rgb_labels_convert_through_the_class_file_colours(tmp_path):
    images, labels, classes = _folder(tmp_path, n=1)
    rgb = np.zeros((4, 6, 3), np.uint8)  # black = ignore
    rgb[:, :2] = (0, 0, 142)  # car
    Image.fromarray(rgb).save(os.path.join(labels, "0.png"))
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    rgb[0, 5] = 9  # a colour the class file does not give
    Image.fromarray(rgb).save(bad_dir / "0.png")
    with pytest.raises(ValueError, match=r"0\.png: colours \[\(9, 9, 9\)\] are not in"):
        convert_color_labels(str(bad_dir), str(tmp_path / "never"), classes)
    rgb[0, 5] = 0
    out = str(tmp_path / "index")
    assert convert_color_labels(labels, out, classes) == 1
    converted = np.asarray(Image.open(os.path.join(out, "0.png")))
    np.testing.assert_array_equal(converted[0], [1, 1, 255, 255, 255, 255])
    assert check_folder_dataset(images, out, classes).errors == []


def test_env_variable_registers_at_import(tmp_path):
    """The route without Python: the variable alone makes ``import c2s_d2`` register the sets."""
    import subprocess
    import sys

    images, labels, classes = _folder(tmp_path)
    env = dict(os.environ, C2S_CUSTOM_DATASETS=f"imp_train,train,{images},{labels},{classes}")
    code = (
        "import c2s_d2; from detectron2.data import DatasetCatalog, MetadataCatalog; "
        "print(MetadataCatalog.get('imp_train').stuff_classes, len(DatasetCatalog.get('imp_train')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['road', 'car'] 3"


def test_bad_env_entry_does_not_break_import_and_is_refused_in_one_line():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import c2s_d2\n"
        "from c2s_d2.data.datasets.custom import check_env_datasets\n"
        "try:\n"
        "    check_env_datasets()\n"
        "except ValueError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = dict(os.environ, C2S_CUSTOM_DATASETS="bad", PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED C2S_CUSTOM_DATASETS: entry 'bad' is not" in out.stdout
