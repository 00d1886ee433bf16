"""Tests of prompt templates and class text embeddings (tiny CLIP, random weights)."""

import math
import os

import pytest
import torch
from detectron2.config import get_cfg

from c2s_d2.config import add_c2s_config
from c2s_d2.modeling.clip import loader, text_encoder
from c2s_d2.modeling.clip.templates import TEMPLATES, get_templates
from c2s_d2.modeling.clip.text_encoder import (
    build_prompts,
    check_class_text_names,
    default_cache_dir,
    ensemble_prompt_embeddings,
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
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".pt") and files[0].startswith(TINY)
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
    assert not torch.allclose(a, b) and len(os.listdir(tmp_path)) == 2


def test_corrupt_cache_file_is_recomputed(tmp_path):
    first = _embed([["cat"]], tmp_path)
    (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
    path.write_bytes(b"not a torch file")
    assert torch.allclose(_embed([["cat"]], tmp_path), first)
    assert torch.load(path, weights_only=True)["class_text_names"] == [["cat"]]


def test_default_cache_dir_follows_c2s_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("C2S_CACHE", str(tmp_path / "c2s"))
    assert default_cache_dir() == str(tmp_path / "c2s" / "text_embeddings")
    _embed([["cat"]], "")
    assert len(os.listdir(tmp_path / "c2s" / "text_embeddings")) == 1
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
    emb = text_embeddings_from_cfg(cfg, [["cat"], ["dog"]])
    expected = text_embeddings(
        [["cat"], ["dog"]], TINY, "", "single", random_init_seed=2, cache_dir=str(tmp_path / "b")
    )
    assert torch.allclose(emb, expected)
    _forbid_clip(monkeypatch)
    assert torch.equal(text_embeddings_from_cfg(cfg, [["cat"], ["dog"]]), emb)
