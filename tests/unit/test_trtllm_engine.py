"""The TensorRT-LLM engine's wiring, on CPU. TensorRT-LLM cannot be installed here, so a stand-in module with
the shape of the 1.2.1 LLM API checks what the engine sends and how it maps what comes back. The stand-in
is strict where the real API is (sources: docs/generation.md, "The TensorRT-LLM engine"):

- `LLM(**kwargs)` rejects any key that is not a `TorchLlmArgs` field, as `BaseLLM.__init__` does
  ("LLM got invalid argument"), and `ray_worker_extension_cls` without `orchestrator_type="ray"`;
  `KvCacheConfig` rejects unknown fields (pydantic `extra="forbid"`);
- `SamplingParams` is a keyword-only dataclass with the 1.2 fields, refusing greedy with n > 1 and
  out-of-range top_p / top_k / temperature like its `_validate`;
- `generate` takes per-prompt params only from a list; `_collective_rpc` knows `report_device_id`,
  `sleep` / `wakeup` (valid tags only, and only with `enable_sleep`) and the worker extension's
  `update_weights` (a worker whose GPU UUID is not a key raises, as rlhf_utils.py L64-L65 does);
- it refuses to generate with released memory or with a block-reuse cache left stale by a KV sleep, and
  to load weights into released weight memory.
The real engine is tested on a GPU by tests/gpu/test_trtllm.py (`pytest -m trtllm`)."""

import dataclasses
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from optune_nemo.config import ConfigError, load_config
from optune_nemo.generation import trtllm_engine
from optune_nemo.interfaces import SamplingParams
from optune_nemo.runtime.seeding import mix_seed

# --------------------------------------------------------------------------- the stand-in module

# BaseLlmArgs + TorchLlmArgs fields of a 1.2-era tensorrt_llm/llmapi/llm_args.py, plus the two extra keys
# BaseLLM.__init__ lets through ('_mpi_session', 'backend')
LLM_ARGS = frozenset("""
model tokenizer tokenizer_mode custom_tokenizer skip_tokenizer_init trust_remote_code tensor_parallel_size dtype
revision tokenizer_revision model_kwargs pipeline_parallel_size context_parallel_size gpus_per_node
moe_cluster_parallel_size moe_tensor_parallel_size moe_expert_parallel_size enable_attention_dp
enable_lm_head_tp_in_adp pp_partition cp_config load_format enable_lora lora_config kv_cache_config
enable_chunked_prefill guided_decoding_backend batched_logits_processor iter_stats_max_iterations
request_stats_max_iterations peft_cache_config scheduler_config cache_transceiver_config sparse_attention_config
speculative_config max_batch_size max_input_len max_seq_len max_beam_width max_num_tokens gather_generation_logits
num_postprocess_workers postprocess_tokenizer_dir reasoning_parser decoding_config mpi_session
otlp_traces_endpoint backend return_perf_metrics perf_metrics_max_requests orchestrator_type env_overrides
garbage_collection_gen0_threshold cuda_graph_config attention_dp_config disable_overlap_scheduler moe_config
nvfp4_gemm_config attn_backend sampler_type sampler_force_async_worker enable_iter_perf_stats
enable_iter_req_stats print_iter_log batch_wait_timeout_ms batch_wait_timeout_iters batch_wait_max_tokens_ratio
torch_compile_config enable_autotuner enable_layerwise_nvtx_marker enable_min_latency stream_interval
force_dynamic_quantization allreduce_strategy checkpoint_loader checkpoint_format kv_connector_config
mm_encoder_only ray_worker_extension_cls ray_placement_config enable_sleep use_cute_dsl_blockscaling_mm
use_cute_dsl_blockscaling_bmm disable_flashinfer_sampling max_stats_len layer_wise_benchmarks_config
_mpi_session
""".split())

KV_CACHE_ARGS = frozenset("""
enable_block_reuse max_tokens max_attention_window sink_token_length free_gpu_memory_fraction host_cache_size
onboard_blocks cross_kv_cache_fraction secondary_offload_min_priority event_buffer_max_size
attention_dp_events_gather_period_ms enable_partial_reuse copy_on_partial_reuse use_uvm max_gpu_total_bytes dtype
mamba_ssm_cache_dtype tokens_per_block use_kv_cache_manager_v2 max_util_for_resume
""".split())

