"""Tests of c2s_d2.modeling.clip.loader on the tiny C2S-Tiny architecture (random weights)."""

import json
import os

import open_clip
import open_clip.model
import pytest
import torch
from torch import nn

from c2s_d2.modeling.clip import loader
from c2s_d2.utils.errors import is_user_error, one_line_error
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
    with pytest.raises(ValueError, match="visual_only.pt.*text-tower keys"):
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
    url = open_clip.get_pretrained_cfg("ViT-B-16", "openai")["url"]
    for text_only in (True, False):
        with pytest.raises(FileNotFoundError) as info:
            build_open_clip("ViT-B-16", "openai", text_only=text_only)
        message = one_line_error(info.value)
        assert "\n" not in message and is_user_error(info.value)
        assert message == (
            "FileNotFoundError: could not download the CLIP weights ViT-B-16 / tag 'openai' "
            f"(OSError: no network); download {url} and set MODEL.CLIP.PRETRAINED to the file's "
            "path"
        )


# ------------------------------------------------------------------ QuickGELU (OpenAI weights)
IMAGE = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _outputs(model, tokens):
    return model.encode_image(IMAGE), model.encode_text(tokens)


def _same(model, source, tokens):
    return all(torch.equal(a, b) for a, b in zip(_outputs(model, tokens), _outputs(source, tokens)))


@pytest.fixture(scope="module")
def quick_source():
    """A C2S-Tiny built with QuickGELU (seed 3): what OpenAI-trained weights are."""
    return build_open_clip(TINY, "", random_init_seed=3, quick_gelu="true")


def _trace(model, tokens, path):
    """Save ``model`` as a TorchScript archive, the format of OpenAI's original CLIP files."""
    traced = torch.jit.trace(model, (IMAGE, tokens), check_trace=False, strict=False)
    traced.save(str(path))
    return str(path)


def test_gelu_and_quick_gelu_give_different_features(quick_source, tokens):
    gelu = build_open_clip(TINY, "", random_init_seed=3, quick_gelu="false")
    assert open_clip.get_model_config(TINY).get("quick_gelu") is None  # C2S-Tiny is a GELU arch
    assert _same(build_open_clip(TINY, "", random_init_seed=3), gelu, tokens)  # auto = config
    image_q, text_q = _outputs(quick_source, tokens)
    image_g, text_g = _outputs(gelu, tokens)
    # same weights, other activation: the features differ (so the tests below can fail)
    assert (image_q - image_g).abs().max() > 1e-3 and (text_q - text_g).abs().max() > 1e-3
    assert torch.equal(quick_source.logit_scale, gelu.logit_scale)


def test_torchscript_file_of_a_quick_gelu_model_loads_as_quick_gelu(
    quick_source, tokens, tmp_path, monkeypatch
):
    path = _trace(quick_source, tokens, tmp_path / "ViT-tiny-openai.pt")
    assert loader.read_clip_checkpoint(path).quick_gelu is True
    assert loader.read_clip_checkpoint(path).form == "torchscript"
    assert _same(build_open_clip(TINY, path, random_init_seed=0), quick_source, tokens)
    # an explicit key wins over the file (and then gives other features)
    assert not _same(build_open_clip(TINY, path, quick_gelu="false"), quick_source, tokens)
    monkeypatch.setattr(open_clip.model, "_build_vision_tower", _no_vision_tower)
    text = build_open_clip(TINY, path, text_only=True)
    assert torch.equal(text.encode_text(tokens), quick_source.encode_text(tokens))


def test_torchscript_file_of_a_gelu_model_loads_as_gelu(tokens, tmp_path):
    source = build_open_clip(TINY, "", random_init_seed=4)
    path = _trace(source, tokens, tmp_path / "gelu_model.pt")
    assert loader.read_clip_checkpoint(path).quick_gelu is False
    assert _same(build_open_clip(TINY, path), source, tokens)


def test_openai_format_state_dict_loads_as_quick_gelu(quick_source, tokens, tmp_path):
    """A state dict taken from OpenAI's TorchScript model keeps its three non-weight entries."""
    sd = dict(quick_source.state_dict())
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))  # fmt: skip
    path = tmp_path / "openai_state_dict.pt"
    torch.save(sd, path)
    assert loader.read_clip_checkpoint(str(path)).form == "openai-state-dict"
    assert _same(build_open_clip(TINY, str(path)), quick_source, tokens)


@pytest.fixture
def tiny_with_tags(monkeypatch):
    """Pretend open_clip knows an OpenAI (QuickGELU) and a GELU tag for C2S-Tiny (as ViT-B-16)."""
    tags = {
        "openai": {"url": "https://example.invalid/C2S-Tiny-openai.pt", "quick_gelu": True},
        "laion_tiny": {"hf_hub": "someone/c2s-tiny-laion/"},
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, tags)
    return tags


