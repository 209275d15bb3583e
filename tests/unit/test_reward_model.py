"""The Megatron reward model on one rank: the Bradley-Terry margin loss against float64 formulas, the head
reading the last real token whatever the padding (against transformers' own backbone), one training step
against a float64 autograd reference of the mean loss, micro-batching, bf16, and a bf16 checkpoint (distributed
optimizer) that resumes bitwise."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hf_tiny import VOCAB, make_hf_model
from rm_tiny import PAD, hf_scores, random_seqs

from optune_nemo.config import OptimConfig
from optune_nemo.data.preferences import ComparisonPair
from optune_nemo.losses.bradley_terry import bradley_terry_per_pair
from optune_nemo.megatron.reward_model import last_non_pad_index, make_score_batch

# --------------------------------------------------------------------------- the loss


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@pytest.mark.parametrize("seed", range(4))
def test_margin_loss_and_gradient_match_float64(seed):
    rng = random.Random(seed)
    c = [rng.uniform(-6, 6) for _ in range(9)]
    r = [rng.uniform(-6, 6) for _ in range(9)]
    m = [rng.choice([0.0, rng.uniform(0, 3)]) for _ in range(9)]
    tc = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    tr = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    per = bradley_terry_per_pair(tc, tr, torch.tensor(m, dtype=torch.float64))
    z = [c[i] - r[i] - m[i] for i in range(9)]
    for i in range(9):
        assert float(per[i]) == pytest.approx(-_log_sigmoid(z[i]), rel=1e-12, abs=1e-14)
    per.mean().backward()
    for i in range(9):
        # d/dc -log sigmoid(c - r - m) = -sigmoid(-(c - r - m)); d/dr is its negative
        assert float(tc.grad[i]) == pytest.approx(-_sigmoid(-z[i]) / 9, rel=1e-12, abs=1e-15)
        assert float(tr.grad[i]) == pytest.approx(_sigmoid(-z[i]) / 9, rel=1e-12, abs=1e-15)
    zero = bradley_terry_per_pair(tc.detach(), tr.detach(), torch.zeros(9, dtype=torch.float64))
    assert torch.equal(zero, bradley_terry_per_pair(tc.detach(), tr.detach()))


def test_margin_asks_for_a_lead():
    # with margin m the loss at r_w - r_l = m is the plain loss at 0: log 2
    per = bradley_terry_per_pair(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0]))
    assert float(per) == pytest.approx(math.log(2), rel=1e-7)


# --------------------------------------------------------------------------- where the score is read


@pytest.mark.parametrize("seq, pad, want", [
    ([5, 6, 7], 0, 2), ([5, 6, 7, 0, 0], 0, 2), ([5, 0, 7, 0], 0, 2), ([0, 0, 5], 0, 2), ([0, 0], 0, 0),
    ([5, 6, 0], None, 2), ([2, 9, 2], 2, 1),
])
def test_last_non_pad_index(seq, pad, want):
    assert last_non_pad_index(seq, pad) == want


def test_score_batch_layout():
    b = make_score_batch([[5, 6, 7], [8]], pad_id=0, length=5)
    assert b.tokens_BT.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]]
    assert b.last_B.tolist() == [2, 0] and b.position_ids_BT[1].tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def dist1():
    from optune_nemo.megatron.parallel import init_distributed

    return init_distributed(1, 1)


def _meta(hf_dir, pad=PAD, seq_length=64):
    from optune_nemo.megatron.hf_import import hf_config_to_model_config, read_hf_config
    from optune_nemo.megatron.reward_model import RewardModelMeta

    info = read_hf_config(hf_dir)
    return RewardModelMeta(hf_config_to_model_config(hf_dir, seq_length=seq_length), VOCAB, pad, info.architecture,
                           info.config)


def _rm(meta, dist, *, precision="fp32", lr=1e-3, seed=1, clip=1.0):
    from optune_nemo.megatron.reward_model import build_reward_model

    optim = OptimConfig(lr=lr, warmup_ratio=0.0, adam_eps=1e-4, clip_grad=clip)
    return build_reward_model(meta, dist=dist, optim=optim, precision=precision,
                              use_distributed_optimizer=precision != "fp32", seed=seed)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    hf = make_hf_model("llama_untied", seed=4)
    hf.save_pretrained(d)
    return d, hf


def _reference_scores(hf, head, seqs):
    """transformers' backbone on each sequence alone (no padding at all), its last hidden state dotted with
    the head: what the Megatron reward model must give."""
    out = []
    with torch.no_grad():
        for s in seqs:
            h = hf.model(torch.tensor([s])).last_hidden_state[0, -1]
            out.append(float(h.double() @ head.double()))
    return torch.tensor(out, dtype=torch.float64)


def test_head_reads_the_last_real_token_whatever_the_padding(llama, dist1):
    from optune_nemo.megatron.reward_model import score_sequences

    hf_dir, hf = llama
    rm = _rm(_meta(hf_dir), dist1)
    rm.load_hf_backbone(hf_dir)
    head = rm.unwrapped_model().output_layer.weight.detach()[0].cpu()
    seqs = random_seqs(6, seed=2)
    want = _reference_scores(hf, head, seqs)
    assert want.std() > 0.1
    chunks = rm.model

    def score(ss, rows):
        return torch.tensor(score_sequences(chunks, ss, pad_id=PAD, rows=rows, dist=dist1), dtype=torch.float64)

    alone = score(seqs, rows=1)                           # no padding
    together = score(seqs, rows=6)                        # right-padded to the longest
    longer = score(seqs + [list(range(3, 60))], rows=7)[:6]   # much more padding
    trailing_pads = score([s + [PAD] * 5 for s in seqs], rows=6)   # pad tokens after the end are padding
    for got in (alone, together, longer, trailing_pads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # transformers' sequence-classification rule on the same model, padded on the LEFT under a mask
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    cfg = LlamaConfig(**{**hf.config.to_dict(), "num_labels": 1, "pad_token_id": PAD})
    cls = AutoModelForSequenceClassification.from_config(cfg).float().eval()
    cls.model.load_state_dict(hf.model.state_dict())
    with torch.no_grad():
        cls.score.weight.copy_(head[None])
    torch.testing.assert_close(hf_scores(cls, seqs, left=True).double(), want, atol=2e-5, rtol=0)


def test_fresh_head_is_seeded_normal(llama, dist1):
    hf_dir, _ = llama
    a, b, c = (_rm(_meta(hf_dir), dist1, seed=s).unwrapped_model().output_layer.weight.detach().cpu()
               for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 64)
    # the documented draw: N(0, 1) from the (seed, "reward_head") generator, scaled by 1/sqrt(hidden + 1)
    from optune_nemo.runtime.seeding import generator

    torch.testing.assert_close(a, torch.randn(1, 64, generator=generator(3, "reward_head")) / math.sqrt(65))


# --------------------------------------------------------------------------- a training step


def _pairs(n, seed):
    g = random.Random(seed)
    chosen, rejected = random_seqs(n, seed=seed), random_seqs(n, seed=seed + 100)
    return [ComparisonPair(i, tuple(c), tuple(r), g.choice([0.0, 0.5])) for i, (c, r) in
            enumerate(zip(chosen, rejected))]


def test_step_is_the_gradient_of_the_mean_loss_and_microbatching_does_not_change_it(llama, dist1):
    """One optimizer step against an independent float64 autograd computation of the mean Bradley-Terry
    loss on transformers' backbone with the same head (no padding, one sequence at a time)."""
    hf_dir, hf = llama
    pairs = _pairs(8, seed=7)
    results = []
    for mbs in (2, 8):       # 4 micro-batches of 2 pairs, then 1 of 8
        rm = _rm(_meta(hf_dir), dist1, clip=0.0)
        rm.load_hf_backbone(hf_dir)
        head = rm.unwrapped_model().output_layer.weight.detach().cpu().clone()
        sch = rm.scheduler(1)
        step = rm.train_pairs(pairs, list(range(8)), micro_batch_size=mbs, scheduler=sch)
        after = rm.score([p.chosen for p in pairs], rows=4)
        results.append((step, after))

    ref = make_hf_model("llama_untied", seed=4).double()
    w = torch.nn.Parameter(head[0].double())
    losses, correct = [], []
    for p in pairs:
        hc = ref.model(torch.tensor([p.chosen])).last_hidden_state[0, -1] @ w
        hr = ref.model(torch.tensor([p.rejected])).last_hidden_state[0, -1] @ w
        losses.append(-torch.nn.functional.logsigmoid(hc - hr - p.margin))
        correct.append(float(hc > hr))
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = [w.grad] + [q.grad for name, q in ref.model.named_parameters() if q.grad is not None]
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    for step, _ in results:
        assert step["num_pairs"] == 8
        assert step["loss"] == pytest.approx(float(loss), rel=1e-5)
        assert step["accuracy"] == pytest.approx(sum(correct) / 8)
        assert step["grad_norm"] == pytest.approx(norm, rel=1e-4)
    (s2, a2), (s8, a8) = results
    assert abs(s2["loss"] - s8["loss"]) < 1e-6 and abs(s2["grad_norm"] - s8["grad_norm"]) < 1e-5 * s8["grad_norm"]
    torch.testing.assert_close(a2, a8, atol=1e-5, rtol=0)


