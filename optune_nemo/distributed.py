"""Process-group set-up from the torchrun or Slurm environment, or a single process.

Launchers set, in order of precedence:
  torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  Slurm:    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (MASTER_ADDR: first host of the job,
            MASTER_PORT: derived from SLURM_JOB_ID, unless exported by the batch script)
  neither:  a single process on a free local port.
The world size is validated against tensor * pipeline parallel sizes once, here.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits. Groups are megatron's (parallel_state) groups."""

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    device: torch.device

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env() -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, init_method), exporting MASTER_ADDR/PORT where a Slurm launch
    left them out. A single process uses a fresh local port and leaves the environment alone (its
    children must not inherit a port it holds)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" not in env:
            hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                                   capture_output=True, text=True, check=True).stdout.split()
            env["MASTER_ADDR"] = hosts[0]
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "env://"
    return 0, 1, 0, f"tcp://127.0.0.1:{_free_port()}"


def init_distributed(tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> DistEnv:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and megatron's parallel state."""
    from megatron.core import parallel_state as ps

    from optune_nemo.policy.cpu_compat import enable_cpu_compat

    rank, world, local_rank, init_method = _launcher_env()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if world % (tp * pp):
        raise ValueError(
            f"parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size = {tp * pp} "
            f"must divide the world size {world}")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        enable_cpu_compat()
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, tp_size=tp, pp_size=pp,
        dp_size=world // (tp * pp), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(), device=device)


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """`obj` of global rank `src` on every rank of `group` (the world by default)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group=None) -> list[Any]:
    """Every rank's `obj`, ordered by rank within `group`."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
