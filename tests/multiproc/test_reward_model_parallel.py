"""The Megatron reward model on two gloo ranks: TP=2 and PP=2 scores equal plain transformers' and the
exports are exact; training steps at TP=2, PP=2 and DP=2 (distributed optimizer) equal one rank's; the
`megatron` reward at TP=2 and the `hf` reward dealt over two ranks equal transformers on rendered text."""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_ranks
from hf_tiny import VOCAB, make_hf_model
from rm_tiny import PAD, hf_scores, random_seqs, save_hf_rm
from safetensors.torch import load_file

pytestmark = pytest.mark.multiproc


def _meta(src, kind):
    from optune_nemo.megatron.hf_import import hf_config_to_model_config, read_hf_config
    from optune_nemo.megatron.hf_rm import SEQ_CLS_ARCHITECTURES, read_rm_config, rm_model_config
    from optune_nemo.megatron.reward_model import RewardModelMeta

    if kind == "hf_rm":
        cfg = read_rm_config(src, key="x")
        return RewardModelMeta(rm_model_config(src, key="x", seq_length=64), VOCAB, cfg["pad_token_id"],
                               SEQ_CLS_ARCHITECTURES[cfg["architectures"][0]], cfg)
    info = read_hf_config(src)
    return RewardModelMeta(hf_config_to_model_config(src, seq_length=64), VOCAB, PAD, info.architecture, info.config)


def _build(src, kind, tp, pp, *, optim=None, dist_opt=False):
    from optune_nemo.config import OptimConfig
    from optune_nemo.megatron.parallel import init_distributed
    from optune_nemo.megatron.reward_model import build_reward_model

    d = init_distributed(tp, pp)
    rm = build_reward_model(_meta(src, kind), dist=d, optim=optim or OptimConfig(), precision="fp32",
                            use_distributed_optimizer=dist_opt, seed=1)
    if kind == "hf_rm":
        rm.load_hf_reward_model(src)
    else:
        rm.load_hf_backbone(src)
    return rm


def _score_and_export(rank, src, kind, out, tp, pp):
    rm = _build(src, kind, tp, pp)
    scores = rm.score(random_seqs(6, seed=3), rows=4)
    rm.export_hf(out, tokenizer=None)
    return scores


@pytest.mark.parametrize("kind, tp, pp", [("llama_untied", 2, 1), ("qwen2_untied", 2, 1), ("llama_tied", 1, 2)])
def test_fresh_reward_model_scores_like_its_export(kind, tp, pp, tmp_path):
    make_hf_model(kind, seed=6).save_pretrained(tmp_path / "src")
    results = run_ranks(_score_and_export, 2, str(tmp_path / "src"), "causal", str(tmp_path / "rm"), tp, pp)
    ref = hf_scores(tmp_path / "rm", random_seqs(6, seed=3), left=True)
    for scores in results:
        assert (scores - ref).abs().max() < 1e-4, (scores, ref)
    src, out = load_file(tmp_path / "src/model.safetensors"), load_file(tmp_path / "rm/model.safetensors")
    for name in src:
        if name != "lm_head.weight":
            assert torch.equal(out[name], src[name]), name
    # the head is the documented seeded draw, whatever the layout
    from optune_nemo.runtime.seeding import generator

    torch.testing.assert_close(out["score.weight"], torch.randn(1, 64, generator=generator(1, "reward_head")) /
                               math.sqrt(65))


