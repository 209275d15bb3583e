"""Process-group set-up from the torchrun or Slurm environment, or a single process.

Launchers set, in order of precedence:
  torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  Slurm:    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (MASTER_ADDR: first host of the job,
            MASTER_PORT: derived from SLURM_JOB_ID, unless exported by the batch script)
  neither:  a single process on a free local port.
Megatron's model-parallel groups are made on top of this in `megatron/parallel.py` (the only
package that imports megatron.core). Also here: the collectives the system uses on plain objects, and
the round-robin sharding of a list over data-parallel ranks.
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

from optune_nemo.config import ConfigError, ParallelConfig


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


def init_process_group(device: torch.device, *,
                       timeout_minutes: float = ParallelConfig.distributed_timeout_minutes) -> tuple[int, int, int]:
    """torch.distributed from the launcher's environment (gloo on CPU, nccl on GPU); returns
    (rank, world_size, local_rank). Idempotent. `timeout_minutes` (parallel.distributed_timeout_minutes)
    bounds every collective of the world group and the rendezvous: a rank that waits longer for a hung
    or dead peer raises, its process exits non-zero and the launcher (torchrun, `srun
    --kill-on-bad-exit=1`) ends the others (docs/slurm.md, "When a rank dies or hangs")."""
    rank, world, local_rank, init_method = _launcher_env()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                                rank=rank, world_size=world, timeout=process_group_timeout(timeout_minutes))
    return rank, world, local_rank


def process_group_timeout(minutes: float) -> datetime.timedelta:
    """`parallel.distributed_timeout_minutes` as the timedelta torch.distributed takes (megatron's
    sub-groups get the same through `initialize_model_parallel(distributed_timeout_minutes=...)`)."""
    if not minutes > 0:
        raise ConfigError(f"parallel.distributed_timeout_minutes: must be > 0 (got {minutes!r})")
    return datetime.timedelta(minutes=minutes)


def local_device() -> torch.device:
    """This process's device: the CPU without CUDA; cuda:0 when the process sees a single GPU (srun
    --gpus-per-task=1, or CUDA_VISIBLE_DEVICES naming one: the launcher already chose it); otherwise the
    GPU of its local rank (LOCAL_RANK, else SLURM_LOCALID), which must be one of the visible ones."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    if local >= visible:
        raise ConfigError(
            f"local rank {local} has no GPU: this process sees {visible} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); launch one task per GPU with every GPU of the "
            "node visible to each task, or exactly one (srun --gpus-per-task=1)")
    return torch.device("cuda", local)


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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


def shard(n: int, rank: int, size: int) -> list[int]:
    """The indices of `n` items that data-parallel rank `rank` of `size` handles: rank, rank + size, ..."""
    return list(range(rank, n, size))


def gather_shards(local: list, n: int, *, group=None) -> list:
    """Inverse of `shard`: every rank's `local` results (in its `shard` order) all-gathered over `group`
    (the data-parallel group) and put back in input order; the same list on every rank."""
    parts = all_gather_object(local, group=group)
    out: list = [None] * n
    for rank, part in enumerate(parts):
        for i, value in zip(shard(n, rank, len(parts)), part):
            out[i] = value
    return out
