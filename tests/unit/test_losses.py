"""DPO-Positive's term and loss (caspo.core.losses) against values worked out by hand."""

import math

import torch

from caspo.core.losses import dpop_loss, dpop_penalty


def test_penalty_is_zero_above_the_reference_and_linear_below():
    ratio = torch.tensor([2.0, 0.0, -0.5, -3.0])  # log pi(y_w) - log pi_ref(y_w)
    assert dpop_penalty(ratio, 50.0).tolist() == [0.0, 0.0, 25.0, 150.0]
    assert dpop_penalty(ratio, 0.0).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_loss_is_sigmoid_dpo_when_the_chosen_step_rises():
    chosen, rejected = torch.tensor([1.0]), torch.tensor([-1.0])
    expected = -math.log(1 / (1 + math.exp(-0.1 * 2.0)))
    assert dpop_loss(chosen, rejected, 0.1, 50.0).item() == torch.tensor(expected).item()
    assert dpop_loss(chosen, rejected, 0.1, 0.0).item() == dpop_loss(chosen, rejected, 0.1, 50.0).item()


def test_loss_punishes_a_margin_bought_by_lowering_the_chosen_step():
    # the same margin (2 nats) two ways: chosen up / rejected down, or both down (likelihood displacement)
    honest = dpop_loss(torch.tensor([1.0]), torch.tensor([-1.0]), 0.1, 50.0).item()
    displaced = dpop_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), 0.1, 50.0).item()
    plain = dpop_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), 0.1, 0.0).item()
    assert plain == honest  # sigmoid DPO sees only the margin
    # with the penalty: -log sigmoid(0.1 * (2 - 50)) = log(1 + e^4.8)
    assert displaced > honest and abs(displaced - math.log(1 + math.exp(4.8))) < 1e-5


def test_gradient_pushes_the_chosen_log_prob_up_below_the_reference():
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-3.0], requires_grad=True)
    dpop_loss(chosen, rejected, 0.1, 50.0).sum().backward()
    with_penalty = -chosen.grad.item()
    chosen2 = torch.tensor([-1.0], requires_grad=True)
    dpop_loss(chosen2, torch.tensor([-3.0]), 0.1, 0.0).sum().backward()
    assert with_penalty > 10 * -chosen2.grad.item() > 0
