"""Parts that detectron2, fvcore, open_clip and torchvision ship, used instead of our own copies:
each gives exactly what the hand-written version gave."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.distributed as dist
from detectron2.layers import Conv2d, ShapeSpec
from fvcore.nn import weight_init
from torch import nn

from c2s_d2.modeling import pixel_decoder as pixel_decoder_module
from c2s_d2.modeling.clip.templates import TEMPLATES, get_templates
from c2s_d2.modeling.criterion import SetCriterion
from c2s_d2.modeling.distillation.latent_classes import is_distributed
from c2s_d2.modeling.distillation.latent_vocabulary import imagenet_category_names
from c2s_d2.modeling.pixel_decoder import C2SFPNPixelDecoder

SHAPES = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=24, stride=16),
    "res5": ShapeSpec(channels=32, stride=32),
}


def hand_written_c2_xavier_fill(m: nn.Module) -> None:
    """What pixel_decoder.py did before it called fvcore."""
    nn.init.kaiming_uniform_(m.weight, a=1)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_fvcore_c2_xavier_fill_equals_the_hand_written_init(bias):
    a, b = Conv2d(6, 4, 3, bias=bias), Conv2d(6, 4, 3, bias=bias)
    torch.manual_seed(3)
    weight_init.c2_xavier_fill(a)
    torch.manual_seed(3)
    hand_written_c2_xavier_fill(b)
    assert torch.equal(a.weight, b.weight)
    if bias:
        assert torch.equal(a.bias, torch.zeros(4)) and torch.equal(b.bias, torch.zeros(4))
    # kaiming_uniform_(a=1): U(-sqrt(3 / fan_in), +sqrt(3 / fan_in)), fan_in = 6 * 3 * 3
    bound = (3.0 / 54) ** 0.5
    assert a.weight.abs().max() <= bound and a.weight.abs().max() > 0.5 * bound


@pytest.mark.parametrize("norm", ["GN", ""])
def test_pixel_decoder_initialisation_unchanged(monkeypatch, norm):
    kwargs = dict(conv_dim=32, mask_dim=12, norm=norm)
    torch.manual_seed(0)
    new = C2SFPNPixelDecoder(SHAPES, **kwargs).state_dict()
    calls = []

    def counted(m):
        calls.append(m)
        hand_written_c2_xavier_fill(m)

    monkeypatch.setattr(pixel_decoder_module.weight_init, "c2_xavier_fill", counted)
    torch.manual_seed(0)
    old = C2SFPNPixelDecoder(SHAPES, **kwargs).state_dict()
    assert len(calls) == 9  # 4 lateral + 4 output convs + the mask-feature conv
    assert list(new) == list(old)
    for k in new:
        assert torch.equal(new[k], old[k]), k
    assert not torch.equal(
        new["lateral_convs.0.weight"], torch.zeros_like(new["lateral_convs.0.weight"])
    )


def test_templates_are_open_clips_and_equal_the_former_shipped_lists():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    t80 = TEMPLATES["imagenet80"]
    assert len(t80) == 80 == len(set(t80)) == len(OPENAI_IMAGENET_TEMPLATES)
    assert t80[0] == "a bad photo of a {}." and t80[-1] == "a tattoo of the {}."
    # sha256 of the 80 lines of the former c2s_d2/modeling/clip/templates_imagenet80.txt
    # (comments dropped, joined by "\n"): same strings, same order, so text-embedding cache
    # keys (which hold the template strings) are unchanged
    digest = hashlib.sha256("\n".join(t80).encode()).hexdigest()
    assert digest == "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af"
    assert TEMPLATES["short"] == [  # the former hand-written list
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ]
    assert get_templates("single") == ["a photo of a {}."]
    first = get_templates("imagenet80")
    first.append("changed {}")
    assert len(TEMPLATES["imagenet80"]) == 80  # callers get copies
    with pytest.raises(TypeError):
        TEMPLATES["mine"] = ["{}"]


def test_shipped_imagenet_names_equal_torchvisions_public_list():
    """Kept as a file (pinned vocabulary), checked against torchvision's public weights meta."""
    from torchvision.models import ResNet50_Weights

    names = imagenet_category_names()
    assert names == list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    assert names[0] == "tench" and names[999] == "toilet tissue"


def _targets(*counts):
    return [{"labels": torch.zeros(n, dtype=torch.long)} for n in counts]


def test_comm_world_size_without_and_with_a_one_process_group(tmp_path):
    assert not is_distributed()
    assert SetCriterion.num_target_masks(_targets(2, 3), torch.device("cpu")) == 5.0
    assert SetCriterion.num_target_masks(_targets(0), torch.device("cpu")) == 1.0  # clamped
    if dist.is_initialized():
        pytest.skip("a process group is already running")
    store = "file://" + os.path.join(str(tmp_path), "store")
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        assert not is_distributed()  # one process: nothing to gather
        assert SetCriterion.num_target_masks(_targets(2, 3), torch.device("cpu")) == 5.0
    finally:
        dist.destroy_process_group()
