"""demo/app.py: the web demo's prediction function and, opt-in, the page in a real browser.

The fast tests run the prediction function (``WebDemo.predict``, what the page's button calls)
with a small random-weight student saved to a file: its class map must equal demo/demo.py's
``segment`` on the same image file (read in BGR) and vocabulary, pixel for pixel. The student is
chosen so that its predictions depend on the channel order (checked), so a web demo that fed
Gradio's RGB array to the predictor unchanged would fail.

The slow test (``--run-slow``) starts the app in a subprocess, drives headless Chromium through
Playwright, and checks that the page's legend lists exactly the classes the prediction function
predicts. ``C2S_WEB_DEMO_SCREENSHOT=<file.png>`` also saves its screenshot there (how
docs/web_demo.png was made, with the `make run` model).
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_student import TINY_STUDENT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/miniworld/zs_baseline_R18.yaml")
# a smaller student, as in tests/test_demo.py
TINY = TINY_STUDENT
MINIWORLD_NAMES = [
    "grass", "water", "brick", "sand", "snow", "wood", "marble", "lava",
    "moss", "ice", "gravel", "carpet", "asphalt", "foliage", "tiles", "rust",
]  # fmt: skip
NUM_IMAGES = 3
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _load_app():
    spec = importlib.util.spec_from_file_location("c2s_web_app", os.path.join(ROOT, "demo/app.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


app = _load_app()
cli = app.cli  # demo/demo.py


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    """The first mini-world val images as PNG files (rendered: the generator's exact pixels)."""
    from c2s_d2.data.miniworld import render_scene

    folder = tmp_path_factory.mktemp("web_val")
    paths = []
    for i in range(NUM_IMAGES):
        image, _, _ = render_scene(0, "val", i, 128)
        paths.append(str(folder / f"{i:06d}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


def _rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _cfg():
    from detectron2.config import get_cfg

    from c2s_d2 import add_c2s_config

    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(TINY)
    return cfg


@pytest.fixture(scope="module")
def tiny(val_images, tmp_path_factory):
    """``(opts, WebDemo)`` of a random-weight student saved to a file, chosen among a few seeds so
    that its predictions depend on the channel order (a random student can predict one class
    everywhere, which would let a channel-order bug pass)."""
    from detectron2.modeling import build_model

    from c2s_d2.config import inference_cfg

    folder = tmp_path_factory.mktemp("web_weights")
    text = ", ".join(MINIWORLD_NAMES)
    for seed in range(8):
        torch.manual_seed(seed)
        model = build_model(inference_cfg(_cfg()))
        path = folder / f"student_{seed}.pth"
        torch.save({"model": model.state_dict()}, path)
        opts = TINY + ["MODEL.WEIGHTS", str(path)]
        web = app.WebDemo.from_config(CONFIG, opts)
        changed = []
        for p in val_images:
            rgb = _rgb(p)
            a = web.predict(rgb, text).class_map
            b = web.predict(np.ascontiguousarray(rgb[:, :, ::-1]), text).class_map
            changed.append(float((a != b).mean()))
        if max(changed) > 0.05:
            return opts, web
    pytest.fail(f"no random student among 8 seeds depends on the channel order: {changed}")


# ------------------------------------------------------------------------------- prediction
@pytest.mark.parametrize("names", [MINIWORLD_NAMES, ["lava", "ice", "grass", "water"]])
def test_class_map_equals_cli_demo(tiny, val_images, names):
    """Same image file, same vocabulary: the web function (RGB in) and demo.py (BGR from the
    file) give the same class map, pixel for pixel; channels left in RGB order would not."""
    opts, web = tiny
    predictor, labels = cli.build_predictor(CONFIG, opts, list(names), None)
    assert labels == list(names)
    text = "\n".join(", ".join(names[i : i + 3]) for i in range(0, len(names), 3))  # mixed seps
    unswapped_differs = []
    for path in val_images:
        expected = cli.segment(predictor, cli.read_bgr(path))
        got = web.predict(_rgb(path), text)
        assert got.names == list(names)
        assert got.class_map.shape == expected.shape == (128, 128)
        np.testing.assert_array_equal(got.class_map, expected)
        # the bug this guards against: the RGB array handed to the predictor as if it were BGR
        wrong = cli.segment(predictor, np.ascontiguousarray(_rgb(path)))
        unswapped_differs.append(float((wrong != expected).mean()))
    if len(names) == len(MINIWORLD_NAMES):
        assert max(unswapped_differs) > 0.05, unswapped_differs


def test_default_names_are_the_test_set_classes(tiny):
    _, web = tiny
    assert web.default_labels == MINIWORLD_NAMES
    assert app.parse_names(web.default_names_text) == MINIWORLD_NAMES


def test_legend_is_the_classes_present_with_pixel_shares(tiny, val_images):
    _, web = tiny
    for path in val_images:
        pred = web.predict(_rgb(path), ", ".join(MINIWORLD_NAMES))
        counts = np.bincount(pred.class_map.reshape(-1), minlength=16)
        present = [int(i) for i in np.flatnonzero(counts)]
        assert sorted(e.index for e in pred.legend) == present
        assert [e.name for e in pred.legend] == [MINIWORLD_NAMES[e.index] for e in pred.legend]
        assert [e.pixels for e in pred.legend] == [int(counts[e.index]) for e in pred.legend]
        assert [e.pixels for e in pred.legend] == sorted((e.pixels for e in pred.legend),
                                                         reverse=True)  # fmt: skip
        assert sum(e.pixels for e in pred.legend) == 128 * 128
        assert sum(e.share for e in pred.legend) == pytest.approx(100.0, abs=1e-9)
        for e in pred.legend:
            assert e.share == pytest.approx(100.0 * e.pixels / (128 * 128), abs=1e-12)
        # overlay: the image scaled to OVERLAY_MIN_SIDE; legend colours are the overlay's colours
        assert pred.overlay.shape == (512, 512, 3) and pred.overlay.dtype == np.uint8
        assert [e.color for e in pred.legend] == [app.palette(16)[e.index] for e in pred.legend]
        page = app.legend_html(pred)
        assert page.count('class="c2s-legend-row"') == len(pred.legend)
        for e in pred.legend:
            assert f'<td class="c2s-legend-name">{e.name}</td>' in page
            assert "background-color:rgb({},{},{})".format(*e.color) in page


def test_class_shares_by_hand():
    class_map = np.array([[0, 0, 2], [2, 2, 2]])
    got = app.class_shares(class_map, ["a", "b", "c"])
    assert [(e.index, e.name, e.pixels) for e in got] == [(2, "c", 4), (0, "a", 2)]
    assert [round(e.share, 4) for e in got] == [66.6667, 33.3333]
    tie = app.class_shares(np.array([[1, 0]]), ["a", "b"])
    assert [e.name for e in tie] == ["a", "b"]  # ties: vocabulary order
    assert [e.share for e in tie] == [50.0, 50.0]


def test_overlay_colours_are_the_legend_colours(tiny, val_images):
    """Where the class map is class k, the overlay pixel is a blend of the image and k's legend
    colour (Visualizer, alpha 0.5): checked on the pixels well inside the largest region (region
    borders and the class name are drawn on top, so most, not all, of them match)."""
    _, web = tiny
    path = val_images[0]
    pred = web.predict(_rgb(path), ", ".join(MINIWORLD_NAMES))
    big = pred.legend[0]
    mask = pred.class_map == big.index
    # pixels whose 5x5 neighbourhood is all class k (away from the drawn region borders)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, 2), (5, 5))
    ys, xs = np.nonzero(windows.all(axis=(2, 3)))
    assert len(ys) > 50
    blended = 0.5 * _rgb(path)[ys, xs].astype(float) + 0.5 * np.array(big.color, float)
    drawn = pred.overlay[4 * ys + 2, 4 * xs + 2].astype(float)  # scale 4: 128 -> 512
    close = np.abs(drawn - blended).max(axis=1) <= 12
    assert close.mean() > 0.8, close.mean()
    # another class's colour would not match
    other = [c for c in app.palette(16) if c != big.color][0]
    wrong = 0.5 * _rgb(path)[ys, xs].astype(float) + 0.5 * np.array(other, float)
    assert (np.abs(drawn - wrong).max(axis=1) <= 12).mean() < 0.5


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "no class names"),
        ("  \n \n", "no class names"),
        ("grass,,water", "empty class name in line 1"),
        ("grass\nwater,", "empty class name in line 2"),
        ("grass, Water\nwater", "duplicate class names: water"),
    ],
)
def test_bad_names_are_a_message_in_the_page(tiny, val_images, text, needle):
    _, web = tiny
    with pytest.raises(ValueError, match=needle):
        app.parse_names(text)
    image, message = web.handle(_rgb(val_images[0]), text)
    assert image is None
    assert message.startswith('<div id="c2s-error"') and needle in message
    assert "Traceback" not in message


