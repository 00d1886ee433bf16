"""tools/convert_torchvision_to_d2.py: torchvision ResNet weights -> detectron2 backbone.

The proof that the conversion is right: a torchvision ResNet-50 with random weights *and random
BatchNorm statistics* (default BN is the identity, which would hide swapped norms), converted and
loaded into detectron2's ResNet-50 with our Base-C2S settings, gives the same features stage by
stage as torchvision itself.
"""

import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone

from c2s_d2 import add_c2s_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "convert_torchvision_to_d2.py")
_spec = importlib.util.spec_from_file_location("convert_torchvision_to_d2", SCRIPT)
conv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm distinct affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def d2_resnet_cfg(depth: int):
    """Base-C2S backbone settings: RGB input, stride in the 3x3 conv, FrozenBN."""
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-C2S.yaml"))
    cfg.MODEL.RESNETS.DEPTH = depth
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN"
    return cfg


def d2_backbone(depth: int) -> torch.nn.Module:
    cfg = d2_resnet_cfg(depth)
    if depth < 50:  # BasicBlock ResNets: detectron2 needs the narrower first stage spelled out
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory):
    """(torchvision model, its .pth, the .pkl written by the script run as a command)."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    randomize_batchnorm(tv)
    tv.eval()
    folder = tmp_path_factory.mktemp("convert")
    pth, pkl = str(folder / "resnet50.pth"), str(folder / "weights" / "R-50.pkl")
    torch.save(tv.state_dict(), pth)
    proc = subprocess.run(
        [sys.executable, SCRIPT, pth, pkl], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 53 convolutions (stem, 16 blocks x 3, 4 shortcuts) + 53 norms x 4 buffers; fc dropped
    assert "265 tensors" in proc.stdout, proc.stdout
    return tv, pth, pkl


def test_names_follow_detectron2_layout():
    name = conv.torchvision_to_d2_name
    assert name("conv1.weight") == "stem.conv1.weight"
    assert name("bn1.running_var") == "stem.conv1.norm.running_var"
    assert name("layer1.0.conv2.weight") == "res2.0.conv2.weight"
    assert name("layer1.0.bn2.weight") == "res2.0.conv2.norm.weight"
    assert name("layer3.5.bn3.running_mean") == "res4.5.conv3.norm.running_mean"
    assert name("layer4.0.downsample.0.weight") == "res5.0.shortcut.weight"
    assert name("layer4.0.downsample.1.bias") == "res5.0.shortcut.norm.bias"
    assert name("layer2.10.conv1.weight") == "res3.10.conv1.weight"  # two-digit block index
    assert name("fc.weight") is None and name("fc.bias") is None
    assert name("layer1.0.bn1.num_batches_tracked") is None
    with pytest.raises(conv.ConversionError, match="layer5.0.conv1.weight"):
        name("layer5.0.conv1.weight")
    with pytest.raises(conv.ConversionError, match="layer1.0.attn.weight"):
        name("layer1.0.attn.weight")


def test_pickle_layout_and_keys_equal_the_backbone(resnet50_files):
    tv, _, pkl = resnet50_files
    with open(pkl, "rb") as f:
        payload = pickle.load(f)
    assert payload["__author__"] == "torchvision" and payload["matching_heuristics"] is True
    weights = payload["model"]
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    assert set(weights) == set(d2_backbone(50).state_dict())
    # every kept tensor is torchvision's, unchanged
    np.testing.assert_array_equal(
        weights["res3.2.conv2.norm.running_var"], tv.layer2[2].bn2.running_var.numpy()
    )
    np.testing.assert_array_equal(
        weights["res5.0.shortcut.weight"], tv.layer4[0].downsample[0].weight.detach().numpy()
    )


def test_converted_resnet50_gives_torchvision_features(resnet50_files):
    tv, _, pkl = resnet50_files
    backbone = d2_backbone(50)
    checkpointer = DetectionCheckpointer(backbone)
    checkpointer._parsed_url_during_load = None  # _load_file only needs it for non-.pkl files
    incompatible = checkpointer._load_model(checkpointer._load_file(pkl))
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []

    x = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = backbone(x)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for d2_name, layer in zip(
            ("res2", "res3", "res4", "res5"), (tv.layer1, tv.layer2, tv.layer3, tv.layer4)
        ):
            h = layer(h)
            assert ours[d2_name].shape == h.shape, d2_name
            torch.testing.assert_close(
                ours[d2_name], h, rtol=1e-4, atol=1e-4 * float(h.abs().max())
            )
    assert float(h.std()) > 0  # a non-degenerate comparison


def test_converted_weights_load_into_the_student_by_name(resnet50_files):
    """MODEL.WEIGHTS of a full C2S model: only the backbone is filled, every backbone key is."""
    _, _, pkl = resnet50_files
    cfg = d2_resnet_cfg(50)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "voc", "zs_baseline_R50.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", pkl, "MODEL.C2S.DEC_LAYERS", "1",
        "MODEL.CLIP.MODEL_NAME", "C2S-Tiny", "MODEL.CLIP.PRETRAINED", "",
        "MODEL.CLIP.MODEL_CONFIG_FILES", '["C2S-Tiny.json"]', "MODEL.CLIP.TEXT_TEMPLATES", "single",
    ])  # fmt: skip
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    with open(pkl, "rb") as f:
        weights = pickle.load(f)["model"]
    state = model.state_dict()
    for name, value in weights.items():
        np.testing.assert_array_equal(state["backbone." + name].numpy(), value, err_msg=name)


@pytest.mark.parametrize("dataset", ["coco_stuff", "voc", "pcontext"])
def test_r101_configs_read_the_converted_file(dataset):
    cfg = d2_resnet_cfg(50)
    cfg.merge_from_file(os.path.join(ROOT, "configs", dataset, "zs_baseline_R101.yaml"))
    assert cfg.MODEL.WEIGHTS == "R-101.pkl" and cfg.MODEL.RESNETS.DEPTH == 101
    assert not cfg.MODEL.RESNETS.STRIDE_IN_1X1 and cfg.INPUT.FORMAT == "RGB"


def test_resnet101_keys_equal_the_backbone():
    converted, dropped = conv.convert_torchvision_resnet(
        torchvision.models.resnet101().state_dict()
    )
    assert set(converted) == set(d2_backbone(101).state_dict())
    assert "fc.weight" in dropped and "layer3.22.bn3.num_batches_tracked" in dropped
    assert converted["res4.22.conv3.weight"].shape == (1024, 256, 1, 1)


def test_resnet18_module_prefix_and_wrapped_state_dict(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    path = str(tmp_path / "wrapped.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    converted, _ = conv.convert_torchvision_resnet(conv.load_torchvision_state_dict(path))
    assert set(converted) == set(d2_backbone(18).state_dict())  # BasicBlock: no conv3 / bn3
    np.testing.assert_array_equal(
        converted["res2.1.conv2.weight"], state["layer1.1.conv2.weight"].numpy()
    )


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        conv.main(argv)
    assert exit_info.value.code != 0
    message = (
        exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    )
    assert "\n" not in message.strip()
    return message


def test_bad_input_one_line_errors(tmp_path, capsys):
    missing = str(tmp_path / "resnet101-63fe2227.pth")
    msg = _error_line(capsys, [missing, str(tmp_path / "R-101.pkl")])
    assert msg.startswith("convert_torchvision_to_d2.py: error:") and missing in msg
    assert not os.path.exists(tmp_path / "R-101.pkl")

    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("not a checkpoint")
    msg = _error_line(capsys, [str(not_torch), str(tmp_path / "out.pkl")])
    assert str(not_torch) in msg and "torch checkpoint" in msg

    not_resnet = tmp_path / "vit.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, not_resnet)
    msg = _error_line(capsys, [str(not_resnet), str(tmp_path / "out.pkl")])
    assert str(not_resnet) in msg and "encoder.weight" in msg

    msg = _error_line(capsys, [str(not_resnet), str(tmp_path / "R-101.pth")])
    assert "R-101.pth" in msg and ".pkl" in msg
