"""Hugging Face sequence-classification reward models <-> the Megatron reward model (TP=1, in-process):
scores equal plain transformers' (right- and left-padded), exact tensor round trips, the refusals, and the
two reward types (`hf`, `megatron`) against each other and against transformers on rendered text."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import VOCAB, make_hf_model, tiny_tokenizer
from rm_tiny import PAD, hf_scores, make_hf_rm, random_seqs, save_hf_rm
from safetensors.torch import load_file

from optune_nemo.config import ConfigError, OptimConfig, RewardConfig
from optune_nemo.interfaces import Prompt


@pytest.fixture(scope="module")
def dist1():
    from optune_nemo.megatron.parallel import init_distributed

    return init_distributed(1, 1)


def _fresh_rm(src, dist, seed=1):
    """A reward model on the causal LM in `src` with a fresh head (what train_rm starts from)."""
    from optune_nemo.megatron.hf_import import hf_config_to_model_config, read_hf_config
    from optune_nemo.megatron.reward_model import RewardModelMeta, build_reward_model

    info = read_hf_config(src)
    meta = RewardModelMeta(hf_config_to_model_config(src, seq_length=64), VOCAB, PAD, info.architecture, info.config)
    rm = build_reward_model(meta, dist=dist, optim=OptimConfig(), precision="fp32", use_distributed_optimizer=False,
                            seed=seed)
    rm.load_hf_backbone(src)
    return rm


def _imported_rm(rm_dir, dist):
    """The Megatron reward model of a transformers-made reward-model directory."""
    from optune_nemo.megatron.hf_rm import SEQ_CLS_ARCHITECTURES, read_rm_config, rm_model_config
    from optune_nemo.megatron.reward_model import RewardModelMeta, build_reward_model

    cfg = read_rm_config(rm_dir, key="policy.hf_path")
    meta = RewardModelMeta(rm_model_config(rm_dir, key="policy.hf_path", seq_length=64), VOCAB,
                           cfg.get("pad_token_id"), SEQ_CLS_ARCHITECTURES[cfg["architectures"][0]], cfg)
    rm = build_reward_model(meta, dist=dist, optim=OptimConfig(), precision="fp32", use_distributed_optimizer=False,
                            seed=0)
    rm.load_hf_reward_model(rm_dir)
    return rm


@pytest.mark.parametrize("kind", ["llama_tied", "llama_untied", "qwen2_untied"])
def test_export_scores_like_transformers_and_keeps_the_backbone(kind, tmp_path, dist1):
    make_hf_model(kind, seed=2).save_pretrained(tmp_path / "src")
    rm = _fresh_rm(tmp_path / "src", dist1)
    seqs = random_seqs(7, seed=3) + [[PAD, PAD, 9, 10]]          # pad ids in front: not the end
    mine = rm.score(seqs, rows=3)
    out = rm.export_hf(tmp_path / "rm", tokenizer=None)
    assert out == tmp_path / "rm"
    for left in (False, True):
        ref = hf_scores(out, seqs, left=left)
        assert (mine - ref).abs().max() < 1e-4, (left, mine, ref)
    assert ref.std() > 0.1

    config = json.loads((out / "config.json").read_text())
    arch = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}[kind.split("_")[0]]
    assert config["architectures"] == [arch]
    assert len(config["id2label"]) == 1 and config["pad_token_id"] == PAD
    tensors, src = load_file(out / "model.safetensors"), load_file(tmp_path / "src/model.safetensors")
    assert tensors["score.weight"].shape == (1, 64)
    assert sorted(tensors) == sorted({*src, "score.weight"} - {"lm_head.weight"})
    for name in src:
        if name != "lm_head.weight":
            assert torch.equal(tensors[name], src[name]), name


@pytest.mark.parametrize("kind, shard", [("llama_tied", None), ("qwen2_tied", None), ("mistral", "40KB")])
def test_transformers_reward_model_imports_exactly(kind, shard, tmp_path, dist1):
    if shard:      # sharded safetensors with an index
        make_hf_rm(kind, seed=5).save_pretrained(tmp_path / "src", max_shard_size=shard)
        assert (tmp_path / "src/model.safetensors.index.json").is_file()
    else:
        save_hf_rm(kind, tmp_path / "src", seed=5)
    rm = _imported_rm(tmp_path / "src", dist1)
    seqs = random_seqs(6, seed=4)
    ref = hf_scores(tmp_path / "src", seqs)
    assert (rm.score(seqs, rows=6) - ref).abs().max() < 1e-4
    rm.export_hf(tmp_path / "out", tokenizer=None)
    a = {k: v for f in (tmp_path / "src").glob("*.safetensors") for k, v in load_file(f).items()}
    b = load_file(tmp_path / "out/model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- refusals


def _one_line(err, key):
    msg = str(err.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg, msg
    return msg


def test_refusals_name_the_key(tmp_path):
    from optune_nemo.megatron.hf_rm import read_rm_config

    save_hf_rm("llama_tied", tmp_path / "two", num_labels=2)
    with pytest.raises(ConfigError) as err:
        read_rm_config(tmp_path / "two", key="reward.path")
    assert "num_labels = 2" in _one_line(err, "reward.path")

    make_hf_model("llama_tied").save_pretrained(tmp_path / "lm")
    with pytest.raises(ConfigError) as err:
        read_rm_config(tmp_path / "lm", key="reward.path")
    assert "is a causal language model (LlamaForCausalLM), not a reward model" in _one_line(err, "reward.path")

    save_hf_rm("llama_tied", tmp_path / "other")
    cfg = json.loads((tmp_path / "other/config.json").read_text())
    (tmp_path / "other/config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2ForSequenceClassification"]}))
    with pytest.raises(ConfigError) as err:
        read_rm_config(tmp_path / "other", key="reward.path")
    assert "architectures must be LlamaForSequenceClassification" in _one_line(err, "reward.path")
    assert read_rm_config(tmp_path / "other", key="reward.path", any_architecture=True)["architectures"]

    with pytest.raises(ConfigError) as err:
        read_rm_config(tmp_path, key="reward.path")
    assert "no config.json" in _one_line(err, "reward.path")


def test_export_refusals_leave_nothing(tmp_path, dist1):
    from dataclasses import replace

    from optune_nemo.megatron.hf_rm import export_hf_rm

    make_hf_model("llama_tied").save_pretrained(tmp_path / "src")
    rm = _fresh_rm(tmp_path / "src", dist1)
    with pytest.raises(ConfigError, match="^policy.hf_path: exporting a Hugging Face reward model needs"):
        export_hf_rm(rm.model, replace(rm.meta, architecture=None), tmp_path / "a", tokenizer=None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b/keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_hf_rm(rm.model, rm.meta, tmp_path / "b", tokenizer=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "src"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- the reward types




def _close(got, want):
    """fp32 on the CPU (where these tests normally run): 1e-4; the reward types run in bf16 on a GPU: 5 %."""
    tol = 1e-4 if not torch.cuda.is_available() else 0.05 * max(1.0, float(want.abs().max()))
    return float((got - want).abs().max()) < tol


PROMPTS = [Prompt(i, t, (1,)) for i, t in enumerate(["hello world", "what is 2 + 3 ?", "hello", "world ?"])]
RESPONSES = ["w7 w8 w9", "2", "w10 w11 w12 w13 w14 w15", "world"]


def _text_scores(rm_dir, *, one_by_one=False):
    """Plain transformers on the text: its tokenizer's chat template with the generation prompt, the response,
    then EOS; right-padded batch, or one sequence at a time."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    seqs = []
    for p, r in zip(PROMPTS, RESPONSES):
        text = tok.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True,
                                       tokenize=False) + r
        seqs.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    assert len({tuple(s) for s in seqs}) == len(seqs) and all(len(s) > 6 for s in seqs)   # the words were kept
    if one_by_one:
        return torch.cat([hf_scores(rm_dir, [s]) for s in seqs])
    return hf_scores(rm_dir, seqs)


