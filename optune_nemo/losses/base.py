"""The loss protocol and its registry.

A preference loss sees one micro-batch of pairs as `PairTensors` (per-pair [B] tensors: the policy's
summed response log-probs, the reference's, the rewards) and returns the per-pair loss [B] and a dict
of per-pair metrics {name: [B]}. The policy takes the mean of the loss over the real pairs of a global
batch (micro-batches and data-parallel ranks included) and reports the mean of every metric over the
same pairs, without knowing the metrics' names. Losses are pure tensor math: any device, any dtype.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from optune_nemo.config import ConfigError, LossConfig


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
"""(per-pair loss [B], {metric name: per-pair values [B]})."""


class PairLoss(Protocol):
    name: str

    def __call__(self, pairs: PairTensors) -> LossOutput:
        ...


_REGISTRY: dict[str, Callable[[LossConfig], PairLoss]] = {}


def register_loss(name: str):
    """Class decorator: `@register_loss("ipo")` makes `loss.name=ipo` build `cls.from_config(cfg.loss)`."""
    def decorate(cls):
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls.from_config
        return cls
    return decorate


def loss_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _import_path(name: str):
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"loss.name: cannot import {name!r} ({e})") from None


def build_loss(cfg: LossConfig) -> PairLoss:
    """The loss `loss.name` names: a registered name, or `module:Class` (a class with `from_config`)."""
    if ":" in cfg.name:
        return _import_path(cfg.name).from_config(cfg)
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"loss.name: must be one of {', '.join(loss_names())} or module:Class (got {cfg.name!r})")
    return _REGISTRY[cfg.name](cfg)


def preference_metrics(margin: torch.Tensor, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The per-pair metrics every DPO-family loss reports: the margin beta1 * (delta_w - delta_l), whether
    the implicit reward prefers the chosen response, and the pair's weight in the loss (when it has one)."""
    m = margin.detach()
    out = {"margin_mean": m, "implicit_reward_accuracy": (m > 0).to(m.dtype)}
    if weight is not None:
        out["wdpo_weight_mean"] = weight.detach().to(m.dtype)
    return out
