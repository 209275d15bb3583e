"""Run megatron-core's CUDA-only code paths on a CPU build of torch.

megatron-core 0.16.1 assumes CUDA in a few dozen places:
`device="cuda"` / `torch.cuda.current_device()` buffers, `Tensor.cuda()`, `pin_memory`, CUDA RNG
state tracking (attention always enters the tracker's `fork()`), `torch.cuda.Event` and NVTX.
`enable_cpu_compat()` redirects those to the CPU. It is a no-op when CUDA is available, so the GPU
path is never touched. These patches reach into private internals: megatron-core is pinned and
`tests/unit/test_cpu_compat.py` checks each patched behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ENABLED = False
_MEGATRON_TP_SEED_OFFSET = 2718       # megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed
_MEGATRON_EXPERT_SEED_OFFSET = 1024   # idem, expert-parallel stream
_MODE: TorchFunctionMode | None = None


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):   # torch.cuda.current_device() returns an int
        return True
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpu(TorchFunctionMode):
    """Rewrites `device=cuda...` keyword arguments to the CPU, drops `pin_memory`, makes
    `Tensor.cuda()` a no-op, `Tensor.to("cuda")` stay on the CPU and `Tensor.type()` report the
    CUDA type name megatron's optimizer asserts."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads / optimizers assert `grad.type() == 'torch.cuda.FloatTensor'`
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """The contract of megatron's CudaRNGStatesTracker (add / fork / get_states / set_states /
    reset) over CPU generator states: inside `fork(name)` the global CPU RNG runs from that
    named state, which is saved back on exit."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _CpuEvent:
    """Stand-in for torch.cuda.Event: records wall time so elapsed_time still means something."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end._t - self._t) * 1000.0


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed, which is silently lazy on a CPU
    # build; the tracker's add() is what matters and it now makes CPU generator states.


def _patch_cuda_module() -> None:
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_device = lambda: "cpu"   # used as `device=` for buffers and masks
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None


def enable_cpu_compat() -> bool:
    """Activate the CPU redirections (idempotent). Returns True when active, False with CUDA."""
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _patch_cuda_module()
    _patch_rng_tracker()
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    _ENABLED = True
    log.debug("megatron-core CPU compatibility layer enabled")
    return True


def cpu_compat_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def cpu_compat_suspended():
    """Leave the device-rewriting function mode for a block that needs none of it (the generation
    engine's decode loop: the mode costs a Python call per torch call, ~6 % of decoding)."""
    if _MODE is None:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()


def model_parallel_seed(seed: int) -> None:
    """Seed torch and megatron's model-parallel RNG tracker (CPU or CUDA)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    enable_cpu_compat()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # megatron's own seed layout (model_parallel_cuda_manual_seed's offsets), so a CPU run draws what
    # megatron's conventions prescribe: data-parallel seed, model-parallel seed + 2718 + tp_rank, expert + 1024
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _MEGATRON_TP_SEED_OFFSET + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + _MEGATRON_EXPERT_SEED_OFFSET)
