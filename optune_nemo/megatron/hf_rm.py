"""Hugging Face sequence-classification reward models <-> the Megatron reward model, exactly.

An HF reward model is `LlamaForSequenceClassification` / `MistralForSequenceClassification` /
`Qwen2ForSequenceClassification` with `num_labels` 1: the causal LM's backbone tensors under the same names
(`model.embed_tokens.weight`, `model.layers.{i}....`, `model.norm.weight`; no `lm_head`) plus
`score.weight` [1, hidden] (no bias). transformers scores a sequence at its rightmost token that is not
config.json's `pad_token_id`, the rule the Megatron reward model applies (`megatron/reward_model.py`).

    backbone tensors   hf_import / hf_export layout (docs/models.md), through `BackboneView`
    score.weight       output_layer.weight of the last pipeline stage (the `ScalarHead`), replicated over TP

Export writes config.json (the source's keys, the weights' shape, `architectures`, `id2label` of one label,
`pad_token_id`), model.safetensors (or shards + index) and the tokenizer, into a staging sibling renamed
at the end (`runtime.fileio.staged_dir`): the directory appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist

from optune_nemo.config import ConfigError, ModelConfig
from optune_nemo.megatron.hf_import import SUPPORTED_ARCHITECTURES, HFModelInfo
from optune_nemo.runtime.fileio import staged_dir

log = logging.getLogger(__name__)

SEQ_CLS_ARCHITECTURES = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
}
"""Reward-model architectures the Megatron reward model imports and exports, and their causal LMs."""

SCORE = "score.weight"

HEAD_PREFIX = "output_layer."
"""Megatron parameter names of the head (it takes the LM output layer's place)."""


class BackboneView:
    """A reward model's GPTModel without its head, as `hf_import.load_hf_weights_into` and
    `hf_export.iter_hf_tensors` read a model (`decoder`, `named_parameters`): the causal LM's tensors
    minus the LM head."""

    def __init__(self, model):
        self._model = model
        self.decoder = model.decoder

    def named_parameters(self):
        return ((n, p) for n, p in self._model.named_parameters() if not n.startswith(HEAD_PREFIX))


def _config_of(hf_dir: str | Path, key: str) -> dict:
    path = Path(hf_dir).expanduser() / "config.json"
    if not path.is_file():
        raise ConfigError(f"{key}: {hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{key}: {path} is not valid JSON ({str(e).splitlines()[0]})") from None


def is_reward_model_dir(path: str | Path) -> bool:
    """True for a directory whose config.json names a `*ForSequenceClassification` architecture."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except ValueError:
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def num_labels(cfg: dict) -> int:
    """Labels as transformers counts them: `num_labels`, else the entries of `id2label`, else its default 2."""
    if cfg.get("num_labels") is not None:
        return int(cfg["num_labels"])
    if cfg.get("id2label"):
        return len(cfg["id2label"])
    return 2


def read_rm_config(hf_dir: str | Path, *, key: str, any_architecture: bool = False) -> dict:
    """config.json of a reward-model directory, checked: a `*ForSequenceClassification` (one of
    `SEQ_CLS_ARCHITECTURES` unless `any_architecture`, for transformers-only use) with num_labels 1.
    Raises ConfigError naming `key`, one line."""
    cfg = _config_of(hf_dir, key)
    archs = cfg.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else None
    if arch in SUPPORTED_ARCHITECTURES or (arch or "").endswith(("ForCausalLM", "LMHeadModel")):
        raise ConfigError(f"{key}: {hf_dir} is a causal language model ({arch}), not a reward model; a reward "
                          "model directory holds a *ForSequenceClassification with num_labels 1 (train one with "
                          "python -m optune_nemo.train_rm)")
    allowed = arch is not None and (arch in SEQ_CLS_ARCHITECTURES if not any_architecture
                                    else arch.endswith("ForSequenceClassification"))
    if not allowed:
        names = "a *ForSequenceClassification" if any_architecture else ", ".join(SEQ_CLS_ARCHITECTURES)
        raise ConfigError(f"{key}: {hf_dir}/config.json architectures must be {names} (got {archs!r})")
    n = num_labels(cfg)
    if n != 1:
        raise ConfigError(f"{key}: {hf_dir}/config.json has num_labels = {n}; a reward model has exactly 1 "
                          "(one scalar score per sequence)")
    return cfg


def rm_model_info(hf_dir: str | Path, *, key: str) -> HFModelInfo:
    """The reward model's backbone seen as its causal LM (architecture renamed), for
    `hf_import.hf_config_to_model_config`. Raises ConfigError naming `key`."""
    cfg = read_rm_config(hf_dir, key=key)
    causal = SEQ_CLS_ARCHITECTURES[cfg["architectures"][0]]
    return HFModelInfo(architecture=causal, vocab_size=int(cfg["vocab_size"]),
                       config={**cfg, "architectures": [causal]}, where=str(Path(hf_dir) / "config.json"))


def rm_model_config(hf_dir: str | Path, *, key: str, seq_length: int | None = None,
                    base: ModelConfig | None = None) -> ModelConfig:
    """`ModelConfig` of a reward-model directory's backbone. Raises ConfigError naming `key`."""
    from optune_nemo.megatron.hf_import import hf_config_to_model_config

    try:
        return hf_config_to_model_config(rm_model_info(hf_dir, key=key), seq_length=seq_length, base=base)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{key}: {e}") from None


# --------------------------------------------------------------------------- import


@contextlib.contextmanager
def _as_causal_lm(hf_dir: Path):
    """A temporary directory that `hf_import` reads as the reward model's causal LM: config.json with the
    causal architecture, links to the same safetensors files (the backbone tensors have the causal LM's
    names; `hf_import.read_hf_config` accepts causal-LM architectures only)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["architectures"] = [SEQ_CLS_ARCHITECTURES[cfg["architectures"][0]]]
    tmp = Path(tempfile.mkdtemp(prefix="optune-rm-"))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg))
        for f in hf_dir.iterdir():
            if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json":
                os.symlink(f.resolve(), tmp / f.name)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_hf_rm_into(model, hf_dir: str | Path, *, model_cfg: ModelConfig, dist) -> None:
    """The reward model of `hf_dir` into this rank's bare reward-model chunk (`megatron.reward_model.build_reward_gpt`):
    every backbone parameter (its slices only) and, on the last stage, the head from `score.weight`.
    Raises ValueError when a tensor is missing or contradicts the config."""
    from optune_nemo.megatron.hf_import import SafetensorsReader, load_hf_weights_into
    hf_dir = Path(hf_dir).expanduser()
    with _as_causal_lm(hf_dir) as view:
        load_hf_weights_into(BackboneView(model), view, model_cfg=model_cfg, tp_rank=dist.tp_rank,
                             tp_size=dist.tp_size, pp_rank=dist.pp_rank, pp_size=dist.pp_size)
    if dist.is_last_pp_stage:
        head = model.output_layer.weight
        score = SafetensorsReader(hf_dir).read(SCORE, (1, model_cfg.hidden_size))
        with torch.no_grad():
            head.copy_(score.to(head.dtype))


# --------------------------------------------------------------------------- export


def export_vocab_size(meta) -> int:
    """Embedding rows of the export: the source's (config.json), which the tokenizer's count may exceed."""
    return int(meta.hf_config["vocab_size"])


def rm_config_dict(meta, *, dtype: torch.dtype) -> dict:
    """config.json of the export: the causal LM's (`hf_export.hf_config_dict`) turned into the reward model's."""
    from optune_nemo.megatron.hf_export import hf_config_dict

    causal = meta.architecture
    seq_cls = next(k for k, v in SEQ_CLS_ARCHITECTURES.items() if v == causal)
    cfg = hf_config_dict(meta.model, architecture=causal, vocab_size=export_vocab_size(meta), base=meta.hf_config,
                         dtype=dtype)
    cfg.pop("num_labels", None)
    cfg.update(architectures=[seq_cls], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
               pad_token_id=meta.pad_token_id,
               # a reward model has no LM head to tie
               tie_word_embeddings=False)
    return cfg


def _gather_head(model_chunks, dist) -> torch.Tensor | None:
    """The head on global rank 0 (from the last pipeline stage's first TP rank of DP rank 0), on the CPU."""
    from optune_nemo.megatron.hf_import import unwrap_model

    mine = None
    for chunk in model_chunks:
        chunk = unwrap_model(chunk)
        if getattr(chunk, "post_process", False) and (dist is None or (dist.tp_rank == 0 and dist.dp_rank == 0)):
            mine = chunk.output_layer.weight.detach().cpu().clone()
    if dist is None or dist.world_size == 1:
        return mine
    parts: list | None = [None] * dist.world_size if dist.rank == 0 else None
    tdist.gather_object(mine, parts, dst=0)
    return next((p for p in parts if p is not None), None) if dist.rank == 0 else None


def export_hf_rm(model_chunks, meta, out_dir: str | Path, *, tokenizer, dist=None,
                 dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 * 2**30,
                 overwrite: bool = False) -> Path | None:
    """Write the reward model (`model_chunks`: this rank's chunks, DDP-wrapped or bare; `meta`: its
    `megatron.reward_model.RewardModelMeta`) as an HF sequence-classification directory. Collective: every rank calls
    it; global rank 0 writes and returns the path, the others None."""
    from optune_nemo.megatron.hf_export import collect_hf_state_dict, write_hf_files
    from optune_nemo.megatron.hf_import import unwrap_model
    if meta.architecture not in SEQ_CLS_ARCHITECTURES.values():
        raise ConfigError("policy.hf_path: exporting a Hugging Face reward model needs a Llama, Mistral or Qwen2 "
                          f"backbone (got {meta.architecture!r}; the tiny model with the byte tokenizer has none)")
    rank0 = dist is None or dist.rank == 0
    # rank 0 stages before the collectives, so a refused out_dir costs no gather
    with staged_dir(out_dir, overwrite=overwrite) if rank0 else contextlib.nullcontext() as tmp:
        backbone = [BackboneView(unwrap_model(c)) for c in model_chunks]
        state = collect_hf_state_dict(backbone, meta.model, vocab_size=export_vocab_size(meta), dist=dist,
                                      dtype=dtype)
        head = _gather_head(model_chunks, dist)
        if not rank0:
            return None
        state[SCORE] = head.to(dtype).contiguous()
        config = rm_config_dict(meta, dtype=dtype)
        files = write_hf_files(tmp, config, state, tokenizer, max_shard_bytes=max_shard_bytes)
        log.info("exported the reward model (%d tensors, %d files) to %s", len(state), len(files), out_dir)
    return Path(out_dir)