MEMORY_TAGS = {"sampler", "drafter", "guided_decoder", "spec_resource_manager", "_no_capture_init_kv_cache",
               "_no_capture_init_extra_resources", "model_extra", "executor_extra", "kv_cache", "model",
               "draft_model"}   # ExecutorMemoryType, _torch/virtual_memory.py L70-L82


class CudaGraphConfig:
    def __init__(self, **kw):
        unknown = set(kw) - {"batch_sizes", "max_batch_size", "enable_padding"}
        if unknown:
            raise ValueError(f"CudaGraphConfig: extra fields not permitted: {sorted(unknown)}")
        self.__dict__.update(kw)


class KvCacheConfig:
    def __init__(self, **kw):
        unknown = set(kw) - KV_CACHE_ARGS
        if unknown:
            raise ValueError(f"KvCacheConfig: extra fields not permitted: {sorted(unknown)}")
        fraction = kw.get("free_gpu_memory_fraction", 0.9)
        if not 0 <= fraction <= 1:
            raise ValueError("free_gpu_memory_fraction must be in [0, 1]")
        self.__dict__.update(kw)


_OPT = dict(default=None)
SAMPLING_FIELDS: list[Any] = [
    ("end_id", Any, dataclasses.field(**_OPT)), ("pad_id", Any, dataclasses.field(**_OPT)),
    ("max_tokens", int, dataclasses.field(default=32)),
    *[(n, Any, dataclasses.field(**_OPT)) for n in ("bad", "bad_token_ids", "stop", "stop_token_ids")],
    ("include_stop_str_in_output", bool, dataclasses.field(default=False)),
    *[(n, Any, dataclasses.field(**_OPT)) for n in ("embedding_bias", "logits_processor")],
    ("apply_batched_logits_processor", bool, dataclasses.field(default=False)),
    ("n", int, dataclasses.field(default=1)), ("best_of", Any, dataclasses.field(**_OPT)),
    ("use_beam_search", bool, dataclasses.field(default=False)),
    *[(n, Any, dataclasses.field(**_OPT)) for n in (
        "top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay", "seed", "temperature", "min_tokens",
        "beam_search_diversity_rate", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "length_penalty", "early_stopping", "no_repeat_ngram_size", "min_p", "beam_width_array", "logprobs",
        "prompt_logprobs")],
    *[(n, bool, dataclasses.field(default=False)) for n in (
        "return_context_logits", "return_generation_logits")],
    ("exclude_input_from_output", bool, dataclasses.field(default=True)),
    *[(n, bool, dataclasses.field(default=False)) for n in ("return_encoder_output", "return_perf_metrics")],
    *[(n, Any, dataclasses.field(**_OPT)) for n in ("additional_model_outputs", "lookahead_config",
                                                     "guided_decoding")],
    ("ignore_eos", bool, dataclasses.field(default=False)),
    *[(n, bool, dataclasses.field(default=True)) for n in ("detokenize", "add_special_tokens")],
    ("truncate_prompt_tokens", Any, dataclasses.field(**_OPT)),
    *[(n, bool, dataclasses.field(default=True)) for n in ("skip_special_tokens", "spaces_between_special_tokens")],
]


def _post_init(self):
    if self.pad_id is None:
        self.pad_id = self.end_id
    self.best_of = self.best_of or self.n
    if self.top_p is not None and not 0 <= self.top_p <= 1:
        raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
    if self.top_k is not None and self.top_k < 0:
        raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
    if self.temperature is not None and self.temperature < 0:
        raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
    greedy = ((self.temperature is None and self.top_p is None and self.top_k is None) or self.top_k == 1
              or self.top_p == 0.0 or self.temperature == 0)
    if self.best_of > 1 and greedy and not self.use_beam_search:
        raise ValueError("Greedy decoding in the LLM API does not allow multiple returns")


StandInSamplingParams = dataclasses.make_dataclass("SamplingParams", SAMPLING_FIELDS, kw_only=True,
                                                   namespace={"__post_init__": _post_init})


