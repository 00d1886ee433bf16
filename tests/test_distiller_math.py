"""Hand-checked values of the C2S distiller's steps on tiny tensors (docs/METHOD.md, 4, 6, 9).

Every expected number is worked out by hand in the comments next to it. The steps are called
directly on a ``C2SDistiller`` built from explicit keyword arguments, with a stand-in ``model``
that has only a ``criterion`` (a real ``SetCriterion`` with a real ``HungarianMatcher``).
``_pseudo_regions`` (k-means mining) is not covered here: its regions are given by hand.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from c2s_d2.modeling.c2s_distiller import C2SDistiller
from c2s_d2.modeling.clip.teacher import ClipTeacher
from c2s_d2.modeling.criterion import SetCriterion
from c2s_d2.modeling.distillation.losses import global_distillation_loss, local_distillation_loss
from c2s_d2.modeling.matcher import HungarianMatcher

LN2 = math.log(2.0)
NO_OBJECT_WEIGHT = 0.1
LATENT_CLASS_WEIGHT = 0.5


def _distiller(**overrides) -> C2SDistiller:
    """A C2SDistiller with hidden size 3 and CLIP size 2.

    Every required keyword is given explicitly; the seen-filter and re-seeding keywords keep
    their defaults (the steps tested here do not read them).
    """
    kwargs = dict(
        hidden_dim=3,
        embed_dim=2,
        teacher_factory=lambda: ClipTeacher,  # never called by the steps tested here
        vocabulary_factory=lambda: torch.zeros(0, 2),
        global_weight=1.0,
        global_loss="cosine",
        local_weight=1.0,
        use_gt_segments=True,
        use_pseudo_masks=True,
        pseudo_mask_args={},
        seen_threshold=0.9,
        latent_enabled=False,
        num_latent=2,
        latent_momentum=0.9,
        latent_class_weight=LATENT_CLASS_WEIGHT,
        latent_text_args={"topk": 1, "tau": 1.0, "lam": 0.5},
    )
    kwargs.update(overrides)
    return C2SDistiller(**kwargs)


def _model(cost_mask: float = 5.0, cost_dice: float = 5.0) -> SimpleNamespace:
    """What the distiller's steps read of the model: ``criterion`` (+ its matcher)."""
    matcher = HungarianMatcher(
        cost_class=2.0, cost_mask=cost_mask, cost_dice=cost_dice, num_points=0
    )
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    criterion = SetCriterion(matcher, weights, no_object_weight=NO_OBJECT_WEIGHT, num_points=0)
    return SimpleNamespace(criterion=criterion)


def _log_probs(*rows) -> torch.Tensor:
    """Logits ``log p`` per row, so that ``log_softmax(logits) = log p`` exactly (p sums to 1)."""
    p = torch.tensor(rows, dtype=torch.float64)
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[0], dtype=torch.float64))
    return p.log()


