"""prepare_voc.py reads DeepLab's train-aug list in both formats and refuses anything else."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from fixtures_benchmarks import (
    SBD_ONLY,
    VOC_TRAIN,
    VOC_VAL,
    import_prepare_script,
    write_voc_fixture,
)

common = import_prepare_script("_prepare_common")
prep_voc = import_prepare_script("prepare_voc")

SETS = os.path.join("VOCdevkit", "VOC2012", "ImageSets", "Segmentation")
OUT = os.path.join("VOCdevkit", "VOC2012", "annotations_detectron2")


def two_columns(stem: str) -> str:
    return f"/JPEGImages/{stem}.jpg /SegmentationClassAug/{stem}.png\n"


def write_list(root, name: str, text: str) -> str:
    path = os.path.join(root, SETS, name)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("list_name", ["trainaug.txt", "train_aug.txt"])
def test_two_column_train_aug_list(tmp_path, list_name):
    root = str(tmp_path)
    labels = write_voc_fixture(root)
    # DeepLab's two-column format, one val image included, a blank line and a CRLF line end
    listed = VOC_TRAIN + SBD_ONLY + VOC_VAL[:1]
    text = "".join(two_columns(s) for s in listed) + "\n"
    write_list(
        root,
        list_name,
        text.replace(two_columns(SBD_ONLY[0]), two_columns(SBD_ONLY[0])[:-1] + "\r\n"),
    )
    prep_voc.prepare_voc(root=root, progress=False)
    out = tmp_path / OUT
    assert (out / "train_aug.txt").read_text().split() == [
        "2007_000032",
        "2008_000002",
        "2008_000003",
    ]
    # the labels were converted (raw 0 -> 255, raw k -> k - 1, raw 255 -> 255), by stem
    raw = labels["train_aug"]["2008_000002"]
    expected = np.where((raw == 0) | (raw == 255), 255, raw.astype(np.int64) - 1)
    got = np.array(Image.open(out / "train_aug" / "2008_000002.png"))
    assert np.array_equal(got, expected)


def test_both_formats_give_the_same_stems(tmp_path):
    root = str(tmp_path)
    write_voc_fixture(root)
    stems = ["2007_000032", "2008_000002"]
    one = write_list(root, "one.txt", "".join(s + "\n" for s in stems))
    two = write_list(root, "two.txt", "".join(two_columns(s) for s in stems))
    no_slash = write_list(
        root,
        "rel.txt",
        "".join(f"JPEGImages/{s}.jpg SegmentationClassAug/{s}.png\n" for s in stems),
    )
    assert prep_voc.read_train_aug_list(one) == stems
    assert prep_voc.read_train_aug_list(two) == stems
    assert prep_voc.read_train_aug_list(no_slash) == stems


@pytest.mark.parametrize(
    "bad_line",
    [
        "/JPEGImages/2008_000002.jpg",  # one column, but a path, not a stem
        "/JPEGImages/2008_000002.jpg /SegmentationClassAug/2008_000003.png",  # stems differ
        "/JPEGImages/2008_000002.png /SegmentationClassAug/2008_000002.jpg",  # swapped columns
        "2008_000002 2008_000002",  # two columns without file names
        "/JPEGImages/2008_000002.jpg /SegmentationClassAug/2008_000002.png extra",
    ],
)
def test_bad_train_aug_line_is_refused_with_file_and_line(tmp_path, bad_line):
    root = str(tmp_path)
    write_voc_fixture(root)
    path = write_list(root, "trainaug.txt", two_columns("2007_000032") + "\n" + bad_line + "\n")
    with pytest.raises(common.PrepareError) as info:
        prep_voc.prepare_voc(root=root, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}, line 3: ")
    assert not (tmp_path / OUT / "train_aug.txt").exists()


def test_empty_train_aug_list_is_refused(tmp_path):
    root = str(tmp_path)
    write_voc_fixture(root)
    path = write_list(root, "trainaug.txt", "\n\n")
    with pytest.raises(common.PrepareError, match=re.escape(f"split list is empty: {path}")):
        prep_voc.prepare_voc(root=root, progress=False)
