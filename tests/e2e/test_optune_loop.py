"""Algorithm 1 on the tiny real Megatron model: the per-iteration invariants of docs/algorithm.md, TP=2
equal to TP=1, and exact resume."""

import json
import math
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks

from optune_nemo.config import load_config, num_regenerated

E2E = ["policy.hf_path=null", "eval.num_prompts=0", "precision=fp32",
       "optim.lr=5e-4", "data.num_prompts=16", "optune.rho=0.5",
       "optune.iterations=3", "generation.max_new_tokens=8",
       "generation.chunk_size=6", "generation.batch_size=4", "train.global_batch_size=8",
       "train.micro_batch_size=2", "logging.progress=false", "model.init_method_std=0.1",
       "reward.function._target_=optune_nemo.reward.rules.length_reward", "++reward.function.target_chars=6"]


def _snapshot(store):
    return {pid: (store.pair(pid).response_a.token_ids, store.pair(pid).response_b.token_ids,
                  store.pair(pid).reward_a, store.pair(pid).reward_b, store.pair(pid).generated_at_iteration)
            for pid in store.prompt_ids() if store.pair(pid).has_pair}


def _direct_logps(model, prompts, responses, vocab):
    """Summed response log-probs by a plain float64 forward of the bare model, one sequence at a time."""
    out = []
    model.eval()
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            seq = list(p) + list(r)
            logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], None)[0, :, :vocab].double()
            logp = F.log_softmax(logits, -1)
            out.append(sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(r)))
    return torch.tensor(out, dtype=torch.float64)


def _instrumented_run(rank, overrides, exp_dir):
    """`fit()` of the real loop, watched: before each iteration the store and the weights it starts from,
    during it what the reward scored and the reference log-probs, after it what changed."""
    from optune_nemo.interfaces import Outcome
    from optune_nemo.selection.scores import select_lowest
    from optune_nemo.train import build_loop

    cfg = load_config([*E2E, f"exp_dir={exp_dir}", *overrides])
    loop = build_loop(cfg).loop
    scored = []
    real_fn = loop.reward.fn
    loop.reward.fn = lambda prompts, responses, meta: (scored.extend(responses), real_fn(prompts, responses, meta))[1]
    checks = {"ref_max_err": 0.0, "weights_unchanged_before_train": True}
    real_train = loop.policy.train
    model = loop.policy.unwrapped_model()
    start = {}

    def remember_start():
        """The state the next iteration starts from (after the previous one's training)."""
        start["store"] = _snapshot(loop.store)
        start["weights"] = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        scored.clear()

    def train(batch, loss_fn, **kw):
        now = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        checks["weights_unchanged_before_train"] &= all(torch.equal(start["weights"][k], now[k])
                                                        for k in start["weights"])
        direct_c = _direct_logps(model, batch.prompts, batch.chosen, loop.policy.vocab_size)
        direct_r = _direct_logps(model, batch.prompts, batch.rejected, loop.policy.vocab_size)
        err = max((batch.ref_chosen_logps.double() - direct_c).abs().max().item(),
                  (batch.ref_rejected_logps.double() - direct_r).abs().max().item())
        checks["ref_max_err"] = max(checks["ref_max_err"], err)
        return real_train(batch, loss_fn, **kw)

    per_iteration = []

    def after_iteration(t):
        """After iteration t's training (the loop's own hook): what it changed, against its start."""
        before, after = start["store"], _snapshot(loop.store)
        regenerated = sorted(pid for pid, rec in after.items() if rec[4] == t)
        if t > 0:
            ids = sorted(before)
            expected = select_lowest([max(before[i][2], before[i][3]) for i in ids], ids,
                                     num_regenerated(cfg.optune.rho, len(ids)))
        else:
            expected = sorted(after)
        new_texts = [loop.store.pair(pid).response_a.text for pid in regenerated] + \
                    [loop.store.pair(pid).response_b.text for pid in regenerated]
        per_iteration.append({
            "regenerated": regenerated, "expected": expected,
            "reused_identical": all(after[pid] == before[pid] for pid in before if pid not in regenerated),
            "scored_only_new": sorted(scored) == sorted(new_texts),
        })
        remember_start()

    loop.policy.train = train
    loop.after_iteration.append(after_iteration)
    remember_start()
    assert loop.fit() is Outcome.COMPLETED
    assert len(per_iteration) == cfg.optune.iterations
    assert [r["iteration"] for r in loop.metrics.records] == list(range(cfg.optune.iterations))
    for it, record in zip(per_iteration, loop.metrics.records):
        it["record"] = record
    return per_iteration, checks


