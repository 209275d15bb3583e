"""Megatron's model-parallel state on top of the process group (`optune_nemo.runtime.distributed`)."""

from __future__ import annotations

import torch

from optune_nemo.config import ConfigError, ParallelConfig
from optune_nemo.runtime.distributed import DistEnv, init_process_group, local_device


def init_distributed(tensor_model_parallel_size: int, pipeline_model_parallel_size: int, *,
                     timeout_minutes: float = ParallelConfig.distributed_timeout_minutes) -> DistEnv:
    """torch.distributed from the launcher's environment (gloo on CPU, nccl on GPU), then megatron's
    tensor / pipeline / data-parallel groups. Idempotent. The world size must be a multiple of tp * pp
    (`config.validate` checks it before anything runs; this is the last guard)."""
    from megatron.core import parallel_state as ps

    from optune_nemo.megatron.cpu_compat import enable_cpu_compat

    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        enable_cpu_compat()
    rank, world, local_rank = init_process_group(device, timeout_minutes=timeout_minutes)
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if world % (tp * pp):
        raise ConfigError(f"parallel: tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp} "
                          f"must divide the world size {world}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     distributed_timeout_minutes=timeout_minutes)
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, tp_size=tp, pp_size=pp,
        dp_size=world // (tp * pp), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(), device=device)


def pipeline_last_rank() -> int:
    """Global rank of the last pipeline stage in this rank's pipeline."""
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_last_rank()