def test_names_are_split_on_commas_and_lines():
    assert app.parse_names(" grass , water\n\nsand\n") == ["grass", "water", "sand"]
    assert app.parse_names("a <b>") == ["a <b>"]  # kept as typed; the legend escapes it


def test_no_image_and_odd_images(tiny, val_images):
    _, web = tiny
    image, message = web.handle(None, "grass")
    assert image is None and "no image" in message
    grey = _rgb(val_images[0])[:, :, 1]
    pred = web.predict(grey, "grass, water")  # grey is spread to 3 channels
    assert pred.class_map.shape == grey.shape
    with pytest.raises(ValueError, match="uint8"):
        web.predict(grey.astype(np.float32), "grass")
    rgba = np.dstack([_rgb(val_images[0]), np.full((128, 128), 255, np.uint8)])
    np.testing.assert_array_equal(
        web.predict(rgba, "grass, water").class_map, web.predict(rgba[:, :, :3], "grass, water")
        .class_map
    )  # fmt: skip


# ------------------------------------------------------------------------------- no model
def test_missing_weights_message(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope" / "model_final.pth")
    monkeypatch.setattr(app, "DEFAULT_WEIGHTS", missing)
    config, opts, problem = app.resolve_model(None, [])
    assert config == app.DEFAULT_CONFIG and opts == ["MODEL.WEIGHTS", missing]
    assert problem == app.missing_weights_message(missing)
    for needle in (missing, "make run", "--config-file CFG --opts MODEL.WEIGHTS W"):
        assert needle in problem
    # a config without weights and none given; a given file that does not exist
    assert "MODEL.WEIGHTS (empty)" in app.resolve_model(CONFIG, [])[2]
    assert missing in app.resolve_model(CONFIG, ["MODEL.WEIGHTS", missing])[2]
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        app.resolve_model(str(tmp_path / "nope.yaml"), [])
    # the page's callback shows the message instead of predicting
    web = app.WebDemo(None, MINIWORLD_NAMES, missing=problem)
    image, message = web.handle(np.zeros((8, 8, 3), np.uint8), "grass")
    assert image is None and "make run" in message and "c2s-error" in message


def test_missing_weights_app_starts_and_says_so(tmp_path, monkeypatch, capsys):
    """main() without a model: a warning on the console, the page is still built and launched
    (with the message), on 127.0.0.1 without a share link."""
    missing = str(tmp_path / "model_final.pth")
    monkeypatch.setattr(app, "DEFAULT_WEIGHTS", missing)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "no_datasets"))  # examples rendered
    seen = {}

    class FakePage:
        def launch(self, **kwargs):
            seen["launch"] = kwargs

    def fake_build_page(web, examples, model_line):
        seen["web"], seen["examples"] = web, examples
        return FakePage()

    monkeypatch.setattr(app, "build_page", fake_build_page)
    assert app.main(["--port", "7999"]) == 0
    err = capsys.readouterr().err
    assert f"app.py: warning: {app.missing_weights_message(missing)}" in err
    assert seen["web"].missing == app.missing_weights_message(missing)
    assert seen["web"].default_labels == MINIWORLD_NAMES
    assert seen["launch"]["server_name"] == "127.0.0.1" and seen["launch"]["server_port"] == 7999
    assert seen["launch"]["share"] is False
    assert len(seen["examples"]) == app.NUM_EXAMPLES


