"""Global and local distillation losses on tiny tensors with hand-checked values."""

import pytest
import torch

from c2s_d2.modeling.distillation.losses import global_distillation_loss, local_distillation_loss

# 1 - cos(45 degrees) = 1 - 1/sqrt(2)
ONE_MINUS_COS45 = 0.29289321881345254


def test_global_cosine_identical_orthogonal_45_degrees():
    t = torch.tensor([[2.0, 0.0]])
    # Scale does not matter: the loss compares directions.
    assert global_distillation_loss(torch.tensor([[5.0, 0.0]]), t).item() == pytest.approx(0.0)
    assert global_distillation_loss(torch.tensor([[0.0, 3.0]]), t).item() == pytest.approx(1.0)
    s45 = torch.tensor([[1.0, 1.0]])
    assert global_distillation_loss(s45, t).item() == pytest.approx(ONE_MINUS_COS45, abs=1e-6)
    # Opposite directions: 1 - (-1) = 2.
    assert global_distillation_loss(torch.tensor([[-1.0, 0.0]]), t).item() == pytest.approx(2.0)


def test_global_cosine_mean_over_batch_and_cls_queries():
    # Image 0: CLS queries at 0 and 90 degrees from the teacher (losses 0 and 1);
    # image 1: one query at 45 degrees and one identical (losses 0.29289 and 0).
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 4.0]]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = (0.0 + 1.0 + ONE_MINUS_COS45 + 0.0) / 4
    assert global_distillation_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)


def test_global_l1_is_l1_distance_of_normalised_vectors():
    t = torch.tensor([[1.0, 0.0]])
    # (1, 1)/sqrt(2) vs (1, 0): |0.70711 - 1| + |0.70711 - 0| = 1 exactly.
    assert global_distillation_loss(torch.tensor([[1.0, 1.0]]), t, "l1").item() == pytest.approx(
        1.0, abs=1e-6
    )
    # Orthogonal: |1 - 0| + |0 - 1| = 2; identical: 0.
    assert global_distillation_loss(torch.tensor([[0.0, 2.0]]), t, "l1").item() == pytest.approx(
        2.0
    )
    assert global_distillation_loss(torch.tensor([[3.0, 0.0]]), t, "l1").item() == pytest.approx(
        0.0
    )
    # Mean over images: (1 + 2) / 2.
    s = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    t2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert global_distillation_loss(s, t2, "l1").item() == pytest.approx(1.5, abs=1e-6)


def test_global_gradients_reach_student_only():
    student = torch.tensor([[1.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0]], requires_grad=True)
    global_distillation_loss(student, teacher).backward()
    assert teacher.grad is None
    # d/ds (1 - s.t/|s|) at s = (1, 1), t = (1, 0):
    # -(t - (s.t) s / |s|^2) / |s| = -((1, 0) - (0.5, 0.5)) / 1.41421 = (-0.35355, 0.35355)
    assert torch.allclose(student.grad, torch.tensor([[-0.35355339, 0.35355339]]), atol=1e-6)


def test_global_empty_batch_is_graph_connected_zero():
    student = torch.zeros(0, 1, 4, requires_grad=True)
    loss = global_distillation_loss(student, torch.zeros(0, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_global_bad_input():
    with pytest.raises(ValueError, match="kind"):
        global_distillation_loss(torch.ones(1, 2), torch.ones(1, 2), kind="l2")
    with pytest.raises(ValueError, match="does not match"):
        global_distillation_loss(torch.ones(2, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="does not match"):
        global_distillation_loss(torch.ones(1, 1, 3), torch.ones(1, 4))


def test_local_mean_over_regions():
    # Regions: identical (0), orthogonal (1), 45 degrees (0.29289): mean 0.43096440627.
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    t = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    loss = local_distillation_loss(s, t)
    assert loss.item() == pytest.approx(0.43096440627115085, abs=1e-6)
    loss.backward()
    # The identical region sits at the minimum: zero gradient there.
    assert torch.allclose(s.grad[0], torch.zeros(2), atol=1e-7)
    assert s.grad[1].abs().sum() > 0


def test_local_no_region_gives_zero_with_grad():
    weight = torch.ones(4, 4, requires_grad=True)
    s = torch.zeros(0, 4) @ weight
    loss = local_distillation_loss(s, torch.zeros(0, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros(4, 4))


def test_local_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        local_distillation_loss(torch.ones(2, 3), torch.ones(3, 3))
