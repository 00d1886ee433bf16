#!/usr/bin/env python
"""Web demo: segment an image with your own class names in the browser (Gradio).

    python demo/app.py                      # the mini-world model `make run` trained
    python demo/app.py --port 7861 --config-file configs/miniworld/zs_baseline_R18_bs8_1k.yaml \
        --opts MODEL.WEIGHTS output/make_run/zs_baseline/seed0/model_final.pth

Then open http://127.0.0.1:7860 (or the ``--port`` given). The page takes an image (upload, or a
mini-world val example), class names (comma or newline separated; default: the classes of the
config's first test set) and shows the labelled overlay, a legend (colour and name of every
predicted class) and each class's share of the image.

The model runs exactly as in ``demo/demo.py``: ``build_predictor`` (a ``DefaultPredictor``) and
``segment`` on a BGR image. Gradio hands the page's image over as RGB; ``WebDemo.predict``
flips it to BGR before the predictor sees it.

The server listens on 127.0.0.1 only, makes no share link, sends no analytics and fetches
nothing from the internet. Without a trained model (the default weights are missing), the page
still opens and says how to get one.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIG = os.path.join(ROOT, "configs/miniworld/c2s_full_R18_bs8_1k.yaml")
# where `make run` (tools/benchmark_miniworld.py --output output/make_run) leaves full C2S, seed 0
DEFAULT_WEIGHTS = os.path.join(ROOT, "output/make_run/c2s_full/seed0/model_final.pth")
DEFAULT_PORT = 7860
NUM_EXAMPLES = 4
# the overlay is drawn at least this many pixels on its longer side (mini-world images are 128)
OVERLAY_MIN_SIDE = 512
OVERLAY_MAX_SCALE = 8.0


def _load_cli_demo():
    """demo/demo.py as a module (the folder is not a package)."""
    name = "c2s_demo_cli"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cli = _load_cli_demo()


# ----------------------------------------------------------------------------- class names
def parse_names(text: str) -> List[str]:
    """Class names typed in the page -> list of names.

    Names are separated by commas or new lines; blank lines are skipped, surrounding spaces
    dropped. Refuses (``ValueError``, one line) no name at all, an empty name within a line
    (``"a,,b"``, ``"a,"``) and duplicates (case-insensitive).
    """
    names: List[str] = []
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise ValueError("no class names: type at least one, e.g. 'grass, water, sand'")
    for number, line in enumerate(lines, 1):
        parts = [p.strip() for p in line.split(",")]
        if any(not p for p in parts):
            raise ValueError(
                f"empty class name in line {number} ({line.strip()!r}): separate names by "
                f"one comma or one new line"
            )
        names.extend(parts)
    lowered = [n.lower() for n in names]
    dups = sorted({n for n in lowered if lowered.count(n) > 1})
    if dups:
        raise ValueError(f"duplicate class names: {', '.join(dups)}")
    return names


def palette(num_classes: int) -> List[Tuple[int, int, int]]:
    """One RGB colour (0-255) per class index: detectron2's fixed colour map, repeated."""
    from detectron2.utils.colormap import colormap

    colours = colormap(rgb=True, maximum=255).astype(int)
    return [tuple(int(c) for c in colours[i % len(colours)]) for i in range(num_classes)]


# ----------------------------------------------------------------------------- prediction
@dataclass
class LegendEntry:
    """One predicted class: index into the vocabulary, name, colour, pixel count, share (%)."""

    index: int
    name: str
    color: Tuple[int, int, int]
    pixels: int
    share: float


@dataclass
class WebPrediction:
    """What the page shows for one image.

    class_map: int64 [H, W], indices into ``names``; overlay: uint8 [H', W', 3] RGB (the image
    scaled to at least ``OVERLAY_MIN_SIDE`` on its longer side); legend: the classes present,
    largest share first.
    """

    class_map: np.ndarray
    names: List[str]
    overlay: np.ndarray
    legend: List[LegendEntry]


