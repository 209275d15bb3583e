"""The torch engine gives the same tokens on two ranks as on one: TP=2 (vocab-parallel logits
gathered), PP=2 (hidden states passed between stages), DP=2 (prompts dealt over ranks). Sampled and
greedy, with stop tokens. Initial weights do not depend on the layout (per-layer seeds)."""

import pytest
from dist_utils import run_ranks
from tiny import build, random_pairs, tiny_config

from optune_nemo.interfaces import SamplingParams

pytestmark = pytest.mark.multiproc


def _generate(rank, layout):
    from optune_nemo.generation.torch_engine import TorchEngine

    policy = build(tiny_config(*layout))
    engine = TorchEngine(policy.inference_model(), decode=str, dist=policy.dist, batch_size=3)
    prompts = random_pairs(7, seed=21)[0]
    out = {}
    for name, params in {"greedy": SamplingParams(n=1, temperature=0, max_new_tokens=12),
                         "sampled": SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12,
                                                   stop_token_ids=(7, 11), seed=5)}.items():
        groups = engine.generate(prompts, params, keys=[100 + i for i in range(len(prompts))])
        out[name] = [[(s.token_ids, s.finish_reason) for s in g] for g in groups]
    return out


@pytest.fixture(scope="module")
def single():
    return run_ranks(_generate, 1, [])[0]


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2"],
                                    ["parallel.pipeline_model_parallel_size=2"], []], ids=["tp2", "pp2", "dp2"])
def test_two_ranks_generate_what_one_does(single, layout):
    for result in run_ranks(_generate, 2, layout):
        assert result == single
