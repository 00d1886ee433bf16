"""Student parts on tiny tensors: decoder shapes, CLS-query isolation, classifier, inference."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from c2s_d2 import add_c2s_config
from c2s_d2.modeling.meta_arch import semantic_inference
from c2s_d2.modeling.pixel_decoder import C2SFPNPixelDecoder
from c2s_d2.modeling.query_decoder import C2SQueryDecoder
from c2s_d2.modeling.text_classifier import TextEmbeddingClassifier
from c2s_d2.solver import build_c2s_lr_scheduler, optimizer_param_groups


def tiny_cfg():
    cfg = get_cfg()
    add_c2s_config(cfg)
    c = cfg.MODEL.C2S
    c.HIDDEN_DIM, c.NHEADS, c.DIM_FEEDFORWARD, c.DEC_LAYERS = 32, 4, 64, 3
    c.NUM_OBJECT_QUERIES, c.NUM_GLOBAL_QUERIES = 5, 2
    c.PIXEL_DECODER.CONV_DIM, c.PIXEL_DECODER.MASK_DIM = 32, 16
    return cfg


def features(b=2, size=64):
    torch.manual_seed(0)
    shapes = {
        "res2": ShapeSpec(channels=8, stride=4),
        "res3": ShapeSpec(channels=16, stride=8),
        "res4": ShapeSpec(channels=24, stride=16),
        "res5": ShapeSpec(channels=32, stride=32),
    }
    feats = {
        k: torch.randn(b, s.channels, size // s.stride, size // s.stride) for k, s in shapes.items()
    }
    return shapes, feats


def test_pixel_and_query_decoder_shapes():
    cfg = tiny_cfg()
    shapes, feats = features()
    pix = C2SFPNPixelDecoder(cfg, shapes)
    mask_features, ms = pix(feats)
    assert mask_features.shape == (2, 16, 16, 16)
    assert [m.shape[-1] for m in ms] == [2, 4, 8]  # coarse to fine
    dec = C2SQueryDecoder(cfg, 32, 16)
    out = dec(ms, mask_features, num_global=2)
    assert out["pred_masks"].shape == (2, 5, 16, 16)
    assert out["query_embeds"].shape == (2, 5, 32)
    assert out["global_embeds"].shape == (2, 2, 32)
    assert len(out["aux_outputs"]) == 3  # initial prediction + 2 intermediate layers


def test_cls_queries_never_change_object_outputs():
    cfg = tiny_cfg()
    shapes, feats = features()
    pix = C2SFPNPixelDecoder(cfg, shapes).eval()
    dec = C2SQueryDecoder(cfg, 32, 16).eval()
    mask_features, ms = pix(feats)
    with_cls = dec(ms, mask_features, num_global=2)
    without = dec(ms, mask_features, num_global=0)
    assert "global_embeds" not in without
    torch.testing.assert_close(with_cls["pred_masks"], without["pred_masks"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        with_cls["query_embeds"], without["query_embeds"], rtol=1e-5, atol=1e-5
    )
    # and the CLS outputs do depend on the image
    feats2 = {k: v.flip(-1) for k, v in feats.items()}
    mf2, ms2 = pix(feats2)
    assert not torch.allclose(dec(ms2, mf2, 2)["global_embeds"], with_cls["global_embeds"])


def test_classifier_cosine_times_scale():
    clf = TextEmbeddingClassifier(
        hidden_dim=4, embed_dim=2, logit_scale=10.0, learnable_scale=False
    )
    with torch.no_grad():
        clf.no_object_embedding.copy_(torch.tensor([0.0, -3.0]))  # normalised to (0, -1)
    e = torch.tensor([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = clf(e, bank)
    # row 0: cos with (1,0)=1, (0,1)=0, no-object (0,-1)=0 ; row 1: 0.7071, 0.7071, -0.7071
    expected = 10.0 * torch.tensor([[1.0, 0.0, 0.0], [0.70710678, 0.70710678, -0.70710678]])
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="text embeddings have size 3"):
        clf(e, torch.ones(2, 3))


def test_semantic_inference_hand_checked():
    # 2 queries, 2 classes (+ no object), 1x2 image
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    mask_logits = torch.tensor([[[0.0, 100.0]], [[100.0, -100.0]]])  # sigmoid: [.5, 1], [1, 0]
    out = semantic_inference(logits, mask_logits)
    # class 0: 0.5*[.5,1] + 0.1*[1,0] = [0.35, 0.5]; class 1: 0.25*[.5,1] + 0.8*[1,0] = [0.925, 0.25]
    torch.testing.assert_close(out, torch.tensor([[[0.35, 0.5]], [[0.925, 0.25]]]))


def test_param_groups_and_poly_schedule():
    cfg = tiny_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0, 0.5, 0.1
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER, cfg.SOLVER.LR_SCHEDULER_NAME = (
        0,
        10,
        "WarmupPolyLR",
    )
    cfg.SOLVER.POLY_LR_POWER = 1.0

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1))
            self.queries = torch.nn.Embedding(2, 2)
            self.head = torch.nn.Linear(2, 2)

    groups = optimizer_param_groups(cfg, Toy())
    got = sorted((g["lr"], g["weight_decay"]) for g in groups)
    # backbone conv w+b: (0.1, 0.5) x2 ; backbone BN w+b: (0.1, 0.0) x2 ; embedding (1, 0) ; head (1, .5) x2
    assert got == sorted([(0.1, 0.5)] * 2 + [(0.1, 0.0)] * 2 + [(1.0, 0.0)] + [(1.0, 0.5)] * 2)
    opt = torch.optim.AdamW(groups, lr=1.0)
    sched = build_c2s_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    # the last group follows base * (1 - t/10) (poly with power 1, no warmup)
    base = lrs[0]
    assert lrs == pytest.approx([base * (1 - i / 10) for i in range(5)])