def class_shares(class_map: np.ndarray, names: Sequence[str]) -> List[LegendEntry]:
    """The classes present in ``class_map`` [H, W] with pixel counts and shares in percent of
    all pixels (they sum to 100), largest first (ties: vocabulary order)."""
    counts = np.bincount(class_map.reshape(-1), minlength=len(names))
    total = int(counts.sum())
    colours = palette(len(names))
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    return [
        LegendEntry(i, names[i], colours[i], int(counts[i]), 100.0 * int(counts[i]) / total)
        for i in present
    ]


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Check a page image: uint8 [H, W, 3] RGB (grey [H, W] and RGBA [H, W, 4] are converted)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be 8-bit (uint8), got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {tuple(image.shape)}")
    return np.ascontiguousarray(image[:, :, :3])


class WebDemo:
    """The model behind the page: a ``DefaultPredictor`` built by demo/demo.py and the default
    class names. ``predict`` is the page's prediction as a plain function; ``handle`` is the
    Gradio callback (errors become a message in the page).

    ``predictor`` None means no trained model: ``handle`` shows ``missing`` instead.
    """

    def __init__(
        self,
        predictor,
        default_labels: Sequence[str],
        default_text_names: Optional[Sequence[Sequence[str]]] = None,
        missing: str = "",
    ):
        self.predictor = predictor
        self.default_labels = list(default_labels)
        # a typed name equal to a default label is encoded with that class's text names
        # (synonyms), as the evaluator does
        texts = default_text_names or [[n] for n in self.default_labels]
        self.text_names = {label: list(t) for label, t in zip(self.default_labels, texts)}
        self.missing = missing
        self._lock = threading.Lock()
        self._vocabulary: Optional[List[List[str]]] = None

    @classmethod
    def from_config(cls, config_file: str, opts: Sequence[str]) -> "WebDemo":
        """Build the predictor as demo/demo.py does (refuses empty ``MODEL.WEIGHTS``)."""
        predictor, labels = cli.build_predictor(config_file, opts, None, None)
        return cls(predictor, labels, predictor.model.test_class_names)

    @property
    def default_names_text(self) -> str:
        return ", ".join(self.default_labels)

    def _set_vocabulary(self, names: List[str]) -> None:
        vocabulary = [self.text_names.get(n, [n]) for n in names]
        if vocabulary != self._vocabulary:
            self.predictor.model.set_vocabulary(vocabulary)
            self._vocabulary = vocabulary

    def predict(self, image_rgb: np.ndarray, names_text: str) -> WebPrediction:
        """Segment ``image_rgb`` (uint8 [H, W, 3], RGB as Gradio gives it) over the names typed.

        The predictor gets the image in BGR order (its contract, as in demo/demo.py). Raises
        ``ValueError`` for bad names or images.
        """
        if self.predictor is None:
            raise ValueError(self.missing)
        names = parse_names(names_text)
        image_rgb = as_rgb_uint8(image_rgb)
        image_bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        with self._lock:  # Gradio runs callbacks in threads; the vocabulary is model state
            self._set_vocabulary(names)
            class_map = cli.segment(self.predictor, image_bgr)
        legend = class_shares(class_map, names)
        scale = min(OVERLAY_MAX_SCALE, max(1.0, OVERLAY_MIN_SIDE / max(class_map.shape)))
        picture = cli.overlay(image_rgb, class_map, names, colors=palette(len(names)), scale=scale)
        return WebPrediction(class_map, names, picture, legend)

    def handle(self, image_rgb: Optional[np.ndarray], names_text: str):
        """Gradio callback: ``(overlay or None, legend HTML)``; problems become an HTML message."""
        if self.predictor is None:
            return None, error_html(self.missing)
        if image_rgb is None:
            return None, error_html("no image: upload one or pick an example first")
        try:
            prediction = self.predict(image_rgb, names_text)
        except ValueError as e:
            return None, error_html(str(e))
        except Exception as e:  # never a traceback in the page; the console gets it
            traceback.print_exc()
            return None, error_html(f"prediction failed: {type(e).__name__}: {e}")
        return prediction.overlay, legend_html(prediction)


