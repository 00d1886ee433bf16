"""Integrity of the distiller's regions: padding is never an ignored area, the seen/latent
filter works at any CLIP scale, idle latent slots are re-seeded, contradictory switches are
refused."""

import pytest
import torch
import torch.nn.functional as F

from c2s_d2.modeling.c2s_distiller import C2SDistiller, PADDING_LABEL, padded_semantic_labels
from c2s_d2.modeling.clip.teacher import ClipTeacher
from c2s_d2.modeling.distillation.latent_classes import LatentClassMemory
from c2s_d2.modeling.distillation.pseudo_masks import (
    CalibratedSeenFilter,
    best_seen_similarity,
    ignored_cells_from_labels,
)


class _GridTeacher:
    """Stands in for ClipTeacher: the real region pooling, nothing else."""

    region_embeddings = staticmethod(ClipTeacher.region_embeddings)


def _distiller(**overrides):
    kwargs = dict(
        hidden_dim=4,
        embed_dim=3,
        teacher_factory=None,
        vocabulary_factory=lambda: torch.zeros(0, 3),
        global_weight=0.0,
        global_loss="cosine",
        local_weight=1.0,
        use_gt_segments=True,
        use_pseudo_masks=True,
        pseudo_mask_args=dict(k_max=2, iters=5, min_area=2, min_silhouette=0.25, n_init=2),
        seen_threshold=0.9,
        latent_enabled=True,
        num_latent=2,
        latent_momentum=0.9,
        latent_class_weight=1.0,
        latent_text_args=dict(topk=1, tau=0.07, lam=0.5),
    )
    kwargs.update(overrides)
    return C2SDistiller(**kwargs)


