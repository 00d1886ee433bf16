"""Tests of c2s_d2.modeling.clip.loader on the tiny C2S-Tiny architecture (random weights)."""

import json
import os

import open_clip
import open_clip.model
import pytest
import torch

from c2s_d2.modeling.clip import loader
from c2s_d2.modeling.clip.loader import (
    ClipTextTower,
    build_open_clip,
    get_tokenizer,
    is_checkpoint_path,
    register_model_configs,
    weights_identity,
)

TINY = "C2S-Tiny"
PROMPTS = ["a photo of a cat.", "a photo of a traffic light.", "sky"]


@pytest.fixture(scope="module")
def tokens():
    return get_tokenizer(TINY)(PROMPTS)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint file of a C2S-Tiny model with seed 3 (and the model that wrote it)."""
    model = build_open_clip(TINY, "", random_init_seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return str(path), model


def _no_vision_tower(*args, **kwargs):
    raise AssertionError("the image tower was constructed")


def test_register_model_configs_resolves_package_folder_and_bare_names():
    assert register_model_configs(["C2S-Tiny.json", "C2S-Tiny"]) == [TINY, TINY]
    assert TINY in open_clip.list_models()


def test_register_model_configs_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_arch.json"):
        register_model_configs(["no_such_arch.json"])


def test_register_model_configs_rejects_json_without_towers(tmp_path):
    bad = tmp_path / "Broken-Arch.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="Broken-Arch.json.*vision_cfg"):
        register_model_configs([str(bad)])


def test_register_model_configs_absolute_path_makes_model_buildable(tmp_path):
    cfg = json.loads((loader.MODEL_CONFIG_DIR / "C2S-Tiny.json").read_text())
    cfg["embed_dim"] = 32
    path = tmp_path / "C2S-Test-Embed32.json"
    path.write_text(json.dumps(cfg))
    assert register_model_configs([str(path)]) == ["C2S-Test-Embed32"]
    model = build_open_clip("C2S-Test-Embed32", "", text_only=True)
    assert model.encode_text(get_tokenizer("C2S-Test-Embed32")(["x"])).shape == (1, 32)


def test_unknown_model_name_error_names_it_and_says_how_to_register():
    with pytest.raises(ValueError, match="C2S-Nope.*register_model_configs"):
        build_open_clip("C2S-Nope", "")


def test_unknown_tag_error_names_it():
    with pytest.raises(ValueError, match="not_a_tag"):
        build_open_clip(TINY, "not_a_tag")


def test_missing_checkpoint_file_error_names_it(tmp_path):
    missing = str(tmp_path / "missing_weights.pt")
    with pytest.raises(FileNotFoundError, match="missing_weights.pt"):
        build_open_clip(TINY, missing)
    with pytest.raises(FileNotFoundError, match="missing_weights.pt"):
        build_open_clip(TINY, missing, text_only=True)


def test_random_build_is_frozen_eval_and_seeded(tokens):
    rng_before = torch.random.get_rng_state()
    a = build_open_clip(TINY, "", random_init_seed=0)
    b = build_open_clip(TINY, "", random_init_seed=0)
    c = build_open_clip(TINY, "", random_init_seed=1)
    # The caller's RNG stream is untouched by the seeded construction.
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert not a.training and all(not p.requires_grad for p in a.parameters())
    assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))
    assert not torch.allclose(a.encode_text(tokens), c.encode_text(tokens))
    image = torch.rand(1, 3, 64, 64)
    assert torch.equal(a.encode_image(image), b.encode_image(image))


def test_text_only_never_builds_the_image_tower(monkeypatch, tokens):
    monkeypatch.setattr(open_clip.model, "_build_vision_tower", _no_vision_tower)
    with pytest.raises(AssertionError, match="image tower"):
        build_open_clip(TINY, "")  # proves the patch reaches open_clip's construction
    tower = build_open_clip(TINY, "", text_only=True)
    assert isinstance(tower, ClipTextTower)
    assert not hasattr(tower, "visual") and not tower.training
    assert all(not p.requires_grad for p in tower.parameters())
    assert tower.encode_text(tokens).shape == (len(PROMPTS), 64)


def test_text_only_matches_full_model_for_the_same_seed(tokens):
    full = build_open_clip(TINY, "", random_init_seed=5)
    text = build_open_clip(TINY, "", random_init_seed=5, text_only=True)
    assert torch.equal(full.encode_text(tokens), text.encode_text(tokens))
    normed = text.encode_text(tokens, normalize=True)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(len(PROMPTS)))


def test_checkpoint_file_full_and_text_only_agree(tiny_checkpoint, tokens, monkeypatch):
    path, source = tiny_checkpoint
    full = build_open_clip(TINY, path, random_init_seed=0)
    image = torch.rand(2, 3, 64, 64)
    assert torch.equal(full.encode_image(image), source.encode_image(image))
    assert torch.equal(full.encode_text(tokens), source.encode_text(tokens))
    monkeypatch.setattr(open_clip.model, "_build_vision_tower", _no_vision_tower)
    text = build_open_clip(TINY, path, random_init_seed=0, text_only=True)
    assert torch.equal(text.encode_text(tokens), source.encode_text(tokens))


def test_checkpoint_without_text_keys_is_refused(tmp_path, tiny_checkpoint):
    _, source = tiny_checkpoint
    visual_only = {k: v for k, v in source.state_dict().items() if k.startswith("visual.")}
    path = tmp_path / "visual_only.pt"
    torch.save(visual_only, path)
    with pytest.raises(RuntimeError, match="visual_only.pt.*text-tower keys"):
        build_open_clip(TINY, str(path), text_only=True)


def test_hf_hub_text_only_uses_hub_config_and_weights(monkeypatch, tiny_checkpoint, tokens):
    path, source = tiny_checkpoint
    cfg = open_clip.get_model_config(TINY)
    seen = []

    def fake_hub(repo_id):
        seen.append(repo_id)
        return cfg, path

    monkeypatch.setattr(loader, "_resolve_hf_hub", fake_hub)
    text = build_open_clip("hf-hub:someone/tiny-clip", "openai", text_only=True)
    assert seen == ["someone/tiny-clip"]
    assert torch.equal(text.encode_text(tokens), source.encode_text(tokens))


def test_weights_identity(tmp_path):
    assert weights_identity("", 7) == "random:7"
    assert weights_identity("openai", 7) == "tag:openai"
    assert weights_identity("openai", 7, model_name="hf-hub:org/repo") == "hf-hub"
    path = tmp_path / "w.pt"
    path.write_bytes(b"1234")
    first = weights_identity(str(path))
    assert first.startswith("file:") and str(path) in first and ":4:" in first
    path.write_bytes(b"123456")
    os.utime(path, ns=(1, 10**18))
    assert weights_identity(str(path)) != first
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        weights_identity(str(tmp_path / "gone.pt"))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("openai", False),
        ("laion2b_s34b_b88k", False),
        ("weights.pt", True),
        ("model.safetensors", True),
        ("ckpts/clip", True),
    ],
)
def test_is_checkpoint_path(value, expected):
    assert is_checkpoint_path(value) is expected


def test_custom_text_layout_full_and_text_only_agree(tmp_path, tokens):
    """open_clip's CustomTextCLIP keeps the text tower under ``.text`` (checkpoint keys text.*)."""
    cfg = json.loads((loader.MODEL_CONFIG_DIR / "C2S-Tiny.json").read_text())
    cfg["custom_text"] = True
    path = tmp_path / "C2S-Test-CustomText.json"
    path.write_text(json.dumps(cfg))
    (name,) = register_model_configs([str(path)])
    full = build_open_clip(name, "", random_init_seed=9)
    assert type(full).__name__ == "CustomTextCLIP"
    text = build_open_clip(name, "", random_init_seed=9, text_only=True)
    assert torch.equal(full.encode_text(tokens), text.encode_text(tokens))
    ckpt = tmp_path / "custom_text.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in full.state_dict().items()}}, ckpt)
    from_file = build_open_clip(name, str(ckpt), random_init_seed=1, text_only=True)
    assert torch.equal(from_file.encode_text(tokens), full.encode_text(tokens))


def test_tag_download_failure_says_what_to_do(monkeypatch):
    import open_clip.pretrained

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match="'openai'.*no network.*MODEL.CLIP.PRETRAINED"):
        build_open_clip("ViT-B-16", "openai", text_only=True)
