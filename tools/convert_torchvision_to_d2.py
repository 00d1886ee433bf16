#!/usr/bin/env python
"""Convert a torchvision ResNet checkpoint into detectron2's ResNet weight format.

detectron2 publishes torchvision's ImageNet ResNet-50 already converted
(``detectron2://ImageNetPretrained/torchvision/R-50.pkl``); for ResNet-101 (or any other
torchvision ResNet / ResNeXt state dict) run::

    wget https://download.pytorch.org/models/resnet101-63fe2227.pth
    python tools/convert_torchvision_to_d2.py resnet101-63fe2227.pth R-101.pkl

and set ``MODEL.WEIGHTS`` to the ``.pkl``. The weights expect the settings of
``configs/Base-C2S.yaml``: ``INPUT.FORMAT "RGB"``, ImageNet mean/std in 0..255 units and
``MODEL.RESNETS.STRIDE_IN_1X1 False`` (torchvision puts the stride in the 3x3 convolution).

Names are mapped to detectron2's ``ResNet`` modules (``build_resnet_backbone``)::

    conv1, bn1                     -> stem.conv1, stem.conv1.norm
    layer{1..4}.<b>                -> res{2..5}.<b>
    conv{1,2,3}, bn{1,2,3}         -> conv{1,2,3}, conv{1,2,3}.norm
    downsample.0, downsample.1     -> shortcut, shortcut.norm

The ImageNet classifier (``fc``) and BatchNorm's ``num_batches_tracked`` counters are dropped:
the backbone has no classifier and FrozenBN keeps no counter. The output is a pickle of
``{"model": {name: numpy array}, "__author__": "torchvision", "matching_heuristics": True}``,
which ``DetectionCheckpointer`` loads into the ``backbone.`` submodule by name matching.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

PROG = "convert_torchvision_to_d2.py"
# torchvision's top-level modules that are not part of the detectron2 backbone
_DROPPED_MODULES = ("fc.",)
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_STEM_KEY = re.compile(r"^(conv1|bn1)\.(.+)$")
# inside a block: torchvision module name -> detectron2 module name
_BLOCK_MODULES = {
    "conv1": "conv1",
    "conv2": "conv2",
    "conv3": "conv3",
    "bn1": "conv1.norm",
    "bn2": "conv2.norm",
    "bn3": "conv3.norm",
    "downsample.0": "shortcut",
    "downsample.1": "shortcut.norm",
}


class ConversionError(ValueError):
    """The input is not a torchvision ResNet state dict."""


def torchvision_to_d2_name(name: str) -> Optional[str]:
    """detectron2 name of a torchvision ResNet key, or None for a key the backbone does not use.

    Examples: ``"layer1.0.bn2.weight"`` -> ``"res2.0.conv2.norm.weight"``,
    ``"layer3.0.downsample.0.weight"`` -> ``"res4.0.shortcut.weight"``, ``"fc.bias"`` -> None.
    Raises ``ConversionError`` naming a key that belongs to no ResNet module.
    """
    if name.startswith(_DROPPED_MODULES) or name.endswith(".num_batches_tracked"):
        return None
    stem = _STEM_KEY.match(name)
    if stem is not None:
        module = "stem.conv1" if stem.group(1) == "conv1" else "stem.conv1.norm"
        return f"{module}.{stem.group(2)}"
    block = _BLOCK_KEY.match(name)
    if block is not None:
        stage, index, rest = block.groups()
        module, _, param = rest.rpartition(".")
        if module in _BLOCK_MODULES:
            return f"res{int(stage) + 1}.{index}.{_BLOCK_MODULES[module]}.{param}"
    raise ConversionError(f"key {name!r} is not a torchvision ResNet parameter")


def convert_torchvision_resnet(
    state_dict: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Rename a torchvision ResNet state dict to detectron2's backbone names.

    Args:
        state_dict: torchvision names -> tensors (e.g. ``resnet101().state_dict()``); a
            ``"module."`` prefix (DataParallel) is removed first.

    Returns:
        (converted, dropped): detectron2 names -> float/int numpy arrays of the same shapes,
        and the torchvision keys that were left out (``fc.*``, ``*.num_batches_tracked``).
    """
    converted: Dict[str, np.ndarray] = {}
    dropped: List[str] = []
    for key, value in state_dict.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        new_name = torchvision_to_d2_name(name)
        if new_name is None:
            dropped.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"key {key!r} holds a {type(value).__name__}, not a tensor")
        converted[new_name] = value.detach().cpu().numpy()
    if not any(k.startswith("res2.") for k in converted) or "stem.conv1.weight" not in converted:
        raise ConversionError("no ResNet stem and first stage ('conv1.weight', 'layer1.*') found")
    return converted, dropped


def load_torchvision_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict (plain, or wrapped in ``"state_dict"`` / ``"model"``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or non-torch file
        # torch's own message spans many lines: keep its first one
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ConversionError(
            f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {first_line})"
        ) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, got a {type(obj).__name__}")
    return obj


def write_d2_weights(converted: Mapping[str, np.ndarray], path: str) -> None:
    """Pickle the converted weights in detectron2's model-zoo layout (atomically)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {"model": dict(converted), "__author__": "torchvision", "matching_heuristics": True}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(payload, f)
    os.replace(tmp, path)  # never leave a truncated .pkl under the final name


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Convert a torchvision ResNet .pth into detectron2's .pkl format."
    )
    parser.add_argument("input", help="torchvision state dict, e.g. resnet101-63fe2227.pth")
    parser.add_argument("output", help="detectron2 weights to write, e.g. R-101.pkl")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # detectron2 picks its reader by extension: anything but .pkl would be read as a torch file
    if not args.output.endswith(".pkl"):
        sys.exit(f"{PROG}: error: output must end with .pkl: {args.output}")
    try:
        state_dict = load_torchvision_state_dict(args.input)
        converted, dropped = convert_torchvision_resnet(state_dict)
    except (FileNotFoundError, ConversionError) as e:
        where = "" if args.input in str(e) else f"{args.input}: "
        sys.exit(f"{PROG}: error: {where}{e}")
    write_d2_weights(converted, args.output)
    stages = sorted({k.split(".")[0] for k in converted})
    print(f"{args.input} -> {args.output}: {len(converted)} tensors ({', '.join(stages)})")
    if dropped:
        print(f"not converted (unused by the backbone): {len(dropped)} keys, e.g. {dropped[:3]}")


if __name__ == "__main__":
    main()