def _reply(prompt, sp):
    """A completion determined by what the request asked: the seed and the sample index show up in the
    tokens, a stop token ends it when the request has one."""
    out = []
    for j in range(sp.n):
        body = [sp.seed % 1000 + 3, j + 3, len(prompt) + 3]
        if sp.stop_token_ids:
            out.append((body + [sp.stop_token_ids[0]], "stop"))
        else:
            out.append(((body * sp.max_tokens)[:sp.max_tokens], "length"))
    return out


class StandInLLM:
    instances: list = []
    engine_uuids = ["GPU-a"]          # one per engine rank, what report_device_id returns
    producer_gpus = {"GPU-a": 0}      # the training process's CUDA index of each engine GPU
    partial_loading = True            # WorkerExtension.supports_partial_loading of every engine rank

    def __init__(self, **kwargs):
        for key in kwargs:
            if key not in LLM_ARGS and key != "backend":
                raise ValueError(f"LLM got invalid argument: {key}")
        if kwargs.get("ray_worker_extension_cls") and kwargs.get("orchestrator_type") != "ray":
            raise ValueError("ray_worker_extension_cls is only supported with orchestrator_type='ray'")
        if kwargs.get("sampler_type", "auto") not in ("TRTLLMSampler", "TorchSampler", "auto"):
            raise ValueError(f"sampler_type: {kwargs['sampler_type']}")
        self.kwargs, self.reply = kwargs, _reply
        self.rpcs, self.calls, self.snapshots = [], [], []
        self.weights = {u: {} for u in self.engine_uuids}     # what each engine rank has loaded
        self.asleep, self.stale_reuse, self.alive = set(), False, True
        StandInLLM.instances.append(self)

    def shutdown(self):
        self.alive = False

    def generate(self, inputs, sampling_params=None, use_tqdm=True):
        assert self.alive and not self.asleep, f"generate with released memory {self.asleep}"
        assert not self.stale_reuse, "generate with a block-reuse cache left stale by a KV-cache sleep"
        if isinstance(sampling_params, list):
            assert len(sampling_params) == len(inputs)
            per_prompt = sampling_params
        elif isinstance(sampling_params, StandInSamplingParams):
            per_prompt = [sampling_params] * len(inputs)
        else:
            raise TypeError(f"sampling_params: {type(sampling_params).__name__}")
        self.calls.append((inputs, per_prompt))
        self.snapshots.append({u: dict(w) for u, w in self.weights.items()})
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, finish_reason=reason)
                                               for ids, reason in self.reply(p, sp)])
                for p, sp in zip(inputs, per_prompt)]

    def _collective_rpc(self, method, args=(), kwargs=None, non_block=False, unique_reply_rank=None):
        assert self.kwargs.get("orchestrator_type") == "ray", "collective RPC needs the Ray executor"
        self.rpcs.append((method, args))
        if method == "report_device_id":
            return list(self.engine_uuids)
        if method == "supports_partial_loading":
            return [self.partial_loading] * len(self.engine_uuids)
        if method in ("sleep", "wakeup"):
            if not self.kwargs.get("enable_sleep"):
                raise ValueError("Sleep feature is not enabled")
            (tags,) = args
            assert set(tags) <= MEMORY_TAGS, tags
            if method == "sleep":
                self.asleep |= set(tags)
                self.stale_reuse |= "kv_cache" in tags
            else:
                self.asleep -= set(tags)
            return [None] * len(self.engine_uuids)
        if method == "update_weights":
            assert self.kwargs.get("ray_worker_extension_cls") == trtllm_engine.WORKER_EXTENSION
            assert "model" not in self.asleep, "update_weights into released weights"
            (handles,) = args
            if handles is None:                      # finalise: post-load hooks, reset_prefix_cache()
                self.stale_reuse = False
                return [None] * len(self.engine_uuids)
            for uuid in self.engine_uuids:
                if uuid not in handles:
                    raise ValueError(f"Device UUID {uuid} not found in ipc_handles")
                if not self.partial_loading:     # a fused module is rebuilt from one call's tensors only
                    names = [name for name, _ in handles[uuid]]
                    for fused, parts in (("qkv", ("q_proj", "k_proj", "v_proj")),
                                         ("gate_up", ("gate_proj", "up_proj"))):
                        for name in names:
                            if any(f".{p}." in name for p in parts):
                                layer = name.split(".self_attn.")[0].split(".mlp.")[0]
                                members = [n for n in names if n.startswith(layer + ".") and
                                           any(f".{p}.weight" in n for p in parts)]
                                if len(members) != len(parts):
                                    raise RuntimeError(f"{layer} {fused}: {len(members)} of {len(parts)} "
                                                       "tensors in one load without partial loading")
                for name, (tag, index, tensor) in handles[uuid]:
                    assert tag == "ipc" and index == self.producer_gpus[uuid], "copy not on the engine's GPU"
                    self.weights[uuid][name] = tensor.clone()
            return [None] * len(self.engine_uuids)
        raise AttributeError(method)