def test_a_short_global_batch_counts_only_its_real_pairs(llama, dist1):
    """5 pairs in micro-batches of 4: the dummy fill of the second micro-batch carries no weight."""
    hf_dir, _ = llama
    pairs = _pairs(5, seed=9)
    rm = _rm(_meta(hf_dir), dist1)
    rm.load_hf_backbone(hf_dir)
    scores = rm.score([p.chosen for p in pairs] + [p.rejected for p in pairs], rows=4).double()
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float64)
    want = float(bradley_terry_per_pair(scores[:5], scores[5:], margin).mean())
    step = rm.train_pairs(pairs, list(range(5)), micro_batch_size=4, scheduler=rm.scheduler(1))
    assert step["num_pairs"] == 5 and step["loss"] == pytest.approx(want, rel=1e-5)


def test_bf16_keeps_the_loaded_weights_and_scores_close_to_fp32(llama, dist1):
    hf_dir, hf = llama
    pairs = _pairs(8, seed=11)
    seqs = [p.chosen for p in pairs]
    fp32 = _rm(_meta(hf_dir), dist1)
    fp32.load_hf_backbone(hf_dir)
    bf16 = _rm(_meta(hf_dir), dist1, precision="bf16", lr=1e-5)
    bf16.load_hf_backbone(hf_dir)
    assert next(bf16.unwrapped_model().parameters()).dtype == torch.bfloat16
    # the head takes the dtype of the output layer it replaces, not the fp32 of megatron's torch norms
    assert bf16.unwrapped_model().output_layer.weight.dtype == torch.bfloat16
    want = fp32.score(seqs, rows=4)
    got = bf16.score(seqs, rows=4)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    bf16.train_pairs(pairs, list(range(8)), micro_batch_size=4, scheduler=bf16.scheduler(1))
    emb = bf16.unwrapped_model().embedding.word_embeddings.weight.detach().float().cpu()[:VOCAB]
    # the optimizer's fp32 main weights were refreshed from the loaded ones: one small step stays near them
    assert (emb - hf.model.embed_tokens.weight.detach()).abs().max() < 0.02


