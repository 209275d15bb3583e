"""Generation engines behind one interface (`interfaces.GenerationEngine`), chosen by `generation.engine`.

    torch   generation/torch_engine.py   runs anywhere, on the training weights
    trtllm  generation/trtllm_engine.py  TensorRT-LLM (GPU; needs policy.hf_path)

`ENGINES` holds each engine's builder. The builders are registered here rather than in their engines'
modules because trtllm_engine imports tensorrt_llm when it is imported: naming or checking an engine must
never import a backend (a torch run never loads TensorRT-LLM); each builder imports its module when called.
"""

from __future__ import annotations

from optune_nemo.config import GenerationConfig
from optune_nemo.errors import ConfigError
from optune_nemo.registry import Registry

ENGINES = Registry("generation.engine")
"""`generation.engine` -> `build(cfg, *, policy, tokenizer, dist, hf_dir, max_sequence_length) -> engine`."""


def check(cfg: GenerationConfig, *, hf_path: str | None) -> None:
    """The family's check of the `generation` section: `generation.engine` is a registered engine, and what
    it needs of the run is there (trtllm serves a Hugging Face model: `policy.hf_path`, passed as
    `hf_path`). ConfigError naming the key. Whether the engine can run on this machine is
    `check_engine_available`."""
    ENGINES.check(cfg.engine)
    if cfg.engine == "trtllm" and hf_path is None:
        raise ConfigError("generation.engine: trtllm serves a Hugging Face model; set policy.hf_path")


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


@ENGINES.register("torch")
def _build_torch(cfg: GenerationConfig, *, policy, tokenizer, dist, hf_dir, max_sequence_length: int):
    from optune_nemo.generation.torch_engine import TorchEngine

    model = policy.inference_model()
    return TorchEngine(model, decode=tokenizer.decode, dist=dist, batch_size=cfg.batch_size,
                       decode_mode=torch_decode_mode(cfg.cuda_graphs, model=model, tp_size=dist.tp_size))


@ENGINES.register("trtllm")
def _build_trtllm(cfg: GenerationConfig, *, policy, tokenizer, dist, hf_dir, max_sequence_length: int):
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


def build_engine(cfg: GenerationConfig, *, policy, tokenizer, dist, hf_dir, max_sequence_length: int):
    """The engine named by `generation.engine`. Never substitutes another one silently: asking for
    trtllm where TensorRT-LLM is not installed is an error saying what to install."""
    return ENGINES.get(cfg.engine)(cfg, policy=policy, tokenizer=tokenizer, dist=dist, hf_dir=hf_dir,
                                   max_sequence_length=max_sequence_length)