def test_iteration_invariants(tmp_path):
    (per_iteration, checks), = run_ranks(_instrumented_run, 1, [], str(tmp_path / "run"))
    n = 16
    for t, it in enumerate(per_iteration):
        assert it["regenerated"] == it["expected"], f"iteration {t}"
        assert len(it["regenerated"]) == (n if t == 0 else math.ceil(0.5 * n))
        assert it["record"]["regenerated"] == len(it["regenerated"])
        assert it["reused_identical"], f"iteration {t}: a reused pair changed"
        assert it["scored_only_new"], f"iteration {t}: the reward saw responses that were not new"
        assert it["record"]["train_pairs"] > 0 and it["record"]["loss"] is not None
    assert checks["weights_unchanged_before_train"]
    assert checks["ref_max_err"] < 1e-4, checks


def _plain_run(rank, overrides, exp_dir):
    from optune_nemo.interfaces import Outcome
    from optune_nemo.runtime.rundir import world_size_from_env
    from optune_nemo.train import check_inputs, run_training

    cfg = check_inputs(load_config([*E2E, f"exp_dir={exp_dir}", *overrides]), world_size=world_size_from_env())
    assert run_training(cfg) is Outcome.COMPLETED


def _metrics(exp_dir):
    records = [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "generation_tokens_per_s"}
            for r in records]


def _store(exp_dir, it=2):
    return pq.read_table(exp_dir / "checkpoints" / f"iter_{it:06d}" / "rollouts.parquet").to_pydict()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    exp = tmp_path_factory.mktemp("one")
    run_ranks(_plain_run, 1, [], str(exp))
    return exp


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2"],
                                    ["parallel.pipeline_model_parallel_size=2"],
                                    ["parallel.use_distributed_optimizer=true"]], ids=["tp2", "pp2", "dp2"])
def test_two_ranks_equal_one(one_rank, tmp_path, layout):
    """The whole loop on two ranks (generation, scoring, reference, training, checkpoints) gives the
    same rollout store and the same metrics as one rank."""
    run_ranks(_plain_run, 2, layout, str(tmp_path / "two"))
    a, b = _store(one_rank), _store(tmp_path / "two")
    assert a == b
    assert_close_records(one_rank, tmp_path / "two")


def assert_close_records(one, two):
    """Two runs' metrics records are the same, floats to 1e-5 (another reduction order). At the first step of
    an iteration the policy IS the reference: every margin is 0 up to fp32 rounding, so the sign-counting
    accuracy is a coin flip per pair and is left out; loss and margin_mean (continuous) carry the comparison."""
    for ra, rb in zip(_metrics(one), _metrics(two), strict=True):
        ra.pop("implicit_reward_accuracy"), rb.pop("implicit_reward_accuracy")
        for key, va in ra.items():
            if isinstance(va, float):
                assert abs(va - rb[key]) < 1e-5, (key, va, rb[key])
            else:
                assert va == rb[key], key


def _weights(exp_dir, it):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_plain_tensors(str(exp_dir / "checkpoints" / f"iter_{it:06d}" / "model"))


