"""DPO / cDPO / IPO / hinge / SimPO and the reward model's loss equal TRL's (and torchtune's) on the same tensors,
loss, gradient and metrics, to 1e-6 (float64 inputs: the comparison sees the formulas, not rounding)."""

import pytest
import torch

from megaloom.align import dpo_loss, reward_loss, sequence_logprobs
from tests.align_refs import torchtune, trl_cpo, trl_dpo, trl_reward

TOL = {"rtol": 1e-6, "atol": 1e-6}
B, T = 6, 9


def _pairs(seed=0):
    """Per-token policy log-probs (2B, T) of [chosen; rejected] with ragged lengths, their targets (-100 off the
    response), and reference sequence log-probs (B,)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(1)
    per_token = (-3 * torch.rand(2 * B, T, generator=g, dtype=torch.float64)) * mask
    targets = torch.where(mask, 1, -100)
    ref = -3 * T / 2 * torch.rand(2, B, generator=g, dtype=torch.float64)
    return per_token, mask, targets, ref[0], ref[1]


def _ours(per_token, targets, ref_c, ref_r, **kw):
    seq = sequence_logprobs(per_token, targets)
    c, r = seq.sum.chunk(2)
    nc, nr = seq.tokens.chunk(2)
    if kw.get("loss") == "simpo":
        return dpo_loss(c, r, chosen_tokens=nc, rejected_tokens=nr, **kw)
    return dpo_loss(c, r, ref_c, ref_r, chosen_tokens=nc, rejected_tokens=nr, **kw)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_losses_equal_trl_dpo_trainer(loss, beta):
    """TRL's DPOTrainer._compute_loss (loss_type sigmoid / ipo / hinge): loss, its gradient with respect to the
    per-token log-probs, and the rewards metrics (TRL's `rewards/accuracies`, `rewards/margins` are ours without
    the plural)."""
    per_token, mask, targets, ref_c, ref_r = _pairs(1)
    ours_in = per_token.clone().requires_grad_()
    theirs_in = per_token.clone().requires_grad_()
    ours, metrics = _ours(ours_in, targets, ref_c, ref_r, loss=loss, beta=beta)
    theirs, trl_metrics = trl_dpo(theirs_in, mask, ref_c, ref_r, loss, beta)
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.backward()
    theirs.backward()
    # TRL's fused head returns 0, with no gradient, for the -100 labels its sum runs over; ours masks them
    torch.testing.assert_close(ours_in.grad[mask], theirs_in.grad[mask], **TOL)
    assert (ours_in.grad[~mask] == 0).all()
    for key, trl_key in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")]:
        assert metrics[key].item() == pytest.approx(trl_metrics[trl_key], rel=1e-6, abs=1e-6), key
    assert 0 < metrics["rewards/accuracy"] < 1  # the data exercises both outcomes


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_cdpo_equals_torchtune_and_trl(label_smoothing):
    """Conservative DPO (label_smoothing ε): torchtune's DPOLoss, and TRL's CPOTrainer.cpo_loss with loss_type
    "sigmoid" given the log-ratios (its logits are chosen - rejected, smoothed the same way)."""
    per_token, _, targets, ref_c, ref_r = _pairs(2)
    seq = sequence_logprobs(per_token, targets).sum
    c, r = seq.chunk(2)
    ours, metrics = dpo_loss(c, r, ref_c, ref_r, beta=0.2, label_smoothing=label_smoothing)
    losses, chosen_rewards, rejected_rewards = torchtune().DPOLoss(beta=0.2, label_smoothing=label_smoothing)(
        c, r, ref_c, ref_r)
    torch.testing.assert_close(ours, losses.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean(), **TOL)
    trl_losses, _, _ = trl_cpo(c - ref_c, r - ref_r, "sigmoid", beta=0.2, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, trl_losses.mean(), **TOL)


def test_hinge_equals_torchtune_rso():
    per_token, _, targets, ref_c, ref_r = _pairs(3)
    c, r = sequence_logprobs(per_token, targets).sum.chunk(2)
    ours, _ = dpo_loss(c, r, ref_c, ref_r, loss="hinge", beta=0.5)
    losses, _, _ = torchtune().RSOLoss(gamma=0.5)(c, r, ref_c, ref_r)
    torch.testing.assert_close(ours, losses.mean(), **TOL)
    assert (losses > 0).any() and (losses == 0).any()  # both sides of the hinge are exercised


@pytest.mark.parametrize("gamma, label_smoothing", [(0.5, 0.0), (1.4, 0.0), (0.5, 0.2)])
def test_simpo_equals_trl_cpo_trainer(gamma, label_smoothing):
    """SimPO: TRL's CPOTrainer.cpo_loss (loss_type "simpo", the length-averaged log-probs its concatenated_forward
    passes for simpo), loss and rewards (β times the averaged log-probs)."""
    per_token, _, targets, _, _ = _pairs(4)
    ours, metrics = _ours(per_token, targets, None, None, loss="simpo", beta=2.0, simpo_gamma=gamma,
                          label_smoothing=label_smoothing)
    mean = sequence_logprobs(per_token, targets).mean
    losses, chosen_rewards, rejected_rewards = trl_cpo(*mean.chunk(2), "simpo", beta=2.0,
                                                       label_smoothing=label_smoothing, simpo_gamma=gamma)
    torch.testing.assert_close(ours, losses.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/margin"], (chosen_rewards - rejected_rewards).mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/accuracy"], (chosen_rewards > rejected_rewards).double().mean())


def test_dpo_refuses_what_it_cannot_compute():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="one of sigmoid"):
        dpo_loss(x, x, x, x, loss="kto")
    with pytest.raises(ValueError, match="length-normalised"):
        dpo_loss(x, x, x, x, loss="ipo")
    with pytest.raises(ValueError, match="no reference"):
        dpo_loss(x, x, x, x, loss="simpo", chosen_tokens=x, rejected_tokens=x)
    with pytest.raises(ValueError, match="reference model's log-probabilities"):
        dpo_loss(x, x)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss="hinge", label_smoothing=0.1)


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (False, 0.01), (True, 0.3)])
def test_reward_loss_equals_trl_reward_trainer(margin, center):
    """TRL's RewardTrainer.compute_loss: Bradley-Terry with the optional margin and centring term; gradient with
    respect to the scores; accuracy and margin metrics."""
    g = torch.Generator().manual_seed(5)
    chosen, rejected = torch.randn(2, 16, generator=g, dtype=torch.float64) * 2
    m = torch.rand(16, generator=g, dtype=torch.float64) if margin else None
    ours_c, ours_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    trl_c, trl_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    ours, metrics = reward_loss(ours_c, ours_r, m, center)
    theirs, trl_metrics = trl_reward(trl_c, trl_r, m, center)
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_c.grad, trl_c.grad, **TOL)
    torch.testing.assert_close(ours_r.grad, trl_r.grad, **TOL)
    assert metrics["accuracy"].item() == pytest.approx(trl_metrics["accuracy"], abs=1e-6)
    assert metrics["margin"].item() == pytest.approx(trl_metrics["margin"], abs=1e-6)