def _idx(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# --------------------------------------------------------------------------- latent targets
def _latent_ce_case():
    """Two images, 4 queries, 2 seen classes + 2 latent classes + no-object (5 logits).

    Image 0: q0 matched to ground-truth segment 1 (label 1); q1 matched to pseudo region 0 (latent
    id 1); q2 matched to pseudo region 1 (latent id -1: seen-like); q3 unmatched.
    Image 1: no ground truth; q2 matched to pseudo region 0 (latent id 0); q0, q1, q3 unmatched.
    """
    h, q, e, s = 1 / 2, 1 / 4, 1 / 8, 1 / 16
    logits = torch.stack(
        [
            _log_probs(
                [e, h, q, s, s],  # q0 -> target 1 (seen label): CE = -ln(1/2) = ln2, w = 1
                [h, q, e, s, s],  # q1 -> target 2 + 1 = 3 (latent): CE = ln16 = 4 ln2, w = 0.5
                [s, s, e, q, h],  # q2 -> target 4 (no object): CE = ln2, w = 0.1
                [q, q, q, e, e],  # q3 -> target 4 (no object): CE = ln8 = 3 ln2, w = 0.1
            ),
            _log_probs(
                [h, q, e, s, s],  # q0 -> target 4: CE = 4 ln2, w = 0.1
                [s, s, e, q, h],  # q1 -> target 4: CE = ln2, w = 0.1
                [s, s, h, q, e],  # q2 -> target 2 + 0 = 2 (latent): CE = ln2, w = 0.5
                [e, e, q, q, q],  # q3 -> target 4: CE = ln4 = 2 ln2, w = 0.1
            ),
        ]
    ).float()
    targets = [
        {"labels": _idx(0, 1), "masks": torch.zeros(2, 4, 4, dtype=torch.bool)},
        {"labels": _idx(), "masks": torch.zeros(0, 4, 4, dtype=torch.bool)},
    ]
    indices = [(_idx(0), _idx(1)), (_idx(), _idx())]
    regions = [{"latent": _idx(1, -1)}, {"latent": _idx(0)}]
    # unordered on purpose: query 2 takes region 1, query 1 takes region 0
    pseudo_idx = [(_idx(2, 1), _idx(1, 0)), (_idx(2), _idx(0))]
    # the targets and weights written above, for the gradient check
    expected_target = [[1, 3, 4, 4], [4, 4, 2, 4]]
    expected_weight = [[1.0, 0.5, 0.1, 0.1], [0.1, 0.1, 0.5, 0.1]]
    return logits, targets, indices, regions, pseudo_idx, expected_target, expected_weight


def test_ce_with_latent_targets_hand_value_and_targets():
    logits, targets, indices, regions, pseudo_idx, tgt, w = _latent_ce_case()
    logits.requires_grad_(True)
    outputs = {"pred_logits": logits}
    loss = _distiller(latent_enabled=True)._ce_with_latent_targets(
        _model(), outputs, targets, indices, regions, pseudo_idx, n_seen=2
    )
    # image 0: sum w*CE = (1*1 + 0.5*4 + 0.1*1 + 0.1*3) ln2 = 3.4 ln2, sum w = 1.7
    # image 1: sum w*CE = (0.1*4 + 0.1*1 + 0.5*1 + 0.1*2) ln2 = 1.2 ln2, sum w = 0.8
    # weighted mean over both images: 4.6 ln2 / 2.5 = 1.84 ln2
    assert loss.item() == pytest.approx(1.84 * LN2, rel=1e-6)

    # The gradient reveals each query's target and weight: d loss / d logits[b, q] =
    # w[b, q] / sum(w) * (softmax(logits[b, q]) - onehot(target[b, q])).
    loss.backward()
    p = logits.detach().softmax(-1)
    onehot = F.one_hot(torch.tensor(tgt), 5).float()
    expected = torch.tensor(w)[..., None] / 2.5 * (p - onehot)
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_ce_with_latent_targets_without_latent_regions_is_the_criterion_ce():
    """No latent target: the loss is exactly SetCriterion's loss_ce (seen + no-object only)."""
    logits, targets, indices, _, _, _, _ = _latent_ce_case()
    model = _model()
    regions = [{"latent": _idx(-1, -1)}, {"latent": _idx(-1)}]
    pseudo_idx = [(_idx(2, 1), _idx(1, 0)), (_idx(2), _idx(0))]
    loss = _distiller(latent_enabled=True)._ce_with_latent_targets(
        model, {"pred_logits": logits}, targets, indices, regions, pseudo_idx, n_seen=2
    )
    # image 0: (1*1 + 0.1*(CE of q1 -> 4 = ln16 = 4) + 0.1*1 + 0.1*3) ln2 = 1.8 ln2, sum w = 1.3
    # image 1: (0.1*4 + 0.1*1 + 0.1*(CE of q2 -> 4 = ln8 = 3) + 0.1*2) ln2 = 1.0 ln2, sum w = 0.4
    # mean: 2.8 ln2 / 1.7
    assert loss.item() == pytest.approx(2.8 / 1.7 * LN2, rel=1e-6)
    reference = model.criterion.loss_labels({"pred_logits": logits}, targets, indices)["loss_ce"]
    assert loss.item() == pytest.approx(float(reference), rel=1e-6)


# --------------------------------------------------------------------------- pseudo matching
# Masks on a 1 x 8 strip, logits +-10 (sigmoid ~ 0 or 1). Region A = pixels {0,1,2}, region
# B = pixels {0..5}. Queries: "main" = A exactly, qa = {0,1,2,3}, qb = {0,1,6}, bad = {}.
# With P = 8 pixels, BCE cost ~ 10 * (#mismatched pixels) / 8 and Dice = 1 - (2|x^y|+1)/(|x|+|y|+1);
# cost = 5 BCE + 5 Dice:
#   qa-A: 1 mismatch, Dice 1 - 7/8  -> 6.25 + 0.625 =  6.88   (the cheapest pair: greedy's pick)
#   qa-B: 2 mismatches, 1 - 9/11    -> 12.5 + 0.909 = 13.41
#   qb-A: 2 mismatches, 1 - 5/7     -> 12.5 + 1.429 = 13.93
#   qb-B: 5 mismatches, 1 - 5/10    -> 31.25 + 2.5  = 33.75
#   bad-A: 3 mismatches, 1 - 1/4    -> 18.75 + 3.75 = 22.5
#   bad-B: 6 mismatches, 1 - 1/7    -> 37.5 + 4.29  = 41.8
# Greedy (qa-A first, then the best left for B) costs 6.88 + 33.75 = 40.6 (qb-B) at best;
# the optimum is qa-B + qb-A = 27.3 (any pair with "bad" costs > 35). "main" (cost 0 with A)
# must never be used: it is taken by the main matching.
_PIXELS = {"main": [0, 1, 2], "qa": [0, 1, 2, 3], "qb": [0, 1, 6], "bad": []}


def _strip(pixels) -> torch.Tensor:
    m = torch.zeros(1, 8, dtype=torch.bool)
    m[0, pixels] = True
    return m


def _query_masks(order) -> torch.Tensor:
    """[Q, 1, 8] mask logits, +10 inside the query's pixels, -10 outside."""
    return torch.stack([_strip(_PIXELS[name]).float() * 20.0 - 10.0 for name in order])


def test_match_pseudo_regions_exact_pairs_never_reusing_main_queries():
    region_masks = torch.stack([_strip([0, 1, 2]), _strip([0, 1, 2, 3, 4, 5])])  # [A, B]
    order0 = ["main", "qb", "qa", "bad"]  # image 0: main matching took query 0
    order1 = ["qa", "bad", "main", "qb"]  # image 1: main matching took query 2
    outputs = {"pred_masks": torch.stack([_query_masks(order0), _query_masks(order1)])}
    regions = [{"masks": region_masks}, {"masks": region_masks}]
    indices = [(_idx(0), _idx(0)), (_idx(2), _idx(0))]
    matches = _distiller()._match_pseudo_regions(_model(), outputs, regions, indices)
    pairs = [sorted(zip(q.tolist(), r.tolist())) for q, r in matches]
    # image 0: qb (query 1) -> A (0), qa (query 2) -> B (1)
    # image 1: qa (query 0) -> B (1), qb (query 3) -> A (0)
    assert pairs == [[(1, 0), (2, 1)], [(0, 1), (3, 0)]]

    # Without the main matching, "main" would take A (cost ~0) and qa would take B.
    free = [(_idx(), _idx()), (_idx(), _idx())]
    matches = _distiller()._match_pseudo_regions(_model(), outputs, regions, free)
    assert [sorted(zip(q.tolist(), r.tolist())) for q, r in matches] == [
        [(0, 0), (2, 1)],
        [(0, 1), (2, 0)],
    ]


def test_match_pseudo_regions_empty_cases():
    outputs = {"pred_masks": _query_masks(["main", "qa"])[None]}
    a = {"masks": _strip([0, 1, 2])[None]}
    no_region = {"masks": torch.zeros(0, 1, 8, dtype=torch.bool)}
    d = _distiller()
    # no pseudo region: no pair
    ((q, r),) = d._match_pseudo_regions(_model(), outputs, [no_region], [(_idx(0), _idx(0))])
    assert q.tolist() == [] and r.tolist() == []
    # every query already taken by the main matching: no pair, even with a region
    ((q, r),) = d._match_pseudo_regions(_model(), outputs, [a], [(_idx(1, 0), _idx(0, 1))])
    assert q.tolist() == [] and r.tolist() == []
    # one free query, one region: paired whatever the cost (query 1 = qa, region 0)
    ((q, r),) = d._match_pseudo_regions(_model(), outputs, [a], [(_idx(0), _idx(0))])
    assert q.tolist() == [1] and r.tolist() == [0]


# --------------------------------------------------------------------------- local pairs
def _local_case():
    """Two images, 3 queries, CLIP size 2, teacher grid 2 x 2, image 4 x 4 (a cell = 2 x 2 px).

    Image 0 dense cells: (0,0) = (3,0), (0,1) = (0,4), (1,0) = (1,0), (1,1) = (0,-1).
      GT 0 = the top row of cells: mean ((3,0) + (0,4)) / 2 = (1.5, 2), norm 2.5 -> (0.6, 0.8).
      GT 1 = cell (1,0) + the left half of cell (0,1) (weight 1/2):
             ((1,0) + 0.5 (0,4)) / 1.5 = (2/3, 4/3) -> (1, 2) / sqrt 5.
      Main matching: q2 <-> GT 1, q0 <-> GT 0. Pseudo: q1 <-> region 1 (teacher (1, 0)).
    Image 1 dense cells: (2,0), (0,2), (2,2), (0,0); GT 0 = the whole image:
      mean (1, 1) -> (1, 1) / sqrt 2. Main matching: q1 <-> GT 0; no pseudo match.
    """
    dense = torch.tensor(
        [
            [[[3.0, 0.0], [1.0, 0.0]], [[0.0, 4.0], [0.0, -1.0]]],  # image 0: [d=2, h=2, w=2]
            [[[2.0, 0.0], [2.0, 0.0]], [[0.0, 2.0], [2.0, 0.0]]],  # image 1
        ]
    )
    gt0 = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt0[0, :2, :] = True  # top row of cells
    gt0[1, 2:, :2] = True  # cell (1, 0)
    gt0[1, :2, 2] = True  # left half of cell (0, 1)
    gt1 = torch.ones(1, 4, 4, dtype=torch.bool)
    targets = [{"labels": _idx(0, 1), "masks": gt0}, {"labels": _idx(0), "masks": gt1}]
    embeds = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]],  # image 0: q0, q1, q2
            [[5.0, 5.0], [1.0, 0.0], [0.0, 1.0]],  # image 1
        ],
        requires_grad=True,
    )
    outputs = {"class_embeds": embeds}
    indices = [(_idx(2, 0), _idx(1, 0)), (_idx(1), _idx(0))]
    regions = [{"embeds": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}, {"embeds": torch.zeros(0, 2)}]
    pseudo_idx = [(_idx(1), _idx(1)), (_idx(), _idx())]
    return outputs, targets, indices, regions, pseudo_idx, dense