@pytest.fixture
def trt(monkeypatch):
    mod = types.ModuleType("tensorrt_llm")
    mod.LLM, mod.SamplingParams = StandInLLM, StandInSamplingParams
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig, llmapi.CudaGraphConfig, llmapi.LLM = KvCacheConfig, CudaGraphConfig, StandInLLM
    mod.llmapi = llmapi
    monkeypatch.setitem(sys.modules, "tensorrt_llm", mod)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    monkeypatch.setattr(trtllm_engine, "HAVE_TRTLLM", True)
    # GPU copies and CUDA IPC handles, made recognisable: (tag, CUDA index of the copy, tensor)
    monkeypatch.setattr(trtllm_engine, "_local_gpu_uuids", lambda: {"GPU-a": 0, "GPU-b": 1})
    monkeypatch.setattr(trtllm_engine, "_to_gpu", lambda t, index: (t.detach().clone(), index))
    monkeypatch.setattr(trtllm_engine, "_synchronize", lambda indices: None)
    monkeypatch.setattr(trtllm_engine, "_ipc_handle", lambda copy: ("ipc", copy[1], copy[0]))
    monkeypatch.setattr(StandInLLM, "instances", [])
    return StandInLLM


class Tok:
    pad_token_id = 0

    def decode(self, ids):
        return " ".join(map(str, ids))


