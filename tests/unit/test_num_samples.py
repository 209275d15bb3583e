"""generation.num_samples: n samples per regenerated prompt from one prefill, all scored, the pair is the highest-
and the lowest-reward sample; the cost is in the iteration record. The loop runs here with stand-ins for the
policy and the engine (no model), the engine's per-(key, sample) seeding on the float64 toy model of
test_static_decode."""

import pytest
import torch
from test_static_decode import PROMPTS, Dist, Toy

from optune_nemo.algorithm.optune import OPTune, sampling_key
from optune_nemo.algorithm.store import RolloutStore
from optune_nemo.config import ConfigError, load_config
from optune_nemo.generation.torch_engine import TorchEngine
from optune_nemo.interfaces import Prompt, Sample, SamplingParams
from optune_nemo.losses import build_loss
from optune_nemo.reward.base import RuleReward
from optune_nemo.runtime.checkpoint import GenerationChunks

# ---------------------------------------------------------------------- the engine: n samples, one prefill


def _engine_samples(n, mode, calls=None):
    model = Toy(seed=3)
    if calls is not None:
        real = model.forward

        def forward(tokens_RS, positions_RS, cache):
            calls.append(tuple(tokens_RS.shape))
            return real(tokens_RS, positions_RS, cache)
        model.forward = forward
    engine = TorchEngine(model, decode=str, dist=Dist(), batch_size=4, decode_mode=mode)
    params = SamplingParams(n=n, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=8, stop_token_ids=(1, 2, 3),
                            seed=7)
    out = engine.generate(PROMPTS, params, keys=[20, 21, 22, 23])
    engine.end_generation()
    return out


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_first_two_of_three_samples_are_the_pair_of_two(mode):
    """Sample j of a prompt is drawn from the generator of (seed, key, j): with n = 3 samples 0 and 1 are the
    samples n = 2 draws, token for token, so n = 2 is the run it was before num_samples existed."""
    two, three = _engine_samples(2, mode), _engine_samples(3, mode)
    assert [len(s) for s in three] == [3] * len(PROMPTS)
    assert [s[:2] for s in three] == two
    assert any(s[2] != s[0] and s[2] != s[1] for s in three)       # the third sample is a sample of its own


def test_one_prefill_per_prompt_whatever_n():
    calls = []
    _engine_samples(5, "dynamic", calls)
    prefill = calls[0]
    assert prefill == (len(PROMPTS), max(len(p) for p in PROMPTS))   # one row per prompt, not per sample
    assert all(s == 1 for _, s in calls[1:])                          # then decode steps only
    assert calls[1][0] == 5 * len(PROMPTS)                            # which run n rows per prompt


# ---------------------------------------------------------------------- the loop with stand-ins


class FakeEngine:
    """Sample j of the prompt with key k: tokens [j] * (1 + (k + j) % 4) (so its length is known), text
    `s{j}:{k}` ; records what it was asked."""

    def __init__(self):
        self.requests = []

    def generate(self, prompts, params, keys):
        self.requests.append((len(prompts), params.n))
        return [[Sample([j] * (1 + (k + j) % 4), f"s{j}:{k}", "stop") for j in range(params.n)] for k in keys]

    def begin_generation(self):
        pass

    def end_generation(self):
        pass


class FakePolicy:
    def pair_logprobs(self, prompts, chosen, rejected, *, seed):
        return torch.zeros(len(prompts)), torch.zeros(len(prompts))

    def train(self, batch, loss, *, epochs, seed):
        return []


class Guard:
    def requested(self):
        return False


