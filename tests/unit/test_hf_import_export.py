"""HF Llama / Mistral / Qwen2 -> megatron GPTModel (TP=1, in-process) and back: logits parity with
transformers, exact tensor round trip, config mapping and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import KINDS, VOCAB, hf_logits, make_hf_model, megatron_logits, tokens
from safetensors.torch import load_file

from optune_nemo.megatron.hf_import import (
    SafetensorsReader,
    check_parallel_sizes,
    hf_config_to_model_config,
    load_hf_weights_into,
    read_hf_config,
)


@pytest.fixture(scope="module")
def dist1():
    from optune_nemo.megatron.cpu_compat import model_parallel_seed
    from optune_nemo.megatron.parallel import init_distributed

    d = init_distributed(1, 1)
    model_parallel_seed(0)
    return d


class _NoTokenizer:
    vocab_size, eos_token_id, pad_token_id, stop_token_ids = VOCAB, 2, 0, (2,)

    def save(self, directory):
        pass


def _import(hf_dir):
    from optune_nemo.megatron.model import build_gpt_model

    mc = hf_config_to_model_config(hf_dir)
    model = build_gpt_model(mc, vocab_size=read_hf_config(hf_dir).vocab_size)
    load_hf_weights_into(model, hf_dir, model_cfg=mc, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    return model, mc


@pytest.mark.parametrize("kind", list(KINDS))
def test_import_logits_match_transformers_and_export_round_trips(kind, tmp_path, dist1):
    from optune_nemo.megatron.hf_export import export_hf

    hf = make_hf_model(kind, seed=3)
    hf.save_pretrained(tmp_path / "src")
    model, mc = _import(tmp_path / "src")
    ids = tokens(batch=2, length=16)
    ref = hf_logits(hf, ids)
    got = megatron_logits(model, ids)
    assert got.shape[-1] == 256                      # padded vocabulary
    assert (got[..., :VOCAB] - ref).abs().max() < 1e-4
    assert ref.std() > 0.5                           # logits are not trivially small

    info = read_hf_config(tmp_path / "src")
    export_hf([model], mc, tmp_path / "out", tokenizer=_NoTokenizer(), architecture=info.architecture,
              hf_config=info.config)
    src, out = load_file(tmp_path / "src/model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    assert sorted(src) == sorted(out)
    for name in src:
        assert torch.equal(src[name], out[name]), name
    assert json.loads((tmp_path / "out/config.json").read_text())["architectures"] == [info.architecture]
    assert torch.equal(hf_logits(tmp_path / "out", ids), ref)


def test_config_mapping(tmp_path):
    make_hf_model("mistral").save_pretrained(tmp_path / "m")
    mc = hf_config_to_model_config(tmp_path / "m")
    assert (mc.num_layers, mc.hidden_size, mc.ffn_hidden_size) == (2, 64, 96)
    assert (mc.num_attention_heads, mc.num_query_groups, mc.kv_channels) == (4, 2, 24)
    assert mc.untie_embeddings_and_output_weights and not mc.add_qkv_bias
    assert mc.seq_length == 128 and mc.norm_epsilon == 1e-5
    make_hf_model("qwen2_tied").save_pretrained(tmp_path / "q")
    mq = hf_config_to_model_config(tmp_path / "q", seq_length=64)
    assert mq.add_qkv_bias and not mq.untie_embeddings_and_output_weights
    assert mq.rotary_base == 1_000_000 and mq.kv_channels is None and mq.seq_length == 64


def test_sharded_safetensors_are_read(tmp_path, dist1):
    hf = make_hf_model("llama_untied", seed=5)
    hf.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src/model.safetensors.index.json").is_file()
    model, _ = _import(tmp_path / "src")
    ids = tokens()
    assert (megatron_logits(model, ids)[..., :VOCAB] - hf_logits(hf, ids)).abs().max() < 1e-4


def test_sharded_export(tmp_path, dist1):
    from optune_nemo.megatron.hf_export import export_hf

    hf = make_hf_model("llama_tied", seed=6)
    hf.save_pretrained(tmp_path / "src")
    model, mc = _import(tmp_path / "src")
    export_hf([model], mc, tmp_path / "out", tokenizer=_NoTokenizer(), architecture="LlamaForCausalLM",
              max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = tokens()
    assert torch.equal(hf_logits(tmp_path / "out", ids), hf_logits(hf, ids))


# --------------------------------------------------------------------------- refusals


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures must be one of"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "rope scaling 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act must be silu"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_configs_are_refused(tmp_path, changes, match):
    make_hf_model("llama_tied").save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        hf_config_to_model_config(tmp_path)


def test_sliding_window_shorter_than_seq_length_is_refused(tmp_path):
    make_hf_model("mistral", sliding_window=32).save_pretrained(tmp_path)
    assert hf_config_to_model_config(tmp_path).seq_length == 32     # default capped at the window
    with pytest.raises(ValueError, match="model.seq_length: 64 exceeds the sliding window 32"):
        hf_config_to_model_config(tmp_path, seq_length=64)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        read_hf_config(tmp_path)
    make_hf_model("llama_tied").config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither model.safetensors"):
        SafetensorsReader(tmp_path)


def test_tp_must_divide_kv_heads(tmp_path):
    make_hf_model("llama_tied").save_pretrained(tmp_path)
    mc = hf_config_to_model_config(tmp_path)
    check_parallel_sizes(mc, tp_size=2, pp_size=2)
    with pytest.raises(ValueError, match=r"--tp: 4 must divide the model's num_query_groups \(KV heads\) = 2"):
        check_parallel_sizes(mc, tp_size=4, pp_size=1)


def test_weights_contradicting_the_config_are_refused(tmp_path, dist1):
    from optune_nemo.megatron.model import build_gpt_model

    make_hf_model("llama_untied").save_pretrained(tmp_path)
    mc = hf_config_to_model_config(tmp_path)
    _edit_config(tmp_path, intermediate_size=80)          # the tensors still say 96
    bad = hf_config_to_model_config(tmp_path)
    model = build_gpt_model(bad, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"gate_proj.weight' has shape \[96, 64\], the config implies \[80, 64\]"):
        load_hf_weights_into(model, tmp_path, model_cfg=bad, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    assert mc.ffn_hidden_size == 96


def test_export_refuses_non_empty_out_dir(tmp_path, dist1):
    from optune_nemo.megatron.hf_export import export_hf

    make_hf_model("llama_tied").save_pretrained(tmp_path / "src")
    model, mc = _import(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_hf([model], mc, tmp_path / "out", tokenizer=_NoTokenizer(), architecture="LlamaForCausalLM")
    with pytest.raises(ValueError, match="architecture: must be one of"):
        export_hf([model], mc, tmp_path / "new", tokenizer=_NoTokenizer(), architecture="GPT2LMHeadModel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