class FakePolicy:
    """The Policy protocol's two weight calls over a float32 state dict that a test can 'train'."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.state = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g),
                      "model.layers.0.mlp.up_proj.weight": torch.randn(24, 8, generator=g),
                      "model.norm.weight": torch.randn(8, generator=g)}
        self.hf_weights_calls, self.exports = [], []

    def train_step(self):
        for t in self.state.values():
            t.add_(0.5)

    def hf_weights(self, dtype=None):
        self.hf_weights_calls.append(dtype)
        for name, t in self.state.items():
            yield name, t.to(dtype)

    def export_hf(self, out_dir, *, tokenizer):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        self.exports.append(out_dir)
        return out_dir


def _build(policy=None, **over):
    args = dict(tokenizer=Tok(), policy=policy, tensor_parallel_size=1, refit_mode="in_memory",
                kv_cache_fraction=0.3, max_seq_len=64, max_batch_size=8, offload_during_training=True)
    return trtllm_engine.TrtllmEngine.build("/models/src", **{**args, **over})


def _expected_weights(policy):
    """What the engine must hold: the policy's current tensors in bf16 (the engine's dtype)."""
    return {name: t.to(torch.bfloat16) for name, t in policy.state.items()}


def _same(loaded, expected):
    return loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def _rpc_names(rpcs):
    names = []
    for method, args in rpcs:
        if method in ("sleep", "wakeup"):
            names.append((method, args[0]))
        elif method == "update_weights":
            names.append((method, "finalize" if args[0] is None else "load"))
        else:
            names.append((method,))
    return names


PARAMS = SamplingParams(n=2, max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=5, stop_token_ids=(2, 9), seed=4)

# --------------------------------------------------------------------------- configuration


def test_asking_for_trtllm_without_it_is_an_error_not_a_switch(monkeypatch):
    from optune_nemo.generation import build_engine

    monkeypatch.setattr(trtllm_engine, "HAVE_TRTLLM", False)
    cfg = load_config(["generation.engine=trtllm", "policy.hf_path=smollm2"]).generation
    with pytest.raises(ConfigError, match="TensorRT-LLM 1.2.1.*NGC container"):
        build_engine(cfg, policy=None, tokenizer=None, dist=types.SimpleNamespace(world_size=1), hf_dir="/x",
                     max_sequence_length=64)


def test_trtllm_needs_an_hf_model():
    from optune_nemo.config import validate
    from optune_nemo.train import check_plugins

    cfg = load_config(["generation.engine=trtllm", "policy.hf_path=null"])
    validate(cfg)
    with pytest.raises(ConfigError, match="policy.hf_path"):
        check_plugins(cfg)                 # what an engine needs is the generation family's check


def test_the_stand_in_rejects_what_trtllm_1_2_rejects(trt):
    with pytest.raises(ValueError, match="invalid argument: enable_sleep_mode"):
        trt(model="/m", enable_sleep_mode=True)                   # vLLM's name
    with pytest.raises(ValueError, match="invalid argument: sleep_config"):
        trt(model="/m", sleep_config=object())                    # the 1.3 API
    with pytest.raises(ValueError, match="orchestrator_type='ray'"):
        trt(model="/m", ray_worker_extension_cls=trtllm_engine.WORKER_EXTENSION)
    with pytest.raises(ValueError, match="multiple returns"):
        StandInSamplingParams(n=2, top_k=1)
    with pytest.raises(TypeError):
        StandInSamplingParams(max_new_tokens=3)                    # not a 1.2 field


def test_engine_arguments_exist_in_trtllm_1_2(trt):
    eng = _build(FakePolicy())
    kw = eng.llm.kwargs
    assert kw["model"] == "/models/src" and kw["dtype"] == "bfloat16"
    assert (kw["orchestrator_type"], kw["ray_worker_extension_cls"], kw["enable_sleep"]) == \
        ("ray", "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension", True)
    assert kw["sampler_type"] == "TRTLLMSampler"
    assert (kw["tensor_parallel_size"], kw["max_seq_len"], kw["max_batch_size"]) == (1, 64, 8)
    assert kw["kv_cache_config"].free_gpu_memory_fraction == 0.3 and kw["kv_cache_config"].enable_block_reuse
    assert kw["skip_tokenizer_init"] is True                    # token ids in and out
    assert kw["cuda_graph_config"].enable_padding is True       # sleeping keeps CUDA graphs (as verl)
    assert kw["allreduce_strategy"] == "NCCL"                   # not the custom all-reduce's unmanaged buffers
    plain = _build(FakePolicy(), offload_during_training=False).llm.kwargs
    assert "enable_sleep" not in plain and "allreduce_strategy" not in plain and "cuda_graph_config" not in plain


def test_slurm_tasks_get_mpi_off_and_a_private_ray_before_import(monkeypatch):
    """The module sets them at import under Slurm, before tensorrt_llm is imported, never overriding a user's."""
    import importlib

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("TLLM_DISABLE_MPI", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    importlib.reload(trtllm_engine)
    import os

    assert os.environ["TLLM_DISABLE_MPI"] == "1" and os.environ["RAY_ADDRESS"] == "ray://head:10001"
    monkeypatch.delenv("RAY_ADDRESS")
    importlib.reload(trtllm_engine)
    assert os.environ["RAY_ADDRESS"] == "local"


def test_rebuild_mode_needs_neither_ray_nor_sleep(trt):
    eng = _build(FakePolicy(), refit_mode="rebuild")
    eng.generate([[1]], PARAMS, keys=[0])
    kw = eng.llm.kwargs
    assert not {"orchestrator_type", "ray_worker_extension_cls", "enable_sleep"} & set(kw)
    assert kw["dtype"] == "bfloat16"


# --------------------------------------------------------------------------- requests and results


def test_one_seeded_request_per_prompt(trt):
    eng = _build()
    out = eng.generate([[1, 2], [3]], PARAMS, keys=[11, 12])
    (prompts, requests), = eng.llm.calls
    assert prompts == [[1, 2], [3]] and len(requests) == 2
    for sp, key in zip(requests, [11, 12]):
        assert sp.seed == mix_seed(4, key)
        assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k) == (2, 8, 0.7, 0.9, 5)
        assert (sp.stop_token_ids, sp.include_stop_str_in_output, sp.end_id, sp.detokenize) == ([2, 9], True, -1,
                                                                                                 False)
    # the stand-in's tokens carry each request's seed and sample index
    assert [s.token_ids for s in out[0]] == [[mix_seed(4, 11) % 1000 + 3, 3, 5, 2],
                                             [mix_seed(4, 11) % 1000 + 3, 4, 5, 2]]
    assert out[1][0].token_ids[0] == mix_seed(4, 12) % 1000 + 3


