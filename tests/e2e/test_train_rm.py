"""`python -m optune_nemo.train_rm` end to end on tiny models: it learns a separable preference, a run
stopped after 2 steps and resumed equals 3 uninterrupted steps bitwise (fp32, and bf16 with the distributed
optimizer), its export and bf16-trained checkpoints score the same under both reward types and plain
transformers, `rm.init_from` continues from a run, precision=auto is decided whatever the source, and bad
inputs stop it with exit code 2, one line, and nothing left in exp_dir."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from hf_tiny import make_hf_model, tiny_tokenizer
from rm_tiny import TINY_RM, hf_scores, save_hf_rm, separable_rows, write_jsonl

from optune_nemo.interfaces import Outcome

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "optune_nemo.train_rm", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _checkpoints(exp_dir):
    return sorted(p.name for p in (Path(exp_dir) / "checkpoints").iterdir() if p.is_dir())


def _records(exp_dir):
    return [json.loads(line) for line in (Path(exp_dir) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- it learns


@pytest.mark.slow
def test_learns_a_separable_preference(tmp_path):
    """Every chosen response holds a `#` no rejected one has: held-out accuracy must reach 95 %."""
    train = write_jsonl(tmp_path / "train.jsonl", separable_rows(64, seed=1))
    held = write_jsonl(tmp_path / "held.jsonl", separable_rows(40, seed=2))
    exp = tmp_path / "run"
    proc = _cli(*TINY_RM, f"exp_dir={exp}", f"data.path={train}", f"data.eval_path={held}", "rm.epochs=2",
                "rm.eval_every=8", "rm.save_every=0", "logging.tensorboard=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(exp)
    assert [r["iteration"] for r in records] == [0, 8, 16]
    assert records[0]["eval_pairs"] == 40 and "train_loss" not in records[0]
    assert records[-1]["eval_accuracy"] >= 0.95, [r["eval_accuracy"] for r in records]
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    assert records[-1]["train_accuracy"] >= 0.95
    assert (exp / "COMPLETED").is_file() and list((exp / "tensorboard").glob("events.*"))
    assert _checkpoints(exp) == ["iter_000016"]
    # the verdict: it beats chance, did not over-fit, and says nothing loud
    final = records[-1]
    assert final["eval_correct"] == round(final["eval_accuracy"] * 40) and final["heldout_p_value"] <= 0.05
    assert (final["heldout_beats_chance"], final["overfit"], final["early_stopped"]) == (True, False, False)
    assert not _warnings(proc.stderr), _warnings(proc.stderr)
    assert all("heldout_beats_chance" not in r for r in records[:-1])


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " WARNING " in line]


def unlearnable_rows(n: int, seed: int, *, both_orders: bool) -> list[dict]:
    """n prompts that all get the same two responses; which one is chosen is a coin toss per row. With
    `both_orders` every prompt comes twice, once each way: no scorer ranks more than half of them right."""
    rng = random.Random(seed)
    a, b = "w100 w101 w102", "w103 w104"
    rows = []
    for i in range(n):
        prompt = f"what is w{20 + (seed * n + i) % 200} ?"
        if both_orders:
            rows += [{"prompt": prompt, "chosen": a, "rejected": b}, {"prompt": prompt, "chosen": b, "rejected": a}]
        else:
            rows.append({"prompt": prompt, **(dict(chosen=a, rejected=b) if rng.random() < 0.5
                                              else dict(chosen=b, rejected=a))})
    return rows


@pytest.mark.slow
def test_unlearnable_preference_is_flagged_and_early_stopping(tmp_path):
    """Random labels: the run warns, and metrics.jsonl and the export's optune_rm_verdict.json say the held-out
    accuracy does not beat chance (at most 16 of 32 right, by construction). With patience 2 and a record every
    step the run stops once two evaluations in a row fail to lower the held-out loss below its best."""
    src = tmp_path / "llama"
    make_hf_model("llama_untied", seed=5).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    train = write_jsonl(tmp_path / "train.jsonl", unlearnable_rows(48, seed=1, both_orders=False))
    held = write_jsonl(tmp_path / "held.jsonl", unlearnable_rows(16, seed=2, both_orders=True))
    exp = tmp_path / "run"
    proc = _cli(f"policy.hf_path={src}", f"data.path={train}", f"data.eval_path={held}", f"exp_dir={exp}",
                "model.seq_length=32", "logging.progress=false", "logging.tensorboard=false", "precision=fp32",
                "rm.global_batch_size=8", "rm.micro_batch_size=4", "optim.lr=0.002", "optim.warmup_ratio=0.0",
                "rm.epochs=4", "rm.eval_every=1", "rm.save_every=0", "rm.early_stopping_patience=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = _warnings(proc.stderr)
    assert any("does not beat chance" in w for w in warnings), proc.stderr[-3000:]
    records = _records(exp)
    final = records[-1]
    assert final["eval_pairs"] == 32 and final["eval_correct"] <= 16
    assert final["heldout_beats_chance"] is False and final["heldout_p_value"] > 0.5
    meta = json.loads((exp / "hf" / "final" / "optune_rm_verdict.json").read_text())
    assert meta["heldout_beats_chance"] is False and meta["heldout_pairs"] == 32
    assert meta["heldout_p_value"] == final["heldout_p_value"] and meta["overfit"] == final["overfit"]
    assert meta["overfit"] == (any("over-fitting" in w for w in warnings))
    # early stopping, checked against the records: it stopped at the first evaluation that was the second
    # in a row without a new lowest held-out loss, and not before
    losses = [r["eval_loss"] for r in records]
    assert [r["iteration"] for r in records] == list(range(len(records)))
    stale = [i for i in range(2, len(losses)) if min(losses[i - 1:i + 1]) >= min(losses[:i - 1])]
    assert stale and final["iteration"] == stale[0] < 4 * 6, losses
    assert final["early_stopped"] is True and meta["early_stopped"] is True and meta["steps"] == final["iteration"]
    # the same command again resumes from the final checkpoint and ends at once: nothing retrained
    again = _cli(f"policy.hf_path={src}", f"data.path={train}", f"data.eval_path={held}", f"exp_dir={exp}",
                 "model.seq_length=32", "logging.progress=false", "logging.tensorboard=false", "precision=fp32",
                 "rm.global_batch_size=8", "rm.micro_batch_size=4", "optim.lr=0.002", "optim.warmup_ratio=0.0",
                 "rm.epochs=4", "rm.eval_every=1", "rm.save_every=0", "rm.early_stopping_patience=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _records(exp) == records


# --------------------------------------------------------------------------- exact resume


def _run(rank, overrides, stop_after):
    """The real assembly; with `stop_after`, a pre-emption request arrives after that many steps."""
    from optune_nemo.rm.config import load_config
    from optune_nemo.rm.train import build_trainer, check_inputs

    trainer = build_trainer(check_inputs(load_config(overrides), world_size=1))
    if stop_after is not None:
        trainer.guard.requested = lambda: trainer.step >= stop_after
    outcome = trainer.fit()
    trainer.metrics.close()
    weights = {k: v.detach().clone() for k, v in trainer.model.unwrapped_model().state_dict().items()
               if isinstance(v, torch.Tensor)}
    return outcome, trainer.step, weights


def _no_time(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_two_steps_then_resume_equal_three_steps(tmp_path, precision, dtype):
    """bf16 runs with megatron's distributed optimizer: its checkpoint must give every parameter back its own
    fp32 main weights and Adam moments, or the third step after the resume differs."""
    data = write_jsonl(tmp_path / "p.jsonl", separable_rows(30, seed=4))
    # a record at steps 0 and 3: the checkpoint at step 2 carries the training means of steps 1-2
    common = [*TINY_RM, f"data.path={data}", "rm.eval_fraction=0.2", "rm.eval_every=3", "rm.save_every=0",
              f"precision={precision}"]
    (outcome, steps, straight), = run_ranks(_run, 1, [*common, f"exp_dir={tmp_path}/a"], None)
    assert (outcome, steps) == (Outcome.COMPLETED, 3)            # 24 training pairs / 8 per step
    # the run trained in the precision asked for, the head included (not left in fp32 beside bf16 matrices)
    assert {straight[n].dtype for n in ("embedding.word_embeddings.weight", "output_layer.weight")} == {dtype}
    (outcome, steps, _), = run_ranks(_run, 1, [*common, f"exp_dir={tmp_path}/b"], 2)
    assert (outcome, steps) == (Outcome.PREEMPTED, 2)
    assert _checkpoints(tmp_path / "b") == ["iter_000002"]
    (outcome, steps, resumed), = run_ranks(_run, 1, [*common, f"exp_dir={tmp_path}/b"], None)
    assert (outcome, steps) == (Outcome.COMPLETED, 3)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert _no_time(_records(tmp_path / "a")) == _no_time(_records(tmp_path / "b"))
    assert [r["iteration"] for r in _records(tmp_path / "a")] == [0, 3]
    # the same exp_dir with other pairs: refused, the checkpoints stay as they were
    other = write_jsonl(tmp_path / "q.jsonl", separable_rows(30, seed=5))
    with pytest.raises(RuntimeError, match="data.path: the preference pairs differ from those of checkpoint"):
        run_ranks(_run, 1, [*common, f"data.path={other}", f"exp_dir={tmp_path}/b"], None)
    assert _checkpoints(tmp_path / "b") == ["iter_000002", "iter_000003"]


# --------------------------------------------------------------------------- from and to Hugging Face


def _scores_of(rank, rm_dir, prompts, responses):
    from optune_nemo.config import RewardConfig
    from optune_nemo.interfaces import Prompt
    from optune_nemo.reward import build_reward

    out = {}
    for rtype, path in (("megatron", rm_dir), ("hf", f"{rm_dir}/hf/final")):
        reward = build_reward(RewardConfig(type=rtype, path=path, batch_size=2))
        reward.prepare()
        out[rtype] = torch.tensor(reward.score([Prompt(i, t, (1,)) for i, t in enumerate(prompts)], responses))
    return out


@pytest.mark.slow
def test_export_checkpoint_and_init_from(tmp_path):
    src = tmp_path / "llama"
    make_hf_model("llama_untied", seed=5).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    rows = [{"prompt": f"what is {w} ?", "chosen": f"{w} w9 w10", "rejected": "w11"} for w in ("2", "3", "hello")] * 4
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    exp = tmp_path / "run"
    # trained in bf16 (distributed optimizer) on any machine: the checkpoint holds bf16 weights, which the
    # megatron reward type loads into its own precision (fp32 on a CPU)
    common = [f"policy.hf_path={src}", f"data.path={data}", "rm.eval_fraction=0.25", "rm.eval_every=1",
              "rm.global_batch_size=4", "rm.micro_batch_size=2", "model.seq_length=32", "logging.progress=false",
              "precision=bf16"]
    proc = _cli(*common, f"exp_dir={exp}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision: bf16" in (exp / "config.yaml").read_text()
    final = exp / "hf" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0

    prompts, responses = ["what is 2 ?", "hello world"], ["2 w9", "w12 w13 w14"]
    tok = tiny_tokenizer()
    seqs = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p, r in zip(prompts, responses)]
    want = hf_scores(final, seqs)
    (got,) = run_ranks(_scores_of, 1, str(exp), prompts, responses)
    # the reward types run in bf16 on a GPU
    tol = 1e-4 if not torch.cuda.is_available() else 0.05 * max(1.0, float(want.abs().max()))
    for rtype, scores in got.items():
        assert (scores - want).abs().max() < tol, (rtype, scores, want)

    # a second run starting from the first one's weights: its step-0 evaluation is the first run's last
    proc = _cli(*[c for c in common if not c.startswith("policy.hf_path")], "policy.hf_path=null",
                f"rm.init_from={exp}", f"exp_dir={tmp_path}/next", "rm.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = _records(exp), _records(tmp_path / "next")
    assert second[0]["iteration"] == 0 and second[0]["eval_loss"] == pytest.approx(first[-1]["eval_loss"], abs=1e-6)


# --------------------------------------------------------------------------- precision=auto


def test_precision_auto_is_decided_whatever_the_source(tmp_path):
    """precision=auto and use_distributed_optimizer=null are decided as `fast_bf16` says for every source: the
    tiny random model, a causal LM, an HF reward model and a train_rm checkpoint (`rm.init_from`). Left
    undecided, `auto` built bf16 weights under an fp32 optimizer."""
    from optune_nemo.rm.config import load_config
    from optune_nemo.rm.train import check_inputs
    from optune_nemo.runtime.hardware import fast_bf16

    want = "bf16" if fast_bf16()[0] else "fp32"
    data = write_jsonl(tmp_path / "p.jsonl", separable_rows(8, seed=3))
    lm = tmp_path / "lm"
    make_hf_model("llama_untied", seed=5).save_pretrained(lm)
    tiny_tokenizer().save_pretrained(lm)
    run = tmp_path / "run"
    proc = _cli(*TINY_RM, f"data.path={data}", f"exp_dir={run}", "rm.eval_fraction=0", "rm.epochs=1",
                "precision=fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sources = {"random": [*TINY_RM], "causal_lm": [f"policy.hf_path={lm}"],
               "hf_rm": [f"policy.hf_path={save_hf_rm('llama_untied', tmp_path / 'rm')}"],
               "checkpoint": ["policy.hf_path=null", f"rm.init_from={run}"]}
    for source, overrides in sources.items():
        cfg = check_inputs(load_config([*overrides, f"data.path={data}", f"exp_dir={tmp_path}/x"]), world_size=1)
        got = (cfg.precision, cfg.parallel.use_distributed_optimizer)
        assert got == (want, want == "bf16"), (source, got)


# --------------------------------------------------------------------------- bad inputs


def _assert_refused(proc, key, fragment, exp):
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"optune_nemo.rm.train: configuration error: {key}") and fragment in last, last
    assert not exp.exists(), sorted(p.name for p in exp.rglob("*"))


@pytest.mark.parametrize("bad_row, fragment", [
    ({"prompt": "p"}, "row 2 is missing `chosen`"),
    ({"prompt": "p", "chosen": "x y", "rejected": "x y"}, "row 2 `chosen` and `rejected` are identical"),
], ids=["missing-chosen", "identical"])
def test_bad_preference_rows_exit_2(tmp_path, bad_row, fragment):
    data = write_jsonl(tmp_path / "p.jsonl", [*separable_rows(2), bad_row])
    exp = tmp_path / "run"
    _assert_refused(_cli(*TINY_RM, f"data.path={data}", f"exp_dir={exp}"), "data.path", fragment, exp)


def test_reward_model_with_two_labels_exit_2(tmp_path):
    save_hf_rm("llama_tied", tmp_path / "rm2", num_labels=2)
    data = write_jsonl(tmp_path / "p.jsonl", separable_rows(4))
    exp = tmp_path / "run"
    proc = _cli(f"policy.hf_path={tmp_path / 'rm2'}", f"data.path={data}", f"exp_dir={exp}")
    _assert_refused(proc, "policy.hf_path", "num_labels = 2", exp)


def test_causal_lm_given_as_reward_model_exit_2(tmp_path):
    make_hf_model("llama_tied").save_pretrained(tmp_path / "lm")
    data = write_jsonl(tmp_path / "p.jsonl", separable_rows(4))
    exp = tmp_path / "run"
    proc = _cli(*TINY_RM, f"rm.init_from={tmp_path / 'lm'}", f"data.path={data}", f"exp_dir={exp}")
    _assert_refused(proc, "rm.init_from", "is a causal language model (LlamaForCausalLM), not a reward model", exp)


def test_unknown_key_and_bad_value_exit_2(tmp_path):
    exp = tmp_path / "run"
    _assert_refused(_cli(f"exp_dir={exp}", "rm.bogus=1"), "rm.bogus", "unknown key", exp)
    data = write_jsonl(tmp_path / "p.jsonl", separable_rows(4))
    proc = _cli(*TINY_RM, f"data.path={data}", f"exp_dir={exp}", "rm.global_batch_size=6")
    _assert_refused(proc, "rm.global_batch_size", "multiple of rm.micro_batch_size", exp)


def test_optune_run_refuses_a_causal_lm_as_its_reward(tmp_path):
    """`python -m optune_nemo.train reward.type=hf|megatron` with a causal-LM directory: exit 2 before any write."""
    make_hf_model("llama_tied").save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    exp = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.train", "policy.hf_path=null", "eval.num_prompts=0",
                           "reward.type=hf", f"reward.path={tmp_path / 'lm'}", f"exp_dir={exp}"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "reward.path:" in last and "is a causal language model" in last, last
    assert not exp.exists()