def test_plain_state_dict_is_ambiguous_when_both_activations_exist(
    quick_source, tokens, tmp_path, tiny_with_tags
):
    path = str(tmp_path / "plain_state_dict.pt")
    torch.save(quick_source.state_dict(), path)
    for text_only in (False, True):
        with pytest.raises(ValueError) as info:
            build_open_clip(TINY, path, text_only=text_only)
        message = one_line_error(info.value)
        assert is_user_error(info.value) and "\n" not in message
        assert path in message and "MODEL.CLIP.QUICK_GELU true" in message
        assert "['openai']" in message and "['laion_tiny']" in message
    assert _same(build_open_clip(TINY, path, quick_gelu="true"), quick_source, tokens)
    gelu = build_open_clip(TINY, "", random_init_seed=3, quick_gelu="false")
    assert _same(build_open_clip(TINY, path, quick_gelu="false"), gelu, tokens)
    # a TorchScript archive says which activation it has: no question asked
    script = _trace(quick_source, tokens, tmp_path / "openai.pt")
    assert _same(build_open_clip(TINY, script), quick_source, tokens)


def test_vit_b_16_state_dict_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """The reported case: a ViT-B-16 state dict (OpenAI's or LAION's?) in auto mode."""
    path = str(tmp_path / "vit_b_16.bin")
    torch.save({"positional_embedding": torch.zeros(77, 8)}, path)
    monkeypatch.setattr(open_clip.model, "_build_vision_tower", _no_vision_tower)
    monkeypatch.setattr(loader, "_random_text_tower", _no_vision_tower)
    with pytest.raises(ValueError) as info:
        build_open_clip("ViT-B-16", path)
    assert one_line_error(info.value) == (
        f"ValueError: cannot tell whether CLIP checkpoint {path} (ViT-B-16) was trained with "
        "QuickGELU (like open_clip tags ['openai', 'dfn2b', 'metaclip_400m']) or GELU (like "
        "['laion400m_e31', 'laion400m_e32']): it is a state dict, which does not record the "
        "activation; set MODEL.CLIP.QUICK_GELU true (e.g. OpenAI's weights) or false"
    )


def test_openai_tag_builds_quick_gelu_like_its_local_file(
    quick_source, tokens, tmp_path, monkeypatch, tiny_with_tags
):
    script = _trace(quick_source, tokens, tmp_path / "C2S-Tiny-openai.pt")
    fetched = []

    def fake_download(cfg, *args, **kwargs):
        fetched.append(cfg["url"])
        return script

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", fake_download)
    from_tag = build_open_clip(TINY, "openai")
    assert fetched == [tiny_with_tags["openai"]["url"]]
    assert _same(from_tag, quick_source, tokens)
    assert _same(build_open_clip(TINY, script), from_tag, tokens)


def test_offline_hub_tag_without_url_names_the_repository_and_the_key(monkeypatch, tiny_with_tags):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(FileNotFoundError) as info:
        build_open_clip(TINY, "laion_tiny", text_only=True)
    assert "https://huggingface.co/someone/c2s-tiny-laion" in str(info.value)
    assert "QUICK_GELU" not in str(info.value)  # a GELU tag: nothing to set


def test_offline_hf_hub_model_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(loader, "_resolve_hf_hub", offline)
    with pytest.raises(FileNotFoundError) as info:
        build_open_clip("hf-hub:someone/tiny-clip", "", text_only=True)
    message = one_line_error(info.value)
    assert "hf-hub:someone/tiny-clip" in message and "MODEL.CLIP.PRETRAINED" in message
    assert "no network" in message and "\n" not in message


@pytest.mark.parametrize("value", ["maybe", "1", "yes"])
def test_bad_quick_gelu_value_names_the_key(value):
    with pytest.raises(ValueError, match=f"MODEL.CLIP.QUICK_GELU '{value}'.*'auto', 'true'"):
        build_open_clip(TINY, "", quick_gelu=value)


def test_quick_gelu_key_in_config_and_cache_identity(tmp_path):
    from detectron2.config import get_cfg

    from c2s_d2 import add_c2s_config

    cfg = get_cfg()
    add_c2s_config(cfg)
    assert cfg.MODEL.CLIP.QUICK_GELU == "auto"
    assert loader.parse_quick_gelu("auto") is None
    assert loader.parse_quick_gelu(" TRUE ") is True and loader.parse_quick_gelu("false") is False
    assert weights_identity("openai", quick_gelu="auto") == "tag:openai"
    assert weights_identity("openai", quick_gelu="false") == "tag:openai:quick_gelu=false"
    assert weights_identity("", 2, quick_gelu="true") == "random:2:quick_gelu=true"
    path = tmp_path / "w.pt"
    path.write_bytes(b"1234")
    auto, true = weights_identity(str(path)), weights_identity(str(path), quick_gelu="true")
    assert auto.endswith(":act=auto") and true.endswith(":act=true")


