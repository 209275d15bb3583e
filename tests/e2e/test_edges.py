"""The command line's edges: every error caused by the user's configuration, files or functions ends
with exit code 2 and one last line naming the key or file, and leaves nothing in exp_dir that
`resume=auto` would pick up; validation sees the pretrained model's real shape before anything is written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_optune_loop import E2E

ROOT = Path(__file__).resolve().parents[2]
PROG = "optune_nemo: configuration error: "


def _cli(exp_dir, *args, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "fixtures"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.train", f"exp_dir={exp_dir}", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else ""), proc.stderr


def _assert_refused(exp, args, key, *, env=None):
    rc, last, err = _cli(exp, *args, env=env)
    assert rc == 2, err[-3000:]
    assert last.startswith(PROG + key), last
    assert "Traceback" not in err, err[-3000:]
    assert not exp.exists(), f"{exp} was left behind: {sorted(p.name for p in exp.rglob('*'))}"
    return last


# --------------------------------------------------------------------------- the configuration itself


@pytest.mark.parametrize("args,key,needle", [
    (["optune.rhoo=1"], "optune.rhoo", "unknown key (keys under optune: iterations, rho"),
    (["optune.rho=abc"], "optune.rho", "could not be converted to Float"),
    (["bogus=1"], "bogus", "unknown key"),
    (["optune.rho=[1"], "", "no viable alternative"),
    (["optune.rho=0"], "optune.rho", "must be in (0, 1]"),
])
def test_configuration_errors_are_one_line_exit_2(tmp_path, args, key, needle):
    last = _assert_refused(tmp_path / "run", [*E2E, *args], key)
    assert needle in last


def test_the_real_model_shape_is_validated_before_anything_is_written(tmp_path):
    """The default SmolLM2 has 9 query heads and 3 KV heads: TP=2 cannot split it (the README once showed
    exactly this command)."""
    last = _assert_refused(tmp_path / "run", ["parallel.tensor_model_parallel_size=2", "optune.iterations=1"],
                           "parallel.tensor_model_parallel_size", env={"WORLD_SIZE": "2", "RANK": "0"})
    assert "of policy.hf_path=smollm2 = 9" in last


def test_tiny_hf_model_shape_and_lengths(tmp_path):
    from hf_tiny import save_hf_model_with_tokenizer

    hf = save_hf_model_with_tokenizer("llama_tied", tmp_path / "hf")   # 4 heads, 2 KV heads, 2 layers
    base = [f"policy.hf_path={hf}", "eval.num_prompts=0", "model.seq_length=64"]
    last = _assert_refused(tmp_path / "a", [*base, "parallel.tensor_model_parallel_size=4"],
                           "parallel.tensor_model_parallel_size", env={"WORLD_SIZE": "4", "RANK": "0"})
    assert "model.num_query_groups" in last
    _assert_refused(tmp_path / "b", [*base, "parallel.pipeline_model_parallel_size=4"],
                    "parallel.pipeline_model_parallel_size", env={"WORLD_SIZE": "4", "RANK": "0"})
    _assert_refused(tmp_path / "c", [*base, "data.max_prompt_length=60", "generation.max_new_tokens=8"],
                    "model.seq_length")


# --------------------------------------------------------------------------- files


def test_missing_prompt_file(tmp_path):
    last = _assert_refused(tmp_path / "run", [*E2E, f"data.path={tmp_path}/none.jsonl"], "data.path")
    assert "file not found" in last


def test_malformed_prompt_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
    last = _assert_refused(tmp_path / "run", [*E2E, f"data.path={bad}"], "data.path")
    assert "line 2 is not valid JSON" in last
    bad.write_text('{"text": "no prompt field"}\n')
    _assert_refused(tmp_path / "run2", [*E2E, f"data.path={bad}"], "data.path")
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"not parquet at all")
    last = _assert_refused(tmp_path / "run3", [*E2E, f"data.path={parquet}"], "data.path")
    assert "not a readable Parquet file" in last


def test_trtllm_without_tensorrt_llm_is_refused_before_any_write(tmp_path):
    last = _assert_refused(tmp_path / "run", ["generation.engine=trtllm", "optune.iterations=1"],
                           "generation.engine")
    assert "TensorRT-LLM" in last


# --------------------------------------------------------------------------- the user's reward function


@pytest.mark.parametrize("fn,needle", [
    ("nan_reward", "returned a non-finite reward nan for prompt id"),
    ("short_reward", "returned 11 rewards for 12 responses"),
    ("raising_reward", "raised RuntimeError: the scoring service said no"),
])
def test_broken_reward_function_fresh_run_leaves_nothing(tmp_path, fn, needle):
    last = _assert_refused(tmp_path / "run", [*E2E, f"reward.function._target_=broken_rewards.{fn}",
                                              "~reward.function.target_chars"], "reward.function")
    assert needle in last and f"broken_rewards.{fn}" in last


def test_broken_reward_on_resume_keeps_only_the_earlier_state(tmp_path):
    """A good first invocation checkpoints iteration 0; the next one (a reward that breaks from iteration 1
    on) fails: what it created goes, the earlier checkpoint stays and is what resume=auto finds."""
    exp = tmp_path / "run"
    rc, _, err = _cli(exp, *E2E, "optune.iterations=1")
    assert rc == 0, err[-3000:]
    before = sorted(str(p.relative_to(exp)) for p in exp.rglob("*") if "tensorboard" not in p.parts)
    marker = exp / "checkpoints" / "iter_000000"
    rc, last, err = _cli(exp, *E2E, "optune.iterations=3", "reward.function._target_=broken_rewards.nan_reward",
                         "~reward.function.target_chars", env={"OPTUNE_TEST_BREAK_AFTER": str(marker)})
    assert rc == 2 and last.startswith(PROG + "reward.function"), err[-3000:]
    after = sorted(str(p.relative_to(exp)) for p in exp.rglob("*") if "tensorboard" not in p.parts)
    assert after == before
    assert not (exp / "partial" / "iter_000001").exists()


@pytest.mark.parametrize("damage", ["missing", "no_manifest"])
def test_generate_from_a_bad_checkpoint_is_one_line_exit_3(tmp_path, damage):
    """`python -m optune_nemo.generate --ckpt` screens the checkpoint before loading anything from it: a missing
    directory, or one that was never completely written, is one line naming it, exit 3 (a checkpoint error)."""
    ckpt = tmp_path / "checkpoints" / "iter_000001"
    if damage == "no_manifest":
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.yaml").write_text("next_iteration: 2\n")
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.generate", "--ckpt", str(ckpt), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith(f"optune_nemo.generate: --ckpt: {ckpt}"), lines[-1]
