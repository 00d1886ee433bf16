"""Tests of the set criterion (classification + mask losses, deep supervision)."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from c2s_d2.config import add_c2s_config
from c2s_d2.modeling.criterion import SetCriterion, build_set_criterion, dice_loss, sigmoid_ce_loss
from c2s_d2.modeling.matcher import HungarianMatcher

LN3 = math.log(3.0)
WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def _criterion(num_points=0, **kwargs):
    matcher = HungarianMatcher(num_points=num_points)
    return SetCriterion(matcher, WEIGHTS, no_object_weight=0.1, num_points=num_points, **kwargs)


def _batch(num_queries=5, num_classes=3, size=32, seed=0):
    """Two images with disjoint rectangle masks; perfect predictions at queries 0..n-1."""
    gen = torch.Generator().manual_seed(seed)
    targets, logits, masks = [], [], []
    for n in (2, 1):
        tgt = torch.zeros(n, size, size, dtype=torch.bool)
        for j in range(n):
            tgt[j, :, j * size // 2 : (j + 1) * size // 2] = True
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        pred_logits = torch.full((num_queries, num_classes + 1), -4.0)
        pred_logits[:, -1] = 4.0
        pred_logits[torch.arange(n), -1] = -4.0
        pred_logits[torch.arange(n), labels] = 4.0
        pred_masks = torch.full((num_queries, size // 4, size // 4), -8.0)
        pred_masks[:n] = 16.0 * (tgt[:, ::4, ::4].float() - 0.5)
        targets.append({"labels": labels, "masks": tgt})
        logits.append(pred_logits)
        masks.append(pred_masks)
    return {"pred_logits": torch.stack(logits), "pred_masks": torch.stack(masks)}, targets


def test_pure_mask_losses_hand_checked():
    inputs = torch.tensor([[0.0, 0.0], [LN3, -LN3]])  # probabilities [.5, .5] and [.75, .25]
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # BCE: row 0 -> ln 2 = 0.693147; row 1 -> (-ln .75 - ln .25) / 2 = 0.836988; sum / 2 masks.
    assert sigmoid_ce_loss(inputs, targets, 2).item() == pytest.approx(0.765068, abs=1e-5)
    # Dice: row 0 -> 1 - 2/3 = 1/3; row 1 -> 1 - 3/4 = 1/4; (1/3 + 1/4) / 2 = 7/24.
    assert dice_loss(inputs, targets, 2).item() == pytest.approx(7 / 24, abs=1e-6)


def test_no_object_weighting_hand_checked():
    # K = 1: query 0 has softmax [.75, .25] and is matched to class 0 -> CE -ln .75 = 0.287682;
    # query 1 has softmax [.5, .5] and targets no-object (weight 0.1) -> 0.1 * ln 2 = 0.069315;
    # weighted mean = (0.287682 + 0.069315) / (1 + 0.1) = 0.324543.
    outputs = {"pred_logits": torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])}
    targets = [{"labels": torch.tensor([0])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    loss = _criterion().loss_labels(outputs, targets, indices)["loss_ce"]
    assert loss.item() == pytest.approx(0.324543, abs=1e-5)
    # Without down-weighting it is the plain mean (0.287682 + 0.693147) / 2 = 0.490415.
    plain = SetCriterion(HungarianMatcher(), WEIGHTS, no_object_weight=1.0)
    assert plain.loss_labels(outputs, targets, indices)["loss_ce"].item() == pytest.approx(
        0.490415, abs=1e-5
    )


@pytest.mark.parametrize("num_points", [0, 256])
def test_perfect_predictions_beat_wrong_ones(num_points):
    torch.manual_seed(0)
    outputs, targets = _batch()
    criterion = _criterion(num_points=num_points)
    good = criterion(outputs, targets)
    # Wrong classes everywhere and empty masks (inverting the masks would still match well).
    wrong = {
        "pred_logits": outputs["pred_logits"].flip(-1),
        "pred_masks": torch.full_like(outputs["pred_masks"], -8.0),
    }
    bad = criterion(wrong, targets)
    assert set(good) == {"loss_ce", "loss_mask", "loss_dice"}
    for key in good:
        assert good[key] < 0.2 * bad[key], key
    if num_points == 0:
        # Full resolution: only the bilinear blur of the 4x-downsampled masks costs anything.
        assert good["loss_ce"] < 0.01 and good["loss_mask"] < 0.02 and good["loss_dice"] < 0.02


def test_deep_supervision_keys_weights_and_indices():
    torch.manual_seed(0)
    outputs, targets = _batch()
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"] * s, "pred_masks": outputs["pred_masks"] * s}
        for s in (0.5, 0.25)
    ]
    criterion = _criterion(num_points=64)
    losses, indices = criterion(outputs, targets, return_indices=True)
    base = ["loss_ce", "loss_mask", "loss_dice"]
    assert set(losses) == set(base + [f"{k}_{i}" for k in base for i in (0, 1)])
    # Final layer's matching: queries 0..n-1 take targets 0..n-1.
    for (pred_idx, tgt_idx), target in zip(indices, targets):
        assert torch.equal(pred_idx[tgt_idx.argsort()], torch.arange(len(target["labels"])))
    weighted = criterion.weight_losses(losses)
    assert weighted["loss_dice_1"].item() == pytest.approx(5.0 * losses["loss_dice_1"].item())
    assert weighted["loss_ce_0"].item() == pytest.approx(2.0 * losses["loss_ce_0"].item())
    with pytest.raises(KeyError, match="loss_global"):
        criterion.weight_losses({"loss_global": torch.tensor(1.0)})


def test_point_sampled_and_full_resolution_losses_agree_on_smooth_masks():
    torch.manual_seed(0)
    size = 64
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    radius = (xs**2 + ys**2).sqrt()
    targets = [
        {"labels": torch.tensor([0, 1]), "masks": torch.stack([radius < 0.6, radius >= 0.6])}
    ]
    # Smooth low-resolution logits: a soft, slightly too large disc and its complement.
    small = F.interpolate((2.0 * (0.7 - radius))[None, None], size=(16, 16), mode="bilinear")[0]
    outputs = {
        "pred_logits": torch.zeros(1, 3, 3),
        "pred_masks": torch.cat([small, -small, small])[None],
    }
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    full = _criterion(num_points=0).loss_masks(outputs, targets, indices, num_masks=2)
    sampled = _criterion(
        num_points=8192, oversample_ratio=1.0, importance_sample_ratio=0.0
    ).loss_masks(outputs, targets, indices, num_masks=2)
    for key in ("loss_mask", "loss_dice"):
        assert sampled[key].item() == pytest.approx(full[key].item(), rel=0.05), key
    # The comparison is meaningful: these losses are far from zero.
    assert full["loss_mask"] > 0.2 and full["loss_dice"] > 0.05


def test_gradients_flow_and_empty_targets_are_safe():
    torch.manual_seed(0)
    outputs, targets = _batch()
    logits = outputs["pred_logits"].clone().requires_grad_(True)
    masks = outputs["pred_masks"].clone().mul(0.1).requires_grad_(True)
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32)}
    criterion = _criterion(num_points=128)
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, targets)
    sum(criterion.weight_losses(losses).values()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(masks.grad).all() and masks.grad[0, :2].abs().sum() > 0
    assert masks.grad[1].abs().sum() == 0  # image without targets: no mask loss

    no_targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}] * 2
    masks.grad = None
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, no_targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    sum(losses.values()).backward()
    assert masks.grad is not None and masks.grad.abs().sum() == 0


def test_latent_classes_change_k_between_calls():
    torch.manual_seed(0)
    outputs, targets = _batch(num_classes=3)
    criterion = _criterion(num_points=32)
    small = criterion(outputs, targets)["loss_ce"]
    wide = torch.cat([outputs["pred_logits"][..., :-1], torch.full((2, 5, 4), -4.0)], -1)
    wide = torch.cat([wide, outputs["pred_logits"][..., -1:]], -1)  # K = 3 seen + 4 latent
    targets[0]["labels"] = torch.tensor([5, targets[0]["labels"][1].item()])  # a latent class
    large = criterion({"pred_logits": wide, "pred_masks": outputs["pred_masks"]}, targets)
    assert torch.isfinite(large["loss_ce"]) and large["loss_ce"] > small


def test_bad_configuration_is_rejected_and_config_builds():
    with pytest.raises(KeyError, match="loss_dice"):
        SetCriterion(HungarianMatcher(), {"loss_ce": 1.0, "loss_mask": 1.0}, 0.1)
    with pytest.raises(ValueError, match="boxes"):
        SetCriterion(HungarianMatcher(), WEIGHTS, 0.1, losses=("labels", "boxes"))
    cfg = get_cfg()
    add_c2s_config(cfg)
    criterion = build_set_criterion(cfg)
    assert criterion.no_object_weight == pytest.approx(0.1)
    assert criterion.weight_dict == {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    assert criterion.matcher.num_points == criterion.num_points == 12544
