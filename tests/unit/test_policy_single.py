"""One rank, in process: log-probs against a float64 reference, the CPU compatibility layer, and
the generation engine against a step-by-step forward without KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, WDPO, build, random_pairs, tiny_config

from optune_nemo.generation.torch_engine import TorchEngine, sample_from_uniform, sample_generator
from optune_nemo.interfaces import PreferenceBatch, SamplingParams
from optune_nemo.megatron.packing import epoch_layout, pack_groups, split_by_tokens, sum_per_output


@pytest.fixture(scope="module")
def policy():
    return build(tiny_config())


def _full_logits(model, seq):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([seq]), torch.arange(len(seq))[None], None)[0, :, :VOCAB].double()


def test_packing_worked_example():
    """The example of megatron/packing.py's docstring, written out."""
    b = pack_groups([([5, 6], [[7, 8], [9]]), ([4], [[3]])], pad_id=0, length=8)
    assert b.tokens_BS.tolist() == [[5, 6, 7, 8, 9, 4, 3, 0]]
    assert b.positions_BS.tolist() == [[0, 1, 2, 3, 2, 0, 1, 0]]
    assert b.label_index_N.tolist() == [1, 2, 1, 5] and b.labels_N.tolist() == [7, 8, 9, 3]
    assert b.output_N.tolist() == [0, 0, 1, 2] and b.num_outputs == 3
    attend = (~b.mask_B1SS[0, 0]).int().tolist()
    assert attend == [[1, 0, 0, 0, 0, 0, 0, 0],       # 5
                      [1, 1, 0, 0, 0, 0, 0, 0],       # 6
                      [1, 1, 1, 0, 0, 0, 0, 0],       # 7: prompt + itself
                      [1, 1, 1, 1, 0, 0, 0, 0],       # 8
                      [1, 1, 0, 0, 1, 0, 0, 0],       # 9: prompt, not the other response
                      [0, 0, 0, 0, 0, 1, 0, 0],       # 4: its own group only
                      [0, 0, 0, 0, 0, 1, 1, 0],       # 3
                      [0, 0, 0, 0, 0, 0, 0, 1]]       # padding sees itself only
    assert pack_groups([([5, 6], [[7]])], pad_id=0, multiple_of=32).length == 32
    assert sum_per_output(torch.tensor([1.0, 2.0, 4.0, 8.0]), b).tolist() == [3.0, 4.0, 8.0]


def test_logprobs_match_float64_reference(policy):
    prompts, responses, _ = random_pairs(7, seed=3)
    got = policy.sequence_logprobs(prompts, responses)
    model = policy.unwrapped_model()
    for i, (p, r) in enumerate(zip(prompts, responses)):
        logp = F.log_softmax(_full_logits(model, p + r), dim=-1)   # unpadded vocabulary only
        ref = sum(float(logp[len(p) - 1 + k, tok]) for k, tok in enumerate(r))
        assert abs(got[i].item() - ref) < 1e-4 * max(1.0, abs(ref)), (i, got[i].item(), ref)


def test_logprobs_do_not_depend_on_batching(policy):
    prompts, responses, _ = random_pairs(9, seed=4)
    together = policy.sequence_logprobs(prompts, responses)
    alone = torch.cat([policy.sequence_logprobs([p], [r]) for p, r in zip(prompts, responses)])
    # packed rows of different lengths reduce in a different order: fp32 rounding only
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-6)


def test_prefix_shared_pairs_equal_the_unshared_sequences(policy):
    """pair_logprobs runs each prompt once for both responses; the result is what the plain sequences give."""
    prompts, chosen, rejected = random_pairs(7, seed=9)
    c, r = policy.pair_logprobs(prompts, chosen, rejected, seed=3)
    plain = policy.sequence_logprobs(prompts + prompts, chosen + rejected)
    torch.testing.assert_close(torch.cat([c, r]), plain, atol=1e-5, rtol=1e-6)


