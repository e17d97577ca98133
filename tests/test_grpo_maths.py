import math

import pytest
import torch

from spatialrl.config import GRPOConfig
from spatialrl.grpo.advantages import compute_advantages, select_top_bottom, win_probability
from spatialrl.grpo.loss import clipped_surrogate, sample_train_steps


def cfg(**kw):
    base = dict(group_size=6, top_k=2, adv_clip=None, adv_eps=1e-8)
    base.update(kw)
    return GRPOConfig(**base)


def test_top_bottom_picks_extremes_of_a_hand_made_group():
    rewards = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.2])
    mask = select_top_bottom(rewards, 2)
    assert mask.tolist() == [False, True, True, True, False, True]


def test_top_bottom_keeps_everything_when_group_is_small():
    assert select_top_bottom(torch.tensor([1.0, 2.0, 3.0]), 2).all()
    assert select_top_bottom(torch.tensor([1.0, 2.0, 3.0]), None).all()


def test_select_then_normalize_uses_kept_samples_only():
    rewards = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.2, 5.0, 5.0, 1.0, 1.0, 3.0, 3.0])
    groups = torch.tensor([0] * 6 + [1] * 6)
    out = compute_advantages(rewards, groups, cfg())
    kept0 = torch.tensor([0.9, 0.1, 0.7, 0.2])
    expected = (kept0 - kept0.mean()) / kept0.std(unbiased=False)
    assert torch.allclose(out.advantages[[1, 2, 3, 5]], expected, atol=1e-5)
    assert out.advantages[[0, 4]].tolist() == [0.0, 0.0]
    assert out.kept.sum() == 8 and out.kept_fraction == pytest.approx(8 / 12)
    # Group 1 kept {5, 5, 1, 1}: mean 3, std 2.
    assert out.advantages[6].item() == pytest.approx(1.0, abs=1e-5)
    assert out.advantages[8].item() == pytest.approx(-1.0, abs=1e-5)


def test_normalize_then_select_uses_whole_group_statistics():
    rewards = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.2])
    out = compute_advantages(rewards, torch.zeros(6, dtype=torch.long),
                             cfg(filter_order="normalize_then_select"))
    expected = (rewards - rewards.mean()) / rewards.std(unbiased=False)
    assert torch.allclose(out.advantages[out.kept], expected[out.kept], atol=1e-5)
    assert out.kept.tolist() == [False, True, True, True, False, True]


def test_global_std_shares_one_scale_across_groups():
    rewards = torch.tensor([0.0, 1.0, 0.0, 10.0])
    groups = torch.tensor([0, 0, 1, 1])
    out = compute_advantages(rewards, groups, cfg(group_size=2, top_k=None, std_scope="global"))
    scale = rewards.std(unbiased=False)
    assert out.advantages[1].item() == pytest.approx(0.5 / scale.item(), rel=1e-5)
    assert out.advantages[3].item() == pytest.approx(5.0 / scale.item(), rel=1e-5)


def test_nonfinite_reward_drops_its_whole_group_and_counts_it():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 2.0, 1.0, float("inf")])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    out = compute_advantages(rewards, groups, cfg(group_size=2, top_k=None))
    assert out.dropped_nonfinite_groups == 2
    assert out.kept.tolist() == [False, False, True, True, False, False]
    assert torch.isfinite(out.advantages).all()