# ------------------------------------------------------------------ files that are not CLIP
@pytest.mark.parametrize(
    "content, looks_like",
    [
        (b"", "an empty file"),
        (b"MODEL:\n  WEIGHTS: x\n", "a text file (it starts with 'MODEL:')"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "a PNG image"),
        (bytes(range(7, 250)), "unrecognised binary data"),
    ],
)
def test_random_file_is_refused_saying_what_it_looks_like(tmp_path, content, looks_like):
    path = str(tmp_path / "clip_weights.pt")
    with open(path, "wb") as f:
        f.write(content)
    for text_only in (True, False):
        with pytest.raises(ValueError) as info:
            build_open_clip(TINY, path, text_only=text_only)
        message = one_line_error(info.value)
        assert is_user_error(info.value) and "\n" not in message
        assert f"MODEL.CLIP.PRETRAINED {path} is not a PyTorch checkpoint" in message
        assert f"it looks like {looks_like}" in message


def _student_like():
    """A small module named like a detectron2 segmentor (backbone + head)."""
    return nn.ModuleDict({"backbone": nn.Conv2d(3, 4, 3), "sem_seg_head": nn.Linear(4, 2)})


@pytest.mark.parametrize("with_numpy_state", [False, True])
def test_detectron2_checkpoint_is_refused(tmp_path, with_numpy_state):
    """What detectron2's Checkpointer writes (a c2s-d2 student's model_final.pth)."""
    import numpy as np
    from detectron2.checkpoint import Checkpointer

    extra = {"iteration": 3}
    if with_numpy_state:  # c2s-d2 checkpoints also hold RNG states: weights_only refuses them
        extra["rng"] = np.random.get_state()
    Checkpointer(_student_like(), save_dir=str(tmp_path)).save("model_final", **extra)
    path = str(tmp_path / "model_final.pth")
    with pytest.raises(ValueError) as info:
        build_open_clip(TINY, path, text_only=True)
    message = one_line_error(info.value)
    assert is_user_error(info.value) and "\n" not in message
    assert f"MODEL.CLIP.PRETRAINED {path} looks like a detectron2 checkpoint" in message
    assert "'iteration'" in message and "'model'" in message and "MODEL.WEIGHTS" in message


def test_non_clip_state_dicts_are_refused(tmp_path):
    student = str(tmp_path / "student_state_dict.pth")
    torch.save(_student_like().state_dict(), student)
    with pytest.raises(ValueError, match="student_state_dict.pth looks like the weights of a "
                                         "detectron2 model"):  # fmt: skip
        build_open_clip(TINY, student)
    other = str(tmp_path / "resnet.pth")
    torch.save(nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(ValueError, match=r"resnet.pth holds 2 entries but no CLIP weights"):
        build_open_clip(TINY, other, text_only=True)
    whole = str(tmp_path / "whole_module.pt")
    torch.save(nn.Linear(2, 2), whole)
    with pytest.raises(ValueError, match=r"whole_module.pt holds Python objects .*torch.nn"):
        build_open_clip(TINY, whole)


def test_checkpoint_of_another_architecture_is_one_line(tiny_checkpoint, tmp_path):
    cfg = json.loads((loader.MODEL_CONFIG_DIR / "C2S-Tiny.json").read_text())
    cfg["text_cfg"]["width"] = 48
    arch = tmp_path / "C2S-Test-Width48.json"
    arch.write_text(json.dumps(cfg))
    (name,) = register_model_configs([str(arch)])
    path, _ = tiny_checkpoint
    for text_only in (True, False):
        with pytest.raises(ValueError, match="tiny_clip.pt does not fit the architecture"):
            build_open_clip(name, path, text_only=text_only)


def test_teacher_from_cfg_uses_the_quick_gelu_key():
    from detectron2.config import get_cfg

    from c2s_d2 import add_c2s_config
    from c2s_d2.modeling.clip.teacher import build_teacher_from_cfg

    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", TINY, "MODEL.CLIP.PRETRAINED", ""])
    activations = {}
    for value in ("auto", "true"):
        cfg.MODEL.CLIP.QUICK_GELU = value
        teacher = build_teacher_from_cfg(cfg)
        activations[value] = {type(m).__name__ for m in teacher.visual.modules()} & {
            "GELU",
            "QuickGELU",
        }
    assert activations == {"auto": {"GELU"}, "true": {"QuickGELU"}}
