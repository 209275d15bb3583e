"""Bradley-Terry reward-model loss (paper eq. 1): L = -mean log sigmoid(r_theta(x, y_w) - r_theta(x, y_l))."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_per_pair(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                           margin: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(r_w - r_l - margin) per pair; `margin` (optional, per pair) asks the chosen score to
    lead by at least that much (Llama 2's margin loss); None or 0 is the paper's eq. 1."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor):
    """Reward-model loss -mean(log sigmoid(r_w - r_l)) (paper eq. 1). Returns (loss, metrics)."""
    loss = bradley_terry_per_pair(chosen_scores, rejected_scores).mean()
    diff = (chosen_scores - rejected_scores).detach()
    return loss, {"loss": float(loss.detach()), "accuracy": float((diff > 0).to(torch.float64).mean())}
