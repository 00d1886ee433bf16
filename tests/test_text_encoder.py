"""Tests of prompt templates and class text embeddings (tiny CLIP, random weights)."""

import logging
import math
import multiprocessing as mp
import os
import time

import pytest
import torch
import torch.distributed as dist
from detectron2.config import get_cfg

from c2s_d2.config import add_c2s_config
from c2s_d2.modeling.clip import loader, text_encoder
from c2s_d2.modeling.clip.templates import TEMPLATES, get_templates
from c2s_d2.modeling.clip.text_encoder import (
    build_prompts,
    check_batch_size,
    check_cache_content,
    check_class_text_names,
    default_cache_dir,
    encode_prompts,
    ensemble_prompt_embeddings,
    resolve_device,
    tensor_sha256,
    text_embedding_cache_path,
    text_embeddings,
    text_embeddings_from_cfg,
)

TINY = "C2S-Tiny"
TWO_TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _embed(names, cache_dir, **kwargs):
    args = dict(model_name=TINY, pretrained="", templates=TWO_TEMPLATES, cache_dir=str(cache_dir))
    args.update(kwargs)
    return text_embeddings(names, **args)


def _pt_files(folder):
    """The cache files of a folder (lock files are hidden ``.lock`` files beside them)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".pt") and not f.startswith("."))


def _forbid_clip(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a CLIP model or tokenizer was built on a cache hit")

    monkeypatch.setattr(text_encoder, "build_open_clip", fail)
    monkeypatch.setattr(text_encoder, "get_tokenizer", fail)
    monkeypatch.setattr(loader, "build_open_clip", fail)


# ------------------------------------------------------------------------------ templates
def test_template_sets():
    assert len(TEMPLATES["imagenet80"]) == 80
    assert len(TEMPLATES["short"]) == 7
    assert TEMPLATES["single"] == ["a photo of a {}."]
    assert all(t.count("{}") == 1 for name in TEMPLATES for t in TEMPLATES[name])
    assert len(set(TEMPLATES["imagenet80"])) == 80


def test_get_templates_from_file_and_errors(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\nan image of {}\n  a {} in the wild  \n")
    assert get_templates(str(path)) == ["an image of {}", "a {} in the wild"]
    with pytest.raises(ValueError, match="no_such_templates.txt"):
        get_templates(str(tmp_path / "no_such_templates.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder here\n")
    with pytest.raises(ValueError, match="bad.txt.*no placeholder here"):
        get_templates(str(bad))
    with pytest.raises(ValueError, match="no prompt templates"):
        get_templates([])


# ------------------------------------------------------------------------------ prompt math
def test_build_prompts_order_and_braces():
    prompts, class_index = build_prompts([["cat", "kitty"], ["{odd}"]], ["a {}.", "the {}!"])
    assert prompts == ["a cat.", "the cat!", "a kitty.", "the kitty!", "a {odd}.", "the {odd}!"]
    assert class_index.tolist() == [0, 0, 0, 0, 1, 1]


def test_ensemble_prompt_embeddings_hand_checked():
    # class 0: [3, 0] and [0, 4] normalise to e1, e2 -> mean (0.5, 0.5) -> (1/sqrt2, 1/sqrt2)
    # class 1: [0, -2] -> (0, -1)
    emb = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, -2.0]])
    out = ensemble_prompt_embeddings(emb, torch.tensor([0, 0, 1]), 2)
    r = 1 / math.sqrt(2)
    assert torch.allclose(out, torch.tensor([[r, r], [0.0, -1.0]]))
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        ensemble_prompt_embeddings(emb, torch.tensor([0, 0, 1]), 3)


@pytest.mark.parametrize(
    "names, match",
    [([], "empty"), ([["cat"], []], "class 1 has no text names"), ([["cat", "  "]], "class 0")],
)
def test_bad_class_text_names(names, match):
    with pytest.raises(ValueError, match=match):
        check_class_text_names(names)


def test_bare_strings_are_one_name_lists():
    assert check_class_text_names(["cat", [" dog ", "puppy"]]) == [["cat"], ["dog", "puppy"]]


# ------------------------------------------------------------------------------ embeddings + cache
def test_text_embeddings_shape_norm_and_distinct(tmp_path):
    emb = _embed([["cat", "kitty"], ["dog"], ["traffic light"]], tmp_path)
    assert emb.shape == (3, 64) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(emb[1], emb[2], atol=1e-3)


def test_text_embeddings_equal_manual_ensemble(tmp_path):
    tower = loader.build_open_clip(TINY, "", text_only=True)
    tokens = loader.get_tokenizer(TINY)(["a photo of a cat.", "a drawing of a cat."])
    manual = torch.nn.functional.normalize(tower.encode_text(tokens, normalize=True).mean(0), dim=0)
    assert torch.allclose(_embed([["cat"]], tmp_path)[0], manual, atol=1e-6)


def test_cache_hit_builds_no_clip_model(tmp_path, monkeypatch):
    names = [["cat"], ["dog"]]
    first = _embed(names, tmp_path)
    files = _pt_files(tmp_path)
    assert len(files) == 1 and files[0].startswith(TINY)
    _forbid_clip(monkeypatch)
    assert torch.equal(_embed(names, tmp_path), first)
    with pytest.raises(AssertionError, match="cache hit"):
        _embed([["cat"], ["bird"]], tmp_path)  # a new key must compute


def test_cache_key_changes_with_templates_names_seed_and_weights(tmp_path):
    base = dict(
        cache_dir=str(tmp_path),
        model_name=TINY,
        weights="random:0",
        templates=TWO_TEMPLATES,
        class_text_names=[["cat"], ["dog"]],
    )
    path = text_embedding_cache_path(**base)
    assert path == text_embedding_cache_path(**base)
    for key, value in [
        ("templates", TWO_TEMPLATES[:1]),
        ("class_text_names", [["cat"], ["puppy"]]),
        ("class_text_names", [["dog"], ["cat"]]),
        ("weights", "random:1"),
        ("model_name", "ViT-B-16"),
    ]:
        assert text_embedding_cache_path(**{**base, key: value}) != path, key
    # Different seeds give different embeddings, in different files.
    a = _embed([["cat"], ["dog"]], tmp_path, random_init_seed=0)
    b = _embed([["cat"], ["dog"]], tmp_path, random_init_seed=1)
    assert not torch.allclose(a, b) and len(_pt_files(tmp_path)) == 2


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def te_log():
    """The WARNING+ messages of the text encoder's logger (a handler of its own: detectron2's
    logger set-up may stop propagation to the root logger, where caplog listens)."""
    handler, log = _Records(), text_encoder.logger
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lambda: [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    log.removeHandler(handler)
    log.setLevel(old_level)


def _only_cache_file(folder):
    (name,) = _pt_files(folder)
    return os.path.join(str(folder), name)


def _zero_block(path, emb):
    # zero the bytes of class row 1 inside the file: torch.load still succeeds
    raw = bytearray(open(path, "rb").read())
    row = emb[1].numpy().tobytes()
    at = bytes(raw).find(row)
    assert at > 0
    raw[at : at + len(row)] = bytes(len(row))
    open(path, "wb").write(raw)
    assert torch.load(path, weights_only=True)["embeddings"][1].abs().sum() == 0


def _truncate(path, emb):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def _garbage(path, emb):
    open(path, "wb").write(b"not a torch file" * 64)


def _edit(change, rehash):
    def corrupt(path, emb):
        data = torch.load(path, weights_only=True)
        change(data)
        if rehash:  # a self-consistent file, so that the targeted check is the one that fails
            data["sha256"] = tensor_sha256(data["embeddings"])
        torch.save(data, path)

    return corrupt


def _swap_rows(d):
    d["embeddings"] = d["embeddings"][[1, 0, 2]].clone()


def _set_nan(d):
    d["embeddings"][0, 3] = float("nan")


def _drop_row(d):
    d["embeddings"] = d["embeddings"][:2].clone()


def _double(d):
    d["embeddings"] = d["embeddings"] * 2


def _other_key(d):
    d["key"] = d["key"].replace("dog", "wolf")


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_zero_block, "1 all-zero class rows"),
        (_truncate, "unreadable"),
        (_garbage, "unreadable"),
        (_edit(_swap_rows, rehash=False), "checksum mismatch"),
        (_edit(_set_nan, rehash=True), "1 NaN/inf values"),
        (_edit(_drop_row, rehash=True), "shape (2, 64), expected (3, 64)"),
        (_edit(_double, rehash=True), "not unit-norm"),
        (_edit(_other_key, rehash=True), "key"),
    ],
    ids=["zeroed_block", "truncated", "garbage", "checksum", "nan", "shape", "norm", "key"],
)
def test_corrupt_cache_is_reencoded_with_a_warning(tmp_path, te_log, corrupt, reason):
    names = [["cat"], ["dog"], ["bird"]]
    first = _embed(names, tmp_path)
    path = _only_cache_file(tmp_path)
    assert te_log() == []
    corrupt(path, first)
    again = _embed(names, tmp_path)
    assert torch.allclose(again, first, atol=1e-6)
    assert torch.all(again.norm(dim=-1) > 0.999)
    (warning,) = te_log()
    assert path in warning and reason in warning and "\n" not in warning
    # the file was rewritten whole (no temporary file left) and is valid again
    assert _pt_files(tmp_path) == [os.path.basename(path)]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    data = torch.load(path, weights_only=True)
    key = data["key"]
    emb, why = check_cache_content(data, key, 3, 64)
    assert why == "" and torch.equal(emb, first)
    _embed(names, tmp_path)  # a valid file: no new warning
    assert len(te_log()) == 1


def test_check_cache_content_accepts_only_a_complete_valid_entry():
    emb = torch.nn.functional.normalize(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), dim=-1)
    data = dict(embeddings=emb, sha256=tensor_sha256(emb), key="k", format_version=2)
    assert check_cache_content(data, "k", 2, 2)[1] == ""
    assert "key" in check_cache_content(data, "other", 2, 2)[1]
    assert "shape" in check_cache_content(data, "k", 2, 3)[1]
    assert "format version 1" in check_cache_content({**data, "format_version": 1}, "k", 2, 2)[1]
    half = emb.half()
    assert "dtype" in check_cache_content({**data, "embeddings": half}, "k", 2, 2)[1]
    assert "not a dict" in check_cache_content([emb], "k", 2, 2)[1]


def test_fresh_invalid_embeddings_are_refused(tmp_path, monkeypatch):
    def nan_prompts(encode_text, tokenizer, prompts, *args, **kwargs):
        return torch.full((len(prompts), 64), float("nan"))

    monkeypatch.setattr(text_encoder, "encode_prompts", nan_prompts)
    with pytest.raises(RuntimeError, match="gave invalid embeddings.*NaN"):
        _embed([["cat"]], tmp_path)
    assert _pt_files(tmp_path) == []


# ------------------------------------------------------------------------------ batching, device
def test_batched_equals_one_at_a_time_and_progress_bar(capsys):
    tower = loader.build_open_clip(TINY, "", text_only=True)
    tokenizer = loader.get_tokenizer(TINY)
    prompts, _ = build_prompts([["cat", "kitty"], ["traffic light"], ["sky"]], TWO_TEMPLATES * 2)
    assert len(prompts) == 16
    capsys.readouterr()
    batched = encode_prompts(tower.encode_text, tokenizer, prompts, batch_size=6)
    assert "CLIP text embeddings" in capsys.readouterr().err  # 3 batches: a bar
    single = torch.cat([tower.encode_text(tokenizer([p])) for p in prompts])
    assert batched.shape == (16, 64) and not batched.requires_grad
    assert torch.allclose(batched, single, atol=1e-5)
    one_batch = encode_prompts(tower.encode_text, tokenizer, prompts, batch_size=16)
    assert "CLIP text embeddings" not in capsys.readouterr().err  # one batch: no bar
    assert torch.allclose(one_batch, single, atol=1e-5)


def test_text_embeddings_do_not_depend_on_batch_size(tmp_path):
    names = [["cat", "kitty"], ["dog"], ["traffic light"]]
    a = _embed(names, tmp_path / "a", batch_size=1)
    b = _embed(names, tmp_path / "b", batch_size=5)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "256"])
def test_bad_batch_size(bad, tmp_path):
    with pytest.raises(ValueError, match="TEXT_BATCH_SIZE.*positive integer"):
        check_batch_size(bad)
    with pytest.raises(ValueError, match="positive integer"):
        _embed([["cat"]], tmp_path, batch_size=bad)


def test_unavailable_device_falls_back_to_cpu(tmp_path, te_log):
    text_encoder._devices_warned.discard("cuda:99")
    assert resolve_device("cuda:99") == torch.device("cpu")
    assert resolve_device("cuda:99") == torch.device("cpu")
    (warning,) = te_log()  # once per device
    assert "'cuda:99'" in warning and "CPU" in warning
    with pytest.raises(ValueError, match="'not-a-device' .*not a torch device"):
        resolve_device("not-a-device")
    emb = _embed([["cat"], ["dog"]], tmp_path / "a", encode_device="cuda:99")
    assert emb.device.type == "cpu"
    assert torch.allclose(emb, _embed([["cat"], ["dog"]], tmp_path / "b"), atol=1e-6)


# ------------------------------------------------------------------------------ one encoder
NAMES = [["cat", "kitty"], ["dog"], ["bird"]]


def _count_encodes(marker, tag, delay):
    """Make encode_prompts append ``tag`` to ``marker`` and hold for ``delay`` s (in a child)."""
    original = text_encoder.encode_prompts

    def counting(*args, **kwargs):
        with open(marker, "a") as f:
            f.write(f"{tag}\n")
        time.sleep(delay)  # long enough for the other process to arrive while this one encodes
        return original(*args, **kwargs)

    text_encoder.encode_prompts = counting


def _lock_worker(cache_dir, marker, out, barrier):
    torch.set_num_threads(1)
    _count_encodes(marker, os.getpid(), delay=1.0)
    barrier.wait(timeout=60)
    torch.save(_embed(NAMES, cache_dir), out)


# Heavy imports the forkserver makes once (Python 3.10 preloads before it applies the parent's
# sys.path, so this test module itself cannot be preloaded; a name that fails is skipped).
_PRELOAD = ["torch", "open_clip", "detectron2.config", "c2s_d2.config", text_encoder.__name__]


def _context():
    """Fresh child processes, started fast: a forkserver (a clean process, not this pytest
    process, as with spawn) imports the heavy modules once; each child is forked from it."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _run_children(target, args_of, n=2, timeout=90):
    ctx = _context()
    procs = [ctx.Process(target=target, args=args_of(i, ctx)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * n


def test_two_processes_one_encodes_with_file_lock(tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "encodes.txt"
    barrier = _context().Barrier(2)
    outs = [tmp_path / f"out{i}.pt" for i in range(2)]
    _run_children(_lock_worker, lambda i, ctx: (str(cache), str(marker), str(outs[i]), barrier))
    assert len(marker.read_text().split()) == 1  # exactly one process encoded
    a, b = (torch.load(o, weights_only=True) for o in outs)
    assert torch.equal(a, b) and a.shape == (3, 64)
    assert torch.allclose(a, _embed(NAMES, tmp_path / "ref"), atol=1e-6)


def _ddp_worker(rank, cache_dir, marker, out, init_file):
    torch.set_num_threads(1)
    os.environ.pop("LOCAL_RANK", None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from detectron2.utils import comm

        comm.create_local_process_group(2)  # as detectron2's launch does
        _count_encodes(marker, rank, delay=0.5)
        if rank == 0:
            time.sleep(1.0)  # rank 1 arrives first: it must still wait for rank 0's file
        torch.save(_embed(NAMES, cache_dir), out)
    finally:
        dist.destroy_process_group()


def test_ddp_rank0_encodes_rank1_reads(tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "encodes.txt"
    outs = [tmp_path / f"out{i}.pt" for i in range(2)]
    init = tmp_path / "pg_init"
    _run_children(_ddp_worker, lambda i, ctx: (i, str(cache), str(marker), str(outs[i]), str(init)))
    assert marker.read_text().split() == ["0"]  # rank 0 encoded, rank 1 read its file
    a, b = (torch.load(o, weights_only=True) for o in outs)
    assert torch.equal(a, b)
    assert torch.allclose(a, _embed(NAMES, tmp_path / "ref"), atol=1e-6)


def test_default_cache_dir_follows_c2s_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("C2S_CACHE", str(tmp_path / "c2s"))
    assert default_cache_dir() == str(tmp_path / "c2s" / "text_embeddings")
    _embed([["cat"]], "")
    assert len(_pt_files(tmp_path / "c2s" / "text_embeddings")) == 1
    monkeypatch.delenv("C2S_CACHE")
    assert default_cache_dir() == os.path.expanduser("~/.cache/c2s_d2/text_embeddings")


def test_empty_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        _embed([], tmp_path)
    with pytest.raises(ValueError, match="class 1"):
        _embed([["cat"], [""]], tmp_path)


def test_text_embeddings_from_cfg(tmp_path, monkeypatch):
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.MODEL.CLIP.MODEL_NAME = TINY
    cfg.MODEL.CLIP.PRETRAINED = ""
    cfg.MODEL.CLIP.MODEL_CONFIG_FILES = ["C2S-Tiny.json"]
    cfg.MODEL.CLIP.TEXT_TEMPLATES = "single"
    cfg.MODEL.CLIP.RANDOM_INIT_SEED = 2
    cfg.MODEL.CLIP.TEXT_EMBED_CACHE_DIR = str(tmp_path)
    cfg.MODEL.CLIP.TEXT_BATCH_SIZE = 1
    cfg.MODEL.DEVICE = "cpu"
    calls = []
    original = text_encoder.encode_prompts

    def recording(encode_text, tokenizer, prompts, device, batch_size, *args, **kwargs):
        calls.append((torch.device(device), batch_size, len(prompts)))
        return original(encode_text, tokenizer, prompts, device, batch_size, *args, **kwargs)

    monkeypatch.setattr(text_encoder, "encode_prompts", recording)
    emb = text_embeddings_from_cfg(cfg, [["cat"], ["dog"]])
    assert calls == [(torch.device("cpu"), 1, 2)]
    expected = text_embeddings(
        [["cat"], ["dog"]], TINY, "", "single", random_init_seed=2, cache_dir=str(tmp_path / "b")
    )
    assert torch.allclose(emb, expected, atol=1e-6)  # batch size 1 vs 256: summation order
    _forbid_clip(monkeypatch)
    assert torch.equal(text_embeddings_from_cfg(cfg, [["cat"], ["dog"]]), emb)