def _train_cli(exp_dir, *overrides):
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.train", *E2E, f"exp_dir={exp_dir}", *overrides],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_three_iterations_equal_two_plus_resumed_third(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train_cli(straight, "optune.iterations=3")
    _train_cli(resumed, "optune.iterations=2")
    assert not (resumed / "checkpoints" / "iter_000002").exists()
    _train_cli(resumed, "optune.iterations=3")
    assert _store(straight) == _store(resumed)
    assert _metrics(straight) == _metrics(resumed)
    wa, wb = run_ranks(_weights_pair, 1, str(straight), str(resumed))[0]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rmsprop_resume_is_exact(tmp_path):
    """The paper's optimizer: its squared-gradient averages and step go through the checkpoint (a lost
    state would restart the third iteration's RMSprop from zero and change every weight)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train_cli(straight, "optune.iterations=3", "optim.optimizer=rmsprop")
    _train_cli(resumed, "optune.iterations=2", "optim.optimizer=rmsprop")
    _train_cli(resumed, "optune.iterations=3", "optim.optimizer=rmsprop")
    assert _metrics(straight) == _metrics(resumed)
    wa, wb = run_ranks(_weights_pair, 1, str(straight), str(resumed))[0]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _weights_pair(rank, a, b):
    from pathlib import Path

    from optune_nemo.megatron.parallel import init_distributed

    init_distributed(1, 1)
    return ({k: v for k, v in _weights(Path(a), 2).items() if isinstance(v, torch.Tensor)},
            {k: v for k, v in _weights(Path(b), 2).items() if isinstance(v, torch.Tensor)})


@pytest.mark.multiproc
def test_resume_tp2_from_tp1_checkpoint(tmp_path):
    """A run checkpointed at TP=1 resumes at TP=2 (dist checkpointing reshards) and ends as the
    uninterrupted TP=1 run does: sampling does not depend on the TP size."""
    straight, switched = tmp_path / "straight", tmp_path / "switched"
    _train_cli(straight, "optune.iterations=3")
    _train_cli(switched, "optune.iterations=2")
    run_ranks(_plain_run, 2, ["optune.iterations=3", "parallel.tensor_model_parallel_size=2"], str(switched))
    assert _store(straight) == _store(switched)
    for ra, rb in zip(_metrics(straight), _metrics(switched)):
        ra.pop("implicit_reward_accuracy"), rb.pop("implicit_reward_accuracy")   # see test_tp2_equals_tp1
        for key, va in ra.items():
            assert (abs(va - rb[key]) < 1e-5) if isinstance(va, float) else va == rb[key], key


def test_fork_from_iteration_0_equals_the_uninterrupted_run(tmp_path):
    """init_from: a run started from another run's iteration-0 checkpoint continues exactly as the original
    would (same seed and settings): store, metrics (the inherited iteration-0 record included), weights and
    the held-out evaluation's baseline."""
    ev = ["eval.num_prompts=4", "eval.max_new_tokens=6"]
    straight, base, fork = tmp_path / "straight", tmp_path / "base", tmp_path / "fork"
    _train_cli(straight, "optune.iterations=3", *ev)
    _train_cli(base, "optune.iterations=1", *ev)
    _train_cli(fork, "optune.iterations=3", f"init_from={base}/checkpoints/iter_000000", *ev)
    assert json.loads((fork / "fork.json").read_text()) == {
        "init_from": str((base / "checkpoints" / "iter_000000").resolve()), "iteration": 0}
    assert not (fork / "checkpoints" / "iter_000000").exists()
    assert _store(straight) == _store(fork)
    assert _metrics(straight) == _metrics(fork)
    assert _metrics(fork)[0] == _metrics(base)[0]
    wa, wb = run_ranks(_weights_pair, 1, str(straight), str(fork))[0]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    evals = [json.loads((d / "eval.json").read_text()) for d in (straight, base, fork)]
    assert evals[0]["baseline"] == evals[1]["baseline"] == evals[2]["baseline"]
    assert evals[0]["iterations"] == evals[2]["iterations"]