def test_advantage_clipping_and_zero_std_groups():
    rewards = torch.tensor([0.0, 0.0, 0.0, 100.0, 3.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    out = compute_advantages(rewards, groups, cfg(group_size=2, top_k=None, adv_clip=1.5))
    assert out.advantages.max().item() == pytest.approx(1.5)
    assert out.zero_std_groups == 1
    assert out.advantages[4:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("value", [0.3, 2 / 3, 3.7])
@pytest.mark.parametrize("std_scope", ["group", "global"])
def test_groups_of_equal_rewards_get_exactly_zero_advantages(value, std_scope):
    # 24 copies of a value float32 cannot represent: the group mean is a rounding step off.
    rewards = torch.cat([torch.full((24,), value), torch.tensor([0.0, 1.0, 0.5, 0.2])])
    groups = torch.cat([torch.zeros(24, dtype=torch.long), torch.ones(4, dtype=torch.long)])
    for top_k in (None, 6):
        out = compute_advantages(
            rewards, groups, cfg(group_size=24, top_k=top_k, std_scope=std_scope)
        )
        assert out.advantages[:24].abs().max().item() == 0.0
        assert out.zero_std_groups == 1
        assert out.advantages[24:].abs().max().item() > 0.1  # the other group still learns


def test_surrogate_is_minus_advantage_at_ratio_one_and_clips():
    logp = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0])
    terms = clipped_surrogate(logp, torch.zeros(4), adv, clip_range=0.2)
    assert terms.policy_loss.item() == pytest.approx(-adv.mean().item())
    assert terms.ratio_mean.item() == 1.0 and terms.clip_fraction.item() == 0.0
    terms.loss.backward()
    # Descending the loss raises the log-prob of positive-advantage samples.
    assert torch.allclose(logp.grad, -adv / 4)

    far = torch.tensor([1.0, 1.0])  # ratio e beyond 1 + clip: positive advantage is clipped
    clipped = clipped_surrogate(far.requires_grad_(), torch.zeros(2), torch.tensor([1.0, -1.0]),
                                clip_range=0.2)
    assert clipped.clip_fraction.item() == 1.0
    clipped.loss.backward()
    assert far.grad[0].item() == 0.0 and far.grad[1].item() > 0


def test_kl_term_is_added_with_its_weight():
    terms = clipped_surrogate(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1,
                              kl=torch.tensor([0.5, 1.5]), kl_beta=0.1)
    assert terms.loss.item() == pytest.approx(0.1)
    assert terms.kl.item() == pytest.approx(1.0)


def test_train_step_subsampling_stays_inside_the_sde_window():
    mask = torch.tensor([False, True, True, True, True, False])
    steps = sample_train_steps(mask, 0.5, torch.Generator().manual_seed(0))
    assert len(steps) == 2 and all(1 <= s <= 4 for s in steps) and steps == sorted(steps)
    assert sample_train_steps(mask, 1.0, torch.Generator()) == [1, 2, 3, 4]
    assert len(sample_train_steps(mask, 0.01, torch.Generator())) == math.ceil(0.01 * 4)
    with pytest.raises(ValueError, match="no SDE steps"):
        sample_train_steps(torch.zeros(3, dtype=torch.bool), 1.0, torch.Generator())


def test_win_probability_of_a_hand_made_group():
    mu = torch.tensor([1.0, 0.0, 0.0])
    sigma = torch.tensor([0.0, 1.0, 0.0])
    wins = win_probability(mu, sigma)
    phi_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # P(1 > N(0, 1))
    # sample 0 beats sample 1 with Phi(1) and sample 2 for sure; 1 vs 2 is a coin flip.
    assert wins.tolist() == pytest.approx([(phi_1 + 1) / 2, (1 - phi_1 + 0.5) / 2, 0.25])
    assert float(wins.sum()) == pytest.approx(len(mu) / 2)  # every pair shares one win


def test_win_probability_shrinks_towards_a_coin_flip_as_sigma_grows():
    mu = torch.tensor([2.0, 0.0])
    sure = win_probability(mu, torch.tensor([0.1, 0.1]))
    unsure = win_probability(mu, torch.tensor([10.0, 10.0]))
    assert sure[0] > unsure[0] > 0.5 > unsure[1] > sure[1]


def test_win_probability_advantages_follow_the_uncertainty():
    # The same uneven mu in both groups. A sure reward model (sigma 0) makes the advantages
    # those of the ranks; a very unsure one makes win rates nearly linear in mu, so the
    # advantages approach plain GRPO's.
    mu = torch.tensor([0.0, 1.0, 3.0, 0.0, 1.0, 3.0])
    sigma = torch.tensor([0.0, 0.0, 0.0, 50.0, 50.0, 50.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    config = cfg(group_size=3, top_k=None, group_reward="win_probability")
    out = compute_advantages(mu, groups, config, sigma)
    plain = compute_advantages(mu, groups, cfg(group_size=3, top_k=None))
    ranks = compute_advantages(torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3), cfg(
        group_size=3, top_k=None))
    assert torch.allclose(out.advantages[:3], ranks.advantages, atol=1e-5)
    assert torch.allclose(out.advantages[3:], plain.advantages[3:], atol=1e-2)
    assert not torch.allclose(out.advantages[:3], plain.advantages[:3], atol=1e-2)


def test_win_probability_needs_sigmas_and_drops_a_nan_sigma_group():
    mu = torch.tensor([0.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    config = cfg(group_size=2, top_k=None, group_reward="win_probability")
    with pytest.raises(ValueError, match="sigma"):
        compute_advantages(mu, groups, config)
    out = compute_advantages(mu, groups, config, torch.tensor([0.1, 0.1, float("nan"), 0.1]))
    assert out.dropped_nonfinite_groups == 1
    assert out.advantages[2:].tolist() == [0.0, 0.0]
    assert out.advantages[1] > 0 > out.advantages[0]
