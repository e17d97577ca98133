"""SpatialScore's preference loss: Bradley-Terry on Gaussian scores, in fp32.

Each image's score is s ~ N(mu, sigma^2), so for a pair the margin is
z = s_w - s_l ~ N(mu_w - mu_l, sigma_w^2 + sigma_l^2), and L = -E[log sigmoid(z)], estimated
with M reparameterised samples z = margin + std * eps (gradients reach mu and sigma).
M = 0 is plain Bradley-Terry on mu: -log sigmoid(mu_w - mu_l).

Note that -log sigmoid is convex, so by Jensen the expectation is never below the M = 0 loss
and grows with sigma: this loss always pulls sigma down, harder on pairs near the decision
boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# exp(+-20) spans every meaningful scale of a logit margin; the clamp keeps sigma^2 finite in
# fp32 for any head output (the loss is flat in sigma far beyond either end anyway).
LOG_SIGMA_LIMIT = 20.0


def gaussian_bt_loss(
    mu_w: torch.Tensor,
    log_sigma_w: torch.Tensor,
    mu_l: torch.Tensor,
    log_sigma_l: torch.Tensor,
    mc_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean over pairs of -E[log sigmoid(z)]; all inputs are [N], `w` preferred over `l`.

    The noise is drawn in fp32 from `generator` (on its device) or the global generator.
    """
    if mc_samples < 0:
        raise ValueError(f"mc_samples: must be >= 0, got {mc_samples}")
    margin = mu_w.float() - mu_l.float()
    if mc_samples == 0:
        return -F.logsigmoid(margin).mean()
    sigma_w, sigma_l = (
        log_sigma.float().clamp(-LOG_SIGMA_LIMIT, LOG_SIGMA_LIMIT).exp()
        for log_sigma in (log_sigma_w, log_sigma_l)
    )
    std = torch.hypot(sigma_w, sigma_l)
    noise = torch.randn(
        (mc_samples, *margin.shape),
        generator=generator,
        dtype=torch.float32,
        device=generator.device if generator is not None else margin.device,
    ).to(margin.device)
    return -F.logsigmoid(margin + std * noise).mean()


def pair_wins(score_w: torch.Tensor, score_l: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if ranked correctly, 0 if not, and 0.5 for a tie, as a coin flip would."""
    return (score_w > score_l).float() + 0.5 * (score_w == score_l).float()


def pairwise_accuracy(mu_w: torch.Tensor, mu_l: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly; a tie counts as half."""
    return pair_wins(mu_w, mu_l).mean()
