"""The RL estimators equal torchtune's and TRL's on the same tensors, to 1e-6 (float64): KL estimators and the
KL-penalised reward, GAE, masked whitening, PPO's clipped policy and value losses, GRPO's loss; where neither
library has the function (TRL 1.16 dropped its PPO trainer), the test writes the paper's equation and names it."""

import math

import pytest
import torch

from megaloom.align import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    grpo_loss,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from tests.align_refs import torchtune, trl_grpo

TOL = {"rtol": 1e-6, "atol": 1e-6}
B, T = 5, 12


def _batch(seed):
    """Right-padded responses: a mask with ragged lengths (one of full length), and random per-token tensors."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T) < lengths.unsqueeze(1)

    def rand(scale=1.0):
        return torch.randn(B, T, generator=g, dtype=torch.float64) * scale

    return g, mask, rand


def test_kl_estimators():
    """k1 against torchtune's get_rewards_ppo (its `kl`); k3 against TRL's GRPO per-token KL (its `kl` metric, the
    masked mean); k2 and all three as Schulman, "Approximating KL Divergence" (2020) writes them, with r = π_ref/π:
    k1 = -log r, k2 = (log r)²/2, k3 = (r - 1) - log r; k1 and k3 average to the true KL over samples of π."""
    g, mask, rand = _batch(0)
    logp, ref = -rand().abs(), -rand().abs()
    _, kl, _ = torchtune().rewards.get_rewards_ppo(torch.zeros(B, dtype=torch.float64), logp, ref, kl_coeff=0.1)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), kl, **TOL)
    log_r = ref - logp
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), log_r ** 2 / 2, **TOL)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), (log_r.exp() - 1) - log_r, **TOL)
    _, metrics = trl_grpo(logp, logp, ref, torch.zeros(B, dtype=torch.float64), mask, "grpo", 0.04, 0.2, 0.2)
    assert masked_mean(kl_estimate(logp, ref, "k3"), mask).item() == pytest.approx(metrics["kl"], rel=1e-9)
    # the estimators' expectations under π: two categorical distributions, every token weighted by its probability
    p, q = torch.softmax(rand()[0], 0), torch.softmax(rand()[0], 0)
    true_kl = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):
        assert (p * kl_estimate(p.log(), q.log(), est)).sum().item() == pytest.approx(true_kl.item(), rel=1e-9)
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k4")


def test_kl_penalized_rewards_equal_torchtune():
    """torchtune's get_rewards_ppo with valid_score_idxs at each response's last token: -β·k1 everywhere, plus the
    score on the last token; ours is the same on the response and 0 on the padding."""
    g, mask, rand = _batch(1)
    logp, ref, scores = rand(), rand(), torch.randn(B, generator=g, dtype=torch.float64)
    ours, kl = kl_penalized_rewards(scores, logp, ref, 0.05, mask)
    theirs, tt_kl, _ = torchtune().rewards.get_rewards_ppo(scores, logp, ref, 0.05, mask.sum(1) - 1)
    torch.testing.assert_close(ours[mask], theirs[mask], **TOL)
    torch.testing.assert_close(kl[mask], tt_kl[mask], **TOL)
    assert (ours[~mask] == 0).all() and (kl[~mask] == 0).all()
    k3, _ = kl_penalized_rewards(scores, logp, ref, 0.05, mask, estimator="k3")
    inner = mask & torch.roll(mask, -1, dims=1)  # response tokens followed by another: no score added there
    inner[:, -1] = False
    torch.testing.assert_close(k3[inner], -0.05 * kl_estimate(logp, ref, "k3")[inner], **TOL)


def test_kl_controllers_follow_ziegler():
    """Ziegler et al. 2019, §2.2: e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2), β_{t+1} = β_t(1 + K_β e_t),
    with K_β = n_steps / horizon as TRL's AdaptiveKLController; the fixed controller never moves."""
    ctl, beta = AdaptiveKLController(0.2, target=6.0, horizon=10000), 0.2
    for kl, n in [(3.0, 256), (6.0, 256), (7.2, 512), (100.0, 256), (0.0, 1024)]:
        ctl.update(kl, n)
        beta = beta * (1 + max(-0.2, min(0.2, (kl - 6.0) / 6.0)) * n / 10000)
        assert ctl.value == pytest.approx(beta, rel=1e-12)
    assert ctl.value != 0.2
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_masked_statistics_equal_torchtune():
    """masked_mean / masked_var (unbiased) / whitening against torchtune's (copied from TRL's core.py); torchtune's
    `whiten` names shift_mean the other way round: its shift_mean=False is our (and TRL's) default centring."""
    g, mask, rand = _batch(2)
    x = rand(3) + 1.5
    tt = torchtune().rewards
    torch.testing.assert_close(masked_mean(x, mask), tt.masked_mean(x, mask), **TOL)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), tt.masked_mean(x, mask, dim=1), **TOL)
    torch.testing.assert_close(masked_var(x - masked_mean(x, mask), mask), tt.masked_var(x - tt.masked_mean(x, mask), mask),
                               **TOL)
    torch.testing.assert_close(masked_whiten(x, mask)[mask], tt.whiten(x, mask, shift_mean=False)[mask], **TOL)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False)[mask], tt.whiten(x, mask, shift_mean=True)[mask],
                               **TOL)
    torch.testing.assert_close(masked_whiten(x), tt.whiten(x, shift_mean=False), **TOL)
    white = masked_whiten(x, mask)
    assert (white[~mask] == 0).all()
    assert abs(masked_mean(white, mask).item()) < 1e-12
    assert masked_var(white, mask).item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_equals_torchtune(gamma, lam):
    """torchtune's estimate_advantages on right-padded responses (its recipe zeroes values and rewards on the
    padding): the returns it gives (advantages + values, before its whitening) equal ours, and so does its whitened
    advantage once ours is whitened the same way (torchtune's whiten adds the mean back)."""
    g, mask, rand = _batch(3)
    values, rewards = rand() * mask, rand(0.3) * mask
    adv, ret = gae(rewards, values, mask, gamma, lam)
    tt_adv, tt_ret = torchtune().rewards.estimate_advantages(values, rewards, gamma, lam, masks=mask)
    torch.testing.assert_close(ret[mask], tt_ret[mask], **TOL)
    torch.testing.assert_close(masked_whiten(adv, mask, shift_mean=False)[mask], tt_adv[mask], **TOL)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_skips_masked_tokens():
    """A response with holes (tokens the policy did not generate) gives, on its own tokens, the GAE of the same
    response without the holes: Schulman et al. 2016, eq. 16, A_t = Σ_l (γλ)^l δ_{t+l}, summed directly."""
    g, mask, rand = _batch(4)
    mask = mask & (torch.rand(B, T, generator=g) < 0.7)
    mask[:, 0] = True
    values, rewards = rand(), rand()
    gamma, lam = 0.97, 0.9
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        v, r = values[b][mask[b]], rewards[b][mask[b]]
        n = len(v)
        delta = r + gamma * torch.cat([v[1:], v.new_zeros(1)]) - v
        want = torch.stack([sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)])
        torch.testing.assert_close(adv[b][mask[b]], want, **TOL)
        torch.testing.assert_close(ret[b][mask[b]], want + v, **TOL)