# Qwen2 directories are left out here: transformers 5 loads any tokenizer in them as its Qwen2 BPE class,
# which drops hf_tiny's word-level vocabulary (the Qwen2 weights are compared on token ids above)
@pytest.mark.parametrize("kind", ["llama_untied", "mistral"])
def test_hf_and_megatron_rewards_equal_transformers(kind, tmp_path, dist1):
    from optune_nemo.reward import build_reward

    save_hf_rm(kind, tmp_path / "rm", seed=8)
    want = _text_scores(tmp_path / "rm")
    got = {}
    for rtype in ("hf", "megatron"):
        reward = build_reward(RewardConfig(type=rtype, path=str(tmp_path / "rm"), batch_size=3), dist=dist1)
        reward.prepare()
        got[rtype] = torch.tensor(reward.score(PROMPTS, RESPONSES))
        reward.release()
        assert reward.scored == len(PROMPTS) and reward.calls == 2     # batches of 3, length-sorted
    for rtype, scores in got.items():
        assert _close(scores, want), (rtype, scores, want)
    assert _close(got["hf"], got["megatron"])


def test_rewards_without_a_pad_id_score_the_last_token(tmp_path, dist1):
    from optune_nemo.reward import build_reward

    save_hf_rm("llama_tied", tmp_path / "rm", seed=9)
    cfg = json.loads((tmp_path / "rm/config.json").read_text())
    cfg.pop("pad_token_id")
    (tmp_path / "rm/config.json").write_text(json.dumps(cfg))
    want = _text_scores(tmp_path / "rm", one_by_one=True)        # transformers refuses batches without a pad id
    for rtype in ("hf", "megatron"):
        reward = build_reward(RewardConfig(type=rtype, path=str(tmp_path / "rm"), batch_size=4), dist=dist1)
        reward.prepare()
        assert _close(torch.tensor(reward.score(PROMPTS, RESPONSES)), want), rtype