@pytest.mark.parametrize("kind, tp, pp", [("llama_tied", 2, 1), ("qwen2_tied", 1, 2)])
def test_transformers_reward_model_imports_exactly(kind, tp, pp, tmp_path):
    save_hf_rm(kind, tmp_path / "src", seed=7)
    results = run_ranks(_score_and_export, 2, str(tmp_path / "src"), "hf_rm", str(tmp_path / "out"), tp, pp)
    ref = hf_scores(tmp_path / "src", random_seqs(6, seed=3))
    for scores in results:
        assert (scores - ref).abs().max() < 1e-4
    a, b = load_file(tmp_path / "src/model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- training in every layout


def _pairs():
    from optune_nemo.data.preferences import ComparisonPair

    chosen, rejected = random_seqs(12, seed=21), random_seqs(12, seed=22)
    return [ComparisonPair(i, tuple(c), tuple(r), 0.5 * (i % 2)) for i, (c, r) in enumerate(zip(chosen, rejected))]


def _train(rank, src, tp, pp, dist_opt):
    from optune_nemo.config import OptimConfig

    rm = _build(src, "causal", tp, pp, optim=OptimConfig(lr=2e-3, warmup_ratio=0.0, adam_eps=1e-4),
                dist_opt=dist_opt)
    pairs = _pairs()
    sch = rm.scheduler(3)
    steps = [rm.train_pairs(pairs, list(range(k * 4, k * 4 + 4)), micro_batch_size=2, scheduler=sch)
             for k in range(3)]
    return [(s["loss"], s["grad_norm"], s["num_pairs"]) for s in steps], rm.score([p.chosen for p in pairs], rows=4)


@pytest.fixture(scope="module")
def trained_on_one_rank(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    make_hf_model("llama_untied", seed=8).save_pretrained(src)
    return str(src), run_ranks(_train, 1, str(src), 1, 1, False)[0]


@pytest.mark.parametrize("tp, pp, dist_opt", [(2, 1, False), (1, 2, False), (1, 1, True)],
                         ids=["tp2", "pp2", "dp2-distopt"])
def test_training_steps_equal_one_rank(trained_on_one_rank, tp, pp, dist_opt):
    src, (ref_steps, ref_scores) = trained_on_one_rank
    for steps, scores in run_ranks(_train, 2, src, tp, pp, dist_opt):
        for (loss, gnorm, n), (rloss, rgnorm, rn) in zip(steps, ref_steps):
            assert n == rn == 4
            assert abs(loss - rloss) < 1e-5 and abs(gnorm - rgnorm) < 1e-5 * max(1.0, rgnorm), (steps, ref_steps)
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
    assert ref_steps[0][0] != ref_steps[-1][0]      # the steps did train


# --------------------------------------------------------------------------- the reward types


PROMPTS = ["hello world", "what is 2 + 3 ?", "hello", "world ?", "is 3 ?"]
RESPONSES = ["w7 w8 w9", "2", "w10 w11 w12 w13 w14 w15", "world", "3"]


def _rewards(rank, rm_dir, tp):
    from optune_nemo.config import RewardConfig
    from optune_nemo.interfaces import Prompt
    from optune_nemo.megatron.parallel import init_distributed
    from optune_nemo.reward import build_reward

    d = init_distributed(tp, 1)
    prompts = [Prompt(i, t, (1,)) for i, t in enumerate(PROMPTS)]
    out = {}
    for rtype in ("megatron", "hf"):
        reward = build_reward(RewardConfig(type=rtype, path=rm_dir, batch_size=2), dist=d)
        reward.prepare()
        out[rtype] = (torch.tensor(reward.score(prompts, RESPONSES)), reward.scored)
        reward.release()
    return out


def test_reward_types_on_two_ranks_equal_transformers(tmp_path):
    from transformers import AutoTokenizer

    save_hf_rm("llama_untied", tmp_path / "rm", seed=9)
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    seqs = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=False) + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for p, r in zip(PROMPTS, RESPONSES)]
    want = hf_scores(tmp_path / "rm", seqs)
    results = run_ranks(_rewards, 2, str(tmp_path / "rm"), 2)
    for rank, out in enumerate(results):
        for rtype, (scores, _) in out.items():
            assert (scores - want).abs().max() < 1e-4, (rank, rtype, scores, want)
    # megatron at TP=2: one data-parallel group, both ranks score everything together;
    # hf: dealt over both ranks (3 and 2 of the 5 responses)
    assert [out["megatron"][1] for out in results] == [5, 5]
    assert sorted(out["hf"][1] for out in results) == [2, 3]
