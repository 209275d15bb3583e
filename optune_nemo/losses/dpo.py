"""DPO (paper eq. 5): L = -mean log sigmoid(beta1 * (delta_w - delta_l)), where
delta = log pi_theta(y|x) - log pi_ref(y|x) summed over the response tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optune_nemo.losses.base import LOSSES, LossOutput, PairTensors, preference_metrics


def implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta1: float) -> torch.Tensor:
    """beta1 * (delta_w - delta_l), per pair."""
    return beta1 * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))


def dpo_per_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 *, beta1: float):
    """Per-pair DPO loss -log sigmoid(margin) and the per-pair margin."""
    margin = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             beta1)
    return -F.logsigmoid(margin), margin


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta1: float):
    """L_DPO = -mean(log sigmoid(beta1 * (delta_w - delta_l))). Returns (loss, metrics)."""
    per_pair, margin = dpo_per_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps, beta1=beta1)
    loss = per_pair.mean()
    return loss, {"loss": float(loss.detach()), **{k: float(v.double().mean())
                                                   for k, v in preference_metrics(margin).items()}}


@LOSSES.register("dpo")
@dataclass(frozen=True)
class DPO:
    beta1: float

    @classmethod
    def from_config(cls, cfg) -> DPO:
        return cls(beta1=cfg.beta1)

    def __call__(self, p: PairTensors) -> LossOutput:
        per_pair, margin = dpo_per_pair(p.policy_chosen_logps, p.policy_rejected_logps, p.ref_chosen_logps,
                                        p.ref_rejected_logps, beta1=self.beta1)
        return per_pair, preference_metrics(margin)