def _r(j, k):
    """Sample j of key k's reward: ((j + k) mod 4) // 2, so equal highest and equal lowest rewards occur."""
    return float(((j + k) % 4) // 2)


def reward_of(text: str) -> float:
    j, k = (int(x) for x in text[1:].split(":"))
    return _r(j, k)


def _loop(tmp_path, n, prompts, fn=None):
    cfg = load_config(["policy.hf_path=null", "eval.num_prompts=0", f"exp_dir={tmp_path}",
                       f"generation.num_samples={n}", "generation.chunk_size=2", "logging.progress=false"])
    fn = fn or (lambda ps, rs, meta: [reward_of(r) for r in rs])
    reward = RuleReward(fn, name="test", batch_size=5)
    return OPTune(cfg, prompts=prompts, policy=FakePolicy(), engine=FakeEngine(), reward=reward,
                  loss=build_loss(cfg.loss), store=RolloutStore(prompts), chunks=GenerationChunks(tmp_path),
                  checkpoints=None, metrics=None, guard=Guard(), stop_token_ids=(0,))


def _prompts(k=5):
    return [Prompt(i, f"q{i}", (1, i), {}) for i in range(k)]


def test_num_samples_below_two_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="generation.num_samples"):
        _loop(tmp_path, 1, _prompts())


@pytest.mark.parametrize("n", [2, 3, 5])
def test_pair_is_highest_and_lowest_of_n(tmp_path, n):
    prompts = _prompts()
    loop = _loop(tmp_path, n, prompts)
    record = loop.iteration(0)
    assert {r[1] for r in loop.engine.requests} == {n}                  # one request per prompt, n samples each
    assert sum(r[0] for r in loop.engine.requests) == len(prompts)
    expected_tokens, ties_seen = 0, {}
    for p in prompts:
        key = sampling_key(0, p.prompt_id)
        texts = [f"s{j}:{key}" for j in range(n)]
        rewards = [_r(j, key) for j in range(n)]
        expected_tokens += sum(1 + (key + j) % 4 for j in range(n))
        best = rewards.index(max(rewards))                             # the earliest among equal highest
        worst = n - 1 - rewards[::-1].index(min(rewards))              # the latest among equal lowest
        rec = loop.store.pair(p.prompt_id)
        assert rec.rewards == tuple(rewards) and rec.num_tokens == tuple(1 + (key + j) % 4 for j in range(n))
        assert {rec.response_a.text, rec.response_b.text} == {texts[best], texts[worst]}
        assert rec.response_a.text == texts[min(best, worst)]          # a: the smaller sample index
        assert rec.response_b.text == texts[max(best, worst)]
        ties_seen[rewards.count(max(rewards)) > 1 or rewards.count(min(rewards)) > 1] = True
        assert loop.store.ranking_scores()[p.prompt_id] == max(rewards)
    pairs, ties = loop.store.preference_pairs()
    for pair in pairs:
        assert pair.chosen_reward > pair.rejected_reward
    assert record["num_samples"] == n
    assert record["reward_calls"] == n * len(prompts)
    assert record["generated_tokens"] == expected_tokens
    all_rewards = [_r(j, sampling_key(0, p.prompt_id)) for p in prompts for j in range(n)]
    assert record["reward_samples_mean"] == pytest.approx(sum(all_rewards) / len(all_rewards))
    assert record["ties"] == ties
    if n == 5:
        assert ties_seen.get(True), "the rewards must have equal highest or lowest samples to test the rule"


def test_chunks_with_another_sample_count_are_generated_again(tmp_path):
    """A chunk persisted with a different number of samples (a run resumed with another num_samples) is not
    reused: every prompt gets n samples."""
    prompts = _prompts(4)
    two = _loop(tmp_path, 2, prompts)
    two.sample_and_score(0, [0, 1, 2, 3], times=_times())
    three = _loop(tmp_path, 3, prompts)
    got = three.sample_and_score(0, [0, 1, 2, 3], times=_times())
    assert all(len(samples) == 3 and len(rewards) == 3 for samples, rewards in got.values())
    assert len(three.engine.requests) == 2                              # both chunks generated anew


def _times():
    from optune_nemo.algorithm.optune import PhaseTimes

    return PhaseTimes()
