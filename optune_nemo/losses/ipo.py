"""IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences"): a squared loss that pulls the log-ratio gap h = delta_w - delta_l to 1 / (2 tau),
L = mean (h - 1 / (2 tau))^2, with tau = `loss.beta1`. Unlike DPO it does not push h to infinity on
deterministic preferences. The reported margin is tau * h, comparable to DPO's beta1 * h."""

from __future__ import annotations

from dataclasses import dataclass

from optune_nemo.losses.base import LOSSES, LossOutput, PairTensors, preference_metrics


@LOSSES.register("ipo")
@dataclass(frozen=True)
class IPO:
    tau: float

    @classmethod
    def from_config(cls, cfg) -> IPO:
        return cls(tau=cfg.beta1)

    def __call__(self, p: PairTensors) -> LossOutput:
        h = (p.policy_chosen_logps - p.ref_chosen_logps) - (p.policy_rejected_logps - p.ref_rejected_logps)
        return (h - 1.0 / (2.0 * self.tau)) ** 2, preference_metrics(self.tau * h)
