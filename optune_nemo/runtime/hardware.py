"""What this machine is, for the `precision: auto` choice and for benchmark records."""

from __future__ import annotations

import os
import platform
from functools import cache

import torch


@cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fast_bf16() -> tuple[bool, str]:
    """(bf16 matrix products are fast here, why): a CUDA GPU with bf16 support, or a CPU with AVX-512 BF16
    or AMX BF16 instructions (oneDNN then runs bf16 GEMMs at several times the fp32 rate)."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name()} ({'bf16' if ok else 'no bf16'})"
    flags = cpu_flags() & {"avx512_bf16", "amx_bf16"}
    return bool(flags), f"{cpu_model()} ({', '.join(sorted(flags)) or 'no bf16 instructions'})"


def machine_info() -> dict:
    """The facts a benchmark figure is recorded with."""
    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    return info


def resolve_precision(cfg):
    """`cfg` (an OPTune or reward-model configuration) with precision=auto and use_distributed_optimizer=null
    decided for this machine (logged)."""
    import dataclasses
    import logging

    precision = cfg.precision
    if precision == "auto":
        fast, why = fast_bf16()
        if cfg.optim.optimizer == "rmsprop":
            fast, why = False, "optim.optimizer=rmsprop runs in fp32"
        precision = "bf16" if fast else "fp32"
        logging.getLogger(__name__).info("precision: auto -> %s (%s)", precision, why)
    dist_opt = cfg.parallel.use_distributed_optimizer
    if dist_opt is None:
        dist_opt = precision in ("bf16", "fp8")
    return dataclasses.replace(cfg, precision=precision,
                               parallel=dataclasses.replace(cfg.parallel, use_distributed_optimizer=dist_opt))
