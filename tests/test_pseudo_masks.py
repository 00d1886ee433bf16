"""Pseudo-masks from the ignored area on a synthetic 16x16 dense map (d = 4)."""

import pytest
import torch

from c2s_d2.modeling.distillation.pseudo_masks import (
    connected_components,
    ignored_cells_from_labels,
    pseudo_masks_from_ignored_area,
    pseudo_masks_from_ignored_area_batch,
    score_regions,
)

H = W = 16


def synthetic_scene(noise: float = 0.0, seed: int = 0):
    """Ignored area: columns 0..9. Inside it, concept A (e0) in two disconnected 4x4 blobs,
    concept B (e1) in one 4x4 blob plus a 2-cell blob, concept C (e2) everywhere else (110 cells).
    Labelled area (columns 10..15) carries A's embedding and touches A's second blob.
    """
    concept = torch.full((H, W), 2)
    concept[0:4, 0:4] = 0  # A, blob 1
    concept[12:16, 6:10] = 0  # A, blob 2 (touches the labelled area at column 10)
    concept[6:10, 2:6] = 1  # B, main blob
    concept[0:2, 8] = 1  # B, 2-cell blob
    concept[:, 10:] = 0  # labelled cells identical to A
    ignore = torch.zeros(H, W, dtype=torch.bool)
    ignore[:, :10] = True
    dense = torch.eye(4)[concept].permute(2, 0, 1).clone()
    if noise > 0:
        dense += noise * torch.randn(dense.shape, generator=torch.Generator().manual_seed(seed))
    return dense, ignore, concept


def box(r0, r1, c0, c1):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


def as_set(masks):
    return {tuple(m.flatten().nonzero().flatten().tolist()) for m in masks}


def expected_regions(min_area=4):
    ignore = box(0, 16, 0, 10)
    a1, a2, b = box(0, 4, 0, 4), box(12, 16, 6, 10), box(6, 10, 2, 6)
    b_small = box(0, 2, 8, 9)
    c = ignore & ~(a1 | a2 | b | b_small)
    regions = [a1, a2, b, c] + ([b_small] if min_area <= 2 else [])
    return as_set(r for r in regions if int(r.sum()) >= min_area)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_known_clusters_are_recovered_and_split_into_components(noise):
    dense, ignore, _ = synthetic_scene(noise)
    masks = pseudo_masks_from_ignored_area(dense, ignore, k_max=4, iters=10, min_area=4)
    assert masks.dtype == torch.bool and masks.shape[1:] == (H, W)
    # A's two blobs come back as two regions; B's 2-cell blob is dropped (min_area = 4).
    assert as_set(masks) == expected_regions(min_area=4)
    assert sorted(masks.sum((1, 2)).tolist()) == [16, 16, 16, 110]


def test_labelled_cells_are_never_covered():
    dense, ignore, _ = synthetic_scene(0.05)
    masks = pseudo_masks_from_ignored_area(dense, ignore, k_max=4, iters=10, min_area=4)
    assert not (masks & ~ignore).any()
    # Random maps, random ignore areas: still only ignored cells, disjoint, >= min_area.
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(3, 8, 12, 12, generator=g)
    ign = torch.rand(3, 12, 12, generator=g) > 0.4
    for b, m in enumerate(pseudo_masks_from_ignored_area_batch(dense, ign, k_max=3, min_area=3)):
        assert not (m & ~ign[b]).any()
        assert (m.sum(0) <= 1).all() and (m.sum((1, 2)) >= 3).all()


def test_min_area_drops_small_blobs():
    dense, ignore, _ = synthetic_scene()
    m2 = pseudo_masks_from_ignored_area(dense, ignore, k_max=4, min_area=2)
    assert as_set(m2) == expected_regions(min_area=2)  # the 2-cell blob survives
    m17 = pseudo_masks_from_ignored_area(dense, ignore, k_max=4, min_area=17)
    assert sorted(m17.sum((1, 2)).tolist()) == [110]  # only C is large enough


def test_one_concept_gives_one_region():
    ignore = box(2, 14, 2, 14)
    dense = torch.zeros(4, H, W)
    dense[1] = 1.0  # the same embedding everywhere: no k >= 2 is admissible
    masks = pseudo_masks_from_ignored_area(dense, ignore, k_max=4, min_area=4)
    assert masks.shape[0] == 1 and torch.equal(masks[0], ignore)
    # Isotropic noise in d = 64: splits have a low silhouette, k = 1 still wins.
    noisy = torch.zeros(64, H, W)
    noisy[0] = 1.0
    noisy += 0.05 * torch.randn(noisy.shape, generator=torch.Generator().manual_seed(1))
    masks = pseudo_masks_from_ignored_area(noisy, ignore, k_max=4, min_area=4)
    assert masks.shape[0] == 1 and torch.equal(masks[0], ignore)