R5, R2 = math.sqrt(5.0), math.sqrt(2.0)
# (student, teacher) pairs in the order the distiller emits them: per image, GT then pseudo
GT_PAIRS = [
    ([2.0, 1.0], [1 / R5, 2 / R5]),  # image 0, q2 <-> GT 1: cos = (2 + 2) / (sqrt5 sqrt5) = 0.8
    ([1.0, 0.0], [0.6, 0.8]),  # image 0, q0 <-> GT 0: cos = 0.6
    ([1.0, 0.0], [1 / R2, 1 / R2]),  # image 1, q1 <-> GT 0: cos = 1/sqrt2
]
PSEUDO_PAIRS = [([0.0, 2.0], [1.0, 0.0])]  # image 0, q1 <-> region 1: cos = 0


@pytest.mark.parametrize(
    "use_gt, use_pseudo, pairs, loss",
    [
        # mean(1 - cos): (0.2 + 0.4 + (1 - 1/sqrt2) + 1) / 4
        (True, True, GT_PAIRS[:2] + PSEUDO_PAIRS + GT_PAIRS[2:], (2.6 - 1 / R2) / 4),
        (True, False, GT_PAIRS, (1.6 - 1 / R2) / 3),  # (0.2 + 0.4 + 1 - 1/sqrt2) / 3
        (False, True, PSEUDO_PAIRS, 1.0),  # 1 - 0
    ],
    ids=["gt+pseudo", "gt-only", "pseudo-only"],
)
def test_local_pairs_and_loss_hand_values(use_gt, use_pseudo, pairs, loss):
    outputs, targets, indices, regions, pseudo_idx, dense = _local_case()
    d = _distiller(use_gt_segments=use_gt, use_pseudo_masks=use_pseudo)
    s, t = d._local_pairs(outputs, targets, indices, regions, pseudo_idx, dense, ClipTeacher)
    assert torch.allclose(s, torch.tensor([p[0] for p in pairs]))
    assert torch.allclose(t, torch.tensor([p[1] for p in pairs]), atol=1e-6)
    assert local_distillation_loss(s, t).item() == pytest.approx(loss, rel=1e-6)


