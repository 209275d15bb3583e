"""TensorRT-LLM generation engine (`generation.engine=trtllm`): the only module that imports
`tensorrt_llm`. Written against the TensorRT-LLM 1.2.1 LLM API, PyTorch backend; docs/generation.md
cites the upstream file and line of every argument, RPC and output field used here.

Lifecycle beside a single training rank (`generation/__init__.py` refuses more):
  1. `TrtllmEngine.build(hf_dir, ...)` starts `tensorrt_llm.LLM(model=hf_dir, dtype="bfloat16", ...)` on the
     policy's source model (an HF directory, possibly float32: the engine always runs bf16). With
     `generation.refit: in_memory` it runs on the Ray orchestrator with TensorRT-LLM's RLHF worker extension
     (`update_weights`) and, when offloading, `enable_sleep=True`.
  2. Weights follow the policy lazily. A refit is pending from construction (a resumed run loads its
     checkpoint after the engine starts) and after every `end_generation()` (training follows it).
     `generate()` (and `begin_generation()`) refit first when one is pending, so every generation, the
     held-out evaluation after the last iteration included, sees the policy's weights as they are then.
     Contract: the policy's weights change only between `end_generation()` and the next generation.
  3. In-memory refit: `policy.hf_weights(bf16)` yields whole HF-named tensors; they are copied, in buckets
     of `REFIT_BUCKET_BYTES`, onto EVERY engine GPU (one copy per GPU, keyed by that GPU's UUID, as the
     worker extension looks up its own UUID) and loaded with `update_weights(handles)` (partial loads),
     then `update_weights(None)` finalises (post-load hooks, prefix-cache reset). Every engine GPU must
     therefore be visible to the training process; `build` checks it and raises a ConfigError otherwise.
     `generation.refit: rebuild` instead restarts the engine on a fresh `policy.export_hf` directory (with
     a policy attached, its first start is already on an export).
  4. Offload (`generation.offload_during_training`): `end_generation()` releases the engine's weights and
     KV cache (`sleep`); before the next generation: wake the weights, refit, finalise, wake the KV cache.
     The KV cache's content is lost while asleep, so waking it always follows a finalise, which resets the
     prefix (block-reuse) cache. In rebuild mode the engine is shut down instead.

Sampling: one TensorRT-LLM request per prompt with seed `mix_seed(params.seed, key)` and the sampler that
honours per-request seeds in 1.2.1 (`sampler_type="TRTLLMSampler"`). Samples are reproducible for a fixed
(seed, key) but are not the torch engine's per-(key, sample) streams; greedy output is the same
(`pytest -m trtllm tests/gpu`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from optune_nemo.config import ConfigError
from optune_nemo.interfaces import Sample, SamplingParams
from optune_nemo.runtime.seeding import mix_seed

ENV_BEFORE_IMPORT = {"TLLM_DISABLE_MPI": "1", "RAY_ADDRESS": "local"}
"""Set (unless already set) before `tensorrt_llm` is imported under a Slurm task: MPI off (the Ray
orchestrator is used; an srun task's PMI would otherwise be taken by MPI), and a private Ray cluster per
process (`local`) so that two array tasks on one node never attach to one Ray cluster."""
if "SLURM_JOB_ID" in os.environ:
    for _name, _value in ENV_BEFORE_IMPORT.items():
        os.environ.setdefault(_name, _value)

try:
    import tensorrt_llm  # noqa: F401

    HAVE_TRTLLM = True
except ImportError:
    HAVE_TRTLLM = False

log = logging.getLogger(__name__)

INSTALL_HINT = ("generation.engine: trtllm needs TensorRT-LLM 1.2.1, which is installed in the project's NGC "
                "container (Dockerfile, docs/container.md); use generation.engine=torch elsewhere")

WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
WEIGHT_TAGS = ["model", "draft_model"]
"""Sleep/wake tags of the model weights (`ExecutorMemoryType.MODEL_ENGINE_MAIN` / `MODEL_ENGINE_DRAFT`, restored
from pinned host memory); woken before a refit writes into them."""
KV_TAGS = ["kv_cache", "sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra",
           "executor_extra"]
"""Every other releasable tag of 1.2's `ExecutorMemoryType` (the KV cache, content NOT restored; the sampler's,
drafter's, guided decoder's and speculative resources; the model's and executor's extra buffers, CUDA-graph
pools among them), as verl releases them: woken after the refit's finalise. The `_no_capture_*` tags are
never released."""
REFIT_BUCKET_BYTES = 1 << 30
"""Bytes of weights per `update_weights` call and engine GPU: bounds the extra GPU memory of a refit
(one bucket on each engine GPU) whatever the model size."""
FINISH_REASONS = {"stop": "stop", "length": "length"}
"""TensorRT-LLM `CompletionOutput.finish_reason` -> `Sample.finish_reason`; anything else is an error."""


def require_trtllm() -> None:
    if not HAVE_TRTLLM:
        raise ConfigError(INSTALL_HINT)


# --------------------------------------------------------------------------- arguments sent to TensorRT-LLM


def llm_kwargs(model_dir: str | Path, *, tensor_parallel_size: int, refit_mode: str, kv_cache_fraction: float,
               max_seq_len: int, max_batch_size: int, offload_during_training: bool) -> dict:
    """Keyword arguments of `tensorrt_llm.LLM` (1.2.1 `TorchLlmArgs` field names: `BaseLLM.__init__` rejects
    any other key)."""
    from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig

    kwargs = dict(
        model=str(model_dir),
        dtype="bfloat16",            # the source directory may be float32; the engine serves bf16
        skip_tokenizer_init=True,    # token ids in and out: the run's tokenizer decodes
        tensor_parallel_size=tensor_parallel_size,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        # block reuse shares a prompt's KV blocks between its n samples
        kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=kv_cache_fraction, enable_block_reuse=True),
        # the sampler that honours SamplingParams.seed per request in 1.2 (TorchSampler, the "auto" choice,
        # draws every request from one generator)
        sampler_type="TRTLLMSampler",
    )
    if refit_mode == "in_memory":
        # _collective_rpc (update_weights, sleep, wakeup) exists only on the Ray executor
        kwargs.update(orchestrator_type="ray", ray_worker_extension_cls=WORKER_EXTENSION)
        if offload_during_training:
            # CUDA graphs stay on (decode is launch-bound without them); their pools sleep with the
            # model_extra tag, as in verl. Custom all-reduce buffers are not sleep-managed: NCCL's are.
            kwargs.update(enable_sleep=True, cuda_graph_config=CudaGraphConfig(enable_padding=True),
                          allreduce_strategy="NCCL")
    return kwargs


def request_kwargs(params: SamplingParams, key: int, *, pad_id: int) -> dict:
    """Keyword arguments of the `tensorrt_llm.SamplingParams` of one prompt.

    Token ids in, token ids out: no detokenisation; `end_id=-1` turns off TensorRT-LLM's own end-token
    stop so that exactly `params.stop_token_ids` end a response (reported as `stop`) and, with
    `include_stop_str_in_output`, stay in its token ids as in the torch engine. Greedy (temperature 0)
    asks for ONE sample (`top_k=1`): the LLM API refuses greedy with n > 1, and the n greedy samples are
    identical anyway (`generate` repeats it). The seed is `mix_seed(params.seed, key)`."""
    kwargs = dict(max_tokens=params.max_new_tokens, end_id=-1, pad_id=pad_id,
                  stop_token_ids=list(params.stop_token_ids) or None, include_stop_str_in_output=True,
                  detokenize=False, seed=mix_seed(params.seed, key))
    if params.temperature == 0:
        return {**kwargs, "n": 1, "top_k": 1}
    return {**kwargs, "n": params.n, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p}


def finish_reason(completion) -> str:
    """`Sample.finish_reason` of a TensorRT-LLM `CompletionOutput`."""
    reason = completion.finish_reason
    if reason not in FINISH_REASONS:
        raise RuntimeError(f"trtllm: a completion finished with reason {reason!r}; only 'stop' (a stop token) "
                           "and 'length' (max_new_tokens) are expected")
    return FINISH_REASONS[reason]


# --------------------------------------------------------------------------- weights to the engine GPUs


def engine_gpu_indices(engine_uuids: Sequence[str], local_uuids: dict[str, int]) -> dict[str, int]:
    """{engine GPU UUID: this process's CUDA index of that GPU}, one entry per engine GPU."""
    missing = [u for u in engine_uuids if u not in local_uuids]
    if missing:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise ConfigError(
            f"generation.tensor_parallel_size: engine GPU(s) {missing} are not visible to the training process "
            f"(CUDA_VISIBLE_DEVICES={visible}); in-memory refit copies the weights onto every engine GPU from "
            f"this process, so make all {len(engine_uuids)} engine GPUs visible to it or set "
            "generation.refit=rebuild")
    return {u: local_uuids[u] for u in dict.fromkeys(engine_uuids)}


_FUSED = re.compile(r"^(.*\.)(?:self_attn\.([qkv])_proj|mlp\.(gate|up)_proj)\.(?:weight|bias)$")


def fusion_group(name: str) -> str:
    """The engine module an HF tensor is loaded into: TensorRT-LLM fuses q/k/v_proj (weights and biases) into
    one qkv module and gate/up_proj into one gate_up module; every other tensor is its own group."""
    m = _FUSED.match(name)
    if m is None:
        return name
    return m.group(1) + ("qkv" if m.group(2) else "gate_up")


def buckets(named_tensors: Iterable[tuple[str, object]], max_bytes: int, *,
            keep_fused: bool = False) -> Iterator[list[tuple[str, object]]]:
    """Consecutive groups of (name, tensor) of at most `max_bytes` each (a larger unit goes alone). With
    `keep_fused`, consecutive tensors of one `fusion_group` form one unit that is never split between two
    buckets: an engine without partial loading rebuilds a fused module from one `update_weights` call."""
    def units():
        unit, key = [], None
        for name, t in named_tensors:
            k = fusion_group(name) if keep_fused else name
            if unit and k != key:
                yield unit
                unit = []
            unit.append((name, t))
            key = k
        if unit:
            yield unit

    bucket, size = [], 0
    for unit in units():
        nbytes = sum(t.numel() * t.element_size() for _, t in unit)
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(unit)
        size += nbytes
    if bucket:
        yield bucket


def _local_gpu_uuids() -> dict[str, int]:
    """{UUID: CUDA index} of the GPUs this process sees, in TensorRT-LLM's UUID format."""
    import torch
    from tensorrt_llm._torch.utils import get_device_uuid

    return {get_device_uuid(i): i for i in range(torch.cuda.device_count())}


def _to_gpu(tensor, index: int):
    return tensor.detach().to(f"cuda:{index}").contiguous()


def _synchronize(indices: Iterable[int]) -> None:
    # the copies run asynchronously; the engine's processes read the memory as soon as they get the handles
    import torch

    for i in indices:
        torch.cuda.synchronize(i)


def _ipc_handle(tensor):
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(tensor)


# --------------------------------------------------------------------------- the engine


class TrtllmEngine:
    """`interfaces.GenerationEngine` backed by a TensorRT-LLM `LLM` (PyTorch backend)."""

    def __init__(self, llm, *, tokenizer, policy, tensor_parallel_size: int, refit_mode: str, hf_dir: str,
                 kv_cache_fraction: float, max_seq_len: int, max_batch_size: int, offload_during_training: bool):
        self.llm, self.tokenizer, self.decode, self.policy = llm, tokenizer, tokenizer.decode, policy
        self.tensor_parallel_size, self.refit_mode, self.hf_dir = tensor_parallel_size, refit_mode, hf_dir
        self.kv_cache_fraction, self.max_seq_len, self.max_batch_size = kv_cache_fraction, max_seq_len, max_batch_size
        self.offload_during_training = offload_during_training
        self.refit_pending = policy is not None
        """The policy's weights may differ from the engine's (set at construction and by end_generation)."""
        self.asleep: set[str] = set()
        """Sleep tags released and not woken yet."""
        self.engine_gpus: dict[str, int] = {}
        """in_memory: {engine GPU UUID: CUDA index in this process}."""
        self._export_dir: Path | None = None
        self.last_stats: dict = {}
        self.partial_loading = False
        """in_memory: whether every engine worker's model loads a subset of a fused module's tensors per call
        (the WorkerExtension's `supports_partial_loading`); without it a refit never splits a fused group."""

    @classmethod
    def build(cls, hf_dir: str, *, tokenizer, policy, tensor_parallel_size: int, refit_mode: str,
              kv_cache_fraction: float, max_seq_len: int, max_batch_size: int,
              offload_during_training: bool) -> TrtllmEngine:
        """Start the engine on `hf_dir` (the policy's source model as a Hugging Face directory)."""
        require_trtllm()
        engine = cls(None, tokenizer=tokenizer, policy=policy, tensor_parallel_size=tensor_parallel_size,
                     refit_mode=refit_mode, hf_dir=str(hf_dir), kv_cache_fraction=kv_cache_fraction,
                     max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                     offload_during_training=offload_during_training)
        if refit_mode == "rebuild" and policy is not None:
            return engine            # the first generation starts it on an export (a resume changes the weights)
        engine._start(hf_dir)
        if refit_mode == "in_memory" and policy is not None:
            try:
                engine.engine_gpus = engine_gpu_indices(engine.llm._collective_rpc("report_device_id"),
                                                        _local_gpu_uuids())
                replies = engine.llm._collective_rpc("supports_partial_loading")
                engine.partial_loading = bool(replies) and all(replies)
            except BaseException:
                engine.shutdown()
                raise
        return engine

    def _start(self, model_dir) -> None:
        from tensorrt_llm import LLM

        self.llm = LLM(**llm_kwargs(model_dir, tensor_parallel_size=self.tensor_parallel_size,
                                    refit_mode=self.refit_mode, kv_cache_fraction=self.kv_cache_fraction,
                                    max_seq_len=self.max_seq_len, max_batch_size=self.max_batch_size,
                                    offload_during_training=self.offload_during_training))
        self.asleep = set()

    def shutdown(self) -> None:
        """Stop the engine's workers and remove its exports."""
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        if self._export_dir is not None:
            shutil.rmtree(self._export_dir, ignore_errors=True)
            self._export_dir = None

    # ------------------------------------------------------------------ the engine hooks of the loop

    def begin_generation(self) -> None:
        """Before an iteration's generation: weights current and resident (generate() does it too)."""
        self._ready()

    def end_generation(self) -> None:
        """Before training: the policy's weights will change; with offloading, give the GPU memory back."""
        if self.policy is None:      # nothing trains: the engine keeps serving its model
            return
        self.refit_pending = True
        if not self.offload_during_training:
            return
        if self.refit_mode == "rebuild":
            if self.llm is not None:
                self.llm.shutdown()
                self.llm = None
        else:
            self._sleep(WEIGHT_TAGS + KV_TAGS)

    def _ready(self) -> None:
        """The policy's current weights loaded, weights and KV cache resident."""
        if self.refit_mode == "rebuild":
            if self.llm is None or self.refit_pending:
                self._rebuild()
            return
        if self.refit_pending:
            self._wake(WEIGHT_TAGS)              # update_weights writes into the materialised weights
            self._refit_in_memory()              # ends with the finalise: post-load hooks, prefix-cache reset
        self._wake(KV_TAGS)

    # ------------------------------------------------------------------ weights and memory

    def _refit_in_memory(self) -> None:
        import torch

        tic, count = time.perf_counter(), 0
        keep_fused = not self.partial_loading
        for bucket in buckets(self.policy.hf_weights(torch.bfloat16), REFIT_BUCKET_BYTES, keep_fused=keep_fused):
            copies = {uuid: [(name, _to_gpu(t, index)) for name, t in bucket]
                      for uuid, index in self.engine_gpus.items()}
            _synchronize(self.engine_gpus.values())
            handles = {uuid: [(name, _ipc_handle(t)) for name, t in named] for uuid, named in copies.items()}
            self.llm._collective_rpc("update_weights", args=(handles,))
            count += len(bucket)
            del copies, handles
        if count == 0:
            raise RuntimeError("trtllm: policy.hf_weights yielded no tensor in the engine's process; in-memory "
                               "refit runs on the rank that holds the whole tensors (a single training rank)")
        self.llm._collective_rpc("update_weights", args=(None,))
        self.refit_pending = False
        log.info("trtllm: %d tensors refitted in memory onto %d GPU(s) in %.1f s", count, len(self.engine_gpus),
                 time.perf_counter() - tic)

    def _rebuild(self) -> None:
        tic = time.perf_counter()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        source = self.hf_dir
        if self.policy is not None:
            if self._export_dir is None:
                self._export_dir = Path(tempfile.mkdtemp(prefix="optune_trtllm_"))
            source = self.policy.export_hf(self._export_dir / "policy", tokenizer=self.tokenizer)
            if source is None:
                raise RuntimeError("trtllm: policy.export_hf returned no directory in the engine's process "
                                   "(generation.refit=rebuild runs beside a single training rank)")
        self._start(source)
        self.refit_pending = False
        log.info("trtllm: engine rebuilt from %s in %.1f s", source, time.perf_counter() - tic)

    def _sleep(self, tags: list[str]) -> None:
        todo = [t for t in tags if t not in self.asleep]
        if todo:
            self.llm._collective_rpc("sleep", args=(todo,))
            self.asleep.update(todo)

    def _wake(self, tags: list[str]) -> None:
        todo = [t for t in tags if t in self.asleep]
        if todo:
            import torch

            # the engine's processes re-allocate on the GPU the policy trained on: hand back the memory
            # the training process's allocator caches but no longer uses
            torch.cuda.empty_cache()
            self.llm._collective_rpc("wakeup", args=(todo,))
            self.asleep.difference_update(todo)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 keys: Sequence[int]) -> list[list[Sample]]:
        """`interfaces.GenerationEngine.generate`; refits first when the policy's weights may have changed."""
        from tensorrt_llm import SamplingParams as TrtSamplingParams

        if len(keys) != len(prompts):
            raise ValueError(f"trtllm: {len(prompts)} prompts but {len(keys)} keys")
        for p in prompts:
            if len(p) + params.max_new_tokens > self.max_seq_len:
                raise ValueError(f"model.seq_length: {len(p)} prompt tokens + generation.max_new_tokens "
                                 f"{params.max_new_tokens} exceed {self.max_seq_len}")
        if not prompts:
            return []
        self._ready()
        # a list (not a tuple): the LLM API takes sampling_params[i] for prompt i only from a list
        requests = [TrtSamplingParams(**request_kwargs(params, key, pad_id=self.tokenizer.pad_token_id))
                    for key in keys]
        tic = time.perf_counter()
        outputs = self.llm.generate([list(p) for p in prompts], requests, use_tqdm=False)
        elapsed = time.perf_counter() - tic
        result = [self._samples(out, params) for out in outputs]
        tokens = sum(s.num_tokens for group in result for s in group)
        self.last_stats = {"generated_tokens": tokens, "time_s": elapsed,
                           "tokens_per_s": tokens / elapsed if elapsed else 0.0}
        return result

    def _samples(self, output, params: SamplingParams) -> list[Sample]:
        expected = 1 if params.temperature == 0 else params.n
        if len(output.outputs) != expected:
            raise RuntimeError(f"trtllm: a request returned {len(output.outputs)} completions, expected {expected}")
        samples = [self._sample(c, params) for c in output.outputs]
        if params.temperature == 0:    # greedy: the n samples are the one greedy response
            samples = [Sample(list(samples[0].token_ids), samples[0].text, samples[0].finish_reason)
                       for _ in range(params.n)]
        return samples

    def _sample(self, completion, params: SamplingParams) -> Sample:
        ids = [int(t) for t in completion.token_ids]
        reason = finish_reason(completion)
        if reason == "stop" and not (ids and ids[-1] in params.stop_token_ids):
            raise RuntimeError(f"trtllm: a response reported as stopped does not end with a stop token "
                               f"({ids[-3:]}); the stop token must stay in the token ids")
        return Sample(ids, self.decode(ids), reason)
