"""Generation engines behind one interface (`interfaces.GenerationEngine`), chosen by `generation.engine`."""

from __future__ import annotations

from optune_nemo.config import ConfigError, GenerationConfig


def check_engine_available(cfg: GenerationConfig, *, world_size: int) -> None:
    """Refuse, before anything is written, an engine that cannot run here (ConfigError naming the key)."""
    if cfg.engine == "trtllm":
        from optune_nemo.generation.trtllm_engine import require_trtllm

        require_trtllm()
        if world_size > 1:
            raise ConfigError("generation.engine: trtllm inside a multi-rank training job is not wired yet "
                              "(it runs its own Ray workers); use it with one training rank")


def torch_decode_mode(cuda_graphs: str, *, model, tp_size: int) -> str:
    """The torch engine's `decode_mode` for `generation.cuda_graphs`: `graphs` (static KV cache, CUDA graph
    per bucket) or `dynamic`. `auto` captures graphs only where nothing in a decode step is uncapturable or
    untested: a CUDA device, no tensor parallelism (its all-reduces inside a graph are untested here), a
    model that drives the cache (`IncrementalModel.drives_cache`)."""
    on_cuda = model.device.type == "cuda"
    supported = bool(getattr(model, "drives_cache", False))
    if cuda_graphs == "on":
        if not on_cuda or not supported:
            raise ConfigError("generation.cuda_graphs: on needs a CUDA device and a model whose forward drives "
                              "the engine's cache (IncrementalModel.drives_cache); use auto or off")
        return "graphs"
    if cuda_graphs == "auto" and on_cuda and supported and tp_size == 1:
        return "graphs"
    return "dynamic"


def build_engine(cfg: GenerationConfig, *, policy, tokenizer, dist, hf_dir, max_sequence_length: int):
    """The engine named by `generation.engine`. Never substitutes another one silently: asking for
    trtllm where TensorRT-LLM is not installed is an error saying what to install."""
    if cfg.engine == "torch":
        from optune_nemo.generation.torch_engine import TorchEngine

        model = policy.inference_model()
        return TorchEngine(model, decode=tokenizer.decode, dist=dist, batch_size=cfg.batch_size,
                           decode_mode=torch_decode_mode(cfg.cuda_graphs, model=model, tp_size=dist.tp_size))
    if cfg.engine == "trtllm":
        from optune_nemo.generation.trtllm_engine import TrtllmEngine

        check_engine_available(cfg, world_size=dist.world_size)
        if policy is not None:
            policy.materialise_optimizer_state()    # before the engine measures free GPU memory
        return TrtllmEngine.build(str(hf_dir), tokenizer=tokenizer, policy=policy,
                                  tensor_parallel_size=cfg.tensor_parallel_size, refit_mode=cfg.refit,
                                  kv_cache_fraction=cfg.kv_cache_fraction, max_seq_len=max_sequence_length,
                                  # sequences in flight: a batch of prompts, each with its samples
                                  max_batch_size=cfg.batch_size * cfg.num_samples,
                                  offload_during_training=cfg.offload_during_training)
    raise ConfigError(f"generation.engine: must be torch or trtllm (got {cfg.engine!r})")
