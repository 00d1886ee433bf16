"""demo/demo.py: the same predictions as the evaluation path, and its one-line refusals.

A small random-weight mini-world student (no training) is saved to a file; the demo's reading +
DefaultPredictor path and the evaluation path (detectron2's test loader + model) must give the
same class map on mini-world val images. The student's predictions depend on colour (checked),
so a demo that feeds the channels in the wrong order fails the comparison.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/miniworld/zs_baseline_R18.yaml")
DATASET = "c2s_miniworld_val"
# a smaller student, as in tests/test_end_to_end.py
TINY = [
    "MODEL.C2S.DEC_LAYERS", "2",
    "MODEL.C2S.NUM_OBJECT_QUERIES", "8",
    "MODEL.C2S.HIDDEN_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.CONV_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.MASK_DIM", "64",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
NUM_VAL = 3


def _load_demo():
    spec = importlib.util.spec_from_file_location("c2s_demo", os.path.join(ROOT, "demo/demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


@pytest.fixture(scope="module")
def miniworld(tmp_path_factory):
    """A 1 + 3 image mini-world in a private DETECTRON2_DATASETS; yields the val records."""
    root = tmp_path_factory.mktemp("demo_datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(root))
        mp.setenv("C2S_MINIWORLD_NUM_TRAIN", "1")
        mp.setenv("C2S_MINIWORLD_NUM_VAL", str(NUM_VAL))
        from detectron2.data import DatasetCatalog

        import c2s_d2  # noqa: F401  (registers the datasets)

        records = DatasetCatalog.get(DATASET)
        assert len(records) == NUM_VAL
        yield records


def _cfg(extra=()):
    from detectron2.config import get_cfg

    from c2s_d2 import add_c2s_config

    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(TINY + list(extra))
    return cfg


def _eval_path_predictions(weights):
    """{file_name: class map [H, W]} from detectron2's test loader + the model (eval path), and
    the same with the channel order swapped."""
    from detectron2.data import build_detection_test_loader
    from detectron2.modeling import build_model

    from c2s_d2.config import inference_cfg
    from c2s_d2.engine import C2SCheckpointer

    cfg = _cfg(["MODEL.WEIGHTS", weights])
    model = build_model(inference_cfg(cfg))
    C2SCheckpointer(model, require_all_keys=True).load(weights)
    model.eval()
    model.set_vocabulary_from_dataset(DATASET)
    out, swapped = {}, {}
    with torch.no_grad():
        for batch in build_detection_test_loader(cfg, DATASET):
            (x,) = batch
            out[x["file_name"]] = model(batch)[0]["sem_seg"].argmax(0).numpy()
            flipped = dict(x, image=x["image"].flip(0))  # the other channel order
            swapped[x["file_name"]] = model([flipped])[0]["sem_seg"].argmax(0).numpy()
    return out, swapped


@pytest.fixture(scope="module")
def weights_and_predictions(miniworld, tmp_path_factory):
    """A random-weight student saved as a detectron2 checkpoint (every key of the model), chosen
    among a few seeds so that its predictions depend on the channel order (a random student can
    predict one class everywhere, which would let a colour-order bug pass), and its eval-path
    predictions."""
    from detectron2.modeling import build_model

    from c2s_d2.config import inference_cfg

    folder = tmp_path_factory.mktemp("demo_weights")
    for seed in range(8):
        torch.manual_seed(seed)
        model = build_model(inference_cfg(_cfg()))
        path = folder / f"student_{seed}.pth"
        torch.save({"model": model.state_dict()}, path)
        expected, swapped = _eval_path_predictions(str(path))
        changed = [float((expected[f] != swapped[f]).mean()) for f in expected]
        if max(changed) > 0.05:
            return str(path), (expected, swapped)
    pytest.fail(f"no random student among 8 seeds depends on the channel order: {changed}")


@pytest.fixture(scope="module")
def weights(weights_and_predictions):
    return weights_and_predictions[0]


@pytest.fixture(scope="module")
def evaluator_predictions(weights_and_predictions):
    return weights_and_predictions[1]


def test_demo_path_matches_evaluator_path(weights, miniworld, evaluator_predictions):
    expected, swapped = evaluator_predictions
    assert sorted(expected) == sorted(r["file_name"] for r in miniworld)
    # the test can fail: this student's predictions depend on the channel order
    changed = [float((expected[f] != swapped[f]).mean()) for f in expected]
    print("fraction of pixels changed by swapping channels:", changed)
    assert max(changed) > 0.05, changed
    predictor, labels = demo.build_predictor(CONFIG, TINY + ["MODEL.WEIGHTS", weights], None, None)
    assert len(labels) == 16
    for record in miniworld:
        got = demo.segment(predictor, demo.read_bgr(record["file_name"]))
        assert got.shape == expected[record["file_name"]].shape
        np.testing.assert_array_equal(got, expected[record["file_name"]])


def test_demo_cli_writes_one_overlay_per_image(weights, miniworld, tmp_path, capsys):
    images = [r["file_name"] for r in miniworld]
    out = tmp_path / "out"
    rc = demo.main(
        ["--config-file", CONFIG, "--input", *images, "--output", str(out),
         "--opts", "MODEL.WEIGHTS", weights, *TINY]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    for f in images:
        written = out / (os.path.splitext(os.path.basename(f))[0] + ".png")
        assert Image.open(written).size == Image.open(f).size


# ------------------------------------------------------------------------------- refusals
def _run(capsys, *args, weights=None):
    opts = ["--opts", *TINY] + (["MODEL.WEIGHTS", weights] if weights else [])
    rc = demo.main(["--config-file", CONFIG, *args, *opts])
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return rc, err, lines


def _assert_refused(rc, err, lines, *needles):
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("demo.py: error: "), err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_no_weights_is_refused_unless_allowed(miniworld, tmp_path, capsys):
    image = miniworld[0]["file_name"]
    out = tmp_path / "out"
    rc, err, lines = _run(capsys, "--input", image, "--output", str(out))
    _assert_refused(rc, err, lines, "MODEL.WEIGHTS", "--allow-random-weights")
    assert not list(out.glob("*.png"))
    rc, err, _ = _run(capsys, "--input", image, "--output", str(out), "--allow-random-weights")
    assert rc == 0, err
    assert len(list(out.glob("*.png"))) == 1


def test_output_that_is_a_file_is_refused_for_several_inputs(weights, miniworld, tmp_path, capsys):
    images = [r["file_name"] for r in miniworld[:2]]
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"x")
    rc, err, lines = _run(capsys, "--input", *images, "--output", str(existing), weights=weights)
    _assert_refused(rc, err, lines, str(existing), "2 inputs")
    assert existing.read_bytes() == b"x"
    below = existing / "sub"
    rc, err, lines = _run(capsys, "--input", *images, "--output", str(below), weights=weights)
    _assert_refused(rc, err, lines, str(existing), "is a file")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    rc, err, lines = _run(capsys, "--input", *images, "--output", str(notes), weights=weights)
    _assert_refused(rc, err, lines, str(notes), "existing file", "2 inputs need a folder")
    rc, err, lines = _run(capsys, "--input", images[0], "--output", str(notes), weights=weights)
    _assert_refused(rc, err, lines, str(notes), "existing file")
    assert notes.read_text() == "keep me"
    # one input: an image file name is the output file itself, but never the input
    single = tmp_path / "single.png"
    rc, err, _ = _run(capsys, "--input", images[0], "--output", str(single), weights=weights)
    assert rc == 0, err
    assert Image.open(single).size == Image.open(images[0]).size
    copy = tmp_path / "copy.png"
    shutil.copy(images[0], copy)
    rc, err, lines = _run(capsys, "--input", str(copy), "--output", str(copy), weights=weights)
    _assert_refused(rc, err, lines, "overwrite the input image", str(copy))


def test_input_folder_means_its_images(weights, miniworld, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for r in miniworld[:2]:
        shutil.copy(r["file_name"], folder / os.path.basename(r["file_name"]))
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested").mkdir()
    out = tmp_path / "out"
    rc, err, _ = _run(capsys, "--input", str(folder), "--output", str(out), weights=weights)
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir())
    expected = sorted(os.path.splitext(os.path.basename(r["file_name"]))[0] + ".png"
                      for r in miniworld[:2])  # fmt: skip
    assert names == expected
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    rc, err, lines = _run(capsys, "--input", str(empty), "--output", str(out), weights=weights)
    _assert_refused(rc, err, lines, str(empty), "no images")


def test_output_paths_never_collide(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    files = [str(a / "x.jpg"), str(b / "x.jpg"), str(a / "x.png"), str(a / "y.png")]
    out = str(tmp_path / "out")
    got = demo.output_paths(files, out)
    assert got == {
        files[0]: os.path.join(out, "a", "x.png"),
        files[1]: os.path.join(out, "b", "x.png"),
        files[2]: os.path.join(out, "a", "x-1.png"),
        files[3]: os.path.join(out, "a", "y.png"),
    }
    # inputs from one folder keep their bare names
    assert demo.output_paths([str(a / "x.jpg"), str(a / "y.jpg")], out) == {
        str(a / "x.jpg"): os.path.join(out, "x.png"),
        str(a / "y.jpg"): os.path.join(out, "y.png"),
    }


def test_same_base_name_in_two_folders_gives_two_outputs(weights, miniworld, tmp_path, capsys):
    inputs = []
    for sub, record in zip(("a", "b"), miniworld[:2]):
        (tmp_path / sub).mkdir()
        inputs.append(str(tmp_path / sub / "scene.png"))
        shutil.copy(record["file_name"], inputs[-1])
    out = tmp_path / "out"
    rc, err, _ = _run(capsys, "--input", *inputs, "--output", str(out), weights=weights)
    assert rc == 0, err
    first = np.asarray(Image.open(out / "a" / "scene.png"))
    second = np.asarray(Image.open(out / "b" / "scene.png"))
    assert first.shape == second.shape and not np.array_equal(first, second)


def test_missing_and_corrupt_images_are_named(weights, miniworld, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    rc, err, lines = _run(capsys, "--input", str(missing), "--output", str(tmp_path / "o"),
                          weights=weights)  # fmt: skip
    _assert_refused(rc, err, lines, str(missing))
    rc, err, lines = _run(capsys, "--input", str(tmp_path / "*.jpg"), "--output",
                          str(tmp_path / "o"), weights=weights)  # fmt: skip
    _assert_refused(rc, err, lines, "*.jpg")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    good = miniworld[0]["file_name"]
    out = tmp_path / "out"
    rc, err, lines = _run(capsys, "--input", str(corrupt), good, "--output", str(out),
                          weights=weights)  # fmt: skip
    _assert_refused(rc, err, lines, str(corrupt))
    assert len(lines) == 1, err  # one line for the bad image, and the good one was segmented
    written = list(out.rglob("*.png"))
    assert [p.name for p in written] == [os.path.splitext(os.path.basename(good))[0] + ".png"]
    # --verbose adds the traceback
    rc, err, lines = _run(capsys, "--verbose", "--input", str(corrupt), "--output", str(out),
                          weights=weights)  # fmt: skip
    assert rc == 2 and "Traceback" in err and str(corrupt) in lines[-1]


def test_cli_refusal_in_a_fresh_process(tmp_path):
    """The script itself: exit code 2, one line on stderr, no traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "demo/demo.py", "--config-file", CONFIG, "--input",
         str(tmp_path / "nope.jpg"), "--output", str(tmp_path / "o")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [x for x in lines if "error" in x.lower()]
    assert errors == [f"demo.py: error: FileNotFoundError: --input: image not found: "
                      f"{tmp_path / 'nope.jpg'}"]  # fmt: skip