def test_a_prompts_request_does_not_depend_on_its_batch(trt):
    eng = _build()
    eng.generate([[5, 5, 5]], PARAMS, keys=[7])
    eng.generate([[1], [5, 5, 5], [2, 2]], PARAMS, keys=[3, 7, 8])
    alone, batched = eng.llm.calls[0][1][0], eng.llm.calls[1][1][1]
    assert alone == batched and eng.llm.calls[1][1][0].seed != alone.seed


def test_finish_reason_comes_from_trtllm_and_the_stop_token_stays(trt):
    eng = _build()
    replies = iter([[([5, 2], "stop"), ([7, 8, 2], "length")], [([4], "length"), ([9], "stop")]])
    eng.llm.reply = lambda prompt, sp: next(replies)
    out = eng.generate([[1], [2]], PARAMS, keys=[0, 1])
    # [7, 8, 2] ends with a stop token yet TensorRT-LLM says "length": its word is taken, not inferred
    assert [[(s.token_ids, s.finish_reason) for s in g] for g in out] == \
        [[([5, 2], "stop"), ([7, 8, 2], "length")], [([4], "length"), ([9], "stop")]]
    assert out[0][0].text == "5 2"


@pytest.mark.parametrize("reason", ["timeout", "cancelled", None])
def test_any_other_finish_reason_is_an_error(trt, reason):
    eng = _build()
    eng.llm.reply = lambda prompt, sp: [([5], reason)] * sp.n
    with pytest.raises(RuntimeError, match=f"finished with reason {reason!r}"):
        eng.generate([[1]], PARAMS, keys=[0])


def test_a_stop_without_its_stop_token_is_an_error(trt):
    eng = _build()
    eng.llm.reply = lambda prompt, sp: [([5, 6], "stop")] * sp.n
    with pytest.raises(RuntimeError, match="must stay in the token ids"):
        eng.generate([[1]], PARAMS, keys=[0])


def test_greedy_with_n_samples_asks_for_one_and_repeats_it(trt):
    eng = _build()
    params = SamplingParams(n=2, max_new_tokens=4, temperature=0, stop_token_ids=(2,), seed=1)
    out = eng.generate([[1, 2]], params, keys=[0])
    sp = eng.llm.calls[0][1][0]
    assert (sp.n, sp.top_k, sp.temperature, sp.top_p) == (1, 1, None, None)
    assert len(out[0]) == 2 and out[0][0].token_ids == out[0][1].token_ids and out[0][0] is not out[0][1]


def test_prompt_and_key_errors(trt):
    eng = _build()
    with pytest.raises(ValueError, match="model.seq_length"):
        eng.generate([[1] * 60], PARAMS, keys=[0])               # 60 + 8 > 64
    with pytest.raises(ValueError, match="keys"):
        eng.generate([[1], [2]], PARAMS, keys=[0])
    assert eng.llm.calls == []


# --------------------------------------------------------------------------- weights follow the policy


def test_generation_after_training_uses_the_trained_weights_even_without_begin_generation(trt):
    policy = FakePolicy()
    eng = _build(policy)
    eng.generate([[1]], PARAMS, keys=[0])                        # pending since construction (resume)
    assert _same(eng.llm.snapshots[-1]["GPU-a"], _expected_weights(policy))
    eng.generate([[1]], PARAMS, keys=[0])
    assert policy.hf_weights_calls == [torch.bfloat16]           # nothing changed: no second refit
    eng.end_generation()
    policy.train_step()
    # the held-out evaluation after the last iteration, called without begin_generation()
    eng.generate([[1]], PARAMS, keys=[0])
    assert _same(eng.llm.snapshots[-1]["GPU-a"], _expected_weights(policy))
    assert not _same(eng.llm.snapshots[0]["GPU-a"], _expected_weights(policy))


WEIGHTS = ["model", "draft_model"]
RUNTIME = ["kv_cache", "sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra", "executor_extra"]


def test_sleep_releases_every_releasable_tag_of_1_2():
    """verl's set: every ExecutorMemoryType but the never-captured init scopes."""
    assert set(WEIGHTS) | set(RUNTIME) == {t for t in MEMORY_TAGS if not t.startswith("_no_capture")}


