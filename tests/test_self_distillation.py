"""Stage 1's optional self-distillation: each exit head below the last also learns the last layer's outputs."""
import math

import pytest
import torch

from ee_lightning.tasks import TaskSpec
from ee_lightning.training.systems.finetune import exit_head_losses, self_distillation_loss

CLASSES = TaskSpec(name="toy", num_labels=2)
VALUES = TaskSpec(name="toy", kind="regression", num_labels=1, metric="pearson_spearman")


def test_kl_to_the_last_layer_by_hand():
    # teacher softmax at T=1: (0.5, 0.5); student softmax: (e^1, 1) / (e + 1) = (0.7311, 0.2689)
    # KL = 0.5 * ln(0.5 / 0.7311) + 0.5 * ln(0.5 / 0.2689) = 0.5 * (-0.3799 + 0.6201) = 0.1201
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert self_distillation_loss(CLASSES, student, teacher, 1.0).item() == pytest.approx(0.1201, abs=1e-4)
    # T=2 halves the student's logits (0.5, 0): softmax (0.6225, 0.3775); KL = 0.5 * (ln(0.5/0.6225) + ln(0.5/0.3775))
    # = 0.5 * (-0.2191 + 0.2810) = 0.03095, times T^2 = 4: 0.1238
    assert self_distillation_loss(CLASSES, student, teacher, 2.0).item() == pytest.approx(0.1238, abs=1e-4)
    assert self_distillation_loss(CLASSES, teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_regression_learns_the_last_layers_value():
    assert self_distillation_loss(VALUES, torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [2.0]]), 1.0).item() == 1.0


def test_mixed_losses_by_hand_and_the_last_layer_learns_from_labels_alone():
    labels = torch.tensor([0])
    first, last = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    losses = exit_head_losses(CLASSES, [first, last], labels, distill_weight=0.25, temperature=1.0)
    ce_first = -math.log(math.e / (math.e + 1))  # 0.3133
    assert losses[0].item() == pytest.approx(0.75 * ce_first + 0.25 * 0.1201, abs=1e-4)
    assert losses[1].item() == pytest.approx(math.log(2), abs=1e-6)
    plain = exit_head_losses(CLASSES, [first, last], labels, distill_weight=0.0, temperature=1.0)
    assert plain.tolist() == pytest.approx([ce_first, math.log(2)], abs=1e-6)


def test_the_teacher_gets_no_gradient_from_the_heads_below():
    last = torch.tensor([[0.3, -0.2]], requires_grad=True)
    first = torch.tensor([[1.0, 0.0]], requires_grad=True)
    exit_head_losses(CLASSES, [first, last], torch.tensor([1]), distill_weight=1.0 - 1e-6, temperature=2.0)[0].backward()
    assert last.grad is None or not last.grad.any()  # zero: the stack passes back nothing to the last layer's own loss
    assert first.grad is not None and first.grad.abs().sum() > 0
