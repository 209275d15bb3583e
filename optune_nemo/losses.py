"""Preference losses (SPEC.md, paper eqs. 1, 5, 6): pure tensor math, any device and dtype.

Inputs are 1-D tensors with one entry per pair: log-probabilities summed over the response tokens
only, and scalar rewards. With

    delta_w = log pi_theta(y_w|x) - log pi_ref(y_w|x)
    delta_l = log pi_theta(y_l|x) - log pi_ref(y_l|x)
    I       = sigmoid(beta1 * (delta_w - delta_l))
    W       = sigmoid(beta2 * (r_w - r_l))            (a constant: no gradient)

    L_wDPO = -mean(W * log I)        L_DPO = -mean(log I)

The `*_per_pair` forms return the unreduced per-pair losses, used where the mean must be taken
over a global batch split across micro-batches and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta1):
    delta_w = policy_chosen_logps - ref_chosen_logps
    delta_l = policy_rejected_logps - ref_rejected_logps
    return beta1 * (delta_w - delta_l)


def wdpo_weight(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *, beta2: float) -> torch.Tensor:
    """W = sigmoid(beta2 * (r_w - r_l)), detached: the weight carries no gradient."""
    return torch.sigmoid(beta2 * (chosen_rewards - rejected_rewards)).detach()


def wdpo_per_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_rewards, rejected_rewards, *, beta1: float, beta2: float):
    """Per-pair wDPO loss -W * log sigmoid(margin) and the per-pair (margin, weight)."""
    margin = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta1)
    weight = wdpo_weight(chosen_rewards, rejected_rewards, beta2=beta2).to(margin.dtype)
    return -weight * F.logsigmoid(margin), margin, weight


def dpo_per_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 *, beta1: float):
    """Per-pair DPO loss -log sigmoid(margin) and the per-pair margin."""
    margin = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta1)
    return -F.logsigmoid(margin), margin


def _metrics(loss, margin, weight) -> dict[str, float]:
    return {
        "loss": float(loss.detach()),
        "margin_mean": float(margin.detach().mean()),
        "implicit_reward_accuracy": float((margin.detach() > 0).to(torch.float64).mean()),
        "wdpo_weight_mean": float(weight.detach().to(torch.float64).mean()),
    }


def wdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              chosen_rewards, rejected_rewards, *, beta1: float, beta2: float):
    """L_wDPO = -mean(W * log sigmoid(beta1 * (delta_w - delta_l))). Returns (loss, metrics)."""
    per_pair, margin, weight = wdpo_per_pair(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_rewards, rejected_rewards, beta1=beta1, beta2=beta2)
    loss = per_pair.mean()
    return loss, _metrics(loss, margin, weight)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta1: float):
    """L_DPO = -mean(log sigmoid(beta1 * (delta_w - delta_l))). Returns (loss, metrics)."""
    per_pair, margin = dpo_per_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps, beta1=beta1)
    loss = per_pair.mean()
    return loss, _metrics(loss, margin, torch.ones_like(margin))


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor):
    """Reward-model loss -mean(log sigmoid(r_w - r_l)) (paper eq. 1). Returns (loss, metrics)."""
    diff = chosen_scores - rejected_scores
    loss = -F.logsigmoid(diff).mean()
    return loss, {"loss": float(loss.detach()),
                  "accuracy": float((diff.detach() > 0).to(torch.float64).mean())}
