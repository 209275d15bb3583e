"""The TensorRT-LLM engine's wiring, on CPU. TensorRT-LLM cannot be installed here: a stand-in module
with the real API's shape (LLM.generate -> outputs[i].outputs[j].token_ids, SamplingParams,
_collective_rpc) checks what the engine sends and how it maps results; the real engine is tested on a
GPU by tests/gpu/test_trtllm.py (pytest -m trtllm, docs/generation.md)."""

import sys
import types

import pytest

from optune_nemo.config import ConfigError, load_config
from optune_nemo.generation import trtllm_engine
from optune_nemo.types import SamplingParams


def test_asking_for_trtllm_without_it_is_an_error_not_a_switch(monkeypatch):
    from optune_nemo.generation import build_engine

    monkeypatch.setattr(trtllm_engine, "HAVE_TRTLLM", False)
    cfg = load_config(["generation.engine=trtllm", "policy.hf_path=smollm2"]).generation
    with pytest.raises(ConfigError, match="TensorRT-LLM.*NGC container|optune-nemo\\[gpu\\]"):
        build_engine(cfg, policy=None, tokenizer=None, dist=None, vocab_size=10, max_sequence_length=64)


def test_trtllm_needs_an_hf_model():
    from optune_nemo.config import validate

    with pytest.raises(ConfigError, match="policy.hf_path"):
        validate(load_config(["generation.engine=trtllm", "policy.hf_path=null"]))


class _FakeLLM:
    def __init__(self, replies):
        self.replies, self.rpcs, self.calls = replies, [], []

    def generate(self, prompts, sp, use_tqdm=False):
        self.calls.append((prompts, sp))
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=r) for r in self.replies[i]])
                for i in range(len(prompts))]

    def _collective_rpc(self, name, args=()):
        self.rpcs.append((name, args))


class _Tok:
    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture
def fake_trtllm(monkeypatch):
    mod = types.ModuleType("tensorrt_llm")

    class FakeSamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    mod.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "tensorrt_llm", mod)
    monkeypatch.setattr(trtllm_engine, "HAVE_TRTLLM", True)


def _engine(llm, **kw):
    args = dict(tokenizer=_Tok(), tensor_parallel_size=1, refit_mode="in_memory", hf_dir="/x",
                kv_cache_fraction=0.3, max_seq_len=64, max_batch_size=8, offload_during_training=True)
    return trtllm_engine.TrtllmEngine(llm, **{**args, **kw})


def test_generate_maps_params_and_finish_reasons(fake_trtllm):
    llm = _FakeLLM([[[5, 6, 2], [7, 8, 9]], [[3]]])
    out = _engine(llm).generate([[1, 2], [3]], SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=0,
                                                               max_new_tokens=3, stop_token_ids=(2,), seed=4),
                                keys=[0, 1])
    (prompts, sp), = llm.calls
    assert prompts == [[1, 2], [3]]
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.stop_token_ids) == \
        (2, 3, 0.7, 0.9, None, 4, [2])
    assert [s.finish_reason for s in out[0]] == ["stop", "length"]
    assert out[0][0].text == "5 6 2" and out[1][0].token_ids == [3]


def test_greedy_uses_top_k_1(fake_trtllm):
    llm = _FakeLLM([[[1]]])
    _engine(llm).generate([[1]], SamplingParams(n=1, temperature=0, max_new_tokens=1), keys=[0])
    sp = llm.calls[0][1]
    assert sp.top_k == 1 and sp.temperature is None


def test_sleep_during_training_and_wake_before_generation(fake_trtllm):
    llm = _FakeLLM([[[1]]])
    eng = _engine(llm)
    eng.end_generation()
    eng.end_generation()                     # idempotent
    assert [name for name, _ in llm.rpcs] == ["sleep"]
    eng.generate([[1]], SamplingParams(n=1, max_new_tokens=1), keys=[0])
    assert [name for name, _ in llm.rpcs] == ["sleep", "wakeup"]
    eng2 = _engine(_FakeLLM([]), offload_during_training=False)
    eng2.end_generation()
    assert eng2.llm.rpcs == []