def test_train_step_gradient_is_mean_over_pairs(policy):
    """One SGD-free check: the reported loss equals the float64 wDPO mean recomputed by hand."""
    prompts, chosen, rejected = random_pairs(6, seed=8)
    ref = policy.sequence_logprobs(prompts + prompts, chosen + rejected)
    rewards = torch.linspace(0, 1, 12)
    batch = PreferenceBatch(prompts, chosen, rejected, ref[:6] + 0.3, ref[6:] - 0.2, rewards[:6], rewards[6:])
    pc, pr = ref[:6].double(), ref[6:].double()
    expected = sum(-1 / (1 + math.exp(-2.0 * float(rewards[i] - rewards[6 + i])))
                   * math.log(1 / (1 + math.exp(-0.5 * float((pc[i] - ref[i] - 0.3) - (pr[i] - ref[6 + i] + 0.2)))))
                   for i in range(6)) / 6
    steps = policy.train(batch, WDPO, epochs=1, seed=0)
    assert len(steps) == 1 and steps[0]["num_pairs"] == 6
    assert abs(steps[0]["loss"] - expected) < 1e-5


# ------------------------------------------------------------------ micro-batches to a token budget

def test_split_by_tokens_worked_example():
    lengths = [5, 7, 3, 20, 4, 4, 4]
    assert split_by_tokens(range(7), lengths, 12) == [[0, 1], [2], [3], [4, 5, 6]]   # 12, 3, 20 alone, 12
    assert split_by_tokens([6, 0, 3], lengths, 12) == [[6, 0], [3]]
    assert split_by_tokens([3], lengths, 1) == [[3]] and split_by_tokens([], lengths, 12) == []
    assert split_by_tokens(range(7), lengths, 100) == [list(range(7))]


def _layout(order, lengths, G, mbs, tokens, dp):
    return [epoch_layout(order, lengths, global_batch_size=G, micro_batch_size=mbs, micro_batch_tokens=tokens,
                         dp_rank=r, dp_size=dp) for r in range(dp)]


def test_budget_zero_is_the_fixed_pair_count_split():
    """micro_batch_tokens=0: micro-batches of micro_batch_size pairs of each rank's round-robin share, as
    before (written out by hand; an empty micro-batch where a rank's share runs out)."""
    lengths = [1000] * 10                 # ignored without a budget
    assert _layout([3, 1, 4, 0, 5, 2, 6], lengths, 4, 1, 0, 2) == [
        [[[3], [4]], [[5], [6]]],         # rank 0: step 0 takes 3, 4 of [3, 1, 4, 0]; step 1 takes 5, 6 of [5, 2, 6]
        [[[1], [0]], [[2], []]]]          # rank 1: its share of step 1 runs out
    assert _layout(list(range(10)), lengths, 8, 2, 0, 2) == [
        [[[0, 2], [4, 6]], [[8]]],
        [[[1, 3], [5, 7]], [[9]]]]
    assert _layout(list(range(7)), lengths, 6, 2, 0, 3) == [
        [[[0, 3]], [[6]]], [[[1, 4]], [[]]], [[[2, 5]], [[]]]]
    assert _layout(list(range(5)), lengths, 8, 4, 0, 1) == [[[[0, 1, 2, 3], [4]]]]


@pytest.mark.parametrize("case", range(40))
def test_token_budget_layout_properties(case):
    g = torch.Generator().manual_seed(case)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    n, dp, budget = rand(1, 40), rand(1, 5), rand(1, 60)
    G = dp * rand(1, 5)
    lengths = [rand(3, 40) for _ in range(n)]
    order = torch.randperm(n, generator=g).tolist()
    ranks = _layout(order, lengths, G, 1, budget, dp)
    assert len({len(steps) for steps in ranks}) == 1 and len(ranks[0]) == math.ceil(n / G)
    for s in range(len(ranks[0])):
        batch = order[s * G:(s + 1) * G]
        per_rank = [steps[s] for steps in ranks]
        assert len({len(micro) for micro in per_rank}) == 1              # same micro-batch count on every rank
        assert sorted(i for micro in per_rank for mb in micro for i in mb) == sorted(batch)   # each pair once
        for r, micro in enumerate(per_rank):
            real = [mb for mb in micro if mb]
            assert micro == real + [[]] * (len(micro) - len(real))      # empties only to pad the count
            assert [i for mb in real for i in mb] == batch[r::dp]        # the round-robin share, in order
            for k, mb in enumerate(real):
                total = sum(lengths[i] for i in mb)
                assert total <= budget or len(mb) == 1                  # over budget only a pair alone
                if k + 1 < len(real):                                   # greedy: the next pair did not fit
                    assert total + lengths[real[k + 1][0]] > budget
        assert max(len(micro) for micro in per_rank) == max(1, *(len([mb for mb in m if mb]) for m in per_rank))


