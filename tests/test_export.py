"""Export of the inference student (c2s_d2/export, tools/export_model.py, tools/embed_names.py,
tools/run_onnx.py): ONNX Runtime and TorchScript against the PyTorch model, the text tower and
the torch-free tokenizer against open_clip, the torch-free runtime end to end, refusals.

A small random-weight mini-world student (no training) is saved to a file and exported once per
module; images are mini-world val scenes rendered at the test size (128 px).
"""

import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
from tiny_student import TINY_STUDENT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

CONFIG = os.path.join(ROOT, "configs/miniworld/zs_baseline_R18.yaml")
DATASET = "c2s_miniworld_val"
TINY = TINY_STUDENT
# a second vocabulary: other names, another K (a few mini-world materials, a few others)
OTHER_NAMES = ["lava", "ice", "grass", "sky", "road", "wooden table", "person"]
NUM_IMAGES = 3
FORBIDDEN = ("torch", "detectron2", "open_clip", "c2s_d2")


def _load_runtime():
    import importlib.util

    path = os.path.join(ROOT, "c2s_d2", "export", "runtime.py")
    spec = importlib.util.spec_from_file_location("c2s_export_runtime_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rt = _load_runtime()


def _cfg(extra=()):
    from c2s_d2.export.exporter import load_cfg

    return load_cfg(CONFIG, TINY + list(extra))


@pytest.fixture(scope="module")
def images():
    """Mini-world val scenes at the test size: RGB uint8 [128, 128, 3]."""
    from c2s_d2.data.miniworld import render_scene

    return [render_scene(0, "val", i)[0] for i in range(NUM_IMAGES)]


def _torch_scores(model, image_rgb):
    """The PyTorch eval path: model([{"image": CHW tensor}])[0]["sem_seg"] [K, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(image_rgb.transpose(2, 0, 1))).float()
    with torch.no_grad():
        return model([{"image": x}])[0]["sem_seg"]


@pytest.fixture(scope="module")
def weights_and_model(images, tmp_path_factory):
    """A random student saved as a checkpoint, chosen among a few seeds so that its class maps
    show several classes (a student predicting one class everywhere would make argmax parity
    trivial), and the PyTorch model loaded from that file the way the exporter loads it."""
    from detectron2.modeling import build_model

    from c2s_d2.config import inference_cfg
    from c2s_d2.export.exporter import build_student_model

    folder = tmp_path_factory.mktemp("export_weights")
    for seed in range(8):
        torch.manual_seed(seed)
        model = build_model(inference_cfg(_cfg())).eval()
        maps = [_torch_scores(model, im).argmax(0) for im in images]
        if len(torch.unique(torch.stack(maps))) >= 3:
            break
    path = str(folder / f"student_{seed}.pth")
    torch.save({"model": model.state_dict()}, path)
    loaded = build_student_model(_cfg(["MODEL.WEIGHTS", path]))
    return path, loaded


@pytest.fixture(scope="module")
def export_dir(weights_and_model, tmp_path_factory):
    from c2s_d2.export.exporter import export_all

    path, _ = weights_and_model
    out = tmp_path_factory.mktemp("export") / "student"
    info = export_all(CONFIG, str(out), TINY + ["MODEL.WEIGHTS", path])
    assert set(info["files"]) >= {"student.onnx", "student.torchscript.pt", "text_tower.onnx"}
    return str(out)


def _ort(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _vocabularies(model):
    """{name: (names, bank [K, d])}: the val set's 16 classes and OTHER_NAMES."""
    model.set_vocabulary_from_dataset(DATASET)
    default = (list(range(16)), model.test_bank.clone())
    model.set_vocabulary(OTHER_NAMES)
    other = (OTHER_NAMES, model.test_bank.clone())
    return {"miniworld16": default, "other7": other}


# ------------------------------------------------------------------------------- parity
def test_export_json_describes_the_model(export_dir):
    with open(os.path.join(export_dir, "export.json")) as f:
        info = json.load(f)
    assert info["input_format"] == "RGB"
    assert info["min_size_test"] == 128 and info["max_size_test"] == 320
    assert info["size_divisibility"] == 32 and info["embed_dim"] == 64 and info["opset"] >= 17
    from c2s_d2.modeling.clip.templates import TEMPLATES

    assert info["templates"] == list(TEMPLATES["short"])
    assert info["tokenizer"]["type"] == "clip_bpe" and info["tokenizer"]["context_length"] == 77
    assert os.path.isfile(os.path.join(export_dir, info["tokenizer"]["bpe_file"]))
    assert all(v <= 1e-3 for v in info["max_abs_diff_vs_pytorch"].values())


def test_onnx_matches_pytorch_on_two_vocabularies(weights_and_model, export_dir, images):
    import onnx

    _, model = weights_and_model
    graph = onnx.load(os.path.join(export_dir, "student.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert graph.opset_import[0].version >= 17 and "Conv" in ops
    assert "DepthToSpace" in ops  # the 3x3 convolutions by Winograd (c2s_d2.export.student)
    session = _ort(os.path.join(export_dir, "student.onnx"))
    classes_seen = set()
    # the scenes at 128x128 and one crop at 100x75 (padded: sizes not multiples of 4 inside)
    inputs = [*images, np.ascontiguousarray(images[0][:100, :75])]
    for vocab, (_, bank) in _vocabularies(model).items():
        model.test_bank = bank
        same, worst = [], 0.0
        for image in inputs:
            want = _torch_scores(model, image)
            x = image.transpose(2, 0, 1)[None].astype(np.float32)
            got = session.run(None, {"image": x, "text_embeddings": bank.numpy()})[0]
            assert got.shape == tuple(want.shape) == (bank.shape[0], *image.shape[:2])
            worst = max(worst, float(np.abs(got - want.numpy()).max()))
            same.append(float((got.argmax(0) == want.argmax(0).numpy()).mean()))
            if vocab == "miniworld16":
                classes_seen |= set(np.unique(want.argmax(0).numpy()).tolist())
        print(f"ONNX vs PyTorch, {vocab}: identical argmax {min(same):.5f}, max |diff| {worst:.2e}")
        assert min(same) >= 0.999 and worst <= 1e-3, (vocab, same, worst)
    assert len(classes_seen) >= 3, classes_seen  # the comparison is not trivial


def test_winograd_conv3x3_matches_conv2d():
    from c2s_d2.export.student import winograd_conv3x3

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, 3, 3, generator=g)
    bias = torch.randn(6, generator=g)
    for (h, w), aligned in [
        ((12, 20), True),
        ((12, 20), False),
        ((13, 22), False),
        ((3, 5), False),
    ]:
        x = torch.randn(1, 5, h, w, generator=g)
        for b in (bias, None):
            want = torch.nn.functional.conv2d(x, weight, b, padding=1)
            got = winograd_conv3x3(x, weight, b, aligned)
            assert got.shape == want.shape
            assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_torchscript_at_another_size_and_k(weights_and_model, export_dir, images):
    import warnings

    _, model = weights_and_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.load(os.path.join(export_dir, "student.torchscript.pt"))
    _, bank = _vocabularies(model)["other7"]  # K 7; traced with the 16 val classes
    model.test_bank = bank
    for image in images[:2]:
        crop = np.ascontiguousarray(image[:100, :75])  # 100x75: traced at 128x144, padded
        want = _torch_scores(model, crop)
        x = torch.from_numpy(crop.transpose(2, 0, 1).copy()).float()[None]
        with torch.no_grad():
            got = traced(x, bank)
        assert got.shape == want.shape == (7, 100, 75)
        same = float((got.argmax(0) == want.argmax(0)).float().mean())
        diff = float((got - want).abs().max())
        print(f"TorchScript vs PyTorch at 100x75, K 7: identical argmax {same:.5f}, max {diff:.2e}")
        assert same >= 0.999 and diff <= 1e-3


def test_text_tower_matches_the_text_encoder(weights_and_model, export_dir):
    """text_tower.onnx against the PyTorch tower (per prompt), and the runtime's prompt
    ensembling (torch-free tokenizer + tower) against the project's text encoder."""
    import torch.nn.functional as F

    from c2s_d2.export.exporter import build_text_tower
    from c2s_d2.modeling.clip.loader import get_tokenizer
    from c2s_d2.modeling.clip.text_encoder import text_embeddings_from_cfg

    cfg = _cfg()
    tower = build_text_tower(cfg)
    tokens = get_tokenizer(cfg.MODEL.CLIP.MODEL_NAME, tuple(cfg.MODEL.CLIP.MODEL_CONFIG_FILES))(
        ["itap of a lava.", "a photo of the small wooden table.", "x", "art of the ice."]
    )
    with torch.no_grad():
        want = F.normalize(tower.tower.encode_text(tokens), dim=-1)
    got = _ort(os.path.join(export_dir, "text_tower.onnx")).run(None, {"tokens": tokens.numpy()})
    assert float(np.abs(got[0] - want.numpy()).max()) <= 1e-4
    student = rt.ExportedStudent(export_dir)
    emb = student.embed_names(OTHER_NAMES)
    ref = text_embeddings_from_cfg(cfg, OTHER_NAMES).numpy()
    diff = float(np.abs(emb - ref).max())
    print("runtime prompt ensembling vs text encoder: max |diff|", diff)
    assert emb.shape == (7, 64) and diff <= 1e-4


def test_embed_names_gives_the_models_embeddings(weights_and_model, tmp_path):
    import embed_names

    _, model = weights_and_model
    banks = _vocabularies(model)
    out = tmp_path / "other.npz"
    opts = TINY
    assert embed_names.main(["--config-file", CONFIG, "--names", ",".join(OTHER_NAMES),
                             "--output", str(out), *opts]) == 0  # fmt: skip
    names, emb = rt.read_vocab(str(out))
    assert names == OTHER_NAMES
    np.testing.assert_array_equal(emb, banks["other7"][1].numpy())  # bitwise
    out16 = tmp_path / "val.npz"
    assert embed_names.main(["--config-file", CONFIG, "--dataset", DATASET, "--output",
                             str(out16), *opts]) == 0  # fmt: skip
    names, emb = rt.read_vocab(str(out16))
    assert len(names) == 16 and names[0] == "grass"
    np.testing.assert_array_equal(emb, banks["miniworld16"][1].numpy())
    names_file = tmp_path / "names.txt"
    names_file.write_text("# my classes\nlava\n\nice\n")
    out2 = tmp_path / "file.npz"
    assert embed_names.main(["--config-file", CONFIG, "--names-file", str(names_file),
                             "--output", str(out2), *opts]) == 0  # fmt: skip
    names, emb = rt.read_vocab(str(out2))
    assert names == ["lava", "ice"]
    np.testing.assert_array_equal(emb, banks["other7"][1].numpy()[:2])


TRICKY_NAMES = [
    "grass", "T-shirt", "person's bag", "don't", "THEY'LL", "we'Re", "''s", "café au lait",
    "Ærøskøbing", "北京 tower", "x²+½", "AT&amp;T", "&lt;b&gt;", "  many   spaces\t\n",
    "<start_of_text>hi<END_OF_TEXT>", "emoji 🐱🐶", "3.14 and 1234567", "snake_case-name",
    "ﬁne ligature", "Ｆｕｌｌ width", "mojibake cafÃ©", "Straße", "İstanbul", "naïve résumé",
    "a {} b", "stop sign.", "hair drier", "playingfield", "fire-hydrant", "x" * 300,
    " ".join(["word"] * 100),
]  # fmt: skip


def test_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    tok = _load_runtime().ClipBpeTokenizer(default_bpe(), 77)
    want = SimpleTokenizer()(TRICKY_NAMES).numpy()
    got = tok(TRICKY_NAMES)
    assert got.dtype == np.int64 and got.shape == want.shape == (len(TRICKY_NAMES), 77)
    for name, g, w in zip(TRICKY_NAMES, got, want):
        assert g.tolist() == w.tolist(), name
    # truncation: the last kept token is the end token
    assert got[-1, -1] == tok.eot_token_id and got[-1, 0] == tok.sot_token_id


# ------------------------------------------------------------------------------- runtime
def _run_in_subprocess(code, timeout=120):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return proc


def test_runtime_imports_no_torch():
    proc = _run_in_subprocess(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("rt", "c2s_d2/export/runtime.py")
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        import onnxruntime
        print(json.dumps([k for k in {FORBIDDEN!r} if k in sys.modules]))
        """)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_run_onnx_end_to_end_without_torch(weights_and_model, export_dir, images, tmp_path):
    """tools/run_onnx.py in a fresh process: --vocab (the model's own embeddings) on test-size
    images gives the PyTorch class maps; --names works through the text tower; a larger image
    comes back at its own size; torch, detectron2, open_clip and c2s_d2 are never imported."""
    _, model = weights_and_model
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"scene{i}.png"))
        cv2.imwrite(files[-1], image[:, :, ::-1])
    big = cv2.resize(images[0], (240, 200), interpolation=cv2.INTER_LINEAR)
    files.append(str(tmp_path / "big.png"))
    cv2.imwrite(files[-1], big[:, :, ::-1])
    bank = _vocabularies(model)["miniworld16"][1]
    vocab = tmp_path / "vocab.npz"
    np.savez(vocab, names=np.array([f"c{i}" for i in range(16)]), embeddings=bank.numpy())
    out_v, out_n = tmp_path / "out_vocab", tmp_path / "out_names"
    proc = _run_in_subprocess(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("run_onnx", "tools/run_onnx.py")
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        rc1 = m.main(["--model", {export_dir!r}, "--input", *{files!r}, "--vocab", {str(vocab)!r},
                      "--output", {str(out_v)!r}])
        rc2 = m.main(["--model", {export_dir!r}, "--input", {files[0]!r}, "--names",
                      "lava, ice,grass", "--output", {str(out_n)!r}])
        print(json.dumps([rc1, rc2, [k for k in {FORBIDDEN!r} if k in sys.modules]]))
        """)
    assert proc.returncode == 0, proc.stderr
    rc1, rc2, imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc1 == 0 and rc2 == 0, proc.stderr
    assert imported == []
    model.test_bank = bank
    for i, image in enumerate(images):
        index = cv2.imread(str(out_v / f"scene{i}.png"), cv2.IMREAD_UNCHANGED)
        want = _torch_scores(model, image).argmax(0).numpy()
        assert index.dtype == np.uint8 and index.shape == (128, 128)
        assert float((index == want).mean()) >= 0.999
        overlay = cv2.imread(str(out_v / f"scene{i}_overlay.png"))
        assert overlay.shape == (128, 128, 3) and not np.array_equal(overlay, image[:, :, ::-1])
    big_index = cv2.imread(str(out_v / "big.png"), cv2.IMREAD_UNCHANGED)
    assert big_index.shape == (200, 240) and big_index.max() < 16
    names_index = cv2.imread(str(out_n / "scene0.png"), cv2.IMREAD_UNCHANGED)
    assert names_index.shape == (128, 128) and names_index.max() < 3


def test_runtime_resize_matches_detectron2():
    from detectron2.data.transforms import ResizeShortestEdge

    for h, w, short, max_size in [(480, 640, 512, 2048), (100, 3000, 128, 320), (77, 77, 128, 320),
                                  (333, 129, 512, 2048)]:  # fmt: skip
        want = ResizeShortestEdge.get_output_shape(h, w, short, max_size)
        assert rt.resize_shortest_edge_shape(h, w, short, max_size) == tuple(want)
    g = np.random.default_rng(0)
    image = g.integers(0, 256, (90, 140, 3), dtype=np.uint8)
    aug = ResizeShortestEdge([128, 128], 320)
    want = aug.get_transform(image).apply_image(image)
    got = rt.resize_image(image, *rt.resize_shortest_edge_shape(90, 140, 128, 320))
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------- refusals
def _export_refusal(capsys, *args):
    import export_model

    rc = export_model.main(list(args))
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("export_model.py: error: "), err
    return lines[0]


def test_export_refusals(weights_and_model, tmp_path, capsys):
    path, _ = weights_and_model
    out = str(tmp_path / "out")
    line = _export_refusal(capsys, "--config-file", CONFIG, "--output", out, *TINY)
    assert "MODEL.WEIGHTS is empty" in line
    missing = str(tmp_path / "nope.pth")
    line = _export_refusal(capsys, "--config-file", CONFIG, "--output", out, *TINY,
                           "MODEL.WEIGHTS", missing)  # fmt: skip
    assert "MODEL.WEIGHTS" in line and missing in line
    line = _export_refusal(capsys, "--config-file", CONFIG, "--output", out, *TINY,
                           "MODEL.WEIGHTS", path, "MODEL.C2S.INFERENCE_MODE", "two_stage")  # fmt: skip
    assert "MODEL.C2S.INFERENCE_MODE" in line and "two_stage" in line
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    line = _export_refusal(capsys, "--config-file", CONFIG, "--output", str(a_file), *TINY,
                           "MODEL.WEIGHTS", path)  # fmt: skip
    assert str(a_file) in line and "is a file" in line
    line = _export_refusal(capsys, "--config-file", str(tmp_path / "no.yaml"), "--output", out)
    assert "no.yaml" in line
    assert not os.path.exists(out)


def test_run_onnx_and_embed_names_refusals(export_dir, tmp_path, capsys):
    import embed_names
    import run_onnx

    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, names=np.array(["a", "b"]), embeddings=np.ones((2, 5), np.float32))
    cases = [
        (["--model", export_dir, "--input", str(image), "--vocab", str(wrong)], "size 5"),
        (["--model", str(tmp_path), "--input", str(image), "--names", "a"], "export.json"),
        (["--model", export_dir, "--input", str(tmp_path / "none.png"), "--names", "a"],
         "none.png"),
        (["--model", export_dir, "--input", str(image), "--names", "a,,b"], "empty class name"),
        (["--model", export_dir, "--input", str(image), "--names", "a,A"], "duplicate"),
        (["--model", export_dir, "--input", str(image), "--names", "a", "--output", str(image)],
         "is a file"),
    ]  # fmt: skip
    for args, needle in cases:
        if "--output" not in args:
            args = args + ["--output", str(tmp_path / "o")]
        assert run_onnx.main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("run_onnx.py: error: ") and needle in err[0], err
    rc = embed_names.main(["--config-file", CONFIG, "--names", "lava,Lava", "--output",
                           str(tmp_path / "v.npz"), *TINY])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "duplicate" in err[0], err


# ------------------------------------------------------------------------------- real size
@pytest.mark.slow
def test_real_size_r50_export_matches_pytorch(tmp_path):
    """COCO-Stuff C2S R-50 student (random weights) at 512 px: ONNX Runtime vs PyTorch."""
    from c2s_d2.export.exporter import export_all

    opts = ["MODEL.WEIGHTS", "", "MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEXT_TEMPLATES", "single"]
    info = export_all(
        os.path.join(ROOT, "configs/coco_stuff/c2s_R50.yaml"),
        str(tmp_path / "r50"),
        opts,
        formats=["onnx"],
        text_tower=False,
        allow_random_weights=True,
    )
    assert info["min_size_test"] == 512 and info["embed_dim"] == 512
    assert all(v <= 1e-3 for v in info["max_abs_diff_vs_pytorch"].values()), info
