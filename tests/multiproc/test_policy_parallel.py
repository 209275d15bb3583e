"""The policy gives the same numbers in every parallel layout (fp32): TP=2, PP=2, DP=2 (also with
the distributed optimizer) against one rank, starting from the same weights; and checkpoints
resume exactly, also into another layout."""

import pytest
import torch
from dist_utils import run_ranks
from tiny import WDPO, build, preference_batch, random_pairs, tiny_config

pytestmark = pytest.mark.multiproc


def _init_weights(rank, directory):
    policy = build(tiny_config())
    policy.save_checkpoint(directory)


def _train(rank, overrides, init_dir, save_dir=None):
    policy = build(tiny_config(*overrides))
    if init_dir:
        policy.load_checkpoint(init_dir, load_optimizer=False)
    batch = preference_batch(policy, 24)
    steps = policy.train(batch, WDPO, epochs=1, seed=0)     # 24 pairs / global batch 8 = 3 steps
    prompts, chosen, _ = random_pairs(24)
    after = policy.sequence_logprobs(prompts, chosen)
    if save_dir:
        policy.save_checkpoint(save_dir)
    return batch.ref_chosen_logps, [(s["loss"], s["grad_norm"], s["num_pairs"]) for s in steps], after


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    init = str(tmp_path_factory.mktemp("init") / "model")
    run_ranks(_init_weights, 1, init)
    return init, run_ranks(_train, 1, ["train.global_batch_size=8", "train.micro_batch_size=2"], init)[0]


@pytest.mark.parametrize("layout", [
    ["parallel.tensor_model_parallel_size=2"],
    ["parallel.pipeline_model_parallel_size=2"],
    [],                                                    # DP = 2
    ["parallel.use_distributed_optimizer=true"],          # DP = 2, sharded optimizer state
    # micro-batches filled to a token budget: other rows, the same mean over each global batch
    ["train.micro_batch_tokens=30"],            # DP = 2: rows of 1-2 pairs and masked empty ones
    ["parallel.pipeline_model_parallel_size=2", "train.micro_batch_tokens=50"],
], ids=["tp2", "pp2", "dp2", "dp2-distopt", "dp2-tokens", "pp2-tokens"])
def test_two_ranks_equal_one(reference, layout):
    init, (ref_logps, ref_steps, ref_after) = reference
    results = run_ranks(_train, 2, ["train.global_batch_size=8", "train.micro_batch_size=2", *layout], init)
    for logps, steps, after in results:
        torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=0)
        assert len(steps) == len(ref_steps) == 3
        for (loss, gnorm, n), (rloss, rgnorm, rn) in zip(steps, ref_steps):
            assert n == rn
            # the norm is ~5-10: compare it relative to its size (fp32 reduction order differs)
            assert abs(loss - rloss) < 1e-5 and abs(gnorm - rgnorm) < 1e-5 * max(1.0, rgnorm), (steps, ref_steps)
        torch.testing.assert_close(after, ref_after, atol=1e-5, rtol=1e-6)  # sums of ~-30: fp32 ulp ~4e-6


def test_microbatching_does_not_change_the_step(reference):
    """Gradient accumulation: 4 micro-batches of 2 pairs == 1 micro-batch of 8 pairs."""
    init, (_, ref_steps, ref_after) = reference
    (_, steps, after), = run_ranks(_train, 1, ["train.global_batch_size=8", "train.micro_batch_size=8"], init)
    for (loss, gnorm, _), (rloss, rgnorm, _) in zip(steps, ref_steps):
        assert abs(loss - rloss) < 1e-5 and abs(gnorm - rgnorm) < 1e-5 * max(1.0, rgnorm)
    torch.testing.assert_close(after, ref_after, atol=1e-5, rtol=1e-6)  # sums of ~-30: fp32 ulp ~4e-6


def _resume(rank, overrides, init_dir, ckpt_dir):
    """Load a checkpoint written after `_train`, then train on a second batch."""
    policy = build(tiny_config(*overrides))
    policy.load_checkpoint(ckpt_dir)
    batch = preference_batch(policy, 8, seed=5)
    steps = policy.train(batch, WDPO, epochs=1, seed=1)
    prompts, chosen, _ = random_pairs(8, seed=5)
    return [s["loss"] for s in steps], policy.sequence_logprobs(prompts, chosen)


def _straight(rank, overrides, init_dir):
    policy = build(tiny_config(*overrides))
    policy.load_checkpoint(init_dir, load_optimizer=False)
    policy.train(preference_batch(policy, 24), WDPO, epochs=1, seed=0)
    batch = preference_batch(policy, 8, seed=5)
    steps = policy.train(batch, WDPO, epochs=1, seed=1)
    prompts, chosen, _ = random_pairs(8, seed=5)
    return [s["loss"] for s in steps], policy.sequence_logprobs(prompts, chosen)


def test_resume_is_exact_and_reshards(reference, tmp_path):
    init, _ = reference
    over = ["train.global_batch_size=8", "train.micro_batch_size=2"]
    ckpt = str(tmp_path / "after3")
    run_ranks(_train, 1, over, init, ckpt)
    (straight_losses, straight_logps), = run_ranks(_straight, 1, over, init)
    (losses, logps), = run_ranks(_resume, 1, over, init, ckpt)
    assert losses == straight_losses                       # bitwise: optimizer state restored exactly
    assert torch.equal(logps, straight_logps)
    for losses2, logps2 in run_ranks(_resume, 2, [*over, "parallel.tensor_model_parallel_size=2"], init, ckpt):
        assert max(abs(a - b) for a, b in zip(losses2, straight_losses)) < 1e-5
        torch.testing.assert_close(logps2, straight_logps, atol=1e-5, rtol=0)


def _bf16(rank, init_dir, ckpt_dir, resume):
    policy = build(tiny_config("precision=bf16", "parallel.use_distributed_optimizer=true",
                               "train.global_batch_size=8", "train.micro_batch_size=2"))
    assert next(policy.unwrapped_model().parameters()).dtype == torch.bfloat16
    if resume:
        policy.load_checkpoint(ckpt_dir)
    else:
        policy.load_checkpoint(init_dir, load_optimizer=False)
        policy.train(preference_batch(policy, 8), WDPO, epochs=1, seed=0)
        policy.save_checkpoint(ckpt_dir)
    batch = preference_batch(policy, 8, seed=5)
    return [s["loss"] for s in policy.train(batch, WDPO, epochs=1, seed=1)], batch.ref_chosen_logps


def test_bf16_trains_close_to_fp32_and_resumes_exactly(reference, tmp_path):
    init, _ = reference
    ckpt = str(tmp_path / "bf16")
    straight_losses, _ = run_ranks(_bf16, 1, init, ckpt, False)[0]
    resumed_losses, _ = run_ranks(_bf16, 1, init, ckpt, True)[0]
    assert resumed_losses == straight_losses              # fp32 master weights restored exactly
    (fp32_logps, fp32_steps, _), = run_ranks(_train, 1, ["train.global_batch_size=8", "train.micro_batch_size=2"],
                                             init)
    (_, bf16_steps, _), = run_ranks(_train, 1, ["train.global_batch_size=8", "train.micro_batch_size=2",
                                                "precision=bf16", "parallel.use_distributed_optimizer=true"], init)
    for (loss, _, _), (rloss, _, _) in zip(bf16_steps, fp32_steps):
        assert abs(loss - rloss) < 0.02 * max(1.0, abs(rloss)), (bf16_steps, fp32_steps)
