"""Typed configuration of `python -m optune_nemo.serve_rm`, the reward model server: the reward it serves
(the run's own `RewardConfig`, any type but `remote`), how the processes split a model-parallel reward
model, and the inference server's knobs. `conf/serve_rm.yaml` is generated from this schema
(`python -m optune_nemo.rm.serve_config > conf/serve_rm.yaml`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from optune_nemo import reward
from optune_nemo.config import ConfigError, ParallelConfig, RewardConfig, render_schema_yaml, validate_reward


@dataclass
class ServeParallelConfig:
    """How the server's processes (torchrun / Slurm tasks) split a Megatron reward model.

    The data-parallel size is world size / (tensor * pipeline). Rank 0 runs the inference server, every
    rank scores."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size of a Megatron reward model (reward.type=megatron)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size of a Megatron reward model (reward.type=megatron)."""
    distributed_timeout_minutes: float = ParallelConfig.distributed_timeout_minutes
    """Minutes a collective waits for the other processes before it fails and the server ends (a hung
    process); must exceed server.keepalive_s, which keeps an idle server's processes in touch."""


@dataclass
class ServerConfig:
    """The inference server: NVIDIA Triton Inference Server with the reward as a Python model (PyTriton)."""

    host: str = "127.0.0.1"
    """Address the HTTP, gRPC and metrics endpoints listen on: 127.0.0.1 (this machine only) or 0.0.0.0
    (every interface, to serve other nodes)."""
    http_port: int = 8000
    """HTTP / REST (KServe v2) port: what reward.url names (http://host:http_port)."""
    grpc_port: int = 8001
    """gRPC (KServe v2) port (reward.url=grpc://host:grpc_port)."""
    metrics_port: int = 8002
    """Prometheus metrics port (http://host:metrics_port/metrics)."""
    model_name: str = "reward"
    """Name the reward is served under (the client's reward.model_name)."""
    max_batch_size: int = 64
    """Most (prompt, response) pairs in one request, and in one call of the reward after Triton's dynamic
    batcher has merged concurrent requests (clients split larger batches)."""
    keepalive_s: float = 60.0
    """Several processes: seconds without a request after which rank 0 pings the others, so an idle
    server never runs into the process group's timeout."""


@dataclass
class ServeRMConfig:
    """A reward served over HTTP / gRPC for `reward.type=remote` runs."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    """The served reward: rule (reward.function), hf or megatron (reward.path); its batch_size is the
    batch the reward model scores at once."""
    parallel: ServeParallelConfig = field(default_factory=ServeParallelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR (rank 0; other ranks log warnings only)."""


_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def register_schema() -> None:
    """Register the schema with Hydra's ConfigStore as `serve_rm_schema`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="serve_rm_schema", node=ServeRMConfig)


def served_types() -> tuple[str, ...]:
    """The reward types serve_rm serves: every registered type but `remote` (a server in front of a server)."""
    return tuple(t for t in reward.REWARD_TYPES.names() if t != "remote")


def validate_serve(cfg: ServeRMConfig, *, world_size: int) -> None:
    """Check every value the types cannot. Raises ConfigError naming the first bad key."""
    r, s, p = cfg.reward, cfg.server, cfg.parallel
    if r.type not in served_types():
        raise ConfigError(f"reward.type: serve_rm serves one of {', '.join(served_types())} (got {r.type!r})")
    # the reward's own checks are the training run's: one place for them (its section's, then its family's)
    validate_reward(r)
    reward.check(r)
    if not s.host:
        raise ConfigError("server.host: must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    ports = {"server.http_port": s.http_port, "server.grpc_port": s.grpc_port, "server.metrics_port": s.metrics_port}
    for key, port in ports.items():
        if not 1 <= port <= 65535:
            raise ConfigError(f"{key}: must be a port in 1..65535 (got {port})")
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"server: http_port, grpc_port and metrics_port must differ (got {list(ports.values())})")
    if not _MODEL_NAME.fullmatch(s.model_name):
        raise ConfigError(f"server.model_name: letters, digits, '_', '.' and '-' only (got {s.model_name!r})")
    if s.max_batch_size < 1:
        raise ConfigError(f"server.max_batch_size: must be >= 1 (got {s.max_batch_size})")
    if not s.keepalive_s > 0:
        raise ConfigError(f"server.keepalive_s: must be > 0 (got {s.keepalive_s})")
    if not p.distributed_timeout_minutes > 0:
        raise ConfigError(f"parallel.distributed_timeout_minutes: must be > 0 (got {p.distributed_timeout_minutes})")
    if world_size > 1 and s.keepalive_s >= 60 * p.distributed_timeout_minutes:
        raise ConfigError(f"server.keepalive_s: must be below parallel.distributed_timeout_minutes * 60 = "
                          f"{60 * p.distributed_timeout_minutes:g} s, or an idle server times out "
                          f"(got {s.keepalive_s})")
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ConfigError(f"parallel: tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp} must "
                          f"divide the number of processes {world_size}")
    if cfg.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level: must be one of DEBUG, INFO, WARNING, ERROR (got {cfg.log_level!r})")


def render_yaml() -> str:
    """conf/serve_rm.yaml as it must read: the schema's defaults with their docstrings as comments."""
    return render_schema_yaml(ServeRMConfig, name="serve_rm", schema_name="serve_rm_schema",
                              title="Reward model server configuration", source="optune_nemo/rm/serve_config.py",
                              module="optune_nemo.rm.serve_config",
                              example="python -m optune_nemo.serve_rm reward.type=hf reward.path=/models/rm "
                                      "server.http_port=8000")


if __name__ == "__main__":
    print(render_yaml(), end="")
