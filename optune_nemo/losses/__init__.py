"""Preference losses behind one protocol (`PairLoss`), found by name in a registry (`loss.name`).

    from optune_nemo.losses import build_loss
    loss = build_loss(cfg.loss)            # wdpo | dpo | ipo | cdpo | any registered or `module:Class`
    per_pair_B, metrics = loss(pairs)      # metrics: {name: [B] per-pair values}

Each loss is one module of this package that defines a class decorated with `@register_loss(name)`;
every module here is imported when the package is, so a new loss is one file (plus its test). A loss
kept outside the package is named by import path: `loss.name=my_package.my_module:MyLoss`.
"""

from __future__ import annotations

import importlib
import pkgutil

from optune_nemo.losses.base import (
    LossOutput,
    PairLoss,
    PairTensors,
    build_loss,
    loss_names,
    register_loss,
)
from optune_nemo.losses.bradley_terry import bradley_terry_loss
from optune_nemo.losses.dpo import dpo_loss, dpo_per_pair, implicit_margin
from optune_nemo.losses.wdpo import wdpo_loss, wdpo_per_pair, wdpo_weight

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LossOutput", "PairLoss", "PairTensors", "bradley_terry_loss", "build_loss", "dpo_loss",
           "dpo_per_pair", "implicit_margin", "loss_names", "register_loss", "wdpo_loss", "wdpo_per_pair",
           "wdpo_weight"]