def _two_material_dense(b, h, w):
    """[b, 3, h, w]: left half along e0, right half along e1 (two obvious clusters)."""
    dense = torch.zeros(b, 3, h, w)
    dense[:, 0, :, : w // 2] = 1.0
    dense[:, 1, :, w // 2 :] = 1.0
    return dense


def test_padding_is_neither_labelled_nor_ignored():
    # image 0: 8x8 of which 8x5 is the true image (the mapper padded 3 columns with 255);
    # image 1: a 6x8 label on an 8x8 canvas (the batch padded 2 rows)
    s0 = torch.full((8, 8), 255, dtype=torch.long)
    s1 = torch.full((6, 8), 255, dtype=torch.long)
    sem = padded_semantic_labels(
        [{"sem_seg": s0, "unpadded_size": (8, 5)}, {"sem_seg": s1}], (8, 8), "cpu"
    )
    assert (sem[0, :, :5] == 255).all() and (sem[0, :, 5:] == PADDING_LABEL).all()
    assert (sem[1, :6] == 255).all() and (sem[1, 6:] == PADDING_LABEL).all()
    ignored = ignored_cells_from_labels(sem, (4, 4))  # 2x2 pixels per cell
    # cells 0..1 of image 0 are inside, cell 2 holds pixels 4 (true) and 5 (padding): not ignored
    assert ignored[0].tolist() == [[True, True, False, False]] * 4
    assert ignored[1].tolist() == [[True] * 4] * 3 + [[False] * 4]


def test_a_padded_batch_gives_no_pseudo_mask_cell_in_the_padding():
    distiller = _distiller(latent_enabled=False)
    # two 16x16 canvases, teacher grid 8x8; every true pixel is ignored (255)
    inputs = [
        {"sem_seg": torch.full((16, 16), 255, dtype=torch.long), "unpadded_size": (16, 10)},
        {"sem_seg": torch.full((12, 16), 255, dtype=torch.long)},
    ]
    dense = _two_material_dense(2, 8, 8)
    regions = distiller._pseudo_regions(inputs, (16, 16), dense, _GridTeacher(), torch.eye(3))
    inside = torch.zeros(2, 8, 8, dtype=torch.bool)
    inside[0, :, :5] = True
    inside[1, :6, :] = True
    for i, r in enumerate(regions):
        assert r["masks"].shape[0] >= 1
        assert not (r["masks"] & ~inside[i]).any(), f"image {i}: a pseudo-mask covers padding"
    # without the true size, the padding would have been mined (the old behaviour)
    old_inputs = [{"sem_seg": torch.full((16, 10), 255, dtype=torch.long)}]
    sem = torch.full((1, 16, 16), 255, dtype=torch.long)
    sem[0, :, :10] = old_inputs[0]["sem_seg"]
    assert ignored_cells_from_labels(sem, (8, 8))[0, :, 5:].all()


def test_the_mapper_records_the_true_size_before_padding(tmp_path):
    import cv2
    import numpy as np

    from c2s_d2.data.dataset_mapper import C2SSemanticDatasetMapper

    img, lab = tmp_path / "a.png", tmp_path / "a_label.png"
    cv2.imwrite(str(img), np.zeros((20, 30, 3), np.uint8))
    cv2.imwrite(str(lab), np.full((20, 30), 255, np.uint8))
    mapper = C2SSemanticDatasetMapper(
        is_train=True, augmentations=[], image_format="BGR", label_lut=None, size_divisibility=32
    )
    out = mapper({"file_name": str(img), "sem_seg_file_name": str(lab)})
    assert tuple(out["image"].shape[-2:]) == (32, 32)
    assert out["unpadded_size"] == (20, 30)
    sem = padded_semantic_labels([out], (32, 32), "cpu")
    assert (sem[0, :20, :30] == 255).all() and (sem[0, 20:] == PADDING_LABEL).all()
    assert (sem[0, :, 30:] == PADDING_LABEL).all()


def _at_cosine(c, i, dim=4):
    """A unit vector whose cosine with e_i is ``c``, orthogonal to the other seen axes (e3 takes
    the rest): its best seen cosine is exactly ``c``."""
    v = torch.zeros(dim)
    v[i], v[3] = c, (1 - c * c) ** 0.5
    return v


@pytest.mark.parametrize("scale", [0.9, 0.3])  # tiny-CLIP-like and real-CLIP-like cosines
def test_calibrated_seen_filter_rejects_seen_regions_and_keeps_unseen_at_any_scale(scale):
    seen_text = torch.eye(4)[:2]  # seen classes along e0, e1; the unseen class lies along e2
    # labelled seen segments: best cosines 0.9s, s, s, 1.1s
    gt = torch.stack([_at_cosine(f * scale, i % 2) for i, f in enumerate([0.9, 1.0, 1.0, 1.1])])
    gt_best = best_seen_similarity(gt, seen_text)
    assert torch.allclose(gt_best, scale * torch.tensor([0.9, 1.0, 1.0, 1.1]))
    f = CalibratedSeenFilter("calibrated", quantile=0.25)
    # 0.25-quantile of [0.9s, s, s, 1.1s] (linear): 0.9s + 0.75 * 0.1s = 0.975s
    assert f.calibrate(gt_best) == pytest.approx(0.975 * scale)
    unlabelled_seen = torch.stack([_at_cosine(1.05 * scale, 0), _at_cosine(1.0 * scale, 1)])
    # unseen regions: mostly e2, best seen cosine 0.5s
    unseen = torch.stack([_at_cosine(0.5 * scale, 0), _at_cosine(0.5 * scale, 1)])
    unseen[:, 2], unseen[:, 3] = unseen[:, 3], 0.0
    regions = torch.cat([unlabelled_seen, unseen])
    latent = f.is_latent(best_seen_similarity(regions, seen_text))
    assert latent.tolist() == [False, False, True, True]
    assert int(f.regions) == 4 and int(f.rejected) == 2
    # the old fixed threshold 0.9 only fires at the scale it was chosen for
    absolute = CalibratedSeenFilter("absolute", absolute_threshold=0.9)
    absolute.calibrate(gt_best)
    fired = ~absolute.is_latent(best_seen_similarity(unlabelled_seen, seen_text))
    assert fired.tolist() == ([True, True] if scale == 0.9 else [False, False])


def test_calibrated_threshold_is_the_quantile_then_an_ema():
    f = CalibratedSeenFilter("calibrated", quantile=0.5, momentum=0.9)
    assert f.calibrate(torch.tensor([0.1, 0.3, 0.2])) == pytest.approx(0.2)
    # next step: median 0.6 -> 0.9 * 0.2 + 0.1 * 0.6 = 0.24
    assert f.calibrate(torch.tensor([0.6, 0.5, 0.7])) == pytest.approx(0.24)
    # a step without labelled segments keeps the threshold
    assert f.calibrate(torch.zeros(0)) == pytest.approx(0.24)
    assert int(f.steps) == 2
    with pytest.raises(ValueError, match="SEEN_FILTER"):
        CalibratedSeenFilter("relative")


def test_idle_latent_slots_are_reseeded_with_the_farthest_region():
    mem = LatentClassMemory(2, 2, momentum=0.5, reseed_after=2)
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # step 1 fills slot 0 with e0 and slot 1 with a near-duplicate of e0 (a dead slot)
    near = F.normalize(torch.tensor([[1.0, -0.05]]), dim=-1)
    mem.update_and_assign(torch.cat([e0, near]), synchronize=False)
    assert mem.filled.tolist() == [True, True]
    # steps 2, 3: regions along e0 only: they go to slot 0 (nearest); slot 1 idles
    mem.update_and_assign(e0, synchronize=False)
    assert mem.idle_steps.tolist() == [0, 1] and int(mem.reseeds) == 0
    # step 3: e1 is nearer slot 0 (cosine 0) than slot 1 (-0.05), so slot 1 idles a 2nd step
    # -> re-seeded by this step's region farthest from every prototype: e1
    mixed = torch.cat([e0, e1])
    ids = mem.update_and_assign(mixed, synchronize=False)
    assert int(mem.reseeds) == 1
    assert torch.allclose(mem.prototypes[1], e1[0])
    assert ids.tolist() == [0, 1]
    assert mem.idle_steps.tolist() == [0, 0]


def test_reseeding_off_keeps_the_old_behaviour():
    mem = LatentClassMemory(2, 2, momentum=0.5, reseed_after=0)
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    near = F.normalize(torch.tensor([[1.0, -0.05]]), dim=-1)
    mem.update_and_assign(torch.cat([e0, near]), synchronize=False)
    for _ in range(5):
        mem.update_and_assign(e0, synchronize=False)
    assert int(mem.reseeds) == 0
    assert torch.allclose(mem.prototypes[1], near[0])  # slot 1 stays dead
    assert int(mem.idle_steps[1]) == 5


def test_latent_classes_without_pseudo_masks_are_refused():
    with pytest.raises(ValueError, match="USE_PSEUDO_MASKS"):
        _distiller(use_pseudo_masks=False, latent_enabled=True)
    _distiller(use_pseudo_masks=False, latent_enabled=False)  # GT-only local distillation works