def test_local_pairs_none_gives_a_zero_loss_on_the_graph():
    outputs, targets, indices, regions, pseudo_idx, dense = _local_case()
    d = _distiller(use_gt_segments=False, use_pseudo_masks=False)
    s, t = d._local_pairs(outputs, targets, indices, regions, pseudo_idx, dense, ClipTeacher)
    assert s.shape == (0, 2) and t.shape == (0, 2)
    loss = local_distillation_loss(s, t)
    assert loss.item() == 0.0
    loss.backward()  # still connected to the student: every parameter gets a (zero) gradient
    assert torch.equal(outputs["class_embeds"].grad, torch.zeros(2, 3, 2))


# --------------------------------------------------------------------------- global branch
def test_global_projection_and_loss_hand_values():
    d = _distiller()
    with torch.no_grad():
        d.global_proj.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        d.global_proj.bias.copy_(torch.tensor([0.0, 1.0]))
    h_cls = torch.tensor([[[1.0, 2.0, 1.0]], [[3.0, 3.0, 0.0]]])  # [B=2, G=1, hidden=3]
    g_s = d.global_proj(h_cls)
    # image 0: (1 + 1, 2 - 1) + (0, 1) = (2, 2); image 1: (3 + 0, 3 - 0) + (0, 1) = (3, 4)
    assert torch.equal(g_s, torch.tensor([[[2.0, 2.0]], [[3.0, 4.0]]]))
    g_t = torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # normalised: (1, 0) and (0, 1)
    # cosine: image 0 cos((1,1)/sqrt2, (1,0)) = 1/sqrt2; image 1 cos((0.6,0.8), (0,1)) = 0.8
    #   mean(1 - cos) = (1 - 1/sqrt2 + 0.2) / 2
    cosine = global_distillation_loss(g_s, g_t, "cosine")
    assert cosine.item() == pytest.approx((1.2 - 1 / R2) / 2, rel=1e-6)
    # l1: image 0 |1/sqrt2 - 1| + |1/sqrt2 - 0| = 1; image 1 |0.6 - 0| + |0.8 - 1| = 0.8
    #   mean = 0.9
    l1 = global_distillation_loss(g_s, g_t, "l1")
    assert l1.item() == pytest.approx(0.9, rel=1e-6)


def test_global_loss_two_cls_queries_share_the_image_target():
    # one image, G = 2 CLS queries (2, 2) and (0, 3), teacher (1, 0):
    # cos = 1/sqrt2 and 0 -> mean(1 - cos) = (1 - 1/sqrt2 + 1) / 2
    g_s = torch.tensor([[[2.0, 2.0], [0.0, 3.0]]])
    g_t = torch.tensor([[4.0, 0.0]])
    loss = global_distillation_loss(g_s, g_t, "cosine")
    assert loss.item() == pytest.approx((2 - 1 / R2) / 2, rel=1e-6)


def test_global_weight_zero_builds_no_projection():
    assert not hasattr(_distiller(global_weight=0.0), "global_proj")
    assert _distiller().global_proj.in_features == 3 and _distiller().global_proj.out_features == 2