def test_iteration_order_sleep_wake_refit(trt):
    policy = FakePolicy()
    eng = _build(policy)
    eng.begin_generation()
    eng.generate([[1]], PARAMS, keys=[0])
    eng.end_generation()
    eng.end_generation()                                         # idempotent
    policy.train_step()
    eng.begin_generation()
    eng.generate([[1]], PARAMS, keys=[0])
    assert _rpc_names(eng.llm.rpcs) == [
        ("report_device_id",), ("supports_partial_loading",),
        ("update_weights", "load"), ("update_weights", "finalize"),
        ("sleep", WEIGHTS + RUNTIME),
        ("wakeup", WEIGHTS), ("update_weights", "load"), ("update_weights", "finalize"), ("wakeup", RUNTIME)]
    assert _same(eng.llm.snapshots[-1]["GPU-a"], _expected_weights(policy))


def test_no_sleep_without_offload_or_without_a_policy(trt):
    eng = _build(FakePolicy(), offload_during_training=False)
    eng.generate([[1]], PARAMS, keys=[0])
    eng.end_generation()
    eng.generate([[1]], PARAMS, keys=[0])
    assert [m for m, _ in eng.llm.rpcs] == ["report_device_id", "supports_partial_loading"] + ["update_weights"] * 4
    fixed = _build(None)
    fixed.end_generation()
    fixed.generate([[1]], PARAMS, keys=[0])
    assert fixed.llm.rpcs == []


def test_refit_is_sent_in_bounded_buckets(trt, monkeypatch):
    policy = FakePolicy()
    monkeypatch.setattr(trtllm_engine, "REFIT_BUCKET_BYTES", 24 * 8 * 2)   # one up_proj in bf16
    eng = _build(policy)
    eng.generate([[1]], PARAMS, keys=[0])
    loads = [a[0]["GPU-a"] for m, a in eng.llm.rpcs if m == "update_weights" and a[0] is not None]
    assert [[name for name, _ in load] for load in loads] == [["model.embed_tokens.weight"],
                                                             ["model.layers.0.mlp.up_proj.weight"],
                                                             ["model.norm.weight"]]
    assert eng.llm.rpcs[-1] == ("update_weights", (None,))
    assert _same(eng.llm.snapshots[-1]["GPU-a"], _expected_weights(policy))


def test_buckets_keep_order_and_bound():
    tensors = [(str(i), torch.zeros(n)) for i, n in enumerate([3, 3, 5, 1, 1, 1])]   # float32: 4 bytes each
    groups = list(trtllm_engine.buckets(tensors, max_bytes=24))
    assert [[name for name, _ in g] for g in groups] == [["0", "1"], ["2", "3"], ["4", "5"]]


def test_generation_tp2_gets_the_full_weights_on_every_engine_gpu(trt, monkeypatch):
    monkeypatch.setattr(StandInLLM, "engine_uuids", ["GPU-b", "GPU-a"])
    monkeypatch.setattr(StandInLLM, "producer_gpus", {"GPU-a": 0, "GPU-b": 1})
    policy = FakePolicy()
    eng = _build(policy, tensor_parallel_size=2)
    assert eng.engine_gpus == {"GPU-b": 1, "GPU-a": 0}
    eng.generate([[1]], PARAMS, keys=[0])
    for uuid in ("GPU-a", "GPU-b"):                              # each rank shards the whole tensors itself
        assert _same(eng.llm.snapshots[-1][uuid], _expected_weights(policy))


def test_an_engine_gpu_the_trainer_cannot_see_is_a_config_error(trt, monkeypatch):
    monkeypatch.setattr(StandInLLM, "engine_uuids", ["GPU-a", "GPU-z"])
    with pytest.raises(ConfigError, match=r"^generation.tensor_parallel_size: .*GPU-z.*generation.refit=rebuild"):
        _build(FakePolicy(), tensor_parallel_size=2)
    assert not StandInLLM.instances[-1].alive                    # its workers were shut down


