"""Typed configuration of reward-model training (`python -m optune_nemo.train_rm`): the only place its
defaults live. Sections shared with OPTune runs (policy, model, parallel, optim, checkpoint, logging) are
the dataclasses of `optune_nemo.config`; the preference data and the training knobs are defined here.
`conf/train_rm.yaml` is this schema rendered (`python -m optune_nemo.rm.config > conf/train_rm.yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from optune_nemo.config import (
    CONF_DIR,
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PolicyConfig,
    check_attention_backend,
    render_schema_yaml,
    validate_logging,
)

SCHEMA_NAME = "train_rm_schema"


@dataclass
class PreferenceDataConfig:
    """Preference pairs: JSONL or Parquet files (row format in docs/reward_models.md)."""

    path: str | None = None
    """The training pairs (required)."""
    eval_path: str | None = None
    """Held-out pairs; null holds out rm.eval_fraction of data.path instead."""


@dataclass
class RMConfig:
    """Bradley-Terry training of the reward model (paper eq. 1)."""

    epochs: int = 1
    """Passes over the training pairs."""
    micro_batch_size: int = 4
    """Pairs per forward/backward on one data-parallel rank (their chosen and rejected sequences run together)."""
    global_batch_size: int = 16
    """Pairs per optimizer step, over all data-parallel ranks (gradient accumulation fills it)."""
    shuffle: bool = True
    """Shuffle the pair order each epoch (seeded by seed and the epoch)."""
    eval_fraction: float = 0.1
    """With data.eval_path null: the fraction of data.path held out for evaluation (seeded draw); 0 disables
    the evaluation."""
    eval_min_pairs: int = 64
    """With data.eval_path null and rm.eval_fraction > 0: hold out at least this many pairs, but through this
    floor never more than a quarter of data.path. At the end the held-out accuracy is tested against chance
    (one-sided exact binomial, alpha 0.05): with 64 pairs it needs 40 right (0.625); with 19 it needs 14 (0.74)."""
    eval_every: int = 50
    """Optimizer steps between held-out evaluations and metric records (also at step 0 and at the end)."""
    early_stopping_patience: int = 0
    """Stop after this many held-out evaluations in a row without a lower held-out loss than the best so far
    (0: off). The export and the final verdict are those of the last trained model, not the best one."""
    save_every: int = 100
    """Optimizer steps between checkpoints (also at the end, and on a pre-emption signal); 0: at the end only."""
    overlong: str = "truncate"
    """Pairs with a sequence longer than model.seq_length tokens: `truncate` (keep its last tokens) or `drop`."""
    init_from: str | None = None
    """Start from the weights of a train_rm run: its exp_dir (newest checkpoint) or a checkpoint directory;
    the model and tokenizer come from it (set policy.hf_path=null). null: start from policy.hf_path."""


@dataclass
class TrainRMConfig:
    """A reward-model training run."""

    exp_dir: str = "runs/rm"
    """Every output of the run goes under this directory."""
    seed: int = 1234
    """Seeds the head's initialisation, the held-out draw and shuffling."""
    resume: str = "auto"
    """`auto` continues from the latest complete checkpoint in exp_dir, `never` refuses to start over an
    existing one, or a path to a checkpoint directory."""
    precision: str = "auto"
    """`fp32`, `bf16` (bf16 weights and compute, fp32 main weights in the distributed optimizer and fp32
    gradient reduction) or `auto`: bf16 where bf16 matrix products are fast, else fp32 (logged)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_schema() -> None:
    """Register the schema with Hydra's ConfigStore as `train_rm_schema`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainRMConfig)


def config_to_yaml(cfg: TrainRMConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml(text: str) -> TrainRMConfig:
    """Inverse of `config_to_yaml`, type-checked against the schema (unknown keys are refused)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainRMConfig), OmegaConf.create(text)))


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> TrainRMConfig:
    """conf/train_rm.yaml with command-line style overrides (what `python -m optune_nemo.train_rm` sees)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        dcfg = compose(config_name="train_rm", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)


# --------------------------------------------------------------------------- validation


def _choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))} (got {value!r})")


def _positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be > 0 (got {value!r})")


def _divisor(key: str, value: int, what: str, total: int) -> None:
    if value < 1 or total % value:
        raise ConfigError(f"{key}: must be a positive divisor of {what} = {total} (got {value!r})")


def _preference_file(key: str, path: str | None, *, required: bool) -> None:
    if path is None:
        if required:
            raise ConfigError(f"{key}: required: a JSONL or Parquet file of preference pairs")
        return
    if Path(path).suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"{key}: must end in .jsonl or .parquet (got {path!r})")
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"{key}: file not found: {path}")