# ----------------------------------------------------------------------------- HTML
def legend_html(prediction: WebPrediction) -> str:
    """The legend: ``#c2s-legend`` holds one ``.c2s-legend-row`` per predicted class (largest
    share first) with ``.c2s-swatch`` (its overlay colour), ``.c2s-legend-name`` and
    ``.c2s-legend-share`` (percent of the image, one decimal)."""
    rows = []
    for e in prediction.legend:
        r, g, b = e.color
        rows.append(
            f'<tr class="c2s-legend-row">'
            f'<td><span class="c2s-swatch" style="display:inline-block;width:1.2em;'
            f'height:1.2em;border:1px solid #444;background-color:rgb({r},{g},{b})">'
            f"</span></td>"
            f'<td class="c2s-legend-name">{html.escape(e.name)}</td>'
            f'<td class="c2s-legend-share" style="text-align:right">{e.share:.1f} %</td>'
            f"</tr>"
        )
    total = sum(e.pixels for e in prediction.legend)
    return (
        f'<div id="c2s-legend"><table class="c2s-legend-table">'
        f"<thead><tr><th></th><th>class</th><th>share</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        f'<p class="c2s-legend-note">{len(prediction.legend)} of {len(prediction.names)} '
        f"classes predicted, shares of {total} pixels</p></div>"
    )


def error_html(message: str) -> str:
    """A message box ``#c2s-error`` (the text escaped)."""
    return (
        f'<div id="c2s-error" style="color:#b00020;font-weight:600">'
        f"{html.escape(message)}</div>"
    )


# ----------------------------------------------------------------------------- model + examples
def missing_weights_message(weights: str) -> str:
    return (
        f"no trained model: {weights} not found. Run `make run` (trains the mini-world models) "
        f"or start the app with --config-file CFG --opts MODEL.WEIGHTS W"
    )


def _opt_value(opts: Sequence[str], key: str) -> Optional[str]:
    """The last value given to ``key`` in ``KEY VALUE`` pairs (None when absent)."""
    value = None
    for k, v in zip(opts[0::2], opts[1::2]):
        if k == key:
            value = v
    return value


def resolve_model(config_file: Optional[str], opts: Sequence[str]) -> Tuple[str, List[str], str]:
    """``(config_file, opts, problem)``: the default config and the `make run` weights unless
    given; ``problem`` is the missing-weights message ("" when the weights file exists)."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"--opts needs KEY VALUE pairs, got an odd number: {opts}")
    config_file = config_file or DEFAULT_CONFIG
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    weights = _opt_value(opts, "MODEL.WEIGHTS")
    if weights is None:
        from detectron2.config import get_cfg

        from c2s_d2 import add_c2s_config

        cfg = get_cfg()
        add_c2s_config(cfg)
        cfg.merge_from_file(config_file)
        weights = cfg.MODEL.WEIGHTS
        if not weights and os.path.abspath(config_file) == os.path.abspath(DEFAULT_CONFIG):
            weights = DEFAULT_WEIGHTS
            opts += ["MODEL.WEIGHTS", weights]
    if not weights:
        return config_file, opts, missing_weights_message("MODEL.WEIGHTS (empty)")
    if "://" not in weights and not os.path.isfile(weights):
        return config_file, opts, missing_weights_message(weights)
    return config_file, opts, ""


def default_labels(config_file: str, opts: Sequence[str]) -> List[str]:
    """The classes of the config's first test set (first training set if none)."""
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    from c2s_d2 import add_c2s_config

    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else cfg.DATASETS.TRAIN[0]
    return list(MetadataCatalog.get(dataset).stuff_classes)


