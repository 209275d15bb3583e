"""bf16 training on the real code paths: the optimizer's fp32 main weights follow weights loaded from a
Hugging Face model (the first step used to write the random initialisation back), the reference log-probs
equal the policy's at an iteration's first step (the margin starts at exactly 0), and a checkpoint of a
model with bf16 biases (Qwen2) resumes bit for bit."""

import pytest
import torch

pytestmark = pytest.mark.multiproc


def _policy(hf_dir, seed=1, lr=3e-5):
    from optune_nemo.build import build_policy_parts, resolve
    from optune_nemo.config import load_config

    cfg = resolve(load_config([f"policy.hf_path={hf_dir}", "model.seq_length=64", "precision=bf16",
                               "eval.num_prompts=0", "optim.warmup_ratio=0", "train.global_batch_size=8",
                               "train.micro_batch_size=2", f"seed={seed}", f"optim.lr={lr}"]))
    return build_policy_parts(cfg).policy


def _pairs(n=8, vocab=250):
    g = torch.Generator().manual_seed(0)
    seq = lambda lo, hi: torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    return [seq(3, 9) for _ in range(n)], [seq(1, 7) for _ in range(n)], [seq(1, 7) for _ in range(n)]


def _batch(policy, seed):
    from optune_nemo.interfaces import PreferenceBatch

    p, c, r = _pairs()
    ref_c, ref_r = policy.pair_logprobs(p, c, r, seed=seed)
    return PreferenceBatch(p, c, r, ref_c, ref_r, torch.linspace(0, 1, 8), torch.zeros(8))


def _loaded_weights_survive_a_step(rank, hf_dir):
    from optune_nemo.losses.wdpo import WDPO

    policy = _policy(hf_dir, lr=1e-9)
    batch = _batch(policy, seed=5)
    before = torch.cat([batch.ref_chosen_logps, batch.ref_rejected_logps])
    steps = policy.train(batch, WDPO(beta1=0.1, beta2=1.0), epochs=1, seed=5)
    after = torch.cat(policy.pair_logprobs(batch.prompts, batch.chosen, batch.rejected, seed=5))
    return steps[0]["margin_mean"], steps[0]["implicit_reward_accuracy"], (after - before).abs().max().item()


def test_bf16_first_step_sees_the_reference_and_keeps_the_loaded_weights(tmp_path):
    from dist_utils import run_ranks
    from hf_tiny import save_hf_model_with_tokenizer

    hf = save_hf_model_with_tokenizer("llama_tied", tmp_path / "hf")
    margin, accuracy, drift = run_ranks(_loaded_weights_survive_a_step, 1, str(hf))[0]
    assert margin == 0.0 and accuracy == 0.0        # reference == policy at the first step, bit for bit
    assert drift < 0.05, drift                     # a 1e-9 step: the loaded weights are still there


def _resume(rank, hf_dir, ckpt):
    from optune_nemo.losses.wdpo import WDPO

    loss = WDPO(beta1=0.1, beta2=1.0)
    a = _policy(hf_dir)
    a.train(_batch(a, 1), loss, epochs=1, seed=1)
    a.save_checkpoint(ckpt)
    a.train(_batch(a, 2), loss, epochs=1, seed=2)
    b = _policy(hf_dir, seed=99)                   # other initial weights: all must come from the checkpoint
    b.load_checkpoint(ckpt)
    b.train(_batch(b, 2), loss, epochs=1, seed=2)
    wa, wb = a.unwrapped_model().state_dict(), b.unwrapped_model().state_dict()
    return all(torch.equal(wa[k], wb[k]) for k in wa if isinstance(wa[k], torch.Tensor))


def test_bf16_qwen2_checkpoint_resumes_bitwise(tmp_path):
    """Qwen2's QKV biases are bf16 parameters in the no-weight-decay group next to the norms; with norms left
    in fp32 megatron's distributed optimizer paired parameters with the wrong main weights on save."""
    from dist_utils import run_ranks
    from hf_tiny import save_hf_model_with_tokenizer

    hf = save_hf_model_with_tokenizer("qwen2_untied", tmp_path / "hf")
    assert run_ranks(_resume, 1, str(hf), str(tmp_path / "ckpt"))[0]
