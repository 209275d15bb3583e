"""Conservative DPO (label-smoothed DPO, Mitchell 2023, "A note on DPO with noisy preferences"): each
preference label is taken as flipped with probability eps = `loss.label_smoothing`,
L = mean[-(1 - eps) log sigmoid(m) - eps log sigmoid(-m)] with m = beta1 * (delta_w - delta_l).
eps = 0 is DPO; the loss is minimised at a finite margin m* = log((1 - eps) / eps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from optune_nemo.losses.base import LOSSES, LossOutput, PairTensors, preference_metrics
from optune_nemo.losses.dpo import implicit_margin


@LOSSES.register("cdpo")
@dataclass(frozen=True)
class ConservativeDPO:
    beta1: float
    label_smoothing: float

    @classmethod
    def from_config(cls, cfg) -> ConservativeDPO:
        return cls(beta1=cfg.beta1, label_smoothing=cfg.label_smoothing)

    def __call__(self, p: PairTensors) -> LossOutput:
        m = implicit_margin(p.policy_chosen_logps, p.policy_rejected_logps, p.ref_chosen_logps,
                            p.ref_rejected_logps, self.beta1)
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m), preference_metrics(m)