@pytest.mark.parametrize("clip, value_clip", [(0.2, 0.2), (0.1, 0.5)])
def test_ppo_losses_equal_torchtune(clip, value_clip):
    """torchtune's PPOLoss: clipped policy loss, clipped value loss (½ max of the squared errors), clip fraction
    and the total policy + c·value, over masked tokens; with a gradient check on the policy log-probs. The
    approximate KL is ½·mean((log π - log π_old)²), OpenAI baselines ppo2's `approxkl`, written out."""
    g, mask, rand = _batch(5)
    old, adv = -rand().abs(), rand()
    logp = old + rand(0.3)  # ratios far enough from 1 that the clip binds on some tokens
    old_v, returns = rand(), rand()
    values = old_v + rand(0.5)
    ours_lp, tt_lp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    pol, metrics = ppo_policy_loss(ours_lp, old, adv, mask, clip=clip)
    val, vmetrics = ppo_value_loss(values, old_v, returns, mask, clip=value_clip)
    loss_fn = torchtune().PPOLoss(epsilon=clip, value_clip_range=value_clip, value_coeff=0.1)
    total, tt_pol, tt_val, _, tt_clipfrac = loss_fn(old, tt_lp, adv, old_v, values, returns, mask, mask)
    torch.testing.assert_close(pol, tt_pol, **TOL)
    torch.testing.assert_close(val, tt_val, **TOL)
    torch.testing.assert_close(pol + 0.1 * val, total, **TOL)
    torch.testing.assert_close(metrics["clip_fraction"], tt_clipfrac, **TOL)
    assert 0 < metrics["clip_fraction"] < 1 and 0 < vmetrics["value_clip_fraction"] < 1
    pol.backward()
    total.backward()
    torch.testing.assert_close(ours_lp.grad, tt_lp.grad, **TOL)
    diff = (logp - old)[mask]
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * (diff ** 2).mean().item(), rel=1e-12)
    unclipped, _ = ppo_value_loss(values, old_v, returns, mask, clip=None)
    torch.testing.assert_close(unclipped, 0.5 * ((values - returns) ** 2)[mask].mean(), **TOL)


