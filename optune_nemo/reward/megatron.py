"""`reward.type=megatron`: the Megatron reward model (`megatron/reward_model.py`) co-located with the policy.

`reward.path` is a train_rm run (its exp_dir: the newest complete checkpoint; or one checkpoint directory)
or a Hugging Face sequence-classification directory (Llama / Mistral / Qwen2, num_labels 1), imported
exactly. The model is built in the policy's process groups with its tensor / pipeline layout (the reward
model's heads, KV groups and layers must divide like the policy's); the ranks of one data-parallel group
score the same shard together (`ShardedReward`), `reward.batch_size` sequences per forward, the shard
sorted by rendered length. Rendering is the reward model's own tokenizer and chat template applied to the
prompt's whole conversation plus the response (`reward.hf.RenderedReward`), as in reward-model training.

Precision: bf16 on GPUs, fp32 on the CPU. Memory: on a GPU, `prepare()` moves the weights onto the rank's
device and `release()` moves them back to host memory and empties the CUDA cache, so the policy trains
with the GPU to itself; between the two the reward model holds no GPU memory. On the CPU both are no-ops:
the weights stay in host memory, which the policy shares anyway.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from optune_nemo.config import ConfigError, RewardConfig
from optune_nemo.reward.base import REWARD_TYPES
from optune_nemo.reward.hf import RenderedReward, load_rm_tokenizer
from optune_nemo.runtime.distributed import DistEnv

log = logging.getLogger(__name__)


class MegatronReward(RenderedReward):
    """`reward.type=megatron` (module docstring)."""

    def __init__(self, model, *, meta, tokenizer, name: str, batch_size: int, dist: DistEnv):
        super().__init__(tokenizer=tokenizer, name=name, batch_size=batch_size, dist=dist)
        self.model, self.meta = model, meta

    def prepare(self) -> None:
        if self.dist.device.type == "cuda":
            self.model.to(self.dist.device)

    def release(self) -> None:
        if self.dist.device.type == "cuda":
            self.model.to("cpu")
            getattr(self.model, "rotary_pos_emb_cache", {}).clear()   # RoPE tables cached on the GPU
            torch.cuda.empty_cache()

    def score_sequences(self, seqs: list[list[int]]) -> list[float]:
        from optune_nemo.megatron.reward_model import score_sequences

        return score_sequences([self.model], seqs, pad_id=self.meta.pad_token_id, rows=self.batch_size,
                               dist=self.dist)


def describe(path: Path):
    """(meta, tokenizer, where the weights are, `hf` or `checkpoint`) of `reward.path`; ConfigError naming it."""
    from optune_nemo.megatron.hf_rm import SEQ_CLS_ARCHITECTURES, read_rm_config, rm_model_config
    from optune_nemo.megatron.reward_model import (
        META_FILE,
        TOKENIZER_DIR,
        RewardModelMeta,
        find_rm_checkpoint,
        load_saved_tokenizer,
    )

    if (path / "config.json").is_file():
        config = read_rm_config(path, key="reward.path")
        tokenizer = load_rm_tokenizer(path, key="reward.path")
        meta = RewardModelMeta(rm_model_config(path, key="reward.path"), tokenizer.vocab_size,
                               config.get("pad_token_id"), SEQ_CLS_ARCHITECTURES[config["architectures"][0]], config)
        return meta, tokenizer, path, "hf"
    ckpt = find_rm_checkpoint(path, key="reward.path")
    meta = RewardModelMeta.from_json((ckpt / META_FILE).read_text())
    return meta, load_saved_tokenizer(ckpt / TOKENIZER_DIR), ckpt / "model", "checkpoint"


def _check_layout(meta, dist: DistEnv, path: Path) -> None:
    m = meta.model
    for what, n in (("attention heads", m.num_attention_heads), ("KV groups", m.num_query_groups)):
        if n % dist.tp_size:
            raise ConfigError(f"reward.path: the reward model {path} has {n} {what}, which "
                              f"parallel.tensor_model_parallel_size = {dist.tp_size} does not divide")
    if m.num_layers % dist.pp_size:
        raise ConfigError(f"reward.path: the reward model {path} has {m.num_layers} layers, which "
                          f"parallel.pipeline_model_parallel_size = {dist.pp_size} does not divide")


@REWARD_TYPES.register("megatron")
def build(cfg: RewardConfig, *, dist: DistEnv | None = None) -> MegatronReward:
    """`reward.type=megatron`: builds and loads the model in `dist`'s process groups (a single process when
    None), then releases it until the first `prepare()`. Collective."""
    from optune_nemo.megatron.hf_rm import load_hf_rm_into
    from optune_nemo.megatron.reward_model import build_scoring_model, load_model_weights

    if dist is None:
        from optune_nemo.megatron.parallel import init_distributed

        dist = init_distributed(1, 1)
    path = Path(cfg.path).expanduser()
    meta, tokenizer, weights, kind = describe(path)
    _check_layout(meta, dist, path)
    precision = "bf16" if dist.device.type == "cuda" else "fp32"
    model = build_scoring_model(meta, dist=dist, precision=precision)
    try:
        if kind == "hf":
            load_hf_rm_into(model, weights, model_cfg=meta.model, dist=dist)
        else:
            load_model_weights(model, weights)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"reward.path: {e}") from None
    reward = MegatronReward(model, meta=meta, tokenizer=tokenizer, name=str(path), batch_size=cfg.batch_size,
                            dist=dist)
    reward.release()
    log.info("reward model %s (megatron, %s, tp %d, pp %d)", path, precision, dist.tp_size, dist.pp_size)
    return reward
