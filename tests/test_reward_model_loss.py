"""The Gaussian Bradley-Terry loss and pairwise accuracy (pure torch, no model)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spatialrl.reward.loss import gaussian_bt_loss, pairwise_accuracy


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pairs(mu_w, mu_l, log_sigma_w, log_sigma_l):
    return [
        torch.tensor(values, dtype=torch.float32, requires_grad=True)
        for values in (mu_w, log_sigma_w, mu_l, log_sigma_l)
    ]


def quadrature_loss(margin: float, std: float) -> float:
    """-E[log sigmoid(z)], z ~ N(margin, std^2), by Gauss-Hermite quadrature in float64."""
    nodes, weights = np.polynomial.hermite.hermgauss(120)
    z = margin + std * math.sqrt(2.0) * nodes
    return float(np.sum(weights * np.logaddexp(0.0, -z)) / math.sqrt(math.pi))


@pytest.mark.parametrize("mc_samples", [0, 1000])
def test_tiny_sigma_gives_plain_bradley_terry(mc_samples):
    mu_w, mu_l = torch.tensor([2.0, -1.0, 0.0, 0.3]), torch.tensor([0.5, 1.0, 0.0, 4.0])
    tiny = torch.full((4,), -30.0)
    loss = gaussian_bt_loss(mu_w, tiny, mu_l, tiny, mc_samples, seeded())
    expected = -F.logsigmoid(mu_w - mu_l).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("margin", "log_sigma"), [(0.0, 0.0), (1.5, -0.5), (-1.0, 0.7)])
def test_monte_carlo_matches_quadrature(margin, log_sigma):
    inputs = pairs([margin], [0.0], [log_sigma], [log_sigma])
    loss = gaussian_bt_loss(*inputs, mc_samples=200_000, generator=seeded())
    expected = quadrature_loss(margin, math.sqrt(2.0) * math.exp(log_sigma))
    assert loss.item() == pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize("mc_samples", [0, 1000])
def test_gradients_favour_the_preferred_image(mc_samples):
    mu_w, log_sigma_w, mu_l, log_sigma_l = pairs([0.2, -0.4], [0.1, 1.0], [0.0, -1.0], [0.3, 0.5])
    gaussian_bt_loss(mu_w, log_sigma_w, mu_l, log_sigma_l, mc_samples, seeded()).backward()
    assert (mu_w.grad < 0).all() and (mu_l.grad > 0).all()

    before = gaussian_bt_loss(mu_w, log_sigma_w, mu_l, log_sigma_l, mc_samples, seeded())
    after = gaussian_bt_loss(mu_w + 0.5, log_sigma_w, mu_l, log_sigma_l, mc_samples, seeded())
    assert after < before


def test_uncertainty_raises_the_loss():
    """-log sigmoid is convex, so spreading z (Jensen) never lowers -E[log sigmoid(z)]: the loss
    grows with sigma from the plain Bradley-Terry value, and the gradient on log-sigma is
    positive. (It does not tend to log 2: for huge sigma it grows like std / sqrt(2 pi).)"""
    margin = torch.tensor([1.0, -0.5])
    losses = [
        gaussian_bt_loss(margin, torch.full((2,), s), torch.zeros(2), torch.full((2,), s),
                         mc_samples=20_000, generator=seeded()).item()
        for s in (-20.0, -1.0, 0.0, 1.0, 3.0)
    ]
    assert losses == sorted(losses)
    assert losses[0] == pytest.approx(-F.logsigmoid(margin).mean().item(), abs=1e-6)
    huge_std = math.sqrt(2.0) * math.exp(3.0)
    assert losses[-1] == pytest.approx(huge_std / math.sqrt(2 * math.pi), rel=0.05)

    mu_w, log_sigma_w, mu_l, log_sigma_l = pairs([0.0], [0.0], [0.0], [0.0])
    gaussian_bt_loss(mu_w, log_sigma_w, mu_l, log_sigma_l, 1000, seeded()).backward()
    assert log_sigma_w.grad.item() > 0 and log_sigma_l.grad.item() > 0


@pytest.mark.parametrize("mc_samples", [0, 1000])
def test_finite_for_extreme_values(mc_samples):
    mu_w, log_sigma_w, mu_l, log_sigma_l = pairs(
        [1e6, -1e6, 0.0, 50.0], [1e3, -1e3, 80.0, -80.0], [-1e6, 1e6, 0.0, -50.0],
        [1e3, -1e3, -1e3, 1e3],
    )
    loss = gaussian_bt_loss(mu_w, log_sigma_w, mu_l, log_sigma_l, mc_samples, seeded())
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(mu_w.grad).all() and torch.isfinite(mu_l.grad).all()
    if mc_samples:
        assert torch.isfinite(log_sigma_w.grad).all() and torch.isfinite(log_sigma_l.grad).all()


def test_generator_makes_it_reproducible_and_noise_is_fp32():
    args = [torch.randn(8, generator=seeded(s)) for s in range(4)]
    first = gaussian_bt_loss(*args, mc_samples=50, generator=seeded(7))
    assert torch.equal(first, gaussian_bt_loss(*args, mc_samples=50, generator=seeded(7)))
    assert not torch.equal(first, gaussian_bt_loss(*args, mc_samples=50, generator=seeded(8)))
    # Half-precision head outputs give the fp32 loss of their upcast values.
    halves = [a.to(torch.bfloat16) for a in args]
    low = gaussian_bt_loss(*halves, mc_samples=50, generator=seeded(7))
    assert low.dtype == torch.float32
    assert torch.equal(low, gaussian_bt_loss(*[h.float() for h in halves], 50, seeded(7)))


def test_negative_sample_count_is_rejected():
    args = [torch.zeros(2)] * 4
    with pytest.raises(ValueError, match="mc_samples"):
        gaussian_bt_loss(*args, mc_samples=-1)


def test_pairwise_accuracy_counts_ties_as_half():
    mu_w = torch.tensor([1.0, 0.0, 2.0, 5.0])
    mu_l = torch.tensor([0.0, 1.0, 2.0, -5.0])
    assert pairwise_accuracy(mu_w, mu_l).item() == pytest.approx(2.5 / 4)