def test_handles_keyed_by_one_gpu_only_fail_in_the_stand_in(trt, monkeypatch):
    """The failure the engine avoids: a dict with one UUID reaching a TP=2 engine (rlhf_utils L64-L65)."""
    monkeypatch.setattr(StandInLLM, "engine_uuids", ["GPU-a", "GPU-b"])
    llm = StandInLLM(model="/m", orchestrator_type="ray", ray_worker_extension_cls=trtllm_engine.WORKER_EXTENSION)
    with pytest.raises(ValueError, match="Device UUID GPU-b not found"):
        llm._collective_rpc("update_weights", args=({"GPU-a": []},))


def test_rebuild_mode_restarts_on_a_fresh_export_and_reuses_its_directory(trt):
    policy = FakePolicy()
    eng = _build(policy, refit_mode="rebuild")
    assert eng.llm is None                                       # started by the first generation, on an export
    eng.generate([[1]], PARAMS, keys=[0])
    first = eng.llm
    assert first.kwargs["model"] == str(policy.exports[0])
    eng.end_generation()                                         # offloading: the engine stops
    assert not first.alive and eng.llm is None
    policy.train_step()
    eng.generate([[1]], PARAMS, keys=[0])
    assert len(policy.exports) == 2 and policy.exports[0] == policy.exports[1]
    assert eng.llm.kwargs["model"] == str(policy.exports[1]) and eng.llm.calls
    export_root = policy.exports[0].parent
    eng.shutdown()
    assert not export_root.exists() and not StandInLLM.instances[-1].alive


class FusedPolicy(FakePolicy):
    """Two decoder layers with separate q/k/v and gate/up tensors (HF names), as policy.hf_weights yields."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.state = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g)}
        for i in range(2):
            p = f"model.layers.{i}."
            for name, shape in (("self_attn.q_proj", (8, 8)), ("self_attn.k_proj", (4, 8)),
                                ("self_attn.v_proj", (4, 8)), ("self_attn.o_proj", (8, 8)),
                                ("mlp.gate_proj", (12, 8)), ("mlp.up_proj", (12, 8)), ("mlp.down_proj", (8, 12))):
                self.state[p + name + ".weight"] = torch.randn(*shape, generator=g)
        self.state["model.norm.weight"] = torch.randn(8, generator=g)


@pytest.mark.parametrize("partial", [False, True])
def test_tiny_buckets_split_fused_modules_only_with_partial_loading(trt, monkeypatch, partial):
    """A bucket of one k_proj (64 bytes in bf16) would split q/k/v: an engine without partial loading gets
    whole qkv and gate_up groups per call, one with it gets the tiny buckets; both end with every weight."""
    monkeypatch.setattr(StandInLLM, "partial_loading", partial)
    monkeypatch.setattr(trtllm_engine, "REFIT_BUCKET_BYTES", 4 * 8 * 2)
    policy = FusedPolicy()
    eng = _build(policy)
    eng.generate([[1]], PARAMS, keys=[0])
    loads = [[name for name, _ in a[0]["GPU-a"]] for m, a in eng.llm.rpcs if m == "update_weights" and a[0]]
    qkv = [load for load in loads if any("q_proj" in n for n in load)]
    if partial:
        assert ["model.layers.0.self_attn.q_proj.weight"] in loads     # split: q alone, k alone ...
        assert ["model.layers.0.self_attn.k_proj.weight"] in loads
    else:
        assert qkv == [[f"model.layers.{i}.self_attn.{x}_proj.weight" for x in "qkv"] for i in range(2)]
        assert [f"model.layers.0.mlp.{x}_proj.weight" for x in ("gate", "up")] in loads
    assert sorted(n for load in loads for n in load) == sorted(policy.state)        # each tensor exactly once
    assert _same(eng.llm.snapshots[-1]["GPU-a"], _expected_weights(policy))


def test_fusion_groups():
    group = trtllm_engine.fusion_group
    assert group("model.layers.3.self_attn.q_proj.weight") == group("model.layers.3.self_attn.v_proj.bias") \
        == "model.layers.3.qkv"
    assert group("model.layers.3.mlp.up_proj.weight") == "model.layers.3.gate_up"
    assert group("model.layers.3.self_attn.o_proj.weight") == "model.layers.3.self_attn.o_proj.weight"
    assert group("model.layers.4.self_attn.q_proj.weight") != group("model.layers.3.self_attn.q_proj.weight")