@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "sequence"), ("bnpo", "token")])
@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_grpo_loss_equals_trl(loss_type, aggregation, beta, eps_high):
    """TRL's GRPOTrainer._compute_loss (loss_type "grpo": per-sequence means, "bnpo": per-token mean; β = 0 without a
    reference, β > 0 with k3; DAPO's clip-higher ε_high): loss, gradient and the clip-region fraction."""
    g, mask, rand = _batch(6)
    old = -rand().abs()
    logp = old + rand(0.3)
    ref = old + rand(0.2)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    ours_lp, trl_lp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ours, metrics = grpo_loss(ours_lp, adv, mask, old, ref if beta else None, beta, clip=0.2, clip_high=eps_high,
                              aggregation=aggregation)
    theirs, trl_metrics = trl_grpo(trl_lp, old, ref if beta else None, adv, mask, loss_type, beta, 0.2, eps_high)
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_lp.grad * mask, trl_lp.grad * mask, **TOL)
    assert metrics["clip_fraction"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"], abs=1e-6)  # TRL: fp32
    assert 0 < metrics["clip_fraction"] < 1
    if beta:
        assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"], rel=1e-9)


def test_grpo_on_policy_and_beta_without_reference():
    """π_old = π (detached) when no old log-probs are given: every ratio is 1, nothing clips, and the loss is
    -mean advantage (its gradient is the plain policy gradient); β > 0 without a reference is refused."""
    g, mask, rand = _batch(7)
    logp = -rand().abs()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    loss, metrics = grpo_loss(logp, adv, mask)
    torch.testing.assert_close(loss, -adv.mean(), **TOL)
    assert metrics["clip_fraction"] == 0 and "kl" not in metrics
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logp, adv, mask, beta=0.1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_follow_trl(scale):
    """DeepSeekMath §4.1.2 (outcome supervision): Â_i = (r_i - mean(r)) / std(r) within each group of samples of a
    prompt; TRL's scale_rewards "group" / "batch" / "none" and its 1e-4, with TRL's own nanstd (unbiased) as the
    std, written as TRL's _generate_and_score_completions does (inline there, not callable)."""
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(8)
    size = 4
    rewards = torch.randint(0, 3, (6 * size,), generator=g).double()
    rewards[:size] = 1.0  # a group whose samples all scored the same: advantages 0
    mean = rewards.view(-1, size).mean(dim=1).repeat_interleave(size)
    if scale == "group":
        want = (rewards - mean) / (nanstd(rewards.view(-1, size), dim=1).repeat_interleave(size) + 1e-4)
    elif scale == "batch":
        want = (rewards - mean) / (nanstd(rewards).expand_as(rewards) + 1e-4)
    else:
        want = rewards - mean
    got = group_advantages(rewards, size, scale)
    torch.testing.assert_close(got, want, **TOL)
    assert (got[:size] == 0).all()
    assert group_advantages(rewards, 1).abs().max() == 0  # one sample per prompt: nothing to compare it with
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards[:5], size)
    assert math.isfinite(got.abs().max().item())