def test_examples_are_the_miniworld_val_images(tmp_path, monkeypatch):
    from c2s_d2.data.miniworld import render_scene

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "none"))
    paths = app.example_images(2, scratch=str(tmp_path / "scratch"))
    assert len(paths) == 2
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(_rgb(p), render_scene(0, "val", i, 128)[0])
    # a generated dataset folder is used as it is
    val = tmp_path / "d2" / "miniworld" / "images" / "val"
    val.mkdir(parents=True)
    for i, p in enumerate(paths):
        shutil.copy(p, val / f"{i:06d}.png")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    assert app.example_images(2) == [str(val / "000000.png"), str(val / "000001.png")]


# ------------------------------------------------------------------------------- browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(args, log_path, timeout=240):
    """Start demo/app.py on a free port; returns ``(process, url)`` once the page answers."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "demo/app.py"), "--port", str(port), *args],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    pytest.fail(f"app did not answer on {url} within {timeout} s:\n{open(log_path).read()[-3000:]}")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _browser(playwright):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.mark.slow
def test_page_in_a_browser_shows_the_predicted_classes(request, tmp_path):
    """Upload a mini-world val image, type the 16 names, press Segment: the legend lists exactly
    the classes (in share order, with their shares) that the prediction function gives. Uses
    the `make run` model when present, else the tiny random one."""
    from playwright.sync_api import sync_playwright

    if os.path.isfile(app.DEFAULT_WEIGHTS) and not os.environ.get("C2S_WEB_TEST_TINY"):
        config, opts = app.DEFAULT_CONFIG, ["MODEL.WEIGHTS", app.DEFAULT_WEIGHTS]
        web = app.WebDemo.from_config(config, opts)
    else:
        (opts, web), config = request.getfixturevalue("tiny"), CONFIG
    image = app.example_images(2, scratch=str(tmp_path / "examples"))[1]  # val 000001
    text = ", ".join(MINIWORLD_NAMES)
    expected = web.predict(_rgb(image), text)
    proc, url = _start_app(["--config-file", config, "--opts", *opts], tmp_path / "app.log")
    shot = tmp_path / "web_demo.png"
    console_errors, hosts = [], set()
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.goto(url, wait_until="networkidle", timeout=60_000)
            page.locator("#c2s-input-image input[type=file]").set_input_files(image)
            page.locator("#c2s-names textarea").fill(text)
            page.locator("#c2s-input-image img").wait_for(timeout=30_000)  # upload shown
            page.locator("#c2s-run").click()
            page.wait_for_selector("#c2s-legend .c2s-legend-row, #c2s-error", timeout=120_000)
            assert page.locator("#c2s-error").count() == 0, page.locator("#c2s-error").inner_text()
            names = page.locator("#c2s-legend .c2s-legend-name").all_inner_texts()
            shares = page.locator("#c2s-legend .c2s-legend-share").all_inner_texts()
            page.locator("#c2s-overlay img").wait_for(timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            # bad names: a message in the page, no traceback
            page.locator("#c2s-names textarea").fill("grass, Grass")
            page.locator("#c2s-run").click()
            page.wait_for_selector("#c2s-error", timeout=60_000)
            error = page.locator("#c2s-error").inner_text()
            browser.close()
    finally:
        _stop(proc)
    assert names == [e.name for e in expected.legend]
    assert shares == [f"{e.share:.1f} %" for e in expected.legend]
    assert "duplicate class names: grass" in error
    assert hosts == {url.split("/")[2]}  # nothing fetched from anywhere else
    assert not console_errors, console_errors
    print(f"legend in the page: {list(zip(names, shares))}; screenshot {shot}")
    target = os.environ.get("C2S_WEB_DEMO_SCREENSHOT")
    if target:
        shutil.copy(shot, target)


@pytest.mark.slow
def test_page_without_a_model_says_how_to_get_one(tmp_path):
    from playwright.sync_api import sync_playwright

    missing = str(tmp_path / "model_final.pth")
    proc, url = _start_app(["--opts", "MODEL.WEIGHTS", missing], tmp_path / "app.log")
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page()
            page.goto(url, wait_until="networkidle", timeout=60_000)
            banner = page.locator("#c2s-model #c2s-error").inner_text(timeout=30_000)
            browser.close()
    finally:
        _stop(proc)
    assert banner == app.missing_weights_message(missing)
    assert (
        f"app.py: warning: {app.missing_weights_message(missing)}"
        in open(tmp_path / "app.log").read()
    )
