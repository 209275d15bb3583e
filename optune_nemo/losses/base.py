"""The loss protocol and its registry.

A preference loss sees one micro-batch of pairs as `PairTensors` (per-pair [B] tensors: the policy's
summed response log-probs, the reference's, the rewards) and returns the per-pair loss [B] and a dict
of per-pair metrics {name: [B]}. The policy takes the mean of the loss over the real pairs of a global
batch (micro-batches and data-parallel ranks included) and reports the mean of every metric over the
same pairs, without knowing the metrics' names. Losses are pure tensor math: any device, any dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from optune_nemo.config import LossConfig
from optune_nemo.registry import Registry


@dataclass
class PairTensors:
    """One micro-batch of preference pairs, all [B] tensors on the same device. Log-probs are summed
    over the response tokens only; the reference is the policy at the start of the iteration."""

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]
"""(per-pair loss [B], {reported metric name: per-pair values [B]}). A metric's name is the name of what the
policy reports, the mean of the per-pair values over the batch's pairs (it lands in metrics.jsonl under
that name): hence `margin_mean` for per-pair margins."""


class PairLoss(Protocol):
    def __call__(self, pairs: PairTensors) -> LossOutput:
        ...


LOSSES: Registry[type] = Registry("loss.name", "optune_nemo.losses", outside="module:Class")
"""`@LOSSES.register("name")` on a class with `from_config(cfg: LossConfig)` and `__call__(PairTensors)`."""


def check(cfg: LossConfig) -> None:
    """The family's check of the `loss` section: `loss.name` is a registered loss (a `module:Class` is
    imported when the loss is built). ConfigError naming loss.name and the registered names."""
    LOSSES.check(cfg.name)


def build_loss(cfg: LossConfig) -> PairLoss:
    """The loss `loss.name` names: a registered name, or `module:Class` (a class with `from_config`)."""
    return LOSSES.get(cfg.name).from_config(cfg)


def preference_metrics(margin: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-pair metrics every DPO-family loss reports: the margin beta1 * (delta_w - delta_l) (reported
    as its mean, `margin_mean`) and whether the implicit reward prefers the chosen response (reported as the
    fraction that does, `implicit_reward_accuracy`). A loss adds its own (wDPO: its weight)."""
    m = margin.detach()
    return {"margin_mean": m, "implicit_reward_accuracy": (m > 0).to(m.dtype)}
