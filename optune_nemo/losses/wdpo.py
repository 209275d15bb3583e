"""wDPO (paper eq. 6): L = -mean W * log sigmoid(beta1 * (delta_w - delta_l)) with the reward-gap weight
W = sigmoid(beta2 * (r_w - r_l)), a constant (no gradient) in [0.5, 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optune_nemo.losses.base import LOSSES, LossOutput, PairTensors, preference_metrics
from optune_nemo.losses.dpo import implicit_margin


def wdpo_weight(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *, beta2: float) -> torch.Tensor:
    """W = sigmoid(beta2 * (r_w - r_l)), detached: the weight carries no gradient."""
    return torch.sigmoid(beta2 * (chosen_rewards - rejected_rewards)).detach()


def wdpo_per_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_rewards, rejected_rewards, *, beta1: float, beta2: float):
    """Per-pair wDPO loss -W * log sigmoid(margin) and the per-pair (margin, weight)."""
    margin = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             beta1)
    weight = wdpo_weight(chosen_rewards, rejected_rewards, beta2=beta2).to(margin.dtype)
    return -weight * F.logsigmoid(margin), margin, weight


def wdpo_metrics(margin: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The DPO family's per-pair metrics and the pair's weight W in the loss (reported as its mean,
    `wdpo_weight_mean`)."""
    return {**preference_metrics(margin), "wdpo_weight_mean": weight.detach().to(margin.dtype)}


def wdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              chosen_rewards, rejected_rewards, *, beta1: float, beta2: float):
    """L_wDPO = -mean(W * log sigmoid(beta1 * (delta_w - delta_l))). Returns (loss, metrics)."""
    per_pair, margin, weight = wdpo_per_pair(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_rewards, rejected_rewards, beta1=beta1, beta2=beta2)
    loss = per_pair.mean()
    return loss, {"loss": float(loss.detach()), **{k: float(v.double().mean())
                                                   for k, v in wdpo_metrics(margin, weight).items()}}


@LOSSES.register("wdpo")
@dataclass(frozen=True)
class WDPO:
    beta1: float
    beta2: float

    @classmethod
    def from_config(cls, cfg) -> WDPO:
        return cls(beta1=cfg.beta1, beta2=cfg.beta2)

    def __call__(self, p: PairTensors) -> LossOutput:
        per_pair, margin, weight = wdpo_per_pair(
            p.policy_chosen_logps, p.policy_rejected_logps, p.ref_chosen_logps, p.ref_rejected_logps,
            p.chosen_rewards, p.rejected_rewards, beta1=self.beta1, beta2=self.beta2)
        return per_pair, wdpo_metrics(margin, weight)
