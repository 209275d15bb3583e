"""Preference losses behind one protocol (`PairLoss`), found by name in a registry (`loss.name`).

    from optune_nemo.losses import build_loss
    loss = build_loss(cfg.loss)            # wdpo | dpo | ipo | cdpo | any registered or `module:Class`
    per_pair_B, metrics = loss(pairs)      # metrics: {reported name: [B] per-pair values}

Each loss is one module of this package that defines a class decorated with `@LOSSES.register(name)`;
the registry imports every module here on its first look-up, so a new loss is one file (plus its test).
A loss kept outside the package is named by import path: `loss.name=my_package.my_module:MyLoss`.
The loss functions of each module (`dpo_loss`, `wdpo_loss`, the reward model's `bradley_terry_per_pair`)
are imported from that module.
"""

from __future__ import annotations

from optune_nemo.losses.base import LOSSES, LossOutput, PairLoss, PairTensors, build_loss, check

__all__ = ["LOSSES", "LossOutput", "PairLoss", "PairTensors", "build_loss", "check"]