class _Recording:
    """A loss that records the log-probs it is given in training (the policy's and the reference's)."""

    def __init__(self, loss):
        self.loss, self.seen = loss, []

    def __call__(self, t):
        if t.policy_chosen_logps.requires_grad:           # not metric_names' probe
            self.seen.append([x.detach().clone() for x in (t.policy_chosen_logps, t.policy_rejected_logps,
                                                          t.ref_chosen_logps, t.ref_rejected_logps)])
        return self.loss(t)


def _one_step(tokens: int):
    policy = build(tiny_config("train.global_batch_size=8", "train.micro_batch_size=4", "train.shuffle=true",
                               f"train.micro_batch_tokens={tokens}", "optim.optimizer=sgd", "optim.lr=0.5",
                               "optim.clip_grad=0"))
    params = list(policy.unwrapped_model().parameters())
    before = [p.detach().clone() for p in params]
    prompts, chosen, rejected = random_pairs(8, seed=21)
    ref_c, ref_r = policy.pair_logprobs(prompts, chosen, rejected, seed=5)
    batch = PreferenceBatch(prompts, chosen, rejected, ref_c, ref_r, torch.linspace(0, 1, 8), torch.zeros(8))
    loss = _Recording(WDPO)
    steps = policy.train(batch, loss, epochs=1, seed=5)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    return {"before": before, "after": [p.detach().clone() for p in params], "steps": steps, "seen": loss.seen,
            "layout": policy._epoch_layout(lengths, 5, 0)}


def test_token_budget_step_equals_fixed_pair_count_step():
    """One SGD step (update = lr * gradient) with micro-batches filled to 24 tokens (pair lengths 8..15: 1 or
    2 pairs a row) against micro-batches of 4 pairs: both are the mean over the same 8 pairs, so the weights
    agree up to fp32 summation order. In each layout the reference log-probs (pair_logprobs, same seed) are
    the first step's log-probs bit for bit."""
    fixed, budget = _one_step(0), _one_step(24)
    for run, counts in ((fixed, [4, 4]), (budget, [2, 1, 2, 2, 1])):
        # the layout the step ran (pairs per micro-batch the loss saw) is the one asked for
        assert [len(mb) for mb in run["layout"][0]] == counts == [len(s[0]) for s in run["seen"]]
        assert len(run["steps"]) == 1 and run["steps"][0]["num_pairs"] == 8
        for pc, pr, rc, rr in run["seen"]:
            assert torch.equal(pc, rc) and torch.equal(pr, rr)
        assert run["steps"][0]["margin_mean"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(fixed["before"], budget["before"]))   # same initial weights
    assert abs(fixed["steps"][0]["loss"] - budget["steps"][0]["loss"]) < 1e-6
    moved = max((a - b).abs().max().item() for a, b in zip(fixed["after"], fixed["before"]))
    assert moved > 1e-3, moved                     # the step moved the weights far beyond the tolerance
    for a, b in zip(fixed["after"], budget["after"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ generation

@pytest.fixture(scope="module")
def engine(policy):
    return TorchEngine(policy.inference_model(), decode=lambda ids: ",".join(map(str, ids)), dist=policy.dist,
                       batch_size=4)


def _greedy_reference(model, prompt, steps, stop=()):
    seq, out = list(prompt), []
    for _ in range(steps):
        tok = int(_full_logits(model, seq)[-1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok in stop:
            break
    return out


def test_greedy_equals_forward_without_cache(policy, engine):
    prompts = random_pairs(6, seed=11)[0]          # lengths 3..9 in one call: padding is exercised
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=10), keys=list(range(6)))
    model = policy.unwrapped_model()
    refs = [_greedy_reference(model, p, 10) for p in prompts]
    assert len({t for ref in refs for t in ref}) > 6, "degenerate references; use a model with more varied logits"
    for ref, samples in zip(refs, out):
        assert [s.token_ids for s in samples] == [ref, ref]
        assert all(s.finish_reason == "length" and s.num_tokens == 10 for s in samples)


def test_stop_token_ends_only_its_row(policy, engine):
    prompts = random_pairs(4, seed=12)[0]
    model = policy.unwrapped_model()
    refs = [_greedy_reference(model, p, 8) for p in prompts]
    stop = refs[0][2]                                 # row 0 stops at its third token
    out = engine.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=8,
                                                  stop_token_ids=(stop,)), keys=[0, 1, 2, 3])
    for ref, (s,) in zip(refs, out):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert s.token_ids == ref[:cut]
        assert s.finish_reason == ("stop" if stop in ref else "length")