def test_spatial_term_splits_a_uniform_area():
    ignore = torch.ones(H, W, dtype=torch.bool)
    dense = torch.zeros(4, H, W)
    dense[0] = 1.0
    masks = pseudo_masks_from_ignored_area(dense, ignore, k_max=4, min_area=4, spatial_weight=1.0)
    assert masks.shape[0] >= 2
    assert torch.equal(masks.sum(0), torch.ones(H, W, dtype=torch.long))  # a partition


def test_no_ignored_area_and_tiny_ignored_area():
    dense, _, _ = synthetic_scene()
    none = pseudo_masks_from_ignored_area(dense, torch.zeros(H, W, dtype=torch.bool))
    assert none.shape == (0, H, W)
    tiny = pseudo_masks_from_ignored_area(dense, box(0, 2, 0, 2), min_area=5)
    assert tiny.shape == (0, H, W)


def test_batch_matches_single_images_and_is_deterministic():
    d0, i0, _ = synthetic_scene(0.05, seed=0)
    d1, i1, _ = synthetic_scene(0.05, seed=1)
    i1 = i1.clone()
    i1[:, 5:10] = False
    dense, ign = torch.stack([d0, d1]), torch.stack([i0, i1])
    batch = pseudo_masks_from_ignored_area_batch(dense, ign, k_max=4, min_area=4, seed=7)
    again = pseudo_masks_from_ignored_area_batch(dense, ign, k_max=4, min_area=4, seed=7)
    assert len(batch) == 2
    for a, b in zip(batch, again):
        assert torch.equal(a, b)
    assert as_set(batch[0]) == as_set(pseudo_masks_from_ignored_area(d0, i0, k_max=4, min_area=4))
    assert as_set(batch[1]) == as_set(pseudo_masks_from_ignored_area(d1, i1, k_max=4, min_area=4))


def test_connected_components_are_4_connected():
    m = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)[
        None
    ]
    lab = connected_components(m)[0]
    # (0,1) and (1,2) touch only diagonally: separate components; (1,2)-(2,2)-(2,3) one component.
    assert lab[0, 0] == lab[0, 1] and lab[1, 2] == lab[2, 2] == lab[2, 3]
    assert len({lab[0, 0].item(), lab[1, 2].item(), lab[3, 0].item()}) == 3
    assert (lab[~m[0]] == 0).all() and (lab[m[0]] > 0).all()
    # A snake needs many propagation steps; it must still end as one component.
    snake = torch.zeros(1, 7, 7, dtype=torch.bool)
    snake[0, ::2, :] = True
    snake[0, 1::4, 6] = True
    snake[0, 3::4, 0] = True
    assert connected_components(snake)[snake].unique().numel() == 1


def test_ignored_cells_from_labels():
    label = torch.full((4, 4), 255)
    label[0, 0] = 3  # one labelled pixel spoils the top-left cell
    label[2:, 2:] = 1
    cells = ignored_cells_from_labels(label, (2, 2))
    assert cells.tolist() == [[False, True], [True, False]]
    batched = ignored_cells_from_labels(label[None], (2, 2))
    assert batched.tolist() == [[[False, True], [True, False]]]


def test_score_regions_by_best_seen_similarity():
    seen = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    regions = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # best seen cosines: 1, 0 (vs e0) and 0.7071: threshold 0.9 -> latent for the last two.
    assert score_regions(regions, seen, 0.9).tolist() == [False, True, True]
    assert score_regions(regions, seen, 0.7).tolist() == [False, True, False]
    assert score_regions(regions, torch.zeros(0, 2), 0.9).tolist() == [True, True, True]
    assert score_regions(torch.zeros(0, 2), seen, 0.9).shape == (0,)


def test_bad_arguments_name_the_key():
    dense, ignore, _ = synthetic_scene()
    with pytest.raises(ValueError, match="K_MAX"):
        pseudo_masks_from_ignored_area(dense, ignore, k_max=0)
    with pytest.raises(ValueError, match="MIN_AREA"):
        pseudo_masks_from_ignored_area(dense, ignore, min_area=0)
    with pytest.raises(ValueError, match="does not match"):
        pseudo_masks_from_ignored_area_batch(dense[None], ignore[None, :8])
