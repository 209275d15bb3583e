"""TensorRT-LLM generation engine (`generation.engine=trtllm`): the only module that imports
`tensorrt_llm`. Written against the TensorRT-LLM 1.x LLM API, PyTorch backend.

Lifecycle in an OPTune run (one engine per data-parallel group's first rank; docs/generation.md):
  1. `TrtllmEngine.build(hf_dir)` starts `tensorrt_llm.LLM(model=hf_dir, backend="pytorch", ...)` from
     the policy exported at the start of the run (an HF directory: the PyTorch backend loads HF
     checkpoints directly, no engine build step), with the Ray orchestrator and TensorRT-LLM's RLHF
     worker extension so weights can be pushed in later.
  2. Each iteration, before generating, `refit(policy)` pushes the policy's current weights into the
     running engine IN MEMORY: the megatron weights are converted to Hugging Face names on the GPU
     (`policy.hf_export.collect_hf_state_dict`), shared as CUDA IPC handles keyed by device UUID, and
     loaded with the worker extension's `update_weights` (partial loads, then a finalize call that
     also resets the prefix cache). Nothing is written to disk. If in-memory refit is unavailable (an
     older TensorRT-LLM without the worker extension), the engine is rebuilt from a fresh HF export
     (`generation.trtllm.refit: rebuild`), which is correct but costs an engine start per iteration.
  3. While the policy trains on the same GPUs, `sleep()` releases the engine's weights and KV cache
     (`generation.offload_during_training`), `wake()` restores them before the next generation.
Generation tensor parallelism (`generation.trtllm.tensor_parallel_size`) is independent of training's.

Sampling: TensorRT-LLM draws with its own sampler, so samples are reproducible for a fixed seed and
batch, but they are NOT identical to the torch engine's per-(key, sample) streams; greedy output is
(tested against the torch engine, `pytest -m trtllm`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from optune_nemo.config import ConfigError
from optune_nemo.types import Sample, SamplingParams

try:
    import tensorrt_llm  # noqa: F401

    HAVE_TRTLLM = True
except ImportError:
    HAVE_TRTLLM = False

log = logging.getLogger(__name__)

INSTALL_HINT = ("generation.engine: trtllm needs TensorRT-LLM 1.x, which is installed in the NGC container "
                "(see docs/container.md) or with `pip install optune-nemo[gpu]` on a CUDA machine; "
                "use generation.engine=torch elsewhere")

_WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
_SLEEP_TAGS = ["model", "kv_cache"]


def require_trtllm() -> None:
    if not HAVE_TRTLLM:
        raise ConfigError(INSTALL_HINT)


class TrtllmEngine:
    """`types.GenerationEngine` backed by a TensorRT-LLM `LLM` (PyTorch backend)."""

    def __init__(self, llm, *, tokenizer, tensor_parallel_size: int, refit_mode: str, hf_dir: str,
                 kv_cache_fraction: float, max_seq_len: int, max_batch_size: int, offload_during_training: bool,
                 policy=None):
        self.llm, self.tokenizer, self.decode, self.policy = llm, tokenizer, tokenizer.decode, policy
        self.offload_during_training = offload_during_training
        self.tensor_parallel_size, self.refit_mode, self.hf_dir = tensor_parallel_size, refit_mode, hf_dir
        self.kv_cache_fraction, self.max_seq_len, self.max_batch_size = kv_cache_fraction, max_seq_len, max_batch_size
        self.asleep = False
        self.last_stats: dict = {}

    @classmethod
    def build(cls, hf_dir: str, *, tokenizer, policy=None, tensor_parallel_size: int = 1,
              refit_mode: str = "in_memory", kv_cache_fraction: float = 0.3, max_seq_len: int = 2048,
              max_batch_size: int = 256, offload_during_training: bool = True) -> TrtllmEngine:
        """`hf_dir`: the policy as a Hugging Face directory (its source model at the start of a run)."""
        require_trtllm()
        return cls(cls._start(hf_dir, tensor_parallel_size, refit_mode, kv_cache_fraction, max_seq_len,
                              max_batch_size),
                   tokenizer=tokenizer, policy=policy, tensor_parallel_size=tensor_parallel_size,
                   refit_mode=refit_mode, hf_dir=str(hf_dir), kv_cache_fraction=kv_cache_fraction,
                   max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                   offload_during_training=offload_during_training)

    # ------------------------------------------------------------------ the engine hooks of the loop

    def begin_generation(self) -> None:
        """Before an iteration's generation: wake up and take the policy's current weights."""
        self.wake()
        if self.policy is not None:
            log.info("trtllm: weights refitted in %.1f s (%s)", self.refit(self.policy), self.refit_mode)

    def end_generation(self) -> None:
        """Before training: give the GPU memory back to the policy."""
        if self.offload_during_training:
            self.sleep()

    @staticmethod
    def _start(hf_dir, tp, refit_mode, kv_cache_fraction, max_seq_len, max_batch_size):
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        kwargs = dict(model=str(hf_dir), backend="pytorch", tensor_parallel_size=tp, max_seq_len=max_seq_len,
                      max_batch_size=max_batch_size,
                      # block reuse shares the prompt's KV blocks between the n samples of a prompt
                      kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=kv_cache_fraction,
                                                    enable_block_reuse=True))
        if refit_mode == "in_memory":
            kwargs.update(orchestrator_type="ray", ray_worker_extension_cls=_WORKER_EXTENSION,
                          enable_sleep_mode=True)
        return LLM(**kwargs)

    # ------------------------------------------------------------------ weights and memory

    def refit(self, policy) -> float:
        """Push the policy's current weights into the engine; returns seconds spent."""
        tic = time.perf_counter()
        if self.refit_mode == "in_memory":
            self._refit_in_memory(policy)
        else:
            self._rebuild_from_export(policy)
        return time.perf_counter() - tic

    def _refit_in_memory(self, policy) -> None:
        import torch
        from tensorrt_llm._torch.utils import get_device_uuid
        from torch.multiprocessing.reductions import reduce_tensor

        from optune_nemo.policy.hf_export import collect_hf_state_dict

        state = collect_hf_state_dict(policy.model, policy.cfg.model, vocab_size=policy.vocab_size,
                                      dist=policy.dist)
        if state is None:   # only the gathering rank holds the full HF state dict
            return
        device = torch.cuda.current_device()
        tensors = {name: t.to(device=device, dtype=torch.bfloat16).contiguous() for name, t in state.items()}
        handles = [(name, reduce_tensor(t)) for name, t in tensors.items()]
        uuid = get_device_uuid(device)
        self.llm._collective_rpc("update_weights", args=({uuid: handles},))
        self.llm._collective_rpc("update_weights", args=(None,))   # finalize: post-load hooks, prefix cache reset
        del tensors

    def _rebuild_from_export(self, policy) -> None:
        import tempfile

        from optune_nemo.policy.pretrained import export_policy

        self.llm.shutdown()
        out = export_policy(policy, self.hf_dir, tempfile.mkdtemp(prefix="optune_trtllm_"), tokenizer=self.tokenizer)
        self.llm = self._start(out, self.tensor_parallel_size, self.refit_mode, self.kv_cache_fraction,
                               self.max_seq_len, self.max_batch_size)

    def sleep(self) -> None:
        """Release weights and KV cache while the policy trains on the same GPUs."""
        if self.refit_mode == "in_memory" and not self.asleep:
            self.llm._collective_rpc("sleep", args=(_SLEEP_TAGS,))
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm._collective_rpc("wakeup", args=(_SLEEP_TAGS,))
            self.asleep = False

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 keys: Sequence[int]) -> list[list[Sample]]:
        from tensorrt_llm import SamplingParams as TrtSamplingParams

        self.wake()
        greedy = params.temperature == 0
        sp = TrtSamplingParams(
            max_tokens=params.max_new_tokens, n=params.n, stop_token_ids=list(params.stop_token_ids),
            temperature=None if greedy else params.temperature, top_k=1 if greedy else (params.top_k or None),
            top_p=None if greedy else params.top_p, seed=params.seed, include_stop_str_in_output=True)
        tic = time.perf_counter()
        outputs = self.llm.generate([list(p) for p in prompts], sp, use_tqdm=False)
        elapsed = time.perf_counter() - tic
        result = [[self._sample(o, params) for o in out.outputs] for out in outputs]
        tokens = sum(s.num_tokens for group in result for s in group)
        self.last_stats = {"generated_tokens": tokens, "time_s": elapsed,
                           "tokens_per_s": tokens / elapsed if elapsed else 0.0}
        return result

    def _sample(self, completion, params: SamplingParams) -> Sample:
        ids = list(completion.token_ids)
        stopped = bool(ids) and ids[-1] in params.stop_token_ids
        return Sample(ids, self.decode(ids), "stop" if stopped else "length")