def test_bf16_checkpoint_resumes_bitwise(llama, dist1, tmp_path):
    """bf16 with megatron's distributed optimizer: train one step, save, load into a model built from another
    seed, and take the same second step as the uninterrupted model: every weight must be bitwise equal, which
    needs each parameter's own fp32 main weights, Adam moments and step back from the checkpoint."""
    hf_dir, _ = llama
    pairs = _pairs(8, seed=13)
    first, second = [0, 1, 2, 3], [4, 5, 6, 7]
    straight = _rm(_meta(hf_dir), dist1, precision="bf16", seed=1)
    straight.load_hf_backbone(hf_dir)
    sch = straight.scheduler(2)
    straight.train_pairs(pairs, first, micro_batch_size=2, scheduler=sch)
    straight.save_checkpoint(str(tmp_path / "ckpt"))
    straight.train_pairs(pairs, second, micro_batch_size=2, scheduler=sch)

    resumed = _rm(_meta(hf_dir), dist1, precision="bf16", seed=2)
    head = resumed.unwrapped_model().output_layer.weight
    assert not torch.equal(head, straight.unwrapped_model().output_layer.weight)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    sch = resumed.scheduler(2)
    sch.step(increment=1)
    resumed.train_pairs(pairs, second, micro_batch_size=2, scheduler=sch)
    want = dict(straight.unwrapped_model().named_parameters())
    got = dict(resumed.unwrapped_model().named_parameters())
    assert want.keys() == got.keys() and head.dtype == torch.bfloat16
    for name, p in got.items():
        assert torch.equal(p, want[name]), name