def example_images(num: int = NUM_EXAMPLES, scratch: Optional[str] = None) -> List[str]:
    """Paths of the first ``num`` mini-world val images.

    From ``$DETECTRON2_DATASETS/miniworld/images/val`` when generated; otherwise the same scenes
    are rendered (``c2s_d2.data.miniworld.render_scene``, identical pixels) into ``scratch``
    (default: a folder in the system temporary folder).
    """
    from PIL import Image

    from c2s_d2.data.datasets.register_miniworld import miniworld_params_from_env
    from c2s_d2.data.miniworld import default_miniworld_root, render_scene

    folder = os.path.join(default_miniworld_root(), "images", "val")
    if os.path.isdir(folder):
        files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))[:num]
        if len(files) == num:
            return [os.path.abspath(os.path.join(folder, f)) for f in files]
    params = miniworld_params_from_env()
    if scratch is None:
        import tempfile

        scratch = os.path.join(tempfile.gettempdir(), "c2s_web_demo_examples")
    os.makedirs(scratch, exist_ok=True)
    paths = []
    for i in range(num):
        path = os.path.join(scratch, f"val_{params['seed']}_{params['size']}_{i:06d}.png")
        if not os.path.isfile(path):
            image, _, _ = render_scene(params["seed"], "val", i, params["size"])
            Image.fromarray(image).save(path)
        paths.append(os.path.abspath(path))
    return paths


# ----------------------------------------------------------------------------- page
CSS = """
#c2s-legend table { border-collapse: collapse; }
#c2s-legend td, #c2s-legend th { padding: 2px 10px; }
"""


def build_page(web: WebDemo, examples: Sequence[str], model_line: str):
    """The Gradio Blocks page (not launched)."""
    import gradio as gr

    with gr.Blocks(title="c2s-d2 web demo", analytics_enabled=False) as page:
        gr.Markdown(
            "## c2s-d2: zero-shot semantic segmentation with your own class names\n"
            "Upload an image or pick an example, type class names (comma or newline "
            "separated) and press **Segment**."
        )
        gr.HTML(
            error_html(web.missing) if web.missing else f"<p>{html.escape(model_line)}</p>",
            elem_id="c2s-model",
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="numpy", image_mode="RGB", label="image", sources=["upload"],
                    height=320, elem_id="c2s-input-image",
                )  # fmt: skip
                names = gr.Textbox(
                    value=web.default_names_text, lines=3, label="class names",
                    elem_id="c2s-names",
                )  # fmt: skip
                button = gr.Button("Segment", variant="primary", elem_id="c2s-run")
                if examples:
                    gr.Examples(
                        examples=[[p] for p in examples],
                        inputs=[image],
                        label="mini-world val images",
                        example_labels=[os.path.basename(p) for p in examples],
                    )
            with gr.Column():
                result = gr.Image(
                    type="numpy", format="png", label="overlay", interactive=False,
                    elem_id="c2s-overlay",
                )  # fmt: skip
                legend = gr.HTML("", elem_id="c2s-legend-box")
        button.click(web.handle, inputs=[image, names], outputs=[result, legend])
    return page


def _shown(path: Optional[str]) -> str:
    """A path as shown in the page: relative to the repository when inside it."""
    if path and os.path.isabs(path) and path.startswith(ROOT + os.sep):
        return os.path.relpath(path, ROOT)
    return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=None, help=f"default: {DEFAULT_CONFIG}")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of errors too")
    p.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE"
    )
    args = p.parse_args(argv)
    from detectron2.utils.logger import setup_logger

    from c2s_d2.utils.errors import is_user_error, one_line_error

    setup_logger(name="c2s_d2")
    try:
        config_file, opts, missing = resolve_model(args.config_file, args.opts)
        if missing:
            print(f"app.py: warning: {missing}", file=sys.stderr, flush=True)
            web = WebDemo(None, default_labels(config_file, opts), missing=missing)
        else:
            web = WebDemo.from_config(config_file, opts)
        examples = example_images()
    except Exception as e:
        if not is_user_error(e, scripts=(__file__, cli.__file__)):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"app.py: error: {one_line_error(e)}", file=sys.stderr, flush=True)
        return 2
    model_line = (
        f"model: {_shown(config_file)}, weights {_shown(_opt_value(opts, 'MODEL.WEIGHTS'))}"
    )
    page = build_page(web, examples, model_line)
    print(f"app.py: serving on http://127.0.0.1:{args.port} ({model_line})", flush=True)
    try:
        page.launch(
            server_name="127.0.0.1",
            server_port=args.port,
            share=False,
            ssr_mode=False,
            footer_links=[],
            css=CSS,
            allowed_paths=sorted({os.path.dirname(p) for p in examples}),
        )
    except OSError as e:
        print(f"app.py: error: port {args.port}: {one_line_error(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