@pytest.mark.parametrize("rtype", ["hf", "megatron"])
def test_reward_types_refuse_bad_directories(rtype, tmp_path, dist1):
    from optune_nemo.reward import build_reward

    save_hf_rm("llama_tied", tmp_path / "two", num_labels=2)
    make_hf_model("llama_tied").save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    for directory, match in ((tmp_path / "two", "num_labels = 2"), (tmp_path / "lm", "causal language model")):
        with pytest.raises(ConfigError) as err:
            build_reward(RewardConfig(type=rtype, path=str(directory)), dist=dist1)
        assert match in _one_line(err, "reward.path")
    if rtype == "megatron":
        (tmp_path / "empty").mkdir()
        with pytest.raises(ConfigError) as err:
            build_reward(RewardConfig(type=rtype, path=str(tmp_path / "empty")), dist=dist1)
        assert "neither a train_rm exp_dir nor one of its checkpoints" in _one_line(err, "reward.path")


def test_megatron_reward_leaves_the_run_s_random_streams_alone(tmp_path, dist1):
    from optune_nemo.reward import build_reward

    save_hf_rm("llama_tied", tmp_path / "rm", seed=10)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    build_reward(RewardConfig(type="megatron", path=str(tmp_path / "rm")), dist=dist1)
    assert torch.equal(torch.rand(3), want)


def test_make_hf_rm_is_what_transformers_builds():
    """The test helper's models carry the architecture and label count they claim."""
    m = make_hf_rm("qwen2_untied")
    assert type(m).__name__ == "Qwen2ForSequenceClassification" and m.config.num_labels == 1
    assert m.score.weight.shape == (1, 64) and m.score.bias is None
