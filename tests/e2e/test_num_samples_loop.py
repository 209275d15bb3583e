"""generation.num_samples = 3 end to end on the tiny real Megatron model (no code may assume a pair or a power of
two): every regenerated prompt's pair is its highest- and lowest-reward sample of three, the store keeps the
three rewards and lengths, the cost shows in the records, and the run is exact under a kill during generation
and under an `init_from` fork."""

import json
import signal
import sys

import pytest
from dist_utils import run_ranks
from test_crash_resume import _CRASHER, _run_in_session
from test_optune_loop import E2E, _metrics, _plain_run, _store, _train_cli, _weights_pair, assert_close_records

pytestmark = pytest.mark.slow

N = ["generation.num_samples=3"]


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    exp = tmp_path_factory.mktemp("three")
    _train_cli(exp, *N)
    return exp


def _length_reward(text, target=6):
    """The run's reward (E2E: rules.length_reward with target_chars 6), written out again."""
    return -abs(len(text) - target) / target


def _extremes(rewards):
    """(a, b) sample indices by the documented rule, computed another way than the store does: the earliest
    of the highest rewards and the latest of the lowest, a the smaller index."""
    best = rewards.index(max(rewards))
    worst = len(rewards) - 1 - rewards[::-1].index(min(rewards))
    return min(best, worst), max(best, worst)


def _assert_same(a, b):
    assert _store(a) == _store(b)
    assert _metrics(a) == _metrics(b)
    wa, wb = run_ranks(_weights_pair, 1, str(a), str(b))[0]
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_three_samples_end_to_end(three):
    records = _metrics(three)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for t, rec in enumerate(records):
        store = _store(three, t)
        assert rec["num_samples"] == 3 and rec["reward_calls"] == 3 * rec["regenerated"]
        new = [i for i, g in enumerate(store["generated_at_iteration"]) if g == t]
        assert len(new) == rec["regenerated"] == (16 if t == 0 else 8)
        # every new sample's tokens are counted: the generated tokens are the three lengths of each new prompt
        assert rec["generated_tokens"] == sum(sum(store["response_num_tokens"][i]) for i in new)
        for i in range(len(store["prompt_id"])):
            rewards = store["rewards"][i]
            assert len(rewards) == 3 and len(store["response_num_tokens"][i]) == 3
            a, b = _extremes(rewards)
            assert (store["reward_a"][i], store["reward_b"][i]) == (rewards[a], rewards[b])
            assert len(store["response_a_token_ids"][i]) == store["response_num_tokens"][i][a]
            assert len(store["response_b_token_ids"][i]) == store["response_num_tokens"][i][b]
            assert store["reward_a"][i] == pytest.approx(_length_reward(store["response_a"][i]), abs=1e-12)
            assert store["reward_b"][i] == pytest.approx(_length_reward(store["response_b"][i]), abs=1e-12)
            assert json.loads(store["messages"][i]) == [{"role": "user", "content": store["prompt"][i]}]
        ties = sum(abs(ra - rb) <= 0.0 for ra, rb in zip(store["reward_a"], store["reward_b"]))
        assert rec["ties"] == ties and rec["train_pairs"] == 16 - ties
    assert any(len(set(r)) == 3 for r in _store(three)["rewards"])      # some prompts had three distinct rewards


def test_kill_during_generation_then_resume_is_identical(three, tmp_path):
    """Killed after 2 of 3 generation chunks of iteration 1 (test_crash_resume's crasher), a plain resume with
    the same settings ends as the uninterrupted run."""
    exp = tmp_path / "run"
    log = tmp_path / "crash.log"
    rc = _run_in_session([sys.executable, "-c", _CRASHER, "generation", str(exp), *E2E, *N], log)
    assert rc == -signal.SIGKILL, log.read_text()[-3000:]
    chunks = list((exp / "partial" / "iter_000001").glob("chunk_*.json"))
    assert len(chunks) == 1, "the chunk finished before the kill must be on disk"
    assert all(len(s) == 3 for s in json.loads(chunks[0].read_text())["samples"])
    _train_cli(exp, *N)
    _assert_same(three, exp)


def test_fork_from_iteration_0_equals_the_run(three, tmp_path):
    base, fork = tmp_path / "base", tmp_path / "fork"
    _train_cli(base, "optune.iterations=1", *N)
    _train_cli(fork, f"init_from={base}/checkpoints/iter_000000", *N)
    assert not (fork / "checkpoints" / "iter_000000").exists()
    _assert_same(three, fork)


# --------------------------------------------------------------------------- n = 4 on two gloo ranks

N4 = ["generation.num_samples=4"]


@pytest.fixture(scope="module")
def four_one_rank(tmp_path_factory):
    exp = tmp_path_factory.mktemp("four_one")
    run_ranks(_plain_run, 1, N4, str(exp))
    return exp


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2"],
                                    ["parallel.use_distributed_optimizer=true"]], ids=["tp2", "dp2"])
def test_four_samples_on_two_ranks_equal_one(four_one_rank, tmp_path, layout):
    """n = 4 under tensor and data parallelism: generation shards prompts (DP) or heads (TP), all four samples
    are scored, and the best-versus-worst pairs, the four rewards and lengths, and the records equal one rank's."""
    run_ranks(_plain_run, 2, [*layout, *N4], str(tmp_path / "two"))
    one, two = _store(four_one_rank), _store(tmp_path / "two")
    assert one == two
    assert all(len(r) == 4 for r in one["rewards"]) and any(len(set(r)) >= 3 for r in one["rewards"])
    for rewards, ra, rb in zip(one["rewards"], one["reward_a"], one["reward_b"]):
        a, b = _extremes(rewards)
        assert (ra, rb) == (rewards[a], rewards[b])
    assert_close_records(four_one_rank, tmp_path / "two")


@pytest.mark.multiproc
def test_four_samples_data_parallel_resume_is_identical(four_one_rank, tmp_path):
    """Two data-parallel ranks stop after iteration 1 and a second job resumes the third iteration: the rollout
    store and records equal the uninterrupted one-rank run."""
    exp = str(tmp_path / "dp")
    run_ranks(_plain_run, 2, ["parallel.use_distributed_optimizer=true", *N4, "optune.iterations=2"], exp)
    assert not (tmp_path / "dp" / "checkpoints" / "iter_000002").exists()
    run_ranks(_plain_run, 2, ["parallel.use_distributed_optimizer=true", *N4], exp)
    assert _store(four_one_rank) == _store(tmp_path / "dp")
    assert_close_records(four_one_rank, tmp_path / "dp")
