"""The per-iteration LR schedule: warm-up steps rounded up, no step at lr 0, then the decay style."""

import pytest
import torch

from optune_nemo.config import OptimConfig
from optune_nemo.megatron.trainable import MegatronTrainable


def _lrs(total: int, **optim) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    t = MegatronTrainable(model=None, optimizer=opt, dist=None, optim=OptimConfig(**optim),
                          use_distributed_optimizer=False)
    sched = t.scheduler(total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])     # the lr the next optimizer step runs at
        sched.step(increment=1)
    return out


def test_short_iteration_still_warms_up():
    # 4 steps at 10 %: ceil(0.4) = 1 warm-up step at lr / 2, then the peak
    assert _lrs(4, lr=1e-3, warmup_ratio=0.1) == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3], rel=1e-12)


def test_warmup_is_linear_without_a_zero_step():
    # 10 steps at 25 %: w = ceil(2.5) = 3 -> lr * (k + 1) / 4 for k < 3
    lrs = _lrs(10, lr=4e-3, warmup_ratio=0.25)
    assert lrs[:4] == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3], rel=1e-12)
    assert min(lrs) > 0


def test_no_warmup_and_linear_decay():
    # warmup_ratio 0: the first step is already at the peak; linear decay reaches min_lr at the last step
    lrs = _lrs(5, lr=1e-3, min_lr=0.0, warmup_ratio=0.0, lr_decay_style="linear")
    assert lrs[0] == pytest.approx(1e-3, rel=1e-12)
    assert lrs == pytest.approx([1e-3 * (1 - k / 5) for k in range(5)], rel=1e-9)