def _validate_model_and_layout(cfg: TrainRMConfig, world_size: int) -> int:
    """Model shape and parallel layout; returns the data-parallel size."""
    m, p = cfg.model, cfg.parallel
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "seq_length", "rotary_base", "make_vocab_size_divisible_by"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.norm_epsilon", m.norm_epsilon)
    _divisor("model.num_query_groups", m.num_query_groups, "model.num_attention_heads", m.num_attention_heads)
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size: must be divisible by model.num_attention_heads = "
                          f"{m.num_attention_heads} when model.kv_channels is null (got {m.hidden_size})")
    _choice("model.transformer_impl", m.transformer_impl, ("local", "transformer_engine"))
    check_attention_backend(m)
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    source = cfg.policy.hf_path or cfg.rm.init_from
    of = f" of {source}" if source else ""
    _divisor("parallel.tensor_model_parallel_size", tp, f"model.num_attention_heads{of}", m.num_attention_heads)
    _divisor("parallel.tensor_model_parallel_size", tp, f"model.num_query_groups{of}", m.num_query_groups)
    _divisor("parallel.tensor_model_parallel_size", tp, "the world size", world_size)
    _divisor("parallel.pipeline_model_parallel_size", pp, f"model.num_layers{of}", m.num_layers)
    _positive("parallel.distributed_timeout_minutes", p.distributed_timeout_minutes)
    if world_size % (tp * pp):
        raise ConfigError(f"parallel: tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp} "
                          f"must divide the world size {world_size}")
    return world_size // (tp * pp)


def _validate_optim(o: OptimConfig) -> None:
    _choice("optim.optimizer", o.optimizer, ("adam", "sgd"))
    _positive("optim.lr", o.lr)
    if not 0 <= o.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1) (got {o.warmup_ratio})")
    _choice("optim.lr_decay_style", o.lr_decay_style, ("constant", "linear", "cosine"))
    if o.clip_grad < 0:
        raise ConfigError(f"optim.clip_grad: must be >= 0 (got {o.clip_grad})")


def _validate_rm(r: RMConfig, dp: int) -> None:
    for key in ("epochs", "micro_batch_size", "global_batch_size", "eval_every"):
        _positive(f"rm.{key}", getattr(r, key))
    if r.global_batch_size % (r.micro_batch_size * dp):
        raise ConfigError(f"rm.global_batch_size: must be a multiple of rm.micro_batch_size * data-parallel size "
                          f"= {r.micro_batch_size * dp} (got {r.global_batch_size})")
    if not 0 <= r.eval_fraction < 1:
        raise ConfigError(f"rm.eval_fraction: must be in [0, 1) (got {r.eval_fraction})")
    for key in ("save_every", "eval_min_pairs", "early_stopping_patience"):
        if getattr(r, key) < 0:
            raise ConfigError(f"rm.{key}: must be >= 0 (got {getattr(r, key)})")
    _choice("rm.overlong", r.overlong, ("truncate", "drop"))


def check_one_source(cfg: TrainRMConfig) -> None:
    """The model comes from policy.hf_path or from rm.init_from, never both."""
    if cfg.rm.init_from is not None and cfg.policy.hf_path is not None:
        raise ConfigError("rm.init_from: set policy.hf_path=null when starting from a train_rm run (its checkpoint "
                          f"brings the model and tokenizer; got policy.hf_path={cfg.policy.hf_path!r})")


def validate(cfg: TrainRMConfig, world_size: int = 1) -> None:
    """Check every value the types cannot, with model.* already taken from the source. Raises ConfigError
    naming the first bad key."""
    if not cfg.exp_dir:
        raise ConfigError("exp_dir: must be a non-empty path")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume: must be auto, never or an existing checkpoint directory (got {cfg.resume!r})")
    _choice("precision", cfg.precision, ("fp32", "bf16", "auto"))
    if cfg.precision == "bf16" and cfg.parallel.use_distributed_optimizer is False:
        raise ConfigError("parallel.use_distributed_optimizer: precision=bf16 needs true (megatron-core 0.16's "
                          "non-distributed mixed-precision optimizer cannot write sharded checkpoints)")
    dp = _validate_model_and_layout(cfg, world_size)
    _validate_optim(cfg.optim)
    _validate_rm(cfg.rm, dp)
    _preference_file("data.path", cfg.data.path, required=True)
    _preference_file("data.eval_path", cfg.data.eval_path, required=False)
    check_one_source(cfg)
    hf, init = cfg.policy.hf_path, cfg.rm.init_from
    if init is not None and not Path(init).expanduser().is_dir():
        raise ConfigError(f"rm.init_from: must be a train_rm exp_dir or checkpoint directory (got {init!r})")
    if hf is not None and hf != "smollm2" and not (Path(hf).expanduser().is_dir()
                                                   or (Path(hf).expanduser().is_file() and hf.endswith(".gguf"))):
        raise ConfigError(f"policy.hf_path: must be a Hugging Face directory, a .gguf file or smollm2 (got {hf!r})")
    if cfg.policy.export_hf_every_iteration:
        raise ConfigError("policy.export_hf_every_iteration: train_rm has no iterations; it exports once, at the "
                          "end (policy.export_hf_final)")
    if cfg.checkpoint.keep_last < 0:
        raise ConfigError(f"checkpoint.keep_last: must be >= 0 (got {cfg.checkpoint.keep_last})")
    validate_logging(cfg.logging)


# --------------------------------------------------------------------------- conf/train_rm.yaml


def render_yaml() -> str:
    """conf/train_rm.yaml as it must read: the schema's defaults with their docstrings as comments."""
    return render_schema_yaml(TrainRMConfig, name="train_rm", schema_name=SCHEMA_NAME,
                              title="Reward-model training configuration", source="optune_nemo/rm/config.py",
                              module="optune_nemo.rm.config",
                              example="python -m optune_nemo.train_rm data.path=prefs.jsonl exp_dir=runs/rm1 "
                                      "rm.epochs=2")


if __name__ == "__main__":
    print(render_yaml(), end="")