def test_samples_do_not_depend_on_batch_and_prefill_runs_once(engine):
    prompts = random_pairs(5, seed=13)[0]
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7)
    before = engine.forward_calls
    together = engine.generate(prompts, params, keys=[10, 11, 12, 13, 14])
    # 5 prompts, batch size 4 -> 2 batches; each: 1 prefill + at most 5 decode steps
    assert engine.forward_calls - before <= 2 * (1 + 5)
    for i, p in enumerate(prompts):
        alone = engine.generate([p], params, keys=[10 + i])[0]
        assert [s.token_ids for s in alone] == [s.token_ids for s in together[i]]
    again = engine.generate(prompts, params, keys=[10, 11, 12, 13, 14])
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in together]
    other = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=8),
                            keys=[10, 11, 12, 13, 14])
    assert [[s.token_ids for s in g] for g in other] != [[s.token_ids for s in g] for g in together]
    assert len({tuple(s.token_ids) for s in together[0]}) > 1, "the n samples of a prompt must differ"


def test_first_token_distribution_matches_softmax(policy, engine):
    """Exact distribution at temperature 1: empirical first-token frequencies vs softmax."""
    prompt = random_pairs(1, seed=14)[0][0]
    probs = _full_logits(policy.unwrapped_model(), prompt)[-1].softmax(-1)
    n = 4000
    out = engine.generate([prompt], SamplingParams(n=n, temperature=1.0, top_p=1.0, max_new_tokens=1), keys=[0])[0]
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in out]), minlength=VOCAB).double()
    top = probs.argsort(descending=True)[:5]
    for t in top:   # binomial standard error, 5 sigma
        se = math.sqrt(float(probs[t]) * (1 - float(probs[t])) / n)
        assert abs(counts[t] / n - probs[t]) < 5 * se + 1e-3
    assert int(counts[VOCAB:].sum()) == 0


def _reference_distribution(logits, *, temperature, top_k, top_p):
    """The filtered sampling distribution written out in float64 over a full sort: temperature, top-k,
    then the nucleus (a token stays while the mass ranked above it is below top_p)."""
    z = logits.double() / temperature
    order = torch.argsort(z, descending=True)
    zs = z[order]
    if top_k:
        zs = zs[:top_k]
    p = torch.softmax(zs, 0)
    if top_p < 1:
        above = torch.cumsum(p, 0) - p
        p = torch.where(above < top_p, p, torch.zeros_like(p))
        p = p / p.sum()
    out = torch.zeros_like(z)
    out[order[:len(p)]] = p
    return out


@pytest.mark.parametrize("case", ["peaked", "flat", "flat-top_k", "peaked-top_k-top_p"])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
def test_sampling_on_candidates_is_exact(case, top_p):
    """The token each uniform u maps to, over a fine grid of u, reproduces the exact filtered distribution:
    on rows whose mass the top candidates cover (peaked), and on rows they do not (flat: the full-sort
    path), with and without top-k."""
    g = torch.Generator().manual_seed(hash(case) % 1000)
    V = 2000
    logits = torch.randn(V, generator=g) * (6.0 if case.startswith("peaked") else 0.05)
    top_k = 50 if "top_k" in case else 0
    M = 20000
    u = (torch.arange(M, dtype=torch.float64) + 0.5) / M
    toks = sample_from_uniform(logits.expand(M, V), u, temperature=0.8, top_k=top_k, top_p=top_p)
    freq = torch.bincount(toks, minlength=V).double() / M
    ref = _reference_distribution(logits, temperature=0.8, top_k=top_k, top_p=top_p)
    assert (freq - ref).abs().max().item() <= 2.0 / M, (freq - ref).abs().max().item()
    assert freq[ref == 0].sum().item() == 0          # never a token outside the filter


def test_sampling_generators_are_reproducible():
    g1, g2 = sample_generator(1, 2, 3), sample_generator(1, 2, 3)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
