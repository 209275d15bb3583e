"""One rank, in process: log-probs against a float64 reference, the CPU compatibility layer, and
the generation engine against a step-by-step forward without KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, WDPO, build, random_pairs, tiny_config

from optune_nemo.generation.torch_engine import TorchEngine, sample_from_uniform, sample_generator
from optune_nemo.interfaces import PreferenceBatch, SamplingParams
from optune_nemo.megatron.packing import pack_groups, sum_per_output


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
